"""The `evaluate` stage: avg@k and pass@k of the base and stage checkpoints (paper step 9).

Consumes
- checkpoints (`evaluate.checkpoints`): `base` (`student.path`; "" = the embedded tiny student),
  `stage1..3` (`<run_dir>/stage{n}/export`, the Hugging Face folder a finished SFT stage
  writes before its `final.json`), any Hugging Face folder, or `label=folder`; by default
  every one of base, stage1, stage2, stage3 that exists (a missing one is logged and skipped);
- benchmarks (`evaluate.benchmarks`): JSONL files with a problem, a gold answer and an
  optional id per row ("" / none = the embedded demo benchmark, `embedded.demo_benchmark()`).
Each checkpoint samples `evaluate.k` responses per problem through the sampling engine
(`sample.stage.TeacherSampler` over the checkpoint with the student's model options) at
`evaluate.temperature` / `top_p` / `max_tokens`; every sample's seed is a hash of (seed,
benchmark, problem id, temperature, index), so a run is reproducible and every checkpoint
answers with the same random numbers. A scorer (`evaluate.scorer`, see scorers.py) judges each
sample in worker processes.

Produces, under `evaluate.output` (default `<run_dir>/evaluate`):
- `<checkpoint>/<benchmark>/samples.jsonl`: per problem its id, line, gold answer, k, the
  correctness of each sample (true / false / null = not judged), finish reasons, generated
  token counts, response lengths and their last `evaluate.response_tail_chars` characters;
- `<checkpoint>/<benchmark>/summary.json`: avg@k, its standard error across problems, unbiased
  pass@k for each `evaluate.pass_k`, mean length, truncation rate, and the settings used;
- `results.json` (every pair, the checkpoints x benchmarks table), `report.md` (the table, like
  the paper's ablation table) and `avg_at_k.png`; `metrics.jsonl` (progress).

Resuming: problems are cut into part files of `evaluate.problems_per_shard`, each written
atomically when its problems are sampled and scored; a pair's `summary.json` is written last and
marks it done. A re-run skips done pairs (and done parts), so a kill loses at most the parts in
flight and never leaves a pair that looks finished. Settings are fingerprinted: a folder that
holds results of other settings (k, temperature, benchmark content, ...) is an error, not mixed
in. With several processes (a shared filesystem), process p takes parts p, p+P, ... on its own
chips, and process 0 assembles each pair and writes the reports.

Paths may be gs:// (`dasd_jax.storage`): `run_dir`, `evaluate.output`, the benchmarks and the
checkpoints (a gs:// checkpoint, e.g. a stage export of a gs:// run_dir, is copied to the
local cache, `storage.download_dir`, when it is loaded: its weights are memory-mapped).
Folders are `pathlib.Path`s when local and `epath.Path`s on gs:// (the same operations).
`metrics.jsonl` is appended locally (`storage.local_dir`) and uploaded at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
from etils import epath

from dasd_jax import storage
from dasd_jax.config import Config
from dasd_jax.evaluate import metrics
from dasd_jax.evaluate.config import CHECKPOINT_NAMES
from dasd_jax.evaluate.report import TABLE_KEYS, not_judged_note
from dasd_jax.evaluate.scorers import judge_all, resolve_scorer
from dasd_jax.progress import Progress
from dasd_jax.records import BadRow, iter_jsonl, shard_name, write_json, write_jsonl

log = logging.getLogger(__name__)

# The embedded tiny student has random weights: it never writes EOS, so the demo caps the
# length, stops at a newline and takes few samples, for 4 checkpoints in about a minute on a CPU.
EMBEDDED_DEMO = dict(k=4, max_tokens=32, stop=("\n",), slots=32, max_prefill_length=256)


@dataclass(frozen=True)
class Checkpoint:
    name: str  # the folder name under evaluate.output and the row of the table
    path: Path | epath.Path  # a Hugging Face folder (local, or gs://: downloaded to load)
    embedded: bool  # the embedded tiny student or a stage trained from it (the CPU demo)
    step: int | None = None  # a stage's final step (part of the settings fingerprint)


@dataclass(frozen=True)
class Problem:
    id: str
    line: int
    prompt: str  # the user message (evaluate.prompt_template applied)
    answer: Any
    row: dict


@dataclass(frozen=True)
class Benchmark:
    name: str
    path: Path | epath.Path
    sha256: str
    problems: tuple[Problem, ...]


# --------------------------------------------------------------------------- inputs


def _path(p: str | os.PathLike) -> Path | epath.Path:
    """A `pathlib.Path` for a local path, an `epath.Path` (same operations) for gs://."""
    return storage.as_path(p) if storage.is_remote(p) else Path(p)


