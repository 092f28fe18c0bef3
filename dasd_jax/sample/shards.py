"""The sample stage's files, for any backend: prompts in, journaled Candidate shards out.

Consumes the prompts JSONL (streamed) and a backend with `prepare(prompt) -> (payload,
reason)`, `stream(jobs, progress) -> (job, index, Candidate | reject reason)` and
`occupancy()` (`stage.TeacherSampler` for our engine, `openai_client.OpenAIBackend` for a
server); produces under `<run_dir>/sample/t<T>/` the part, stats and rejects files of each
shard, plus `summary.json` and `metrics.jsonl` (layout and resume rules: stage.py and
docs/sample.md). `run_dir` and the prompts file may be gs:// (`dasd_jax.storage`).

A finished prompt (all its candidates, or its reject) is appended to the shard's journal with
fsync; a shard's files are written atomically when its last prompt is in, the part file last,
then the journal is removed. Journals and `metrics.jsonl` are appended to, so they live in
`storage.local_dir(<run_dir>/sample/...)`: the output folder itself when local; for a gs://
run_dir a mirror on this machine's disk (Cloud Storage has no append). The finished shard's
files are published to the run_dir atomically (part file last), `metrics.jsonl` is uploaded
at the end of the run. Candidate seeds and prompt ids are functions of the data only
(`candidate_seed`, `prompt_id_of`), so a restart reproduces what a kill interrupted.

Before the first shard, `<run_dir>/sample.shards.json` records the settings a shard's bytes
depend on (`shard_settings`; the score stage keeps its own the same way, `check_settings`);
a restart under other settings is refused, naming them, instead of mixing two runs' shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dasd_jax import faults, storage
from dasd_jax.config import Config, to_dict
from dasd_jax.progress import Progress
from dasd_jax.records import (
    BadRow,
    BadRowPolicy,
    BadRows,
    DuplicateIds,
    atomic_write,
    iter_jsonl,
    reason_key,
    require_rows,
    shard_name,
    write_json,
)
from dasd_jax.resume import (  # noqa: F401 (CorruptJournal, SettingsChanged: re-exported)
    CorruptJournal,
    SettingsChanged,
    check_settings,
    device_of,
    read_journal,
)
from dasd_jax.sample.sampling import MAX_SEED
from dasd_jax.schema import Candidate, TokenScores

log = logging.getLogger(__name__)


def candidate_seed(seed: int, prompt_id: str, temperature: float, index: int) -> int:
    """The seed of one candidate: a hash of what identifies it, never of run order."""
    key = f"{seed}\x00{prompt_id}\x00{float(temperature)!r}\x00{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") % MAX_SEED


def prompt_id_of(row: dict, id_field: str, prompt: str) -> str:
    if row.get(id_field) is not None:
        return str(row[id_field])
    from dasd_jax.ingest import prompt_hash  # the score stage groups id-less rows this way

    return prompt_hash(prompt)


@dataclass
class Rejected:
    """A generated sample that is not a usable candidate (malformed harmony, text not in NFC):
    written to its shard's rejects with the reason and the whole completion (text, token ids,
    log-probs), so nothing sampled is lost, and counted in the stage's summary and report.
    A later stage would refuse it, so the sample stage never writes it as a candidate."""

    prompt_id: str
    candidate: int
    reason: str
    detail: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The raw completion (e.g. to judge an evaluation answer all the same)."""
        return self.detail["completion"]["text"]

    @property
    def finish_reason(self) -> str:
        return self.detail["finish_reason"]

    @property
    def n_tokens(self) -> int:
        return len(self.detail["completion"]["token_ids"])

    def to_dict(self) -> dict:
        return {
            "prompt_id": self.prompt_id,
            "candidate": self.candidate,
            "reason": self.reason,
            **self.detail,
        }


