"""The sample stage's report: what the teacher wrote, and what was refused and why.

Consumes the stage's totals (`shards.summarize`: counts per temperature, reject reasons,
repairs) and its rejects files (`t<T>/rejects.part-*.jsonl`); produces
`<run_dir>/sample/report.md`: prompts and samples in / out / rejected per temperature, the
refused samples by reason (what each reason means, a few examples with the text near the
problem), the exact repairs applied, finish reasons, refused prompts by reason.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dasd_jax import storage
from dasd_jax.models.harmony import MALFORMED, REPAIR_FINAL_END
from dasd_jax.records import atomic_write

OTHER_REASONS = {"not_nfc": "the response text is not in Unicode NFC form (docs/sample.md)"}
REPAIRS = {
    REPAIR_FINAL_END: "the final message ended with `<|end|>` (or another EOS) instead of "
    "`<|return|>`: kept up to it, the tokens after it dropped (`sample.harmony_repair`)"
}


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _examples(out_root: str, per_reason: int) -> dict[str, list[dict]]:
    """Up to `per_reason` refused samples of each reason, in file order."""
    found: dict[str, list[dict]] = {}
    for f in sorted(storage.glob(storage.join(out_root, "t*", "rejects.part-*.jsonl"))):
        with storage.open_read(f) as fh:
            for raw in fh:
                r = json.loads(raw)
                if "candidate" not in r:  # a refused prompt
                    continue
                mine = found.setdefault(r["reason"], [])
                if len(mine) < per_reason:
                    mine.append({**r, "file": f})
    return found


def _excerpt(r: dict, before: int = 100, after: int = 60) -> str:
    """The raw completion around where its problem is (`at_char`), marked."""
    text = r.get("completion", {}).get("text", "")
    at = r.get("at_char")
    at = len(text) if at is None else at
    lo, hi = max(at - before, 0), min(at + after, len(text))
    out = ("..." if lo else "") + text[lo:at] + " >>>HERE>>> " + text[at:hi]
    return (out + ("..." if hi < len(text) else "")).replace("\n", "\\n").replace("`", "'")


def render(out_root: str, summary: dict[str, Any], per_reason: int = 2) -> str:
    c = summary["counts"]
    lines = [
        "# Sample report",
        "",
        f"Teacher `{summary.get('teacher')}` ({summary.get('backend')}), prompts "
        f"`{summary.get('input')}`: **{c['in']} prompts** -> {c['out']} sampled, "
        f"{c['rejected']} refused; **{c['samples']} samples** -> {c['candidates']} candidates, "
        f"{c['candidates_rejected']} refused ({_pct(c['candidates_rejected'], c['samples'])}). "
        "Every candidate written here is one the `score` stage accepts; every refused one is in "
        "the rejects files with its reason and its whole completion.",
        "",
        "| temperature | prompts in | prompts out | samples | candidates | refused | refused % |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, v in summary.get("per_temperature", {}).items():
        lines.append(
            f"| {t.removeprefix('t')} | {v['prompts_in']} | {v['prompts_out']} | {v['samples']} "
            f"| {v['candidates']} | {v['candidates_rejected']} | "
            f"{_pct(v['candidates_rejected'], v['samples'])} |"
        )
    reasons = summary.get("candidate_reject_reasons", {})
    lines += ["", "## Refused samples", ""]
    if not reasons:
        lines.append("None.")
    else:
        temps = list(summary.get("per_temperature", {}))
        lines += [
            "| reason | " + " | ".join(f"T={t.removeprefix('t')}" for t in temps) + " | what |",
            "|---|" + "---|" * len(temps) + "---|",
        ]
        per_t = summary["per_temperature"]
        for r in reasons:
            counts = " | ".join(str(per_t[t]["candidate_reject_reasons"].get(r, 0)) for t in temps)
            what = MALFORMED.get(r) or OTHER_REASONS.get(r, "")
            lines.append(f"| `{r}` | {counts} | {what} |")
        lines += ["", "Examples (the raw completion around the problem):", ""]
        for r, rows in _examples(out_root, per_reason).items():
            for x in rows:
                detail = x.get("detail") or ""
                lines.append(
                    f"- `{r}`, prompt `{x['prompt_id']}` candidate {x['candidate']} "
                    f"({os.path.basename(os.path.dirname(x['file']))}, line {x['line']}): "
                    f"{detail}: `{_excerpt(x)}`"
                )
    repairs = summary.get("harmony_repairs", {})
    lines += ["", "## Exact repairs", ""]
    if not repairs:
        lines.append("None.")
    for r, n in repairs.items():
        lines.append(f"- `{r}`: {n} candidates. {REPAIRS.get(r, '')}")
    lines += ["", "## Finish reasons", ""]
    lines += [f"- `{k}`: {v}" for k, v in summary.get("finish_reasons", {}).items()] or ["None."]
    prompts = summary.get("prompt_reject_reasons", {})
    lines += ["", "## Refused prompts", ""]
    lines += [f"- `{k}`: {v}" for k, v in prompts.items()] or ["None."]
    lines += [
        "",
        "Files: `t<T>/part-*.jsonl` (candidates), `t<T>/rejects.part-*.jsonl` (refused "
        "prompts `{line, id, reason}`, then refused samples `{line, prompt_id, candidate, "
        "reason, temperature, finish_reason, detail, at_char, meta, completion}`), "
        "`summary.json`, "
        "`metrics.jsonl`.",
        "",
    ]
    return "\n".join(lines)


def write_report(out_root: str, summary: dict[str, Any]) -> str:
    path = storage.join(out_root, "report.md")
    with atomic_write(path) as f:
        f.write(render(out_root, summary))
    return path
