"""Training metrics: one JSON line per step, TensorBoard event files, a progress line, MFU.

Consumes per-step numbers from the training loop; produces `<stage_dir>/metrics.jsonl`
(always; one object per step with `step`, `loss`, `grad_norm`, `lr`, `tokens_per_s`, `mfu`,
`padding`, `tokens/<source>`, counters, and `eval_loss` lines), `<stage_dir>/tensorboard/`
event files written by tensorboardX (no TensorFlow; skipped with a log line when it is not
installed or `train.tensorboard=false`), and a progress line on stderr with an ETA. Only
process 0 writes. Both grow by appends, which Cloud Storage does not have: when the stage
folder is gs:// they are written to its local mirror (`storage.local_dir`) and uploaded
(each file atomically) by `close()`, which the stage calls when it finishes, stops on
SIGTERM or fails; a run killed outright keeps them in the mirror only.

A resumed run repeats the steps after its checkpoint, so `Metrics(..., resume_step=s)` first
cuts `metrics.jsonl` back to the rows of steps <= s (rewritten atomically: a new file renamed
over the old; a torn last line of a killed writer is dropped too) and tells TensorBoard to
hide the events after step s (`purge_step`): every step appears once, with the values of the
run that continued.

MFU = model FLOPs per second / (devices x peak bf16 FLOP/s). Model FLOPs of a step are
3x the forward (forward + backward, rematerialisation not counted, as is usual): 2 FLOPs per
matmul parameter per token, plus causal attention, 4 * layers * heads * head_dim FLOPs per
(query, key) pair, counted per document (packed documents do not attend to each other).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from dasd_jax import storage

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device (vendor figures), by substrings of `device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "B200": 2250e12,
    "v6": 918e12,
    "v5p": 459e12,
    "v5 lite": 197e12,
    "v5e": 197e12,
    "v4": 275e12,
}


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_kind.lower():
            return value
    return None  # e.g. CPU: MFU is not reported


def matmul_params(cfg) -> int:
    """Parameters used in matmuls per token (embedding lookups excluded, unembedding in)."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    return L * (D * N * H * 2 + D * K * H * 2 + 3 * D * F) + D * V


def step_flops(cfg, tokens: int, doc_lengths: np.ndarray) -> float:
    """Training FLOPs of one step over `tokens` real tokens in documents of these lengths."""
    pairs = float(np.sum(doc_lengths * (doc_lengths + 1) / 2))  # causal (query, key) pairs
    attn = 4.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * pairs
    return 3.0 * (2.0 * matmul_params(cfg) * tokens + attn)


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Metrics:
    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        total_steps: int,
        *,
        enabled: bool,
        tensorboard: bool,
        log_every: int = 1,
        stream=None,
        resume_step: int | None = None,
    ):
        self.name, self.total, self.enabled, self.log_every = name, total_steps, enabled, log_every
        self.remote = os.fspath(out_dir) if storage.is_remote(out_dir) else None
        out_dir = storage.local_dir(out_dir)  # appended files stay local
        self.local_dir = out_dir
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.remote is not None and enabled and not self.path.exists():
            # a resumed run on a new machine continues the uploaded log
            published = storage.join(self.remote, "metrics.jsonl")
            if storage.exists(published):
                storage.copy(published, self.path)
        if enabled and resume_step is not None:
            self.cut_to(resume_step)
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.writer = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge)
            except ImportError:
                log.info("tensorboardX is not installed: metrics go to %s only", self.path)

    def cut_to(self, step: int) -> int:
        """Keep the rows of `metrics.jsonl` with step <= `step` (the checkpoint a resumed run
        starts from); unreadable lines (a torn last line) go too. Returns the lines dropped."""
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
                keep = isinstance(row, dict) and int(row["step"]) <= step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill
            if keep:
                kept.append(line + b"\n")
            else:
                dropped += 1
        if dropped:
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            with tmp.open("wb") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            log.info("%s: dropped %d lines after step %d (resumed there)", self.path, dropped, step)
        return dropped

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, int | float) and v is not None:
                    self.writer.add_scalar(k, v, row["step"])

    def progress(self, step: int, row: dict) -> None:
        if self.first_step is None:
            self.first_step, self.t0 = step, time.perf_counter()
            eta = None
        else:
            per_step = (time.perf_counter() - self.t0) / max(step - self.first_step, 1)
            eta = per_step * (self.total - step)
        if not self.enabled or (step % self.log_every and step != self.total):
            return
        mfu = row.get("mfu")
        tok = row.get("tokens_per_s") or 0.0
        print(
            f"[{self.name}] step {step}/{self.total}  loss {row['loss']:.4f}  "
            f"lr {row['lr']:.3g}  gnorm {row['grad_norm']:.3g}  {tok / 1e3:.1f}K tok/s"
            + (f"  MFU {100 * mfu:.1f}%" if mfu is not None else "")
            + f"  pad {100 * row['padding']:.0f}%  ETA {_eta(eta)}",
            file=self.stream,
            flush=True,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.remote is not None and self.enabled:  # publish the local mirror's logs
            if self.path.exists():
                storage.copy(self.path, storage.join(self.remote, "metrics.jsonl"))
            board = Path(self.local_dir) / "tensorboard"
            if board.is_dir():
                storage.upload_dir(board, storage.join(self.remote, "tensorboard"))
