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
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input file {path} does not exist")
    with path.open("r", encoding="utf-8") as f:
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


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w") -> Iterator[Any]:
    """Open a temporary sibling of `path` for writing; rename it to `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
