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
  past its time limit (ours, or one of math-verify's own: not judged, never counted as wrong)
  -> ``answer_timeout``; a crash -> ``answer_error``. Records without a reference answer
  (code, instruction following) are not checked. It runs only on records that passed the
  other filters, because it is by far the slowest.

``map_with_timeout`` runs such checks (and the evaluate stage's scorers) in worker processes
with a hard limit per item that process starts are never charged to.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection as mp_connection
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dasd_jax.models.harmony import harmony_to_think  # noqa: F401 (the one harmony parser)
from dasd_jax.select.sentences import THINK_CLOSE, THINK_OPEN

log = logging.getLogger(__name__)

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


class VerifyTimeout(TimeoutError):
    """math-verify's own time limit fired (a parse or the comparison): the answer is not
    judged, neither right nor wrong. A TimeoutError, so ``run_item`` reports "timeout"."""


def verify_answer(gold: str, pred: str, timeout_s: float | None = 10.0) -> bool | None:
    """math-verify ``verify(parse(gold), parse(pred))``; None when ``gold`` cannot be parsed
    (such a record cannot be checked and is kept). Raises ``VerifyTimeout`` when one of
    math-verify's own time limits fires and no comparison that finished says equivalent.

    Those limits (a third of ``timeout_s`` for each of the two parses and for each compared
    pair) use ``signal.alarm``, which only works in a main thread: elsewhere they are off, and
    the caller must bound the time, as ``filter_batch`` does with worker processes. Left to
    itself math-verify answers "not equivalent" when one fires, which would count an unjudged
    answer as wrong: we ask it to raise (``raise_on_error``) and tell timeouts apart.
    """
    from math_verify import parse, verify  # heavy (sympy): imported where it is used
    from math_verify.errors import TimeoutException

    seconds = None
    if timeout_s is not None and threading.current_thread() is threading.main_thread():
        seconds = max(1, math.floor(timeout_s / 3))  # signal.alarm takes whole seconds

    def parsed(text: str, what: str) -> list:
        try:
            return parse(text, parsing_timeout=seconds, raise_on_error=True)
        except TimeoutException:
            raise VerifyTimeout(f"math-verify: parsing the {what} took over {seconds} s") from None
        except Exception:  # noqa: BLE001 - what math-verify itself does: nothing parsed
            return []

    gold_parsed = parsed(_as_latex(gold), "reference answer")
    if not gold_parsed:
        return None
    timed_out = False
    for g, p in itertools.product(gold_parsed, parsed(pred, "answer")):  # math-verify's order
        try:
            if verify(g, p, timeout_seconds=seconds, raise_on_error=True):
                return True
        except TimeoutException:
            timed_out = True
        except Exception:  # noqa: BLE001 - math-verify's own answer: not equivalent
            pass
    if timed_out:
        raise VerifyTimeout(f"math-verify: comparing the answers took over {seconds} s")
    return False


# ------------------------------------------------------------------ bounded worker calls


def run_item(fn: Callable[..., Any], a: Sequence) -> tuple[str, Any]:
    """``fn(*a)`` as ``(status, value)``: "ok" and its result; "timeout" when fn raises a
    TimeoutError (its own limit fired, e.g. ``VerifyTimeout``: not judged, not wrong); "error"
    with the exception's repr."""
    try:
        return "ok", fn(*a)
    except TimeoutError as e:
        return "timeout", repr(e)
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the others
        return "error", repr(e)


def _worker_main(conn: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> None:
    # The parent sends an item only to a worker that said "ready", one at a time, so an
    # item's clock starts when it is sent, never while a process starts or imports.
    try:
        if initializer is not None:
            initializer()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("init_error", repr(e)))
        return
    conn.send(("ready",))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the parent is gone
            return
        if task is None:
            return
        i, a = task
        status, value = run_item(fn, a)
        try:
            conn.send(("done", i, status, value))
        except Exception as e:  # noqa: BLE001 - e.g. a result that cannot be pickled
            conn.send(("done", i, "error", f"cannot send the result back: {e!r}"))


@dataclass
class _Worker:
    proc: Any  # multiprocessing.Process
    conn: Any  # the parent's end of its pipe
    started: float  # time.monotonic() at the start
    ready: bool = False
    item: int | None = None  # the item it runs
    deadline: float = math.inf  # of that item


def _start(ctx: Any, fn: Callable[..., Any], initializer: Callable[[], None] | None) -> _Worker:
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_worker_main, args=(child, fn, initializer), name="dasd-worker")
    proc.start()
    child.close()  # the child's end lives in the child only: its death reads as EOF here
    return _Worker(proc, conn, time.monotonic())


def _stop(w: _Worker, kill: bool) -> None:
    if kill and w.proc.is_alive():
        w.proc.kill()  # a process stuck in C code cannot be interrupted otherwise
    w.proc.join(timeout=5)
    if w.proc.is_alive():
        w.proc.kill()
        w.proc.join(timeout=5)
    w.conn.close()


def _receive(w: _Worker, results: list, starts: list[float]) -> bool:
    """Read what ``w`` sent; False when its process is gone."""
    try:
        while w.conn.poll():
            msg = w.conn.recv()
            if msg[0] == "ready":
                w.ready = True
                starts.append(time.monotonic() - w.started)
            elif msg[0] == "init_error":
                raise RuntimeError(f"a worker process failed to start: {msg[1]}")
            else:
                _, i, status, value = msg
                results[i] = (status, value)
                w.item, w.deadline = None, math.inf
    except (EOFError, OSError):
        return False
    return w.proc.is_alive()


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
    order, status "ok", "timeout" (killed past ``timeout_s``, or fn raised a TimeoutError) or
    "error" (value: the exception's repr; "worker process died").

    Each item costs at most ``timeout_s`` (plus the kill, well under a second), whatever fn
    does: a worker is sent one item at a time and only once it has started and run
    ``initializer`` (imports), so the item's clock starts when it is sent. An item past its
    deadline is abandoned by killing its worker alone (a process stuck in C code cannot be
    interrupted otherwise); a fresh one takes its place, while the others go on. Starting a
    process is not charged to any item: it is bounded by ``startup_s`` per start (a worker
    that fails to start, or is not ready within it, raises RuntimeError), and the number and
    slowest start are logged with the timeouts. "spawn" avoids forking a parent that holds JAX
    threads.
    """
    if workers < 1:
        raise ValueError(f"map_with_timeout needs workers >= 1, got {workers}")
    results: list[tuple[str, Any] | None] = [None] * len(args)
    todo = collections.deque(range(len(args)))
    ctx = multiprocessing.get_context(mp_context)
    pool: list[_Worker] = []
    starts: list[float] = []  # seconds each worker took to be ready
    n_killed = 0
    try:
        while todo or any(w.item is not None for w in pool):
            busy = sum(w.item is not None for w in pool)
            while len(pool) < min(workers, busy + len(todo)):
                pool.append(_start(ctx, fn, initializer))
            for w in pool:
                if w.ready and w.item is None and todo:
                    i = todo.popleft()
                    try:
                        w.conn.send((i, args[i]))
                    except Exception as e:  # noqa: BLE001 - arguments that cannot be pickled
                        results[i] = ("error", f"cannot send the item: {e!r}")
                        continue
                    w.item, w.deadline = i, time.monotonic() + timeout_s
            if not todo and not any(w.item is not None for w in pool):
                break
            next_at = min(w.deadline if w.ready else w.started + startup_s for w in pool)
            mp_connection.wait(
                [w.conn for w in pool] + [w.proc.sentinel for w in pool],
                timeout=max(0.0, next_at - time.monotonic()),
            )
            for w in list(pool):
                alive = _receive(w, results, starts)
                now = time.monotonic()
                if alive and w.item is not None and now >= w.deadline:
                    results[w.item] = ("timeout", None)
                    n_killed += 1
                elif alive and not w.ready and now >= w.started + startup_s:
                    raise RuntimeError(
                        f"a worker process was not ready within startup_s={startup_s:g} s"
                    )
                elif alive:
                    continue
                elif not w.ready:
                    raise RuntimeError(
                        f"a worker process exited while starting (exit code {w.proc.exitcode})"
                    )
                elif w.item is not None:
                    results[w.item] = ("error", "worker process died")
                pool.remove(w)
                _stop(w, kill=True)
    finally:
        for w in pool:
            if w.ready and w.item is None:
                try:
                    w.conn.send(None)  # done: exit
                except OSError:
                    pass
        for w in pool:
            _stop(w, kill=not (w.ready and w.item is None))
    if n_killed:
        log.warning(
            "%d of %d items ran past %g s and were killed (not judged); %d worker starts, "
            "slowest %.1f s (not charged to any item)",
            n_killed,
            len(args),
            timeout_s,
            len(starts),
            max(starts, default=0.0),
        )
    return [r for r in results if r is not None]


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
        status, verdict = run_item(verify_answer, (*job, cfg.answer_timeout_s))
        if (r := _answer_reason(status, verdict)) is not None:
            reasons.append(r)
    return reasons


def filter_batch(
    records: Sequence[FilterInput], cfg: FilterConfig | None = None
) -> list[list[str]]:
    """``apply_filters`` for many records; the answer checks run in ``cfg.answer_workers``
    worker processes (``map_with_timeout``) with a hard limit of ``cfg.answer_timeout_s`` + 2 s
    per item, process starts not included."""
    return filter_and_judge(records, cfg)[0]


def filter_and_judge(
    records: Sequence[FilterInput], cfg: FilterConfig | None = None
) -> tuple[list[list[str]], list[bool | None]]:
    """``filter_batch``'s reasons, and per record the answer check's verdict: True (the
    answer is equivalent), False (``wrong_answer``), None where the check did not judge (off,
    no reference answer, another filter rejected the record first, a reference answer
    math-verify cannot parse, ``answer_timeout``, ``answer_error``)."""
    cfg = cfg or FilterConfig()
    reasons = [cheap_reasons(rec, cfg) for rec in records]
    verdicts: list[bool | None] = [None] * len(records)
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
            if status == "ok" and isinstance(verdict, bool):
                verdicts[i] = verdict
    return reasons, verdicts


def count_reasons(reasons: Iterable[Sequence[str]]) -> dict[str, int]:
    """Tally per reason (a record with two reasons counts in both), plus ``kept``,
    ``rejected`` and ``total``."""
    counts: Counter[str] = Counter()
    for rs in reasons:
        counts.update(set(rs))
        counts["kept" if not rs else "rejected"] += 1
        counts["total"] += 1
    return dict(sorted(counts.items()))
