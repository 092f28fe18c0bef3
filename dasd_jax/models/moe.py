"""Mixture-of-experts: routing and expert compute, as pure functions.

Consumes token states `x_MD` (a batch's tokens flattened, M = B * T), router logits and the
experts' weights (`Experts`); produces the routed MLP output `y_MD`. Used by the gpt-oss and
Qwen3-MoE ports; the models decide the activation and the routing rule.

Shape letters (on top of qwen3.py's): M tokens (B * T), E experts (E_l: on this device),
k experts per token (top-k), F expert MLP width, J an input projection's flattened output
columns, R = M * k routed (token, expert) pairs.

Routing, as transformers computes it:
- gpt-oss (`topk_then_softmax`): top-k of the (biased) logits, softmax over those k only;
- Qwen3-MoE (`softmax_then_topk`): softmax over all E, top-k, then with `norm_topk_prob`
  renormalised to sum 1.
Router logits are fp32 (fp32 accumulation of the compute-dtype matmul): the expert choice is
discontinuous, so it gets the most accurate logits we can give it.

Expert compute, two implementations with one contract:
- `experts_dense`: the reference. Every expert runs on every token ([M, E, F] activations)
  and the results are weighted by the sparse routing weights (zero for unchosen experts).
  Simple and exact; memory and FLOPs grow with E, so it is for CPU tests and small E.
- `experts_grouped`: sort the M * k (token, expert) pairs by expert, gather the rows, run
  `jax.lax.ragged_dot` with per-expert group sizes (one grouped matmul per projection), scale by
  the routing weights, unsort and sum the k contributions per token.
There is **no capacity factor**: every (token, expert) pair is computed, none is dropped, so
the result equals the dense reference whatever the routing imbalance. The price is a static
worst-case buffer of M * k rows (per device under expert parallelism: the whole group's
M * k rows, since any number of them may go to this device's experts); nothing is padded per
expert and no shape depends on the routing.

Expert parallelism (`experts_grouped` with a mesh): the `experts` logical axis maps to the
`expert` mesh axis (sharding.LOGICAL_RULES). Inside a `shard_map` over the whole mesh each
device all-gathers the tokens of its `expert` group, computes the pairs routed to its E_l local
experts (the others fall outside the ragged groups and give zeros), sums the partial results
over `tensor` (the expert MLP width F is split there) and reduce-scatters them back to the
token shards over `expert`. FSDP-split weight dims (`embed` -> `fsdp`) are all-gathered first.
Every collective is a sum of disjoint contributions, so meshes with and without the `expert`
axis give the same numbers (up to summation order). GSPMD alone would have to all-gather the
experts for `ragged_dot`, which is correct but defeats expert parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.sharding import constrain, logical_to_spec

MOE_IMPLEMENTATIONS = ("grouped", "dense")


EXPERT_WEIGHTS = ("dense", "mxfp4")


@dataclass(frozen=True)
class MoeOptions(ModelOptions):
    """ModelOptions plus how MoE experts run.

    moe: expert compute, "grouped" (sort + ragged_dot) or "dense" (the reference).
    expert_weights: "dense" holds expert weights in `param_dtype`; "mxfp4" (gpt-oss, scoring
      only) keeps them as the checkpoint's MXFP4 blocks + scales on device (4.25 bits per
      weight: gpt-oss-120b's experts take ~61 GB instead of ~230 GB in bf16) and decodes one
      layer at a time inside the layer scan.
    """

    moe: str = "grouped"
    expert_weights: str = "dense"

    def __post_init__(self):
        if self.moe not in MOE_IMPLEMENTATIONS:
            raise ValueError(f"moe implementation {self.moe!r}: use one of {MOE_IMPLEMENTATIONS}")
        if self.expert_weights not in EXPERT_WEIGHTS:
            raise ValueError(f"expert_weights {self.expert_weights!r}: use one of {EXPERT_WEIGHTS}")


def moe_implementation(opts: ModelOptions) -> str:
    """The expert compute an options object asks for (plain ModelOptions: "grouped")."""
    return opts.moe if isinstance(opts, MoeOptions) else "grouped"


def expert_weights_format(opts: ModelOptions) -> str:
    """How expert weights are held (plain ModelOptions: "dense")."""
    return opts.expert_weights if isinstance(opts, MoeOptions) else "dense"


# --------------------------------------------------------------------------- routing


def router_logits(x_MD: jax.Array, w_DE: jax.Array, b_E: jax.Array | None = None) -> jax.Array:
    logits_ME = jnp.einsum("md,de->me", x_MD, w_DE, preferred_element_type=jnp.float32)
    if b_E is not None:
        logits_ME = logits_ME + b_E.astype(jnp.float32)
    return logits_ME


def topk_then_softmax(logits_ME: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """gpt-oss: (weights_Mk fp32, experts_Mk int32) = softmax(top-k logits), top-k indices."""
    top_Mk, experts_Mk = jax.lax.top_k(logits_ME.astype(jnp.float32), k)
    return jax.nn.softmax(top_Mk, axis=-1), experts_Mk.astype(jnp.int32)


def softmax_then_topk(
    logits_ME: jax.Array, k: int, norm_topk_prob: bool
) -> tuple[jax.Array, jax.Array]:
    """Qwen3-MoE: top-k of softmax over all experts, optionally renormalised to sum 1."""
    probs_ME = jax.nn.softmax(logits_ME.astype(jnp.float32), axis=-1)
    weights_Mk, experts_Mk = jax.lax.top_k(probs_ME, k)
    if norm_topk_prob:
        weights_Mk = weights_Mk / jnp.sum(weights_Mk, axis=-1, keepdims=True)
    return weights_Mk, experts_Mk.astype(jnp.int32)


# --------------------------------------------------------------------------- experts


@jax.tree_util.register_dataclass
@dataclass
class Experts:
    """One layer's experts, in compute dtype.

    w_in: input projections, each [E, D, *J] (trailing dims are flattened for the matmul, so
      gpt-oss's fused [E, D, F, 2] gate/up and Qwen3-MoE's separate [E, D, F] gate and up both
      fit); b_in: matching biases [E, *J] or None. w_out: [E, F, D]; b_out: [E, D] or None.
    The activation maps the input projections' outputs (each [..., J_i]) to [..., F].
    """

    w_in: tuple[jax.Array, ...]
    b_in: tuple[jax.Array | None, ...]
    w_out: jax.Array
    b_out: jax.Array | None = None


Activation = Callable[[Sequence[jax.Array]], jax.Array]


def experts_dense(
    x_MD: jax.Array,
    weights_Mk: jax.Array,
    experts_Mk: jax.Array,
    ex: Experts,
    act: Activation,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Reference: all experts on all tokens, combined with the sparse routing weights."""
    M, D = x_MD.shape
    E = ex.w_out.shape[0]
    combine_ME = jnp.zeros((M, E), jnp.float32)
    combine_ME = combine_ME.at[jnp.arange(M)[:, None], experts_Mk].add(weights_Mk)
    hs = []
    for w, b in zip(ex.w_in, ex.b_in, strict=True):
        h_MEJ = jnp.einsum("md,edj->mej", x_MD, w.reshape(E, D, -1))
        if b is not None:
            h_MEJ = h_MEJ + b.reshape(E, -1)
        hs.append(h_MEJ)
    a_MEF = act(hs)
    a_MEF = constrain(a_MEF, ("act_batch", None, "act_mlp"), mesh)
    y_MED = jnp.einsum("mef,efd->med", a_MEF, ex.w_out)
    if ex.b_out is not None:
        y_MED = y_MED + ex.b_out
    y_MD = jnp.einsum("med,me->md", y_MED, combine_ME, preferred_element_type=jnp.float32)
    return y_MD.astype(x_MD.dtype)


