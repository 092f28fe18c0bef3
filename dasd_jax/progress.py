"""Progress lines (rows/s, tokens/s, ETA) and plottable metrics (JSONL) for long jobs.

Consumes counts as work finishes; produces a line on stderr at most every `every_s` seconds
and, when given a path, one JSON object per report appended to a metrics file (fields: time,
rows, tokens, rows_per_s, tokens_per_s, eta_s, plus whatever the caller adds).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    def __init__(
        self,
        name: str,
        total_rows: int | None,
        metrics_path: str | Path | None = None,
        every_s: float = 5.0,
        enabled: bool = True,
        stream=None,
    ):
        self.name, self.total = name, total_rows
        self.rows = self.tokens = 0
        self.t0 = time.perf_counter()
        self.last = -1e9
        self.every_s = every_s
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.metrics_path = Path(metrics_path) if metrics_path else None

    def update(self, rows: int, tokens: int = 0, force: bool = False, **extra) -> None:
        self.rows += rows
        self.tokens += tokens
        now = time.perf_counter()
        if force or now - self.last >= self.every_s:
            self.last = now
            self.report(**extra)

    def stats(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        rps, tps = self.rows / dt, self.tokens / dt
        eta = (self.total - self.rows) / rps if self.total and rps > 0 else None
        return {
            "time": round(dt, 3),
            "rows": self.rows,
            "tokens": self.tokens,
            "rows_per_s": round(rps, 3),
            "tokens_per_s": round(tps, 1),
            "eta_s": None if eta is None else round(eta, 1),
        }

    def report(self, **extra) -> None:
        s = {**self.stats(), **extra}
        if self.metrics_path is not None:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(s) + "\n")
        if self.enabled:
            total = f"/{self.total}" if self.total else ""
            more = "".join(f" {k}={v}" for k, v in extra.items())
            print(
                f"[{self.name}] {s['rows']}{total} rows  {s['rows_per_s']:.2f} rows/s  "
                f"{s['tokens_per_s']:.0f} tok/s  ETA {_fmt_eta(s['eta_s'])}{more}",
                file=self.stream,
                flush=True,
            )
