"""Chunked token log-probs: exact against a full log-softmax, packing, memory bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dasd_jax.logprobs import sequence_logprobs, token_logprobs
from dasd_jax.models import checkpoint as ck
from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
from dasd_jax.sharding import make_mesh


def _naive(h, w, t):
    logits = np.einsum("btd,dv->btv", np.asarray(h, np.float64), np.asarray(w, np.float64))
    logits -= logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(logp_all)
    return np.take_along_axis(logp_all, t[..., None], -1)[..., 0], -(p * logp_all).sum(-1)


@pytest.mark.parametrize("T, chunk", [(12, 4), (13, 5), (7, 64), (16, 16)])
def test_matches_full_log_softmax(T, chunk):
    rng = np.random.RandomState(0)
    h = rng.randn(3, T, 8).astype(np.float32)
    w = rng.randn(8, 50).astype(np.float32)
    t = rng.randint(0, 50, (3, T))
    logp, ent = token_logprobs(
        jnp.asarray(h), jnp.asarray(w), jnp.asarray(t), chunk_size=chunk, with_entropy=True
    )
    ref_logp, ref_ent = _naive(h, w, t)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-5)


def test_gradient_matches_full_log_softmax():
    rng = np.random.RandomState(1)
    h = jnp.asarray(rng.randn(2, 10, 8).astype(np.float32))
    w = jnp.asarray(rng.randn(8, 30).astype(np.float32))
    t = jnp.asarray(rng.randint(0, 30, (2, 10)))

    def full(h, w):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ w), t[..., None], -1).sum()

    chunked = lambda h, w: token_logprobs(h, w, t, chunk_size=3)[0].sum()  # noqa: E731
    for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(full, (0, 1))(h, w), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _model():
    cfg = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=10000.0,
    )
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return ck.init_model(cfg, mesh, ModelOptions(dtype="float32", attention="xla"))


def test_sequence_logprobs_equal_logits_and_packing():
    model = _model()
    rng = np.random.RandomState(2)
    a, b = rng.randint(0, 128, 6), rng.randint(0, 128, 4)
    logits = np.asarray(model(jnp.asarray(a[None]))[0])[0]
    ref = jax.nn.log_softmax(logits)[np.arange(5), a[1:]]
    alone, _ = sequence_logprobs(model, jnp.asarray(a[None]), chunk_size=4)
    np.testing.assert_allclose(np.asarray(alone)[0], np.r_[0.0, ref], atol=1e-5)
    row = np.r_[a, b, 0][None]
    seg = np.array([[1] * 6 + [2] * 4 + [0]])
    pos = np.array([list(range(6)) + list(range(4)) + [0]])
    packed, _ = sequence_logprobs(
        model, jnp.asarray(row), jnp.asarray(pos), jnp.asarray(seg), chunk_size=3
    )
    alone_b, _ = sequence_logprobs(model, jnp.asarray(b[None]))
    packed = np.asarray(packed)[0]
    np.testing.assert_allclose(packed[:6], np.asarray(alone)[0], atol=1e-5)
    np.testing.assert_allclose(packed[6:10], np.asarray(alone_b)[0], atol=1e-5)
    assert packed[6] == 0.0 and packed[10] == 0.0  # document start and padding


def _temp_bytes(B, T, D, V, chunk):
    f = jax.jit(lambda h, w, t: token_logprobs(h, w, t, chunk_size=chunk, with_entropy=True))
    args = (
        jax.ShapeDtypeStruct((B, T, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((D, V), jnp.bfloat16),
        jax.ShapeDtypeStruct((B, T), jnp.int32),
    )
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_temporary_memory_grows_with_chunk_not_sequence():
    """At Qwen's vocab (151,936), compiled temp memory is bounded by the chunk: a full
    [B, T, V] fp32 array at T=16384 would be 9.9 GB; we stay near B*C*V*4 bytes."""
    B, D, V = 1, 64, 151936
    full_bytes = B * 16384 * V * 4
    short = _temp_bytes(B, 4096, D, V, chunk=256)
    long = _temp_bytes(B, 16384, D, V, chunk=256)
    bigger_chunk = _temp_bytes(B, 16384, D, V, chunk=1024)
    chunk_bytes = B * 256 * V * 4
    assert long < 8 * chunk_bytes, (long, chunk_bytes)
    assert long < full_bytes / 20
    # x4 sequence length: temp memory may grow only by per-token O(D) buffers (a relaid copy
    # of the hidden row, fp32 outputs): at most 4*D + 64 bytes per extra token, against
    # V*4 = 607,744 bytes per token for full fp32 logits
    assert long - short < B * (16384 - 4096) * (4 * D + 64), (short, long)
    assert bigger_chunk > 2 * long  # x4 chunk: grows with the chunk
