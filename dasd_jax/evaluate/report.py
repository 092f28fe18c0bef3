"""The evaluate stage's human report: a checkpoints x benchmarks table and a plot.

Consumes the stage's `results.json` content (`table[checkpoint][benchmark]` with avg@k,
stderr, pass@k, mean length, truncation rate, samples not judged); produces `report.md` (avg@k
in percent with its standard error, as in the paper's ablation table, a warning under it for
every pair with samples not judged, then pass@k, lengths and truncation) and `avg_at_k.png`
(avg@k per checkpoint, one bar per benchmark, +-1 standard error; matplotlib Agg, no screen).
Both are written atomically. `not_judged_note` is the one wording of that warning (also in
summary.json and the log).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dasd_jax.records import atomic_write

PLOT = "avg_at_k.png"
# what results.json's table holds per pair (a summary.json written before a key existed: None)
TABLE_KEYS = (
    "avg@k",
    "stderr",
    "pass@k",
    "mean_length",
    "truncation_rate",
    "problems",
    "samples",
    "not_judged",
    "timeouts",
    "judge_errors",
    "avg@k_upper",
)


def _pct(x: float | None, err: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" + ("" if err is None else f" ± {100 * err:.1f}")


def not_judged_note(s: dict) -> str | None:
    """Why a pair's avg@k is a lower bound, when some of its samples were not judged."""
    n = s.get("not_judged") or 0
    if not n:
        return None
    timeouts = s.get("timeouts") or 0
    errors = sum((s.get("judge_errors") or {}).values()) - timeouts
    upper = "" if s.get("avg@k_upper") is None else f", at most {_pct(s['avg@k_upper'])}%"
    return (
        f"{n} of {s.get('samples', '?')} samples not judged ({timeouts} timeouts, {errors} "
        f"scorer errors, {n - timeouts - errors} the scorer could not judge), counted as not "
        f"correct: avg@k {_pct(s['avg@k'])}% is a lower bound{upper} if all were correct"
    )


def markdown(results: dict, images: list[str]) -> str:
    table, k = results["table"], results["k"]
    benches = list(results["benchmarks"])
    head = "| checkpoint | " + " | ".join(benches) + " |"
    rule = "|---|" + "---:|" * len(benches)
    lines = [
        "# Evaluation",
        "",
        f"avg@{k} (%, ± standard error across problems): {k} samples per problem at "
        f"temperature {results['temperature']}, top-p {results['top_p']}, at most "
        f"{results['max_tokens']} tokens; scorer `{results['scorer']}`.",
        "",
        head,
        rule,
    ]
    notes = []
    for ck, row in table.items():
        cells = [_pct(row[b]["avg@k"], row[b]["stderr"]) for b in benches]
        for j, b in enumerate(benches):
            if note := not_judged_note(row[b]):
                cells[j] += " ⚠"
                notes.append(f"- ⚠ **{ck} / {b}**: {note}.")
        lines.append(f"| {ck} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "**Samples not judged** (timeouts are not wrong answers):", "", *notes]
    lines += ["", "## pass@k (%)", ""]
    for b in benches:
        ks = list(next(iter(table.values()))[b]["pass@k"])
        lines += [
            f"**{b}** ({next(iter(table.values()))[b]['problems']} problems)",
            "",
            "| checkpoint | " + " | ".join(f"pass@{x}" for x in ks) + " |",
            "|---|" + "---:|" * len(ks),
        ]
        for ck, row in table.items():
            lines.append(f"| {ck} | " + " | ".join(_pct(row[b]["pass@k"][x]) for x in ks) + " |")
        lines.append("")
    lines += [
        "## Mean length (generated tokens) / truncated at max_tokens (%)",
        "",
        head,
        rule,
    ]
    for ck, row in table.items():
        cells = [
            f"{row[b]['mean_length']:.0f} / {100 * row[b]['truncation_rate']:.1f}" for b in benches
        ]
        lines.append(f"| {ck} | " + " | ".join(cells) + " |")
    lines += ["", *[f"![{Path(img).stem}]({img})" for img in images], ""]
    lines += [
        "Checkpoints: " + ", ".join(f"`{n}` = {p}" for n, p in results["checkpoints"].items()),
        "",
        "Machine-readable: `results.json`; per pair `<checkpoint>/<benchmark>/summary.json` and "
        "`samples.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def plot(out_dir: Path, results: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, benches = results["table"], list(results["benchmarks"])
    cks = list(table)
    x = np.arange(len(cks))
    width = 0.8 / max(len(benches), 1)
    fig, ax = plt.subplots(figsize=(max(4.5, 1.3 * len(cks) * max(1, len(benches) / 2)), 3.4))
    for j, b in enumerate(benches):
        y = [100 * (table[c][b]["avg@k"] or 0.0) for c in cks]
        err = [100 * (table[c][b]["stderr"] or 0.0) for c in cks]
        bars = ax.bar(
            x + (j - (len(benches) - 1) / 2) * width, y, width, yerr=err, capsize=3, label=b
        )
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(x, cks)
    ax.set_ylabel(f"avg@{results['k']} (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    with atomic_write(out_dir / PLOT, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return PLOT


def write_report(out_dir: Path, results: dict) -> list[str]:
    """report.md and the plot; returns the file names."""
    images = [plot(out_dir, results)]
    with atomic_write(out_dir / "report.md") as f:
        f.write(markdown(results, images))
    return ["report.md", *images]
