"""Fault injection for the resume tests: die as `kill -9` would, at a counted durable write.

Every durable write of the pipeline (a file published by `storage.atomic_path`, a line
appended to a sample or mixed-policy journal, a training checkpoint handed to Orbax) calls
`tick(point)`. With the environment variable `DASD_JAX_KILL_AFTER` set, one tick of the
process sends SIGKILL to the process itself: no `finally`, no atexit, no flush, as a preempted
VM or an OOM kill ends it. Unset (always, outside tests) `tick` returns at once.

- `DASD_JAX_KILL_AFTER=N`: the N-th tick of the process;
- `DASD_JAX_KILL_AFTER=N@STEP`: the N-th tick while pipeline step STEP runs (the manifest's
  step names: sample, score, select, select_high_t, 1, 2, mixed_policy, 3, evaluate, export;
  `pipeline.run_step` sets `faults.step`).

`DASD_JAX_FAULT_TRACE=FILE` appends `STEP POINT` for every tick (with or without a kill), so
a test can count a step's durable writes and aim its kill at the middle of the step.
"""

from __future__ import annotations

import os
import signal

ENV = "DASD_JAX_KILL_AFTER"
TRACE_ENV = "DASD_JAX_FAULT_TRACE"
POINTS = ("publish", "journal", "checkpoint")

step = "-"  # the running pipeline step (set by pipeline.run_step)
_count = 0


def tick(point: str) -> None:
    """One durable write at `point` is complete; die here if this is the configured one."""
    global _count
    trace, spec = os.environ.get(TRACE_ENV), os.environ.get(ENV)
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{step} {point}\n")
    if not spec:
        return
    n, _, only = spec.partition("@")
    if only and only != step:
        return
    _count += 1
    if _count == int(n):
        os.kill(os.getpid(), signal.SIGKILL)
