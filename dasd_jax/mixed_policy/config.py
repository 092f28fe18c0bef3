"""`MixedPolicyConfig`: the `mixed_policy.*` section of the typed config (docs/mixed_policy.md).

Consumes nothing; produces the frozen dataclass that `dasd_jax.config.Config.mixed_policy`
holds. Engine knobs shared with the sample stage (slots, prefill chunk, decode steps, cache
dtype, top-p/top-k, prompt format) are read from `sample.*`; the models' dtypes from
`student.*` / `teacher.*`; the seed is the top-level `seed`. Every value is checked here so
that a bad one fails when the config loads, naming its key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SNAP_CHOICES = ("none", "sentence")


@dataclass(frozen=True)
class MixedPolicyConfig:
    """The `mixed_policy` stage (paper step 7): student prefixes, teacher continuations.

    sources: globs of the DAS-selected SFTRecord ArrayRecords the questions come from
      (`{run_dir}` expands); a prompt in several records keeps its first one in this order.
    questions: unique prompts drawn (seeded) from them; the paper used ~50K.
    student: the student's HF folder; "" = `<run_dir>/stage2/export` (train stage 2).
    length_factor: the student's token budget = ceil(factor x the teacher response's length
      in student tokens); only answers that use it all (no EOS) are kept (paper: 1.5).
    cut_low, cut_high: the prefix keeps k of the L answer tokens, k uniform over the integers
      strictly inside (cut_low L, cut_high L) (paper: (0.5 L, L)).
    snap: "none" | "sentence" (move k to the nearest token boundary that is a sentence
      boundary inside the same interval; the paper cuts anywhere).
    min_cut_tokens: the prefix keeps at least this many tokens.
    student_temperature / teacher_temperature: sampling temperatures (the paper does not say
      the teacher's for the continuation; 1.0 as its stage-2 data).
    teacher_max_tokens: tokens the teacher may add.
    keep_truncated: keep continuations that hit teacher_max_tokens (default: reject them).
    non_think_prefix: "reject" | "as_thinking": a harmony (gpt-oss) teacher reads the prefix
      through its `<think>` form; a prefix without `<think>` is rejected (`prefix_not_think`)
      or, with as_thinking, read as analysis text (the demo's random student needs this).
    require_canonical_prefix: reject prefixes whose text the student tokenizer encodes to
      other ids than the sampled ones (default: keep, and count them).
    max_student_tokens: questions whose budget exceeds this are rejected (`cap_over_limit`).
    teacher_max_prefill_length: longest teacher prompt + prefix; 0 = the next power of two
      >= 1.25 x (longest student prompt + largest budget).
    questions_per_shard: the unit of resumable work and of one `train-NNNNN.array_record`.
    on_bad_row: "" (the pipeline-wide `bad_rows.on_bad_row`) | error | skip (an unreadable
      source record is counted and skipped, up to `bad_rows.max_bad_fraction`).
    demo: when the student or the teacher is an embedded random tiny model, cap questions,
      lengths and engine sizes and turn off the structure filter (the random models never
      write `<think>`), each logged; false leaves the config as it is.
    """

    sources: tuple[str, ...] = (
        "{run_dir}/select/*.array_record",
        "{run_dir}/select_high_t/*.array_record",
    )
    questions: int = 50000
    student: str = ""
    length_factor: float = 1.5
    cut_low: float = 0.5
    cut_high: float = 1.0
    snap: str = "none"
    min_cut_tokens: int = 1
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    teacher_max_tokens: int = 32768
    keep_truncated: bool = False
    non_think_prefix: str = "reject"
    require_canonical_prefix: bool = False
    max_student_tokens: int = 131072
    teacher_max_prefill_length: int = 0
    questions_per_shard: int = 256
    on_bad_row: str = ""
    demo: bool = True
    report: bool = True
    progress_every_s: float = 10.0
    output: str = ""  # "" = <run_dir>/mixed_policy

    def __post_init__(self) -> None:
        for name, allowed in (
            ("snap", SNAP_CHOICES),
            ("on_bad_row", ("", "error", "skip")),
            ("non_think_prefix", ("reject", "as_thinking")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"mixed_policy.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        if not self.sources or any(not s.strip() for s in self.sources):
            raise ValueError(f"mixed_policy.sources needs non-empty globs, got {self.sources}")
        for name in (
            "questions",
            "min_cut_tokens",
            "teacher_max_tokens",
            "max_student_tokens",
            "questions_per_shard",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"mixed_policy.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.length_factor) and self.length_factor > 0):
            raise ValueError(f"mixed_policy.length_factor must be > 0, got {self.length_factor}")
        if not (0.0 <= self.cut_low < self.cut_high <= 1.0):
            raise ValueError(
                "mixed_policy.cut_low and cut_high need 0 <= cut_low < cut_high <= 1, got "
                f"{self.cut_low}, {self.cut_high}"
            )
        for name in ("student_temperature", "teacher_temperature"):
            t = getattr(self, name)
            if not math.isfinite(t) or t < 0:
                raise ValueError(f"mixed_policy.{name} must be a finite number >= 0, got {t}")
        p = self.teacher_max_prefill_length
        if p and (p < 16 or p & (p - 1)):
            raise ValueError(
                "mixed_policy.teacher_max_prefill_length must be 0 (auto) or a power of two "
                f">= 16, got {p}"
            )
        if self.progress_every_s < 0:
            raise ValueError(
                f"mixed_policy.progress_every_s must be >= 0, got {self.progress_every_s}"
            )
