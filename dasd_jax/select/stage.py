"""The `select` stage: filters, then Divergence-Aware Sampling per prompt, then the budget.

Consumes the score stage's output (`select_stage.input`, default `<run_dir>/score`, local or
gs://): Candidate JSONL shards `part-*.jsonl` with `student` and `teacher` TokenScores. With
`select_stage.temperatures=low_t` (or `high_t`) only the candidates of that class (by
`select_stage.high_t_from`) are considered; the others are counted as `other_temperature`
and written nowhere (they belong to the other class's run). Uses the pure library
beside it: `filters.filter_batch` (length, structure, repetition, optional answer check),
`das.score_response` (sentences, token -> sentence by char offsets per tokenizer, p = exp(mean
log p), Teacher / Student / Shared at beta) and `das.select` (rule, top-k, tie-break, budget).

Produces, under `select_stage.output` (default `<run_dir>/select`, local or gs://), every
file written under a temporary name and renamed (`dasd_jax.storage`):
- `train-NNNNN.array_record`: the selected samples as `schema.SFTRecord`s (what training
  reads, through Grain's ArrayRecordDataSource), `select_stage.records_per_file` per file;
- `selected.jsonl`: one line per kept sample: ids, sentence counts, rank;
- `rejects.jsonl`: one line per candidate not kept, with every reason: filter reasons,
  `no_teacher_scores`, `duplicate_candidate`, `not_selected` (a better candidate of the same
  prompt was kept), `over_budget`, or a bad scored line (`select_stage.on_bad_row=skip`);
- `summary.json`: rows in/out per domain and temperature, per-filter drops, sentence-type
  distributions, selection counts, the config used, and `counts` {in, out, rejected,
  other_temperature} with in = out + rejected + other_temperature; `correctness`: sentence
  types in correct vs incorrect candidates (the paper's Figure 6, `select.correctness`;
  judged by `select_stage.judge`, in pass 1's chunks);
- `report.md` + `plots/*.png` (matplotlib): the same tables, DAS score histograms and the
  teacher-vs-student sentence probability scatter (`select.report`).

Memory: one pass keeps a small record per candidate (ids, counts, reasons; never the text or
token lists) and a seeded reservoir of sentences for the scatter; a second pass streams the
kept candidates' text into the ArrayRecord files. Multi-host: selection needs every prompt's
candidates together, so process 0 runs it over the shared score folder; others return.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dasd_jax import storage
from dasd_jax.config import Config, to_dict
from dasd_jax.records import (
    BadRow,
    BadRows,
    iter_jsonl,
    reason_key,
    require_rows,
    write_json,
    write_jsonl,
)
from dasd_jax.schema import Candidate, SFTRecord, write_sft_records
from dasd_jax.select import correctness, das, filters

log = logging.getLogger(__name__)

KIND_NAMES = {
    das.TEACHER: "teacher",
    das.STUDENT: "student",
    das.SHARED: "shared",
    das.UNSCORED: "unscored",
}
_FILTER_CHUNK = 256


@dataclass
class Seen:
    """What pass 1 keeps per candidate."""

    prompt_id: str
    index: int
    file: int
    line: int
    domain: str
    temperature: float | None
    reasons: list[str]
    n_chars: int
    n_student_tokens: int | None
    stats: das.ResponseStats | None
    uuid: str | None = None
    correct: bool | None = None  # the judge's verdict; None = not judged (`correctness`)


@dataclass
class Accumulators:
    """Report data gathered in pass 1 (bounded memory)."""

    seed: int
    capacity: int
    scatter: list[tuple[float, float, int]] = field(default_factory=list)
    seen_sentences: int = 0
    kinds: Counter = field(default_factory=Counter)  # (domain, temperature, kind) -> count

    def add(self, scored: das.ScoredResponse, domain: str, temp, rng: np.random.RandomState):
        for k in np.asarray(scored.kinds)[scored.counted]:
            self.kinds[(domain, _temp_key(temp), KIND_NAMES[int(k)])] += 1
        for i in np.flatnonzero(scored.counted & (scored.kinds != das.UNSCORED)):
            item = (float(scored.p_teacher[i]), float(scored.p_student[i]), int(scored.kinds[i]))
            self.seen_sentences += 1
            if len(self.scatter) < self.capacity:
                self.scatter.append(item)
            else:  # reservoir sampling: every sentence is kept with equal probability
                j = rng.randint(0, self.seen_sentences)
                if j < self.capacity:
                    self.scatter[j] = item


@dataclass
class _Checks:
    """Candidates waiting for the batched checks, at most `_FILTER_CHUNK` (their texts are
    never all held): the filters (the answer check in worker processes) and, with a judge
    scorer (`correctness.judge_source`), the verdicts of Figure 6's table."""

    cfg: Config
    judge: str | None
    pending: list[tuple[Seen, filters.FilterInput, tuple | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.judge not in (None, correctness.FILTERS_ANSWER):
            correctness.check_judge(self.judge, self.cfg.select_stage.judge_timeout_s)

    def add(self, s: Seen, c: Candidate, n_tok: int | None) -> None:
        item = None
        if self.judge not in (None, correctness.FILTERS_ANSWER):
            if s.stats is not None and c.reference_answer is not None:
                item = correctness.judge_item(c)
        fi = filters.FilterInput(c.response, n_tok if n_tok is not None else 0, c.reference_answer)
        self.pending.append((s, fi, item))
        if len(self.pending) >= _FILTER_CHUNK:
            self.flush()

    def flush(self) -> None:
        inputs = [fi for _, fi, _ in self.pending]
        reasons, verdicts = filters.filter_and_judge(inputs, self.cfg.filters)
        for (s, _, _), rs, verdict in zip(self.pending, reasons, verdicts, strict=True):
            s.reasons = rs + s.reasons
            if self.judge == correctness.FILTERS_ANSWER:
                s.correct = verdict
        items = [(s, item) for s, _, item in self.pending if item is not None]
        if items:
            correctness.judge(self.judge, items, self.cfg)
        self.pending.clear()


def _temp_key(t: float | None) -> str:
    return "unknown" if t is None else f"{t:g}"


def _parts(in_dir: str) -> list[str]:
    return storage.glob(storage.join(in_dir, "part-*.jsonl"))


def temperature_class(temperature: float | None, high_t_from: float) -> str | None:
    """`low_t` / `high_t` by `select_stage.high_t_from`; None when the temperature is unknown."""
    if temperature is None:
        return None
    return "high_t" if temperature >= high_t_from else "low_t"


def _iter_candidates(
    files: list[str], on_bad: str, bad: list, sc=None, other: list | None = None
) -> Iterator[tuple[int, int, Candidate]]:
    """(file index, line, Candidate) over the scored shards; bad lines go to `bad`. With
    `sc.temperatures` low_t/high_t, candidates of the other class are counted in `other[0]`
    and not yielded; one without a temperature is a bad row (`no_temperature`)."""
    wanted = sc.temperatures if sc is not None else "all"
    for fi, f in enumerate(files):
        for line, row in iter_jsonl(f, on_bad=on_bad, rejected=lambda err, raw: bad.append(err)):
            try:
                c = Candidate.from_dict(row)
                if wanted != "all":
                    cls = temperature_class(c.temperature, sc.high_t_from)
                    if cls is None:
                        raise BadRow(
                            f,
                            line,
                            f"no_temperature: select_stage.temperatures={wanted} needs each "
                            "candidate's sampling temperature (for inputs that do not record "
                            "it, set score.temperature when scoring)",
                        )
                    if cls != wanted:
                        if other is not None:
                            other[0] += 1
                        continue
            except BadRow as err:
                if on_bad == "error":
                    raise
                bad.append(err)
                continue
            except (TypeError, ValueError) as e:
                err = BadRow(f, line, f"not a Candidate: {e}")
                if on_bad == "error":
                    raise err from None
                bad.append(err)
                continue
            yield fi, line, c


def _source(sc, temperature: float | None) -> str:
    if sc.source:
        return sc.source
    return temperature_class(temperature, sc.high_t_from) or "unknown"


def run(cfg: Config) -> dict:
    """Filter, score sentences, select; write the training set, rejects and the report."""
    import jax

    sc = cfg.select_stage
    in_dir = sc.input or storage.join(cfg.run_dir, "score")  # local or gs://
    out_dir = sc.output or storage.join(cfg.run_dir, "select")
    if jax.process_index() != 0:
        return {"process": jax.process_index(), "skipped": "selection runs on process 0"}
    files = _parts(in_dir)
    if not files:
        raise FileNotFoundError(
            f"no scored candidates (part-*.jsonl) in {in_dir}: run "
            "`python -m dasd_jax.launch --stage=score` first (same run_dir)"
            " or set select_stage.input"
        )
    t0 = time.perf_counter()
    needs_stats = cfg.select.rule in das.NEEDS_STATS
    rng = np.random.RandomState(cfg.select.seed)
    acc = Accumulators(cfg.select.seed, sc.scatter_points)
    seen: list[Seen] = []
    keys: set[tuple[str, int]] = set()
    bad: list[BadRow] = []
    other = [0]  # candidates of the other temperature class
    checks = _Checks(cfg, correctness.judge_source(cfg))
    policy = cfg.bad_rows.for_stage(sc.on_bad_row)
    for fi, line, c in _iter_candidates(files, policy.on_bad_row, bad, sc, other):
        st = c.student
        n_tok = None if st is None else (st.n_prompt_tokens or 0) + len(st.token_ids)
        s = Seen(
            c.prompt_id,
            c.candidate,
            fi,
            line,
            c.domain or "unknown",
            c.temperature,
            [],
            len(c.response),
            n_tok,
            None,
            c.meta.get("uuid"),
        )
        key = (c.prompt_id, c.candidate)
        if key in keys:
            s.reasons.append("duplicate_candidate")
        keys.add(key)
        t = c.teacher
        if st is None:
            s.reasons.append("not_scored")
        elif t is not None and t.offsets is not None and st.offsets is not None:
            scored = das.score_response(
                c.response, t.offsets, t.logprobs, st.offsets, st.logprobs, cfg.select
            )
            s.stats = scored.stats
            acc.add(scored, s.domain, c.temperature, rng)
        elif needs_stats:
            s.reasons.append("no_teacher_scores")
        seen.append(s)
        checks.add(s, c, n_tok)
    checks.flush()
    require_rows(
        len(bad) + len(seen) + other[0], f"select_stage.input={in_dir} ({len(files)} parts)"
    )
    BadRows("select", policy, storage.join(out_dir, "rejects.jsonl")).check(
        len(bad) + len(seen) + other[0], len(bad), Counter(reason_key(e.reason) for e in bad)
    )

    selection = das.select(
        (
            das.Candidate(
                s.prompt_id,
                s.index,
                s.n_chars,
                s.n_student_tokens,
                s.stats,
                s.reasons[0] if s.reasons else None,
            )
            for s in seen
        ),
        cfg.select,
    )
    kept = {(c.prompt_id, c.index): rank for rank, c in enumerate(selection.selected)}
    over = set(selection.over_budget_prompts)
    by_key = {(s.prompt_id, s.index): s for s in seen}
    for s in seen:
        if s.reasons or (s.prompt_id, s.index) in kept:
            continue
        s.reasons.append("over_budget" if s.prompt_id in over else "not_selected")

    storage.makedirs(out_dir)
    for old in storage.glob(storage.join(out_dir, "train-*.array_record")):  # a previous run's
        storage.unlink(old)
    rejects = itertools.chain(
        (
            {"file": str(e.path), "line": e.line, "reasons": ["bad_row"], "detail": e.reason}
            for e in bad
        ),
        (
            {
                "prompt_id": s.prompt_id,
                "candidate": s.index,
                "uuid": s.uuid,
                "file": str(files[s.file]),
                "line": s.line,
                "reasons": s.reasons,
            }
            for s in seen
            if s.reasons
        ),
    )
    n_rejects = write_jsonl(storage.join(out_dir, "rejects.jsonl"), rejects)
    write_jsonl(
        storage.join(out_dir, "selected.jsonl"),
        (
            {
                "prompt_id": c.prompt_id,
                "candidate": c.index,
                "uuid": by_key[(c.prompt_id, c.index)].uuid,
                **(
                    {
                        k: getattr(c.stats, k)
                        for k in (
                            "n_teacher",
                            "n_student",
                            "n_shared",
                            "n_unscored",
                            "teacher_ratio",
                        )
                    }
                    if c.stats
                    else {}
                ),
            }
            for c in selection.selected
        ),
    )
    train_files = _write_train(files, kept, out_dir, sc, on_bad=policy.on_bad_row)

    summary = _summary(cfg, seen, bad, selection, acc, files, train_files, n_rejects)
    summary["correctness"] = correctness.correctness_table(seen, checks.judge)
    summary["temperatures"] = sc.temperatures
    summary["other_temperature"] = other[0]
    summary["counts"] = {
        "in": len(bad) + len(seen) + other[0],
        "out": len(selection.selected),
        "rejected": n_rejects,
        "other_temperature": other[0],
    }
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    if sc.report:
        from dasd_jax.select import report

        report.write(out_dir, summary, seen, kept, acc)
    write_json(storage.join(out_dir, "summary.json"), summary)
    _print(summary)
    return summary


def _write_train(files: list[str], kept: dict, out_dir: str, sc, on_bad: str) -> list[str]:
    """Pass 2: stream the kept candidates into ArrayRecord files of records_per_file each."""

    def records() -> Iterator[SFTRecord]:
        written: set[tuple[str, int]] = set()
        for _, _, c in _iter_candidates(files, on_bad, [], sc):
            key = (c.prompt_id, c.candidate)
            if key not in kept or key in written:  # a duplicate_candidate is written once
                continue
            written.add(key)
            kept_meta = {"prompt_id": c.prompt_id, "candidate": c.candidate}
            if c.meta.get("uuid"):
                kept_meta["uuid"] = c.meta["uuid"]
            yield SFTRecord(
                id=c.meta.get("uuid") or f"{c.prompt_id}/{c.candidate}",
                prompt=c.prompt,
                response=c.response,
                source=_source(sc, c.temperature),
                domain=c.domain,
                temperature=c.temperature,
                meta=kept_meta,
            )

    it = iter(records())
    names = []
    for k in itertools.count():
        first = next(it, None)
        if first is None:
            break
        name = f"train-{k:05d}.array_record"
        write_sft_records(
            storage.join(out_dir, name),
            itertools.chain([first], itertools.islice(it, sc.records_per_file - 1)),
        )
        names.append(name)
    return names


def _summary(
    cfg: Config,
    seen: list[Seen],
    bad: list[BadRow],
    selection: das.Selection,
    acc: Accumulators,
    files: list[str],
    train_files: list[str],
    n_rejects: int,
) -> dict[str, Any]:
    rows: dict[str, dict] = {
        "by_domain": defaultdict(lambda: {"in": 0, "out": 0}),
        "by_temperature": defaultdict(lambda: {"in": 0, "out": 0}),
        "by_domain_temperature": defaultdict(lambda: {"in": 0, "out": 0}),
    }
    kept = {(c.prompt_id, c.index) for c in selection.selected}
    kinds_all: Counter = Counter()
    kinds_kept: Counter = Counter()
    for s in seen:
        out = (s.prompt_id, s.index) in kept
        for table, key in (
            ("by_domain", s.domain),
            ("by_temperature", _temp_key(s.temperature)),
            ("by_domain_temperature", f"{s.domain} @ T={_temp_key(s.temperature)}"),
        ):
            rows[table][key]["in"] += 1
            rows[table][key]["out"] += out
        if s.stats is not None:
            for name in ("teacher", "student", "shared", "unscored"):
                n = getattr(s.stats, f"n_{name}")
                kinds_all[name] += n
                if out:
                    kinds_kept[name] += n
    filter_reasons = filters.count_reasons(
        [[r for r in s.reasons if r not in ("not_selected", "over_budget")] for s in seen]
    )
    sentence_kinds: dict[str, dict[str, int]] = defaultdict(dict)
    for (domain, temp, kind), n in sorted(acc.kinds.items()):
        sentence_kinds[f"{domain} @ T={temp}"][kind] = n
    n_kept_stats = [s.stats for s in seen if (s.prompt_id, s.index) in kept and s.stats]
    return {
        "input_files": [str(f) for f in files],
        "candidates": len(seen),
        "bad_rows": len(bad),
        "prompts": selection.n_prompts,
        "selected": len(selection.selected),
        "rejects": n_rejects,
        "empty_prompts": len(selection.empty_prompts),
        "empty_prompt_ids": selection.empty_prompts[:100],
        "over_budget_prompts": len(selection.over_budget_prompts),
        "rows": {k: dict(sorted(v.items())) for k, v in rows.items()},
        "filters": filter_reasons,
        "decisions": dict(
            Counter(r for s in seen for r in s.reasons if r in ("not_selected", "over_budget"))
        ),
        "sentences": {
            "all": dict(kinds_all),
            "selected": dict(kinds_kept),
            "by_domain_temperature": dict(sentence_kinds),
        },
        "selected_mean_teacher_count": (
            float(np.mean([x.n_teacher for x in n_kept_stats])) if n_kept_stats else None
        ),
        "selected_mean_teacher_ratio": (
            float(np.mean([x.teacher_ratio for x in n_kept_stats])) if n_kept_stats else None
        ),
        "train_files": train_files,
        "config": {
            "select": to_dict(cfg.select),
            "filters": to_dict(cfg.filters),
            "select_stage": to_dict(cfg.select_stage),
        },
    }


def _print(summary: dict) -> None:
    print(
        f"select: {summary['candidates']} candidates of {summary['prompts']} prompts -> "
        f"{summary['selected']} selected, {summary['rejects']} rejects, "
        f"{summary['empty_prompts']} prompts with nothing left"
    )
    print(f"{'domain @ temperature':<36}{'in':>8}{'out':>8}")
    for k, v in summary["rows"]["by_domain_temperature"].items():
        print(f"{k:<36}{v['in']:>8}{v['out']:>8}")
    from dasd_jax.select.report import timeout_note

    if note := timeout_note(summary["filters"]):
        print(f"select: warning: {note}")
