"""Row I/O shared by the stages: streaming JSONL with located errors, atomic shard files.

Consumes JSONL files (one JSON object per line; multi-GB files are streamed, never loaded
whole) and produces:
- `iter_jsonl(path)`: (line number, row) pairs; a malformed line raises `BadRow` naming the
  file and line, or (with `on_bad="skip"`) is handed to a callback so it can be written to a
  rejects file with its reason.
- `atomic_write(path)`: a file is written under a temporary name in the same folder and
  renamed into place when complete, so a killed job never leaves a half-written file under
  its final name. Stages write their output as numbered shards this way; on restart a shard
  that exists is finished work and is skipped.

Paths may be local or `gs://` (read and written through `dasd_jax.storage`, which gives
gs:// objects the same "exists under its final name => complete" guarantee).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dasd_jax import storage


class BadRow(ValueError):
    """A row that cannot be used, located by file and line."""

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


def iter_jsonl(
    path: str | Path,
    *,
    on_bad: str = "error",
    rejected: Callable[[BadRow, str], None] | None = None,
    start_line: int = 1,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-empty line of a JSONL file.

    on_bad="error" raises BadRow on a line that is not a JSON object; "skip" calls
    `rejected(error, raw_line)` and goes on. Lines before `start_line` are skipped unparsed.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    path = os.fspath(path)
    with storage.open_read(path) as f:  # FileNotFoundError naming the file
        for n, raw in enumerate(f, start=1):
            if n < start_line or not raw.strip():
                continue
            try:
                row = json.loads(raw)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                err = BadRow(path, n, f"malformed JSON: {e}")
                if on_bad == "error":
                    raise err from None
                if rejected is not None:
                    rejected(err, raw)
                continue
            yield n, row


def require_fields(row: dict, fields: dict[str, type], path: str | Path, line: int) -> None:
    """BadRow naming the first missing or mistyped field."""
    for name, tp in fields.items():
        if name not in row:
            raise BadRow(path, line, f"missing field {name!r} (has {sorted(row)})")
        if not isinstance(row[name], tp):
            raise BadRow(
                path,
                line,
                f"field {name!r} should be {tp.__name__}, got {type(row[name]).__name__}",
            )


def atomic_write(path: str | Path, mode: str = "w"):
    """A file object for `path` that appears complete or not at all (`storage.atomic_write`:
    a temporary sibling renamed into place locally; an upload then a copy on gs://)."""
    return storage.atomic_write(path, mode)


def write_jsonl(path: str | Path, rows) -> int:
    """Atomically write rows as JSONL; returns the count."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def shard_name(index: int) -> str:
    return f"part-{index:06d}.jsonl"
