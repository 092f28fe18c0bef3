"""Attention over packed rows: one contract, three backends.

Consumes queries `q_BTNH`, keys and values `k_BSKH`, `v_BSKH`, per-token positions and
segment ids (0 = padding), and produces `out_BTNH` in q's dtype.

Shape letters: B batch, T query length, S key/value length, N query heads, K kv heads,
G = N // K query heads per kv head, H head dim.

The contract every backend meets: query t attends key s iff
`q_segment_ids[t] == kv_segment_ids[s] != 0`, `kv_positions[s] <= q_positions[t]` and, with a
sliding window W, `q_positions[t] - kv_positions[s] < W`. Query head n reads kv head n // G
(Hugging Face's repeat_kv). Scores and softmax are float32. A query with no allowed key
(padding) gets zeros, never NaN. gpt-oss sinks add one logit per query head to the softmax
denominator only (as transformers' eager gpt-oss attention does).

Backends:
  "xla"    the reference: einsums and an explicit [B, T, S] mask. Any T, S (training,
           prefill, single-token decode against a cache). The only one with sinks.
  "splash" TPU Pallas splash kernel (Pallas interpret mode off TPU, so CI runs it).
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")` on GPU, bf16/fp16 only.
  "auto"   tpu -> splash, gpu -> cudnn, else xla.
splash and cudnn are self-attention kernels: they need T == S over the same tokens and
derive causality and the window from token *indices*, which equals the position rule when
positions rise by 1 inside each segment (what packing produces). `resolve_implementation`
sends everything else to "xla" and logs why, once per reason.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from dasd_jax import sharding

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("auto", "xla", "splash", "cudnn")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_SPLASH_BLOCK = 128  # splash block sizes must be multiples of the TPU lane width
_logged: set[tuple] = set()


def _log_once(msg: str, *args) -> None:
    key = (msg, *args)
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def resolve_implementation(
    implementation: str,
    *,
    T: int,
    S: int,
    has_sinks: bool,
    has_window: bool,
    dtype: jnp.dtype | None = None,
    platform: str | None = None,
) -> str:
    """The backend that will run: "xla", "splash" or "cudnn".

    `platform` defaults to jax's default backend. Every substitution of the requested
    kernel is logged once at INFO with its reason.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; valid: {IMPLEMENTATIONS}"
        )
    platform = platform or jax.default_backend()
    impl = implementation
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn", "rocm": "cudnn"}.get(
            platform, "xla"
        )
    if impl == "xla":
        return impl

    reason = None
    if has_sinks:
        reason = "attention sinks are implemented only in the xla reference"
    elif T != S:
        reason = f"T={T} != S={S} (decode or cross attention) needs the xla reference"
    elif impl == "cudnn" and platform not in ("gpu", "cuda", "rocm"):
        reason = f"cudnn needs a GPU, platform is {platform}"
    elif impl == "cudnn" and dtype is not None and jnp.dtype(dtype) not in _CUDNN_DTYPES:
        reason = f"cudnn takes only bf16/fp16, got {jnp.dtype(dtype).name}"
    if reason is not None:
        _log_once("attention: %s requested, using xla: %s", implementation, reason)
        return "xla"
    if impl == "splash" and platform != "tpu":
        _log_once("attention: splash on %s runs in Pallas interpret mode (slow)", platform)
    del has_window  # both kernels take a sliding window; kept for future fallbacks
    return impl


def attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    q_positions_BT: jax.Array,
    kv_positions_BS: jax.Array,
    q_segment_ids_BT: jax.Array,
    kv_segment_ids_BS: jax.Array,
    scale: float,
    implementation: str = "auto",
    mesh: Mesh | None = None,
    sliding_window: int | None = None,
    sinks_N: jax.Array | None = None,
) -> jax.Array:
    """Masked (GQA, packed, optionally windowed) attention; see the module docstring."""
    B, T, N, H = q_BTNH.shape
    _, S, K, _ = k_BSKH.shape
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of kv heads K={K}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    platform = mesh.devices.flat[0].platform if mesh is not None else None
    impl = resolve_implementation(
        implementation,
        T=T,
        S=S,
        has_sinks=sinks_N is not None,
        has_window=sliding_window is not None,
        dtype=q_BTNH.dtype,
        platform=platform,
    )
    if impl == "splash":
        out_BTNH = _splash(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            q_segment_ids_BT,
            kv_segment_ids_BS,
            scale=scale,
            sliding_window=sliding_window,
            mesh=mesh,
            interpret=(platform or jax.default_backend()) != "tpu",
        )
    elif impl == "cudnn":
        out_BTNH = _cudnn(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            q_segment_ids_BT,
            kv_segment_ids_BS,
            scale=scale,
            sliding_window=sliding_window,
        )
    else:
        out_BTNH = _xla(
            q_BTNH,
            k_BSKH,
            v_BSKH,
            q_positions_BT,
            kv_positions_BS,
            q_segment_ids_BT,
            kv_segment_ids_BS,
            scale=scale,
            sliding_window=sliding_window,
            sinks_N=sinks_N,
        )
    return sharding.constrain(out_BTNH, ("act_batch", "act_seq", "act_heads", "act_head_dim"), mesh)


def _xla(
    q_BTNH,
    k_BSKH,
    v_BSKH,
    q_pos_BT,
    kv_pos_BS,
    q_seg_BT,
    kv_seg_BS,
    *,
    scale,
    sliding_window,
    sinks_N,
):
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    G = N // K
    q_BTKGH = q_BTNH.reshape(B, T, K, G, H)
    logits_BKGTS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32
    )
    logits_BKGTS = logits_BKGTS * jnp.float32(scale)

    mask_BTS = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (kv_seg_BS[:, None, :] != 0)
    mask_BTS &= kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
    if sliding_window is not None:
        mask_BTS &= q_pos_BT[:, :, None] - kv_pos_BS[:, None, :] < sliding_window
    logits_BKGTS = jnp.where(mask_BTS[:, None, None], logits_BKGTS, -jnp.inf)

    # -inf for masked keys plus a finite row max keep fully masked rows at exactly 0
    # (and their gradients finite) instead of a uniform average over padding.
    max_BKGT1 = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
    if sinks_N is not None:
        sinks_11KG11 = sinks_N.astype(jnp.float32).reshape(1, K, G, 1, 1)
        max_BKGT1 = jnp.maximum(max_BKGT1, sinks_11KG11)
    max_BKGT1 = jax.lax.stop_gradient(jnp.where(jnp.isfinite(max_BKGT1), max_BKGT1, 0.0))
    probs_BKGTS = jnp.exp(logits_BKGTS - max_BKGT1)
    denom_BKGT1 = jnp.sum(probs_BKGTS, axis=-1, keepdims=True)
    if sinks_N is not None:
        denom_BKGT1 = denom_BKGT1 + jnp.exp(sinks_11KG11 - max_BKGT1)  # mass dropped
    probs_BKGTS = probs_BKGTS / jnp.where(denom_BKGT1 > 0, denom_BKGT1, 1.0)

    out_BTKGH = jnp.einsum(
        "BKGTS,BSKH->BTKGH",
        probs_BKGTS.astype(v_BSKH.dtype),
        v_BSKH,
        preferred_element_type=jnp.float32,
    )
    return out_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)


def _zero_padding_queries(out_BTNH, q_seg_BT):
    return jnp.where(q_seg_BT[:, :, None, None] != 0, out_BTNH, 0).astype(out_BTNH.dtype)


