"""The `mixed_policy` stage (paper step 7): the stage-2 student answers training questions
under a length budget, answers that use the whole budget are cut, the teacher continues each
prefix, and the continuations that pass the selection filters become stage 3's data.

Consumes
- the DAS-selected training set, `mixed_policy.sources` (default `<run_dir>/select/` and
  `<run_dir>/select_high_t/` ArrayRecords of `SFTRecord`s): `mixed_policy.questions` unique
  prompts are drawn (seeded), each with its teacher response (the first record of the prompt);
- the student, `mixed_policy.student` (default `<run_dir>/stage2/export`, the HF folder that
  train stage 2 writes with `final.json`) with `student.*` model options;
- the teacher, `teacher.path` ("" = the embedded tiny teacher) with `teacher.*` options;
- engine knobs from `sample.*` (slots, prefill chunk, decode steps, cache dtype, top-p/k).

Phases: (1) the student answers every question with a budget of ceil(length_factor x the
teacher response's student tokens); (2) answers that stop before the budget are rejected
(`not_capped`); the others are cut after k tokens, k uniform inside (cut_low L, cut_high L)
(`cut.choose_cut`, keyed by the question, optionally snapped to a sentence boundary); (3) the
teacher continues prompt + prefix (the student's `<think>` text, for a harmony teacher
mapped to its channels) in one continuous batch; (4) the whole response (student prefix +
teacher continuation) goes through `select.filters.filter_batch` (`filters.*`); (5) output.

Produces, under `mixed_policy.output` (default `<run_dir>/mixed_policy`), every file written
under a temporary name and renamed:
- `train-NNNNN.array_record`: one per shard that kept something: `SFTRecord`s with
  source="mixed_policy", `student_prefix_chars` = the prefix's length and provenance in
  `meta` (student, teacher, budget, L, cut token and chars, seeds, finish reasons);
- `samples.jsonl` (one line per kept row), `rejects.jsonl` (every question not kept, with its
  reason: `cap_over_limit`, `not_capped`, `too_short`, `empty_prefix`, `noncanonical_prefix`,
  `prefix_not_think`, `prefix_too_long`, `empty_continuation`, `continuation_truncated`,
  `teacher_error`, a filter reason; unreadable source records as `bad_record`);
- `summary.json` (`counts.in = counts.out + counts.rejected`, rejects by reason, cut and
  length statistics), `report.md` + `plots/` (`report.py`), `metrics.jsonl` (progress);
- `plan.json` (`plan.py`: the drawn questions, budgets, engine sizes and the settings they
  depend on) and `shards/` (`shards.py`: journals and per-shard files).

Resuming: questions are cut into shards of `questions_per_shard`; each finished question
(its student answer and cut, then its outcome) is appended with fsync to the shard's journal;
a shard's files are written when its last question is decided, `done-NNNNN.json` last, then
the journal is removed. Seeds and cuts are functions of (seed, question) only, and engine
sizes of the plan only, so a killed run loses no finished question and a restart writes the
same files. A restart with settings that change the result stops and names them. Several
processes: process p takes shards p, p+P, ... with its own engines on its own devices (all
its student answers, then all its continuations: one model in memory at a time); process 0
waits for all and writes the shared files.

Paths may be gs:// (`dasd_jax.storage`): `run_dir`, `mixed_policy.output`, the sources (read
by array_record's own Cloud Storage reader) and the student and teacher folders (copied to
the local cache, `storage.download_dir`, before loading: weights are memory-mapped). Output
folders are `pathlib.Path`s when local, `epath.Path`s on gs://. What is appended to (journals,
`metrics.jsonl`) lives in the output's local mirror (`storage.local_dir`); every other file
is published atomically; `metrics.jsonl` is uploaded when the run ends. A gs:// run resumed
on another machine has no journals: it redoes the shards that were not done.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import jax
from etils import epath

from dasd_jax import storage
from dasd_jax.config import Config, to_dict
from dasd_jax.mixed_policy import cut as cutlib
from dasd_jax.mixed_policy.plan import SourceRecords, StageError, fingerprint, load_or_build_plan
from dasd_jax.mixed_policy.shards import Shard, reject
from dasd_jax.progress import Progress
from dasd_jax.records import write_json, write_jsonl
from dasd_jax.schema import SFTRecord
from dasd_jax.select import filters

log = logging.getLogger(__name__)

SOURCE = "mixed_policy"
# Demo caps. The embedded student is random (stage 2 of the demo trains it a few steps): it
# never emits EOS nor writes <think>, so its questions and budget are capped, it stops at a
# newline (so some answers end under their budget), the structure filter is off and a harmony
# teacher reads its prefix as thinking text. The embedded teacher (a tiny gpt-oss trained on
# the demo rows) stops by itself: only its length and the engine are capped.
DEMO_STUDENT = dict(questions=8, student_tokens=24, stop=("\n",), slots=16)
DEMO_TEACHER = dict(teacher_max_tokens=160, slots=16)


# --------------------------------------------------------------------------- inputs


def _path(p: str | os.PathLike) -> Path | epath.Path:
    """A `pathlib.Path` for a local path, an `epath.Path` (same operations) for gs://."""
    return storage.as_path(p) if storage.is_remote(p) else Path(p)


