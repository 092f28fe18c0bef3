"""registry.load picks the architecture from config.json; one log-prob function for all."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_qwen3
from hf_tiny import make_gpt_oss, make_qwen3_moe

from dasd_jax.logprobs import sequence_logprobs
from dasd_jax.models import registry
from dasd_jax.models.checkpoint import CheckpointError
from dasd_jax.models.gpt_oss import GptOss
from dasd_jax.models.moe import MoeOptions
from dasd_jax.models.qwen3 import Qwen3
from dasd_jax.models.qwen3_moe import Qwen3Moe
from dasd_jax.sharding import make_mesh

FP32 = MoeOptions(dtype="float32", param_dtype="float32", attention="xla")
MAKERS = {
    "qwen3": (make_hf_qwen3, Qwen3),
    "qwen3_moe": (make_qwen3_moe, Qwen3Moe),
    "gpt_oss": (make_gpt_oss, GptOss),
}


@pytest.mark.parametrize("model_type", sorted(MAKERS))
def test_load_dispatches_and_logprobs_match_transformers(tmp_path, model_type):
    make, cls = MAKERS[model_type]
    hf = make(tmp_path / "hf")
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert registry.read_config(tmp_path / "hf").model_type == model_type
    model = registry.load(tmp_path / "hf", mesh, FP32)
    assert isinstance(model, cls)
    tokens = np.random.RandomState(0).randint(0, 256, (2, 10))
    got, _ = sequence_logprobs(model, jnp.asarray(tokens), chunk_size=4)
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor(tokens)).logits.float(), -1).numpy()
    ref = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(got)[:, 1:], ref, atol=1e-4)
    assert (np.asarray(got)[:, 0] == 0).all()


def test_architectures_fallback_and_clear_error(tmp_path):
    make_qwen3_moe(tmp_path / "hf")
    f = tmp_path / "hf" / "config.json"
    d = json.loads(f.read_text())
    f.write_text(json.dumps({k: v for k, v in d.items() if k != "model_type"}))
    assert registry.read_config(tmp_path / "hf").model_type == "qwen3_moe"
    f.write_text(
        json.dumps({**d, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
    )
    with pytest.raises(CheckpointError, match=r"'mixtral'.*gpt_oss.*qwen3.*qwen3_moe"):
        registry.read_config(tmp_path / "hf")
    with pytest.raises(CheckpointError, match="unsupported model_type 'llama'"):
        registry.config_from_dict({"model_type": "llama"})


def test_init_any_config_on_a_mesh():
    from dasd_jax.models.gpt_oss import GptOssConfig

    cfg = GptOssConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=3,
    )
    mesh = make_mesh((2, 1, 1), devices=jax.devices()[:2])
    model = registry.init(cfg, mesh, FP32, seed=1)
    logits = jax.jit(lambda m, t: m(t)[0])(model, jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, 64) and np.isfinite(np.asarray(logits)).all()
