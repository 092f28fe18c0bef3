"""Resuming a stage's shards safely: journals a kill may have torn, and the settings shards
were made with.

- `read_journal(path)`: the entries of a journal of JSON lines appended with fsync (the sample
  and mixed-policy stages'): a torn last line is dropped, an earlier bad one is
  `CorruptJournal` naming file and line.
- `check_settings(folder, settings, device, existing)`: `<folder>.shards.json` records what a
  stage's shards depend on; a resume under other settings is `SettingsChanged`, naming the
  keys (`diff_keys`, the manifest's rule too).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import jax

from dasd_jax import storage
from dasd_jax.records import atomic_write, write_json

log = logging.getLogger(__name__)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the leaves where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = []
        for k in sorted(set(a) | set(b)):
            keys += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return keys
    return [] if a == b else [prefix.rstrip(".")]


class CorruptJournal(RuntimeError):
    """A journal line before the last does not parse: damage that no kill can cause."""


def read_journal(path: Path) -> list[dict]:
    """The entries of a journal of JSON lines appended with fsync (this stage's and the
    mixed-policy stage's). Only the last line can be torn by a kill mid-append: without its
    newline, cut inside a UTF-8 character, or not a JSON object, it is dropped and the journal
    rewritten without it (atomically), so later appends stay parseable. Any earlier line
    that does not parse is `CorruptJournal`, naming the file and line."""
    if not path.exists():
        return []
    *lines, tail = path.read_bytes().split(b"\n")  # tail: b"" after a final newline
    torn = bool(tail)
    entries = []
    for n, raw in enumerate(lines, 1):
        try:
            entry = json.loads(raw.decode("utf-8"))
            if not isinstance(entry, dict):
                raise ValueError(f"a JSON {type(entry).__name__}, not an object")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if n == len(lines) and not torn:  # the last line, torn before its newline's fsync
                lines.pop()
                torn = True
                break
            raise CorruptJournal(
                f"{path}:{n}: not a journal entry ({e}); only the last line can be torn by "
                "a kill, so this journal is damaged: move it aside to redo the work it records"
            ) from None
        entries.append(entry)
    if torn:
        with atomic_write(path, "wb") as f:
            f.write(b"".join(raw + b"\n" for raw in lines))
    return entries


class SettingsChanged(RuntimeError):
    """An output folder holds shards made under other settings than this run's."""


def device_of() -> dict:
    """The chips a run computes on (numbers differ in the last bits between kinds)."""
    d = jax.local_devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count()}


def check_settings(
    folder: str | Path, settings: dict, device: dict | None, existing: list[str]
) -> None:
    """Refuse to add shards to `folder` (the sample or score stage's) that another run made
    under other `settings` (what a shard's bytes depend on), recorded in `<folder>.shards.json`
    before the first shard. Beside the folder, not in it: moving the folder aside (`--force`)
    leaves no shard, and a folder without shards takes the new settings. `existing`: the
    shards (or journals) the folder holds; some without a record (an older version's) are
    refused too. Other chips (`device_of`) are only logged: a shard's numbers are bit-exact on
    the same chips, and a resume on others (after a preemption) should not lose its work."""
    path = f"{os.fspath(folder).rstrip('/')}.shards.json"
    record = {"settings": settings, "device": device}
    old = json.loads(storage.read_text(path)) if storage.exists(path) else None
    if not existing:
        if old != record and jax.process_index() == 0:
            write_json(path, record)
        return
    redo = (
        f"re-run with --force (moves {folder} aside and redoes the step), move it aside "
        "yourself, or use another run_dir"
    )
    if old is None:
        raise SettingsChanged(
            f"{folder} holds shards ({existing[0]}, ...) but there is no {path} recording the "
            f"settings they were made with (an older dasd_jax): {redo}"
        )
    changed = diff_keys(old["settings"], settings)
    if changed:
        raise SettingsChanged(
            f"{folder} holds shards made with other settings ({', '.join(changed[:8])} "
            f"differ from {path}): resuming would mix them with new ones. Restore those "
            f"settings to resume, or start over: {redo}"
        )
    if old.get("device") != device:
        log.warning(
            "%s: its shards were made on %s, this run computes on %s: new shards may differ "
            "from an uninterrupted run in the last bits",
            folder,
            old.get("device"),
            device,
        )
