"""One writer per run directory: `<run_dir>/.lock`.

Two launchers on one run directory would both do every step's work and race on the
manifest's read-modify-write (one can drop the other's entry). `hold(run_dir)` makes the second
one stop at once with `RunLocked`, naming the holder (pid, host, start time, command line).

- Local run directories (and NFS with working locks): an exclusive `flock` on `.lock`, held
  by an open file for as long as the process runs. The kernel releases it when the process
  dies, however it dies (kill -9 included), so a lock is never stale: the next run takes it
  and logs whose lock it took over. The file stays (a dotfile: no fingerprint reads it); its
  content names the last holder.
- gs:// run directories: object stores have no locks. `.lock` is an object naming the holder,
  rewritten every `HEARTBEAT_S` by a daemon thread; a run refuses while the object's heartbeat
  is fresher than `STALE_S`, and takes over an older one (the holder was preempted or killed).
  This catches the common mistake (a second launcher, a queued-resource retry while the old VM
  still runs) but it is not atomic: two launchers starting within the same second can both
  pass. The rule on gs:// is therefore documented, not enforced: one launcher per run
  directory (all hosts of one multi-host job are one launcher: process 0 holds the lock).

The lock is re-entrant within a process (`--stage=all` holds it while each step's
`run_step` takes it again).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from dasd_jax import storage

log = logging.getLogger(__name__)

LOCK = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


def _holder() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv,
        "token": uuid.uuid4().hex,
    }


def _describe(info: dict[str, Any]) -> str:
    argv = " ".join(str(a) for a in info.get("argv") or [])
    return f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}" + (
        f" ({argv})" if argv else ""
    )


def _parse(text: str) -> dict[str, Any]:
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


class _LocalLock:
    def __init__(self, run_dir: str):
        import fcntl

        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, LOCK)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
            os.close(fd)
            raise RunLocked(
                f"run_dir {run_dir} is in use by {_describe(held) if held else 'another process'}"
                f": two runs in one run directory would both do every step's work and overwrite "
                f"each other's manifest entries. Wait for it to finish, stop it, or use another "
                f"run_dir"
            ) from None
        previous = _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
        if previous.get("pid") is not None:
            log.info("run lock %s: the last holder (%s) is gone", self.path, _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        import fcntl

        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


class _RemoteLock:
    def __init__(self, run_dir: str, stale_s: float, heartbeat_s: float):
        self.path = storage.join(run_dir, LOCK)
        if storage.exists(self.path):
            held = _parse(storage.read_text(self.path))
            age = time.time() - float(held.get("heartbeat", 0.0))
            if held and age < stale_s:
                raise RunLocked(
                    f"run_dir {run_dir} is in use by {_describe(held)} (last heartbeat "
                    f"{age:.0f} s ago; a lock is stale after {stale_s:.0f} s): wait for it to "
                    f"finish, stop it, or use another run_dir. If that process is certainly "
                    f"gone, delete {self.path}"
                )
            log.warning(
                "run lock %s: taking over from %s (no heartbeat for %.0f s)",
                self.path,
                _describe(held),
                age,
            )
        self.info = _holder()
        self._write()
        time.sleep(0.5)  # another launcher that passed the check at the same time: last wins
        if _parse(storage.read_text(self.path)).get("token") != self.info["token"]:
            held = _parse(storage.read_text(self.path))
            raise RunLocked(f"run_dir {run_dir} was taken at the same moment by {_describe(held)}")
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, args=(heartbeat_s,), name="run-lock-heartbeat", daemon=True
        )
        self._thread.start()

    def _write(self) -> None:
        with storage.atomic_write(self.path) as f:
            json.dump({**self.info, "heartbeat": time.time()}, f)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self._write()
            except Exception as e:  # noqa: BLE001 - a missed heartbeat is retried
                log.warning("run lock %s: heartbeat failed: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            if _parse(storage.read_text(self.path)).get("token") == self.info["token"]:
                storage.unlink(self.path)


_held: dict[str, list] = {}  # run_dir -> [lock, depth]
_guard = threading.Lock()


def _key(run_dir: str | os.PathLike) -> str:
    run_dir = os.fspath(run_dir)
    return run_dir.rstrip("/") if storage.is_remote(run_dir) else os.path.realpath(run_dir)


@contextlib.contextmanager
def hold(
    run_dir: str | os.PathLike, *, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S
) -> Iterator[None]:
    """Hold the run directory's lock for the block (re-entrant in this process)."""
    key = _key(run_dir)
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            lock = (
                _RemoteLock(key, stale_s, heartbeat_s)
                if storage.is_remote(key)
                else _LocalLock(key)
            )
            _held[key] = [lock, 1]
    try:
        yield
    finally:
        with _guard:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                entry[0].release()
