"""Filters on candidate responses (paper step 4), and gpt-oss harmony <-> ``<think>`` text.

Consumes ``FilterInput`` records (response text in ``<think>...</think>answer`` form, the
student's token count, an optional reference answer) and a ``FilterConfig``. Produces, per
record, the list of reasons it is rejected for (empty = kept); ``count_reasons`` tallies them
for the stage report. Each filter can be switched off, and adds at most one reason:

* ``length``: more than ``max_tokens`` student tokens -> ``too_long`` (64K in the paper).
* ``structure``: exactly one ``<think>`` (first, after optional whitespace) and one
  ``</think>``, non-empty thinking, non-empty answer after it; no tool calls; no harmony
  special tokens left over from a broken conversion. Reasons, checked in this order:
  ``tool_call``, ``harmony_markers``, ``no_think``, ``bad_think``, ``empty_think``,
  ``empty_answer``.
* ``repetition``: ``ngram_repetition`` (some word n-gram occurs >= ``ngram_repeats`` times,
  overlaps counted; a-m-team's 20-gram x 20), ``line_repetition`` (the same non-trivial line
  ``line_repeats`` times in a row, blank lines ignored), ``periodic_repetition`` (a unit of 1-10
  characters with a letter or digit repeated ``periodic_repeats`` times in a row, e.g. a
  runaway "1 1 1 1 ..." that has no word n-grams to count).
* ``answer`` (default off: the paper does not say whether answers were checked): the final
  answer after ``</think>`` (last ``\\boxed{}`` preferred, else the whole answer) must be
  equivalent to ``reference_answer`` under math-verify -> ``wrong_answer``; a check that runs
  past its time limit -> ``answer_timeout``; a crash -> ``answer_error``. Records without a
  reference answer (code, instruction following) are not checked. It runs only on records
  that passed the other filters, because it is by far the slowest.
"""

from __future__ import annotations

import math
import multiprocessing
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import numpy as np

from dasd_jax.models.harmony import harmony_to_think  # noqa: F401 (the one harmony parser)
from dasd_jax.select.sentences import THINK_CLOSE, THINK_OPEN

DEFAULT_TOOL_MARKERS = (
    "<tool_call>",
    "</tool_call>",
    "<function_call>",
    "<|python_tag|>",
    "<|call|>",
    "to=functions.",
)
HARMONY_TOKENS = (
    "<|start|>",
    "<|channel|>",
    "<|message|>",
    "<|end|>",
    "<|return|>",
    "<|constrain|>",
)


