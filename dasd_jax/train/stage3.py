"""`python -m dasd_jax.launch --stage=3`: SFT stage 3 (mixed policy): from stage 2's final
weights, on mixed-policy data (student prefix + teacher continuation) plus off-policy replay.

Consumes and produces what `dasd_jax.train.stage` documents, under `<run_dir>/stage3/`.
"""

from __future__ import annotations

from dasd_jax.config import Config
from dasd_jax.train.stage import run as run_stage


def run(cfg: Config) -> dict:
    return run_stage(cfg, 3)
