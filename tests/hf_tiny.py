"""Random tiny gpt-oss and Qwen3-MoE checkpoints built offline by transformers (test helpers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

GPT_OSS_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    # small enough that the clamp is active on real activations
    swiglu_limit=0.5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

QWEN3_MOE_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)


def _randomise(model, scale_experts: float = 1.0) -> None:
    """HF inits norms to 1, biases and sinks to 0, experts small: make every weight matter."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("sinks"):
                p.add_(torch.randn_like(p))
            elif "experts" in name:
                p.mul_(scale_experts)
            elif name.startswith("lm_head"):
                p.mul_(10.0)  # logits of order 1, so 1e-4 is a real bound


def make_gpt_oss(folder, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random tiny GptOssForCausalLM; returns the (eager attention) torch model."""
    import torch
    import transformers

    kw = {**GPT_OSS_TINY, **overrides}
    cfg = transformers.GptOssConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).eval()
    _randomise(model, scale_experts=10.0)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


def make_qwen3_moe(folder, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random tiny Qwen3MoeForCausalLM; returns the torch model."""
    import torch
    import transformers

    kw = {**QWEN3_MOE_TINY, **overrides}
    cfg = transformers.Qwen3MoeConfig(**kw)
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    _randomise(model, scale_experts=5.0)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return model


def to_mxfp4_folder(src: Path, dst: Path) -> dict[str, np.ndarray]:
    """Copy an unquantised gpt-oss folder with its experts MXFP4-encoded, as real gpt-oss
    checkpoints ship them (`*_blocks` + `*_scales`, `quantization_config`). Returns the
    decoded expert tensors (HF layout), i.e. what the weights now are."""
    from safetensors.numpy import load_file, save_file

    from dasd_jax.models import mxfp4

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    out, decoded = {}, {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = mxfp4.hf_layout_quantize(t)
            out[name + "_blocks"], out[name + "_scales"] = blocks, scales
            decoded[name] = mxfp4.hf_layout_dequantize(blocks, scales)
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return decoded


def hf_logits(model, tokens) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()
