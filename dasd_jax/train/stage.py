"""`run(cfg, stage)`: one SFT stage (1, 2 or 3) from its inputs to a checkpoint and an HF export.

Consumes the config (`train`, `stage{n}`, `student`, `mesh`, `seed`, `run_dir`), the stage's
SFTRecord sources and its starting weights: stage 1 a Hugging Face student folder
(`student.path`; "" = the embedded tiny Qwen3), stage 2 stage 1's final checkpoint, stage 3
stage 2's (or any HF folder given as `stage{n}.init_from`). Produces under
`<run_dir>/stage{n}/`: `checkpoints/<step>/` (Orbax), `metrics.jsonl`, `tensorboard/`,
`config.yaml`, `export/` (a Hugging Face folder that transformers and vLLM load) and, last,
`final.json` (the step and paths the next stage starts from).

Every stage starts with a fresh optimizer and schedule; only weights pass between stages.
Restarting a stage resumes from its latest checkpoint: weights, optimizer, RNG, data position,
step and counters, so the per-step losses are those of an uninterrupted run (bit-exact on
CPU); `metrics.jsonl` is cut back to the checkpoint's step, so no step is logged twice.
SIGTERM (TPU preemption) sets a flag; the loop saves at the next step boundary, on all hosts at
the same step, and returns. A step whose loss, gradient norm, learning rate or updated state
is not finite (the step's `all_finite`, see `train.step`) raises `NonFiniteLoss` naming the
step, before anything is saved: a checkpoint is written only from a state known to be finite,
so the ones on disk stay the last good ones and a diverged step never rotates them out.

Paths may be gs:// (run_dir, init_from, sources): the stage folder is an `epath.Path`; small
files go through `dasd_jax.storage` (atomic), checkpoints through Orbax, the export through
`save_hf`'s local build + upload, metrics and TensorBoard through a local mirror uploaded when
the loop ends (`train.metrics`). A remote export's config and tokenizer files are copied to
the local cache to read them (`storage.download_dir`); its weights are not.

Embedded demo: when the stage starts from the embedded tiny student it uses the small batch
geometry of `DEMO_TRAIN` (fields still at their defaults only), on the selected records if the
select stage wrote some, else on `embedded.demo_rows()` written as SFTRecords to
`<run_dir>/demo_data/`, so `python -m dasd_jax.launch --stage=1` runs on a CPU in a minute or so.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dasd_jax import storage
from dasd_jax.config import Config, to_yaml
from dasd_jax.models.checkpoint import ARCHITECTURES, load_hf, read_config, save_hf
from dasd_jax.records import BadRows, write_json
from dasd_jax.sharding import BATCH_AXES, make_mesh
from dasd_jax.tokenizer import load_tokenizer
from dasd_jax.train import data as data_lib
from dasd_jax.train import optim
from dasd_jax.train.checkpoint import Checkpointer, abstract_arrays, restore_model, shardings_of
from dasd_jax.train.config import StageConfig, TrainConfig
from dasd_jax.train.metrics import Metrics, peak_flops, step_flops
from dasd_jax.train.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)

# batch rows: micro_batch = one row per batch-parallel device, global_batch = two micro-batches
DEMO_TRAIN = dict(
    seq_len=256, checkpoint_every=4, eval_rows=1, eval_every=4, data_threads=2, length_sample=8
)
DEMO_MAX_STEPS = 8
# records seen before the bad-record fraction is tested mid-run (it is always tested at the end)
MIN_RECORDS_FOR_BAD_FRACTION = 100


class StageError(RuntimeError):
    """A stage cannot start: its starting point is missing."""


class NonFiniteLoss(FloatingPointError):
    """A step's loss, gradient norm, learning rate or updated weights/moments became NaN or
    infinite; nothing was saved after the last good step."""


def stage_dir(cfg: Config, stage: int) -> Path:
    """`<run_dir>/stage{n}` as an `epath.Path` (pathlib operations; local or gs://)."""
    return storage.as_path(storage.join(cfg.run_dir, f"stage{stage}"))


def stage_config(cfg: Config, stage: int) -> StageConfig:
    if stage not in (1, 2, 3):
        raise ValueError(f"SFT stages are 1, 2 and 3, not {stage!r}")
    return getattr(cfg, f"stage{stage}")


# --------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Init:
    """Where a stage's starting weights come from."""

    kind: str  # "hf": a Hugging Face folder; "stage": a previous stage's final checkpoint
    path: Path  # the HF folder, or the previous stage's checkpoints folder
    step: int | None  # checkpoint step (kind "stage")
    model_dir: Path  # folder with config.json (architecture) and the tokenizer files
    embedded: bool  # the embedded tiny student (CPU demo)


def resolve_init(cfg: Config, stage: int) -> Init:
    scfg = stage_config(cfg, stage)
    if scfg.init_from:
        path = storage.as_path(scfg.init_from)
        if not path.exists():
            raise StageError(f"stage{stage}.init_from={scfg.init_from}: {path} does not exist")
        if (path / "final.json").exists():  # another run's stage folder
            return _from_stage(path)
        if not (path / "config.json").exists():
            raise StageError(
                f"stage{stage}.init_from={path}: not a Hugging Face folder (no "
                f"config.json) nor a finished stage folder (no final.json)"
            )
        local = Path(storage.download_dir(path))  # a gs:// HF folder: copied to the cache
        return Init("hf", local, None, local, False)
    if stage == 1:
        if cfg.student.path:
            if not storage.exists(cfg.student.path):
                raise StageError(f"student.path={cfg.student.path} does not exist")
            local = Path(storage.download_dir(cfg.student.path))  # gs://: copied to the cache
            return Init("hf", local, None, local, False)
        from dasd_jax import embedded

        path = embedded.tiny_student()
        return Init("hf", path, None, path, True)
    prev = stage_dir(cfg, stage - 1)
    if not (prev / "final.json").exists():
        started = (prev / "checkpoints").exists()
        raise StageError(
            f"stage {stage} starts from stage {stage - 1}'s final checkpoint, but "
            f"{prev / 'final.json'} does not exist"
            + (f" (stage {stage - 1} started but has not finished)" if started else "")
            + f": run `python -m dasd_jax.launch --stage={stage - 1}` first with the same "
            f"run_dir, or set stage{stage}.init_from to a Hugging Face folder"
        )
    return _from_stage(prev)


def _from_stage(folder: Path) -> Init:
    final = json.loads(storage.read_text(folder / "final.json"))
    # config.json + tokenizer files are read by local-only libraries: a local copy if remote
    model_dir = storage.download_dir(folder / "export", skip=("*.safetensors",))
    return Init(
        "stage",
        folder / "checkpoints",
        int(final["step"]),
        Path(model_dir),
        bool(final.get("embedded", False)),
    )


def resolve_data(cfg: Config, stage: int, init: Init, batch_ways: int = 1):
    """(sources, train config, stage config, demo?): the demo set when eligible."""
    scfg = stage_config(cfg, stage)
    # the pipeline-wide bad-row policy, unless train.on_bad_record says otherwise
    policy = cfg.bad_rows.for_stage(cfg.train.on_bad_record)
    tcfg = dataclasses.replace(cfg.train, on_bad_record=policy.on_bad_row)
    found = any(
        storage.glob(p.strip().replace("{run_dir}", cfg.run_dir))
        for s in scfg.sources.values()
        if s.weight > 0
        for p in s.path.split(",")
        if p
    )
    if not init.embedded:
        return data_lib.resolve_sources(scfg, cfg.run_dir, stage), tcfg, scfg, False
    # The embedded tiny student runs on a CPU: it gets the small batch geometry whether it
    # trains on selected records or on the demo rows (the paper's 64 x 64K rows would not fit).
    defaults = TrainConfig()
    demo = {**DEMO_TRAIN, "global_batch": 2 * batch_ways, "micro_batch": batch_ways}
    tcfg = dataclasses.replace(
        tcfg, **{k: v for k, v in demo.items() if getattr(tcfg, k) == getattr(defaults, k)}
    )
    scfg = dataclasses.replace(scfg, max_steps=scfg.max_steps or DEMO_MAX_STEPS)
    if found:
        log.warning(
            "stage %d: the embedded tiny student: CPU geometry seq_len=%d, global_batch=%d, "
            "%d steps. Set student.path to train a real model.",
            stage,
            tcfg.seq_len,
            tcfg.global_batch,
            scfg.max_steps,
        )
        return data_lib.resolve_sources(scfg, cfg.run_dir, stage), tcfg, scfg, False
    path = storage.join(cfg.run_dir, "demo_data", f"stage{stage}.array_record")
    data_lib.write_demo_records(path, "demo", stage)
    log.warning(
        "stage %d: no SFT records at %s and the embedded tiny student: training the "
        "EMBEDDED DEMO rows (%s), seq_len=%d, global_batch=%d, %d steps. Set "
        "student.path and stage%d.sources to train for real.",
        stage,
        [s.path for s in scfg.sources.values()],
        path,
        tcfg.seq_len,
        tcfg.global_batch,
        scfg.max_steps,
        stage,
    )
    return [data_lib.Source("demo", 1, (str(path),), 1.0)], tcfg, scfg, True


# --------------------------------------------------------------------------- state


@dataclass
class TrainState:
    model_def: object
    opt_def: object
    abstract: dict  # ShapeDtypeStructs with shardings, same tree as the state
    shardings: dict
    model_cfg: object


def build_state(cfg: Config, init: Init, mesh, tx) -> TrainState:
    """Graph definitions, shardings and abstract arrays of model + optimizer (no allocation)."""
    model_cfg = read_config(init.model_dir)
    model_cls = ARCHITECTURES[model_cfg.model_type][1]
    opts = cfg.student.options()

    def make():
        return model_cls(model_cfg, opts, rngs=nnx.Rngs(0), mesh=mesh)

    model_def, model_abs = nnx.split(nnx.eval_shape(make))
    opt_def, opt_abs = nnx.split(nnx.eval_shape(lambda: nnx.Optimizer(make(), tx, wrt=nnx.Param)))
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = {
        "model": shardings_of(model_abs, mesh),
        "opt": shardings_of(opt_abs, mesh),
        "rng": replicated,
    }
    abstract = {
        "model": abstract_arrays(model_abs, shardings["model"]),
        "opt": abstract_arrays(opt_abs, shardings["opt"]),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    }
    return TrainState(model_def, opt_def, abstract, shardings, model_cfg)


def fresh_state(cfg: Config, init: Init, ts: TrainState, mesh, tx) -> dict:
    """Starting weights (HF folder or previous stage) + a new optimizer state + RNG."""
    if init.kind == "hf":
        model_state = nnx.split(load_hf(init.path, mesh, cfg.student.options()))[1]
    else:
        model_state = restore_model(init.path, init.step, ts.abstract["model"])
    model_def = ts.model_def
    make_opt = jax.jit(
        lambda ms: nnx.state(nnx.Optimizer(nnx.merge(model_def, ms), tx, wrt=nnx.Param)),
        out_shardings=ts.shardings["opt"],
    )
    rng = jax.device_put(jax.random.PRNGKey(cfg.seed), ts.shardings["rng"])
    return {"model": model_state, "opt": make_opt(model_state), "rng": rng}


# --------------------------------------------------------------------------- batches


def device_batch(host: dict, mesh, accum: int) -> dict:
    """Host rows [R, T] -> global arrays [A, micro, T] split over the mesh's batch axes."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1) or None
    sharding = NamedSharding(mesh, PartitionSpec(None, axes, None))
    out = {}
    for k in ("tokens", "loss_mask", "positions", "segment_ids"):
        local = np.asarray(host[k], np.int32)
        R, T = local.shape
        local = local.reshape(accum, R // accum, T)
        shape = (accum, R // accum * jax.process_count(), T)
        out[k] = jax.make_array_from_process_local_data(sharding, local, shape)
    return out


def host_stats(host: dict, names: dict[int, str], model_cfg) -> dict:
    """Counts of one host batch: tokens, padding, per-source tokens, documents, events,
    model FLOPs (attention per attention span: a document, or the row when unmasked)."""
    seg, src = np.asarray(host["segment_ids"]), np.asarray(host["source"])
    real = src > 0
    n = int(real.sum())
    docs = np.concatenate([np.bincount(row)[1:] for row in seg])
    docs = docs[docs > 0]
    counts = np.bincount(src[real], minlength=max(names) + 1)
    events = np.asarray(host["events"]).reshape(-1, len(data_lib.EVENTS)).sum(0)
    return {
        "tokens": n,
        "rows": int(src.shape[0]),
        "padding": 1.0 - n / src.size,
        "flops": step_flops(model_cfg, n, docs),
        "documents": int(len(docs)),
        "per_source": {names[i]: int(counts[i]) for i in names},
        "events": {k: int(v) for k, v in zip(data_lib.EVENTS, events, strict=True)},
        "hash": zlib.crc32(np.ascontiguousarray(host["tokens"]).tobytes()),
    }


# --------------------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM -> a flag read at step boundaries (the handler itself does nothing else)."""

    def __init__(self):
        self.flag = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint at the next step boundary, then exiting")
        self.flag = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_host(self) -> bool:
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))


