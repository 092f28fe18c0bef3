"""`python -m dasd_jax.launch --stage=2`: SFT stage 2 (scale up): from stage 1's final
weights, with a fresh optimizer and schedule, on high-temperature data (optional low-T replay).

Consumes and produces what `dasd_jax.train.stage` documents, under `<run_dir>/stage2/`.
"""

from __future__ import annotations

from dasd_jax.config import Config
from dasd_jax.train.stage import run as run_stage


def run(cfg: Config) -> dict:
    return run_stage(cfg, 2)