def make_candidate(
    mapped,
    *,
    prompt_id: str,
    index: int,
    prompt: str,
    temperature: float,
    finish_reason: str,
    raw: str,
    ids: list[int],
    logprobs: list[float],
    sampling_logprobs: list[float] | None,
    model: str,
    tokenizer: str,
    meta: dict,
) -> Candidate | Rejected:
    """One generated sample as the stage writes it: a `Candidate` over the tokens the mapped
    response covers (`text.Mapped`: fewer than generated after an exact repair, whose sample
    then ended at the final message: finish `stop`), or a `Rejected` with the reason."""
    if mapped.harmony is not None:
        meta = {**meta, "harmony": mapped.harmony}
    if mapped.reason is not None:
        completion = {"text": raw, "token_ids": list(ids), "logprobs": list(logprobs)}
        if sampling_logprobs is not None:
            completion["sampling_logprobs"] = list(sampling_logprobs)
        return Rejected(
            prompt_id,
            index,
            mapped.reason,
            {
                "temperature": float(temperature),
                "finish_reason": finish_reason,
                "detail": mapped.detail,
                "at_char": mapped.at_char,
                "meta": meta,
                "completion": completion,
            },
        )
    keep = mapped.keep
    if keep < len(ids):
        meta["harmony"] = {**meta["harmony"], "finish_reason": finish_reason}
        finish_reason = "stop"
    return Candidate(
        prompt_id=prompt_id,
        candidate=index,
        prompt=prompt,
        response=mapped.response,
        temperature=float(temperature),
        finish_reason=finish_reason,
        teacher=TokenScores(
            model=model,
            tokenizer=tokenizer,
            token_ids=list(ids[:keep]),
            logprobs=list(logprobs[:keep]),
            offsets=mapped.offsets,
            sampling_logprobs=None if sampling_logprobs is None else list(sampling_logprobs[:keep]),
        ),
        meta=meta,
    )


@dataclass
class Job:
    """One prompt at one temperature: `len(seeds)` candidates, one per seed."""

    key: tuple  # (temperature, shard, line)
    prompt_id: str
    prompt: str
    payload: Any  # what the backend sends: token ids (engine), a prompt or messages (openai)
    temperature: float
    seeds: list[int]


@dataclass
class _Shard:
    """One output shard of one temperature: its prompts, their candidates, its rejects."""

    temperature: float
    index: int
    folder: str | Path  # the output folder (local or gs://)
    local: str | Path | None = None  # where the journal is appended (None: `folder`)
    rows: dict[int, dict] = field(default_factory=dict)  # line -> {prompt_id, prompt, ...}
    pending: dict[int, dict[int, Candidate]] = field(default_factory=dict)  # line -> cands
    rejects: list[dict] = field(default_factory=list)
    remaining: int = 0
    resumed: int = 0

    @property
    def part(self) -> str:
        return storage.join(self.folder, shard_name(self.index))

    @property
    def journal(self) -> Path:
        local = self.folder if self.local is None else self.local
        return Path(local) / shard_name(self.index).replace(".jsonl", ".journal")


def _read_journal(path: Path) -> dict[int, dict]:
    """Finished prompts of a shard: line -> {"line", "candidates", optional "reject"}."""
    return {int(e["line"]): e for e in read_journal(path)}


def _append_journal(
    path: Path,
    line: int,
    cands: list[Candidate],
    reject: dict | None = None,
    rejected: list[Rejected] = (),
) -> None:
    rec: dict[str, Any] = {"line": line, "candidates": [c.to_dict() for c in cands]}
    if reject is not None:  # the backend refused the prompt (e.g. the server said 400)
        rec["reject"] = reject
    if rejected:  # samples that are not usable candidates (e.g. malformed harmony)
        rec["rejected"] = [{"line": line, **r.to_dict()} for r in rejected]
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    faults.tick("journal")


