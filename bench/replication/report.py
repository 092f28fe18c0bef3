"""Statistics, tables and plots of the miniature replication.

Consumes what `run.py` produced (evaluation rows per seed and arm, the select stage's
`selected.jsonl` / `summary.json`, the teacher's scored candidates); produces the `results.json`
content, `report.md` (tables shaped like the paper's Tables 3 and 7 with mean and 95% CI over
seeds, paired differences, selection statistics) and `plots/*.png`.

Statistics: avg@k of one run = mean over problems of (correct samples / k). Over seeds: mean and
a 95% confidence interval from Student's t with n-1 degrees of freedom (n = seeds). DAS and
random at one temperature share each seed's prompt subset, training order and evaluation
random numbers, so their per-seed difference is paired: its mean and t interval are reported
too. With few seeds the intervals are wide; they say how much the numbers can be trusted.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from bench.replication import task

# two-sided 95% quantiles of Student's t, df = 1..30 (beyond: 1.96)
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def mean_ci(values) -> dict:
    """{mean, ci95 (half-width; None for one value), n, values}."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0, "values": []}
    m = float(np.mean(v))
    if n == 1:
        return {"mean": m, "ci95": None, "n": 1, "values": v}
    t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
    return {"mean": m, "ci95": float(t * np.std(v, ddof=1) / math.sqrt(n)), "n": n, "values": v}


def eval_summary(rows: list[dict], k: int) -> dict:
    """avg@k, its standard error over problems, pass@k (any of k correct), output styles; the
    accuracy metrics are the evaluate stage's (`dasd_jax.evaluate.metrics`)."""
    from dasd_jax.evaluate.metrics import aggregate

    acc = aggregate([k] * len(rows), [sum(r["correct"]) for r in rows], [k])
    styles = Counter(s for r in rows for s in r["styles"])
    n = sum(styles.values())
    return {
        "avg@k": acc["avg"],
        "stderr": acc["stderr"],
        "pass@k": acc["pass@k"][k],
        "k": k,
        "problems": len(rows),
        "styles": {s: c / n for s, c in sorted(styles.items())},
        "mean_tokens": float(np.mean([t for r in rows for t in r["tokens"]])),
        "truncation_rate": float(np.mean([t for r in rows for t in r["truncated"]])),
    }


# --------------------------------------------------------------------------- candidates


def output_stats(rows: list[dict]) -> dict:
    """Per output style of the evaluation samples (pooled over problems and seeds): the share
    of samples in that style and the share of those that are correct."""
    by: dict[str, list[bool]] = {}
    for r in rows:
        for style, ok in zip(r["styles"], r["correct"], strict=True):
            by.setdefault(style, []).append(bool(ok))
    n = max(sum(len(v) for v in by.values()), 1)
    return {
        style: {"share": len(v) / n, "correct": float(np.mean(v))}
        for style, v in sorted(by.items())
    }


