"""The `export` stage: any SFT stage checkpoint -> a Hugging Face folder.

Consumes a training stage's Orbax checkpoints (`<run_dir>/stage{n}/checkpoints`, written by
`dasd_jax.train.stage`) and the architecture + tokenizer folder that stage started from (the
student's HF folder for stage 1, the previous stage's export for stages 2 and 3).

Produces `export.output` (default `<run_dir>/export/stage{n}-step{s}`): `config.json`,
`generation_config.json`, safetensors shards (+ index), the tokenizer files with the chat
template, and `dasd_export.json` (which stage, step and checkpoint it came from, dtype, a hash
of every tensor file). transformers' `AutoModelForCausalLM.from_pretrained` and vLLM load the
folder as they load the original checkpoint. An existing export of the same stage and step is
kept (the stage is a no-op on re-run).

Nothing unverified ever carries the final name: the folder is assembled under a temporary name
beside it (`.<name>.tmp-<pid>-<random>`, `models.checkpoint.staging_dir`), read back there with
our own loader and every tensor compared with the checkpoint's (cast to the export dtype),
given its `dasd_export.json`, and only then renamed into place. A checkpoint holding NaN or inf
is refused before anything is written (`ExportError` naming the stage and step), as is a
tensor that the export dtype cannot hold (a float16 overflow); a mismatch on read-back is an
error, not a warning, and its temporary folder is deleted. Temporary folders of killed exports
of the same output are swept when the next export of it starts.

Stages finish with their own `stage{n}/export`; this stage exists for the checkpoints in
between (an earlier step, a preempted run) and for a different dtype.

`run_dir` and `export.output` may be gs:// (`dasd_jax.storage`): Orbax reads gs://
checkpoints itself; `save_hf` builds (and checks) a gs:// export locally and uploads it,
`config.json` last; a bucket has no rename, so the read-back check then downloads the uploaded
files to a temporary folder (so it checks what is in the bucket) and deletes them, and
`dasd_export.json`, written last, is what marks the export complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dasd_jax import storage

if TYPE_CHECKING:
    from dasd_jax.config import Config

log = logging.getLogger(__name__)

INFO_FILE = "dasd_export.json"


@dataclass(frozen=True)
class ExportConfig:
    """The `export` stage."""

    stage: str = "latest"  # 1 | 2 | 3 | latest (the highest stage with a checkpoint)
    step: int = 0  # 0 = the stage's final step (or its latest checkpoint if unfinished)
    output: str = ""  # "" = <run_dir>/export/stage{n}-step{s}
    dtype: str = "bfloat16"  # tensor dtype written: bfloat16 | float16 | float32
    verify: bool = True  # read the export back and compare every tensor

    def __post_init__(self) -> None:
        if self.stage not in ("1", "2", "3", "latest"):
            raise ValueError(f"export.stage must be 1, 2, 3 or latest, got {self.stage!r}")
        if self.step < 0:
            raise ValueError(f"export.step must be >= 0, got {self.step}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(
                f"export.dtype must be bfloat16, float16 or float32, got {self.dtype!r}"
            )


class ExportError(RuntimeError):
    """Nothing to export, or the export does not read back equal to the checkpoint."""


def checkpoint_steps(ckpt_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete Orbax checkpoints in `ckpt_dir` (ascending; local or gs://)."""
    if not storage.isdir(ckpt_dir):
        return []
    import orbax.checkpoint as ocp

    from dasd_jax.train.checkpoint import checkpoint_dir

    with ocp.CheckpointManager(checkpoint_dir(ckpt_dir)) as manager:
        return sorted(manager.all_steps())


