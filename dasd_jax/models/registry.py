"""One entry point for every supported architecture: read a config, load or init a model.

Consumes a Hugging Face folder (config.json + safetensors) or a config object; produces a model
(`Qwen3`, `Qwen3Moe` or `GptOss`) whose arrays live on the given mesh. The architecture is
picked from config.json's `model_type` (or, when that is missing, its `architectures`), with a
clear error naming the supported ones for anything else. All models share one interface
(`hidden_states`, `unembed_DV`, `logits`, `init_cache`), so `logprobs.sequence_logprobs` and
`logprobs.token_logprobs` score with any of them: the student (Qwen3) and the teacher
(gpt-oss, or a Qwen3-MoE) go through the same code.

This wraps `checkpoint.py`, which holds the registry table (`ARCHITECTURES`: model_type ->
config class, model class, HF key table).

`opts` is a `qwen3.ModelOptions`; pass `moe.MoeOptions` to choose the MoE expert compute
("grouped", the default, or the "dense" reference).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from dasd_jax.models import checkpoint
from dasd_jax.models.qwen3 import ModelOptions

SUPPORTED = tuple(checkpoint.ARCHITECTURES)


def read_config(path: str | Path):
    """The architecture config (Qwen3Config, Qwen3MoeConfig or GptOssConfig) of an HF folder."""
    return checkpoint.read_config(path)


def config_from_dict(d: dict[str, Any], source: str = "config") -> Any:
    """The config object for a config.json-style dict (dispatched on model_type)."""
    model_type = d.get("model_type")
    if model_type not in checkpoint.ARCHITECTURES:
        raise checkpoint.CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; supported: {sorted(SUPPORTED)}"
        )
    return checkpoint.ARCHITECTURES[model_type][0].from_hf_dict(d, source=source)


def load(path: str | Path, mesh: Mesh, opts: ModelOptions = ModelOptions()):
    """The model of an HF folder with its weights, every array already on `mesh`."""
    return checkpoint.load_hf(path, mesh, opts)


def init(cfg, mesh: Mesh, opts: ModelOptions = ModelOptions(), seed: int = 0):
    """A randomly initialised model for `cfg` (any registered config), created sharded."""
    if cfg.model_type not in checkpoint.ARCHITECTURES:
        raise checkpoint.CheckpointError(
            f"unsupported model_type {cfg.model_type!r}; supported: {sorted(SUPPORTED)}"
        )
    return checkpoint.init_model(cfg, mesh, opts, seed)


def save(model, out_dir: str | Path, **kwargs) -> Path:
    """Write `model` as an HF folder (see checkpoint.save_hf for the options)."""
    return checkpoint.save_hf(model, out_dir, **kwargs)
