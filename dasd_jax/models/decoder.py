"""The decoder skeleton every model port shares (Qwen3, Qwen3-MoE, gpt-oss): inputs and
KV-cache bookkeeping, the projections around attention, the layer scan.

Consumes token ids with optional positions, segment ids and a `KVCache`; produces the per-call
attention inputs (`Inputs`), q/k/v and output projections, cache writes and the attention call,
and runs a per-layer function over stacked weights with `jax.lax.scan` (optionally
rematerialised). Every model behaves the same way with a cache: a row holds one sequence, the
token at position p lives in slot p, tokens with segment id 0 are not written, and a query
attends to the filled slots at positions <= its own. What differs between the models (q/k
norms, the RoPE variant, sliding windows and sinks, the MLP or experts) stays in their files.

Shape letters as in qwen3.py (B batch, T query length, S cache slots, K kv heads, H head dim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dasd_jax.models.attention import attention
from dasd_jax.sharding import constrain


@jax.tree_util.register_dataclass
@dataclass
class KVCache:
    """Per-layer keys/values for S slots per row; `lengths_B` slots are filled.

    A row holds one sequence: the token at position p lives in slot p.
    """

    k_LBSKH: jax.Array
    v_LBSKH: jax.Array
    lengths_B: jax.Array

    @property
    def max_length(self) -> int:
        return self.k_LBSKH.shape[2]


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclass(frozen=True)
class Inputs:
    """What attention needs for one call (arrays traced inside the model's jit)."""

    positions_BT: jax.Array
    q_segment_ids_BT: jax.Array
    kv_positions_BS: jax.Array
    kv_segment_ids_BS: jax.Array
    slots_BT: jax.Array | None  # cache slot of each token (S = not written); None: no cache
    new_lengths_B: jax.Array | None


def prepare_inputs(
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None,
    segment_ids_BT: jax.Array | None,
    cache: KVCache | None,
) -> Inputs:
    """Defaults (positions 0..T-1 after the cache's length, one segment) and cache masks."""
    B, T = tokens_BT.shape
    if positions_BT is None:
        start = 0 if cache is None else cache.lengths_B[:, None]
        positions_BT = start + jnp.arange(T, dtype=jnp.int32)[None, :]
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    positions_BT = jnp.broadcast_to(positions_BT.astype(jnp.int32), (B, T))
    segment_ids_BT = segment_ids_BT.astype(jnp.int32)
    if cache is None:
        return Inputs(positions_BT, segment_ids_BT, positions_BT, segment_ids_BT, None, None)
    S = cache.max_length
    valid_BT = segment_ids_BT != 0
    # slot S is out of range: the scatter with mode="drop" skips padding tokens
    slots_BT = jnp.where(valid_BT, positions_BT, S)
    written_B = jnp.max(jnp.where(valid_BT, positions_BT + 1, 0), axis=1)
    new_lengths_B = jnp.maximum(cache.lengths_B, written_B)
    kv_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32)[None], (B, S))
    kv_seg_BS = (kv_pos_BS < new_lengths_B[:, None]).astype(jnp.int32)
    return Inputs(
        positions_BT, valid_BT.astype(jnp.int32), kv_pos_BS, kv_seg_BS, slots_BT, new_lengths_B
    )


def update_kv(kv, k_BTKH, v_BTKH, inputs: Inputs, dtype):
    """(keys, values to attend to, new per-layer cache); without a cache, this call's k/v."""
    if kv is None:
        return k_BTKH, v_BTKH, None
    b_idx = jnp.arange(k_BTKH.shape[0])[:, None]
    slots = inputs.slots_BT
    k_all = kv[0].at[b_idx, slots].set(k_BTKH.astype(kv[0].dtype), mode="drop")
    v_all = kv[1].at[b_idx, slots].set(v_BTKH.astype(kv[1].dtype), mode="drop")
    return k_all.astype(dtype), v_all.astype(dtype), (k_all, v_all)


def project_qkv(h_BTD: jax.Array, w: dict, bias: bool, mesh) -> tuple[jax.Array, ...]:
    """q [B, T, N, H] (sharded by heads), k and v [B, T, K, H] from the normed layer input,
    plus the q/k/v biases when the model has them."""
    q_BTNH = jnp.einsum("btd,dnh->btnh", h_BTD, w["q_proj"])
    k_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, w["k_proj"])
    v_BTKH = jnp.einsum("btd,dkh->btkh", h_BTD, w["v_proj"])
    if bias:
        q_BTNH = q_BTNH + w["q_bias"]
        k_BTKH = k_BTKH + w["k_bias"]
        v_BTKH = v_BTKH + w["v_bias"]
    q_BTNH = constrain(q_BTNH, ("act_batch", "act_seq", "act_heads", None), mesh)
    return q_BTNH, k_BTKH, v_BTKH


def attend(
    q_BTNH, k_BSKH, v_BSKH, inputs: Inputs, *, scale, implementation, cached, mesh, **extra
) -> jax.Array:
    """`attention.attention` with this call's positions and segment masks. A cached call
    (decode, prefill into a cache) always uses the XLA path; `extra`: sliding_window, sinks_N."""
    return attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        q_positions_BT=inputs.positions_BT,
        kv_positions_BS=inputs.kv_positions_BS,
        q_segment_ids_BT=inputs.q_segment_ids_BT,
        kv_segment_ids_BS=inputs.kv_segment_ids_BS,
        scale=scale,
        implementation="xla" if cached else implementation,
        mesh=mesh,
        **extra,
    )


def project_out(a_BTNH: jax.Array, w: dict, bias: bool) -> jax.Array:
    """The attention output projection [B, T, D] (plus its bias)."""
    out_BTD = jnp.einsum("btnh,nhd->btd", a_BTNH, w["o_proj"])
    return out_BTD + w["o_bias"] if bias else out_BTD


def stacked_weights(layers: nnx.Module) -> dict[str, jax.Array]:
    """Every nnx.Param of a stacked-layers module, by name ([L, ...] arrays)."""
    return {
        name: getattr(layers, name)[...]
        for name in vars(layers)
        if isinstance(getattr(layers, name), nnx.Param)
    }


def scan_layers(
    layer: Callable[[jax.Array, Any], tuple[jax.Array, Any]],
    x_BTD: jax.Array,
    xs: Any,
    remat: str,
) -> tuple[jax.Array, Any]:
    """`jax.lax.scan` of `layer(x, xs_l) -> (x, ys_l)` over the leading L dim of `xs`."""
    if remat != "none":
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r}: use one of none, {', '.join(REMAT_POLICIES)}")
        layer = jax.checkpoint(layer, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(layer, x_BTD, xs)


def finish_cache(cache: KVCache | None, new_kv, inputs: Inputs) -> KVCache | None:
    if cache is None:
        return None
    return KVCache(new_kv[0], new_kv[1], inputs.new_lengths_B)