def _finalize(shard: _Shard) -> dict:
    """Rejects and stats first, the part file last (it marks the shard done)."""
    journal = _read_journal(shard.journal)
    rejects = shard.rejects + [e["reject"] for e in journal.values() if "reject" in e]
    done = {line: e["candidates"] for line, e in journal.items() if "reject" not in e}
    cands = [Candidate.from_dict(c) for line in sorted(done) for c in done[line]]
    cands.sort(key=lambda c: (c.meta["line"], c.candidate))
    rejected = [r for line in sorted(done) for r in journal[line].get("rejected", [])]
    with atomic_write(storage.join(shard.folder, f"rejects.{shard_name(shard.index)}")) as f:
        # prompts not sampled ({line, id, reason}), then samples not kept ({line, prompt_id,
        # candidate, reason, finish_reason, meta, completion}), in input order
        rows = sorted(rejects, key=lambda r: r["line"]) + sorted(
            rejected, key=lambda r: (r["line"], r["candidate"])
        )
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    finish = Counter(c.finish_reason for c in cands)
    stats = {
        "shard": shard.index,
        "temperature": shard.temperature,
        "prompts_in": len(done) + len(rejects),
        "prompts_out": len(done),
        "rejects": len(rejects),
        "prompt_reject_reasons": dict(Counter(reason_key(r["reason"]) for r in rejects)),
        "samples": len(cands) + len(rejected),
        "candidates": len(cands),
        "candidates_rejected": len(rejected),
        "candidate_reject_reasons": dict(Counter(r["reason"] for r in rejected)),
        "harmony_repairs": dict(Counter(r for c in cands if (r := _repair(c)) is not None)),
        "tokens": sum(len(c.teacher.token_ids) for c in cands),
        "finish_reasons": dict(finish),
        "resumed_prompts": shard.resumed,
    }
    stats_name = shard_name(shard.index).replace(".jsonl", ".stats.json")
    write_json(storage.join(shard.folder, stats_name), stats)
    with atomic_write(shard.part) as f:
        for c in cands:
            f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
    shard.journal.unlink(missing_ok=True)
    return stats


def _repair(c: Candidate) -> str | None:
    return (c.meta.get("harmony") or {}).get("repair")


# sample.* keys that change no shard: where prompts come from (their content is hashed), the
# temperatures (each is its own folder), bad-row policy, progress; engine sizes under the
# openai backend, and how an openai server is reached
_NOT_IN_SHARDS = ("input", "temperatures", "on_bad_row", "max_refused_fraction", "progress_every_s")
_ENGINE = ("slots", "max_prefill_length", "prefill_chunk", "decode_steps", "cache_dtype")
_CONNECTION = (
    "base_url",
    "api_key_env",
    "max_concurrency",
    "timeout_s",
    "max_retries",
    "backoff_s",
    "max_backoff_s",
)


def shard_settings(cfg: Config, teacher_name: str, input_sha256: str) -> dict:
    """What the stage's shards depend on (`check_settings`): the prompts' SHA-256, the seed,
    the teacher's name, with the engine backend its dtypes, attention and the mesh, and every
    `sample.*` key that reaches a shard, `prompts_per_shard` (the cut) and the engine sizes
    (batch shapes: numerics) included."""
    sc = to_dict(cfg.sample)
    for k in _NOT_IN_SHARDS:
        del sc[k]
    options = mesh = None
    if cfg.sample.backend == "openai":
        for k in _ENGINE:
            del sc[k]
        for k in _CONNECTION:
            del sc["openai"][k]
    else:
        del sc["openai"]
        options = {k: v for k, v in to_dict(cfg.teacher).items() if k not in ("path", "remat")}
        mesh = to_dict(cfg.mesh)
    return {
        "input_sha256": input_sha256,
        "seed": cfg.seed,
        "teacher": teacher_name,
        "teacher_options": options,
        "mesh": mesh,
        "sample": sc,
    }


def _prompt_shards(path: str | Path, size: int) -> Iterator[tuple[int, list, list]]:
    """(shard index, [(line, row)], [(line, reason)] of malformed lines) by streaming; a
    malformed line belongs to the shard being filled (the caller raises or rejects)."""
    shard, rows, bad = 0, [], []

    def rejected(err: BadRow, raw: str) -> None:
        bad.append((err.line, err.reason))

    for line, row in iter_jsonl(path, on_bad="skip", rejected=rejected):
        rows.append((line, row))
        if len(rows) == size:
            yield shard, rows, bad
            shard, rows, bad = shard + 1, [], []
    if rows or bad:
        yield shard, rows, bad


