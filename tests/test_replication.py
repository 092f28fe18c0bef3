"""The miniature replication (bench/replication) end to end in its reduced form, plus its task.

The reduced run trains barely-trained models on a handful of prompts, so its accuracies mean
nothing; what is checked is that every stage ran and that the outputs are consistent: DAS and
random keep the same prompts at equal budgets, DAS keeps a candidate with the most Teacher
sentences, seeds differ, the statistics match a hand computation from the per-seed files, and a
second run of the same command resumes (skips everything) and reports the same numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.replication import report, task

ROOT = Path(__file__).resolve().parents[1]
SEEDS = 2


# --------------------------------------------------------------------------- the task


def test_styles_reach_the_answer_and_are_detected():
    problems = task.generate(300, seed=7)
    for p in problems:
        assert task.parse_prompt(p.prompt) == p
        assert 3 <= len(p.path) <= 5 and len(set(p.path)) == len(p.path)
        for style in task.ALL_STYLES:
            r = task.solve(p, style)
            assert task.final_answer(r) == p.answer
            assert task.exact_match(r, p.answer) is True
            wrong = "A" if p.answer != "A" else "B"
            assert task.exact_match(r, wrong) is False
            assert task.detect_style(r) == style


def test_answer_by_hand():
    p = task.parse_prompt("Follow the arrows from B: C>E, G>G, D>G, B>A, H>B, A>D, E>E")
    assert p.path == ["A", "D", "G"] and p.answer == "G"
    assert task.solve(p, "full").splitlines()[1:5] == [
        "B>A, so go to A.",
        "A>D, so go to D.",
        "D>G, so go to G.",
        "G>G, so stop at G.",
    ]
    assert task.solve(p, "terse") == "<think>\nA, D, G, G.\n</think>\n\nThe answer is G."
    assert task.solve(p, "words").splitlines()[-4] == "The arrow G>G points back to G, so stop."
    assert task.detect_style("<think>\nB>A.\nmaybe D\n</think>\n\nThe answer is D.") == "other"
    assert task.final_answer("<think>\nno\n</think>\n\nI think G") is None
    assert task.final_answer("The answer is G.") is None  # no </think>: no answer
    assert task.exact_match("x</think>\n\nThe answer is G.", "not a letter") is None
    recap = task.solve(p, "recap").splitlines()
    assert recap[2:4] == [
        "Starting from B, we look up each letter in the list.",
        "The letters we visit are A, D, G.",
    ]
    assert len(recap) == 1 + 8 + 3  # <think>, eight lines, </think>, blank, answer


def test_decoupled_styles_rank_opposite_by_length_and_lines():
    # the variant's premise, in characters: recap is the longest style on every pool path,
    # compact and full have a line per arrow followed (one Teacher sentence each when the
    # student never wrote them), recap's content is one line
    for p in task.generate(200, seed=3):
        length = {st: len(task.solve(p, st)) for st in task.VARIANTS["decoupled"].teacher_styles}
        assert max(length, key=length.get) == "recap"
        assert task.solve(p, "compact").count("\n") == len(p.path) + 1 + 3
    v = task.VARIANTS["decoupled"]
    assert v.student_styles == ("recap",) and "recap" in v.teacher_styles
    assert "words" not in v.teacher_styles and v.temperatures == (1.0,)


def test_splits_are_disjoint_and_seeded():
    a = task.splits(50, 20, 100, 100, seed=0)
    b = task.splits(50, 20, 100, 100, seed=0)
    c = task.splits(50, 20, 100, 100, seed=1)
    assert [p.prompt for p in a["pool"]] == [p.prompt for p in b["pool"]]
    assert [p.prompt for p in a["pool"]] != [p.prompt for p in c["pool"]]
    sets = [{p.prompt for p in v} for v in a.values()]
    assert sum(map(len, sets)) == len(set().union(*sets))  # no prompt in two sets
    assert all(len(p.path) <= 2 for p in a["student"])
    assert all(3 <= len(p.path) <= 5 for p in a["eval"] + a["pool"])
    with pytest.raises(ValueError, match="min_steps"):
        task.TaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="not a task prompt"):
        task.parse_prompt("Follow the arrows from B: B>A, B>C")
    with pytest.raises(ValueError, match="cycle"):
        task.parse_prompt("Follow the arrows from B: B>A, A>B")
    with pytest.raises(ValueError, match="no arrow leaves A"):
        task.parse_prompt("Follow the arrows from B: B>A, C>C")


def test_mean_ci_by_hand():
    r = report.mean_ci([0.2, 0.4, 0.9])
    sd = math.sqrt(((0.2 - 0.5) ** 2 + (0.4 - 0.5) ** 2 + 0.4**2) / 2)
    assert r["mean"] == pytest.approx(0.5)
    assert r["ci95"] == pytest.approx(4.303 * sd / math.sqrt(3))
    assert report.mean_ci([0.3])["ci95"] is None


def test_output_stats_by_hand():
    rows = [
        {"styles": ["compact", "words"], "correct": [True, False]},
        {"styles": ["compact", "other"], "correct": [False, False]},
    ]
    r = report.output_stats(rows)
    assert r["compact"] == {"share": 0.5, "correct": 0.5}
    assert r["words"] == {"share": 0.25, "correct": 0.0}
    assert r["other"] == {"share": 0.25, "correct": 0.0}


# --------------------------------------------------------------------------- end to end


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # one CPU device, as a user runs it (conftest gives this process 8 fake ones)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["XLA_FLAGS"] = flags.strip()
    env["DASD_JAX_CACHE"] = str(out / "cache")
    cmd = [
        sys.executable,
        str(ROOT / "bench/replication/run.py"),
        "--out",
        str(out / "run"),
        "--reduced",
        "--seeds",
        str(SEEDS),
        *extra,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def reduced_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("replication")
    _run(out)
    results = json.loads((out / "run/results.json").read_text())
    _run(out)
    return out / "run", results, json.loads((out / "run/results.json").read_text())


@pytest.mark.slow
def test_reduced_run_outputs(reduced_run):
    out, res, _ = reduced_run
    assert (out / "report.md").read_text().count("|") > 50
    assert "What the evaluated models write" in (out / "report.md").read_text()
    # the output-style table pools every evaluation sample of every seed
    for name in ("base", "das_t0.6", "teacher"):
        assert sum(v["share"] for v in res["outputs"][name].values()) == pytest.approx(1.0)
    for f in res["plots"]:
        assert (out / f).stat().st_size > 1000, f
    names = {"base", "rs_t0.6", "das_t0.6", "rs_t1.0", "rs_t1.0_2x", "das_t1.0"}
    names |= {"das_t0.6_then_t1.0", "longest_t0.6", "longest_t1.0"}
    assert set(res["avg@k"]) == names
    for name, a in res["avg@k"].items():
        # the reported mean and CI are those of the per-seed files, recomputed here
        per_seed = []
        for s in range(SEEDS):
            ev = json.loads((out / f"seed{s}/eval/{name}.json").read_text())
            assert len(ev["rows"]) == res["settings"]["n_eval"]
            per_problem = [sum(r["correct"]) / ev["k"] for r in ev["rows"]]
            per_seed.append(sum(per_problem) / len(per_problem))
            assert 0.0 <= per_seed[-1] <= 1.0
        assert a["values"] == pytest.approx(per_seed)
        mean = sum(per_seed) / SEEDS
        sd = math.sqrt(sum((v - mean) ** 2 for v in per_seed) / (SEEDS - 1))
        assert a["ci95"] == pytest.approx(12.706 * sd / math.sqrt(SEEDS))


def _selected(out: Path, seed: int, arm: str) -> list[dict]:
    text = (out / f"seed{seed}/{arm}/select/selected.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


@pytest.mark.slow
def test_equal_budgets_same_prompts_and_das_rule(reduced_run):
    out, res, _ = reduced_run
    budget = res["settings"]["budget"]
    # every candidate's Teacher-sentence count (a select run that kept them all, beta 0.1)
    counts = {}
    for t in ("t0.6", "t1"):
        for row in (out / f"analysis/{t}/all_beta0.1/selected.jsonl").read_text().splitlines():
            r = json.loads(row)
            counts[t, r["prompt_id"], r["candidate"]] = r["n_teacher"]
    # every candidate's length in student tokens (the score stage's output)
    lengths = {}
    for t in ("t0.6", "t1"):
        for part in sorted((out / f"pool/score_{t}/score").glob("part-*.jsonl")):
            for row in part.read_text().splitlines():
                r = json.loads(row)
                lengths[t, r["prompt_id"], r["candidate"]] = len(r["student"]["token_ids"])
    subsets = []
    for s in range(SEEDS):
        for t, rs, das in (("t0.6", "rs_t0.6", "das_t0.6"), ("t1", "rs_t1.0", "das_t1.0")):
            a, b = _selected(out, s, rs), _selected(out, s, das)
            assert len(a) == len(b) == budget
            assert {r["prompt_id"] for r in a} == {r["prompt_id"] for r in b}
            for r in b:  # DAS kept a candidate with the most Teacher sentences
                best = max(n for (tt, p, _), n in counts.items() if tt == t and p == r["prompt_id"])
                assert r["n_teacher"] == best
            # the length control keeps the same prompts and each prompt's longest candidate
            c = _selected(out, s, f"longest_{rs.split('_')[1]}")
            assert {r["prompt_id"] for r in c} == {r["prompt_id"] for r in a}
            for r in c:
                assert lengths[t, r["prompt_id"], r["candidate"]] == max(
                    n for (tt, p, _), n in lengths.items() if tt == t and p == r["prompt_id"]
                )
        assert len(_selected(out, s, "rs_t1.0_2x")) == 2 * budget
        subsets.append({r["prompt_id"] for r in _selected(out, s, "rs_t0.6")})
        sel = res["selection"]["rs_t0.6"]["per_seed"][s]
        assert sel["selected"] == budget and 0.0 <= sel["correct"] <= 1.0
    assert subsets[0] != subsets[1]  # seeds differ (prompt subsets)


@pytest.mark.slow
def test_schedule_continues_stage1_and_seeds_train_differently(reduced_run):
    out, _, _ = reduced_run
    final = json.loads((out / "seed0/das_t0.6_then_t1.0/stage2/final.json").read_text())
    assert final["stage"] == 2 and final["step"] == 2
    cfg = (out / "seed0/das_t0.6_then_t1.0/stage2/config.yaml").read_text()
    assert str(out / "seed0/das_t0.6/stage1") in cfg
    assert str(out / "seed0/das_t1.0/select") in cfg

    def hashes(seed):
        text = (out / f"seed{seed}/rs_t0.6/stage1/metrics.jsonl").read_text()
        return [json.loads(x).get("data_hash") for x in text.splitlines() if "data_hash" in x]

    assert hashes(0) and hashes(0) != hashes(1)


@pytest.mark.slow
def test_rerun_resumes_with_the_same_numbers(reduced_run):
    _, first, second = reduced_run
    for name in first["avg@k"]:
        assert second["avg@k"][name]["values"] == first["avg@k"][name]["values"]
    # nothing was recomputed: the models, samples and arms were all reused
    assert second["timings_s"]["total"] < first["timings_s"]["total"]
    assert second["selection"] == first["selection"]


# --------------------------------------------------------------------------- decoupled variant


@pytest.fixture(scope="module")
def decoupled_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("decoupled")
    _run(out, "--task", "decoupled")
    return out / "run", json.loads((out / "run/results.json").read_text())


def _pool(out: Path) -> dict:
    """(prompt, candidate) -> Teacher count, student tokens, ratio, correct, from the
    all-candidates select run and the score stage's files."""
    rows = {}
    for line in (out / "analysis/t1/all_beta0.1/selected.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows[r["prompt_id"], r["candidate"]] = dict(r)
    for part in sorted((out / "pool/score_t1/score").glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            c = json.loads(line)
            key = c["prompt_id"], c["candidate"]
            if key in rows:
                rows[key]["tokens"] = len(c["student"]["token_ids"])
                rows[key]["correct"] = task.exact_match(c["response"], c["reference_answer"])
    return rows


@pytest.mark.slow
def test_decoupled_arms_follow_their_rules_at_equal_budgets(decoupled_run):
    out, res = decoupled_run
    arms = ("rs_t1.0", "longest_t1.0", "das_t1.0", "das_ratio_t1.0", "das_for_length_t1.0")
    assert set(res["avg@k"]) == {"base", *arms}
    assert res["task"] == "decoupled" and "recap" in res["styles"]
    pool = _pool(out)
    # the length-matched rule's slope, by hand: least squares of Teacher count on tokens
    xs = [v["tokens"] for v in pool.values()]
    ys = [v["n_teacher"] for v in pool.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    score = {
        "longest_t1.0": lambda v: v["tokens"],
        "das_t1.0": lambda v: v["n_teacher"],
        "das_ratio_t1.0": lambda v: v["teacher_ratio"],
        "das_for_length_t1.0": lambda v: v["n_teacher"] - slope * v["tokens"],
    }
    for s in range(SEEDS):
        picks = {a: _selected(out, s, a) for a in arms}
        prompts = {a: {r["prompt_id"] for r in p} for a, p in picks.items()}
        assert all(len(p) == res["settings"]["budget"] for p in picks.values())
        assert len({frozenset(p) for p in prompts.values()}) == 1  # the same prompts
        for arm, key in score.items():
            for r in picks[arm]:
                mine = key(pool[r["prompt_id"], r["candidate"]])
                best = max(key(v) for (p, _), v in pool.items() if p == r["prompt_id"])
                assert mine == pytest.approx(best), (arm, r)
    for k in ("das_t1.0 - longest_t1.0", "das_for_length_t1.0 - longest_t1.0"):
        assert res["paired"][k]["n"] == SEEDS
    assert 0.0 <= res["agreement"]["longest_t1.0 = das_t1.0"] <= 1.0
    text = (out / "report.md").read_text()
    assert "Every arm at the same budget" in text and "Table 3" not in text


@pytest.mark.slow
def test_decoupled_figure6_table_matches_the_candidates(decoupled_run):
    out, res = decoupled_run
    f6 = res["analysis"]["t1"]["figure6"]
    assert f6["source"] == "bench.replication.task:exact_match"
    # the select stage's table equals the one recomputed from its kept candidates
    check = res["analysis"]["t1"]["figure6_check"]
    for name in ("correct", "incorrect"):
        assert f6["groups"][name]["candidates"] == check[name]["candidates"]
        for kind in ("teacher", "student", "shared"):
            if check[name]["candidates"]:
                assert f6["groups"][name]["mean"][kind] == pytest.approx(check[name]["mean"][kind])
                assert f6["groups"][name]["share"][kind] == pytest.approx(
                    check[name]["share"][kind]
                )
    pool = _pool(out)
    assert check["correct"]["candidates"] == sum(bool(v["correct"]) for v in pool.values())
    assert "cf. paper Figure 6" in (out / "report.md").read_text()