@dataclass(frozen=True)
class FilterConfig:
    """Filter switches and parameters (config keys ``filters.<field>``).

    length / max_tokens: reject more than max_tokens student tokens (the paper's 64K context).
    structure / tool_markers: the ``<think>`` layout check; any marker means a tool call.
    repetition: ngram_n-word n-gram seen ngram_repeats times (a-m-team: 20 and 20); a line of
      >= line_min_chars characters line_repeats times in a row; a short unit repeated
      periodic_repeats times in a row.
    answer: math-verify against the reference answer (off: the paper is silent on it);
      answer_timeout_s: per item (math-verify's own limits are a third of it for each parse
      and the comparison); answer_workers: worker processes.
    """

    length: bool = True
    max_tokens: int = 65536
    structure: bool = True
    tool_markers: tuple[str, ...] = DEFAULT_TOOL_MARKERS
    repetition: bool = True
    ngram_n: int = 20
    ngram_repeats: int = 20
    line_repeats: int = 10
    line_min_chars: int = 10
    periodic_repeats: int = 50
    answer: bool = False
    answer_timeout_s: float = 10.0
    answer_workers: int = 2

    def __post_init__(self) -> None:
        for name in ("max_tokens", "ngram_n", "ngram_repeats", "line_repeats", "answer_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"filters.{name} must be >= 1, got {getattr(self, name)}")
        if self.periodic_repeats < 2:
            raise ValueError(f"filters.periodic_repeats must be >= 2, got {self.periodic_repeats}")
        if self.answer_timeout_s <= 0:
            raise ValueError(f"filters.answer_timeout_s must be > 0, got {self.answer_timeout_s}")


@dataclass(frozen=True)
class FilterInput:
    """What the filters look at. n_student_tokens: tokens the student trains on (include the
    prompt if the limit is the training context); needed by the length filter.
    reference_answer: set it for math records only; None skips the answer check."""

    text: str
    n_student_tokens: int | None = None
    reference_answer: str | None = None


# ------------------------------------------------------------------- harmony <-> <think>
# `harmony_to_think` (re-exported): the one parser of generated harmony, models/harmony.py

_THINK_RE = re.compile(r"<think>\n?(?P<think>.*?)(?:\n?</think>(?:\n\n)?(?P<answer>.*))?\Z", re.S)


def think_to_harmony(text: str) -> str:
    """Inverse of ``harmony_to_think``: ``<think>\\nR\\n</think>\\n\\nA`` ->
    ``<|channel|>analysis<|message|>R<|end|><|start|>assistant<|channel|>final<|message|>A
    <|return|>`` (one newline after ``<think>``/before ``</think>`` and two after it are
    optional and dropped). Without ``</think>`` only the unterminated analysis is written."""
    m = _THINK_RE.match(text.lstrip())
    if m is None:
        raise ValueError("think_to_harmony needs text that starts with <think>")
    out = "<|channel|>analysis<|message|>" + m.group("think")
    if m.group("answer") is None:
        return out
    return (
        out
        + "<|end|><|start|>assistant<|channel|>final<|message|>"
        + m.group("answer")
        + ("<|return|>")
    )


# ----------------------------------------------------------------------------- filters


def check_length(rec: FilterInput, cfg: FilterConfig) -> str | None:
    if rec.n_student_tokens is None:
        raise ValueError("the length filter needs n_student_tokens (or set filters.length=false)")
    return "too_long" if rec.n_student_tokens > cfg.max_tokens else None


def check_structure(text: str, tool_markers: Sequence[str] = DEFAULT_TOOL_MARKERS) -> str | None:
    if any(marker in text for marker in tool_markers):
        return "tool_call"
    if any(token in text for token in HARMONY_TOKENS):
        return "harmony_markers"
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if n_open == 0 or n_close == 0:
        return "no_think"
    open_at, close_at = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    if n_open > 1 or n_close > 1 or close_at < open_at or text[:open_at].strip():
        return "bad_think"
    if not text[open_at + len(THINK_OPEN) : close_at].strip():
        return "empty_think"
    if not text[close_at + len(THINK_CLOSE) :].strip():
        return "empty_answer"
    return None


def max_ngram_count(text: str, n: int) -> int:
    """Occurrences of the most frequent word n-gram (overlapping windows; words split on
    whitespace). Vectorised polynomial hash mod 2**64 over word ids: O(n * words)."""
    words = text.split()
    if len(words) < n:
        return 0
    vocab: dict[str, int] = {}
    ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in words), np.uint64, len(words))
    # Spread word ids over 64 bits before hashing so that small ids do not collide in sums.
    mixed = (ids + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    n_windows = len(words) - n + 1
    h = np.zeros(n_windows, dtype=np.uint64)
    for j in range(n):  # uint64 arithmetic wraps: the hash is taken mod 2**64
        h = h * np.uint64(0x100000001B3) + mixed[j : j + n_windows]
    return int(np.unique(h, return_counts=True)[1].max())


def max_line_run(text: str, min_chars: int) -> int:
    """Longest run of one identical line (stripped, >= min_chars characters) in a row,
    ignoring blank lines in between."""
    best = run = 0
    prev = None
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line == prev:
            run += 1
        else:
            prev, run = line, 1
        if len(line) >= min_chars:
            best = max(best, run)
    return best


_PERIODIC_CACHE: dict[int, re.Pattern[str]] = {}


def has_periodic_run(text: str, repeats: int) -> bool:
    """A unit of 1-10 characters (not newline) containing a letter or digit, repeated at least
    ``repeats`` times in a row ("ababab...", "1 1 1 ...", "0000...")."""
    pattern = _PERIODIC_CACHE.get(repeats)
    if pattern is None:
        pattern = _PERIODIC_CACHE.setdefault(
            repeats, re.compile(rf"(.{{1,10}}?)\1{{{repeats - 1},}}")
        )
    # Dash or "=" rulers have no letter or digit: skip those runs and go on searching.
    return any(any(ch.isalnum() for ch in m.group(1)) for m in pattern.finditer(text))


def check_repetition(text: str, cfg: FilterConfig) -> str | None:
    if max_ngram_count(text, cfg.ngram_n) >= cfg.ngram_repeats:
        return "ngram_repetition"
    if max_line_run(text, cfg.line_min_chars) >= cfg.line_repeats:
        return "line_repetition"
    if has_periodic_run(text, cfg.periodic_repeats):
        return "periodic_repetition"
    return None


# ------------------------------------------------------------------------ answer check


def extract_final_answer(text: str) -> str | None:
    """The final answer after the last ``</think>``: its last ``\\boxed{...}`` (balanced
    braces) if any, else the whole stripped answer; None without ``</think>`` or if empty."""
    close = text.rfind(THINK_CLOSE)
    if close < 0:
        return None
    answer = text[close + len(THINK_CLOSE) :].strip()
    at = answer.rfind("\\boxed{")
    if at >= 0:
        depth = 0
        for i in range(at + len("\\boxed"), len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[i], 0)
            if depth == 0:
                return answer[at : i + 1]
    return answer or None


def _as_latex(answer: str) -> str:
    # math-verify misses bare LaTeX such as \frac12 or \sqrt{2}/2 without a math delimiter.
    if any(d in answer for d in ("$", "\\boxed", "\\(", "\\[")):
        return answer
    return f"${answer}$"


def import_math_verify() -> None:
    """Import math-verify (and sympy, ~1 s): a worker initializer, so that the import does
    not count against the first item's time limit."""
    import math_verify  # noqa: F401


def verify_answer(gold: str, pred: str, timeout_s: float | None = 10.0) -> bool | None:
    """math-verify ``verify(parse(gold), parse(pred))``; None when ``gold`` cannot be parsed
    (such a record cannot be checked and is kept).

    math-verify's own time limits (a third of ``timeout_s`` for each of the two parses and the
    comparison; when one fires it answers "not equivalent") use ``signal.alarm``, which only
    works in a main thread: elsewhere they are off, and the caller must bound the time, as
    ``filter_batch`` does with worker processes.
    """
    from math_verify import parse, verify  # heavy (sympy): imported where it is used

    seconds = None
    if timeout_s is not None and threading.current_thread() is threading.main_thread():
        seconds = max(1, math.floor(timeout_s / 3))  # signal.alarm takes whole seconds
    gold_parsed = parse(_as_latex(gold), parsing_timeout=seconds)
    if not gold_parsed:
        return None
    pred_parsed = parse(pred, parsing_timeout=seconds)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=seconds))