def _abs(p: Path | epath.Path) -> str:
    """An absolute local path; a gs:// path as it is (`resolve` would fold it into the cwd)."""
    return os.fspath(p) if storage.is_remote(p) else str(p.resolve())


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "x"


def _stage_checkpoint(cfg: Config, n: int) -> Checkpoint | str:
    from dasd_jax.train.stage import stage_dir

    folder = stage_dir(cfg, n)
    final, export = folder / "final.json", folder / "export"
    if not final.exists():
        return f"{final} does not exist (stage {n} has not finished)"
    if not (export / "config.json").exists():
        return f"{export} has no config.json"
    info = json.loads(storage.read_text(final))
    return Checkpoint(f"stage{n}", export, bool(info.get("embedded", False)), info.get("step"))


def _checkpoint(cfg: Config, spec: str) -> Checkpoint | str:
    """The checkpoint an `evaluate.checkpoints` entry names, or why it is missing."""
    if spec == "base":
        if not cfg.student.path:
            from dasd_jax import embedded

            return Checkpoint("base", embedded.tiny_student(), True)
        path = _path(cfg.student.path)
        if not (path / "config.json").exists():
            return f"student.path={path} has no config.json"
        return Checkpoint("base", path, False)
    m = re.fullmatch(r"(?:stage)?([123])", spec)
    if m:
        return _stage_checkpoint(cfg, int(m.group(1)))
    label, sep, folder = spec.partition("=")
    path = _path(folder if sep else spec)
    if not (path / "config.json").exists():
        return f"{path} is not a Hugging Face folder (no config.json)"
    if not sep:  # <run>/stage2/export -> stage2_export; other folders -> their name
        label = f"{path.parent.name}_{path.name}" if path.name == "export" else path.name
    return Checkpoint(_safe_name(label), path, False)


def resolve_checkpoints(cfg: Config) -> list[Checkpoint]:
    """The checkpoints to evaluate: the listed ones (each must exist), or by default every one
    of base, stage1, stage2, stage3 that exists."""
    explicit = bool(cfg.evaluate.checkpoints)
    out: list[Checkpoint] = []
    for spec in cfg.evaluate.checkpoints or CHECKPOINT_NAMES:
        ck = _checkpoint(cfg, spec)
        if isinstance(ck, str):
            if explicit:
                raise FileNotFoundError(f"evaluate.checkpoints: {spec!r}: {ck}")
            log.info("evaluate: skipping %s: %s", spec, ck)
            continue
        if any(c.name == ck.name for c in out):
            raise ValueError(
                f"evaluate.checkpoints: two checkpoints are named {ck.name!r}; "
                f"name them with label=folder"
            )
        out.append(ck)
    if not out:
        raise FileNotFoundError(
            f"evaluate: no checkpoint to evaluate (none of {', '.join(CHECKPOINT_NAMES)} exists "
            f"under run_dir={cfg.run_dir}); set evaluate.checkpoints"
        )
    return out


