"""Fault injection for the resume tests: die as `kill -9` would, at a counted durable write.

Every durable write of the pipeline (a file published by `storage.atomic_path`, a line
appended to a sample or mixed-policy journal, a training checkpoint handed to Orbax) calls
`tick(point)`. With the environment variable `DASD_JAX_KILL_AFTER=N` set, the N-th tick of the
process sends SIGKILL to the process itself: no `finally`, no atexit, no flush, as a preempted
VM or an OOM kill would end it. Unset (always, outside tests) `tick` is a counter increment.

`DASD_JAX_KILL_AFTER=N:POINT` counts only the ticks of one point ("publish", "journal",
"checkpoint"). `DASD_JAX_KILL_LOG=FILE` appends the point and count of the fatal tick to FILE
before dying, so a test can say where each kill landed.
"""

from __future__ import annotations

import os
import signal

ENV = "DASD_JAX_KILL_AFTER"
LOG_ENV = "DASD_JAX_KILL_LOG"
POINTS = ("publish", "journal", "checkpoint")

_count = 0


def tick(point: str) -> None:
    """One durable write at `point` is complete; die here if this is the configured one."""
    global _count
    spec = os.environ.get(ENV)
    if not spec:
        return
    n, _, only = spec.partition(":")
    if only and only != point:
        return
    _count += 1
    if _count == int(n):
        if log := os.environ.get(LOG_ENV):
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{point} {_count} {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def count() -> int:
    """Ticks seen so far by this process (with `DASD_JAX_KILL_AFTER` set)."""
    return _count