def map_with_timeout(
    fn: Callable[..., Any],
    args: Sequence[tuple],
    timeout_s: float,
    workers: int = 2,
    *,
    initializer: Callable[[], None] | None = None,
    startup_s: float = 120.0,
    mp_context: str = "spawn",
) -> list[tuple[str, Any]]:
    """Run ``fn(*a)`` for each ``a`` in worker processes; ``(status, value)`` per item in
    order, status ``"ok"``, ``"timeout"`` or ``"error"`` (value: the exception's repr).

    At most ``workers`` items are in flight, so an item starts when it is submitted and its
    deadline (``timeout_s`` after that) is exact; the first ``workers`` items of a fresh pool
    get ``startup_s`` more, as they wait for a process to start (and run ``initializer``).
    An item past its deadline is abandoned by killing the pool (a process stuck in C code
    cannot be interrupted otherwise); the other in-flight items are rerun in a fresh pool.
    "spawn" avoids forking a parent that holds JAX threads.
    """
    results: list[tuple[str, Any] | None] = [None] * len(args)
    todo = list(range(len(args)))[::-1]  # a stack: pop() takes items in order
    ctx = multiprocessing.get_context(mp_context)
    while todo:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=initializer)
        in_flight: dict[Any, tuple[int, float]] = {}
        n_submitted = 0
        killed = False
        try:
            while (todo or in_flight) and not killed:
                while todo and len(in_flight) < workers:
                    i = todo.pop()
                    grace = startup_s if n_submitted < workers else 0.0
                    deadline = time.monotonic() + timeout_s + grace
                    in_flight[pool.submit(fn, *args[i])] = (i, deadline)
                    n_submitted += 1
                next_deadline = min(deadline for _, deadline in in_flight.values())
                done, _ = wait(
                    in_flight,
                    timeout=max(0.0, next_deadline - time.monotonic()),
                    return_when=FIRST_COMPLETED,
                )
                for fut in done:
                    i, _ = in_flight.pop(fut)
                    exc = fut.exception()
                    if exc is None:
                        results[i] = ("ok", fut.result())
                    elif isinstance(exc, BrokenProcessPool):
                        results[i] = ("error", "worker process died")
                    else:
                        results[i] = ("error", repr(exc))
                now = time.monotonic()
                late = [fut for fut, (_, deadline) in in_flight.items() if deadline <= now]
                for fut in late:
                    i, _ = in_flight.pop(fut)
                    results[i] = ("timeout", None)
                if late:
                    killed = True
                    todo.extend(i for i, _ in in_flight.values())  # rerun: not their fault
                    in_flight.clear()
                    _kill_workers(pool)
        finally:
            pool.shutdown(wait=not killed, cancel_futures=True)
    return [r for r in results if r is not None]


