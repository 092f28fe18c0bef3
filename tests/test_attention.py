"""attention(): the xla reference against a per-query numpy loop, splash (Pallas interpret
mode on CPU) and cudnn (GPU only) against the reference, and the backend choice."""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dasd_jax import sharding
from dasd_jax.models import attention as attn_lib
from dasd_jax.models.attention import attention, resolve_implementation


def _loop_reference(q, k, v, q_pos, kv_pos, q_seg, kv_seg, scale, window=None, sinks=None):
    """float64, one query and one head at a time, the mask written out key by key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    out = np.zeros((B, T, N, H))
    for b in range(B):
        for t in range(T):
            allowed = [
                s
                for s in range(S)
                if q_seg[b, t] == kv_seg[b, s]
                and kv_seg[b, s] != 0
                and kv_pos[b, s] <= q_pos[b, t]
                and (window is None or q_pos[b, t] - kv_pos[b, s] < window)
            ]
            if not allowed:
                continue
            for n in range(N):
                kv_head = n // G  # HF repeat_kv
                scores = np.array([q[b, t, n] @ k[b, s, kv_head] for s in allowed]) * scale
                m = scores.max() if sinks is None else max(scores.max(), sinks[n])
                e = np.exp(scores - m)
                denom = e.sum() + (0.0 if sinks is None else np.exp(sinks[n] - m))
                out[b, t, n] = (e / denom) @ v[b, allowed, kv_head]
    return out


def _qkv(B, T, S, N, K, H, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=shape) for shape in ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _packed(B, T, lengths_per_row):
    """Segment ids and positions for rows packed with documents of the given lengths;
    the rest of each row is padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    pos = np.zeros((B, T), np.int32)
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start : start + n] = i + 1
            pos[b, start : start + n] = np.arange(n)
            start += n
        pos[b, start:] = np.arange(T - start)  # padding positions: arbitrary
    return seg, pos


def _kwargs(pos, seg, scale, **extra):
    pos, seg = jnp.asarray(pos), jnp.asarray(seg)
    return dict(
        q_positions_BT=pos,
        kv_positions_BS=pos,
        q_segment_ids_BT=seg,
        kv_segment_ids_BS=seg,
        scale=scale,
        **extra,
    )


@pytest.mark.parametrize("N,K", [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (8, 4)])
def test_xla_matches_loop_reference_gqa_packed_padded(N, K):
    B, T, H = 2, 24, 8
    q, k, v = _qkv(B, T, T, N, K, H, seed=N * 10 + K)
    seg, pos = _packed(B, T, [[10, 9], [17]])  # row 0: 2 docs + 5 pad; row 1: 7 pad
    out = attention(q, k, v, **_kwargs(pos, seg, 0.3), implementation="xla")
    want = _loop_reference(q, k, v, pos, pos, seg, seg, 0.3)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=2e-5)
    # Padding queries are exactly zero.
    assert np.all(np.asarray(out)[seg == 0] == 0)


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_two_docs_in_one_row_equal_each_doc_alone(impl):
    N, K, H, T = 4, 2, 32, 128
    q, k, v = _qkv(1, T, T, N, K, H, seed=1)
    seg, pos = _packed(1, T, [[50, 60]])
    packed = attention(q, k, v, **_kwargs(pos, seg, 0.2), implementation=impl)
    for start, n in ((0, 50), (50, 60)):
        one = slice(start, start + n)
        s1, p1 = _packed(1, n, [[n]])
        alone = attention(
            q[:, one], k[:, one], v[:, one], **_kwargs(p1, s1, 0.2), implementation="xla"
        )
        np.testing.assert_allclose(packed[:, one], alone, atol=2e-5)