def run_shards(cfg: Config, backend, data_path: str | Path, teacher_name: str) -> dict:
    """The stage's files around any backend with `prepare(prompt)` and `stream(jobs)`.

    Streams the prompts shard by shard (this process's shards), skips done shards and
    journaled prompts, feeds every other prompt at every temperature to the backend as one
    stream of `Job`s, journals each prompt when its n candidates are in, and finalizes a shard
    when its last prompt is.
    """
    sc = cfg.sample
    out_root = storage.join(cfg.run_dir, "sample")  # local or gs://
    storage.makedirs(out_root)
    remote = storage.is_remote(out_root)
    n_proc, proc = jax.process_count(), jax.process_index()
    digest, n_lines = hashlib.sha256(), 0
    with storage.open_read(data_path, "rb") as f:
        for line in f:
            digest.update(line)
            n_lines += bool(line.strip())
    require_rows(n_lines, f"sample.input={data_path}")
    shards_in = storage.glob(storage.join(out_root, "t*", "part-*.jsonl")) + storage.glob(
        storage.join(storage.local_dir(out_root), "t*", "part-*.journal")
    )
    device = None if backend.name == "openai" else device_of()
    check_settings(
        out_root, shard_settings(cfg, teacher_name, digest.hexdigest()), device, shards_in
    )
    # progress lines are appended: a local file (a mirror when out_root is gs://), uploaded
    # below; on gs:// each process has its own (their mirrors are on different machines)
    metrics_name = "metrics.jsonl" if proc == 0 or not remote else f"metrics.process{proc}.jsonl"
    metrics = Path(storage.local_dir(out_root)) / metrics_name
    if remote and not metrics.exists() and storage.exists(storage.join(out_root, metrics_name)):
        storage.copy(storage.join(out_root, metrics_name), metrics)  # resumed on a new machine
    progress = Progress(
        "sample",
        n_lines * sc.n * len(sc.temperatures),
        metrics,
        every_s=sc.progress_every_s,
    )
    t0 = time.perf_counter()
    finished: list[dict] = []
    skipped = [0]
    open_shards: dict[tuple[float, int], _Shard] = {}
    policy = cfg.bad_rows.for_stage(sc.on_bad_row)
    # a bad prompt line is rejected once per temperature
    bad_rows = BadRows(
        "sample",
        policy,
        storage.join(out_root, "t*", "rejects.part-*.jsonl"),
        total=n_lines * len(sc.temperatures),
    )

    def jobs() -> Iterator[Job]:
        for T in sc.temperatures:
            folder = storage.join(out_root, f"t{T:g}")
            storage.makedirs(folder)
            local = storage.local_dir(folder)  # journals: `folder` itself when local
            parts_done = {
                os.path.basename(f) for f in storage.glob(storage.join(folder, "part-*.jsonl"))
            }
            # the first row with an id is sampled, a later one is a bad row (same id: same
            # seeds, same candidate names); every shard registers its ids, done or not, so
            # a resumed run rejects exactly what an uninterrupted one does
            ids = DuplicateIds("prompt id")
            for index, rows, bad in _prompt_shards(data_path, sc.prompts_per_shard):
                duplicates = {}
                for line, row in rows:
                    prompt = row.get(sc.prompt_field)
                    pid = prompt_id_of(row, sc.id_field, prompt if isinstance(prompt, str) else "")
                    try:
                        ids.check(pid, data_path, line)
                    except BadRow as e:
                        duplicates[line] = e.reason
                if index % n_proc != proc:
                    continue
                shard = _Shard(T, index, folder, local)
                if shard_name(index) in parts_done:
                    # a kill between publishing the part and removing the journal leaves
                    # a journal that is dead: the part is the shard's result
                    shard.journal.unlink(missing_ok=True)
                    skipped[0] += 1
                    progress.update(len(rows) * sc.n)
                    continue
                shard.rejects = [{"line": ln, "id": None, "reason": r} for ln, r in bad]
                done = _read_journal(shard.journal)
                shard.resumed = len(done)
                todo = []
                for line, row in rows:
                    prompt = row.get(sc.prompt_field)
                    payload = None
                    if sc.prompt_field not in row:
                        reason = f"missing field {sc.prompt_field!r} (has {sorted(row)})"
                    else:
                        payload, reason = backend.prepare(prompt)
                    pid = prompt_id_of(row, sc.id_field, prompt if isinstance(prompt, str) else "")
                    reason = reason or duplicates.get(line)
                    if reason:
                        shard.rejects.append({"line": line, "id": pid, "reason": reason})
                    elif line in done:
                        progress.update(sc.n)
                    else:
                        shard.rows[line] = {
                            "prompt_id": pid,
                            "prompt": prompt,
                            "domain": row.get(sc.domain_field),
                            "answer": row.get(sc.answer_field) if sc.answer_field else None,
                        }
                        todo.append((line, payload))
                for r in sorted(shard.rejects, key=lambda r: r["line"]):  # in input order
                    bad_rows.add(BadRow(data_path, r["line"], r["reason"]))
                shard.remaining = len(todo)
                if not todo:
                    finished.append(_finalize(shard))
                    continue
                open_shards[(T, index)] = shard
                for line, payload in todo:
                    pid = shard.rows[line]["prompt_id"]
                    seeds = [candidate_seed(cfg.seed, pid, T, i) for i in range(sc.n)]
                    yield Job((T, index, line), pid, shard.rows[line]["prompt"], payload, T, seeds)

    for job, index, got in backend.stream(jobs(), progress):
        T, shard_index, line = job.key
        shard = open_shards[(T, shard_index)]
        row = shard.rows[line]
        results = shard.pending.setdefault(line, {})
        if isinstance(got, Candidate):
            got.domain = row["domain"] if isinstance(row["domain"], str) else None
            got.reference_answer = row["answer"] if isinstance(row["answer"], str) else None
        results[index] = got
        if len(results) < sc.n:
            continue
        reasons = [r for r in results.values() if isinstance(r, str)]
        if reasons:  # the backend refused the prompt (a server's 4xx)
            _append_journal(
                shard.journal,
                line,
                [],
                {"line": line, "id": row["prompt_id"], "reason": reasons[0]},
            )
            bad_rows.add(BadRow(data_path, line, reasons[0]))
        else:
            got_all = [results[i] for i in range(sc.n)]
            _append_journal(
                shard.journal,
                line,
                [r for r in got_all if isinstance(r, Candidate)],
                rejected=[r for r in got_all if isinstance(r, Rejected)],
            )
        del shard.pending[line]
        shard.remaining -= 1
        if shard.remaining == 0:
            finished.append(_finalize(shard))
            del open_shards[(T, shard_index)]
    occupancy = backend.occupancy()
    progress.report(**({} if occupancy is None else {"occupancy": occupancy}))
    if remote:
        storage.copy(metrics, storage.join(out_root, metrics_name))
    if n_proc > 1:  # every host's shards are written before process 0 sums them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dasd_jax sample done")
    summary = summarize(out_root)
    bad_rows.check(summary["prompts_in"], summary["rejects"], summary["prompt_reject_reasons"])
    seconds = time.perf_counter() - t0
    summary.update(
        seconds=round(seconds, 2),
        shards_written=len(finished),
        skipped_shards=skipped[0],
        teacher=teacher_name,
        input=str(data_path),
        backend=backend.name,
        tokens_per_s=round(sum(s["tokens"] for s in finished) / max(seconds, 1e-9), 1),
    )
    if occupancy is not None:
        summary["slot_occupancy"] = occupancy
    if proc == 0:
        from dasd_jax.sample.report import write_report

        summary["report"] = write_report(out_root, summary)
        write_json(storage.join(out_root, "summary.json"), summary)
        print_table(out_root)
    refused = BadRows(
        "sample",
        BadRowPolicy("skip", sc.max_refused_fraction),
        f"{storage.join(out_root, 't*', 'rejects.part-*.jsonl')} and {summary.get('report')}",
        what="samples are refused",
        key="sample.max_refused_fraction",
    )
    refused.check(
        summary["samples"], summary["candidates_rejected"], summary["candidate_reject_reasons"]
    )
    return summary


