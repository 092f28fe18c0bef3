"""Qwen3 NNX port: HF parity, packing, mesh invariance, causality, KV cache, full shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dasd_jax.models import checkpoint as ck
from dasd_jax.models.qwen3 import ModelOptions, Qwen3, Qwen3Config, shape_config
from dasd_jax.sharding import batch_sharding, make_mesh

FP32 = ModelOptions(dtype="float32", param_dtype="float32", attention="xla")


def one_device_mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_word_embeddings=False, num_key_value_heads=2),
        dict(tie_word_embeddings=True, num_key_value_heads=1),
        dict(tie_word_embeddings=False, num_key_value_heads=4),
        # odd sizes: vocab, hidden, mlp, head_dim not powers of two; GQA group 3
        dict(
            vocab_size=251,
            hidden_size=48,
            intermediate_size=72,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=10,
            num_hidden_layers=3,
        ),
        dict(attention_bias=True, num_key_value_heads=2),
    ],
    ids=["untied-kv2", "tied-kv1", "kv4", "odd-sizes", "bias"],
)
def test_logits_match_transformers_fp32(hf_qwen3, overrides):
    folder, hf = hf_qwen3(**overrides)
    model = ck.load_hf(folder, one_device_mesh(), FP32)
    tokens = np.random.RandomState(1).randint(0, hf.config.vocab_size, (2, 13))
    got, _ = model(jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(got), hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_logits_match_transformers_bf16(hf_qwen3):
    """bf16 weights and compute on both sides. Stated tolerance: 0.05 max abs on logits of
    std ~1 (bf16 has 8 mantissa bits; HF rounds attention probabilities and RoPE tables to
    bf16 where we keep fp32, so the two differ by bf16 rounding, not by a bug)."""
    folder, hf = hf_qwen3(dtype="bfloat16")
    opts = ModelOptions(dtype="bfloat16", param_dtype="bfloat16", attention="xla")
    model = ck.load_hf(folder, one_device_mesh(), opts)
    tokens = np.random.RandomState(2).randint(0, 256, (2, 16))
    got = np.asarray(model(jnp.asarray(tokens))[0])
    ref = hf_logits(hf, tokens)
    assert np.abs(got - ref).max() < 0.05, np.abs(got - ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_rope_parameters_and_rope_theta_both_accepted():
    base = dict(
        model_type="qwen3",
        vocab_size=8,
        hidden_size=4,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        head_dim=4,
    )
    a = Qwen3Config.from_hf_dict({**base, "rope_theta": 5e6})
    b = Qwen3Config.from_hf_dict(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e6}}
    )
    assert a.rope_theta == b.rope_theta == 5e6
    with pytest.raises(ValueError, match="rope_theta"):
        Qwen3Config.from_hf_dict(base)


def _tiny_model(seed=0, vocab=256, mesh=None, **kw):
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        **kw,
    )
    mesh = mesh or one_device_mesh()
    return ck.init_model(cfg, mesh, FP32, seed=seed)


def test_packed_documents_equal_separate():
    model = _tiny_model()
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, 256, 7), rng.randint(0, 256, 5)
    row = np.concatenate([a, b, [0, 0]])[None]
    seg = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    pos = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    packed = np.asarray(model(jnp.asarray(row), jnp.asarray(pos), jnp.asarray(seg))[0])[0]
    alone_a = np.asarray(model(jnp.asarray(a[None]))[0])[0]
    alone_b = np.asarray(model(jnp.asarray(b[None]))[0])[0]
    np.testing.assert_allclose(packed[:7], alone_a, atol=1e-5)
    np.testing.assert_allclose(packed[7:12], alone_b, atol=1e-5)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 2, 4)])
def test_same_logits_on_every_mesh(shape):
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 256, (8, 16)))
    ref = np.asarray(_tiny_model(seed=5)(tokens)[0])
    mesh = make_mesh(shape)
    model = _tiny_model(seed=5, mesh=mesh)
    # parameters really are split over the mesh (no silent replication on CPU)
    q = model.layers.q_proj[...]
    if mesh.shape["tensor"] > 1:
        assert q.sharding.spec[2] == "tensor"
        assert len({str(s.index) for s in q.addressable_shards}) > 1
    got = jax.jit(lambda m, t: m(t)[0])(model, jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-5)


def test_causality():
    model = _tiny_model()
    t = np.random.RandomState(6).randint(0, 256, (1, 12))
    base = np.asarray(model(jnp.asarray(t))[0])
    for pos in (0, 5, 11):
        t2 = t.copy()
        t2[0, pos] = (t2[0, pos] + 1) % 256
        out = np.asarray(model(jnp.asarray(t2))[0])
        np.testing.assert_array_equal(out[:, :pos], base[:, :pos])
        assert np.abs(out[:, pos] - base[:, pos]).max() > 1e-4


def test_prefill_then_decode_equals_full_forward():
    model = _tiny_model(tie_word_embeddings=True)
    rng = np.random.RandomState(7)
    lengths = [5, 3]
    T = 9
    toks = rng.randint(0, 256, (2, T))
    full = [np.asarray(model(jnp.asarray(toks[i : i + 1]))[0])[0] for i in range(2)]
    # right-padded prefill to a bucket of 6, rows of different true lengths
    bucket = 6
    pre = np.zeros((2, bucket), np.int64)
    seg = np.zeros((2, bucket), np.int64)
    for i, n in enumerate(lengths):
        pre[i, :n] = toks[i, :n]
        seg[i, :n] = 1
    pos = np.tile(np.arange(bucket), (2, 1))
    cache = model.init_cache(batch=2, max_length=16)
    logits, cache = model(jnp.asarray(pre), jnp.asarray(pos), jnp.asarray(seg), cache)
    np.testing.assert_array_equal(np.asarray(cache.lengths_B), lengths)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(logits)[i, :n], full[i][:n], atol=1e-5)
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    cur = list(lengths)
    while min(cur) < T:
        nxt = np.array([[toks[i, min(cur[i], T - 1)]] for i in range(2)])
        logits, cache = step(model, jnp.asarray(nxt), cache)
        for i in range(2):
            if cur[i] < T:
                np.testing.assert_allclose(np.asarray(logits)[i, 0], full[i][cur[i]], atol=1e-5)
        cur = [c + 1 for c in cur]


@pytest.mark.parametrize(
    "name, expected",
    [
        ("qwen3-4b", 4_022_468_096),  # transformers' count for Qwen3-4B (tied embeddings)
        ("qwen3-0.6b", None),
        ("qwen3-8b", None),
        ("qwen3-32b", None),
    ],
)
def test_full_size_parameter_counts_from_eval_shape(name, expected):
    """eval_shape (nothing allocated) gives transformers' own count, which transformers
    computes here on the meta device, so it allocates nothing either."""
    import transformers

    cfg = shape_config(name)
    abstract = nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_cfg = transformers.Qwen3Config(
        **{
            k: v
            for k, v in cfg.to_hf_dict().items()
            if k not in ("architectures", "model_type", "dtype")
        }
    )
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    hf_count = sum(p.numel() for p in hf.parameters())
    assert n == hf_count == cfg.num_params
    if expected is not None:
        assert n == expected


def test_mesh_config_expert_axis_and_bad_sizes():
    from dasd_jax.sharding import MeshConfig

    mesh = make_mesh(MeshConfig(data=2, fsdp=1, expert=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    assert make_mesh(MeshConfig()).shape["data"] == 8  # -1: all remaining devices
    with pytest.raises(ValueError, match="needs 12 devices"):
        make_mesh((3, 2, 2))
    with pytest.raises(ValueError, match="at most one"):
        make_mesh((-1, -1, 1))


def test_splash_backend_in_the_model_equals_xla():
    """The TPU kernel path (Pallas interpret mode on CPU) inside the full model."""
    tokens = np.random.RandomState(8).randint(0, 256, (2, 128))
    seg = np.ones((2, 128), np.int32)
    seg[1, 100:] = 0  # padding
    ref = _tiny_model(seed=9)
    model = _tiny_model(seed=9)
    model.opts = ModelOptions(dtype="float32", attention="splash")
    a = np.asarray(ref(jnp.asarray(tokens), None, jnp.asarray(seg))[0])
    b = np.asarray(model(jnp.asarray(tokens), None, jnp.asarray(seg))[0])
    np.testing.assert_allclose(b[0], a[0], atol=2e-5)
    np.testing.assert_allclose(b[1, :100], a[1, :100], atol=2e-5)
