"""Test setup: 8 fake CPU devices (set before jax is imported) and tiny HF checkpoints."""

import os
import sys
from pathlib import Path

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402


def make_hf_qwen3(folder, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random tiny Qwen3ForCausalLM with transformers (offline); returns the torch model."""
    import torch
    import transformers

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(overrides)
    cfg = transformers.Qwen3Config(**kw)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: randomise them so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


@pytest.fixture
def hf_qwen3(tmp_path):
    def make(**overrides):
        folder = tmp_path / f"hf{len(list(tmp_path.iterdir()))}"
        model = make_hf_qwen3(folder, **overrides)
        return folder, model

    return make
