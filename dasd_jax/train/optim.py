"""The optimizer of the SFT stages: AdamW with a decay mask, clipping, warmup + cosine.

Consumes a `TrainConfig` (shared optimizer settings) and a `StageConfig` (LR, floor, warmup);
produces an optax `GradientTransformation` and its learning-rate schedule. Recipe (PAPER.md,
the released LLaMA-Factory configs): global-norm clip 1.0, then AdamW(b1 0.9, b2 0.95,
eps 1e-8, weight decay 0.1) with no decay on norm weights and biases (as HF Trainer does),
LR 0 -> peak linearly over the first 10% of steps, then cosine down to the floor (HF's
`cosine_with_min_lr`). Every stage builds a fresh one: stage 2 does not inherit stage 1's
moments or schedule position.

`opt_state_dtype=bfloat16` keeps both Adam moments in bf16 (the update itself is computed in
fp32): half the optimizer memory, at some cost in precision of the second moment.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dasd_jax.train.config import StageConfig, TrainConfig

NO_DECAY = ("norm", "bias")  # parameter-name fragments that get no weight decay


def lr_schedule(scfg: StageConfig, total_steps: int) -> optax.Schedule:
    warmup = int(round(scfg.warmup_frac * total_steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=scfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=scfg.lr_floor,
    )


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params):
    """True where weight decay applies: every parameter except norms and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(f in _path_name(path) for f in NO_DECAY), params
    )


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
    )


def state_in_dtype(inner: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`inner` whose state is stored in `dtype` and computed with in fp32."""

    def init(params):
        return _cast_floats(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, _cast_floats(state, jnp.float32), params)
        return updates, _cast_floats(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(tcfg: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    tx = optax.chain(
        optax.clip_by_global_norm(tcfg.clip_norm),
        optax.adamw(
            schedule,
            b1=tcfg.b1,
            b2=tcfg.b2,
            eps=tcfg.eps,
            weight_decay=tcfg.weight_decay,
            mask=decay_mask,
        ),
    )
    if tcfg.opt_state_dtype != "float32":
        tx = state_in_dtype(tx, jnp.dtype(tcfg.opt_state_dtype))
    return tx
