"""The records that flow between stages, and the file formats they live in.

Two record types (documented in docs/records.md):

- `Candidate` (sample -> score -> select, and mixed_policy): one teacher response to one
  prompt, with what each model said about its tokens. Stored as JSONL (one object per line),
  written in atomic shards (`records.atomic_write`), because it is produced and consumed in
  streaming order, appended by many hosts, and read by people.
- `SFTRecord` (select / mixed_policy -> train): one training example. Stored as ArrayRecord
  files whose records are UTF-8 JSON of the dataclass, because training needs random access
  (global shuffles, exact resume by index, per-host slicing) and Grain reads ArrayRecord
  directly (`grain.sources.ArrayRecordDataSource`) without another dependency; Parquet would
  need pyarrow and a custom source for the same access pattern.

Token-level fields are lists of equal length (`token_ids`, `logprobs`, `offsets`); offsets
are [start, end) character spans relative to `response` (the byte rule of
`tokenizer.encode_with_offsets`: a token's span covers every character any of its bytes
belongs to, so a character split across byte-level tokens lies in each of their spans).
Spans are monotone (starts and ends non-decreasing) and overlap only at such split
characters. The student's cover the response exactly; a teacher's written in another format
(gpt-oss harmony, mapped to `<think>` text by `ingest`) give its channel-marker tokens empty
spans and leave the characters it never produced as tokens (`<think>`, `</think>`) uncovered.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TokenScores:
    """One model's view of a response: its tokens, their log-probs, their char spans.

    `logprobs[i]` = log p(token_ids[i] | prompt, token_ids[:i]) at temperature 1 (the model's
    own distribution: what DAS compares). `sampling_logprobs`, when the model also sampled the
    response, is under the distribution actually sampled from (temperature, top-p/k).
    """

    model: str  # name or folder of the model
    tokenizer: str  # name or folder of its tokenizer (vocabularies differ between models)
    token_ids: list[int]
    logprobs: list[float]
    offsets: list[tuple[int, int]] | None = None  # None: recomputed from the tokenizer
    sampling_logprobs: list[float] | None = None
    # tokens of the rendered prompt before the response (score stage; the length filter)
    n_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        for name in ("logprobs", "offsets", "sampling_logprobs"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ValueError(f"{name} has {len(v)} entries, token_ids has {n}")


@dataclass
class Candidate:
    """One response to one prompt, between the sample, score and select stages."""

    prompt_id: str  # stable id of the prompt (source uuid, or a hash of the prompt text)
    candidate: int  # index among this prompt's candidates
    prompt: str  # the user message, no chat template
    response: str  # "<think>...</think>answer" (gpt-oss harmony channels mapped)
    temperature: float | None = None
    finish_reason: str | None = None  # "stop" | "length" | None (unknown)
    domain: str | None = None
    reference_answer: str | None = None
    teacher: TokenScores | None = None  # absent: the score stage computes it
    student: TokenScores | None = None  # added by the score stage
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Candidate:
        d = dict(d)
        for side in ("teacher", "student"):
            if d.get(side) is not None:
                s = dict(d[side])
                if s.get("offsets") is not None:
                    s["offsets"] = [tuple(o) for o in s["offsets"]]
                d[side] = TokenScores(**s)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown candidate fields {unknown}")
        return cls(**d)


@dataclass
class SFTRecord:
    """One training example, between select / mixed_policy and the training stages.

    The training pipeline renders `prompt` + `response` with the student's chat template and
    system prompt; the loss covers the response. For mixed-policy samples the first
    `student_prefix_chars` characters of `response` were written by the student and the rest
    by the teacher (stage 3 trains on the whole response by default, the paper's better
    variant; an option masks the prefix).
    """

    id: str
    prompt: str
    response: str
    source: str = ""  # e.g. "low_t", "high_t", "mixed_policy": the mixing key
    domain: str | None = None
    temperature: float | None = None
    student_prefix_chars: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False).encode("utf-8")

    @classmethod
    def from_bytes(cls, b: bytes) -> SFTRecord:
        return cls(**json.loads(b.decode("utf-8")))


def write_sft_records(path: str | Path, records: Iterable[SFTRecord]) -> int:
    """Write an ArrayRecord file atomically, locally or to gs:// (`storage.atomic_path`: a
    local temporary file, renamed or uploaded when complete); returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from dasd_jax import storage

    n = 0
    with storage.atomic_path(path) as tmp:
        writer = ArrayRecordWriter(tmp, "group_size:1")
        try:
            for r in records:
                writer.write(r.to_bytes())
                n += 1
        finally:
            writer.close()
    return n


def read_sft_records(path: str | Path) -> Iterator[SFTRecord]:
    """Read every record of an ArrayRecord file, in order (local, or gs:// through
    array_record's own Cloud Storage reader)."""
    import os

    from array_record.python.array_record_module import ArrayRecordReader

    from dasd_jax import storage

    if not storage.exists(path):
        raise FileNotFoundError(f"SFT record file {os.fspath(path)} does not exist")
    reader = ArrayRecordReader(os.fspath(path))
    try:
        for i in range(reader.num_records()):
            yield SFTRecord.from_bytes(reader.read([i])[0])
    finally:
        reader.close()
