"""`python -m dasd_jax.launch --stage=1`: SFT stage 1 (cold start): the student, from its
Hugging Face folder, on the selected low-temperature teacher data.

Consumes and produces what `dasd_jax.train.stage` documents, under `<run_dir>/stage1/`.
"""

from __future__ import annotations

from dasd_jax.config import Config
from dasd_jax.train.stage import run as run_stage


def run(cfg: Config) -> dict:
    return run_stage(cfg, 1)
