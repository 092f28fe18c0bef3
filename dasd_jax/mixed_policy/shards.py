"""Journaled shards of the mixed-policy stage: a killed run loses no finished question.

Consumes a shard's questions (from the plan) and the entries the stage appends as work
finishes: `{"q", "phase": "student", ...}` (the student's answer was cut: L, k, prefix token
ids, seed) and `{"q", "phase": "final", "record"+"sample" | "reject"}` (the outcome).
Produces, under the stage's output folder:
- `shards/shard-NNNNN.journal`: those entries, appended with fsync (a torn last line, from a
  kill mid-append, is dropped on reading; a bad line before it is an error naming it);
- when every question of the shard has an outcome (`finalize`): `train-NNNNN.array_record`
  (kept rows, if any), `shards/samples-NNNNN.jsonl`, `shards/rejects-NNNNN.jsonl`, and last
  `shards/done-NNNNN.json` (the shard's stats; its presence marks the shard done); then the
  journal is removed. Every file is written under a temporary name and renamed.

The output folder may be gs:// (`dasd_jax.storage`): the journal, which is appended to, is
then kept in the folder's local mirror (`storage.local_dir`: `shards/` there) and the shard's
files are published to the bucket atomically, `done-NNNNN.json` last. A run resumed on
another machine has no journal: it redoes the shards that were not done.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from dasd_jax import faults, storage
from dasd_jax.records import write_json, write_jsonl
from dasd_jax.resume import read_journal
from dasd_jax.schema import SFTRecord, write_sft_records


@dataclass
class Shard:
    """One shard of questions: its journal, and its files once every question is decided."""

    index: int
    folder: str | os.PathLike  # the stage's output folder, local or gs://
    questions: list[dict]
    student: dict[int, dict] = field(default_factory=dict)  # q -> phase-1 entry
    final: dict[int, dict] = field(default_factory=dict)  # q -> outcome
    resumed: int = 0
    stats: dict | None = None  # set when the shard's files are written
    local: str | os.PathLike | None = None  # where the journal is appended (None: folder)

    @property
    def journal(self) -> Path:
        local = self.folder if self.local is None else self.local
        return Path(local) / "shards" / f"shard-{self.index:05d}.journal"

    @property
    def done(self) -> str:
        return storage.join(self.folder, "shards", f"done-{self.index:05d}.json")

    def read_journal(self) -> None:
        """Entries of a previous run (`resume.read_journal`: a torn last line, killed
        mid-append, is dropped; a bad line before it is an error naming it)."""
        for e in read_journal(self.journal):
            (self.final if e["phase"] == "final" else self.student)[e["q"]] = e
        self.resumed = len(self.final)

    def append(self, entry: dict) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        faults.tick("journal")
        (self.final if entry["phase"] == "final" else self.student)[entry["q"]] = entry
        if self.complete:
            self.finalize()

    @property
    def complete(self) -> bool:
        return len(self.final) == len(self.questions)

    def finalize(self) -> dict:
        """Train file, samples and rejects, then done-NNNNN.json last; the journal goes."""
        entries = [self.final[x["q"]] for x in self.questions]
        kept = [e for e in entries if "record" in e]
        name = f"train-{self.index:05d}.array_record"
        if kept:
            records = (SFTRecord(**e["record"]) for e in kept)
            write_sft_records(storage.join(self.folder, name), records)
        write_jsonl(
            storage.join(self.folder, "shards", f"samples-{self.index:05d}.jsonl"),
            (e["sample"] for e in kept),
        )
        write_jsonl(
            storage.join(self.folder, "shards", f"rejects-{self.index:05d}.jsonl"),
            (e["reject"] for e in entries if "reject" in e),
        )
        stats = {
            "shard": self.index,
            "questions": len(entries),
            "kept": len(kept),
            "train_file": name if kept else None,
            "rejected": dict(Counter(e["reject"]["reason"] for e in entries if "reject" in e)),
            "resumed_questions": self.resumed,
        }
        write_json(self.done, stats)
        self.journal.unlink(missing_ok=True)
        self.stats = stats
        return stats


def reject(x: dict, reason: str, **detail) -> dict:
    """The journal entry of a question that is not kept, with its reason and details."""
    return {
        "q": x["q"],
        "phase": "final",
        "reject": {"question": x["id"], "reason": reason, **detail},
    }
