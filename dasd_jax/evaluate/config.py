"""`EvaluateConfig`: the `evaluate.*` section of the typed config (docs/evaluate.md).

Consumes nothing; produces the frozen dataclass that `dasd_jax.config.Config.evaluate` holds.
The model options (dtype, attention) are `student.*`, the engine sizes and chat format
`sample.*` (`slots`, `max_prefill_length`, `system_prompt`, `prompt_format`, `stop`), the seed
the top-level `seed`. Each value is checked here so that a bad one fails when the config loads,
naming its key, before any model is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BUILTIN_SCORERS = ("math", "choice")
CHECKPOINT_NAMES = ("base", "stage1", "stage2", "stage3")


@dataclass(frozen=True)
class EvaluateConfig:
    """The `evaluate` stage: k samples per benchmark problem per checkpoint, avg@k, pass@k."""

    output: str = ""  # "" = <run_dir>/evaluate
    benchmarks: tuple[str, ...] = ()  # local JSONL files; empty (or "") = the embedded demo
    problem_field: str = "problem"
    answer_field: str = "answer"
    id_field: str = "id"  # rows without one are named by their line number
    prompt_template: str = "{problem}"  # the user message; "{problem}" is replaced (no format)
    # math | choice | "package.module:function": imports and runs that code (docs/evaluate.md)
    scorer: str = "math"
    # base | stage1 | stage2 | stage3 | a Hugging Face folder | label=folder;
    # empty = every one of base, stage1, stage2, stage3 that exists
    checkpoints: tuple[str, ...] = ()
    k: int = 64  # samples per problem (the paper: 64, avg@64)
    temperature: float = 1.0  # the paper: 1.0
    top_p: float = 1.0  # the paper: 1.0
    top_k: int = 0  # 0 = off (the paper uses none)
    max_tokens: int = 32768  # generated tokens per sample (the paper: 102,400 AIME, 81,920)
    slots: int = 0  # concurrent decodes; 0 = sample.slots
    pass_k: tuple[int, ...] = (1, 8, 64)  # unbiased pass@k reported for each (each <= k)
    limit: int = 0  # first N problems of each benchmark; 0 = all
    verify_timeout_s: float = 10.0  # per sample, for the scorer (+ 2 s, then killed: timeout)
    score_workers: int = 2  # scorer processes (survive math-verify hangs); 0 = in this process
    problems_per_shard: int = 8  # problems per resumable part file
    response_tail_chars: int = 2000  # characters of each response kept; -1 = all, 0 = none

    def __post_init__(self) -> None:
        for name in ("k", "max_tokens", "problems_per_shard"):
            if getattr(self, name) < 1:
                raise ValueError(f"evaluate.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("top_k", "slots", "limit", "score_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"evaluate.{name} must be >= 0, got {getattr(self, name)}")
        if self.response_tail_chars < -1:
            raise ValueError(
                f"evaluate.response_tail_chars must be >= -1 (-1 = all), "
                f"got {self.response_tail_chars}"
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(
                f"evaluate.temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"evaluate.top_p must be in (0, 1], got {self.top_p}")
        if not (self.verify_timeout_s > 0):
            raise ValueError(f"evaluate.verify_timeout_s must be > 0, got {self.verify_timeout_s}")
        if not self.pass_k:
            raise ValueError("evaluate.pass_k is empty (e.g. [1, 8, 64])")
        bad = [p for p in self.pass_k if not 1 <= p <= self.k]
        if bad:
            raise ValueError(
                f"evaluate.pass_k={list(self.pass_k)}: each must be in [1, evaluate.k={self.k}]"
                f" ({bad[0]} is not); set evaluate.pass_k with evaluate.k"
            )
        if len(set(self.pass_k)) != len(self.pass_k):
            raise ValueError(f"evaluate.pass_k has duplicates: {list(self.pass_k)}")
        for name in ("problem_field", "answer_field", "id_field"):
            if not getattr(self, name):
                raise ValueError(f"evaluate.{name} must not be empty")
        if "{problem}" not in self.prompt_template:
            raise ValueError(
                f"evaluate.prompt_template must contain {{problem}}, got {self.prompt_template!r}"
            )
        check_scorer_spec(self.scorer)
        if any(not c.strip() for c in self.checkpoints):
            raise ValueError("evaluate.checkpoints: entries must be non-empty")
        if len(set(self.checkpoints)) != len(self.checkpoints):
            raise ValueError(f"evaluate.checkpoints has duplicates: {list(self.checkpoints)}")
        if len(set(self.benchmarks)) != len(self.benchmarks):
            raise ValueError(f"evaluate.benchmarks has duplicates: {list(self.benchmarks)}")


def check_scorer_spec(spec: str) -> None:
    """A built-in name or "package.module:function" (resolved when the stage runs)."""
    if spec in BUILTIN_SCORERS:
        return
    module, sep, func = spec.partition(":")
    if not sep or not module.strip() or not func.strip() or ":" in func:
        raise ValueError(
            f"evaluate.scorer must be one of {BUILTIN_SCORERS} or 'package.module:function', "
            f"got {spec!r}"
        )
