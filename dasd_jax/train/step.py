"""The pure, jitted math of SFT: the loss, one optimizer step, the eval sums.

Consumes the train state (a pytree: `model` and `opt` NNX states and an `rng` key) and one
global batch of int32 arrays [A, b, T] (A micro-batches of b packed rows: `tokens`,
`loss_mask`, `positions`, `segment_ids`); produces the new state and scalar metrics (`loss`,
`loss_tokens`, `grad_norm`, `lr`, `all_finite`). No I/O.

`all_finite` (one boolean, reduced on device) is True when the step's loss, its global
gradient norm (before clipping) and its learning rate are finite *and* every floating-point
array of the state after the update (parameters, Adam moments) is free of NaN and inf. The
loss alone is not enough: it is computed before the update, so a finite loss can come with
an update that turned the weights into NaN or inf (a learning rate far too large, an
overflowing moment). The stage saves a checkpoint only from a step whose flag was True.

Loss: the mean cross-entropy over *all* loss tokens of the global batch,
sum(-log p) / count, not a mean of per-row or per-micro-batch means. Each micro-batch's
gradient is taken of its summed loss divided by the global count, and the gradients are
summed over the micro-batches (in fp32), so accumulation and packing give the same number as
one unpacked batch, up to summation order. Position t predicts token t+1; a prediction counts
when t+1 is a loss token of the same document (`logprobs.next_token_targets`). Log-probs come
from the chunked kernel (`logprobs.token_logprobs`), so [B, T, V] fp32 logits never exist,
in the forward nor (rematerialised per chunk) in the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dasd_jax.logprobs import next_token_targets, token_logprobs


def loss_weights(tokens_BT, loss_mask_BT, positions_BT, segment_ids_BT):
    """(targets_BT, weights_BT): position t predicts targets[t]; weight 1 where it counts."""
    targets_BT, valid_BT = next_token_targets(tokens_BT, positions_BT, segment_ids_BT)
    target_is_loss_BT = jnp.pad(loss_mask_BT[:, 1:], ((0, 0), (0, 1))) > 0
    return targets_BT, (valid_BT & target_is_loss_BT).astype(jnp.float32)


def loss_sums(model, batch: dict, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """(sum of -log p over loss tokens, number of loss tokens) of one [b, T] micro-batch."""
    tokens_BT, positions_BT, segments_BT = (
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
    )
    hidden_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segments_BT)
    targets_BT, w_BT = loss_weights(tokens_BT, batch["loss_mask"], positions_BT, segments_BT)
    logp_BT, _ = token_logprobs(hidden_BTD, model.unembed_DV(), targets_BT, chunk_size=chunk_size)
    return -jnp.sum(logp_BT * w_BT), jnp.sum(w_BT)


def _count_loss_tokens(batch_A: dict) -> jax.Array:
    def one(mb):
        return jnp.sum(
            loss_weights(mb["tokens"], mb["loss_mask"], mb["positions"], mb["segment_ids"])[1]
        )

    return jnp.sum(jax.vmap(one)(batch_A))


def grads_and_loss(model_def, params, batch_A: dict, chunk_size: int, param_shardings=None):
    """(mean loss over the global batch, its gradient wrt params in fp32, loss-token count)."""
    n_tokens = _count_loss_tokens(batch_A)
    denom = jnp.maximum(n_tokens, 1.0)

    def micro(mb):
        def f(p):
            nll, _ = loss_sums(nnx.merge(model_def, p), mb, chunk_size)
            return nll / denom

        loss, g = jax.value_and_grad(f)(params)
        g = jax.tree.map(lambda x: x.astype(jnp.float32), g)
        if param_shardings is not None:  # keep the accumulator sharded like the params
            g = jax.lax.with_sharding_constraint(g, param_shardings)
        return loss, g

    A = batch_A["tokens"].shape[0]
    if A == 1:
        loss, grads = micro(jax.tree.map(lambda x: x[0], batch_A))
    else:

        def body(carry, mb):
            loss, g = micro(mb)
            return (carry[0] + loss, jax.tree.map(jnp.add, carry[1], g)), None

        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
        if param_shardings is not None:
            zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
        (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), batch_A)
    return loss, grads, n_tokens


def all_finite(*trees) -> jax.Array:
    """True when no floating-point leaf of `trees` holds a NaN or an inf (a scalar, on device:
    one read of each array, cheap next to a step). Integer leaves (step counts, packed MXFP4
    weights) are always finite."""
    ok = [
        jnp.all(jnp.isfinite(x))
        for t in trees
        for x in jax.tree.leaves(t)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(ok)) if ok else jnp.asarray(True)


def make_train_step(model_def, opt_def, schedule, chunk_size: int, param_shardings=None):
    """`train_step(state, batch_A) -> (state, metrics)`, pure; jit it with donation."""

    def train_step(state, batch_A):
        model = nnx.merge(model_def, state["model"])
        opt = nnx.merge(opt_def, state["opt"])
        loss, grads, n_tokens = grads_and_loss(
            model_def, state["model"], batch_A, chunk_size, param_shardings
        )
        lr = schedule(opt.step[...])
        grad_norm = optax.tree.norm(grads)
        opt.update(model, grads)
        new = {
            "model": nnx.state(model),
            "opt": nnx.state(opt),
            "rng": jax.random.split(state["rng"])[0],
        }
        finite = (
            jnp.isfinite(loss)
            & jnp.isfinite(grad_norm)
            & jnp.isfinite(lr)
            & all_finite(new["model"], new["opt"])
        )
        metrics = {"loss": loss, "loss_tokens": n_tokens, "grad_norm": grad_norm, "lr": lr}
        return new, {**metrics, "all_finite": finite}

    return train_step


def make_eval_step(model_def, chunk_size: int):
    """`eval_step(model_state, batch) -> (nll sum, loss-token count)` of one [b, T] batch."""

    def eval_step(model_state, batch):
        return loss_sums(nnx.merge(model_def, model_state), batch, chunk_size)

    return eval_step