def resolve_source(cfg: Config) -> tuple[int, int, os.PathLike]:
    """(stage, step, checkpoints folder) named by `export.*`, with errors that say what to run."""
    from dasd_jax.train.stage import stage_dir

    ec = cfg.export
    stages = (3, 2, 1) if ec.stage == "latest" else (int(ec.stage),)
    for n in stages:
        ckpt_dir = stage_dir(cfg, n) / "checkpoints"
        steps = checkpoint_steps(ckpt_dir)
        if not steps:
            continue
        if ec.step:
            if ec.step not in steps:
                raise ExportError(
                    f"export.step={ec.step}: stage {n} has checkpoints at steps {steps} "
                    f"({ckpt_dir})"
                )
            return n, ec.step, ckpt_dir
        final = stage_dir(cfg, n) / "final.json"
        step = json.loads(storage.read_text(final))["step"] if final.exists() else steps[-1]
        return n, int(step), ckpt_dir
    which = "any stage" if ec.stage == "latest" else f"stage {ec.stage}"
    first = "1" if ec.stage == "latest" else ec.stage
    raise ExportError(
        f"no checkpoint of {which} under {cfg.run_dir}: run "
        f"`python -m dasd_jax.launch --stage={first}` first with the same run_dir"
    )


def _file_hashes(folder: str | os.PathLike) -> dict[str, str]:
    out = {}
    for f in storage.glob(storage.join(folder, "*.safetensors")):
        h = hashlib.sha256()
        with storage.open_read(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):  # noqa: B023 (used at once)
                h.update(block)
        out[os.path.basename(f)] = h.hexdigest()
    return out


def _read_back(out: str, mesh, opts):
    """The export loaded with our own loader: from `out` when local; from a temporary local
    copy of the gs:// objects (every file, so what the bucket holds is what is checked)."""
    from dasd_jax.models.checkpoint import load_hf

    if not storage.is_remote(out):
        return load_hf(Path(out), mesh, opts)
    from dasd_jax.models.checkpoint import discard_staging, staging_dir, sweep_staging

    check = Path(storage.cache_root()) / "export-check"  # big files: not a small /tmp
    sweep_staging(check)  # the copies left by killed checks
    tmp = staging_dir(check)
    try:
        for name in storage.walk_files(out):
            storage.copy(storage.join(out, name), os.path.join(tmp, name))
        return load_hf(tmp, mesh, opts)
    finally:
        discard_staging(tmp)


def _compare(model, reloaded, dtype: str) -> int:
    """Number of tensors compared; raises ExportError on the first difference."""
    import jax
    import ml_dtypes
    from flax import nnx

    want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    got = dict(nnx.to_flat_state(nnx.state(reloaded, nnx.Param)))
    if set(want) != set(got):
        raise ExportError(f"export reads back with other parameters: {set(want) ^ set(got)}")
    np_dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    for key in sorted(want, key=str):
        a = np.asarray(jax.device_get(want[key].get_value())).astype(np_dt).astype(np.float32)
        b = np.asarray(jax.device_get(got[key].get_value())).astype(np.float32)
        if a.shape != b.shape or not np.array_equal(a, b):
            name = "/".join(map(str, key))
            raise ExportError(f"export check: tensor {name} differs from the checkpoint")
    return len(want)