def resolve_student(cfg: Config) -> tuple[Path | epath.Path, bool]:
    """(student HF folder, local or gs://; is it the embedded random tiny model)."""
    from dasd_jax.tokenizer import cache_root

    mp = cfg.mixed_policy
    if mp.student:
        path = _path(mp.student)
        if not (path / "config.json").exists():
            raise StageError(f"mixed_policy.student={path}: not a Hugging Face folder")
        embedded = (
            not storage.is_remote(path)
            and path.resolve().parent == cache_root().resolve()
            and path.name.startswith("tiny-qwen3-v1")
        )
        return path, embedded
    folder = _path(storage.join(cfg.run_dir, "stage2"))
    if not (folder / "final.json").exists():
        raise StageError(
            f"the mixed-policy student is train stage 2's export, but {folder / 'final.json'} "
            "does not exist: run `python -m dasd_jax.launch --stage=2` first with the same "
            "run_dir, or set mixed_policy.student to a Hugging Face folder"
        )
    final = json.loads(storage.read_text(folder / "final.json"))
    path = _path(final.get("export") or folder / "export")
    if not (path / "config.json").exists():
        raise StageError(f"stage 2 finished but its export {path} has no config.json")
    return path, bool(final.get("embedded", False))


def resolve_teacher(cfg: Config) -> tuple[Path, str, bool]:
    """(teacher HF folder, its name in provenance, is it the embedded tiny teacher)."""
    from dasd_jax import embedded

    if cfg.teacher.path:  # a gs:// folder: a copy in the local cache
        return Path(storage.download_dir(cfg.teacher.path)), str(cfg.teacher.path), False
    return embedded.tiny_teacher(), "embedded-tiny-teacher", True


def source_files(cfg: Config) -> list[str]:
    files: list[str] = []
    for pattern in cfg.mixed_policy.sources:
        files += storage.glob(pattern.replace("{run_dir}", str(cfg.run_dir)))
    return list(dict.fromkeys(files))


def demo_config(cfg: Config, student: bool, teacher: bool) -> Config:
    """The demo caps for an embedded student and/or teacher, each logged."""
    mp, sc, changes = cfg.mixed_policy, cfg.sample, {}
    if student:
        changes["mixed_policy"] = dict(
            questions=min(mp.questions, DEMO_STUDENT["questions"]), non_think_prefix="as_thinking"
        )
        changes["filters"] = dict(structure=False)
        changes["sample"] = dict(slots=min(sc.slots, DEMO_STUDENT["slots"]))
    if teacher:
        cap = min(mp.teacher_max_tokens, DEMO_TEACHER["teacher_max_tokens"])
        changes.setdefault("mixed_policy", {})["teacher_max_tokens"] = cap
        changes.setdefault("sample", {})["slots"] = min(sc.slots, DEMO_TEACHER["slots"])
    if jax.default_backend() == "cpu":  # bf16 matmuls are slow on a CPU; the weights are fp32
        for name, on in (("student", student), ("teacher", teacher)):
            if on:
                changes[name] = dict(dtype="float32")
    log.warning(
        "mixed_policy: embedded tiny %s: DEMO caps %s%s. Set mixed_policy.demo=false to lift them.",
        " and ".join(n for n, e in (("student (random)", student), ("teacher", teacher)) if e),
        changes,
        f", student budget <= {DEMO_STUDENT['student_tokens']} tokens, stop at a newline"
        if student
        else "",
    )
    return dataclasses.replace(
        cfg,
        **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in changes.items()},
    )


