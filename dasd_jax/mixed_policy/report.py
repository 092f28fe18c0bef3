"""The mixed-policy stage's human report: Markdown tables and PNG plots (matplotlib, no screen).

Consumes the stage's output folder (`samples.jsonl`) and its summary; produces `report.md`
and `plots/`:
- `cut_fractions.png`: histogram of k / L (where the student's answer was cut), with the
  configured interval;
- `lengths.png`: histograms of the student prefix and the teacher continuation lengths
  (tokens of each model).
Returns the report's relative file names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dasd_jax import storage
from dasd_jax.records import atomic_write


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def plots(out_dir: Path, samples: list[dict], cfg: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pdir = out_dir / "plots"
    storage.makedirs(pdir)  # a no-op on gs://
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist([s["cut_fraction"] for s in samples], bins=np.linspace(0, 1, 41))
    for x in (cfg["cut_low"], cfg["cut_high"]):
        ax.axvline(x, color="k", ls="--", lw=0.8)
    ax.set_xlabel("cut point k / L (student tokens kept / answer length)")
    ax.set_ylabel("kept rows")
    ax.set_title(f"cut fractions ({len(samples)} rows, snap={cfg['snap']})")
    _save(fig, pdir / "cut_fractions.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, title in (
        (axes[0], "prefix_tokens", "student prefix (student tokens)"),
        (axes[1], "continuation_tokens", "teacher continuation (teacher tokens)"),
    ):
        ax.hist([s[key] for s in samples], bins=30)
        ax.set_title(title)
        ax.set_ylabel("kept rows")
    _save(fig, pdir / "lengths.png")
    return ["plots/cut_fractions.png", "plots/lengths.png"]


def _fmt(stats: dict | None) -> str:
    if stats is None:
        return "-"
    return f"mean {stats['mean']:g}, min {stats['min']:g}, max {stats['max']:g}"


def markdown(summary: dict, images: list[str]) -> str:
    s, c = summary, summary["counts"]
    mp = s["config"]["mixed_policy"]
    lines = [
        "# Mixed-policy report",
        "",
        f"{c['in']} questions (drawn from {s['unique_prompts']} unique prompts in "
        f"{s['source_records']} selected records; {s['bad_records']} unreadable) -> "
        f"**{c['out']} kept**, {c['rejected']} rejected. {s['capped']} student answers used "
        f"their whole budget ({mp['length_factor']} x the teacher response).",
        "",
        f"Student `{s['student']}` at T={mp['student_temperature']}; teacher `{s['teacher']}` "
        f"at T={mp['teacher_temperature']}, up to {mp['teacher_max_tokens']} tokens. Cut "
        f"uniform in ({mp['cut_low']} L, {mp['cut_high']} L), snap `{mp['snap']}`"
        + (" (DEMO caps: embedded random models)" if s.get("demo") else "")
        + ".",
        "",
        "## Why questions were not kept",
        "",
        "| reason | questions |",
        "|---|---:|",
        *[f"| {k} | {v} |" for k, v in s["rejected"].items()],
        f"| **kept** | {c['out']} |",
        "",
        "Filter reasons (a response with several counts in each): "
        + (", ".join(f"{k} {v}" for k, v in s["filters"].items()) or "none")
        + ".",
        "",
        "## Kept rows",
        "",
        f"- cut fraction k / L: {_fmt(s['cut_fraction'])}",
        f"- student prefix tokens: {_fmt(s['prefix_tokens'])}",
        f"- teacher continuation tokens: {_fmt(s['continuation_tokens'])}",
        f"- snapped to a sentence boundary: {s['snapped']}; prefixes the student tokenizer "
        f"encodes differently: {s['noncanonical_prefixes']}",
        f"- teacher finish reasons: {s['teacher_finish']}",
        "",
        "## Plots",
        "",
        *[f"![{Path(img).stem}]({img})" for img in images],
        "",
        "Machine-readable: `summary.json`; kept rows: `samples.jsonl` and "
        f"{', '.join(f'`{t}`' for t in s['train_files']) or 'no train file'}; "
        "every other question, with its reason: `rejects.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Path, summary: dict) -> list[str]:
    lines = storage.read_text(out_dir / "samples.jsonl").splitlines()  # local or gs://
    images = plots(out_dir, [json.loads(x) for x in lines], summary["config"]["mixed_policy"])
    with atomic_write(out_dir / "report.md") as f:
        f.write(markdown(summary, images))
    return ["report.md", *images]
