"""The `score` stage: per-token log-probs of every candidate under the student (always) and
the teacher (when its log-probs were not recorded).

Consumes `score.input` ("" = `<run_dir>/sample` when the sample stage ran there, else the
embedded demo rows: `input_spec`): one JSONL file, a folder (the sample stage's
`<run_dir>/sample/` with its `t<T>/part-*.jsonl`, or any folder of JSONL files) or a glob,
read in sorted file order as one stream (`ingest.input_files`), local or gs://. Each
file is in one of the forms `ingest` reads (detected per file): the released SFT rows
(optionally joined by uuid with the released teacher log-prob rows, `score.teacher_logprobs`),
the sample stage's Candidate JSONL, or OpenAI-compatible server dumps. Also the student
(`student.path`, an HF folder; "" = the embedded tiny Qwen3) and, for candidates without
teacher log-probs, the teacher (`teacher.path`; "" = the embedded tiny teacher).

Produces, under `<run_dir>/score/` (local or gs://):
- `part-NNNNNN.jsonl`: one `schema.Candidate` per line (input order within the shard), with
  `student` and `teacher` `TokenScores`: response token ids, log p(token | prompt, earlier
  response tokens) in fp32, and response-relative character spans; `student.n_prompt_tokens`.
- `part-NNNNNN.stats.json`: the shard's counts (lines, candidates, rejects, tokens, padding),
  also per input file.
- `rejects.part-NNNNNN.jsonl`: `{file, line, id, reason}` for every line or candidate not
  scored (malformed, missing field, log-prob length mismatch, unknown uuid in the join,
  teacher text mismatch, malformed harmony in a dump, too long), under the pipeline-wide
  bad-row policy (`bad_rows.*`, `records.BadRowPolicy`): counted and skipped until more than
  `bad_rows.max_bad_fraction` of the lines are bad, then the run stops naming the count, the
  top reasons and these files; with `score.on_bad_row=error` it stops at the first one with
  `file:line: reason`.
- `summary.json` (process 0): totals, per input file, and `counts` {in, out, rejected} with
  in = candidates read + unreadable lines = out + rejected; `metrics.jsonl` (progress: rows/s,
  tokens/s, ETA, padding; appended locally, under `storage.local_dir` when run_dir is gs://,
  and uploaded at the end of the run).

How: the input stream is cut into shards of `score.rows_per_shard` lines (a shard may span
two files: the cut depends only on the sorted files' lines); process p of P takes shards
p, p+P, ... and scores them on a mesh of its own devices (scoring needs no cross-host
collective). `<run_dir>/score.shards.json`, written before the first shard, records what a
shard's bytes depend on (`shard_settings`); a restart under other settings is refused. A
shard whose part file exists is done and skipped on restart; every file is written under a
temporary name and renamed, the part file last, so a kill at any point loses at most the
shard in flight and never leaves a half-written file under its final name. Each
model renders prompt + response with its own chat format (student: Qwen3 ChatML; teacher:
ChatML, or gpt-oss harmony via `chat.render_harmony`) and tokenizer; rows are sorted by
length within a shard and batched by padded length (`plan_batches`), sharded over the mesh's
batch axes; log-probs come from the chunked kernel (`logprobs.sequence_logprobs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dasd_jax import chat, ingest, storage
from dasd_jax.config import Config, ModelConfig, to_dict
from dasd_jax.logprobs import sequence_logprobs
from dasd_jax.progress import Progress
from dasd_jax.records import (
    BadRow,
    BadRows,
    atomic_write,
    reason_key,
    require_rows,
    shard_name,
    write_json,
)
from dasd_jax.resume import check_settings, device_of
from dasd_jax.schema import Candidate, TokenScores
from dasd_jax.sharding import batch_sharding, make_mesh
from dasd_jax.tokenizer import encode_with_offsets, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    """One candidate rendered and tokenized for one model."""

    key: int  # index of the candidate within its shard
    ids: list[int]  # every token of the rendered text
    first: int  # index of the first response token
    count: int  # number of response tokens
    spans: list[tuple[int, int]]  # response-relative character spans of the response tokens


def input_spec(cfg: Config) -> str:
    """What the stage reads: `score.input`; when empty, the run directory's sample output
    (`<run_dir>/sample`, what `--stage=all` passes) once the sample stage has finished there;
    "" (the embedded demo rows) only when the run directory has no sample output. An
    unfinished sample output is an error naming score.input."""
    if cfg.score.input:
        return cfg.score.input
    sample = storage.join(cfg.run_dir, "sample")
    if not storage.isdir(sample):
        return ""
    journals = [  # of unfinished shards: a finished part's journal is a dead leftover
        j
        for j in storage.glob(storage.join(storage.local_dir(sample), "t*", "part-*.journal"))
        if not storage.exists(storage.join(sample, *Path(j).with_suffix(".jsonl").parts[-2:]))
    ]
    if storage.exists(storage.join(sample, "summary.json")) and not journals:
        log.info("score.input is empty: scoring the sample stage's output %s", sample)
        return sample
    state = f"{len(journals)} unfinished shards" if journals else "no summary.json"
    raise FileNotFoundError(
        f"score.input is empty and {sample} holds an unfinished sample run ({state}): finish "
        "it (`python -m dasd_jax.launch --stage=sample`, same run_dir), or set score.input "
        f"(score.input={sample} scores its finished shards)"
    )


def resolve_inputs(cfg: Config) -> tuple[Path, str, list[str]]:
    """(student folder, the input (`input_spec`), its JSONL files in reading order),
    materialising the embedded defaults when empty."""
    from dasd_jax import embedded

    # a gs:// model folder is copied to the local cache (weights are memory-mapped)
    student = (
        Path(storage.download_dir(cfg.student.path))
        if cfg.student.path
        else embedded.tiny_student()
    )
    spec = input_spec(cfg)
    if spec:
        return student, spec, ingest.input_files(spec)
    inputs = storage.local_dir(storage.join(cfg.run_dir, "inputs"))
    data = embedded.write_demo_rows(Path(inputs) / "demo.jsonl", embedded.demo_candidate_rows())
    log.warning(
        "score.input is empty and %s has no sample output: scoring the EMBEDDED DEMO rows %s",
        cfg.run_dir,
        data,
    )
    return student, str(data), [str(data)]


def shard_settings(cfg: Config, student: Path, files: list[str]) -> dict:
    """What the stage's shards depend on (`resume.check_settings`): every input
    file's path (candidates name it; `{run_dir}/...` inside the run directory), size and
    edge hash (`pipeline.fingerprint`), the same of `score.teacher_logprobs`, each model's
    path, dtypes and attention, the mesh, and every `score.*` key but where the input and
    the join index are and the bad-row policy: the shard cut `rows_per_shard` and the batch
    shapes (`batch_tokens`, `bucket_multiple`, `chunk_size`) included, since log-probs are
    bit-exact only under the same batches (docs/score.md)."""
    from dasd_jax.pipeline import fingerprint

    root = cfg.run_dir.rstrip("/")

    def content(path: str) -> dict:
        fp, name = fingerprint(path), str(path)
        if name.startswith(root + "/"):  # the record holds for the run directory moved
            name = "{run_dir}" + name[len(root) :]
        return {"path": name, "bytes": fp.get("bytes"), "sha256": fp.get("sha256")}

    def model(m: ModelConfig, path: str) -> dict:
        return {**{k: v for k, v in to_dict(m).items() if k != "remat"}, "path": path}

    sc = to_dict(cfg.score)
    for k in ("input", "index_dir", "on_bad_row"):
        del sc[k]
    if sc["teacher_logprobs"]:
        sc["teacher_logprobs"] = content(sc["teacher_logprobs"])
    return {
        "input_files": [content(f) for f in files],
        "score": sc,
        "student": model(cfg.student, str(student)),
        "teacher": model(cfg.teacher, cfg.teacher.path),
        "mesh": to_dict(cfg.mesh),
    }


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def plan_batches(lengths: list[int], batch_tokens: int, multiple: int, dp: int):
    """Group row indices (sorted by length) into (padded_len, n_rows, indices) batches.

    A batch's padded length is its longest row rounded up to `multiple`; its row count is a
    power of two times the data-parallel size `dp`, at most `batch_tokens // padded_len`
    (but at least `dp`). So each (length, rows) shape compiles once, there are few shapes,
    and at most half of a batch's rows are padding rows.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[tuple[int, int, list[int]]] = []
    i = 0
    while i < len(order):
        padded = _round_up(max(lengths[order[i]], 1), multiple)
        cap = max(dp, (batch_tokens // padded) // dp * dp)
        j = i
        while j < len(order) and j - i < cap and _round_up(lengths[order[j]], multiple) <= padded:
            j += 1
        rows = dp
        while rows < j - i:
            rows *= 2
        batches.append((padded, min(rows, max(cap, j - i)), order[i:j]))
        i = j
    return batches


@nnx.jit(static_argnames=("chunk_size",))
def _token_logprobs(model, tokens, positions, segments, chunk_size: int):
    # One module-level jitted function: a second run (or a resumed one) with the same model
    # structure and batch shapes reuses the compiled executables.
    return sequence_logprobs(model, tokens, positions, segments, chunk_size=chunk_size)[0]


def chunk_positions(chunk_tokens: int, rows: int, batch_ways: int) -> int:
    """Positions per log-prob chunk so that one device holds about `chunk_tokens` rows x
    positions of fp32 logits at a time ([rows per device, C, V]): 1024 positions for one 64K
    row, 16 for 64 short rows. A power of two (fewer compiles), at least 8."""
    per_device = max(1, -(-rows // max(1, batch_ways)))
    c = max(8, chunk_tokens // per_device)
    return 1 << (c.bit_length() - 1)


class ModelScorer:
    """Loads one model once; `score(ids, padded, rows)` returns per-token log-probs."""

    def __init__(self, model_path: Path, model_cfg: ModelConfig, chunk_size: int, mesh):
        from dasd_jax.models.checkpoint import load_hf

        self.path, self.mesh = model_path, mesh
        self.model = load_hf(model_path, mesh, model_cfg.options())
        self.dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))
        self.chunk_size = chunk_size

    def score(self, batch: list[list[int]], padded: int, rows: int) -> np.ndarray:
        tokens = np.zeros((rows, padded), np.int32)
        segments = np.zeros((rows, padded), np.int32)
        for r, ids in enumerate(batch):
            tokens[r, : len(ids)] = ids
            segments[r, : len(ids)] = 1
        positions = np.broadcast_to(np.arange(padded, dtype=np.int32), (rows, padded))
        sh = batch_sharding(self.mesh)
        put = lambda a: jax.device_put(jnp.asarray(a), sh)  # noqa: E731
        out = _token_logprobs(
            self.model,
            put(tokens),
            put(positions),
            put(segments),
            chunk_size=chunk_positions(self.chunk_size, rows, self.dp),
        )
        return np.asarray(jax.device_get(out))


class Side:
    """One model's view: its tokenizer, chat format and (loaded on first use) forward pass."""

    def __init__(
        self, name: str, path: Path, model_cfg: ModelConfig, template: str, cfg: Config, mesh
    ):
        self.name, self.path, self.model_cfg, self.template = name, path, model_cfg, template
        self.cfg, self.mesh = cfg, mesh
        self.tokenizer = load_tokenizer(path)
        self._scorer: ModelScorer | None = None

    @property
    def scorer(self) -> ModelScorer:
        if self._scorer is None:
            self._scorer = ModelScorer(
                self.path, self.model_cfg, self.cfg.score.chunk_size, self.mesh
            )
        return self._scorer

    def render(self, c: Candidate) -> chat.Rendering:
        sc = self.cfg.score
        if self.template == "harmony":
            return chat.render_harmony(
                c.prompt, c.response, sc.system_prompt, sc.teacher_reasoning_effort
            )
        return chat.render_chatml(c.prompt, c.response, sc.system_prompt)

    def encode(self, key: int, c: Candidate) -> Encoded:
        """Raises ValueError with a reason (cannot tokenize)."""
        r = self.render(c)
        try:
            ids, offsets = encode_with_offsets(self.tokenizer, r.text)
        except ValueError as e:
            # the reason first (e.g. not_nfc), so rejects count by it
            raise ValueError(f"{e} (tokenizing for the {self.name})") from None
        first, count, spans = chat.response_offsets(offsets, r)
        return Encoded(key, ids, first, count, spans)

    def score_all(self, encoded: list[Encoded], progress: Progress, counts: dict) -> dict:
        """key -> log-probs of the response tokens; adds tokens/padding to `counts`."""
        sc = self.cfg.score
        out: dict[int, list[float]] = {}
        if not encoded:
            return out
        scorer = self.scorer
        for padded, n_rows, idx in plan_batches(
            [len(e.ids) for e in encoded], sc.batch_tokens, sc.bucket_multiple, scorer.dp
        ):
            batch = [encoded[i] for i in idx]
            logp = scorer.score([e.ids for e in batch], padded, n_rows)
            for r, e in enumerate(batch):
                out[e.key] = [float(x) for x in logp[r, e.first : e.first + e.count]]
            real = sum(len(e.ids) for e in batch)
            counts[f"{self.name}_tokens"] += real
            counts[f"{self.name}_padded_tokens"] += padded * n_rows
            progress.update(
                0,
                real,
                **{
                    f"{self.name}_padding": round(
                        1
                        - counts[f"{self.name}_tokens"]
                        / max(counts[f"{self.name}_padded_tokens"], 1),
                        3,
                    )
                },
            )
        return out


def model_template(path: Path, requested: str) -> str:
    """`chatml` or `harmony`: the requested one, or by config.json's model_type."""
    if requested != "auto":
        return requested
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    return "harmony" if model_type == "gpt_oss" else "chatml"


def _raw_shards(files: list[str], rows_per_shard: int):
    """Yield (shard index, [(file index, line, raw text)]) from a streaming read of the
    files, in order, as one stream."""
    shard, buf = 0, []
    for fi, path in enumerate(files):
        for line, raw in ingest.iter_lines(path):
            buf.append((fi, line, raw))
            if len(buf) == rows_per_shard:
                yield shard, buf
                shard, buf = shard + 1, []
    if buf:
        yield shard, buf


class _Context:
    """What a run loads once: sides, the log-prob index, the reader."""

    def __init__(self, cfg: Config, student_path: Path, files: list[str]):
        from dasd_jax import embedded

        sc = cfg.score
        self.cfg = cfg
        # Each process scores its own shards on its own devices: no cross-host collective.
        self.mesh = make_mesh(cfg.mesh, devices=jax.local_devices())
        self.student = Side("student", student_path, cfg.student, "chatml", cfg, self.mesh)
        self._teacher: Side | None = None
        self._teacher_bytes: ingest.TokenBytes | None = None
        self.teacher_path = (
            Path(storage.download_dir(cfg.teacher.path)) if cfg.teacher.path else None
        )  # gs://: a copy in the local cache
        self._embedded_teacher = embedded.tiny_teacher
        self.files = files
        self.formats: dict[int, str] = {}  # file index -> format, detected when first read
        self._readers: dict[int, ingest.Reader] = {}
        self.index = None
        self.bad_rows: BadRows | None = None  # set by `run` (it knows the input's size)
        if sc.teacher_logprobs:
            cache = sc.index_dir or storage.join(cfg.run_dir, "cache")  # kept local (ingest)
            self.index = ingest.LogprobIndex(sc.teacher_logprobs, cache)
        self.opts = ingest.IngestOptions(
            prompt_field=sc.prompt_field,
            response_field=sc.response_field,
            id_field=sc.id_field,
            domain_field=sc.domain_field,
            answer_field=sc.answer_field,
            temperature=sc.temperature,
            teacher_name=str(self.teacher_path) if self.teacher_path else "teacher",
        )

    def reader(self, fi: int) -> ingest.Reader:
        """The reader of input file `fi` (its format: `score.input_format`, or detected)."""
        if fi not in self._readers:
            path, fmt = self.files[fi], self.cfg.score.input_format
            if fmt == "auto":
                fmt = ingest.detect_format(path)
            self.formats[fi] = fmt
            self._readers[fi] = ingest.Reader(path, fmt, self.opts, self.index, self.teacher_bytes)
        return self._readers[fi]

    def format_summary(self) -> str:
        """The input's format, of every file (detected from its first rows when this run read
        none of it: all its shards were done before a resume)."""
        sc = self.cfg.score
        fmts = {
            self.formats.get(fi)
            or (sc.input_format if sc.input_format != "auto" else ingest.sniff_format(f))
            for fi, f in enumerate(self.files)
        } - {None}  # a file with no row (all of a sample shard's rows rejected) has no format
        return fmts.pop() if len(fmts) == 1 else ("mixed" if fmts else self.cfg.score.input_format)

    @property
    def teacher(self) -> Side:
        if self._teacher is None:
            if self.teacher_path is None:
                self.teacher_path = self._embedded_teacher()
            tpl = model_template(self.teacher_path, self.cfg.score.teacher_template)
            self._teacher = Side(
                "teacher", self.teacher_path, self.cfg.teacher, tpl, self.cfg, self.mesh
            )
        return self._teacher

    def teacher_bytes(self) -> ingest.TokenBytes:
        if self._teacher_bytes is None:
            from dasd_jax.tokenizer import build_gpt_oss_tokenizer

            sc = self.cfg.score
            teacher = self.cfg.teacher.path and storage.download_dir(self.cfg.teacher.path)
            folder = sc.teacher_tokenizer or (
                teacher  # as given; a gs:// folder's local copy
                if teacher and (Path(teacher) / "tokenizer.json").exists()
                else build_gpt_oss_tokenizer()
            )
            self._teacher_bytes = ingest.TokenBytes(folder)
        return self._teacher_bytes


def _score_shard(
    ctx: _Context,
    shard: int,
    lines: list[tuple[int, int, str]],
    out_dir: str,
    progress: Progress,
) -> dict:
    sc = ctx.cfg.score
    rejects: list[dict] = []
    cands: list[Candidate] = []
    where_of: list[tuple[int, int]] = []  # (file index, line) of each candidate
    per_file: dict[int, dict[str, int]] = {}

    def file_counts(fi: int) -> dict[str, int]:
        return per_file.setdefault(
            fi, {"lines": 0, "bad_lines": 0, "candidates": 0, "rows_out": 0, "rejects": 0}
        )

    def bad(fi: int, line: int, err: Exception, cand_id: str | None = None) -> None:
        row = err if isinstance(err, BadRow) else BadRow(ctx.files[fi], line, str(err))
        ctx.bad_rows.add(row)  # raises under on_bad_row=error, or past max_bad_fraction
        file_counts(fi)["rejects"] += 1
        rejects.append({"file": ctx.files[fi], "line": line, "id": cand_id, "reason": row.reason})

    for fi, line, raw in lines:
        file_counts(fi)["lines"] += 1
        try:
            got = ctx.reader(fi).candidates(line, raw)
        except BadRow as e:
            file_counts(fi)["bad_lines"] += 1
            bad(fi, line, e)
            continue
        file_counts(fi)["candidates"] += len(got)
        for c in got:
            cands.append(c)
            where_of.append((fi, line))

    counts = {
        k: 0
        for k in (
            "student_tokens",
            "student_padded_tokens",
            "teacher_tokens",
            "teacher_padded_tokens",
        )
    }
    need_teacher = {
        "missing": lambda c: c.teacher is None,
        "always": lambda c: True,
        "never": lambda c: False,
    }[sc.teacher_scoring]
    enc_s: list[Encoded] = []
    enc_t: list[Encoded] = []
    alive: list[int] = []
    for k, c in enumerate(cands):
        cid = c.meta.get("uuid") or f"{c.prompt_id}/{c.candidate}"
        try:
            es = ctx.student.encode(k, c)
            if len(es.ids) > sc.max_tokens:
                raise ValueError(
                    f"too_long: {len(es.ids)} student tokens > score.max_tokens={sc.max_tokens}"
                )
            et = None
            if need_teacher(c):
                et = ctx.teacher.encode(k, c)
                if len(et.ids) > sc.max_tokens:
                    raise ValueError(
                        f"too_long: {len(et.ids)} teacher tokens > score.max_tokens={sc.max_tokens}"
                    )
        except ValueError as e:
            bad(*where_of[k], e, cid)
            continue
        enc_s.append(es)
        if et is not None:
            enc_t.append(et)
        alive.append(k)

    lp_s = ctx.student.score_all(enc_s, progress, counts)
    lp_t = ctx.teacher.score_all(enc_t, progress, counts) if enc_t else {}
    by_key_s = {e.key: e for e in enc_s}
    by_key_t = {e.key: e for e in enc_t}
    student_name = str(ctx.student.path)
    teacher_from = {"logprobs": 0, "model": 0, "none": 0}
    out_lines = []
    for k in alive:
        c = cands[k]
        e = by_key_s[k]
        c.student = TokenScores(
            student_name,
            student_name,
            e.ids[e.first : e.first + e.count],
            lp_s[k],
            e.spans,
            n_prompt_tokens=e.first,
        )
        if k in by_key_t:
            t = by_key_t[k]
            name = str(ctx.teacher.path)
            c.teacher = TokenScores(
                name,
                name,
                t.ids[t.first : t.first + t.count],
                lp_t[k],
                t.spans,
                n_prompt_tokens=t.first,
            )
            teacher_from["model"] += 1
        elif c.teacher is not None:
            teacher_from["logprobs"] += 1
        else:
            teacher_from["none"] += 1
        out_lines.append(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        file_counts(where_of[k][0])["rows_out"] += 1
    progress.update(len(lines))

    stats = {
        "shard": shard,
        "rows_in": len(lines),
        "bad_lines": sum(f["bad_lines"] for f in per_file.values()),
        "candidates": len(cands),
        "rows_out": len(out_lines),
        "rejects": len(rejects),
        "reject_reasons": dict(Counter(reason_key(r["reason"]) for r in rejects)),
        "teacher_from": teacher_from,
        **counts,
        "files": {ctx.files[fi]: c for fi, c in sorted(per_file.items())},
    }
    # rejects and stats first: the part file is the shard's completion marker
    with atomic_write(storage.join(out_dir, f"rejects.{shard_name(shard)}")) as f:
        for r in rejects:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_json(storage.join(out_dir, shard_name(shard).replace(".jsonl", ".stats.json")), stats)
    with atomic_write(storage.join(out_dir, shard_name(shard))) as f:
        f.writelines(out_lines)
    return stats


def run(cfg: Config) -> dict:
    """Score every candidate of `score.input`; returns the summary."""
    out_dir = storage.join(cfg.run_dir, "score")  # local or gs://
    storage.makedirs(out_dir)
    if not input_spec(cfg) and not cfg.score.answer_field:  # the demo math rows carry answers
        cfg = dataclasses.replace(cfg, score=dataclasses.replace(cfg.score, answer_field="answer"))
    student_path, spec, files = resolve_inputs(cfg)
    parts = storage.glob(storage.join(out_dir, "part-*.jsonl"))
    check_settings(out_dir, shard_settings(cfg, student_path, files), device_of(), parts)
    ctx = _Context(cfg, student_path, files)
    n_proc, proc = jax.process_count(), jax.process_index()
    # progress lines are appended: a local file (a mirror when out_dir is gs://), uploaded below
    metrics_name = "metrics.jsonl" if proc == 0 else f"metrics.process{proc}.jsonl"
    metrics = Path(storage.local_dir(out_dir)) / metrics_name
    n_lines = sum(ingest.count_lines(f) for f in files)
    require_rows(n_lines, f"score.input={spec or 'the demo rows'} ({len(files)} files)")
    progress = Progress("score", n_lines, metrics)
    ctx.bad_rows = BadRows(
        "score",
        cfg.bad_rows.for_stage(cfg.score.on_bad_row),
        storage.join(out_dir, "rejects.part-*.jsonl"),
        total=n_lines,
    )
    t0 = time.perf_counter()
    skipped_shards = 0
    done = {os.path.basename(f) for f in parts}
    for shard, lines in _raw_shards(files, cfg.score.rows_per_shard):
        if shard % n_proc != proc:
            continue
        if shard_name(shard) in done:
            skipped_shards += 1
            progress.update(len(lines))
            continue
        _score_shard(ctx, shard, lines, out_dir, progress)
    progress.report()
    if storage.is_remote(out_dir):
        storage.copy(metrics, storage.join(out_dir, metrics_name))
    if n_proc > 1:  # every host's shards are written before process 0 sums them
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("dasd_jax score done")
    summary = summarize(out_dir)
    c = summary["counts"]
    reasons = summary["reject_reasons"]
    ctx.bad_rows.check(c["in"], c["rejected"], reasons)
    summary.update(
        seconds=round(time.perf_counter() - t0, 2),
        skipped_shards=skipped_shards,
        student=str(student_path),
        input=spec,
        input_files=len(files),
        input_format=ctx.format_summary(),
        teacher=str(ctx.teacher_path) if ctx.teacher_path else None,
    )
    if ctx.index is not None:
        summary["logprob_index"] = {"path": str(ctx.index.index_path), **ctx.index.stats}
        if dup := ctx.index.stats.get("duplicates"):
            warning = (
                f"{dup} rows of score.teacher_logprobs={ctx.index.path} repeat a sample_uuid "
                "already in it: the first row of each uuid is used"
            )
            log.warning("score: %s", warning)
            summary.setdefault("warnings", []).append(warning)
        ctx.index.close()
    if proc == 0:
        write_json(storage.join(out_dir, "summary.json"), summary)
        print_table(out_dir)
    return summary


def print_table(out_dir: str | Path, limit: int = 12) -> None:
    """A few scored candidates, for a human reading the run's output."""
    rows = []
    for f in storage.glob(storage.join(out_dir, "part-*.jsonl")):
        with storage.open_read(f) as fh:
            for line in fh:
                rows.append(json.loads(line))
                if len(rows) >= limit:
                    break
        if len(rows) >= limit:
            break
    print(
        f"{'prompt/candidate':<28}{'student tok':>12}{'mean log p_S':>13}{'teacher tok':>12}"
        f"{'mean log p_T':>13}"
    )

    def mean(side):
        if not side or not side["logprobs"]:
            return "-"
        return f"{np.nanmean(side['logprobs']):.3f}"

    for r in rows:
        s, t = r.get("student"), r.get("teacher")
        name = f"{r['prompt_id'][:18]}/{r['candidate']}"
        print(
            f"{name:<28}{len(s['token_ids']) if s else 0:>12}{mean(s):>13}"
            f"{len(t['token_ids']) if t else 0:>12}{mean(t):>13}"
        )


def summarize(out_dir: str | Path) -> dict:
    """Totals over the finished shards (those whose part file exists), per input file too;
    `counts`: in = candidates read + unreadable lines = out (scored) + rejected."""
    keys = (
        "rows_in",
        "bad_lines",
        "candidates",
        "rows_out",
        "rejects",
        "student_tokens",
        "student_padded_tokens",
        "teacher_tokens",
        "teacher_padded_tokens",
    )
    totals: dict = {
        "shards": 0,
        **{k: 0 for k in keys},
        "teacher_from": {"logprobs": 0, "model": 0, "none": 0},
        "reject_reasons": Counter(),
    }
    files: dict[str, dict[str, int]] = {}
    parts = set(storage.glob(storage.join(out_dir, "part-*.jsonl")))
    for f in storage.glob(storage.join(out_dir, "part-*.stats.json")):
        if f.replace(".stats.json", ".jsonl") not in parts:
            continue
        s = json.loads(storage.read_text(f))
        totals["shards"] += 1
        for k in keys:
            totals[k] += s.get(k, 0)
        for k, v in s.get("teacher_from", {}).items():
            totals["teacher_from"][k] += v
        totals["reject_reasons"].update(s.get("reject_reasons", {}))
        for name, c in s.get("files", {}).items():
            mine = files.setdefault(name, {})
            for k, v in c.items():
                mine[k] = mine.get(k, 0) + v
    for side in ("student", "teacher"):
        real, padded = totals[f"{side}_tokens"], totals[f"{side}_padded_tokens"]
        totals[f"{side}_padding_fraction"] = round(1 - real / padded, 4) if padded else 0.0
    totals["files"] = dict(sorted(files.items()))
    totals["reject_reasons"] = dict(totals["reject_reasons"].most_common())
    totals["counts"] = {
        "in": totals["candidates"] + totals["bad_lines"],
        "out": totals["rows_out"],
        "rejected": totals["rejects"],
    }
    return totals