def load_benchmark(path: Path | epath.Path, name: str, cfg: Config) -> Benchmark:
    """A benchmark's problems (the first `evaluate.limit`); a bad row raises BadRow naming the
    file and line (a benchmark that silently lost rows would change the metric)."""
    ev = cfg.evaluate
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, row in iter_jsonl(path):
        problem = row.get(ev.problem_field)
        if not isinstance(problem, str) or not problem.strip():
            raise BadRow(
                path,
                line,
                f"field {ev.problem_field!r} (evaluate.problem_field) should be a non-empty "
                f"string, got {problem!r} (fields: {sorted(row)})",
            )
        if row.get(ev.answer_field) is None:
            raise BadRow(
                path,
                line,
                f"missing field {ev.answer_field!r} (evaluate.answer_field; fields: {sorted(row)})",
            )
        pid = str(row[ev.id_field]) if row.get(ev.id_field) is not None else f"line{line}"
        if pid in first_line:
            raise BadRow(path, line, f"duplicate id {pid!r} (first at line {first_line[pid]})")
        first_line[pid] = line
        prompt = ev.prompt_template.replace("{problem}", problem)
        problems.append(Problem(pid, line, prompt, row[ev.answer_field], row))
        if ev.limit and len(problems) == ev.limit:
            break
    if not problems:
        raise ValueError(f"benchmark {path} has no problems")
    with storage.open_read(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return Benchmark(name, path, digest, tuple(problems))


def resolve_benchmarks(cfg: Config) -> list[Benchmark]:
    paths = [p for p in cfg.evaluate.benchmarks if p]
    if not paths:
        from dasd_jax import embedded

        demo = _path(storage.join(cfg.run_dir, "inputs", "demo_benchmark.jsonl"))
        if not demo.exists():
            write_jsonl(demo, embedded.demo_benchmark())
        return [load_benchmark(demo, "demo", cfg)]
    out: list[Benchmark] = []
    for p in map(_path, paths):
        name = _safe_name(p.name.removesuffix(".jsonl"))
        clash = [b for b in out if b.name == name]
        if clash:
            raise ValueError(
                f"evaluate.benchmarks: {clash[0].path} and {p} would both be named {name!r}"
            )
        out.append(load_benchmark(p, name, cfg))
    return out


def demo_config(cfg: Config) -> Config:
    """The demo's caps on a config whose checkpoints are the embedded tiny student's."""
    ev, sc = cfg.evaluate, cfg.sample
    k = min(ev.k, EMBEDDED_DEMO["k"])
    evaluate = dataclasses.replace(
        ev,
        k=k,
        pass_k=tuple(sorted({p for p in ev.pass_k if p <= k} | {k})),
        max_tokens=min(ev.max_tokens, EMBEDDED_DEMO["max_tokens"]),
        slots=min(ev.slots or sc.slots, EMBEDDED_DEMO["slots"]),
    )
    sample = dataclasses.replace(
        sc,
        stop=tuple(dict.fromkeys(sc.stop + EMBEDDED_DEMO["stop"])),
        max_prefill_length=min(sc.max_prefill_length, EMBEDDED_DEMO["max_prefill_length"]),
    )
    log.info(
        "evaluate: embedded tiny student (random weights): demo caps k=%d pass_k=%s "
        "max_tokens=%d stop=%s slots=%d",
        evaluate.k,
        list(evaluate.pass_k),
        evaluate.max_tokens,
        list(sample.stop),
        evaluate.slots,
    )
    return dataclasses.replace(cfg, evaluate=evaluate, sample=sample)


def sampler_config(cfg: Config, ck: Checkpoint) -> Config:
    """The config a `TeacherSampler` over `ck` reads: the student's model options, evaluate's
    sampling parameters, sample's engine sizes and chat format."""
    ev = cfg.evaluate
    sample = dataclasses.replace(
        cfg.sample,
        top_p=ev.top_p,
        top_k=ev.top_k,
        max_tokens=ev.max_tokens,
        slots=ev.slots or cfg.sample.slots,
    )
    model = dataclasses.replace(cfg.student, path=str(ck.path))
    return dataclasses.replace(cfg, sample=sample, teacher=model)


def pair_settings(cfg: Config, ck: Checkpoint, bench: Benchmark) -> dict:
    """Everything a pair's numbers depend on; a folder written with other settings is stale."""
    ev, sc = cfg.evaluate, cfg.sample
    return {
        "checkpoint": _abs(ck.path),
        "checkpoint_step": ck.step,
        "benchmark_sha256": bench.sha256,
        "problems": len(bench.problems),
        "problem_field": ev.problem_field,
        "answer_field": ev.answer_field,
        "id_field": ev.id_field,
        "prompt_template": ev.prompt_template,
        "system_prompt": sc.system_prompt,
        "prompt_format": sc.prompt_format,
        "scorer": ev.scorer,
        "k": ev.k,
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "top_k": ev.top_k,
        "max_tokens": ev.max_tokens,
        "stop": list(sc.stop),
        "seed": cfg.seed,
        "dtype": cfg.student.dtype,
        "limit": ev.limit,
        "problems_per_shard": ev.problems_per_shard,
        "response_tail_chars": ev.response_tail_chars,
    }


def _check_settings(path: Path | epath.Path, settings: dict, what: str) -> None:
    old = json.loads(storage.read_text(path))
    old = old.get("settings", old)
    if old != settings:
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise RuntimeError(
            f"{path.parent} holds {what} of other settings (differing: {', '.join(diff)}); "
            f"delete that folder or set evaluate.output to another folder"
        )


# --------------------------------------------------------------------------- one pair


def _tail(text: str, n: int) -> str | None:
    if n == 0:
        return None
    return text if n < 0 or len(text) <= n else text[-n:]


def evaluate_shard(
    cfg: Config,
    sampler,
    bench: Benchmark,
    shard: int,
    problems: Sequence[Problem],
    progress: Progress | None = None,
) -> list[dict]:
    """k samples per problem through one continuous batch, judged; one row per problem."""
    from dasd_jax.sample.shards import Job, candidate_seed

    ev = cfg.evaluate
    jobs = []
    for p in problems:
        tokens, reason = sampler.prepare(p.prompt)
        if reason:
            raise BadRow(bench.path, p.line, f"problem {p.id!r}: {reason}")
        seeds = [
            candidate_seed(cfg.seed, f"{bench.name}\x00{p.id}", ev.temperature, i)
            for i in range(ev.k)
        ]
        jobs.append(Job((bench.name, shard, p.line), p.id, p.prompt, tokens, ev.temperature, seeds))
    got: dict[int, list] = {p.line: [None] * ev.k for p in problems}
    for job, index, cand in sampler.stream(iter(jobs), progress):
        got[job.key[2]][index] = _answer(cand)
    items = [(c.response, p.answer, p.row) for p in problems for c in got[p.line]]
    verdicts = judge_all(ev.scorer, items, ev.verify_timeout_s, ev.score_workers)
    rows = []
    for j, p in enumerate(problems):
        cands = got[p.line]
        judged = verdicts[j * ev.k : (j + 1) * ev.k]
        correct = [v if status == "ok" else None for status, v in judged]
        row = {
            "id": p.id,
            "line": p.line,
            "answer": p.answer,
            "k": ev.k,
            "n_correct": sum(v is True for v in correct),
            "correct": correct,
            "finish_reasons": [c.finish_reason for c in cands],
            "lengths": [c.n_tokens for c in cands],
            "response_chars": [len(c.response) for c in cands],
        }
        errors = {i: f"{s}: {v}" if v else s for i, (s, v) in enumerate(judged) if s != "ok"}
        if errors:
            row["judge_errors"] = errors
        refused = {i: c.refused for i, c in enumerate(cands) if c.refused}
        if refused:  # judged on their raw text all the same (dropping them would bias avg@k)
            row["malformed"] = refused
        if ev.response_tail_chars:
            row["responses"] = [_tail(c.response, ev.response_tail_chars) for c in cands]
        rows.append(row)
    return rows


@dataclass(frozen=True)
class _Answer:
    """What a sample is judged on: its response, or for a sample the sample stage would refuse
    (malformed harmony, text not in NFC) its raw text, with the reason in `refused`."""

    response: str
    finish_reason: str
    n_tokens: int
    refused: str | None = None


def _answer(c) -> _Answer:
    from dasd_jax.sample.shards import Rejected

    if isinstance(c, Rejected):
        return _Answer(c.text, c.finish_reason, c.n_tokens, c.reason)
    return _Answer(c.response, c.finish_reason, len(c.teacher.token_ids))


def summarize_pair(rows: Sequence[dict], pass_k: Sequence[int]) -> dict:
    """A pair's metrics from its samples.jsonl rows. A sample not judged (timeout, scorer
    error, or None) counts as not correct in avg@k and pass@k; `avg@k_upper` counts it as
    correct, and `warning` (only when some are not judged) says so (docs/evaluate.md)."""
    agg = metrics.aggregate([r["k"] for r in rows], [r["n_correct"] for r in rows], pass_k)
    upper = metrics.aggregate(
        [r["k"] for r in rows], [r["k"] - r["correct"].count(False) for r in rows], ()
    )
    lengths = [n for r in rows for n in r["lengths"]]
    reasons = Counter(f for r in rows for f in r["finish_reasons"])
    verdicts = [v for r in rows for v in r["correct"]]
    errors = Counter(e.split(":")[0] for r in rows for e in r.get("judge_errors", {}).values())
    summary = {
        "problems": agg["problems"],
        "samples": len(verdicts),
        "avg@k": agg["avg"],
        "stderr": agg["stderr"],
        "pass@k": {str(k): v for k, v in agg["pass@k"].items()},
        "mean_length": sum(lengths) / len(lengths) if lengths else 0.0,
        "truncation_rate": reasons.get("length", 0) / len(lengths) if lengths else 0.0,
        "finish_reasons": dict(reasons),
        "not_judged": sum(v is None for v in verdicts),
        "timeouts": errors.get("timeout", 0),
        "judge_errors": dict(errors),
        "avg@k_upper": upper["avg"],
    }
    if note := not_judged_note(summary):
        summary["warning"] = note
    return summary


def _pair_done(pair_dir: Path | epath.Path, settings: dict) -> dict | None:
    """The pair's summary if it finished with these settings (leftovers are cleaned)."""
    summary = pair_dir / "summary.json"
    if not summary.exists():
        if (pair_dir / "settings.json").exists():
            _check_settings(pair_dir / "settings.json", settings, "partial results")
        return None
    _check_settings(summary, settings, "results")
    for f in [*pair_dir.glob("part-*.jsonl"), pair_dir / "settings.json"]:
        f.unlink(missing_ok=True)  # a kill after summary.json, before the clean-up
    return json.loads(storage.read_text(summary))


def finalize_pair(
    cfg: Config,
    ck: Checkpoint,
    bench: Benchmark,
    pair_dir: Path | epath.Path,
    settings: dict,
    seconds: float,
) -> dict:
    """Parts -> samples.jsonl, then summary.json (written last: it marks the pair done)."""
    ev = cfg.evaluate
    n_shards = -(-len(bench.problems) // ev.problems_per_shard)
    parts = [pair_dir / shard_name(s) for s in range(n_shards)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise RuntimeError(f"{pair_dir}: parts {missing} are missing (did a process fail?)")
    rows = [r for p in parts for _, r in iter_jsonl(p)]
    write_jsonl(pair_dir / "samples.jsonl", rows)
    summary = {
        "checkpoint": ck.name,
        "benchmark": bench.name,
        "checkpoint_path": str(ck.path),
        "benchmark_path": str(bench.path),
        "k": ev.k,
        **summarize_pair(rows, ev.pass_k),
        "seconds": round(seconds, 2),
        "settings": settings,
    }
    write_json(pair_dir / "summary.json", summary)
    for p in [*parts, pair_dir / "settings.json"]:
        p.unlink(missing_ok=True)
    return summary


# --------------------------------------------------------------------------- the stage


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(cfg: Config) -> dict:
    """Evaluate every checkpoint on every benchmark; returns the summary (with the table)."""
    from dasd_jax.evaluate.report import write_report
    from dasd_jax.sample.stage import TeacherSampler

    t0 = time.perf_counter()
    out_dir = _path(cfg.evaluate.output or storage.join(cfg.run_dir, "evaluate"))
    checkpoints = resolve_checkpoints(cfg)
    if any(ck.embedded for ck in checkpoints):
        cfg = demo_config(cfg)
    ev = cfg.evaluate
    resolve_scorer(ev.scorer, ev.verify_timeout_s)  # a bad hook fails before any model loads
    benchmarks = resolve_benchmarks(cfg)
    n_proc, proc = jax.process_count(), jax.process_index()

    pairs = [(ck, b) for ck in checkpoints for b in benchmarks]
    settings = {(ck.name, b.name): pair_settings(cfg, ck, b) for ck, b in pairs}
    done = {
        (ck.name, b.name): s
        for ck, b in pairs
        if (s := _pair_done(out_dir / ck.name / b.name, settings[ck.name, b.name])) is not None
    }
    for key in done:
        log.info("evaluate: %s/%s already done, skipped", *key)
    todo = sum(len(b.problems) for ck, b in pairs if (ck.name, b.name) not in done)
    # progress lines are appended: a local file (a mirror when out_dir is gs://), uploaded below
    remote = storage.is_remote(out_dir)
    metrics_name = "metrics.jsonl" if proc == 0 or not remote else f"metrics.process{proc}.jsonl"
    metrics_file = Path(storage.local_dir(out_dir)) / metrics_name
    progress = Progress("evaluate", todo * ev.k, metrics_file, every_s=cfg.sample.progress_every_s)
    summaries = dict(done)
    for ck in checkpoints:
        pending = [b for b in benchmarks if (ck.name, b.name) not in done]
        if not pending:
            continue
        log.info("evaluate: loading %s from %s", ck.name, ck.path)
        local = storage.download_dir(ck.path)  # a gs:// checkpoint: a copy in the cache
        sampler = TeacherSampler(local, sampler_config(cfg, ck), model_name=ck.name)
        for bench in pending:
            t_pair = time.perf_counter()
            pair_dir = out_dir / ck.name / bench.name
            pair_settings_ = settings[ck.name, bench.name]
            if proc == 0:
                write_json(pair_dir / "settings.json", pair_settings_)
            problems = bench.problems
            for shard, start in enumerate(range(0, len(problems), ev.problems_per_shard)):
                part = pair_dir / shard_name(shard)
                if shard % n_proc != proc or part.exists():
                    continue
                chunk = problems[start : start + ev.problems_per_shard]
                write_jsonl(part, evaluate_shard(cfg, sampler, bench, shard, chunk, progress))
            _sync(f"dasd_jax evaluate {ck.name}/{bench.name}")
            if proc == 0:
                s = finalize_pair(
                    cfg, ck, bench, pair_dir, pair_settings_, time.perf_counter() - t_pair
                )
                summaries[ck.name, bench.name] = s
                pk = " ".join(f"pass@{k}={v:.3f}" for k, v in s["pass@k"].items())
                stderr = "" if s["stderr"] is None else f" +- {s['stderr']:.3f}"
                log.info(
                    "evaluate: %s/%s: avg@%d=%.3f%s %s, mean length %.0f, truncated %.1f%%",
                    ck.name,
                    bench.name,
                    ev.k,
                    s["avg@k"],
                    stderr,
                    pk,
                    s["mean_length"],
                    100 * s["truncation_rate"],
                )
                if s.get("warning"):
                    log.warning("evaluate: %s/%s: %s", ck.name, bench.name, s["warning"])
            _sync(f"dasd_jax evaluate {ck.name}/{bench.name} done")
        del sampler
    progress.report()
    if remote:
        storage.copy(metrics_file, out_dir / metrics_name)
    if proc != 0:
        return {"process": proc, "skipped": "results are written by process 0"}

    table = {
        ck.name: {
            b.name: {k: summaries[ck.name, b.name].get(k) for k in TABLE_KEYS} for b in benchmarks
        }
        for ck in checkpoints
    }
    n_problems = sum(len(b.problems) for b in benchmarks)
    results = {
        "k": ev.k,
        "temperature": ev.temperature,
        "top_p": ev.top_p,
        "max_tokens": ev.max_tokens,
        "scorer": ev.scorer,
        "checkpoints": {ck.name: str(ck.path) for ck in checkpoints},
        "benchmarks": {b.name: str(b.path) for b in benchmarks},
        "table": table,
        "counts": {
            "in": n_problems * len(checkpoints),
            "out": sum(s["problems"] for s in summaries.values()),
            "rejected": 0,  # a bad benchmark row is an error, never dropped
        },
    }
    write_json(out_dir / "results.json", results)
    files = write_report(out_dir, results)
    return {
        "output": str(out_dir),
        **results,
        "skipped_pairs": len(done),
        "evaluated_pairs": len(pairs) - len(done),
        "demo": any(ck.embedded for ck in checkpoints),
        "files": ["results.json", *files],
        "seconds": round(time.perf_counter() - t0, 2),
    }