def run(cfg: Config, stage: int, *, on_step=None) -> dict:
    """Train stage `stage` to its end (or to SIGTERM); returns a summary dict.

    `on_step(step, metrics)` (optional) is called after every step's metrics are known.
    """
    scfg = stage_config(cfg, stage)
    out = stage_dir(cfg, stage)
    if (out / "final.json").exists():
        log.info("stage %d already finished: %s", stage, out / "final.json")
        return {**json.loads(storage.read_text(out / "final.json")), "already_finished": True}
    init = resolve_init(cfg, stage)
    mesh = make_mesh(cfg.mesh)
    batch_ways = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    sources, tcfg, scfg, demo = resolve_data(cfg, stage, init, batch_ways)
    micro = tcfg.micro_batch or tcfg.global_batch
    if micro % batch_ways:
        raise ValueError(
            f"train.micro_batch={micro} rows do not split over the mesh's "
            f"{batch_ways}-way batch axes {BATCH_AXES}: change train.micro_batch "
            f"or mesh (e.g. mesh.data=1)"
        )
    writer = jax.process_index() == 0
    storage.makedirs(out)
    if writer:
        with storage.atomic_write(out / "config.yaml") as f:
            f.write(to_yaml(dataclasses.replace(cfg, train=tcfg, **{f"stage{stage}": scfg})))

    tokenizer = load_tokenizer(init.model_dir)
    pipeline = data_lib.Pipeline(
        sources, tokenizer, tcfg, scfg, cfg.seed, jax.process_index(), jax.process_count()
    )
    total = scfg.max_steps or pipeline.estimate_steps(scfg.epochs)
    schedule = optim.lr_schedule(scfg, total)
    tx = optim.make_optimizer(tcfg, schedule)
    ts = build_state(cfg, init, mesh, tx)
    ckpt = Checkpointer(
        out / "checkpoints", tcfg.checkpoint_every, tcfg.keep_checkpoints, tcfg.async_checkpoints
    )
    data_iter = iter(pipeline.dataset())
    start = ckpt.latest_step()
    counters = {k: 0 for k in data_lib.EVENTS} | {"tokens_seen": 0, "documents": 0}
    bad_records = BadRows(
        f"stage {stage}",
        cfg.bad_rows.for_stage(tcfg.on_bad_record),
        f"{out / 'metrics.jsonl'} (skipped_bad; each one logged with its reason)",
    )
    if start is not None:
        log.info("stage %d: resuming from step %d (%s)", stage, start, ckpt.directory)
        try:
            state, meta = ckpt.restore(start, ts.abstract, data_iter)
        except BaseException:  # e.g. a checkpoint holding NaN (NonFiniteCheckpoint)
            ckpt.close()
            raise
        counters.update(meta.get("counters", {}))
        if meta.get("total_steps") != total:
            log.warning(
                "stage %d: the checkpoint was written for %s steps, now %d",
                stage,
                meta.get("total_steps"),
                total,
            )
    else:
        start = 0
        state = fresh_state(cfg, init, ts, mesh, tx)

    train_step = jax.jit(
        make_train_step(ts.model_def, ts.opt_def, schedule, tcfg.chunk_size, ts.shardings["model"]),
        donate_argnums=0,
        out_shardings=(ts.shardings, None),
    )
    eval_step = jax.jit(make_eval_step(ts.model_def, tcfg.chunk_size))
    eval_rows = pipeline.eval_rows(micro // jax.process_count()) if tcfg.eval_rows else []
    if jax.process_count() > 1 and tcfg.eval_rows:  # every host runs the same eval steps
        most = int(max(_gather([len(eval_rows)])[:, 0]))
        eval_rows += [data_lib.empty_row(tcfg.seq_len)] * (most - len(eval_rows))
    names = {s.index: s.name for s in sources}
    metrics = Metrics(
        out,
        f"stage{stage}",
        total,
        enabled=writer,
        tensorboard=tcfg.tensorboard,
        log_every=tcfg.log_every,
        resume_step=start,  # a resumed run logs the steps after its checkpoint again
    )
    peak = peak_flops(jax.devices()[0].device_kind, tcfg.peak_tflops)
    summary = {
        "stage": stage,
        "run_dir": str(cfg.run_dir),
        "total_steps": total,
        "start_step": start,
        "demo": demo,
        "sources": {s.name: list(s.files) for s in sources},
    }

    def evaluate(step: int) -> None:
        if not eval_rows:
            return
        nll = n = 0.0
        per = micro // jax.process_count()
        for i in range(0, len(eval_rows), per):
            rows = eval_rows[i : i + per]
            host = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
            b = {k: v[0] for k, v in device_batch(host, mesh, 1).items()}
            s, c = eval_step(state["model"], b)
            nll, n = nll + float(s), n + float(c)
        row = {"step": step, "eval_loss": nll / max(n, 1.0), "eval_tokens": int(n)}
        metrics.log(row)
        summary["eval_loss"] = row["eval_loss"]

    def meta(step: int) -> dict:
        return {"step": step, "stage": stage, "total_steps": total, "counters": counters}

    pending = None  # (step, device metrics, host stats, wall time): read one step late

    def finish(p) -> dict:
        step, dm, hs, t_start = p
        m = {k: float(v) for k, v in jax.device_get(dm).items()}
        if not _finite_step(m):
            raise NonFiniteLoss(_nonfinite_message(stage, step, m, ckpt))
        dt = time.perf_counter() - t_start
        counters["tokens_seen"] += hs["tokens_all"]
        counters["documents"] += hs["documents"]
        for k in data_lib.EVENTS:
            counters[k] += hs["events"][k]
        _check_bad_records(bad_records, counters, final=False)
        row = {
            "step": step,
            "loss": m["loss"],
            "grad_norm": m["grad_norm"],
            "lr": m["lr"],
            "loss_tokens": int(m["loss_tokens"]),
            "tokens": hs["tokens_all"],
            "documents": hs["documents"],
            "padding": hs["padding"],
            "tokens_per_s": hs["tokens_all"] / dt if dt > 0 else None,
            "mfu": (
                hs["flops_all"] / dt / (peak * jax.device_count()) if peak and dt > 0 else None
            ),
            **{f"tokens/{k}": v for k, v in hs["per_source"].items()},
            **counters,
            "data_hash": hs["hash"],
        }
        metrics.log(row)
        metrics.progress(step, row)
        if on_step is not None:
            on_step(step, row)
        return row

    def save(step: int) -> None:
        ckpt.save(step, state, data_iter, meta(step))

    t_last = time.perf_counter()
    step = start
    stopped = False
    try:
        with _Preemption() as preempt:
            while step < total:
                host = next(data_iter)
                hs = host_stats(host, names, ts.model_cfg)
                hs = _global_stats(hs, tcfg.seq_len)
                state, dm = train_step(state, device_batch(host, mesh, tcfg.accum_steps))
                step += 1
                if pending is not None:
                    finish(pending)
                pending = (step, dm, hs, t_last)
                t_last = time.perf_counter()
                stop = preempt.any_host()
                if ckpt.due(step) or stop or step == total:
                    finish(pending)  # never save a state whose loss is not known to be finite
                    pending = None
                    save(step)
                if tcfg.eval_every and step % tcfg.eval_every == 0 and step != total:
                    evaluate(step)
                if stop and step < total:
                    stopped = True
                    break
            if pending is not None:
                finish(pending)
    except BaseException:
        # let an in-flight (good) checkpoint commit; the failed step is never saved
        ckpt.wait()
        ckpt.close()
        metrics.close()
        raise
    ckpt.wait()
    _check_bad_records(bad_records, counters, final=True)
    summary.update(step=step, counters=counters, checkpoint=str(ckpt.directory))
    if stopped:
        ckpt.close()
        metrics.close()
        summary["preempted"] = True
        log.warning("stage %d: stopped by SIGTERM at step %d (checkpoint saved)", stage, step)
        return summary
    evaluate(step)
    ckpt.close()
    metrics.close()
    model = nnx.merge(ts.model_def, state["model"])
    export = save_hf(model, out / "export", dtype=tcfg.export_dtype, tokenizer_dir=init.model_dir)
    summary.update(export=str(export), embedded=init.embedded)
    if writer:
        final = {
            k: summary[k]
            for k in ("stage", "step", "checkpoint", "export", "embedded", "demo", "total_steps")
        }
        write_json(out / "final.json", final)  # atomic: the stage's completion marker
    return summary


def _finite_step(m: dict) -> bool:
    """The step's own on-device verdict (`all_finite`: loss, grad norm, lr and the whole
    updated state) and, on the host, its loss, grad norm and lr."""
    scalars = (m["loss"], m["grad_norm"], m["lr"])
    return bool(m["all_finite"]) and all(np.isfinite(x) for x in scalars)


def _nonfinite_message(stage: int, step: int, m: dict, ckpt: Checkpointer) -> str:
    bad = [k.replace("_", " ") for k in ("loss", "grad_norm", "lr") if not np.isfinite(m[k])]
    if not bad:  # the scalars are finite: the update itself overflowed
        bad = ["the parameters or optimizer moments after the update"]
    last = ckpt.latest_step()  # every checkpoint saved was checked finite before its save
    return (
        f"stage {stage}: loss is {m['loss']} at step {step} (grad norm {m['grad_norm']}, "
        f"lr {m['lr']}); not finite: {', '.join(bad)}. Stopping without saving step {step}. "
        "Last good checkpoint: "
        + (f"step {last} in {ckpt.directory}" if last is not None else "none")
        + f" (a lower stage{stage}.lr may get past it)"
    )


def _check_bad_records(bad_records: BadRows, counters: dict, final: bool) -> None:
    """The bad-record fraction so far (`skipped_bad` of the records read); mid-run only once
    `MIN_RECORDS_FOR_BAD_FRACTION` records were read (a few say little about the rest)."""
    bad = counters["skipped_bad"]
    seen = counters["documents"] + bad
    if final or seen >= MIN_RECORDS_FOR_BAD_FRACTION:
        bad_records.check(seen, bad, {"bad_record": bad})


def _gather(values: list[float]) -> np.ndarray:
    """[processes, len(values)]: every process's values (a collective: all must call)."""
    from jax.experimental import multihost_utils

    out = multihost_utils.process_allgather(np.asarray(values, np.float64))
    return np.asarray(out).reshape(jax.process_count(), len(values))


def _sum_over_hosts(values: list[float]) -> list[float]:
    if jax.process_count() == 1:
        return list(values)
    return [type(v)(x) for v, x in zip(values, _gather(values).sum(0), strict=True)]


def _global_stats(hs: dict, seq_len: int) -> dict:
    """One host's batch counts -> the global batch's (`tokens_all`, `flops_all`, documents,
    padding, per-source tokens, events): every host reports its own rows, one small gather
    per step. `hash` stays this host's."""
    names, events = list(hs["per_source"]), list(hs["events"])
    values = [hs["tokens"], hs["flops"], hs["documents"], hs["rows"]]
    values += [hs["per_source"][k] for k in names] + [hs["events"][k] for k in events]
    total = _sum_over_hosts(values)
    tokens, flops, documents, rows = total[:4]
    per_source = dict(zip(names, total[4 : 4 + len(names)], strict=True))
    return {
        **hs,
        "tokens_all": tokens,
        "flops_all": flops,
        "documents": documents,
        "padding": 1.0 - tokens / (rows * seq_len),
        "per_source": per_source,
        "events": dict(zip(events, total[4 + len(names) :], strict=True)),
    }
