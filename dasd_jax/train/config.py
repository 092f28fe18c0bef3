"""What the SFT stages are told: `TrainConfig` (shared by stages 1-3) and `StageConfig`.

Consumed by `dasd_jax.config.Config` (fields `train`, `stage1`, `stage2`, `stage3`); produces
nothing else. Defaults reproduce the paper's released LLaMA-Factory recipe at full scale
(PAPER.md): LR 5e-5, 10% warmup, cosine to a 1e-5 floor, AdamW (0.9, 0.95), eps 1e-8, weight
decay 0.1, clip 1.0, global batch 64 packed rows of 64K tokens, 6 epochs per stage, system
prompt "You are a helpful assistant.". Stage 3's single epoch is the paper's ablation setting.

Paths may contain `{run_dir}`; source paths are globs of ArrayRecord files of `SFTRecord`s.

Every number is checked when the config is built: a NaN, an inf or an out-of-range value is a
config error naming the key (`stage1: lr=1e+39: ...`), not a run that trains on NaN. The peak
LR must lie in (0, `MAX_LR`]: AdamW moves each weight by about the LR per step whatever the
gradient's scale, so an LR above 1 destroys any model of unit-scale weights in one step (the
paper's is 5e-5; LR 0 would train nothing and still write a checkpoint).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

MAX_LR = 1.0  # the largest peak learning rate accepted (AdamW)


def _check(name, value, lo, hi=math.inf, *, lo_open=False, hi_open=False, why=""):
    """ValueError unless `value` is a finite number in the interval lo..hi."""
    ok = math.isfinite(value) and (lo < value if lo_open else lo <= value)
    ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        left = "(" if lo_open else "["
        right = ")" if hi_open or hi == math.inf else "]"
        raise ValueError(
            f"{name}={value!r}: must be a finite number in {left}{lo:g}, {hi:g}{right}"
            + (f" ({why})" if why else "")
        )


@dataclass(frozen=True)
class SourceConfig:
    """One named data source of a stage: SFTRecord files and its mixing weight."""

    path: str = ""  # glob (or comma-separated globs) of .array_record files; {run_dir} expands
    weight: float = 1.0  # share of *records* drawn from this source; 0 leaves it out
    max_records: int = 0  # > 0: a seeded subset of this many records (e.g. a 20K replay)

    def __post_init__(self):
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
        if self.max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {self.max_records}")


@dataclass(frozen=True)
class StageConfig:
    """What differs between stages: data, where the weights come from, length, LR."""

    # name -> source. YAML files and command-line overrides merge into the stage's default
    # sources by name (`stage2.sources.low_t.weight=0.2` adds or changes one entry); a weight
    # of 0 leaves a source out.
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    # "" = stage 1: student.path (HF folder; "" = embedded tiny student); stages 2/3: the
    # previous stage's final checkpoint under run_dir. Otherwise an HF folder.
    init_from: str = ""
    epochs: float = 6.0  # passes over the stage's data (token volume estimated from a sample)
    max_steps: int = 0  # > 0: exactly this many optimizer steps (overrides epochs)
    lr: float = 5e-5  # peak learning rate
    lr_floor: float = 1e-5  # cosine decays to this
    warmup_frac: float = 0.1
    # stage 3: the paper trains on the whole response (student prefix included); True masks
    # the first SFTRecord.student_prefix_chars characters of the response out of the loss.
    mask_student_prefix: bool = False

    def __post_init__(self):
        if not math.isfinite(self.epochs):
            raise ValueError(f"epochs={self.epochs!r}: must be a finite number")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ValueError("set epochs > 0 or max_steps > 0")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must be in [0, 1), got {self.warmup_frac}")
        why = "AdamW moves every weight by about lr per step; the paper's peak is 5e-5"
        _check("lr", self.lr, 0.0, MAX_LR, lo_open=True, why=why)
        _check("lr_floor", self.lr_floor, 0.0, MAX_LR)
        if self.lr_floor > self.lr:
            raise ValueError(f"lr_floor {self.lr_floor} is above lr {self.lr}")


def default_stage(n: int) -> StageConfig:
    """The default section of stage n (1, 2, 3)."""
    sources = {
        1: {"low_t": SourceConfig("{run_dir}/select/*.array_record")},
        2: {"high_t": SourceConfig("{run_dir}/select_high_t/*.array_record")},
        3: {"mixed_policy": SourceConfig("{run_dir}/mixed_policy/*.array_record")},
    }[n]
    return StageConfig(sources=sources, epochs=1.0 if n == 3 else 6.0)


@dataclass(frozen=True)
class TrainConfig:
    """Shared by stages 1-3: batch geometry, packing, optimizer, checkpoints, metrics."""

    seq_len: int = 65536  # tokens per packed row
    global_batch: int = 64  # packed rows per optimizer step, all hosts together
    micro_batch: int = 0  # rows per forward pass (all hosts); 0 = global_batch (no accum)
    packing: Literal["masked", "unmasked"] = "masked"  # unmasked: documents see each other
    packing_bins: int = 0  # first-fit bins per data shard; 0 = its rows per step
    # disjoint record streams, each packed into its own rows of every step; 0 = one per host.
    # The batches depend on this number, not on the host count: a run with data_shards=S
    # gives the same batches on any number of hosts dividing S (S must divide micro_batch)
    data_shards: int = 0
    overlong: Literal["drop", "truncate"] = "drop"  # examples longer than seq_len
    # e.g. a record with no answer tokens; "" = the pipeline-wide bad_rows.on_bad_row
    on_bad_record: Literal["", "error", "skip"] = ""
    system_prompt: str = "You are a helpful assistant."
    data_threads: int = 8  # Grain read/tokenize threads per host
    length_sample: int = 256  # records per source tokenized to estimate steps from epochs
    # optimizer (AdamW; no weight decay on norms and biases)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    opt_state_dtype: Literal["float32", "bfloat16"] = "float32"
    chunk_size: int = 1024  # log-prob chunk over the sequence
    # checkpoints, eval, logs
    checkpoint_every: int = 500  # steps; also on SIGTERM and at the end
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    eval_rows: int = 0  # held-out records per source (taken before training shuffles)
    eval_every: int = 0  # steps; 0 = only at the end (when eval_rows > 0)
    log_every: int = 1  # progress line every N steps (metrics.jsonl gets every step)
    tensorboard: bool = True  # event files next to metrics.jsonl (needs tensorboardX)
    peak_tflops: float = 0.0  # per device, for MFU; 0 = look up the device kind
    export_dtype: str = "bfloat16"  # dtype of the exported Hugging Face folder

    def __post_init__(self):
        for name in (
            "seq_len",
            "global_batch",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        _check("b1", self.b1, 0.0, 1.0, hi_open=True)
        _check("b2", self.b2, 0.0, 1.0, hi_open=True)
        _check("eps", self.eps, 0.0, lo_open=True)
        _check("weight_decay", self.weight_decay, 0.0)
        _check("clip_norm", self.clip_norm, 0.0, lo_open=True)
        _check("peak_tflops", self.peak_tflops, 0.0)
        micro = self.micro_batch or self.global_batch
        if self.global_batch % micro:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of micro_batch {micro}"
            )
        if self.data_shards < 0 or (self.data_shards and micro % self.data_shards):
            raise ValueError(
                f"data_shards={self.data_shards} must be >= 0 and divide micro_batch {micro} "
                f"(each shard fills the same number of rows of every micro-batch)"
            )

    @property
    def accum_steps(self) -> int:
        return self.global_batch // (self.micro_batch or self.global_batch)
