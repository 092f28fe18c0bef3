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
- `BadRowPolicy` / `BadRows`: the pipeline-wide rule for bad rows (`bad_rows.*` in the
  config; docs/pipeline.md): every stage counts a bad row (file, line, reason) into its
  rejects and goes on, until more than `max_bad_fraction` of its rows are bad; then it stops
  with `TooManyBadRows` naming the count, the top reasons and the rejects file.
  `on_bad_row=error` stops at the first bad row instead (strict runs).

Paths may be local or `gs://` (read and written through `dasd_jax.storage`, which gives
gs:// objects the same "exists under its final name => complete" guarantee).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dasd_jax import storage


class BadRow(ValueError):
    """A row that cannot be used, located by file and line."""

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


def decode_line(raw: bytes, path: str | Path, line: int) -> str:
    """One line read as bytes, as text; a line that is not UTF-8 is a `BadRow` naming the
    offending byte and its column (so `on_bad_row=skip` counts it like any bad row)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        byte = raw[e.start : e.start + 1].hex()
        reason = f"not UTF-8: byte 0x{byte} at column {e.start + 1} ({e.reason})"
        raise BadRow(path, line, reason) from None


@dataclass(frozen=True)
class BadRowPolicy:
    """What a stage does with a row it cannot use (the `bad_rows` config section).

    on_bad_row: "skip" (count it into the stage's rejects with its reason and go on) or
      "error" (stop at the first one, naming file, line and reason). A stage's own
      `<stage>.on_bad_row` ("" = this) overrides it for that stage.
    max_bad_fraction: with "skip", the stage stops (`TooManyBadRows`) once more than this
      fraction of its input rows are bad. 0.05 by default: a healthy input (the released data,
      a teacher's samples) has well under 1% bad rows, while a systematic fault (a wrong field
      name, tokenizer or format) makes most rows bad; 5% sits far from both, lets the odd bad
      row of a small input through (1 in 20) and stops a broken run within its first 5%.
    """

    on_bad_row: str = "skip"
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.on_bad_row not in ("error", "skip"):
            raise ValueError(f"on_bad_row must be error or skip, got {self.on_bad_row!r}")
        if not (math.isfinite(self.max_bad_fraction) and 0.0 <= self.max_bad_fraction <= 1.0):
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")

    def for_stage(self, on_bad_row: str) -> BadRowPolicy:
        """This policy with a stage's own `on_bad_row` ("" = keep the pipeline-wide one)."""
        if not on_bad_row:
            return self
        return BadRowPolicy(on_bad_row, self.max_bad_fraction)


class TooManyBadRows(ValueError):
    """More than `max_bad_fraction` of a stage's rows are bad."""


def reason_key(reason: str) -> str:
    """The name of a reject reason, for counting: the text before its first ':' or ' ('
    ("teacher_text_mismatch: tokens 3..5 ..." -> "teacher_text_mismatch")."""
    return re.split(r":| \(", reason, maxsplit=1)[0].strip()[:80] or reason[:80]


class BadRows:
    """A stage's bad rows under a `BadRowPolicy`.

    `add(err)` raises `err` under "error"; under "skip" it counts the row by reason and
    raises `TooManyBadRows` as soon as the count exceeds `max_bad_fraction` of `total` (the
    stage's input rows, when known up front: the final fraction can then only be larger), so a
    broken run stops early. `check(rows, bad, reasons)` is the final test on a stage's totals
    (resumed shards included). `rejects` is the path the error message points to.
    """

    def __init__(
        self,
        stage: str,
        policy: BadRowPolicy,
        rejects: str,
        total: int | None = None,
        *,
        what: str = "rows are bad",
        key: str = "bad_rows.max_bad_fraction",
    ):
        self.stage, self.policy, self.rejects, self.total = stage, policy, rejects, total
        self.what, self.key = what, key  # for the message: what is counted, the limit's key
        self.count = 0
        self.reasons: Counter[str] = Counter()

    def add(self, err: BadRow) -> None:
        if self.policy.on_bad_row == "error":
            raise err
        self.count += 1
        self.reasons[reason_key(err.reason)] += 1
        if self.total and self.count > self.policy.max_bad_fraction * self.total:
            self._fail(self.total, self.count, self.reasons, "of the input's")

    def check(self, rows: int, bad: int, reasons: Mapping[str, int]) -> None:
        if rows and bad > self.policy.max_bad_fraction * rows:
            self._fail(rows, bad, reasons, "of")

    def _fail(self, rows: int, bad: int, reasons: Mapping[str, int], of: str) -> None:
        top = ", ".join(f"{r} ({n})" for r, n in Counter(reasons).most_common(3))
        raise TooManyBadRows(
            f"{self.stage}: {bad} {of} {rows} {self.what} ({bad / rows:.1%} > "
            f"{self.key}={self.policy.max_bad_fraction:g}); top reasons: {top}; "
            f"each one with its reason: {self.rejects}"
        )


class EmptyInput(ValueError):
    """An input that has no rows at all: a wrong path, glob or field, never a result."""


def require_rows(rows: int, what: str) -> None:
    """`EmptyInput` when a stage read 0 rows from `what` (its input, named by file or key):
    a stage that "completes" on nothing would pass the empty result on to the next one."""
    if rows == 0:
        raise EmptyInput(
            f"{what} has no rows: check the path (or glob) and that the file is not empty; "
            f"a stage never completes on an empty input"
        )


class DuplicateIds:
    """The first (file, line) of each id; a later row with an id already seen is a `BadRow`
    "duplicate_id" naming both places (the first is kept: it is what resume and joins use)."""

    def __init__(self, field: str):
        self.field = field
        self._first: dict[str, tuple[str, int]] = {}

    def check(self, row_id: str, path: str | Path, line: int) -> None:
        first = self._first.setdefault(str(row_id), (str(path), line))
        if first != (str(path), line):
            raise BadRow(
                path,
                line,
                f"duplicate_id: {self.field}={row_id!r} was already read at "
                f"{first[0]}:{first[1]} (that row is kept)",
            )


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
    # bytes, decoded line by line: a non-UTF-8 line is one bad row, not a crash mid-file
    with storage.open_read(path, "rb") as f:  # FileNotFoundError naming the file
        for n, raw in enumerate(f, start=1):
            if n < start_line or not raw.strip():
                continue
            try:
                row = json.loads(decode_line(raw, path, n))
                if not isinstance(row, dict):
                    raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            except ValueError as e:
                err = e if isinstance(e, BadRow) else BadRow(path, n, f"malformed JSON: {e}")
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