def _kill_workers(pool: ProcessPoolExecutor) -> None:
    if hasattr(pool, "terminate_workers"):  # Python >= 3.14
        pool.terminate_workers()
        return
    # Before 3.14 there is no public way to stop a running task: kill its processes.
    procs = getattr(pool, "_processes", None) or {}
    for proc in list(procs.values()):
        proc.kill()
        proc.join(timeout=5)


def _answer_reason(status: str, verdict: bool | None) -> str | None:
    if status == "timeout":
        return "answer_timeout"
    if status == "error":
        return "answer_error"
    return "wrong_answer" if verdict is False else None


# -------------------------------------------------------------------------- combining


def cheap_reasons(rec: FilterInput, cfg: FilterConfig) -> list[str]:
    """Reasons from the length, structure and repetition filters (all that apply)."""
    reasons = []
    if cfg.length and (r := check_length(rec, cfg)):
        reasons.append(r)
    if cfg.structure and (r := check_structure(rec.text, cfg.tool_markers)):
        reasons.append(r)
    if cfg.repetition and (r := check_repetition(rec.text, cfg)):
        reasons.append(r)
    return reasons


def _answer_job(rec: FilterInput, cfg: FilterConfig) -> tuple[str, str] | None:
    if not cfg.answer or rec.reference_answer is None:
        return None
    return (rec.reference_answer, extract_final_answer(rec.text) or "")


def apply_filters(rec: FilterInput, cfg: FilterConfig | None = None) -> list[str]:
    """All rejection reasons of one record (empty: kept). The answer check, if on, runs in
    this process (math-verify's time limits only in the main thread); prefer
    ``filter_batch`` for many records."""
    cfg = cfg or FilterConfig()
    reasons = cheap_reasons(rec, cfg)
    job = None if reasons else _answer_job(rec, cfg)
    if job is not None:
        try:
            status, verdict = "ok", verify_answer(*job, timeout_s=cfg.answer_timeout_s)
        except Exception:  # noqa: BLE001 - one bad record must not stop the stage
            status, verdict = "error", None
        if (r := _answer_reason(status, verdict)) is not None:
            reasons.append(r)
    return reasons


def filter_batch(
    records: Sequence[FilterInput], cfg: FilterConfig | None = None
) -> list[list[str]]:
    """``apply_filters`` for many records; the answer checks run in ``cfg.answer_workers``
    worker processes with a hard limit of ``cfg.answer_timeout_s`` + 2 s per item."""
    cfg = cfg or FilterConfig()
    reasons = [cheap_reasons(rec, cfg) for rec in records]
    jobs = [(i, _answer_job(rec, cfg)) for i, rec in enumerate(records) if not reasons[i]]
    jobs = [(i, job) for i, job in jobs if job is not None]
    if jobs:
        args = [(gold, pred, cfg.answer_timeout_s) for _, (gold, pred) in jobs]
        out = map_with_timeout(
            verify_answer,
            args,
            cfg.answer_timeout_s + 2.0,  # math-verify's own limits get to fire first
            cfg.answer_workers,
            initializer=import_math_verify,
        )
        for (i, _), (status, verdict) in zip(jobs, out, strict=True):
            if (r := _answer_reason(status, verdict)) is not None:
                reasons[i].append(r)
    return reasons


def count_reasons(reasons: Iterable[Sequence[str]]) -> dict[str, int]:
    """Tally per reason (a record with two reasons counts in both), plus ``kept``,
    ``rejected`` and ``total``."""
    counts: Counter[str] = Counter()
    for rs in reasons:
        counts.update(set(rs))
        counts["kept" if not rs else "rejected"] += 1
        counts["total"] += 1
    return dict(sorted(counts.items()))