def run(cfg: Config) -> dict:
    """Export the checkpoint named by `export.*`; returns the summary."""
    from flax import nnx

    from dasd_jax.models.checkpoint import ARCHITECTURES, NonFiniteWeights, read_config
    from dasd_jax.sharding import make_mesh
    from dasd_jax.train.checkpoint import (
        NonFiniteCheckpoint,
        abstract_arrays,
        restore_model,
        shardings_of,
    )
    from dasd_jax.train.stage import resolve_init

    ec = cfg.export
    t0 = time.perf_counter()
    stage, step, ckpt_dir = resolve_source(cfg)
    out = ec.output or storage.join(cfg.run_dir, "export", f"stage{stage}-step{step}")
    if not storage.is_remote(out):
        out = str(Path(out))
    info_path = storage.join(out, INFO_FILE)
    if storage.exists(info_path):
        info = json.loads(storage.read_text(info_path))
        if info.get("stage") == stage and info.get("step") == step and info["dtype"] == ec.dtype:
            log.info("export: %s already holds stage %d step %d", out, stage, step)
            return {**info, "output": out, "already_done": True, "counts": _counts(info)}
        raise ExportError(
            f"{out} already holds another export (stage {info.get('stage')}, step "
            f"{info.get('step')}, {info.get('dtype')}): choose export.output"
        )
    model_dir = resolve_init(cfg, stage).model_dir
    model_cfg = read_config(model_dir)
    model_cls = ARCHITECTURES[model_cfg.model_type][1]
    opts = cfg.student.options()
    mesh = make_mesh(cfg.mesh)
    model_def, model_abs = nnx.split(
        nnx.eval_shape(lambda: model_cls(model_cfg, opts, rngs=nnx.Rngs(0), mesh=mesh))
    )
    abstract = abstract_arrays(model_abs, shardings_of(model_abs, mesh))
    log.info("export: stage %d step %d from %s -> %s (%s)", stage, step, ckpt_dir, out, ec.dtype)
    try:
        model = nnx.merge(model_def, restore_model(ckpt_dir, step, abstract))
    except NonFiniteCheckpoint as e:
        raise ExportError(f"export: stage {stage} step {step} is not exported: {e}") from None
    info = {
        "stage": stage,
        "step": step,
        "checkpoint": str(ckpt_dir),
        "model_dir": str(model_dir),
        "dtype": ec.dtype,
        "model_type": model_cfg.model_type,
    }
    write = _write_remote if storage.is_remote(out) else _write_local
    try:
        info = write(model, out, info, verify=ec.verify, mesh=mesh, opts=opts, t0=t0)
    except NonFiniteWeights as e:
        raise ExportError(f"export: stage {stage} step {step} is not exported: {e}") from None
    return {**info, "output": out, "counts": _counts(info)}


def _finish_info(info: dict, folder, checked: int, t0: float) -> dict:
    return {
        **info,
        "tensors_checked": checked,
        "files": _file_hashes(folder),
        "seconds": round(time.perf_counter() - t0, 2),
    }


def _write_local(model, out: str, info: dict, *, verify: bool, mesh, opts, t0: float) -> dict:
    """Build, check and describe the export under a temporary name; then rename it to `out`."""
    import jax

    from dasd_jax.models.checkpoint import (
        discard_staging,
        load_hf,
        publish_dir,
        staging_dir,
        sweep_staging,
        write_hf,
    )
    from dasd_jax.records import write_json

    out_path = Path(out)
    tmp = None
    if jax.process_index() == 0:
        sweep_staging(out_path)  # what killed exports of this folder left behind
        tmp = staging_dir(out_path)
    try:
        write_hf(model, tmp, dtype=info["dtype"], tokenizer_dir=info["model_dir"], name=out_path)
        if tmp is None:  # other processes: they took part in the gathers only
            return _finish_info(info, out, 0, t0)
        checked = _compare(model, load_hf(tmp, mesh, opts), info["dtype"]) if verify else 0
        info = _finish_info(info, tmp, checked, t0)
        write_json(tmp / INFO_FILE, info)
        publish_dir(tmp, out_path)
    except BaseException:
        if tmp is not None:
            discard_staging(tmp)
        raise
    return info


def _write_remote(model, out: str, info: dict, *, verify: bool, mesh, opts, t0: float) -> dict:
    """A bucket has no rename: `save_hf` builds and checks the folder locally and uploads it
    (config.json last); the upload is read back, and `dasd_export.json`, written last,
    marks the export complete."""
    import jax

    from dasd_jax.models.checkpoint import save_hf
    from dasd_jax.records import write_json

    save_hf(model, out, dtype=info["dtype"], tokenizer_dir=info["model_dir"])
    checked = _compare(model, _read_back(out, mesh, opts), info["dtype"]) if verify else 0
    info = _finish_info(info, out, checked, t0)
    if jax.process_index() == 0:  # written last: its presence marks a complete export
        write_json(storage.join(out, INFO_FILE), info)
    return info


def _counts(info: dict) -> dict:
    n = len(info.get("files", {}))
    return {"in": 1, "out": 1 if n else 0, "rejected": 0, "tensor_files": n}
