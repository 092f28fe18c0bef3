"""SFT stages 1-3 of DASD: data pipeline, optimizer, train step, checkpoints, metrics.

Read in this order: `config` (what a stage is told), `data` (SFTRecords -> packed rows),
`optim` (AdamW + schedule), `step` (the pure jitted loss and update), `checkpoint` (Orbax),
`metrics`, `stage` (`run(cfg, stage)`: the loop that ties them together). `stage1`, `stage2`,
`stage3` are the launcher's entry points. Nothing is imported here, so that `dasd_jax.config`
can import `train.config` without pulling in the rest.
"""