def test_padding_rows_are_finite_with_finite_gradients():
    N, K, H, T = 4, 2, 16, 16
    q, k, v = _qkv(2, T, T, N, K, H, seed=2)
    seg = np.zeros((2, T), np.int32)
    seg[0, :5] = 1  # row 1 is all padding
    pos = np.tile(np.arange(T, dtype=np.int32), (2, 1))
    kw = _kwargs(pos, seg, 0.25, implementation="xla")
    out = attention(q, k, v, **kw)
    assert np.all(np.isfinite(out)) and np.all(np.asarray(out)[seg == 0] == 0)
    grads = jax.grad(lambda *x: jnp.sum(attention(*x, **kw) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # A real query whose every key is padding (kv side only) is zero as well.
    out = attention(q, k, v, **{**kw, "kv_segment_ids_BS": jnp.zeros_like(kw["kv_segment_ids_BS"])})
    assert np.all(np.asarray(out) == 0)


@pytest.mark.parametrize("window", [1, 4, 9])
def test_sliding_window_matches_loop_reference(window):
    N, K, H, T = 4, 2, 8, 20
    q, k, v = _qkv(2, T, T, N, K, H, seed=3)
    seg, pos = _packed(2, T, [[12, 6], [20]])
    out = attention(q, k, v, **_kwargs(pos, seg, 0.3, sliding_window=window), implementation="xla")
    want = _loop_reference(q, k, v, pos, pos, seg, seg, 0.3, window=window)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=2e-5)


def test_sinks_match_loop_reference_and_hf_formula():
    N, K, H, T = 4, 2, 8, 12
    q, k, v = _qkv(1, T, T, N, K, H, seed=4)
    seg, pos = _packed(1, T, [[7, 3]])
    sinks = np.array([-1.0, 0.5, 2.0, 4.0], np.float32)
    out = attention(
        q, k, v, **_kwargs(pos, seg, 0.3, sinks_N=jnp.asarray(sinks)), implementation="auto"
    )
    np.testing.assert_allclose(
        np.asarray(out),
        _loop_reference(q, k, v, pos, pos, seg, seg, 0.3, sinks=sinks),
        atol=2e-6,
        rtol=2e-5,
    )
    # transformers' gpt-oss eager attention, vectorised: append the sink column, softmax,
    # drop it. Masked logits are -inf, so padding queries get only the sink: zeros.
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    kn, vn = np.repeat(kn, N // K, axis=2), np.repeat(vn, N // K, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", qn, kn) * 0.3
    mask = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
    mask &= pos[:, None, :] <= pos[:, :, None]
    logits = np.where(mask[:, None], logits, -np.inf)
    combined = np.concatenate(
        [logits, np.broadcast_to(sinks[None, :, None, None], (1, N, T, 1))], -1
    )
    combined = combined - combined.max(-1, keepdims=True)
    probs = np.exp(combined) / np.exp(combined).sum(-1, keepdims=True)
    hf = np.einsum("bnts,bsnh->btnh", probs[..., :-1], vn)
    np.testing.assert_allclose(np.asarray(out), hf, atol=2e-6, rtol=2e-5)
    # The sinks take mass away: without them the output differs.
    plain = attention(q, k, v, **_kwargs(pos, seg, 0.3), implementation="xla")
    assert not np.allclose(out, plain, atol=1e-3)


def test_decode_one_token_against_a_cache_equals_the_full_forward():
    N, K, H, S, length = 8, 2, 16, 32, 21  # cache of 32 slots, 21 filled; rest is padding
    B = 2
    q, k, v = _qkv(B, S, S, N, K, H, seed=5)
    pos = np.tile(np.arange(S, dtype=np.int32), (B, 1))
    seg = (pos < length).astype(np.int32)
    full = attention(q, k, v, **_kwargs(pos, seg, 0.25), implementation="xla")
    for t in (0, 7, length - 1):
        out = attention(
            q[:, t : t + 1],
            k,
            v,
            q_positions_BT=jnp.full((B, 1), t, jnp.int32),
            kv_positions_BS=jnp.asarray(pos),
            q_segment_ids_BT=jnp.ones((B, 1), jnp.int32),
            kv_segment_ids_BS=jnp.asarray(seg),
            scale=0.25,
            implementation="auto",
        )
        assert out.shape == (B, 1, N, H)
        np.testing.assert_allclose(out[:, 0], full[:, t], atol=2e-6)
        want = _loop_reference(
            q[:, t : t + 1], k, v, np.full((B, 1), t), pos, np.ones((B, 1)), seg, 0.25
        )
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-6, rtol=2e-5)


def test_bf16_output_keeps_q_dtype():
    q, k, v = _qkv(1, 16, 16, 4, 2, 8, dtype=jnp.bfloat16)
    seg, pos = _packed(1, 16, [[16]])
    out = attention(q, k, v, **_kwargs(pos, seg, 0.3), implementation="xla")
    want = attention(
        *(x.astype(jnp.float32) for x in (q, k, v)), **_kwargs(pos, seg, 0.3), implementation="xla"
    )
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


# --- splash (Pallas interpret mode on CPU) ------------------------------------------------

_SPLASH_CASES = {
    # name: (B, T, N, K, H, docs per row, window)
    "causal_packed_gqa": (4, 256, 8, 2, 32, [[100, 80], [256], [60, 60, 60], [200]], None),
    "mqa_padded_T": (2, 200, 4, 1, 64, [[120, 70], [33]], None),  # T padded up to 256
    "window": (2, 128, 4, 4, 32, [[70, 58], [128]], 16),
}


def _splash_vs_xla(case, mesh):
    B, T, N, K, H, docs, window = _SPLASH_CASES[case]
    q, k, v = _qkv(B, T, T, N, K, H, seed=6)
    seg, pos = _packed(B, T, docs)
    kw = _kwargs(pos, seg, H**-0.5, sliding_window=window)
    want = attention(q, k, v, **kw, implementation="xla")
    fn = jax.jit(lambda q, k, v: attention(q, k, v, **kw, implementation="splash", mesh=mesh))
    out = fn(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=2e-5)
    return out


@pytest.mark.parametrize("case", sorted(_SPLASH_CASES))
def test_splash_interpret_matches_reference(case):
    _splash_vs_xla(case, mesh=None)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_splash_under_a_mesh_matches_reference(mesh_shape):
    mesh = sharding.make_mesh(mesh_shape)
    out = _splash_vs_xla("causal_packed_gqa", mesh)  # K=2 on tensor=4: kv heads repeated
    spec = out.sharding.spec
    batch, heads = spec[0], spec[2]
    assert heads == "tensor"
    assert set(np.atleast_1d(batch)) == {a for a in ("data", "fsdp") if mesh.shape[a] > 1}


def test_splash_gradients_match_reference():
    B, T, N, K, H = 2, 128, 4, 2, 32
    q, k, v = _qkv(B, T, T, N, K, H, seed=7)
    seg, pos = _packed(B, T, [[64, 40], [128]])
    kw = _kwargs(pos, seg, H**-0.5)

    def grads(impl, mesh=None):
        def loss(q, k, v):
            return jnp.sum(jnp.sin(attention(q, k, v, **kw, implementation=impl, mesh=mesh)))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    want = grads("xla")
    for got in (grads("splash"), grads("splash", sharding.make_mesh((2, 2, 2)))):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


# --- cudnn (GPU only) ---------------------------------------------------------------------


def test_cudnn_matches_reference_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    B, T, N, K, H = 2, 256, 8, 2, 64
    q, k, v = _qkv(B, T, T, N, K, H, seed=8, dtype=jnp.bfloat16)
    seg, pos = _packed(B, T, [[100, 100], [180]])
    for window in (None, 32):
        kw = _kwargs(pos, seg, H**-0.5, sliding_window=window)
        assert (
            resolve_implementation("auto", T=T, S=T, has_sinks=False, has_window=False) == "cudnn"
        )
        out = jax.jit(functools.partial(attention, **kw, implementation="cudnn"))(q, k, v)
        want = attention(*(x.astype(jnp.float32) for x in (q, k, v)), **kw, implementation="xla")
        np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want), atol=2e-2)


