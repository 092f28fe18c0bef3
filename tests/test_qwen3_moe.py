"""Qwen3-MoE NNX port: HF parity, per-expert tensors stacked and split, meshes, cache,
full-size parameter counts."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_tiny import hf_logits, make_qwen3_moe
from safetensors.numpy import load_file

from dasd_jax.models import checkpoint as ck
from dasd_jax.models.moe import MoeOptions
from dasd_jax.models.qwen3 import Qwen3Config
from dasd_jax.models.qwen3_moe import Qwen3Moe, Qwen3MoeConfig, shape_config
from dasd_jax.sharding import MeshConfig, batch_sharding, make_mesh


def fp32(moe="grouped"):
    return MoeOptions(dtype="float32", param_dtype="float32", attention="xla", moe=moe)


def one_device_mesh():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen3_moe") / "hf"
    return folder, make_qwen3_moe(folder)


@pytest.mark.parametrize("moe", ["dense", "grouped"])
def test_logits_match_transformers_fp32(tiny, moe):
    folder, hf = tiny
    model = ck.load_hf(folder, one_device_mesh(), fp32(moe))
    tokens = np.random.RandomState(1).randint(0, 256, (2, 13))
    got = np.asarray(model(jnp.asarray(tokens))[0])
    ref = hf_logits(hf, tokens)
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_unnormalised_top_k_and_bias_match_transformers(tmp_path):
    """norm_topk_prob=False (weights are the raw softmax probabilities), top-3 of 6, q/k/v/o
    biases, tied embeddings."""
    overrides = dict(
        norm_topk_prob=False,
        num_experts=6,
        num_experts_per_tok=3,
        attention_bias=True,
        tie_word_embeddings=True,
    )
    hf = make_qwen3_moe(tmp_path / "hf", seed=2, **overrides)
    model = ck.load_hf(tmp_path / "hf", one_device_mesh(), fp32())
    tokens = np.random.RandomState(2).randint(0, 256, (2, 9))
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(tokens))[0]), hf_logits(hf, tokens), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(
    "mesh_cfg",
    [
        MeshConfig(data=2, expert=4),
        MeshConfig(data=8),
        MeshConfig(data=1, fsdp=2, expert=2, tensor=2),
    ],
    ids=["data2-expert4", "data8", "fsdp2-expert2-tensor2"],
)
def test_same_logits_on_every_mesh(tiny, mesh_cfg):
    folder, _ = tiny
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 256, (8, 12)))
    ref = np.asarray(ck.load_hf(folder, one_device_mesh(), fp32("dense"))(tokens)[0])
    mesh = make_mesh(mesh_cfg)
    model = ck.load_hf(folder, mesh, fp32("grouped"))
    gate = model.layers.gate_proj[...]
    if mesh.shape["expert"] > 1:
        assert gate.sharding.spec[1] == "expert"
        assert gate.addressable_shards[0].data.shape[1] == 8 // mesh.shape["expert"]
    got = jax.jit(lambda m, t: m(t)[0])(model, jax.device_put(tokens, batch_sharding(mesh)))
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-5)


def test_prefill_then_decode_equals_full_forward(tiny):
    folder, _ = tiny
    model = ck.load_hf(folder, one_device_mesh(), fp32())
    toks = np.random.RandomState(4).randint(0, 256, (1, 8))
    full = np.asarray(model(jnp.asarray(toks))[0])[0]
    step = jax.jit(lambda m, t, c: m(t, cache=c))
    cache = model.init_cache(batch=1, max_length=8)
    logits, cache = step(model, jnp.asarray(toks[:, :5]), cache)
    np.testing.assert_allclose(np.asarray(logits)[0], full[:5], atol=1e-5)
    for t in range(5, 8):
        logits, cache = step(model, jnp.asarray(toks[:, t : t + 1]), cache)
        np.testing.assert_allclose(np.asarray(logits)[0, 0], full[t], atol=1e-5)


def test_round_trip_per_expert_tensors_and_transformers_loads_it(tiny, tmp_path):
    folder, hf = tiny
    model = ck.load_hf(folder, make_mesh(MeshConfig(data=2, expert=4)), fp32())
    assert model.layers.gate_proj.shape == (2, 8, 64, 32)  # [L, E, D, F], stacked from disk
    out = ck.save_hf(model, tmp_path / "out", dtype="float32")
    a, b = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in b
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = np.random.RandomState(5).randint(0, 256, (1, 9))
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf, tokens))


def test_config_shares_the_dense_fields(tiny):
    folder, _ = tiny
    d = json.loads((folder / "config.json").read_text())
    cfg = Qwen3MoeConfig.from_hf_dict(d)
    assert isinstance(cfg, Qwen3Config) and cfg.model_type == "qwen3_moe"
    assert cfg.num_experts == 8  # transformers wrote it as num_local_experts
    assert Qwen3MoeConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    hash(cfg)
    with pytest.raises(NotImplementedError, match="mlp_only_layers"):
        Qwen3MoeConfig.from_hf_dict({**d, "mlp_only_layers": [0]})
    with pytest.raises(NotImplementedError, match="sliding"):
        Qwen3MoeConfig.from_hf_dict({**d, "use_sliding_window": True})


def test_qwen3_30b_a3b_parameter_count_from_eval_shape():
    """eval_shape = transformers' meta-device count = the model card's 30.5B total."""
    cfg = shape_config("qwen3-30b-a3b")
    abstract = nnx.eval_shape(lambda: Qwen3Moe(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_cfg = transformers.Qwen3MoeConfig(
        **{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    )
    with torch.device("meta"):
        hf = transformers.Qwen3MoeForCausalLM(hf_cfg)
    assert n == sum(p.numel() for p in hf.parameters()) == cfg.num_params
    assert round(n / 1e9, 1) == 30.5