def content_and_engines(cfg: Config, files: list[str]) -> dict:
    """What the stage's files depend on beyond `plan.fingerprint` (names only): the sources'
    sizes and edge hashes (`pipeline.fingerprint`: the plan points at records by index), the
    engine sizes read from `sample.*` and the models' dtypes and attention (batch shapes and
    numerics), so that a resume under others is refused too."""
    from dasd_jax.pipeline import fingerprint as content

    sc = cfg.sample
    return {
        "source_content": [{k: content(f).get(k) for k in ("bytes", "sha256")} for f in files],
        "engine": {
            "slots": sc.slots,
            "prefill_chunk": sc.prefill_chunk,
            "decode_steps": sc.decode_steps,
            "cache_dtype": sc.cache_dtype,
        },
        "models": {
            name: {
                k: v for k, v in to_dict(getattr(cfg, name)).items() if k not in ("path", "remat")
            }
            for name in ("student", "teacher")
        },
    }


# --------------------------------------------------------------------------- phases


def _sampler(path: Path, cfg: Config, model: Any, name: str, **sample):
    from dasd_jax.sample.stage import TeacherSampler

    c = dataclasses.replace(cfg, teacher=model, sample=dataclasses.replace(cfg.sample, **sample))
    return TeacherSampler(path, c, model_name=name)


def student_phase(cfg, plan, shards, records, student, student_tok, metrics, demo) -> None:
    """Phase 1-2: the student answers; capped answers are cut and journaled. `student` is
    (local HF folder, name in provenance); `metrics` the local progress file."""
    from dasd_jax.sample.driver import Driver, Request
    from dasd_jax.sample.shards import candidate_seed

    mp = cfg.mixed_policy
    todo = []
    for sh in shards:
        for x in sh.questions:
            if x["q"] in sh.final or x["q"] in sh.student:
                continue
            if x["cap"] > mp.max_student_tokens:
                sh.append(reject(x, "cap_over_limit", cap=x["cap"], limit=mp.max_student_tokens))
            else:
                todo.append((sh, x))
    if not todo:
        return
    eng = plan["engines"]
    student_path, student_name = student
    sampler = _sampler(
        student_path,
        cfg,
        cfg.student,
        student_name,
        max_tokens=eng["student_decode"],
        max_prefill_length=eng["student_prefill"],
        system_prompt=cfg.train.system_prompt,
        prompt_format="auto",
        stop=DEMO_STUDENT["stop"] if demo else (),
    )
    T = mp.student_temperature
    splitter = (
        dataclasses.replace(cfg.select.splitter, max_chars=None) if mp.snap == "sentence" else None
    )

    def requests():
        for sh, x in todo:
            rec = records.get(x["record"])
            seed = candidate_seed(cfg.seed, f"{x['id']}\x00{SOURCE}.student", T, 0)
            yield Request(
                (sh.index, x["q"]),
                sampler.encode_prompt(rec.prompt),
                [sampler.params(T, seed, x["cap"])],
                meta={"seed": seed, "x": x, "shard": sh},
            )

    progress = Progress(f"{SOURCE}.student", len(todo), metrics, mp.progress_every_s)
    for c in Driver(sampler.engine, sampler.token_text, progress).run(requests()):
        x, sh = c.meta["x"], c.meta["shard"]
        L, seed = len(c.token_ids), c.meta["seed"]
        if c.finish_reason != "length" or L < x["cap"]:
            sh.append(
                reject(x, "not_capped", cap=x["cap"], student_tokens=L, finish=c.finish_reason)
            )
            continue
        pieces = [sampler.token_text.bytes_of(i) for i in c.token_ids]
        sent = None
        if splitter is not None:
            text, offsets = cutlib.text_of_pieces(pieces)
            sent = cutlib.sentence_boundaries(text, offsets, splitter)
        got = cutlib.choose_cut(
            L,
            x["id"],
            cfg.seed,
            low=mp.cut_low,
            high=mp.cut_high,
            min_tokens=mp.min_cut_tokens,
            clean=cutlib.clean_boundaries(pieces),
            sentences=sent,
        )
        if isinstance(got, str):
            sh.append(reject(x, got, cap=x["cap"], student_tokens=L))
            continue
        ids = [int(i) for i in c.token_ids[: got.k]]
        prefix = cutlib.prefix_of(pieces, got.k)
        if not prefix:  # k tokens without text (ids past the tokenizer's vocabulary)
            sh.append(reject(x, "empty_prefix", cap=x["cap"], cut_token=got.k))
            continue
        canonical = student_tok.encode(prefix, add_special_tokens=False) == ids
        if mp.require_canonical_prefix and not canonical:
            sh.append(reject(x, "noncanonical_prefix", cap=x["cap"], cut_token=got.k))
            continue
        sh.append(
            {
                "q": x["q"],
                "phase": "student",
                "L": L,
                "k": got.k,
                "drawn": got.drawn,
                "interval": [got.lo, got.hi],
                "snapped": got.snapped,
                "canonical": canonical,
                "seed": seed,
                "prefix_ids": ids,
            }
        )
    progress.report()


