"""Answer checks that never finish: bounded per sample, counted as timeouts (not judged), never
as wrong answers, and reported apart from them (issue 15, "nothing lost, nothing silent")."""

import functools
import textwrap
import time

import pytest

from dasd_jax.evaluate import report, scorers, stage
from dasd_jax.select import report as select_report
from dasd_jax.select.filters import (
    FilterConfig,
    FilterInput,
    VerifyTimeout,
    apply_filters,
    count_reasons,
    map_with_timeout,
    verify_answer,
)

HOOKS = """
import time
from pathlib import Path

def hang(response, gold, row):
    time.sleep(10**6)

def logged_sleep(seconds, log):
    with open(log, "a") as f:
        f.write(f"{seconds}\\n")
    time.sleep(seconds)
    return seconds

def says_timeout(response, gold, row):
    raise TimeoutError("my sandbox ran out of time")

def slow_sympy():  # an initializer: every sympy comparison takes a minute in this worker
    import math_verify.grader
    math_verify.grader.sympy_expr_eq = lambda *a, **k: time.sleep(60)

def broken_start():
    raise ImportError("no such judge")
"""


@pytest.fixture
def hooks(tmp_path, monkeypatch):
    """A hook module importable here and in spawned workers (they inherit sys.path)."""
    (tmp_path / "dasd_verify_hooks.py").write_text(textwrap.dedent(HOOKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import dasd_verify_hooks

    return dasd_verify_hooks


THINK = "<think>\nWork.\n</think>\n\n"


# ------------------------------------------------------------------------- the bound


def test_a_hook_that_never_returns_costs_its_limit_per_sample(hooks):
    """The audit's case: 6 samples, verify_timeout_s=2, 2 workers. Each sample's limit is
    2 + 2 s; process starts are not charged to it (the old pool gave each fresh pool's first
    items 120 s more and restarted the pool per timeout: ~124 s per sample, minutes here)."""
    t0 = time.monotonic()
    out = scorers.judge_all("dasd_verify_hooks:hang", [("x", 1, {})] * 6, 2.0, workers=2)
    elapsed = time.monotonic() - t0
    assert out == [("timeout", None)] * 6
    assert elapsed < 6 * (2 + 5), elapsed  # generous: ~3 x 4 s + starts


def test_a_timeout_replaces_its_worker_only(hooks, tmp_path):
    """The other worker's items go on: none is killed or run twice."""
    log = tmp_path / "calls.txt"
    items = [(30.0, str(log))] + [(0.3, str(log))] * 8
    out = map_with_timeout(hooks.logged_sleep, items, timeout_s=1.5, workers=2)
    assert out == [("timeout", None)] + [("ok", 0.3)] * 8
    assert sorted(log.read_text().split()) == ["0.3"] * 8 + ["30.0"]


def test_process_start_is_not_charged_to_items_and_is_bounded(hooks):
    # a 3 s start, 1 s items that take 0.5 s: all in time
    slow_start = functools.partial(time.sleep, 3)
    out = map_with_timeout(time.sleep, [(0.5,)] * 3, 1.0, 2, initializer=slow_start)
    assert out == [("ok", None)] * 3
    # a start that never ends, or fails, is loud, not a silent stream of timeouts
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not ready within startup_s=2"):
        map_with_timeout(
            time.sleep, [(0,)], 1.0, 1, initializer=functools.partial(time.sleep, 600), startup_s=2
        )
    assert time.monotonic() - t0 < 20
    with pytest.raises(RuntimeError, match="failed to start.*no such judge"):
        map_with_timeout(time.sleep, [(0,)], 1.0, 1, initializer=hooks.broken_start)


# ----------------------------------------------------- math-verify's own time limits


@pytest.fixture
def slow_math_verify(monkeypatch):
    """math-verify's sympy comparison, and parsing of answers containing 999, take 30 s: its
    own signal.alarm limits fire (this test runs in the main thread) and it would answer
    "not equivalent"."""
    import math_verify.grader
    import math_verify.parser

    monkeypatch.setattr(math_verify.grader, "sympy_expr_eq", lambda *a, **k: time.sleep(30))
    real = math_verify.parser.extract_target_from_pred

    def extract(pred, *a, **k):
        if "999" in pred:
            time.sleep(30)
        return real(pred, *a, **k)

    monkeypatch.setattr(math_verify.parser, "extract_target_from_pred", extract)


def test_math_verify_timeout_is_not_a_wrong_answer(slow_math_verify):
    t0 = time.monotonic()
    with pytest.raises(VerifyTimeout, match="comparing"):
        verify_answer("1/2", "0.5", timeout_s=3.0)
    with pytest.raises(VerifyTimeout, match="parsing the answer"):
        verify_answer("4", "\\boxed{999}", timeout_s=3.0)
    # a comparison that finished and says equivalent wins over one that timed out
    assert verify_answer("7", "7", timeout_s=3.0) is True
    # the select filter: answer_timeout, counted apart from wrong_answer
    cfg = FilterConfig(answer=True, answer_timeout_s=3.0)
    reasons = [
        apply_filters(FilterInput(THINK + "The answer is 0.5.", 10, "1/2"), cfg),
        apply_filters(FilterInput(THINK + "$\\boxed{999}$", 10, "4"), cfg),
    ]
    assert reasons == [["answer_timeout"], ["answer_timeout"]]
    assert count_reasons(reasons)["answer_timeout"] == 2
    assert "wrong_answer" not in count_reasons(reasons)
    # the evaluate scorer: a timeout, not judged
    out = scorers.judge_all("math", [(THINK + "It is 0.5.", "1/2", {})], 3.0, workers=0)
    assert [s for s, _ in out] == ["timeout"] and "VerifyTimeout" in out[0][1]
    assert time.monotonic() - t0 < 30  # every check stopped at its 1 s limits


def test_math_verify_timeout_in_a_worker_process(hooks):
    """The real alarm in a real worker (its main thread): a timeout, not False."""
    out = map_with_timeout(
        verify_answer, [("1/2", "0.5", 3.0), ("7", "7", 3.0)], 5.0, 1, initializer=hooks.slow_sympy
    )
    assert out[0][0] == "timeout" and "VerifyTimeout" in out[0][1]
    assert out[1] == ("ok", True)
    # a hook's own TimeoutError is a timeout too
    assert scorers.judge_all("dasd_verify_hooks:says_timeout", [("x", 1, {})], 5.0, 1) == [
        ("timeout", "TimeoutError('my sandbox ran out of time')")
    ]


# ------------------------------------------------------------------ counted and reported


def _row(correct, errors=None):
    row = {"k": len(correct), "n_correct": correct.count(True), "correct": correct}
    row.update(finish_reasons=["stop"] * len(correct), lengths=[5] * len(correct))
    if errors:
        row["judge_errors"] = errors
    return row


def test_timeouts_are_counted_apart_and_flagged():
    rows = [
        _row([True, None, False, None], {1: "timeout", 3: "error: ValueError('x')"}),
        _row([True, True, None, False], {2: "timeout"}),
        _row([False, False, False, None]),  # the scorer said None: cannot judge
    ]
    s = stage.summarize_pair(rows, (1, 4))
    assert s["samples"] == 12 and s["not_judged"] == 4 and s["timeouts"] == 2
    assert s["judge_errors"] == {"timeout": 2, "error": 1}
    # avg@k counts them as not correct; avg@k_upper as correct
    assert s["avg@k"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    assert s["avg@k_upper"] == pytest.approx((3 / 4 + 3 / 4 + 1 / 4) / 3)
    assert s["warning"].startswith("4 of 12 samples not judged (2 timeouts, 1 scorer errors, 1")
    clean = stage.summarize_pair([_row([True, False, True, False])], (1, 4))
    assert clean["not_judged"] == 0 and clean["timeouts"] == 0 and "warning" not in clean

    results = {
        "table": {
            "base": {"b": {k: s.get(k) for k in report.TABLE_KEYS}},
            "stage1": {"b": {k: clean.get(k) for k in report.TABLE_KEYS}},
        },
        "k": 4,
        "benchmarks": {"b": "b.jsonl"},
        "checkpoints": {"base": "x", "stage1": "y"},
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 8,
        "scorer": "math",
    }
    md = report.markdown(results, [])
    assert f"| base | {100 * s['avg@k']:.1f} ± {100 * s['stderr']:.1f} ⚠ |" in md
    assert "| stage1 | 50.0 |" in md  # no flag without samples not judged
    assert "**base / b**: 4 of 12 samples not judged (2 timeouts" in md

    # the select report and printout flag answer timeouts the same way
    note = select_report.timeout_note({"answer_timeout": 3, "wrong_answer": 5})
    assert note.startswith("3 candidates were dropped as `answer_timeout`")
    assert select_report.timeout_note({"wrong_answer": 5}) is None