def _finished(out_root: str | Path, pattern: str) -> list[str]:
    """`<out_root>/t*/<pattern>` files, in the order of their (folder, name) parts."""
    found = storage.glob(storage.join(out_root, "t*", pattern))
    return sorted(found, key=lambda f: (os.path.basename(os.path.dirname(f)), f))


_SUMS = ("prompts_in", "prompts_out", "rejects", "samples", "candidates", "candidates_rejected")
_TALLIES = (
    "finish_reasons",
    "prompt_reject_reasons",
    "candidate_reject_reasons",
    "harmony_repairs",
)


def summarize(out_root: str | Path) -> dict:
    """Totals over every finished shard of every temperature, also per temperature; `counts`:
    prompts in = out + rejected, and samples generated = candidates written + rejected."""
    totals: dict[str, Any] = {"shards": 0, **{k: 0 for k in (*_SUMS, "tokens")}}
    totals.update({k: Counter() for k in _TALLIES})
    per_t: dict[str, dict[str, Any]] = {}
    parts = set(_finished(out_root, "part-*.jsonl"))
    for f in _finished(out_root, "part-*.stats.json"):
        if f.replace(".stats.json", ".jsonl") not in parts:
            continue
        s = json.loads(storage.read_text(f))
        if "samples" not in s:  # a shard written before candidates could be rejected
            s = {**s, "samples": s["candidates"], "candidates_rejected": 0}
        t = os.path.basename(os.path.dirname(f))
        mine = per_t.setdefault(t, {k: 0 for k in _SUMS} | {"candidate_reject_reasons": Counter()})
        totals["shards"] += 1
        totals["tokens"] += s["tokens"]
        for k in _SUMS:
            totals[k] += s[k]
            mine[k] += s[k]
        for k in _TALLIES:
            totals[k].update(s.get(k, {}))
        mine["candidate_reject_reasons"].update(s.get("candidate_reject_reasons", {}))
    for k in _TALLIES:
        totals[k] = dict(totals[k].most_common())
    for mine in per_t.values():
        mine["candidate_reject_reasons"] = dict(mine["candidate_reject_reasons"].most_common())
    totals["candidates_per_temperature"] = {t: v["candidates"] for t, v in sorted(per_t.items())}
    totals["per_temperature"] = dict(sorted(per_t.items()))
    totals["counts"] = {
        "in": totals["prompts_in"],
        "out": totals["prompts_out"],
        "rejected": totals["rejects"],
        "samples": totals["samples"],
        "candidates": totals["candidates"],
        "candidates_rejected": totals["candidates_rejected"],
    }
    return totals


def print_table(out_root: str | Path, limit: int = 8) -> None:
    """A few candidates, for a human reading the run's output."""
    print(f"{'T':>4} {'prompt':<12}{'cand':>5}{'tokens':>8} {'finish':<7}{'mean lp':>9}  text")
    shown = 0
    for f in _finished(out_root, "part-*.jsonl"):
        with storage.open_read(f) as fh:
            for raw in fh:
                c = json.loads(raw)
                lp = c["teacher"]["logprobs"]
                mean = f"{np.mean(lp):.2f}" if lp else "-"
                text = c["response"][:40].replace("\n", "\\n")
                print(
                    f"{c['temperature']:>4g} {c['prompt_id'][:11]:<12}{c['candidate']:>5}"
                    f"{len(lp):>8} {c['finish_reason']:<7}{mean:>9}  {text!r}"
                )
                shown += 1
                if shown >= limit:
                    return
