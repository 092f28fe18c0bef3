"""Sentence types in correct vs incorrect candidates: the paper's Figure 6, for the select report.

Consumes the select stage's per-candidate records (`stage.Seen`: sentence counts `stats`, and
the verdict `correct`, True / False / None = not judged) and the config; produces who judges
(`judge_source`), the verdicts of a judge scorer (`judge`, on the stage's chunks of at most
256 candidates, so that response texts are never all held) and the table (`correctness_table`):
per group (correct, incorrect) the candidates, the mean Teacher / Student / Shared count per
candidate and each type's share of the group's counted sentences (unscored ones excluded).

Who judges (`select_stage.judge`, docs/select_stage.md): "" = the answer filter's verdicts when
`filters.answer` is on; else `math` on the embedded default (`student.path` "": its math rows
carry their answers), else nobody; "none" (not "off": YAML reads a bare off as false); or a
scorer of the evaluate stage (`math`, `choice`, "package.module:function") on every scored
candidate that has a `reference_answer`, whether the filters rejected it or selection kept it
or not: the figure is about the pool.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable
from typing import Any

from dasd_jax.schema import Candidate

FILTERS_ANSWER = "filters.answer"
KINDS = ("teacher", "student", "shared")


def judge_source(cfg: Any) -> str | None:
    """`filters.answer`, a scorer spec, or None (nothing judged), from `select_stage.judge`."""
    judge = cfg.select_stage.judge
    if judge == "none":
        return None
    if judge:
        return judge
    if cfg.filters.answer:
        return FILTERS_ANSWER
    return "math" if not cfg.student.path else None


def judge_workers(cfg: Any) -> int:
    """`select_stage.judge_workers`; 0 (this process) for the embedded default's own `math`:
    its few short demo answers take half a second here, worker processes seconds to start."""
    return 0 if not cfg.select_stage.judge else cfg.select_stage.judge_workers


def check_judge(spec: str, timeout_s: float) -> None:
    """Resolve a judge scorer once, before any candidate is read (a bad hook fails here)."""
    from dasd_jax.evaluate.scorers import resolve_scorer

    try:
        resolve_scorer(spec, timeout_s)
    except ValueError as e:
        raise ValueError(str(e).replace("evaluate.scorer", "select_stage.judge")) from None


def judge_item(c: Candidate) -> tuple[str, str, dict]:
    """(response, reference answer, row) for the scorer: the row is the candidate without
    its token scores (they can be large and no scorer needs them)."""
    row = {f.name: getattr(c, f.name) for f in dataclasses.fields(c)}
    del row["teacher"], row["student"]
    return c.response, c.reference_answer, row


def judge(spec: str, items: list[tuple[Any, tuple[str, str, dict]]], cfg: Any) -> None:
    """Set `.correct` of each (record, item): the verdict, None on a timeout or an error."""
    from dasd_jax.evaluate.scorers import judge_all

    timeout_s = cfg.select_stage.judge_timeout_s
    out = judge_all(spec, [it for _, it in items], timeout_s, judge_workers(cfg))
    for (s, _), (status, verdict) in zip(items, out, strict=True):
        s.correct = verdict if status == "ok" else None


def correctness_table(seen: Iterable[Any], source: str | None) -> dict[str, Any]:
    """{source, not_judged, groups: {correct, incorrect}} over the scored candidates (`stats`
    set); each group: `candidates`, `mean` count per candidate and `share` of the group's
    counted sentences per kind (None for an empty group)."""
    n = {True: 0, False: 0}
    sums: dict[bool, Counter] = {True: Counter(), False: Counter()}
    not_judged = 0
    for s in seen:
        if s.stats is None:
            continue
        if s.correct is None:
            not_judged += 1
            continue
        n[s.correct] += 1
        for kind in KINDS:
            sums[s.correct][kind] += getattr(s.stats, f"n_{kind}")
    groups = {}
    for name, key in (("correct", True), ("incorrect", False)):
        total = sum(sums[key].values())
        groups[name] = {
            "candidates": n[key],
            "mean": {k: sums[key][k] / n[key] if n[key] else None for k in KINDS},
            "share": {k: sums[key][k] / total if total else None for k in KINDS},
        }
    return {"source": source, "not_judged": not_judged, "groups": groups}
