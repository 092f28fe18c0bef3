"""The select stage's human report: Markdown tables and PNG plots (matplotlib, no screen).

Consumes the stage's summary (counts per domain and temperature, per-filter drops,
sentence-type counts), its per-candidate records and the sentence reservoir; produces
`report.md` and `plots/`:
- `das_scores.png`: histograms of Teacher-sentence count and ratio, all scored vs selected;
- `sentence_types.png`: sentence-type shares per domain @ temperature;
- `filters.png`: candidates dropped per filter reason;
- `scatter.png`: teacher vs student sentence probability (a seeded sample of sentences),
  coloured by type, with the p_T - p_S = +-beta lines;
- `correctness.png` (when candidates were judged): Teacher / Student / Shared sentences in
  correct vs incorrect candidates, mean count per candidate and share (the paper's Figure 6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dasd_jax import storage
from dasd_jax.records import atomic_write

_COLORS = {1: "tab:red", 2: "tab:blue", 0: "tab:gray"}
_LABELS = {1: "Teacher", 2: "Student", 0: "Shared"}
_KINDS = (("teacher", "Teacher", "tab:red"), ("student", "Student", "tab:blue"),
          ("shared", "Shared", "tab:gray"))  # fmt: skip
FIGURE6 = "## Sentence types in correct vs incorrect candidates (paper Figure 6)"


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plots(out_dir: str | Path, summary: dict, seen: list, kept: dict, acc) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = storage.join(out_dir, "plots")  # local or gs://
    storage.makedirs(pdir)
    made = []

    scored = [s for s in seen if s.stats is not None]
    sel = [s for s in scored if (s.prompt_id, s.index) in kept]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, attr, title in (
        (axes[0], "n_teacher", "Teacher sentences per response"),
        (axes[1], "teacher_ratio", "Teacher-sentence ratio"),
    ):
        a = [getattr(s.stats, attr) for s in scored]
        b = [getattr(s.stats, attr) for s in sel]
        bins = np.histogram_bin_edges(a or [0], bins=20)
        ax.hist(a, bins=bins, alpha=0.5, label=f"all scored ({len(a)})")
        ax.hist(b, bins=bins, alpha=0.7, label=f"selected ({len(b)})")
        ax.set_title(title)
        ax.legend(fontsize=8)
    _save(fig, storage.join(pdir, "das_scores.png"))
    made.append("plots/das_scores.png")

    groups = summary["sentences"]["by_domain_temperature"]
    if groups:
        names = list(groups)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 3.5))
        bottom = np.zeros(len(names))
        for kind in ("teacher", "shared", "student", "unscored"):
            counts = np.array([groups[g].get(kind, 0) for g in names], float)
            totals = np.array([max(sum(groups[g].values()), 1) for g in names], float)
            ax.bar(names, counts / totals, bottom=bottom, label=kind)
            bottom += counts / totals
        ax.set_ylabel("share of sentences")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", rotation=30)
        _save(fig, storage.join(pdir, "sentence_types.png"))
        made.append("plots/sentence_types.png")

    drops = {k: v for k, v in summary["filters"].items() if k not in ("kept", "rejected", "total")}
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(drops) + 2), 3.2))
    ax.bar(list(drops) or ["(none)"], list(drops.values()) or [0])
    ax.set_ylabel("candidates")
    ax.set_title("dropped per filter reason")
    ax.tick_params(axis="x", rotation=30)
    _save(fig, storage.join(pdir, "filters.png"))
    made.append("plots/filters.png")

    if acc.scatter:
        pts = np.array(acc.scatter)
        beta = summary["config"]["select"]["beta"]
        fig, ax = plt.subplots(figsize=(4.6, 4.4))
        for kind in (0, 2, 1):
            m = pts[:, 2] == kind
            ax.scatter(
                pts[m, 1],
                pts[m, 0],
                s=4,
                alpha=0.5,
                c=_COLORS[kind],
                label=f"{_LABELS[kind]} ({int(m.sum())})",
            )
        x = np.linspace(0, 1, 2)
        ax.plot(x, x + beta, "k--", lw=0.7)
        ax.plot(x, x - beta, "k--", lw=0.7)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("student sentence probability p_S")
        ax.set_ylabel("teacher sentence probability p_T")
        ax.legend(fontsize=7, markerscale=3)
        _save(fig, storage.join(pdir, "scatter.png"))
        made.append("plots/scatter.png")
    if _judged(summary.get("correctness")):
        made.append(_plot_correctness(pdir, summary["correctness"]))
    else:  # a previous run's figure would tell of other candidates
        storage.unlink(storage.join(pdir, "correctness.png"))
    return made


def _judged(table: dict | None) -> bool:
    return bool(table) and any(g["candidates"] for g in table["groups"].values())


def _plot_correctness(pdir: str, table: dict) -> str:
    """Figure 6: grouped bars per sentence type, correct vs incorrect; count and share."""
    import matplotlib.pyplot as plt

    groups = table["groups"]
    names = ["correct", "incorrect"]  # an empty group shows as such: no bars
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    x = np.arange(len(names))
    width = 0.26
    for ax, stat, title in (
        (axes[0], "mean", "sentences per candidate"),
        (axes[1], "share", "share of counted sentences"),
    ):
        for j, (kind, label, color) in enumerate(_KINDS):
            vals = [groups[g][stat][kind] for g in names]
            heights = [np.nan if v is None else v for v in vals]
            bars = ax.bar(x + (j - 1) * width, heights, width, label=label, color=color)
            digits = 2 if stat == "share" else 1
            labels = ["" if v is None else f"{v:.{digits}f}" for v in vals]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=1)
        ax.set_xticks(x, [f"{g}\n({_n(groups[g]['candidates'], 'candidate')})" for g in names])
        ax.set_xlim(-0.6, len(names) - 0.4)  # an empty group's bars do not extend it
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    axes[1].set_ylim(0, 1.1)
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.22), ncol=3)
    fig.suptitle(f"Sentence types in correct vs incorrect candidates (judged by {table['source']})")
    fig.tight_layout()
    _save(fig, storage.join(pdir, "correctness.png"))
    return "plots/correctness.png"


def timeout_note(filter_counts: dict[str, int]) -> str | None:
    """The warning for candidates whose answer check ran out of time (None if there are none)."""
    n = filter_counts.get("answer_timeout", 0)
    if not n:
        return None
    return (
        f"{n} candidates were dropped as `answer_timeout`: their answer check (math-verify, "
        "its own time limits included) did not finish, so they were not judged, not found "
        "wrong; raise `filters.answer_timeout_s` to judge them"
    )


def _n(k: int, what: str) -> str:
    return f"{k} {what}" + ("" if k == 1 else "s")


def _fmt(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def correctness_markdown(table: dict | None) -> list[str]:
    """The Figure 6 section: the table, its source and the not-judged count; one line when
    nothing was judged."""
    if table is None:
        return []
    lines = [FIGURE6, ""]
    if table["source"] is None:
        return lines + [
            "No candidate judged: set `select_stage.judge=math` (or `choice`, or "
            "`package.module:function`; candidates need a `reference_answer`) or turn on "
            "`filters.answer`.",
            "",
        ]
    if not _judged(table):
        return lines + [
            f"No candidate judged by `{table['source']}`: {table['not_judged']} scored "
            "candidates without a verdict (no `reference_answer`, a timeout or an error).",
            "",
        ]
    lines += [
        "| group | candidates | Teacher / cand. | Student / cand. | Shared / cand. "
        "| Teacher share | Student share | Shared share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, g in table["groups"].items():
        means = " | ".join(_fmt(g["mean"][k], 2) for k, _, _ in _KINDS)
        shares = " | ".join(_fmt(g["share"][k], 3) for k, _, _ in _KINDS)
        lines.append(f"| {name} | {g['candidates']} | {means} | {shares} |")
    return lines + [
        "",
        f"Judged by `{table['source']}` (`select_stage.judge`), over every scored candidate "
        f"(rejected or kept); {table['not_judged']} scored candidates not judged (no "
        "`reference_answer`, a timeout, an error, or no verdict). Shares are of the group's "
        "Teacher + Student + Shared sentences. The paper found Teacher sentences more "
        "frequent in correct answers.",
        "",
    ]


def _table(rows: dict[str, dict], head: str) -> list[str]:
    out = [f"| {head} | in | out |", "|---|---:|---:|"]
    out += [f"| {k} | {v['in']} | {v['out']} |" for k, v in rows.items()]
    return out


def markdown(summary: dict, images: list[str]) -> str:
    s = summary
    cfg = s["config"]["select"]
    lines = [
        "# Select report",
        "",
        f"{s['candidates']} candidates of {s['prompts']} prompts -> **{s['selected']} "
        f"selected**; {s['rejects']} rejects; {s['empty_prompts']} prompts lost every "
        f"candidate to the filters; {s['over_budget_prompts']} prompts left out by the budget; "
        f"{s['bad_rows']} unreadable lines."
        + (
            f" Temperature class `{s['temperatures']}` only: {s['other_temperature']} "
            "candidates of the other class were not considered."
            if s.get("temperatures", "all") != "all"
            else ""
        ),
        "",
        f"Rule `{cfg['rule']}`, beta {cfg['beta']}, top-k {cfg['top_k']}, budget "
        f"{cfg['budget']} ({cfg['budget_mode']}), segments `{cfg['segments']}`, splitter "
        f"`{cfg['splitter']['kind']}`.",
        "",
        "## Rows in / out",
        "",
        *_table(s["rows"]["by_domain"], "domain"),
        "",
        *_table(s["rows"]["by_temperature"], "temperature"),
        "",
        *_table(s["rows"]["by_domain_temperature"], "domain @ temperature"),
        "",
        "## Filters (a candidate with several reasons counts in each)",
        "",
        "| reason | candidates |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in s["filters"].items()],
        "",
        *([f"⚠ {note}.", ""] if (note := timeout_note(s["filters"])) else []),
        "Not kept by selection: "
        + (", ".join(f"{k} {v}" for k, v in s["decisions"].items()) or "none")
        + ".",
        "",
        "## Sentence types",
        "",
        "| group | teacher | shared | student | unscored |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, group in [
        ("all scored", s["sentences"]["all"]),
        ("selected", s["sentences"]["selected"]),
        *s["sentences"]["by_domain_temperature"].items(),
    ]:
        lines.append(
            f"| {name} | "
            + " | ".join(str(group.get(k, 0)) for k in ("teacher", "shared", "student", "unscored"))
            + " |"
        )
    lines += [
        "",
        f"Selected: mean Teacher-sentence count {s['selected_mean_teacher_count']}, "
        f"mean ratio {s['selected_mean_teacher_ratio']}.",
        "",
        *correctness_markdown(s.get("correctness")),
        "## Plots",
        "",
    ]
    lines += [f"![{Path(img).stem}]({img})" for img in images]
    lines += [
        "",
        "Machine-readable: `summary.json`. Kept: `selected.jsonl`; dropped, with "
        "reasons: `rejects.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: str | Path, summary: dict[str, Any], seen: list, kept: dict, acc) -> None:
    images = plots(out_dir, summary, seen, kept, acc)
    with atomic_write(storage.join(out_dir, "report.md")) as f:
        f.write(markdown(summary, images))
