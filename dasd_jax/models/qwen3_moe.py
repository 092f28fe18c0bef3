"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) in Flax NNX.

Consumes a Hugging Face `config.json` (as `Qwen3MoeConfig`) and token ids; produces final hidden
states, fp32 logits and an updated KV cache, with the interface and cache semantics of
`qwen3.Qwen3`. On disk every expert has its own `experts.{e}.{gate,up,down}_proj.weight`;
`checkpoint.py` stacks them into fused [L, E, ...] arrays on load and splits them on save.

Shape letters: qwen3.py's (B T S D N K G H F V L) plus E experts, k experts per token; here
F is the expert width (`moe_intermediate_size`).

Shared with the dense Qwen3, really: the config fields and their parsing (`Qwen3MoeConfig`
extends `Qwen3Config`), the attention block (q/k RMSNorm on the head dim, default RoPE,
optional biases), RMSNorm, embeddings and the KV cache; those come from qwen3.py unchanged.
Different: the MLP is a router (no bias) whose softmax over all experts is cut to the top k
and, with `norm_topk_prob`, renormalised; each chosen expert is a SiLU-gated MLP and the
outputs are summed with those weights (moe.py). Layers that are dense MLPs
(`mlp_only_layers`, `decoder_sparse_step` > 1) are not supported: no released Qwen3-MoE has
them, and the stacked scan needs every layer alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dasd_jax.models import decoder
from dasd_jax.models.moe import (
    Experts,
    experts_apply,
    moe_implementation,
    router_logits,
    silu_glu,
    softmax_then_topk,
)
from dasd_jax.models.qwen3 import (
    LAYER_AXES as QWEN3_LAYER_AXES,
)
from dasd_jax.models.qwen3 import (
    CausalLM,
    KVCache,
    Qwen3Config,
    _param,
    attention_block,
    rms_norm,
)
from dasd_jax.sharding import constrain


@dataclass(frozen=True)
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3Config plus the MoE fields of HF's qwen3_moe config.json.

    `intermediate_size` (inherited) is the width of dense MLP layers, which these models do
    not have; it is kept so that saving writes back what was loaded.
    """

    moe_intermediate_size: int = 768
    num_experts: int = 128
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    model_type: str = "qwen3_moe"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3MoeConfig:
        if d.get("model_type") != "qwen3_moe":
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'qwen3_moe'")
        base = Qwen3Config.from_hf_dict({**d, "model_type": "qwen3"}, source)
        # transformers writes num_experts under its alias num_local_experts
        n_experts = d.get("num_experts", d.get("num_local_experts"))
        if n_experts is None:
            raise ValueError(f"{source}: missing key num_experts")
        cfg = cls(
            **{
                f.name: getattr(base, f.name) for f in fields(Qwen3Config) if f.name != "model_type"
            },
            moe_intermediate_size=d.get("moe_intermediate_size", 768),
            num_experts=n_experts,
            num_experts_per_tok=d.get("num_experts_per_tok", 8),
            norm_topk_prob=bool(d.get("norm_topk_prob", False)),
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(d.get("mlp_only_layers") or ()),
        )
        if cfg.mlp_only_layers or cfg.decoder_sparse_step != 1:
            raise NotImplementedError(
                f"{source}: dense MLP layers (mlp_only_layers={list(cfg.mlp_only_layers)}, "
                f"decoder_sparse_step={cfg.decoder_sparse_step}) are not supported"
            )
        if isinstance(cfg.eos_token_id, list):
            object.__setattr__(cfg, "eos_token_id", tuple(cfg.eos_token_id))
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen3MoeConfig:
        f = Path(path) / "config.json"
        return cls.from_hf_dict(json.loads(f.read_text()), source=str(f))

    def to_hf_dict(self) -> dict[str, Any]:
        d = super().to_hf_dict()
        d.pop("num_local_experts", None)
        if isinstance(d.get("eos_token_id"), tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        d.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            moe_intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            norm_topk_prob=self.norm_topk_prob,
            decoder_sparse_step=self.decoder_sparse_step,
            mlp_only_layers=list(self.mlp_only_layers),
        )
        return d

    def _layer_params(self, experts: int) -> int:
        D, F, E = self.hidden_size, self.moe_intermediate_size, self.num_experts
        N, K, H = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = D * N * H * 2 + D * K * H * 2 + 2 * H
        if self.attention_bias:
            attn += N * H + 2 * K * H + D
        return attn + D * E + experts * 3 * D * F + 2 * D

    @property
    def num_params(self) -> int:
        L, V, D = self.num_hidden_layers, self.vocab_size, self.hidden_size
        embed = V * D * (1 if self.tie_word_embeddings else 2)
        return L * self._layer_params(self.num_experts) + embed + D

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses (k experts, unembedding; not the embedding lookup)."""
        L, V, D = self.num_hidden_layers, self.vocab_size, self.hidden_size
        return L * self._layer_params(self.num_experts_per_tok) + V * D + D


