"""SFTRecords in ArrayRecord files -> packed, loss-masked rows for one host, deterministically.

Consumes a stage's named sources (globs of ArrayRecord files of `schema.SFTRecord`, with
mixing weights; local or gs://: the globs are listed through `dasd_jax.storage`, and Grain's
`ArrayRecordDataSource` hands each path to array_record's C++ reader, which reads gs://
objects itself over the Cloud Storage JSON API with the machine's default credentials) and
the student's tokenizer. Produces a Grain iterator of host batches: dicts
of int32 numpy arrays [rows, seq_len] with `tokens`, `loss_mask` (1 where the token is a
training target), `segment_ids` (0 = padding; one id per document), `positions` (restarting
at every document), `source` (1-based source index per token, 0 on padding) and `events`
(counts of dropped / skipped / truncated examples, see `EVENTS`). The iterator's
`get_state()`/`set_state()` round-trip exactly and go into the Orbax checkpoint.

Pipeline, per source: `MapDataset.source` -> hold out `eval_rows` records (taken from a
seeded permutation, before anything else) -> `shuffle` (a new permutation every epoch) ->
a data shard's slice `[shard::data_shards]` -> `repeat()` -> `map(encode)` (render
with the student's chat template and the system prompt, tokenize, loss mask) -> iterate with
reader threads -> drop (and count) over-long or bad examples. Then `IterDataset.mix` of the
sources by weight (deterministic interleave: the record proportions match the weights at every
prefix, not only on average; a mapping, so a checkpoint restores per source by name) ->
first-fit packing into `seq_len` rows -> batches of the shard's rows per optimizer step.
Data shards (`train.data_shards`, default one per host): host p of P runs shards
[p*S/P, (p+1)*S/P) and lays their rows out as P hosts with one shard each would, so the global
batch of every step depends on S, never on the number of hosts.

Loss mask: a token is a target when its character span (exact spans from
`tokenizer.encode_with_offsets`, as in the score stage) reaches into the assistant response or
its closing `<|im_end|>` (the model must learn to stop); the system and user turns, the
`<|im_start|>assistant\\n` header and the final newline are not. With
`mask_student_prefix` (stage 3 option) the first `student_prefix_chars` characters of the
response are left out too.

Counting without hidden state: the filter that drops an example writes how many it dropped
into the next kept example's `events` feature, which travels through packing; the training
loop sums them. So the counts survive checkpoint/restore with the data position itself.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grain
import numpy as np

from dasd_jax import storage
from dasd_jax.schema import SFTRecord
from dasd_jax.tokenizer import IM_END, encode_with_offsets, render_chat
from dasd_jax.train.config import StageConfig, TrainConfig

log = logging.getLogger(__name__)

# events[:, k] at a document's first token: examples dropped before it, per reason
EVENTS = ("dropped_overlong", "skipped_bad", "truncated")


class DataError(ValueError):
    """Input data that cannot be trained on (missing files, empty source, bad record)."""


@dataclass(frozen=True)
class Source:
    name: str
    index: int  # 1-based; 0 marks padding in the `source` feature
    files: tuple[str, ...]
    weight: float
    max_records: int = 0


def resolve_sources(scfg: StageConfig, run_dir: str, stage: int) -> list[Source]:
    """The stage's sources with weight > 0, their files found; errors name what is missing."""
    out = []
    active = {n: s for n, s in sorted(scfg.sources.items()) if s.weight > 0}
    if not active:
        raise DataError(f"stage {stage}: no source has weight > 0 (stage{stage}.sources)")
    for i, (name, src) in enumerate(active.items(), start=1):
        files = []
        for pattern in src.path.split(","):
            pattern = pattern.strip().replace("{run_dir}", str(run_dir))
            files += storage.glob(pattern) if pattern else []
        if not files:
            raise DataError(
                f"stage {stage} source {name!r}: no files match {src.path!r} "
                f"(stage{stage}.sources.{name}.path; run_dir={run_dir}). Run the stage that "
                f"writes them first, or set stage{stage}.sources.{name}.weight=0 to leave it out"
            )
        out.append(Source(name, i, tuple(files), float(src.weight), src.max_records))
    return out