def _grouped_local(
    x_MD: jax.Array,
    weights_Mk: jax.Array,
    experts_Mk: jax.Array,
    ex: Experts,
    act: Activation,
    expert_offset: jax.Array | int = 0,
) -> jax.Array:
    """Grouped compute of the pairs routed to experts [offset, offset + E_l), fp32 [M, D].

    Pairs routed elsewhere sort after every group; ragged_dot leaves rows past the groups at
    zero and their routing weight is zeroed too, so they contribute nothing.
    """
    M, k = experts_Mk.shape
    D = x_MD.shape[-1]
    E_l = ex.w_out.shape[0]
    local_Mk = experts_Mk - expert_offset
    is_local_Mk = (local_Mk >= 0) & (local_Mk < E_l)
    key_R = jnp.where(is_local_Mk, local_Mk, E_l).reshape(-1)
    order_R = jnp.argsort(key_R, stable=True)
    expert_R = key_R[order_R]
    group_sizes_E = jnp.bincount(key_R, length=E_l + 1)[:E_l].astype(jnp.int32)
    x_RD = x_MD[order_R // k]
    safe_e_R = jnp.minimum(expert_R, E_l - 1)  # bias lookups for the non-local tail
    hs = []
    for w, b in zip(ex.w_in, ex.b_in, strict=True):
        h_RJ = jax.lax.ragged_dot(x_RD, w.reshape(E_l, D, -1), group_sizes_E)
        if b is not None:
            h_RJ = h_RJ + b.reshape(E_l, -1)[safe_e_R]
        hs.append(h_RJ)
    a_RF = act(hs)
    y_RD = jax.lax.ragged_dot(a_RF, ex.w_out, group_sizes_E, preferred_element_type=jnp.float32)
    w_R = jnp.where(expert_R < E_l, weights_Mk.reshape(-1)[order_R], 0.0)
    y_RD = y_RD * w_R[:, None]
    inverse_R = jnp.zeros_like(order_R).at[order_R].set(jnp.arange(order_R.shape[0]))
    return jnp.sum(y_RD[inverse_R].reshape(M, k, D), axis=1)


def _down_bias(weights_Mk, experts_Mk, b_ED) -> jax.Array:
    """sum_k w_k * b_out[e_k], fp32 [M, D]: the output bias, added once after the reductions."""
    return jnp.einsum(
        "mk,mkd->md", weights_Mk, b_ED[experts_Mk], preferred_element_type=jnp.float32
    )


def experts_grouped(
    x_MD: jax.Array,
    weights_Mk: jax.Array,
    experts_Mk: jax.Array,
    ex: Experts,
    act: Activation,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Sort-by-expert + ragged_dot; with a mesh, expert-parallel (see the module docstring)."""
    b_out = ex.b_out
    ex_nobias = Experts(ex.w_in, ex.b_in, ex.w_out, None)
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        y_MD = _grouped_local(x_MD, weights_Mk, experts_Mk, ex_nobias, act)
    else:
        y_MD = _grouped_sharded(x_MD, weights_Mk, experts_Mk, ex_nobias, act, mesh)
    if b_out is not None:
        y_MD = y_MD + _down_bias(weights_Mk, experts_Mk, b_out)
    return y_MD.astype(x_MD.dtype)


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _in_axes(ndim: int) -> tuple[str | None, ...]:
    return ("experts", "embed", "mlp") + (None,) * (ndim - 3)


def _bias_axes(ndim: int) -> tuple[str | None, ...]:
    return ("experts", "mlp") + (None,) * (ndim - 2)


def _grouped_sharded(x_MD, weights_Mk, experts_Mk, ex: Experts, act, mesh: Mesh) -> jax.Array:
    M, D = x_MD.shape
    E = ex.w_out.shape[0]
    tok_spec = logical_to_spec(("act_batch", None), (M, D), mesh)
    w_in_specs = tuple(logical_to_spec(_in_axes(w.ndim), w.shape, mesh) for w in ex.w_in)
    b_in_specs = tuple(
        None if b is None else logical_to_spec(_bias_axes(b.ndim), b.shape, mesh) for b in ex.b_in
    )
    w_out_spec = logical_to_spec(("experts", "mlp", "embed"), ex.w_out.shape, mesh)
    # The F split must be the same in every projection, or the activation would pair
    # different columns; otherwise keep F whole.
    f_axes = {_axes(s[2]) for s in w_in_specs} | {_axes(w_out_spec[1])}
    f_axes |= {_axes(s[1]) for s in b_in_specs if s is not None}
    if len(f_axes) > 1:
        w_in_specs = tuple(PartitionSpec(s[0], s[1], None, *s[3:]) for s in w_in_specs)
        b_in_specs = tuple(
            None if s is None else PartitionSpec(s[0], None, *s[2:]) for s in b_in_specs
        )
        w_out_spec = PartitionSpec(w_out_spec[0], None, w_out_spec[2])
    f_axes = _axes(w_out_spec[1])
    e_axes = _axes(w_out_spec[0])
    if any(_axes(s[0]) != e_axes for s in w_in_specs):
        raise ValueError("expert weights disagree on the expert split")
    tok_axes = _axes(tok_spec[0])
    gather_tokens = bool(e_axes) and set(e_axes) <= set(tok_axes)
    e_local = E // math.prod(mesh.shape[a] for a in e_axes) if e_axes else E

    def local(x_MD, weights_Mk, experts_Mk, w_in, b_in, w_out):
        # FSDP: the embed dim of the weights is split; gather it for the matmuls.
        w_in = tuple(
            jax.lax.all_gather(w, _axes(s[1]), axis=1, tiled=True) if _axes(s[1]) else w
            for w, s in zip(w_in, w_in_specs, strict=True)
        )
        if _axes(w_out_spec[2]):
            w_out = jax.lax.all_gather(w_out, _axes(w_out_spec[2]), axis=2, tiled=True)
        if gather_tokens:
            x_MD, weights_Mk, experts_Mk = (
                jax.lax.all_gather(a, e_axes, axis=0, tiled=True)
                for a in (x_MD, weights_Mk, experts_Mk)
            )
        offset = jax.lax.axis_index(e_axes) * e_local if e_axes else 0
        y_MD = _grouped_local(
            x_MD, weights_Mk, experts_Mk, Experts(w_in, b_in, w_out, None), act, offset
        )
        if f_axes:
            y_MD = jax.lax.psum(y_MD, f_axes)
        if gather_tokens:
            y_MD = jax.lax.psum_scatter(y_MD, e_axes, scatter_dimension=0, tiled=True)
        elif e_axes:
            y_MD = jax.lax.psum(y_MD, e_axes)
        return y_MD

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, w_in_specs, b_in_specs, w_out_spec),
        out_specs=tok_spec,
        check_vma=False,
    )(x_MD, weights_Mk, experts_Mk, ex.w_in, ex.b_in, ex.w_out)


def experts_apply(
    implementation: str,
    x_MD: jax.Array,
    weights_Mk: jax.Array,
    experts_Mk: jax.Array,
    ex: Experts,
    act: Activation,
    mesh: Mesh | None = None,
) -> jax.Array:
    if implementation == "dense":
        return experts_dense(x_MD, weights_Mk, experts_Mk, ex, act, mesh)
    if implementation == "grouped":
        return experts_grouped(x_MD, weights_Mk, experts_Mk, ex, act, mesh)
    raise ValueError(f"moe implementation {implementation!r}: use one of {MOE_IMPLEMENTATIONS}")


# --------------------------------------------------------------------------- activations


def silu_glu(hs: Sequence[jax.Array]) -> jax.Array:
    """Qwen3-MoE: silu(gate) * up, from separate gate and up projections."""
    gate, up = hs
    return jax.nn.silu(gate) * up


def gpt_oss_glu(alpha: float, limit: float) -> Activation:
    """gpt-oss's clamped SwiGLU on its interleaved gate/up columns (gate = [..., ::2]).

    gate is clamped above at `limit`, up to [-limit, limit]; out = (up + 1) * gate *
    sigmoid(alpha * gate), as transformers' GptOssExperts._apply_gate.
    """

    def act(hs: Sequence[jax.Array]) -> jax.Array:
        (h,) = hs
        h = h.reshape(*h.shape[:-1], -1, 2)
        gate, up = h[..., 0], h[..., 1]
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))

    return act
