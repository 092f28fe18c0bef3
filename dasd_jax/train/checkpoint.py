"""Orbax checkpoints of a training stage: model, optimizer, RNG, data position, step, counts.

Consumes the train state (pytree of sharded arrays), the Grain iterator and a small JSON of
run metadata; produces `<stage_dir>/checkpoints/<step>/` with the items `model`, `opt`, `rng`
(`StandardSave`), `data` (`grain.checkpoint.CheckpointSave`: one JSON per process) and `meta`
(`JsonSave`: step, counters). Orbax v0 `CheckpointManager`: saves are asynchronous (arrays
are copied to host before `save` returns, so the next step may donate their buffers), every
`checkpoint_every` steps plus forced saves on SIGTERM and at the end, the last
`keep_checkpoints` kept, written under a temporary name and committed atomically, and
multi-process safe (each process writes its own shards; the data item is per process).

Restores go into abstract arrays that carry shardings (`abstract_state`), so every device
reads only its shard. `restore_model` reads only the `model` item of another stage's
checkpoint: stage 2 starts from stage 1's weights with a fresh optimizer.

Both refuse a checkpoint whose arrays hold NaN or inf (`NonFiniteCheckpoint`, naming the step
and folder). The stage saves only states its step found finite, so such a checkpoint comes from
a version before that check, or from a corrupted copy; training on from it, or exporting it,
would only spread the NaN.

The folder may be local or gs://: Orbax writes through `etils.epath` itself (gcsfs, or
tf.io.gfile when TensorFlow is installed) and commits a step by its own atomic protocol, so the
path is handed over as given (`checkpoint_dir`: absolute when local, untouched when remote).
"""

from __future__ import annotations

import os
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dasd_jax import faults, storage
from dasd_jax.sharding import named_sharding


class NonFiniteCheckpoint(FloatingPointError):
    """A checkpoint whose weights or optimizer state hold NaN or inf."""


@jax.jit
def _finite_flags(arrays):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays])


def nonfinite_arrays(tree) -> list[str]:
    """Paths of the floating-point arrays of `tree` that hold a NaN or an inf (one jitted
    call reducing every array to a flag, one transfer of the flags)."""
    leaves = [
        (jax.tree_util.keystr(path), x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    if not leaves:
        return []
    flags = _finite_flags([x for _, x in leaves])
    return [name for (name, _), ok in zip(leaves, np.asarray(flags), strict=True) if not ok]


def _refuse_nonfinite(tree, directory, step: int, others: list[int]) -> None:
    bad = nonfinite_arrays(tree)
    if not bad:
        return
    earlier = [s for s in others if s < step]
    raise NonFiniteCheckpoint(
        f"checkpoint step {step} in {directory} holds NaN or inf in {len(bad)} arrays "
        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): it was saved from a "
        f"diverged run (versions before the train step's finite check saved such states). "
        f"Refusing to use it: delete {directory}/{step} to "
        + (f"resume from step {earlier[-1]}" if earlier else "start the stage over")
        + ", and lower the learning rate"
    )


def checkpoint_dir(directory: str | os.PathLike) -> epath.Path:
    """The path Orbax gets: gs:// as given (`Path.absolute()` would fold `gs://` to `gs:/`),
    a local one made absolute (Orbax requires absolute paths)."""
    if storage.is_remote(directory):
        return epath.Path(os.fspath(directory))
    return epath.Path(os.path.abspath(os.fspath(directory)))


def shardings_of(abstract_state, mesh: Mesh):
    """NamedSharding per variable: from its `logical_axes` metadata (parameters, and Adam
    moments, which copy their parameter's metadata), else replicated (step counts)."""

    def one(v):
        if not isinstance(v, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        axes = v.get_metadata().get("logical_axes")
        if axes is not None and len(axes) == len(v.shape):
            return v.replace(named_sharding(axes, v.shape, mesh))
        return v.replace(NamedSharding(mesh, PartitionSpec()))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_arrays(abstract_state, shardings):
    """ShapeDtypeStructs with shardings: Orbax restores straight onto the devices."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, asynchronous: bool = True):
        self.directory = checkpoint_dir(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=asynchronous,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def save(self, step: int, state: dict, data_iter, meta: dict) -> None:
        args = ocp.args.Composite(
            model=ocp.args.StandardSave(state["model"]),
            opt=ocp.args.StandardSave(state["opt"]),
            rng=ocp.args.StandardSave({"key": state["rng"]}),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)
        faults.tick("checkpoint")

    def restore(self, step: int, abstract: dict, data_iter=None) -> tuple[dict, dict]:
        """(state, meta) of `step`; `data_iter`, when given, is moved to the saved position."""
        items = dict(
            model=ocp.args.StandardRestore(abstract["model"]),
            opt=ocp.args.StandardRestore(abstract["opt"]),
            rng=ocp.args.StandardRestore({"key": abstract["rng"]}),
            meta=ocp.args.JsonRestore(),
        )
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        got = self.manager.restore(step, args=ocp.args.Composite(**items))
        state = {"model": got["model"], "opt": got["opt"], "rng": got["rng"]["key"]}
        _refuse_nonfinite(state, self.directory, step, list(self.manager.all_steps()))
        return state, got["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def restore_model(directory: str | Path, step: int, abstract_model):
    """Only the `model` item of checkpoint `step` under `directory` (another stage's); refused
    (`NonFiniteCheckpoint`) when it holds NaN or inf."""
    path = checkpoint_dir(directory)
    with ocp.CheckpointManager(path) as manager:
        got = manager.restore(
            step, args=ocp.args.Composite(model=ocp.args.StandardRestore(abstract_model))
        )
        steps = list(manager.all_steps())
    _refuse_nonfinite(got["model"], path, step, steps)
    return got["model"]