def candidate_index(scored_dir: Path) -> dict[tuple[str, int], dict]:
    """(prompt id, candidate) -> style, correct, student tokens, sentences, of every scored
    candidate (the score stage's part files)."""
    from dasd_jax.select.sentences import split_sentences

    out = {}
    for part in sorted(scored_dir.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            c = json.loads(line)
            gold = c.get("reference_answer")
            out[c["prompt_id"], int(c["candidate"])] = {
                "style": task.detect_style(c["response"]),
                "correct": gold is not None and task.exact_match(c["response"], gold) is True,
                "student_tokens": len((c.get("student") or {}).get("token_ids") or []),
                "teacher_tokens": len((c.get("teacher") or {}).get("token_ids") or []),
                "sentences": len(split_sentences(c["response"])),
                "finish_reason": c.get("finish_reason"),
            }
    return out


def pool_stats(index: dict) -> dict:
    vals = list(index.values())
    styles = Counter(v["style"] for v in vals)
    return {
        "candidates": len(vals),
        "correct": float(np.mean([v["correct"] for v in vals])) if vals else None,
        "styles": {s: c / len(vals) for s, c in sorted(styles.items())},
        "correct_by_style": {
            s: float(np.mean([v["correct"] for v in vals if v["style"] == s])) for s in styles
        },
        "mean_student_tokens": float(np.mean([v["student_tokens"] for v in vals])),
        "truncated": float(np.mean([v["finish_reason"] == "length" for v in vals])),
    }


def read_selected(folder: Path) -> list[dict]:
    path = folder / "selected.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def selection_stats(folder: Path, index: dict) -> dict:
    """What a select run kept: how many, how often right, in which styles, how long, and its
    sentence types (the stage's own counts)."""
    sel = read_selected(folder)
    info = [index[s["prompt_id"], int(s["candidate"])] for s in sel]
    styles = Counter(i["style"] for i in info)
    n = max(len(sel), 1)
    kinds = {
        k: int(sum(s.get(f"n_{k}", 0) or 0 for s in sel))
        for k in ("teacher", "student", "shared", "unscored")
    }
    total = max(sum(kinds.values()) - kinds["unscored"], 1)
    return {
        "selected": len(sel),
        "prompts": len({s["prompt_id"] for s in sel}),
        "correct": float(np.mean([i["correct"] for i in info])) if info else None,
        "styles": {s: c / n for s, c in sorted(styles.items())},
        "mean_student_tokens": float(np.mean([i["student_tokens"] for i in info])) if info else 0,
        "student_tokens": int(sum(i["student_tokens"] for i in info)),
        "sentence_kinds": kinds,
        "sentence_fractions": {k: kinds[k] / total for k in ("teacher", "student", "shared")},
    }


def kinds_by_style(folder: Path, index: dict) -> dict:
    """Mean Teacher / Student / Shared sentences per candidate, by style (a select run that
    kept every candidate)."""
    acc: dict[str, list] = {}
    for s in read_selected(folder):
        style = index[s["prompt_id"], int(s["candidate"])]["style"]
        acc.setdefault(style, []).append([s.get(f"n_{k}", 0) or 0 for k in KINDS])
    return {
        style: {"candidates": len(v), **dict(zip(KINDS, np.mean(v, axis=0).tolist(), strict=True))}
        for style, v in sorted(acc.items())
    }


KINDS = ("teacher", "student", "shared")
POSITIONS = ("line 1", "line 2", "line 3+", "answer")


def sentence_probabilities(scored_dir: Path, betas) -> dict:
    """Per (style, position) of the counted sentences of every scored candidate: how many,
    mean p_T and p_S (geometric-mean token probabilities, `das.score_response`), and the
    share classified Teacher / Student at each beta. Position: the line of the thinking part
    (1, 2, 3 or later) or the answer sentence."""
    from dasd_jax.select import das

    acc: dict[tuple[str, str], list] = {}
    for part in sorted(scored_dir.glob("part-*.jsonl")):
        for line in part.read_text().splitlines():
            c = json.loads(line)
            t, s = c.get("teacher") or {}, c.get("student") or {}
            if not t.get("offsets") or not s.get("offsets"):
                continue
            text = c["response"]
            r = das.score_response(text, t["offsets"], t["logprobs"], s["offsets"], s["logprobs"])
            style = task.detect_style(text)
            close = text.find("</think>")
            n_line = 0
            for (a, _), pt, ps, counted in zip(
                r.spans, r.p_teacher, r.p_student, r.counted, strict=True
            ):
                if not counted or math.isnan(pt) or math.isnan(ps):
                    continue
                if 0 <= close <= a:
                    where = "answer"
                else:
                    n_line += 1
                    where = f"line {n_line}" if n_line < 3 else "line 3+"
                acc.setdefault((style, where), []).append((pt, ps))
    out: dict = {}
    for (style, where), v in sorted(acc.items()):
        a = np.asarray(v)
        d = a[:, 0] - a[:, 1]
        out.setdefault(style, {})[where] = {
            "sentences": len(a),
            "p_teacher": float(a[:, 0].mean()),
            "p_student": float(a[:, 1].mean()),
            "teacher_share": {f"{b:g}": float(np.mean(d > b + 1e-9)) for b in betas},
            "student_share": {f"{b:g}": float(np.mean(-d > b + 1e-9)) for b in betas},
        }
    return out


# --------------------------------------------------------------------------- results


def by_correctness(folder: Path, index: dict) -> dict:
    """Mean Teacher / Student / Shared sentences per candidate and their shares, in correct vs
    incorrect candidates (exact match), from a select run that kept every candidate: the
    paper's Figure 6, computed here independently of the select stage's own table."""
    groups: dict[str, list] = {"correct": [], "incorrect": []}
    for s in read_selected(folder):
        ok = index[s["prompt_id"], int(s["candidate"])]["correct"]
        groups["correct" if ok else "incorrect"].append([s.get(f"n_{k}", 0) or 0 for k in KINDS])
    out = {}
    for name, v in groups.items():
        a = np.asarray(v, float).reshape(-1, len(KINDS))
        total = max(a.sum(), 1.0)
        out[name] = {
            "candidates": len(v),
            "mean": {k: float(a[:, j].mean()) if len(v) else None for j, k in enumerate(KINDS)},
            "share": {k: float(a[:, j].sum() / total) for j, k in enumerate(KINDS)},
        }
    return out


def agreement(out: Path, seeds, arms) -> dict:
    """Per pair of single-stage arms at one temperature and budget: the share of prompts on
    which both kept the same candidate (mean over seeds). Near 1, two rules are one rule here."""
    single = [a for a in arms if a.after is None]
    picks = {
        (s, a.name): {
            r["prompt_id"]: r["candidate"]
            for r in read_selected(out / f"seed{s}" / a.name / "select")
        }
        for s in seeds
        for a in single
    }
    res = {}
    for i, a in enumerate(single):
        for b in single[i + 1 :]:
            if (a.temperature, a.budget_x) != (b.temperature, b.budget_x):
                continue
            same = []
            for s in seeds:
                pa, pb = picks[s, a.name], picks[s, b.name]
                same.append(np.mean([pa[k] == pb.get(k) for k in pa]) if pa else 0.0)
            res[f"{a.name} = {b.name}"] = float(np.mean(same))
    return res


def build(
    out, p, preset_name, v, arms, pairs, sets, model_info, evals, teacher_eval, selections
):  # fmt: skip
    """Every number of the report, as one JSON-able dict. v: the task variant; pairs: the
    (a, b) arms whose per-seed difference a - b is reported."""
    from bench.replication.run import tdir

    seeds = sorted(evals)
    temps = v.temperatures
    index = {tdir(t): candidate_index(out / "pool" / f"score_{tdir(t)}" / "score") for t in temps}
    res: dict = {
        "task": v.name,
        "styles": list(v.teacher_styles),
        "student_styles": list(v.student_styles),
        "preset": preset_name,
        "seeds": seeds,
        "settings": json.loads(json.dumps(p.__dict__)),
        "models": {
            name: {k: info[k] for k in ("params", "vocab_size", "examples", "seconds", "losses")}
            for name, info in model_info.items()
        },
        "teacher_eval": {k: v for k, v in teacher_eval.items() if k != "rows"},
        "pool": {name: pool_stats(ix) for name, ix in index.items()},
    }
    # avg@k per arm over seeds
    names = ["base"] + [a.name for a in arms]
    res["avg@k"] = {n: mean_ci([evals[s][n]["avg@k"] for s in seeds]) for n in names}
    res["eval_details"] = {
        n: {str(s): {k: v for k, v in evals[s][n].items() if k != "rows"} for s in seeds}
        for n in names
    }
    # what the evaluated students write: output styles and accuracy per style, over seeds
    res["outputs"] = {
        n: output_stats([r for s in seeds for r in evals[s][n]["rows"]]) for n in names
    }
    res["outputs"]["teacher"] = output_stats(teacher_eval["rows"])
    # paired differences (same seed: same prompts, order, evaluation random numbers)
    pairs = {f"{a} - {b}": (a, b) for a, b in pairs if {a, b} <= set(names)}
    res["paired"] = {
        k: mean_ci([evals[s][a]["avg@k"] - evals[s][b]["avg@k"] for s in seeds])
        for k, (a, b) in pairs.items()
    }
    # what each arm trained on
    sel: dict = {}
    for a in arms:
        src = a.data_from or a.name
        per_seed = [
            selection_stats(out / f"seed{s}" / src / "select", index[tdir(a.temperature)])
            for s in seeds
        ]
        sel[a.name] = {
            "per_seed": per_seed,
            "selected": mean_ci([x["selected"] for x in per_seed]),
            "correct": mean_ci([x["correct"] for x in per_seed]),
            "mean_student_tokens": mean_ci([x["mean_student_tokens"] for x in per_seed]),
            "styles": _mean_dicts([x["styles"] for x in per_seed]),
            "sentence_fractions": _mean_dicts([x["sentence_fractions"] for x in per_seed]),
        }
        sel[a.name]["train_steps"] = [
            _final_steps(out / f"seed{s}" / a.name / f"stage{a.stage}") for s in seeds
        ]
    res["selection"] = sel
    res["agreement"] = agreement(out, seeds, arms)
    # selection-only analysis: sentence types by style; DAS's pick at each beta
    res["analysis"] = {}
    for name, sels in selections.items():
        res["analysis"][name] = {
            "kinds_by_style": kinds_by_style(sels["all"], index[name]),
            "sentences": sentence_probabilities(out / "pool" / f"score_{name}" / "score", p.betas),
            "beta": {
                f"{b:g}": selection_stats(folder, index[name])
                for b, folder in sels["picks"].items()
            },
            "random_pick_expectation": pool_stats(index[name]),
            # the paper's Figure 6: the select stage's table, and the same recomputed here
            "figure6": json.loads((sels["all"] / "summary.json").read_text()).get("correctness"),
            "figure6_check": by_correctness(sels["all"], index[name]),
        }
    res["tables"] = tables(res, arms)
    res["plots"] = plots(out, res, arms)
    return res


def _mean_dicts(ds: list[dict]) -> dict:
    keys = sorted({k for d in ds for k in d})
    return {k: float(np.mean([d.get(k, 0.0) for d in ds])) for k in keys}


def _final_steps(stage_dir: Path) -> int | None:
    f = stage_dir / "final.json"
    return json.loads(f.read_text()).get("step") if f.exists() else None


# --------------------------------------------------------------------------- tables


def _temp(name: str) -> str:
    """The sample stage's folder name ("t1") as a temperature ("1.0")."""
    return f"{float(name[1:]):.1f}"


def _pct(x: dict) -> str:
    if x["mean"] is None:
        return "-"
    ci = "" if x["ci95"] is None else f" ± {100 * x['ci95']:.1f}"
    return f"{100 * x['mean']:.1f}{ci}"


def _signed(x: dict) -> str:
    if x["mean"] is None:
        return "-"
    ci = "" if x["ci95"] is None else f" ± {100 * x['ci95']:.1f}"
    return f"{100 * x['mean']:+.1f}{ci}"


LABELS = {
    "base": "student before distillation",
    "rs_t0.6": "B RS T=0.6",
    "das_t0.6": "**B DAS T=0.6**",
    "rs_t1.0": "B RS T=1.0",
    "rs_t1.0_2x": "2B RS T=1.0",
    "das_t1.0": "**B DAS T=1.0**",
    "longest_t0.6": "B longest T=0.6 (control)",
    "longest_t1.0": "B longest T=1.0 (control)",
    "das_t0.6_then_t1.0": "B DAS T=0.6, then B DAS T=1.0 (stage 2)",
    "das_ratio_t1.0": "B DAS by ratio T=1.0",
    "das_for_length_t1.0": "B length-matched DAS T=1.0",
}


def tables(res: dict, arms) -> dict:
    b = res["settings"]["budget"]
    k = res["settings"]["k"]
    n = len(res["seeds"])
    acc, sel = res["avg@k"], res["selection"]
    head = (
        f"| data (B = {b} prompts) | avg@{k} (%), mean ± 95% CI, {n} seeds | per seed | "
        "selected correct (%) | student tokens / sample |\n|---|---|---|---|---|\n"
    )

    def row(name):
        s = sel.get(name)
        per = ", ".join(f"{100 * v:.1f}" for v in acc[name]["values"])
        corr = _pct(s["correct"]) if s else "-"
        toks = f"{s['mean_student_tokens']['mean']:.0f}" if s else "-"
        return f"| {LABELS[name]} | {_pct(acc[name])} | {per} | {corr} | {toks} |\n"

    if res.get("task", "arrows") != "arrows":
        arms_table = head + "".join(row(name) for name in ["base", *(a.name for a in arms)])
        t3 = t7 = ""
    else:
        arms_table = ""
        t3, t7 = _arrows_tables(res, row, head)
    return {
        "table3": t3,
        "table7": t7,
        "arms": arms_table,
        **_common_tables(res),
    }


def _arrows_tables(res: dict, row, head: str) -> tuple[str, str]:
    """The first variant's tables, shaped like the paper's Tables 3 and 7."""
    acc, k, n = res["avg@k"], res["settings"]["k"], len(res["seeds"])
    t3 = head + "".join(
        row(n_)
        for n_ in (
            "rs_t0.6",
            "das_t0.6",
            "longest_t0.6",
            "rs_t1.0",
            "rs_t1.0_2x",
            "das_t1.0",
            "longest_t1.0",
        )
        if n_ in acc
    )
    t7 = (
        f"| stage | avg@{k} (%), mean ± 95% CI, {n} seeds | per seed |\n|---|---|---|\n"
        + "".join(
            f"| {lab} | {_pct(acc[nm])} | "
            + ", ".join(f"{100 * v:.1f}" for v in acc[nm]["values"])
            + " |\n"
            for nm, lab in (
                ("base", "student (pre-trained on the related distribution)"),
                ("das_t0.6", "+ low-temperature training (DAS, stage 1)"),
                ("das_t0.6_then_t1.0", "+ high-temperature training (DAS, stage 2)"),
            )
        )
        + f"| for comparison: B DAS T=1.0 without the low-T stage | {_pct(acc['das_t1.0'])} | "
        + ", ".join(f"{100 * v:.1f}" for v in acc["das_t1.0"]["values"])
        + " |\n"
        + f"| for comparison: 2B RS T=1.0 (same sample count as the schedule) | "
        f"{_pct(acc['rs_t1.0_2x'])} | "
        + ", ".join(f"{100 * v:.1f}" for v in acc["rs_t1.0_2x"]["values"])
        + " |\n"
    )
    return t3, t7


def _figure6(f6: dict | None) -> str:
    """The select stage's own Figure 6 table (`select.report.correctness_markdown`), without
    its heading (this report has its own)."""
    from dasd_jax.select.report import correctness_markdown

    lines = correctness_markdown(f6)[2:]
    return "\n".join(lines) + "\n" if lines else "(no candidate judged)\n"


def _common_tables(res: dict) -> dict:
    """The tables every variant reports."""
    sel = res["selection"]
    paired = "| difference (same seeds) | avg@k points, mean ± 95% CI |\n|---|---|\n" + "".join(
        f"| {k_} | {_signed(v)} |\n" for k_, v in res["paired"].items()
    )
    styles = sorted({s for a in sel.values() for s in a["styles"]})
    sel_tab = (
        "| arm | "
        + " | ".join(f"{s} (%)" for s in styles)
        + " | Teacher / Student / Shared sentences (%) | correct (%) |\n|---|"
        + "---|" * (len(styles) + 2)
        + "\n"
    )
    for name, s in sel.items():
        f = s["sentence_fractions"]
        sel_tab += (
            f"| {name} | "
            + " | ".join(f"{100 * s['styles'].get(st, 0):.0f}" for st in styles)
            + f" | {100 * f.get('teacher', 0):.0f} / {100 * f.get('student', 0):.0f} / "
            f"{100 * f.get('shared', 0):.0f} | {_pct(s['correct'])} |\n"
        )
    out_styles = [*res.get("styles", task.STYLES), "other"]
    outputs = (
        "| model | "
        + " | ".join(f"{st}: share / correct (%)" for st in out_styles)
        + " |\n|---|"
        + "---|" * len(out_styles)
        + "\n"
    )
    for name, per in res["outputs"].items():
        cells = [
            f"{100 * per[st]['share']:.0f} / {100 * per[st]['correct']:.0f}" if st in per else "-"
            for st in out_styles
        ]
        outputs += f"| {name} | " + " | ".join(cells) + " |\n"
    kinds = ""
    beta = ""
    probs = ""
    figure6 = ""
    betas = [f"{b:g}" for b in res["settings"]["betas"]]
    for t, a in res["analysis"].items():
        probs += f"\nT = {_temp(t)}:\n\n| style | position | sentences | mean p_T | mean p_S | "
        probs += " | ".join(f"Teacher at beta {b} (%)" for b in betas) + " |\n|---|---|---|---|---|"
        probs += "---|" * len(betas) + "\n"
        for style, per in a["sentences"].items():
            for where in POSITIONS:
                if where not in per:
                    continue
                v = per[where]
                probs += (
                    f"| {style} | {where} | {v['sentences']} | {v['p_teacher']:.3f} | "
                    f"{v['p_student']:.3f} | "
                    + " | ".join(f"{100 * v['teacher_share'][b]:.0f}" for b in betas)
                    + " |\n"
                )
        kinds += f"\nT = {_temp(t)}:\n\n| style | candidates | Teacher | Student | Shared |\n"
        kinds += "|---|---|---|---|---|\n"
        for style, v in a["kinds_by_style"].items():
            kinds += (
                f"| {style} | {v['candidates']} | {v['teacher']:.2f} | {v['student']:.2f} | "
                f"{v['shared']:.2f} |\n"
            )
        figure6 += f"\nT = {_temp(t)}:\n\n" + _figure6(a.get("figure6"))
        pool = a["random_pick_expectation"]
        beta += f"\nT = {_temp(t)} (all {pool['candidates']} candidates: "
        beta += f"{100 * pool['correct']:.1f}% correct):\n\n"
        beta += "| beta | kept | correct (%) | " + " | ".join(f"{s} (%)" for s in styles)
        beta += " | Teacher sentences (%) |\n|---|---|---|" + "---|" * (len(styles) + 1) + "\n"
        for bname, v in a["beta"].items():
            beta += (
                f"| {bname} | {v['selected']} | {100 * (v['correct'] or 0):.1f} | "
                + " | ".join(f"{100 * v['styles'].get(st, 0):.0f}" for st in styles)
                + f" | {100 * v['sentence_fractions']['teacher']:.0f} |\n"
            )
    agree = "| arms | prompts where both kept the same candidate (%) |\n|---|---|\n" + "".join(
        f"| {k} | {100 * v:.0f} |\n" for k, v in res.get("agreement", {}).items()
    )
    return {
        "paired": paired,
        "agreement": agree,
        "figure6": figure6,
        "selection": sel_tab,
        "outputs": outputs,
        "kinds_by_style": kinds,
        "beta": beta,
        "sentence_probabilities": probs,
    }


def write_markdown(out: Path, res: dict) -> Path:
    t = res["tables"]
    te = res["teacher_eval"]
    pool = res["pool"]
    if res.get("task", "arrows") == "arrows":
        main = [
            "## DAS vs random at the same budget (cf. paper Table 3)",
            "",
            t["table3"],
            "## Temperature schedule (cf. paper Table 7 and Table 1's cold start)",
            "",
            t["table7"],
        ]
    else:
        main = ["## Every arm at the same budget", "", t["arms"]]
    lines = [
        f"# Miniature replication, `{res.get('task', 'arrows')}` task ({res['preset']} preset, "
        f"seeds {res['seeds']})",
        "",
        f"Command: `{res.get('command', '')}`; wall time {res.get('timings_s', {})} s.",
        "",
        f"Teacher avg@{te['k']} on the held-out set at T=1.0: {100 * te['avg@k']:.1f}%. "
        + "Teacher candidates correct: "
        + ", ".join(f"T={_temp(name)}: {100 * v['correct']:.1f}%" for name, v in pool.items())
        + ".",
        "",
        *main,
        "## Paired differences",
        "",
        t["paired"],
        "## How often two rules keep the same candidate (mean over seeds)",
        "",
        t["agreement"],
        "## What each arm trained on (mean over seeds)",
        "",
        t["selection"],
        "## What the evaluated models write (all seeds, all samples)",
        "",
        t["outputs"],
        "## Sentence types per candidate, by style (beta = 0.1)",
        t["kinds_by_style"],
        "## Sentence types in correct vs incorrect candidates (cf. paper Figure 6)",
        t["figure6"],
        "## Sentence probabilities by style and position (all candidates)",
        t["sentence_probabilities"],
        "## DAS's pick at several beta (all prompts, one per prompt)",
        t["beta"],
        "## Plots",
        "",
        *[f"![{Path(x).stem}]({x})" for x in res["plots"]],
        "",
    ]
    path = out / "report.md"
    from dasd_jax.records import atomic_write

    with atomic_write(path) as f:
        f.write("\n".join(lines))
    return path


# --------------------------------------------------------------------------- plots


def plots(out: Path, res: dict, arms) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = out / "plots"
    d.mkdir(parents=True, exist_ok=True)
    files = []

    # 1. avg@k per arm: mean, 95% CI, seeds
    names = ["base"] + [a.name for a in arms]
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, n in enumerate(names):
        a = res["avg@k"][n]
        ax.bar(i, 100 * a["mean"], color="tab:orange" if n.startswith("das") else "tab:blue")
        if a["ci95"] is not None:
            ax.errorbar(i, 100 * a["mean"], yerr=100 * a["ci95"], color="k", capsize=4)
        ax.scatter([i] * len(a["values"]), [100 * v for v in a["values"]], color="k", s=10)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(f"avg@{res['settings']['k']} (%)")
    ax.set_title("held-out accuracy per arm (bars: mean, lines: 95% CI, dots: seeds)")
    fig.tight_layout()
    files.append(_save(fig, d / "avg_at_k.png", out))

    # 2. styles of the selected data per arm
    sel = res["selection"]
    styles = sorted({s for a in sel.values() for s in a["styles"]})
    fig, ax = plt.subplots(figsize=(9, 4))
    bottom = np.zeros(len(sel))
    for st in styles:
        v = np.array([100 * a["styles"].get(st, 0) for a in sel.values()])
        ax.bar(range(len(sel)), v, bottom=bottom, label=st)
        bottom += v
    ax.set_xticks(range(len(sel)), list(sel), rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("% of selected samples")
    ax.set_title("CoT styles of each arm's training data")
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, d / "selected_styles.png", out))

    # 3. sentence types per candidate by style, 4. beta sweep
    an = res["analysis"]
    fig, axes = plt.subplots(1, len(an), figsize=(5 * len(an), 4), squeeze=False)
    for ax, (t, a) in zip(axes[0], an.items(), strict=True):
        kb = a["kinds_by_style"]
        x = np.arange(len(kb))
        for j, kind in enumerate(KINDS):
            ax.bar(x + 0.25 * (j - 1), [v[kind] for v in kb.values()], 0.25, label=kind)
        ax.set_xticks(x, list(kb))
        ax.set_title(f"sentences per candidate, T={_temp(t)} (beta 0.1)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(_save(fig, d / "sentence_types_by_style.png", out))

    fig, axes = plt.subplots(1, len(an), figsize=(5 * len(an), 4), squeeze=False)
    for ax, (t, a) in zip(axes[0], an.items(), strict=True):
        betas = list(a["beta"])
        x = [float(b) for b in betas]
        for st in styles:
            ax.plot(x, [100 * a["beta"][b]["styles"].get(st, 0) for b in betas], "o-", label=st)
        ax.plot(x, [100 * (a["beta"][b]["correct"] or 0) for b in betas], "k--", label="correct")
        ax.axhline(100 * a["random_pick_expectation"]["correct"], color="gray", lw=0.8)
        ax.set_xlabel("beta")
        ax.set_ylabel("% of DAS picks")
        ax.set_title(f"DAS picks vs beta, T={_temp(t)} (gray: all candidates correct)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, d / "beta.png", out))
    # 5. the select stage's own Figure 6 plot (correct vs incorrect candidates)
    for t in an:
        f6 = out / "analysis" / t / "all_beta0.1" / "plots" / "correctness.png"
        if f6.exists():
            files.append(str(f6.relative_to(out)))
    return files


def _save(fig, path: Path, out: Path) -> str:
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return str(path.relative_to(out))