class _Subset(Sequence):
    """Records `indices` of a random-access source (the train or eval split)."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i):
        return self._source[int(self._indices[i])]


def _seed(seed: int, name: str) -> int:
    # per-source seeds: adding or renaming one source leaves the others' order unchanged
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def split_source(src: Source, eval_rows: int, seed: int):
    """(train records, eval records) of a source: a seeded permutation, eval taken first,
    then at most `max_records` for training."""
    records = grain.sources.ArrayRecordDataSource(list(src.files))
    n = len(records)
    if n == 0:
        raise DataError(f"source {src.name!r}: 0 records in {', '.join(src.files)}")
    perm = np.random.default_rng(_seed(seed, src.name)).permutation(n)
    k = min(eval_rows, n - 1) if eval_rows else 0
    train = perm[k : k + src.max_records] if src.max_records else perm[k:]
    return _Subset(records, train), _Subset(records, perm[:k])


# --------------------------------------------------------------------------- encoding


def encode_record(rec: SFTRecord, tokenizer, system_prompt: str, mask_student_prefix: bool):
    """(token ids, loss mask) of one record as int32 arrays; DataError if nothing to learn."""
    if not rec.response:
        raise DataError(f"record {rec.id!r}: no assistant tokens (empty response)")
    if not 0 <= rec.student_prefix_chars <= len(rec.response):
        raise DataError(
            f"record {rec.id!r}: student_prefix_chars={rec.student_prefix_chars} "
            f"outside the response ({len(rec.response)} characters)"
        )
    if mask_student_prefix and rec.student_prefix_chars == len(rec.response):
        raise DataError(
            f"record {rec.id!r}: no assistant tokens after masking the student "
            f"prefix (it covers the whole response)"
        )
    r = render_chat(rec.prompt, rec.response, system_prompt)
    try:
        ids, offsets = encode_with_offsets(tokenizer, r.text)
    except ValueError as e:
        raise DataError(f"record {rec.id!r}: cannot tokenize: {e}") from None
    start = r.response_start + (rec.student_prefix_chars if mask_student_prefix else 0)
    end = r.response_end + len(IM_END)
    span = np.asarray(offsets, np.int64).reshape(-1, 2)
    s, e = span[:, 0], span[:, 1]
    # a token is a target when it holds response (or <|im_end|>) characters, part of one
    # included (the byte rule: a token holding some bytes of the first character spans it);
    # an empty span (a token without text) counts where it sits
    mask = ((e > start) | (s >= start)) & (s < end)
    return np.asarray(ids, np.int32), mask.astype(np.int32)


class Encode:
    """Grain map: SFTRecord bytes -> example dict, or a dropped marker with its reason."""

    def __init__(self, tokenizer, source: Source, tcfg: TrainConfig, mask_student_prefix: bool):
        self.tokenizer, self.source, self.tcfg = tokenizer, source, tcfg
        self.mask_prefix = mask_student_prefix

    def __call__(self, raw: bytes) -> dict:
        t = self.tcfg
        try:
            rec = SFTRecord.from_bytes(raw)
            ids, mask = encode_record(rec, self.tokenizer, t.system_prompt, self.mask_prefix)
        except (DataError, ValueError, TypeError, KeyError) as e:
            where = f"source {self.source.name!r} ({', '.join(self.source.files)})"
            if t.on_bad_record == "error":
                raise DataError(
                    f"{where}: {e} (train.on_bad_record=skip counts and skips such records)"
                ) from None
            log.warning("skipped a bad record of %s: %s", where, e)
            return {"status": "skipped_bad"}
        truncated = 0
        if len(ids) > t.seq_len:
            if t.overlong == "drop":
                return {"status": "dropped_overlong"}
            ids, mask, truncated = ids[: t.seq_len], mask[: t.seq_len], 1
            if not mask.any():  # the prompt alone fills the row
                return {"status": "dropped_overlong"}
        events = np.zeros((len(ids), len(EVENTS)), np.int32)
        events[0, 2] = truncated
        return {
            "status": "ok",
            "tokens": ids,
            "loss_mask": mask,
            "source": np.full(len(ids), self.source.index, np.int32),
            "events": events,
        }


class _KeepGood(grain.IterDataset):
    """Drops the examples `Encode` marked, counting them into the next kept example."""

    def __iter__(self):
        return _KeepGoodIterator(self._parent.__iter__())


class _KeepGoodIterator(grain.DatasetIterator):
    def __next__(self):
        counts = np.zeros(len(EVENTS), np.int32)
        while True:
            ex = next(self._parent)
            if ex["status"] == "ok":
                break
            counts[EVENTS.index(ex["status"])] += 1
        out = {k: v for k, v in ex.items() if k != "status"}
        out["events"] = out["events"].copy()
        out["events"][0] += counts
        return out

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


# --------------------------------------------------------------------------- pipeline


def _source_stream(
    records, encode: Encode, seed: int, tcfg: TrainConfig, shard: int, shards: int
) -> grain.IterDataset:
    ds = grain.MapDataset.source(records).shuffle(seed=seed)
    ds = ds[shard::shards]
    if len(ds) == 0:
        raise DataError(
            f"source {encode.source.name!r}: {len(records)} training records "
            f"cannot be split into {shards} data shards (one per host unless "
            f"train.data_shards is set)"
        )
    ds = ds.repeat(None).map(encode)
    opts = grain.ReadOptions(num_threads=max(tcfg.data_threads, 1), prefetch_buffer_size=64)
    return _KeepGood(ds.to_iter_dataset(opts))


def _pack(ds: grain.IterDataset, tcfg: TrainConfig, rows: int, seed: int, shuffle: bool):
    T = tcfg.seq_len
    bins = tcfg.packing_bins or rows
    return grain.experimental.FirstFitPackIterDataset(
        ds,
        length_struct={"tokens": T, "loss_mask": T, "source": T, "events": T},
        num_packing_bins=bins,
        seed=seed,
        shuffle_bins=shuffle,
        meta_features=("loss_mask", "source", "events"),
    )


def _finish(row: dict, packing: str) -> dict:
    """Packed element -> the model's inputs (and unmasked packing's one-segment view)."""
    seg = np.asarray(row["tokens_segment_ids"], np.int32)
    pos = np.asarray(row["tokens_positions"], np.int32)
    if packing == "unmasked":
        # LLaMA-Factory's packing: documents of a row attend to each other, positions run on
        seg = (seg > 0).astype(np.int32)
        pos = np.arange(seg.shape[-1], dtype=np.int32) * seg
    return {
        "tokens": np.asarray(row["tokens"], np.int32),
        "loss_mask": row["loss_mask"],
        "segment_ids": seg,
        "positions": pos,
        "source": row["source"],
        "events": row["events"],
    }


def _merge(batches: tuple[dict, ...], accum: int) -> dict:
    """Several data shards' batches -> one host batch laid out as on as many hosts: micro-batch
    a holds every shard's rows of micro-batch a, shard by shard (`stage.device_batch` splits
    host rows into `accum` consecutive micro-batches)."""

    def one(*xs):
        parts = [x.reshape(accum, -1, *x.shape[1:]) for x in xs]
        return np.concatenate(parts, axis=1).reshape(-1, *xs[0].shape[1:])

    return {k: one(*(b[k] for b in batches)) for k in batches[0]}


def empty_row(seq_len: int) -> dict:
    """An all-padding row (segment 0 everywhere: no tokens, no loss)."""
    keys = ("tokens", "loss_mask", "segment_ids", "positions", "source")
    return {k: np.zeros(seq_len, np.int32) for k in keys} | {
        "events": np.zeros((seq_len, len(EVENTS)), np.int32)
    }


class Pipeline:
    """The training (and held-out eval) data of one stage on this host."""

    def __init__(
        self,
        sources: list[Source],
        tokenizer,
        tcfg: TrainConfig,
        scfg: StageConfig,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.sources, self.tokenizer, self.tcfg, self.scfg = sources, tokenizer, tcfg, scfg
        self.seed = seed
        self.process_index, self.process_count = process_index, process_count
        if tcfg.global_batch % process_count:
            raise DataError(
                f"train.global_batch={tcfg.global_batch} rows do not divide over "
                f"{process_count} hosts"
            )
        self.rows_per_host = tcfg.global_batch // process_count
        # Data shards: disjoint record streams, each packed into its own rows. Host p runs a
        # contiguous block of them, so the global batch depends on their number only.
        self.data_shards = tcfg.data_shards or process_count
        if self.data_shards % process_count:
            raise DataError(
                f"train.data_shards={self.data_shards} does not divide over {process_count} "
                f"hosts (set a multiple of the host count, or 0 for one per host)"
            )
        per_host = self.data_shards // process_count
        self.shards = range(process_index * per_host, (process_index + 1) * per_host)
        self.rows_per_shard = tcfg.global_batch // self.data_shards
        self.splits = {s.name: split_source(s, tcfg.eval_rows, seed) for s in sources}
        self.encoders = {
            s.name: Encode(tokenizer, s, tcfg, scfg.mask_student_prefix) for s in sources
        }

    def mixed(self, shard: int | None = None) -> grain.IterDataset:
        """The weighted mix of all sources in one data shard (default: this host's first),
        one example per element (before packing)."""
        streams = {
            s.name: _source_stream(
                self.splits[s.name][0],
                self.encoders[s.name],
                _seed(self.seed, s.name),
                self.tcfg,
                self.shards[0] if shard is None else shard,
                self.data_shards,
            )
            for s in self.sources
        }
        return grain.IterDataset.mix(streams, {s.name: s.weight for s in self.sources})

    def dataset(self) -> grain.IterDataset:
        """Host batches: dicts of [rows_per_host, seq_len] arrays (see module docstring)."""
        packing, rows = self.tcfg.packing, self.rows_per_shard
        per_shard = [
            _pack(self.mixed(k), self.tcfg, rows, self.seed, shuffle=True)
            .map(lambda r: _finish(r, packing))
            .batch(rows, drop_remainder=True)
            for k in self.shards
        ]
        if len(per_shard) == 1:
            return per_shard[0]
        accum = self.tcfg.accum_steps
        return grain.experimental.ZipIterDataset(per_shard).map(lambda b: _merge(b, accum))

    def eval_rows(self, multiple: int) -> list[dict]:
        """This host's share of the held-out records, packed (no shuffling) into rows, padded
        with empty rows to a multiple of `multiple`; [] when there is no eval split."""
        examples = []
        for s in self.sources:
            held = self.splits[s.name][1]
            for i in range(self.process_index, len(held), self.process_count):
                ex = self.encoders[s.name](held[i])
                if ex["status"] == "ok":
                    examples.append({k: v for k, v in ex.items() if k != "status"})
        if not examples:
            return []
        ds = grain.MapDataset.source(examples).to_iter_dataset()
        rows = [
            _finish(r, self.tcfg.packing)
            for r in _pack(ds, self.tcfg, max(multiple, 8), self.seed, shuffle=False)
        ]
        while len(rows) % multiple:
            rows.append(empty_row(self.tcfg.seq_len))
        return rows

    def mean_tokens(self, n: int) -> dict[str, float]:
        """Mean tokens per training example of each source, from its first n records (after
        the over-long policy): how `epochs` become a step count."""
        out = {}
        for s in self.sources:
            train = self.splits[s.name][0]
            lens = []
            for i in range(min(n, len(train))):
                ex = self.encoders[s.name](train[i])
                if ex["status"] == "ok":
                    lens.append(len(ex["tokens"]))
            if not lens:
                raise DataError(
                    f"source {s.name!r}: none of its first {n} records can be "
                    f"trained on (all over-long or bad)"
                )
            out[s.name] = float(np.mean(lens))
        return out

    def estimate_steps(self, epochs: float) -> int:
        """ceil(epochs * estimated tokens / tokens per step). Approximate: rows are not
        completely full, so slightly fewer than `epochs` passes; set max_steps to be exact."""
        mean = self.mean_tokens(self.tcfg.length_sample)
        tokens = sum(len(self.splits[s.name][0]) * mean[s.name] for s in self.sources)
        per_step = self.tcfg.global_batch * self.tcfg.seq_len
        return max(1, int(np.ceil(epochs * tokens / per_step)))


# --------------------------------------------------------------------------- demo data


def write_demo_records(path: str | Path, source: str, stage: int) -> str | Path:
    """The embedded demo rows as SFTRecords (stage 3: the first half of each response marked
    as a student prefix, as mixed-policy records are). For the CPU demo only."""
    from dasd_jax import embedded
    from dasd_jax.schema import write_sft_records

    if storage.exists(path):
        return path
    recs = []
    for row in embedded.demo_rows():
        prefix = len(row["output"]) // 2 if stage == 3 else 0
        recs.append(
            SFTRecord(
                id=row["uuid"],
                prompt=row["input"],
                response=row["output"],
                source=source,
                domain=row.get("domain"),
                student_prefix_chars=prefix,
                meta={
                    "demo": "dasd_jax embedded demo rows, not real data",
                    **json.loads(row.get("meta") or "{}"),
                },
            )
        )
    write_sft_records(path, recs)
    return path
