"""The evaluate stage: pass@k / avg@k against hand computations, scorers, and the stage end to end
on the embedded tiny Qwen3 (real sampling engine, real scorer processes)."""

import json
import math
import os
import textwrap
from fractions import Fraction
from pathlib import Path

import pytest

from dasd_jax import embedded
from dasd_jax.config import ConfigError, load_config
from dasd_jax.evaluate import metrics, scorers, stage
from dasd_jax.records import BadRow

# ----------------------------------------------------------------------------- metrics


def _exact_pass_at_k(n, c, k):  # the definition, in exact integer arithmetic
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_hand_values():
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 5/6
    assert metrics.pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-12)
    # k=1 is the plain accuracy: 1 - C(3,1)/C(4,1) = 1 - 3/4 = 1/4
    assert metrics.pass_at_k(4, 1, 1) == pytest.approx(1 / 4, abs=1e-12)
    # n=5, c=2, k=3: 1 - C(3,3)/C(5,3) = 1 - 1/10 = 9/10
    assert metrics.pass_at_k(5, 2, 3) == pytest.approx(9 / 10, abs=1e-12)
    # n=10, c=3, k=2: 1 - C(7,2)/C(10,2) = 1 - 21/45 = 8/15
    assert metrics.pass_at_k(10, 3, 2) == pytest.approx(8 / 15, abs=1e-12)
    # edges: nothing correct -> 0; everything correct -> 1; k=n -> 1 iff any is correct;
    # n - c < k: every draw of k holds a correct one -> 1 (C(1,2) = 0)
    assert metrics.pass_at_k(8, 0, 3) == 0.0
    assert metrics.pass_at_k(8, 8, 3) == 1.0
    assert metrics.pass_at_k(8, 1, 8) == 1.0 and metrics.pass_at_k(8, 0, 8) == 0.0
    assert metrics.pass_at_k(4, 3, 2) == 1.0
    for bad in ((4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)):
        with pytest.raises(ValueError, match="pass@k"):
            metrics.pass_at_k(*bad)


def test_pass_at_k_matches_binomials_and_is_stable():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert metrics.pass_at_k(n, c, k) == pytest.approx(
                    _exact_pass_at_k(n, c, k), abs=1e-12
                ), (n, c, k)
    # C(1000, 64) ~ 1e100 overflows nothing in the product form
    for n, c, k in ((1000, 7, 64), (1000, 1, 64), (64, 1, 8), (4096, 3, 1024)):
        assert metrics.pass_at_k(n, c, k) == pytest.approx(_exact_pass_at_k(n, c, k), rel=1e-10)


def test_aggregate_on_a_hand_made_table():
    # three problems, 4 samples each, 0 / 2 / 4 correct: accuracies 0, 1/2, 1
    agg = metrics.aggregate([4, 4, 4], [0, 2, 4], ks=(1, 2, 4))
    assert agg["problems"] == 3
    assert agg["avg"] == pytest.approx(0.5)  # avg@4 = (0 + 0.5 + 1) / 3
    # sample std of (0, .5, 1) = 0.5, stderr = 0.5 / sqrt(3)
    assert agg["stderr"] == pytest.approx(0.5 / math.sqrt(3))
    assert agg["pass@k"][1] == pytest.approx(0.5)  # pass@1 = avg
    assert agg["pass@k"][2] == pytest.approx((0 + 5 / 6 + 1) / 3)  # = 11/18
    assert agg["pass@k"][4] == pytest.approx((0 + 1 + 1) / 3)
    one = metrics.aggregate([64], [16], ks=(1, 64))
    assert one["avg"] == 0.25 and one["stderr"] is None and one["pass@k"][64] == 1.0
    row = metrics.per_problem(4, 2, (1, 2))
    assert row == {
        "n": 4,
        "correct": 2,
        "accuracy": 0.5,
        "pass@k": pytest.approx({1: 0.5, 2: 5 / 6}),
    }
    assert metrics.aggregate([], [], ks=(1,))["avg"] is None


# ----------------------------------------------------------------------------- scorers


THINK = "<think>\nLet me compute. Maybe \\boxed{7}? No.\n</think>\n\n"