def _cudnn(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, *, scale, sliding_window):
    # cuDNN has no segment ids in jax.nn.dot_product_attention: packing becomes a boolean
    # [B, 1, T, S] mask (jax turns it into an additive bias, so it costs B*T*S bf16 per
    # call); causality and the window come from token indices inside the kernel.
    mask_B1TS = (q_seg_BT[:, None, :, None] == kv_seg_BS[:, None, None, :]) & (
        kv_seg_BS[:, None, None, :] != 0
    )
    out_BTNH = jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=mask_B1TS,
        scale=scale,
        is_causal=True,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation="cudnn",
    )
    return _zero_padding_queries(out_BTNH, q_seg_BT)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, seq_len: int, sliding_window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    shape = (seq_len, seq_len)
    if sliding_window is None:
        head_mask = splash_mask.CausalMask(shape)
    else:
        head_mask = splash_mask.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    mask = splash_mask.MultiHeadMask([head_mask] * num_heads)
    block = next(b for b in (512, 256, _SPLASH_BLOCK) if seq_len % b == 0)
    block_sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Built per shard (local head count), so head_shards = q_seq_shards = 1. The mask
    # tables must be concrete arrays, not tracers of whichever trace built them first,
    # since the kernel is cached across traces.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _splash(q_BTNH, k_BSKH, v_BSKH, q_seg_BT, kv_seg_BS, *, scale, sliding_window, mesh, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    # Pad the sequence to whole blocks; padded tokens are segment 0 and their rows are
    # sliced off (real tokens never attend segment 0 since their ids differ).
    T_pad = -(-T // _SPLASH_BLOCK) * _SPLASH_BLOCK
    if T_pad != T:
        pad = ((0, 0), (0, T_pad - T), (0, 0), (0, 0))
        q_BTNH, k_BSKH, v_BSKH = (jnp.pad(x, pad) for x in (q_BTNH, k_BSKH, v_BSKH))
        q_seg_BT, kv_seg_BS = (jnp.pad(x, ((0, 0), (0, T_pad - T))) for x in (q_seg_BT, kv_seg_BS))
    # The kernel does not scale q.
    q_BNTH = (q_BTNH * jnp.asarray(scale, q_BTNH.dtype)).transpose(0, 2, 1, 3)
    k_BKSH = k_BSKH.transpose(0, 2, 1, 3)
    v_BKSH = v_BSKH.transpose(0, 2, 1, 3)

    def local(q_BNTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS):
        kernel = _splash_kernel(q_BNTH.shape[1], T_pad, sliding_window, interpret)
        segment_ids = SegmentIds(q=q_seg_BT, kv=kv_seg_BS)
        return jax.vmap(kernel)(q_BNTH, k_BKSH, v_BKSH, segment_ids)

    if mesh is None:
        out_BNTH = local(q_BNTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS)
    else:
        batch, seq, heads, head_dim = sharding.logical_to_spec(
            ("act_batch", "act_seq", "act_heads", "act_head_dim"), (B, T_pad, N, H), mesh
        )
        if seq is not None:
            _log_once("attention: splash needs whole sequences per device; act_seq unsplit")
        # q heads are split into contiguous chunks; each chunk must hold whole kv groups,
        # so repeat kv heads r times (r | G keeps n -> n // G) until the split divides K.
        head_shards = math.prod(mesh.shape[a] for a in _axes(heads))
        r = head_shards // math.gcd(K, head_shards)
        if r > 1:
            _log_once("attention: kv heads K=%d repeated %dx to split over %d", K, r, head_shards)
            k_BKSH, v_BKSH = (jnp.repeat(x, r, axis=1) for x in (k_BKSH, v_BKSH))
        qkv_spec = PartitionSpec(batch, heads, None, head_dim)
        seg_spec = PartitionSpec(batch, None)
        out_BNTH = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(qkv_spec, qkv_spec, qkv_spec, seg_spec, seg_spec),
            out_specs=qkv_spec,
            check_vma=False,
        )(q_BNTH, k_BKSH, v_BKSH, q_seg_BT, kv_seg_BS)

    out_BTNH = out_BNTH.transpose(0, 2, 1, 3)[:, :T]
    return _zero_padding_queries(out_BTNH, q_seg_BT[:, :T])


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)
