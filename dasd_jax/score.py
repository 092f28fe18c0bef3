"""The `score` stage: per-token log-probs of every response under the student.

Consumes `score.input`, a JSONL file of prompt/response rows (default fields: the released
SFT schema `uuid`, `input`, `output`; "" = the embedded demo rows), and the student
(`student.path`, a Hugging Face folder; "" = the embedded tiny Qwen3).

Produces, under `<run_dir>/score/`:
- `part-NNNNNN.jsonl`: one line per scored row, in input order within the shard:
  `{"id", "line", "n_prompt_tokens", "n_response_tokens", "token_ids", "offsets",
  "logprobs", "mean_logprob"}`. `token_ids` are the student tokens of the response,
  `offsets` their [start, end) character spans relative to the response text (clipped to it),
  `logprobs` log p_S(token | everything before it), fp32.
- `part-NNNNNN.stats.json`: counts for that shard (rows, rejects, tokens, padding).
- `rejects.part-NNNNNN.jsonl`: rows not scored, with `reason` (too long, malformed, missing
  field when `score.on_bad_row=skip`).
- `summary.json`, `metrics.jsonl` (progress: rows/s, tokens/s, ETA, padding fraction).

How: the input is cut into shards of `score.rows_per_shard` rows; a shard whose part file
exists is finished work and is skipped on restart, and every file is written atomically, so a
kill at any point loses at most the shard in flight. Rows are rendered with the student's
chat template (`tokenizer.render_chat`: the response verbatim), sorted by length within a
shard and batched by padded length (multiples of `score.bucket_multiple`, a fixed row count
per length so each length compiles once), sharded over the mesh's batch axes; log-probs come
from the chunked kernel (`logprobs.sequence_logprobs`). Response tokens are those whose span
starts inside the response.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dasd_jax.config import Config
from dasd_jax.logprobs import sequence_logprobs
from dasd_jax.progress import Progress
from dasd_jax.records import BadRow, atomic_write, iter_jsonl, shard_name, write_json
from dasd_jax.sharding import batch_sharding, make_mesh
from dasd_jax.tokenizer import encode_with_offsets, load_tokenizer, render_chat

log = logging.getLogger(__name__)


@dataclass
class Encoded:
    id: str
    line: int
    ids: list[int]
    offsets: list[tuple[int, int]]
    response_start: int
    response_end: int
    first_response_token: int


def resolve_inputs(cfg: Config) -> tuple[Path, Path]:
    """(student folder, input JSONL), materialising the embedded defaults when empty."""
    from dasd_jax import embedded

    student = Path(cfg.student.path) if cfg.student.path else embedded.tiny_student()
    if cfg.score.input:
        data = Path(cfg.score.input)
    else:
        data = embedded.write_demo_rows(Path(cfg.run_dir) / "inputs" / "demo.jsonl")
    return student, data


def encode_row(row: dict, line: int, path: Path, tokenizer, cfg: Config) -> Encoded:
    sc = cfg.score
    for name in (sc.prompt_field, sc.response_field):
        if name not in row:
            raise BadRow(path, line, f"missing field {name!r} (has {sorted(row)})")
        if not isinstance(row[name], str):
            raise BadRow(path, line, f"field {name!r} should be a string")
    row_id = str(row.get(sc.id_field, f"line-{line}"))
    rendered = render_chat(row[sc.prompt_field], row[sc.response_field], sc.system_prompt)
    try:
        ids, offsets = encode_with_offsets(tokenizer, rendered.text)
    except ValueError as e:
        raise BadRow(path, line, f"cannot tokenize: {e}") from None
    first = next((i for i, (s, _) in enumerate(offsets) if s >= rendered.response_start),
                 len(ids))
    return Encoded(row_id, line, ids, offsets, rendered.response_start, rendered.response_end,
                   first)


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


class StudentScorer:
    """Loads the student once; `score(batch)` returns per-token log-probs."""

    def __init__(self, model_path: Path, cfg: Config):
        from dasd_jax.models.checkpoint import load_hf

        self.cfg = cfg
        self.mesh = make_mesh(cfg.mesh)
        self.model = load_hf(model_path, self.mesh, cfg.student.options())
        self.dp = int(np.prod([self.mesh.shape[a] for a in ("data", "fsdp", "expert")]))
        chunk = cfg.score.chunk_size

        @nnx.jit
        def fn(model, tokens, positions, segments):
            return sequence_logprobs(model, tokens, positions, segments, chunk_size=chunk)[0]

        self._fn = fn

    def score(self, batch: list[Encoded], padded: int, rows: int) -> np.ndarray:
        tokens = np.zeros((rows, padded), np.int32)
        segments = np.zeros((rows, padded), np.int32)
        for r, e in enumerate(batch):
            tokens[r, : len(e.ids)] = e.ids
            segments[r, : len(e.ids)] = 1
        positions = np.broadcast_to(np.arange(padded, dtype=np.int32), (rows, padded))
        sh = batch_sharding(self.mesh)
        put = lambda a: jax.device_put(jnp.asarray(a), sh)  # noqa: E731
        out = self._fn(self.model, put(tokens), put(positions), put(segments))
        return np.asarray(jax.device_get(out))


def _output_row(e: Encoded, logp: np.ndarray) -> dict:
    k = e.first_response_token
    resp_lp = [float(x) for x in logp[k : len(e.ids)]]
    start = e.response_start
    offsets = [[max(s - start, 0), min(t, e.response_end) - start]
               for s, t in e.offsets[k : len(e.ids)]]
    # the closing <|im_end|>\n tokens lie past the response: keep only the response's tokens
    n = sum(1 for s, _ in e.offsets[k : len(e.ids)] if s < e.response_end)
    resp_lp, offsets = resp_lp[:n], offsets[:n]
    return {
        "id": e.id, "line": e.line, "n_prompt_tokens": k, "n_response_tokens": n,
        "token_ids": e.ids[k : k + n], "offsets": offsets, "logprobs": resp_lp,
        "mean_logprob": float(np.mean(resp_lp)) if resp_lp else None,
    }


def _shards(path: Path, rows_per_shard: int, on_bad: str, bad_rows: list):
    """Yield (shard index, [(line, row)]) from a streaming read of the input."""
    shard, buf = 0, []

    def rejected(err: BadRow, raw: str):
        bad_rows.append((shard, err))

    for line, row in iter_jsonl(path, on_bad=on_bad, rejected=rejected):
        buf.append((line, row))
        if len(buf) == rows_per_shard:
            yield shard, buf
            shard, buf = shard + 1, []
    if buf:
        yield shard, buf


def run(cfg: Config) -> dict:
    """Score every row of `score.input` with the student; returns the summary."""
    sc = cfg.score
    out_dir = Path(cfg.run_dir) / "score"
    out_dir.mkdir(parents=True, exist_ok=True)
    student_path, data_path = resolve_inputs(cfg)
    tokenizer = load_tokenizer(student_path)
    scorer = StudentScorer(student_path, cfg)
    n_proc, proc = jax.process_count(), jax.process_index()
    total_rows = sum(1 for line in data_path.open("rb") if line.strip())
    progress = Progress("score", total_rows, out_dir / "metrics.jsonl")
    bad_rows: list[tuple[int, BadRow]] = []
    t0 = time.perf_counter()
    skipped_shards = 0
    for shard, rows in _shards(data_path, sc.rows_per_shard, sc.on_bad_row, bad_rows):
        part = out_dir / shard_name(shard)
        if shard % n_proc != proc:
            continue
        if part.exists():
            skipped_shards += 1
            progress.update(len(rows))
            continue
        rejects = [{"line": e.line, "reason": e.reason} for s, e in bad_rows if s == shard]
        encoded: list[Encoded] = []
        for line, row in rows:
            try:
                e = encode_row(row, line, data_path, tokenizer, cfg)
            except BadRow as err:
                if sc.on_bad_row == "error":
                    raise
                rejects.append({"line": line, "id": row.get(sc.id_field), "reason": err.reason})
                continue
            if len(e.ids) > sc.max_tokens:
                rejects.append({"line": line, "id": e.id, "reason":
                                f"too_long: {len(e.ids)} tokens > score.max_tokens="
                                f"{sc.max_tokens}"})
                continue
            encoded.append(e)
        results: dict[int, dict] = {}
        real = padded_total = 0
        for padded, n_rows, idx in plan_batches([len(e.ids) for e in encoded], sc.batch_tokens,
                                                sc.bucket_multiple, scorer.dp):
            batch = [encoded[i] for i in idx]
            logp = scorer.score(batch, padded, n_rows)
            for r, i in enumerate(idx):
                results[i] = _output_row(encoded[i], logp[r])
            real += sum(len(e.ids) for e in batch)
            padded_total += padded * n_rows
            progress.update(len(batch), sum(len(e.ids) for e in batch),
                            padding=round(1 - real / max(padded_total, 1), 3))
        stats = {"shard": shard, "rows_in": len(rows) + sum(1 for s, _ in bad_rows if s == shard),
                 "rows_out": len(results), "rejects": len(rejects), "tokens": real,
                 "padded_tokens": padded_total}
        # rejects and stats first: the part file is the shard's completion marker
        with atomic_write(out_dir / f"rejects.{shard_name(shard)}") as f:
            for r in rejects:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        write_json(out_dir / shard_name(shard).replace(".jsonl", ".stats.json"), stats)
        with atomic_write(part) as f:
            for i in range(len(encoded)):
                f.write(json.dumps(results[i], ensure_ascii=False) + "\n")
        progress.update(len(rows) - len(encoded))
    progress.report()
    summary = summarize(out_dir)
    summary.update(seconds=round(time.perf_counter() - t0, 2), skipped_shards=skipped_shards,
                   student=str(student_path), input=str(data_path))
    if proc == 0:
        write_json(out_dir / "summary.json", summary)
        print_table(out_dir)
    return summary


def print_table(out_dir: Path, limit: int = 12) -> None:
    """A few scored rows, for a human reading the run's output."""
    rows = []
    for f in sorted(out_dir.glob("part-*.jsonl")):
        for line in f.open():
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
        if len(rows) >= limit:
            break
    print(f"{'id':<16}{'prompt tok':>11}{'response tok':>13}{'mean log p':>12}{'ppl':>10}")
    for r in rows:
        mlp = r["mean_logprob"]
        ppl = f"{np.exp(-mlp):.1f}" if mlp is not None else "-"
        print(f"{r['id'][:15]:<16}{r['n_prompt_tokens']:>11}{r['n_response_tokens']:>13}"
              f"{mlp if mlp is None else round(mlp, 3):>12}{ppl:>10}")


def summarize(out_dir: Path) -> dict:
    totals = {"shards": 0, "rows_in": 0, "rows_out": 0, "rejects": 0, "tokens": 0,
              "padded_tokens": 0}
    for f in sorted(out_dir.glob("part-*.stats.json")):
        if not (out_dir / f.name.replace(".stats.json", ".jsonl")).exists():
            continue
        s = json.loads(f.read_text())
        totals["shards"] += 1
        for k in ("rows_in", "rows_out", "rejects", "tokens", "padded_tokens"):
            totals[k] += s[k]
    totals["padding_fraction"] = round(1 - totals["tokens"] / max(totals["padded_tokens"], 1),
                                       4)
    return totals