@pytest.mark.parametrize(
    "response, gold, want",
    [
        (THINK + "So the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", True),
        (THINK + "So the answer is $\\boxed{\\frac{1}{2}}$.", "1/2", True),
        (THINK + "\\boxed{0.5}", "\\frac{1}{2}", True),
        (THINK + "17 * 24 = 408", "408", True),  # no box: math-verify takes the last number
        (THINK + "The answer is \\boxed{408}.", 408, True),  # int gold from JSON
        (THINK + "\\boxed{1} at first, then \\boxed{408}", "408", True),  # the last box
        (THINK + "The answer is \\boxed{407}.", "408", False),
        (THINK + "The answer is \\boxed{408}.", "7", False),  # a box inside <think> is not it
        ("<think>\nthe answer is \\boxed{408}", "408", False),  # thinking never closed
        ("The roots are $\\boxed{3, 2}$.", "2, 3", True),  # no <think>: a non-thinking model
        (THINK, "408", False),  # empty answer
        (THINK + "\\boxed{408}", "", None),  # no gold: cannot judge
    ],
)
def test_math_scorer(response, gold, want):
    assert scorers.math_scorer(response, gold, {}, timeout_s=10.0) is want


def test_demo_benchmark_answers_are_accepted_and_others_rejected():
    rows = embedded.demo_benchmark()
    assert len(rows) >= 5 and len({r["id"] for r in rows}) == len(rows)
    assert {"What is 17 * 24?", "How many positive divisors does 36 have?"} <= {
        r["problem"] for r in rows
    }
    assert next(r for r in rows if r["problem"] == "What is 17 * 24?")["answer"] == str(17 * 24)
    for r in rows:
        assert scorers.math_scorer(f"{THINK}\\boxed{{{r['answer']}}}", r["answer"]) is True
        assert scorers.math_scorer(f"{THINK}\\boxed{{{r['answer']} + 1}}", r["answer"]) is False


@pytest.mark.parametrize(
    "answer, gold, want",
    [
        ("Answer: C", "C", True),
        ("**Answer:** (C)", "C", True),
        ("The correct answer is (B).", "(B)", True),
        ("$\\boxed{D}$", "D", True),
        ("$\\boxed{\\text{A}}$", "a", True),
        ("Between (A) and (C), the answer is C.", "C", True),
        ("I choose (B)", "C", False),
        ("Answer: A", "C", False),
        ("C", "C", True),
        ("I do not know.", "C", False),
        ("Answer: C", "42", None),  # not a letter: cannot judge
    ],
)
def test_choice_scorer(answer, gold, want):
    assert scorers.choice_scorer(THINK + answer, gold, {}) is want