def test_cudnn_off_gpu_falls_back_to_the_reference():
    if jax.default_backend() == "gpu":
        pytest.skip("checks the non-GPU fallback")
    q, k, v = _qkv(1, 16, 16, 4, 2, 8)
    seg, pos = _packed(1, 16, [[9, 7]])
    kw = _kwargs(pos, seg, 0.3)
    np.testing.assert_array_equal(
        attention(q, k, v, **kw, implementation="cudnn"),
        attention(q, k, v, **kw, implementation="xla"),
    )


# --- backend choice -----------------------------------------------------------------------


def _resolve(impl, platform, T=128, S=128, sinks=False, window=False, dtype=jnp.bfloat16):
    return resolve_implementation(
        impl, T=T, S=S, has_sinks=sinks, has_window=window, dtype=dtype, platform=platform
    )


def test_resolve_implementation_choices():
    assert _resolve("auto", "tpu") == "splash"
    assert _resolve("auto", "gpu") == "cudnn"
    assert _resolve("auto", "cpu") == "xla"
    assert _resolve("auto", "tpu", window=True) == "splash"
    assert _resolve("auto", "gpu", window=True) == "cudnn"
    assert _resolve("splash", "cpu") == "splash"  # interpret mode
    assert _resolve("xla", "tpu") == "xla"
    # Fallbacks to the reference.
    assert _resolve("auto", "tpu", T=1, S=4096) == "xla"  # decode
    assert _resolve("auto", "gpu", T=1, S=4096) == "xla"
    assert _resolve("auto", "tpu", sinks=True) == "xla"
    assert _resolve("cudnn", "gpu", sinks=True) == "xla"
    assert _resolve("cudnn", "cpu") == "xla"
    assert _resolve("cudnn", "gpu", dtype=jnp.float32) == "xla"
    assert _resolve("auto", "cpu") == "xla"


def test_resolve_implementation_logs_each_fallback_once(caplog):
    attn_lib._logged.clear()
    with caplog.at_level(logging.INFO, logger="dasd_jax.models.attention"):
        for _ in range(3):
            _resolve("auto", "tpu", T=1, S=64)
        _resolve("auto", "tpu", sinks=True)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "T=1 != S=64" in messages[0] and "sinks" in messages[1]


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="flash.*valid.*xla.*splash.*cudnn"):
        _resolve("flash", "cpu")
    q, k, v = _qkv(1, 8, 8, 2, 1, 8)
    seg, pos = _packed(1, 8, [[8]])
    with pytest.raises(ValueError, match="valid"):
        attention(q, k, v, **_kwargs(pos, seg, 0.3), implementation="Splash")