def teacher_view(prefix: str, harmony: bool, wrap: bool = False) -> str | None:
    """The student prefix as the teacher reads it after the prompt: verbatim for a ChatML
    teacher; for a harmony teacher (gpt-oss) its `<think>` text mapped to an open analysis
    message (or, past `</think>`, to analysis + an open final message). A harmony view of a
    prefix that does not start with `<think>` is None (rejected), or with `wrap` the prefix
    read as thinking text."""
    from dasd_jax.select.filters import think_to_harmony

    if not harmony:
        return prefix
    if wrap and not prefix.lstrip().startswith("<think>"):
        prefix = "<think>\n" + prefix
    try:
        return think_to_harmony(prefix).removesuffix("<|return|>")
    except ValueError:
        return None


class MalformedContinuation(ValueError):
    """The teacher's continuation is malformed harmony; `reason` from `harmony.MALFORMED`."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


def continuation_of(
    view_text: str,
    generated: str,
    harmony: bool,
    ended: str | None = None,
    repair: bool = True,
) -> tuple[str, str]:
    """(the teacher's continuation in `<think>` form, the prefix as the teacher's text maps
    back): the continuation is what the whole response adds after the prefix, as
    `TeacherSampler.continue_` computes it. For a harmony teacher the whole text is read by
    the one parser of generated harmony (`ended`, `repair`: see `harmony.parse_generated`):
    `MalformedContinuation` names its reason; ValueError when the mapped whole response does
    not extend the mapped prefix."""
    from dasd_jax.models import harmony as hm

    whole, seen = view_text + generated, view_text
    if harmony:
        parsed, whole = hm.parse_generated_text(whole, ended, repair)
        if whole is None:
            raise MalformedContinuation(parsed.reason, parsed.detail)
        seen = hm.parse_generated_text(view_text, "")[1] or ""
    if not whole.startswith(seen):
        raise ValueError("the teacher's response in <think> form does not extend the prefix")
    return whole[len(seen) :], seen


def teacher_phase(cfg, plan, shards, records, student_name, student_tok, teacher, metrics) -> None:
    """Phase 3-4: the teacher continues every cut prefix; whole responses are filtered.
    `teacher` is (local HF folder, name in provenance); `metrics` the local progress file."""
    from dasd_jax.sample.driver import Driver, Request
    from dasd_jax.sample.shards import candidate_seed
    from dasd_jax.sample.text import TokenText, ended_by

    mp = cfg.mixed_policy
    wrap = mp.non_think_prefix == "as_thinking"
    todo = [
        (sh, x)
        for sh in shards
        for x in sh.questions
        if x["q"] in sh.student and x["q"] not in sh.final
    ]
    if not todo:
        return
    teacher_path, teacher_name = teacher
    sampler = _sampler(
        teacher_path,
        cfg,
        cfg.teacher,
        teacher_name,
        max_tokens=mp.teacher_max_tokens,
        max_prefill_length=plan["engines"]["teacher_prefill"],
    )
    student_text = TokenText(student_tok)
    T = mp.teacher_temperature
    harmony = sampler.format == "harmony"

    def requests():
        for sh, x in todo:
            st = sh.student[x["q"]]
            rec = records.get(x["record"])
            prefix = cutlib.prefix_of([student_text.bytes_of(i) for i in st["prefix_ids"]], st["k"])
            raw = teacher_view(prefix, harmony, wrap)
            if raw is None:
                sh.append(reject(x, "prefix_not_think", cut_token=st["k"]))
                continue
            t_ids = list(sampler.tokenizer.encode(raw, add_special_tokens=False))
            tokens = sampler.encode_prompt(rec.prompt) + t_ids
            if len(tokens) > sampler.engine.max_prefill_length:
                sh.append(
                    reject(
                        x,
                        "prefix_too_long",
                        tokens=len(tokens),
                        limit=sampler.engine.max_prefill_length,
                    )
                )
                continue
            # the seed of `TeacherSampler.continue_` for this prompt id and prefix
            seed = candidate_seed(cfg.seed, f"{x['id']}\x00continue\x00{len(t_ids)}", T, 0)
            yield Request(
                (sh.index, x["q"]),
                tokens,
                [sampler.params(T, seed, mp.teacher_max_tokens)],
                meta=dict(x=x, shard=sh, rec=rec, prefix=prefix, t_ids=t_ids, seed=seed),
            )

    progress = Progress(f"{SOURCE}.teacher", len(todo), metrics, mp.progress_every_s)
    for c in Driver(sampler.engine, sampler.token_text, progress).run(requests()):
        m = c.meta
        x, sh, st = m["x"], m["shard"], m["shard"].student[m["x"]["q"]]
        t_prefix = sampler.token_text.text(m["t_ids"])[0]
        try:
            continuation, seen = continuation_of(
                t_prefix,
                c.text or "",
                harmony,
                ended_by(c.finish_reason, c.stop, sampler.token_text),
                cfg.sample.harmony_repair,
            )
        except MalformedContinuation as e:
            sh.append(reject(x, f"harmony_{e.reason}", detail=str(e)))
            continue
        except ValueError as e:
            sh.append(reject(x, "teacher_error", detail=str(e)))
            continue
        response = m["prefix"] + continuation
        if not continuation:  # the teacher stopped at once: nothing but a cut-off answer
            sh.append(reject(x, "empty_continuation", teacher_finish=c.finish_reason))
            continue
        if c.finish_reason == "length" and not mp.keep_truncated:
            sh.append(reject(x, "continuation_truncated", continuation_tokens=len(c.token_ids)))
            continue
        rec = m["rec"]
        n_student = x["prompt_tokens"] + len(student_tok.encode(response, add_special_tokens=False))
        reasons = filters.filter_batch(
            [filters.FilterInput(response, n_student, None)], cfg.filters
        )[0]
        if reasons:
            sh.append(reject(x, reasons[0], reasons=reasons, student_tokens=n_student))
            continue
        prov = {
            "question": x["id"],
            "source_record": rec.id,
            "source_meta": rec.meta,
            "student": student_name,
            "teacher": teacher_name,
            "seed": cfg.seed,
            "student_seed": st["seed"],
            "teacher_seed": m["seed"],
            "student_temperature": mp.student_temperature,
            "teacher_temperature": T,
            "teacher_tokens": x["teacher_tokens"],
            "cap": x["cap"],
            "L": st["L"],
            "cut_token": st["k"],
            "cut_drawn": st["drawn"],
            "cut_interval": st["interval"],
            "cut_fraction": st["k"] / st["L"],
            "cut_chars": len(m["prefix"]),
            "snapped": st["snapped"],
            "prefix_canonical": st["canonical"],
            "student_finish": "length",
            "teacher_finish": c.finish_reason,
            "teacher_stop": c.stop,
            "teacher_prefix_tokens": len(m["t_ids"]),
            "teacher_prefix_matches": seen == m["prefix"],
            "continuation_tokens": len(c.token_ids),
        }
        record = SFTRecord(
            id=f"{SOURCE}/{x['id']}",
            prompt=rec.prompt,
            response=response,
            source=SOURCE,
            domain=rec.domain,
            temperature=T,
            student_prefix_chars=len(m["prefix"]),
            meta=prov,
        )
        sample = {
            "question": x["id"],
            "record_id": rec.id,
            "domain": rec.domain,
            "cap": x["cap"],
            "L": st["L"],
            "cut_token": st["k"],
            "cut_fraction": round(st["k"] / st["L"], 6),
            "prefix_tokens": st["k"],
            "prefix_chars": len(m["prefix"]),
            "continuation_tokens": len(c.token_ids),
            "continuation_chars": len(continuation),
            "response_student_tokens": n_student - x["prompt_tokens"],
            "snapped": st["snapped"],
            "prefix_canonical": st["canonical"],
            "teacher_finish": c.finish_reason,
        }
        sh.append(
            {"q": x["q"], "phase": "final", "record": dataclasses.asdict(record), "sample": sample}
        )
    progress.report()


# --------------------------------------------------------------------------- the stage


def run(cfg: Config) -> dict:
    """Student answers -> cuts -> teacher continuations -> filters -> stage-3 data."""
    from dasd_jax.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    mp = cfg.mixed_policy
    out = _path(mp.output or storage.join(cfg.run_dir, SOURCE))
    student_path, student_embedded = resolve_student(cfg)
    teacher_path, teacher_name, teacher_embedded = resolve_teacher(cfg)
    demo_student = mp.demo and student_embedded
    demo = demo_student or (mp.demo and teacher_embedded)
    if demo:
        cfg = demo_config(cfg, demo_student, mp.demo and teacher_embedded)
        mp = cfg.mixed_policy
    cap_limit = DEMO_STUDENT["student_tokens"] if demo_student else None
    if cfg.filters.answer:
        log.warning(
            "mixed_policy: filters.answer is on but SFTRecords carry no reference answer: unchecked"
        )
    files = source_files(cfg)
    if not files and demo_student:
        from dasd_jax.train.data import write_demo_records

        files = [
            str(
                write_demo_records(
                    storage.join(cfg.run_dir, "demo_data", "mixed_policy_questions.array_record"),
                    "demo",
                    1,
                )
            )
        ]
        log.warning(
            "mixed_policy: no selected records at %s: using the EMBEDDED DEMO rows %s",
            mp.sources,
            files[0],
        )
    if not files:
        raise StageError(
            f"no selected training records match mixed_policy.sources={list(mp.sources)} "
            f"(run_dir={cfg.run_dir}): run `python -m dasd_jax.launch --stage=select` first, "
            "or set mixed_policy.sources"
        )
    storage.makedirs(out)
    local = storage.local_dir(out)  # journals and progress: `out` itself when local
    remote = storage.is_remote(out)
    n_proc, proc = jax.process_count(), jax.process_index()
    metrics_name = "metrics.jsonl" if proc == 0 or not remote else f"metrics.process{proc}.jsonl"
    metrics = Path(local) / metrics_name
    if remote and not metrics.exists() and (out / metrics_name).exists():
        storage.copy(out / metrics_name, metrics)  # resumed on another machine: continue it
    student_local = Path(storage.download_dir(student_path))  # gs://: a copy in the cache
    student_tok = load_tokenizer(student_local)
    records = SourceRecords(files)
    fp = {
        **fingerprint(cfg, files, student_path, teacher_name, demo),
        **content_and_engines(cfg, files),
    }
    plan = load_or_build_plan(cfg, out, records, student_tok, fp, cap_limit)
    qs = plan["questions"]
    size = mp.questions_per_shard
    n_shards = math.ceil(len(qs) / size)
    mine = []
    for k in range(proc, n_shards, n_proc):
        sh = Shard(k, out, qs[k * size : (k + 1) * size], local=local)
        if storage.exists(sh.done):
            sh.journal.unlink(missing_ok=True)  # dead: left by a kill just after the marker
            continue
        sh.read_journal()
        mine.append(sh)
    log.info(
        "mixed_policy: %d questions (%d unique prompts in %d records), %d shards, %d to do here",
        len(qs),
        plan["unique_prompts"],
        plan["source_records"],
        n_shards,
        len(mine),
    )
    for sh in mine:
        if sh.complete and sh.stats is None:  # every outcome journaled before a kill
            sh.finalize()
    student = (student_local, str(student_path))
    student_phase(cfg, plan, mine, records, student, student_tok, metrics, demo_student)
    gc.collect()  # the student's engine and weights go before the teacher's arrive
    teacher = (teacher_path, teacher_name)
    teacher_phase(cfg, plan, mine, records, str(student_path), student_tok, teacher, metrics)
    records.close()
    if remote and metrics.exists():
        storage.copy(metrics, out / metrics_name)
    unfinished = [sh.index for sh in mine if sh.stats is None]
    if unfinished:
        raise RuntimeError(f"mixed_policy: shards {unfinished} did not finish")
    written = [sh.stats for sh in mine]
    if n_proc > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mixed_policy: all shards written")
    if proc != 0:
        return {"process": proc, "shards_written": len(written)}
    summary = summarize(cfg, out, plan, n_shards)
    summary.update(
        seconds=round(time.perf_counter() - t0, 2),
        shards_written=len(written),
        student=str(student_path),
        teacher=teacher_name,
        demo=demo,
    )
    if mp.report:
        from dasd_jax.mixed_policy import report

        summary["report"] = report.write(out, summary)
    write_json(out / "summary.json", summary)
    c = summary["counts"]
    print(f"mixed_policy: {c['in']} questions -> {c['out']} kept, {c['rejected']} rejected")
    print(f"  rejected by reason: {summary['rejected']}")
    return summary


def summarize(cfg: Config, out: Path | epath.Path, plan: dict, n_shards: int) -> dict:
    """Merge every shard's samples and rejects; counts, by reason, and statistics."""
    import numpy as np

    samples, rejects, train = [], list(plan["bad_records"]), []
    for k in range(n_shards):
        done = json.loads(storage.read_text(out / "shards" / f"done-{k:05d}.json"))
        if done["train_file"]:
            train.append(done["train_file"])
        for name, into in (("samples", samples), ("rejects", rejects)):
            path = out / "shards" / f"{name}-{k:05d}.jsonl"
            into += [json.loads(line) for line in storage.read_text(path).splitlines()]
    write_jsonl(out / "samples.jsonl", samples)
    write_jsonl(out / "rejects.jsonl", rejects)
    question_rejects = [r for r in rejects if r["reason"] != "bad_record"]
    by_reason = dict(Counter(r["reason"] for r in question_rejects).most_common())
    filter_reasons = filters.count_reasons(
        [r.get("reasons", []) for r in question_rejects if "reasons" in r]
    )

    def stats(key):
        v = np.asarray([s[key] for s in samples], float)
        if not len(v):
            return None
        return {"mean": round(float(v.mean()), 4), "min": float(v.min()), "max": float(v.max())}

    n_in = len(plan["questions"])
    return {
        "counts": {"in": n_in, "out": len(samples), "rejected": len(question_rejects)},
        "rejected": by_reason,
        "filters": filter_reasons,
        "capped": n_in - by_reason.get("not_capped", 0) - by_reason.get("cap_over_limit", 0),
        "source_records": plan["source_records"],
        "unique_prompts": plan["unique_prompts"],
        "bad_records": len(plan["bad_records"]),
        "cut_fraction": stats("cut_fraction"),
        "prefix_tokens": stats("prefix_tokens"),
        "continuation_tokens": stats("continuation_tokens"),
        "snapped": sum(bool(s["snapped"]) for s in samples),
        "noncanonical_prefixes": sum(not s["prefix_canonical"] for s in samples),
        "teacher_finish": dict(Counter(s["teacher_finish"] for s in samples)),
        "train_files": train,
        "engines": plan["engines"],
        "config": {
            "mixed_policy": to_dict(cfg.mixed_policy),
            "filters": to_dict(cfg.filters),
        },
    }