def test_custom_scorer_hook(tmp_path, monkeypatch):
    (tmp_path / "dasd_eval_hooks.py").write_text(
        textwrap.dedent(
            """
            def exact(response, gold, row):
                return response.strip().endswith(str(gold)) and row["ok"]

            def bad(response, gold, row):
                return "yes"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = scorers.resolve_scorer("dasd_eval_hooks:exact")
    assert fn("x 12", 12, {"ok": True}) is True and fn("x 13", 12, {"ok": True}) is False
    assert scorers.resolve_scorer("math").func is scorers.math_scorer
    assert scorers.resolve_scorer("choice") is scorers.choice_scorer
    out = scorers.judge_all(
        "dasd_eval_hooks:exact",
        [("a 1", 1, {"ok": True}), ("a 1", 1, {"ok": False}), ("a 2", 1, {"ok": True})],
        timeout_s=5.0,
        workers=0,
    )
    assert out == [("ok", True), ("ok", False), ("ok", False)]
    (status, detail), *_ = scorers.judge_all("dasd_eval_hooks:bad", [("", 1, {})], 5.0, 0)
    assert status == "error" and "expected bool or None" in detail
    with pytest.raises(ValueError, match="cannot import 'no_such_module_xyz'"):
        scorers.resolve_scorer("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        scorers.resolve_scorer("dasd_eval_hooks:nope")
    with pytest.raises(ConfigError, match="evaluate.scorer"):
        load_config(None, ["evaluate.scorer=no_colon"])


def test_config_validation():
    cfg = load_config(None, ["evaluate.k=8", "evaluate.pass_k=[1,8]"])
    assert cfg.evaluate.k == 8 and cfg.evaluate.pass_k == (1, 8)
    for bad, key in (
        (["evaluate.k=4"], "evaluate.pass_k"),  # default pass_k has 8 and 64 > 4
        (["evaluate.k=0"], "evaluate.k"),
        (["evaluate.top_p=0"], "evaluate.top_p"),
        (["evaluate.temperature=-1"], "evaluate.temperature"),
        (["evaluate.prompt_template=hi"], "evaluate.prompt_template"),
        (["evaluate.checkpoints=[base,base]"], "evaluate.checkpoints"),
        (["evaluate.response_tail_chars=-2"], "evaluate.response_tail_chars"),
    ):
        with pytest.raises(ConfigError, match=key):
            load_config(None, bad)


# ----------------------------------------------------------------------------- the stage

HOOK = """
def parity(response, gold, row):
    # a deterministic verdict on the real sampled text, true for some and false for others
    return (len(response) + int(row["bias"])) % 2 == 0
"""


def _bench(tmp_path, rows=None):
    rows = rows or [
        {"qid": "q1", "problem": "What is 17 * 24?", "answer": "408", "bias": 0},
        {"qid": "q2", "problem": "What is 2^10?", "answer": "1024", "bias": 1},
        {"qid": "q3", "problem": "What is 13 * 17?", "answer": "221", "bias": 0},
    ]
    path = tmp_path / "tiny_math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(run_dir, bench, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"evaluate.benchmarks=[{bench}]",
            "evaluate.id_field=qid",
            "evaluate.prompt_template=Put the answer in \\boxed{}. {problem}",
            "evaluate.scorer=dasd_eval_parity:parity",
            "evaluate.k=2",
            "evaluate.pass_k=[1,2]",
            "evaluate.max_tokens=12",
            "evaluate.problems_per_shard=2",
            "evaluate.response_tail_chars=-1",
            "evaluate.score_workers=1",
            "student.dtype=float32",
            "student.attention=xla",
            "sample.slots=8",
            "sample.max_prefill_length=64",
            "sample.decode_steps=4",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One stage run over base + stage1 (a finished stage folder whose export is the embedded
    student itself) on a 3-problem benchmark, k=2."""
    tmp = tmp_path_factory.mktemp("eval")
    (tmp / "dasd_eval_parity.py").write_text(HOOK)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(tmp))  # spawned scorer processes inherit sys.path
    run_dir = tmp / "run"
    (run_dir / "stage1").mkdir(parents=True)
    os.symlink(embedded.tiny_student(), run_dir / "stage1" / "export")
    (run_dir / "stage1" / "final.json").write_text(json.dumps({"step": 8, "embedded": True}))
    bench = _bench(tmp)
    cfg = _cfg(run_dir, bench)
    summary = stage.run(cfg)
    yield tmp, run_dir, bench, cfg, summary
    mp.undo()


def _read_jsonl(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def test_stage_writes_consistent_files(evaluated):
    tmp, run_dir, bench, cfg, summary = evaluated
    out = run_dir / "evaluate"
    assert summary["output"] == str(out) and summary["demo"] is True
    assert list(summary["checkpoints"]) == ["base", "stage1"]  # stage2/3 missing: skipped
    assert summary["counts"] == {"in": 3 * 2, "out": 3 * 2, "rejected": 0}
    import dasd_eval_parity

    results = json.loads((out / "results.json").read_text())
    assert results["table"] == summary["table"]
    rows_by_ck = {}
    for ck in ("base", "stage1"):
        pair = out / ck / "tiny_math"
        assert sorted(p.name for p in pair.iterdir()) == ["samples.jsonl", "summary.json"]
        rows = _read_jsonl(pair / "samples.jsonl")
        rows_by_ck[ck] = rows
        assert [(r["id"], r["line"], r["answer"]) for r in rows] == [
            ("q1", 1, "408"),
            ("q2", 2, "1024"),
            ("q3", 3, "221"),
        ]
        bench_rows = [json.loads(x) for x in bench.read_text().splitlines()]
        for r, b in zip(rows, bench_rows, strict=True):
            assert r["k"] == 2 and len(r["responses"]) == 2
            # the verdicts are the hook's on the stored (whole) responses
            want = [dasd_eval_parity.parity(t, b["answer"], b) for t in r["responses"]]
            assert r["correct"] == want and r["n_correct"] == sum(want)
            assert r["response_chars"] == [len(t) for t in r["responses"]]
            for reason, n in zip(r["finish_reasons"], r["lengths"], strict=True):
                assert reason in ("stop", "length") and 1 <= n <= 12
                assert (n == 12) if reason == "length" else True
        s = json.loads((pair / "summary.json").read_text())
        assert s["checkpoint"] == ck and s["problems"] == 3 and s["samples"] == 6 and s["k"] == 2
        c = [r["n_correct"] for r in rows]
        # by hand: avg@2 = mean(c/2); pass@2 = mean(1 - C(2-c, 2)/C(2, 2)) = share with c >= 1
        assert s["avg@k"] == pytest.approx(sum(x / 2 for x in c) / 3)
        assert s["pass@k"]["1"] == pytest.approx(s["avg@k"])
        assert s["pass@k"]["2"] == pytest.approx(sum(x >= 1 for x in c) / 3)
        acc = [x / 2 for x in c]
        mean = sum(acc) / 3
        sd = math.sqrt(sum((a - mean) ** 2 for a in acc) / 2)
        assert s["stderr"] == pytest.approx(sd / math.sqrt(3))
        lengths = [n for r in rows for n in r["lengths"]]
        assert s["mean_length"] == pytest.approx(sum(lengths) / 6)
        reasons = [f for r in rows for f in r["finish_reasons"]]
        assert s["truncation_rate"] == pytest.approx(reasons.count("length") / 6)
        assert results["table"][ck]["tiny_math"]["avg@k"] == s["avg@k"]
        assert s["settings"]["k"] == 2 and s["settings"]["max_tokens"] == 12
    # same weights, same per-sample seeds: the two checkpoints sample the same texts
    assert rows_by_ck["base"] == rows_by_ck["stage1"]
    # and different problems / samples differ (the seeds are not all the same)
    texts = [t for r in rows_by_ck["base"] for t in r["responses"]]
    assert len(set(texts)) > 1
    report = (out / "report.md").read_text()
    avg = results["table"]["base"]["tiny_math"]["avg@k"]
    assert "| checkpoint | tiny_math |" in report and f"| base | {100 * avg:.1f} ±" in report
    assert (out / "avg_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "evaluate" / "metrics.jsonl").exists()


def test_rerun_skips_finished_pairs(evaluated):
    tmp, run_dir, bench, cfg, _ = evaluated
    out = run_dir / "evaluate"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.parent.name == "tiny_math"}
    again = stage.run(cfg)
    assert again["skipped_pairs"] == 2 and again["evaluated_pairs"] == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    with pytest.raises(RuntimeError, match="other settings.*max_tokens"):
        stage.run(_cfg(run_dir, bench, "evaluate.max_tokens=10"))


def test_partial_pair_resumes_per_part(evaluated):
    """A pair killed after its first part: the part is kept (not resampled), the rest is
    sampled, and nothing looks finished before it is."""
    tmp, run_dir, bench, cfg, _ = evaluated
    run2 = tmp / "run2"
    (run2 / "evaluate").mkdir(parents=True)
    pair = run2 / "evaluate" / "base" / "tiny_math"
    pair.mkdir(parents=True)
    done = _read_jsonl(run_dir / "evaluate" / "base" / "tiny_math" / "samples.jsonl")
    marked = [dict(r, resumed=True) for r in done[:2]]  # part 0 = problems 1-2
    (pair / "part-000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in marked))
    cfg2 = _cfg(run2, bench, "evaluate.checkpoints=[base]")
    ck = stage.resolve_checkpoints(cfg2)[0]
    demo = stage.demo_config(cfg2)
    b = stage.resolve_benchmarks(demo)[0]
    (pair / "settings.json").write_text(json.dumps(stage.pair_settings(demo, ck, b)))
    assert not (pair / "summary.json").exists()
    summary = stage.run(cfg2)
    assert summary["evaluated_pairs"] == 1
    rows = _read_jsonl(pair / "samples.jsonl")
    assert [r.get("resumed") for r in rows] == [True, True, None]
    assert rows[2] == done[2]  # the missing part, sampled now, equals the full run's
    assert sorted(p.name for p in pair.iterdir()) == ["samples.jsonl", "summary.json"]


def test_bad_benchmark_rows_name_file_and_line(tmp_path):
    good = '{"id": "a", "problem": "1+1?", "answer": "2"}\n'
    cases = {
        "malformed": (good + '{"id": "b", "problem": \n', 2, "malformed JSON"),
        "no_answer": (
            good + good.replace('"a"', '"b"').replace(', "answer": "2"', ""),
            2,
            "missing field 'answer'",
        ),
        "no_problem": (good + '{"id": "b", "answer": "2"}\n', 2, "field 'problem'"),
        "duplicate": (good + "\n" + good, 3, "duplicate id 'a' \\(first at line 1\\)"),
    }
    for name, (text, line, why) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(text)
        cfg = load_config(None, [f"run_dir={tmp_path}", f"evaluate.benchmarks=[{path}]"])
        with pytest.raises(BadRow, match=f"{name}.jsonl:{line}: .*{why}") as e:
            stage.run(cfg)  # fails on reading, before any model is loaded
        assert e.value.line == line and e.value.path == str(path)


def test_checkpoint_resolution(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "evaluate.checkpoints=[base,stage2]"])
    with pytest.raises(FileNotFoundError, match="'stage2'.*stage2/final.json does not exist"):
        stage.resolve_checkpoints(cfg)
    folder = tmp_path / "mine" / "export"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    cfg = load_config(
        None, [f"run_dir={tmp_path}", f"evaluate.checkpoints=[{folder},other={folder}]"]
    )
    cks = stage.resolve_checkpoints(cfg)
    assert [(c.name, c.path, c.embedded) for c in cks] == [
        ("mine_export", folder, False),
        ("other", folder, False),
    ]
    cfg = load_config(None, [f"run_dir={tmp_path}", "student.path=/no/such/dir"])
    with pytest.raises(FileNotFoundError, match="no checkpoint to evaluate"):
        stage.resolve_checkpoints(cfg)