QWEN3_MOE_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-30b-a3b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_hidden_layers=48,
        num_attention_heads=32,
        num_key_value_heads=4,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=40960,
    ),
}


def shape_config(name: str) -> Qwen3MoeConfig:
    """A Qwen3MoeConfig for a published shape (vocab 151,936, head_dim 128, untied)."""
    return Qwen3MoeConfig(
        vocab_size=151936,
        head_dim=128,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        **QWEN3_MOE_SHAPES[name],
    )


LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    **{k: v for k, v in QWEN3_LAYER_AXES.items() if k not in ("gate_proj", "up_proj", "down_proj")},
    # the router's E dim stays whole: every token needs every expert's logit
    "router": ("layers", "embed", None),
    "gate_proj": ("layers", "experts", "embed", "mlp"),
    "up_proj": ("layers", "experts", "embed", "mlp"),
    "down_proj": ("layers", "experts", "mlp", "embed"),
}


class Qwen3MoeLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading L dim (experts fused on E)."""

    def __init__(self, cfg: Qwen3MoeConfig, param_dtype, rngs: nnx.Rngs):
        L, D, F, E = (
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.num_experts,
        )
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        shapes = {
            "q_proj": (L, D, N, H),
            "k_proj": (L, D, K, H),
            "v_proj": (L, D, K, H),
            "o_proj": (L, N, H, D),
            "q_norm": (L, H),
            "k_norm": (L, H),
            "input_layernorm": (L, D),
            "post_attention_layernorm": (L, D),
            "router": (L, D, E),
            "gate_proj": (L, E, D, F),
            "up_proj": (L, E, D, F),
            "down_proj": (L, E, F, D),
        }
        if cfg.attention_bias:
            shapes.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H), o_bias=(L, D))
        for name, shape in shapes.items():
            init = "ones" if "norm" in name else "zeros" if "bias" in name else "normal"
            setattr(self, name, _param(rngs, shape, LAYER_AXES[name], param_dtype, init))


class Qwen3Moe(CausalLM):
    """Qwen3MoeForCausalLM. `mesh` (optional) steers activation sharding and expert parallelism."""

    def make_layers(self, cfg, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
        return Qwen3MoeLayers(cfg, param_dtype, rngs)

    def hidden_states(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] in compute dtype, and the updated cache
        (semantics of qwen3.Qwen3.hidden_states)."""
        cfg, dt, mesh = self.cfg, jnp.dtype(self.opts.dtype), self.mesh
        B, T = tokens_BT.shape
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        inputs = decoder.prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        moe_impl = moe_implementation(self.opts)

        x_BTD = self.embed(tokens_BT)

        def layer(x_BTD, xs):
            w, kv = xs
            w = {n: v.astype(dt) for n, v in w.items()}
            x_BTD, new_kv = attention_block(x_BTD, w, kv, inputs, cfg, self.opts, mesh)

            h_MD = rms_norm(x_BTD, w["post_attention_layernorm"], eps).reshape(B * T, D)
            logits_ME = router_logits(h_MD, w["router"])
            weights_Mk, experts_Mk = softmax_then_topk(
                logits_ME, cfg.num_experts_per_tok, cfg.norm_topk_prob
            )
            ex = Experts((w["gate_proj"], w["up_proj"]), (None, None), w["down_proj"])
            y_MD = experts_apply(moe_impl, h_MD, weights_Mk, experts_Mk, ex, silu_glu, mesh)
            x_BTD = x_BTD + y_MD.reshape(B, T, D)
            x_BTD = constrain(x_BTD, ("act_batch", "act_seq", "act_embed"), mesh)
            return x_BTD, new_kv

        cache_xs = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH)
        xs = (decoder.stacked_weights(self.layers), cache_xs)
        x_BTD, new_kv = decoder.scan_layers(layer, x_BTD, xs, self.opts.remat)
        hidden_BTD = rms_norm(x_BTD, self.norm[...], eps)
        return hidden_BTD, decoder.finish_cache(cache, new_kv, inputs)
