"""gpt-oss (gpt-oss-20b, gpt-oss-120b), the teacher, in Flax NNX.

Consumes a Hugging Face `config.json` (as `GptOssConfig`) and token ids; produces final hidden
states, fp32 logits and an updated KV cache, with the same interface and cache semantics as
`qwen3.Qwen3` (so `logprobs.sequence_logprobs` scores with either). Weights load from HF
safetensors through `dasd_jax.models.checkpoint`, including real checkpoints whose experts are
MXFP4 (`*_blocks` + `*_scales`, decoded on load; see mxfp4.py).

Shape letters: qwen3.py's (B T S D N K G H F V L) plus E experts and k experts per token
(moe.py adds M = B * T tokens).

What differs from Qwen3, each as transformers' modeling_gpt_oss.py computes it:
- attention: q/k/v/o biases, no q/k norm, one learned sink logit per head that joins the
  softmax denominator only, and alternating layer types from `layer_types` (HF's default:
  even layers "sliding_attention" with a `sliding_window` of 128 tokens, odd layers full).
  The per-layer type is a scanned bool; `lax.cond` picks the windowed or the full call, so
  each compiled branch keeps a static window (the kernels need one).
- RoPE is YaRN (`RopeParameters`): blended inverse frequencies and cos/sin multiplied by the
  attention factor 0.1 * ln(factor) + 1; `truncate` (false for gpt-oss) decides whether the
  correction range is rounded to whole dims.
- RMSNorm multiplies by its weight in fp32 before casting back (HF keeps the norms in fp32).
- MLP: a router with a bias, top-k of the logits then softmax over those k, experts with
  biases and the clamped SwiGLU (`swiglu_limit`, alpha = `swiglu_alpha`) on interleaved
  gate/up columns. Experts compute through moe.py (dense reference or grouped ragged_dot,
  expert-parallel over the `expert` mesh axis).
- lm_head is untied.
Our `gate_up_proj` is [L, E, D, F, 2]: HF's interleaved [E, D, 2F] with the pair axis split
off, so splitting F over `tensor` never separates a gate column from its up column.
With `MoeOptions(expert_weights="mxfp4")` the experts stay in the checkpoint's MXFP4 layout
on device (`*_blocks` uint8 [L, E, out, in/32, 16], `*_scales` [L, E, out, in/32]) and are
decoded one layer at a time inside the scan (scoring only: uint8 parameters have no grads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dasd_jax.models import decoder, mxfp4
from dasd_jax.models.moe import (
    Experts,
    expert_weights_format,
    experts_apply,
    gpt_oss_glu,
    moe_implementation,
    router_logits,
    topk_then_softmax,
)
from dasd_jax.models.qwen3 import CausalLM, KVCache, _param
from dasd_jax.sharding import constrain

SLIDING = "sliding_attention"
FULL = "full_attention"

# --------------------------------------------------------------------------- RoPE


def _tuple_ids(v):
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class RopeParameters:
    """HF `rope_parameters` for the types we support: "default" and "yarn"."""

    rope_type: str = "default"
    rope_theta: float = 10_000.0
    factor: float | None = None
    original_max_position_embeddings: int | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool = True
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str, default_theta: float) -> RopeParameters:
        """From config.json: `rope_parameters`, or the older `rope_scaling` + `rope_theta`."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise NotImplementedError(f"{source}: rope_type {rope_type!r} is not supported")
        theta = rope.pop("rope_theta", d.get("rope_theta", default_theta))
        known = {f for f in cls.__dataclass_fields__} - {"rope_type", "rope_theta"}
        unknown = sorted(set(rope) - known - {"partial_rotary_factor"})
        if unknown:
            raise NotImplementedError(f"{source}: unsupported rope parameters {unknown}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError(f"{source}: partial_rotary_factor is not supported")
        kw = {k: rope[k] for k in known if rope.get(k) is not None}
        if rope_type == "yarn":
            kw.setdefault(
                "original_max_position_embeddings", d.get("max_position_embeddings", 131072)
            )
            if kw.get("factor") is None:
                kw["factor"] = d["max_position_embeddings"] / kw["original_max_position_embeddings"]
        return cls(rope_type=rope_type, rope_theta=float(theta), **kw)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            d.update(
                factor=self.factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
                beta_fast=self.beta_fast if self.beta_fast is not None else 32.0,
                beta_slow=self.beta_slow if self.beta_slow is not None else 1.0,
                truncate=self.truncate,
            )
            for k in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(self, k) is not None:
                    d[k] = getattr(self, k)
        return d

    def inv_freq(self, head_dim: int) -> tuple[np.ndarray, float]:
        """(inverse frequencies fp32 [H/2], attention factor), as transformers computes them."""
        H = head_dim
        exponents = np.arange(0, H, 2, dtype=np.float64) / H
        pos_freqs = self.rope_theta**exponents
        if self.rope_type == "default":
            return (1.0 / pos_freqs).astype(np.float32), 1.0
        factor = float(self.factor)

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = self.attention_factor
        if attention_factor is None:
            if self.mscale and self.mscale_all_dim:
                attention_factor = get_mscale(factor, self.mscale) / get_mscale(
                    factor, self.mscale_all_dim
                )
            else:
                attention_factor = get_mscale(factor)
        beta_fast = self.beta_fast or 32.0
        beta_slow = self.beta_slow or 1.0
        orig = self.original_max_position_embeddings

        def correction_dim(rotations):  # dim whose wavelength makes `rotations` turns in orig
            return (H * math.log(orig / (rotations * 2 * math.pi))) / (
                2 * math.log(self.rope_theta)
            )

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, H - 1)
        if low == high:
            high += 0.001  # as HF: avoid a zero-width ramp
        ramp = np.clip((np.arange(H // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1.0 - ramp  # 1: keep the original frequency (high-frequency dims)
        inv_extra = 1.0 / pos_freqs
        inv_inter = 1.0 / (factor * pos_freqs)
        inv = inv_inter * (1 - extrapolation) + inv_extra * extrapolation
        return inv.astype(np.float32), float(attention_factor)


def rope_cos_sin(
    positions_BT: jax.Array, inv_freq_h: np.ndarray, scale: float, dtype
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, H/2] in `dtype`: angles in fp32, scaled by the attention factor."""
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_h)
    return (
        (jnp.cos(angles_BTh) * scale).astype(dtype),
        (jnp.sin(angles_BTh) * scale).astype(dtype),
    )


def apply_rope(x_BTnH: jax.Array, cos_BTh: jax.Array, sin_BTh: jax.Array) -> jax.Array:
    """Rotate the two halves of the head dim (HF's _apply_rotary_emb / rotate_half)."""
    H = x_BTnH.shape[-1]
    x1, x2 = x_BTnH[..., : H // 2], x_BTnH[..., H // 2 :]
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


# --------------------------------------------------------------------------- config

GPT_OSS_DEFAULT_ROPE = RopeParameters(
    rope_type="yarn",
    rope_theta=150_000.0,
    factor=32.0,
    original_max_position_embeddings=4096,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=False,
)


@dataclass(frozen=True)
class GptOssConfig:
    """Architecture numbers, named as in Hugging Face's config.json for gpt_oss."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int | None = 128
    layer_types: tuple[str, ...] = ()  # empty: HF's default alternation (sliding first)
    rms_norm_eps: float = 1e-5
    rope_parameters: RopeParameters = GPT_OSS_DEFAULT_ROPE
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    dtype: str = "bfloat16"
    model_type: str = "gpt_oss"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if not self.layer_types:
            default = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers))
            object.__setattr__(self, "layer_types", default)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise NotImplementedError(f"layer types {bad} are not supported")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        if d.get("model_type") != "gpt_oss":
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'gpt_oss'")
        required = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_local_experts",
        )
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        quant = d.get("quantization_config") or {}
        if quant and quant.get("quant_method") != "mxfp4":
            raise NotImplementedError(
                f"{source}: quantization {quant.get('quant_method')!r} is not supported "
                "(only mxfp4 experts)"
            )
        n_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            num_local_experts=d["num_local_experts"],
            num_experts_per_tok=d.get("num_experts_per_tok", d.get("experts_per_token", 4)),
            sliding_window=d.get("sliding_window", 128),
            layer_types=tuple(d.get("layer_types") or ()),
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_parameters=RopeParameters.from_hf_dict(d, source, default_theta=150_000.0)
            if (d.get("rope_parameters") or d.get("rope_scaling") or d.get("rope_theta"))
            else GPT_OSS_DEFAULT_ROPE,
            swiglu_alpha=d.get("swiglu_alpha", 1.702),
            swiglu_limit=d.get("swiglu_limit", 7.0),
            attention_bias=bool(d.get("attention_bias", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 131072),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=_tuple_ids(d.get("eos_token_id")),
            pad_token_id=d.get("pad_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype") or "bfloat16",
            extra=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> GptOssConfig:
        f = Path(path) / "config.json"
        return cls.from_hf_dict(json.loads(f.read_text()), source=str(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents (weights written dequantised: no quantization_config)."""
        d = dict(self.extra)
        for k in ("torch_dtype", "rope_scaling", "rope_theta", "quantization_config"):
            d.pop(k, None)
        eos = self.eos_token_id
        d.update(
            architectures=["GptOssForCausalLM"],
            model_type="gpt_oss",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_local_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            sliding_window=self.sliding_window,
            layer_types=list(self.layer_types),
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=self.rope_parameters.to_hf_dict(),
            swiglu_alpha=self.swiglu_alpha,
            swiglu_limit=self.swiglu_limit,
            attention_bias=self.attention_bias,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
            pad_token_id=self.pad_token_id,
            dtype=self.dtype,
        )
        d.setdefault("hidden_act", "silu")
        d.setdefault("attention_dropout", 0.0)
        return d

    def _attention_params(self) -> int:
        D, N, K, H = (
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads,
            self.head_dim,
        )
        n = D * N * H * 2 + D * K * H * 2 + N  # q, o, k, v, sinks
        if self.attention_bias:
            n += N * H + 2 * K * H + D
        return n

    def _expert_params(self) -> int:
        D, F = self.hidden_size, self.intermediate_size
        return D * 2 * F + 2 * F + F * D + D

    def _layer_params(self, experts: int) -> int:
        D, E = self.hidden_size, self.num_local_experts
        return self._attention_params() + D * E + E + experts * self._expert_params() + 2 * D

    @property
    def num_params(self) -> int:
        L, V, D = self.num_hidden_layers, self.vocab_size, self.hidden_size
        embed = V * D * (1 if self.tie_word_embeddings else 2)
        return L * self._layer_params(self.num_local_experts) + embed + D

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: the routed k experts, the unembedding, not the embedding
        lookup (OpenAI's convention for the published 5.13B / 3.61B)."""
        L, V, D = self.num_hidden_layers, self.vocab_size, self.hidden_size
        return L * self._layer_params(self.num_experts_per_tok) + V * D + D


# Published shapes (openai/gpt-oss-20b and -120b config.json), for eval_shape tests and
# benchmarks. Real runs read config.json.
GPT_OSS_SHAPES: dict[str, dict[str, Any]] = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
}


def shape_config(name: str) -> GptOssConfig:
    """A GptOssConfig for a published shape."""
    return GptOssConfig(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_experts_per_tok=4,
        sliding_window=128,
        eos_token_id=200002,
        pad_token_id=199999,
        **GPT_OSS_SHAPES[name],
    )


# --------------------------------------------------------------------------- model


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """GptOssRMSNorm: normalise and scale in fp32, then cast (weight * x before the cast)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * x32).astype(x.dtype)


LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "q_proj": ("layers", "embed", "q_heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "o_proj": ("layers", "q_heads", "head_dim", "embed"),
    "q_bias": ("layers", "q_heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_bias": ("layers", "norm"),
    "sinks": ("layers", "q_heads"),
    "input_layernorm": ("layers", "norm"),
    "post_attention_layernorm": ("layers", "norm"),
    # the router's E dim stays whole: every token needs every expert's logit
    "router": ("layers", "embed", None),
    "router_bias": ("layers", None),
    "gate_up_proj": ("layers", "experts", "embed", "mlp", None),
    "gate_up_proj_bias": ("layers", "experts", "mlp", None),
    "down_proj": ("layers", "experts", "mlp", "embed"),
    "down_proj_bias": ("layers", "experts", None),
    # expert_weights="mxfp4": the checkpoint's packed layout, [out, in / 32, 16] per expert
    "gate_up_proj_blocks": ("layers", "experts", "mlp", "embed", None),
    "gate_up_proj_scales": ("layers", "experts", "mlp", "embed"),
    "down_proj_blocks": ("layers", "experts", "embed", "mlp", None),
    "down_proj_scales": ("layers", "experts", "embed", "mlp"),
}
_FP32_WEIGHTS = ("input_layernorm", "post_attention_layernorm")
_PACKED = ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")


def _packed_param(rngs: nnx.Rngs, shape, axes, scales: bool) -> nnx.Param:
    """Random MXFP4 bytes (init for benchmarks; real weights come from the checkpoint).
    Scales 2^-7..2^-5 keep the decoded weights at a trained model's magnitude."""
    if scales:
        value = jax.random.randint(rngs.params(), shape, 120, 123).astype(jnp.uint8)
    else:
        value = jax.random.randint(rngs.params(), shape, 0, 256).astype(jnp.uint8)
    return nnx.Param(value, logical_axes=tuple(axes))


def _decode_experts(w: dict, dtype) -> tuple[jax.Array, jax.Array]:
    """One layer's MXFP4 experts -> (gate_up [E, D, F, 2], down [E, F, D]) in `dtype`."""
    gate_up_EJD = mxfp4.dequantize_jnp(w["gate_up_proj_blocks"], w["gate_up_proj_scales"], dtype)
    E, J, D = gate_up_EJD.shape
    gate_up = gate_up_EJD.transpose(0, 2, 1).reshape(E, D, J // 2, 2)
    down = mxfp4.dequantize_jnp(w["down_proj_blocks"], w["down_proj_scales"], dtype)
    return gate_up, down.transpose(0, 2, 1)


class GptOssLayers(nnx.Module):
    """All decoder layers' weights, stacked on a leading L dim."""

    def __init__(self, cfg: GptOssConfig, param_dtype, rngs: nnx.Rngs, packed: bool = False):
        L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        N, K, H, E = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            cfg.num_local_experts,
        )
        shapes = {
            "q_proj": (L, D, N, H),
            "k_proj": (L, D, K, H),
            "v_proj": (L, D, K, H),
            "o_proj": (L, N, H, D),
            "sinks": (L, N),
            "input_layernorm": (L, D),
            "post_attention_layernorm": (L, D),
            "router": (L, D, E),
            "router_bias": (L, E),
            "gate_up_proj": (L, E, D, F, 2),
            "gate_up_proj_bias": (L, E, F, 2),
            "down_proj": (L, E, F, D),
            "down_proj_bias": (L, E, D),
        }
        if cfg.attention_bias:
            shapes.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H), o_bias=(L, D))
        if packed:
            if D % mxfp4.BLOCK or F % mxfp4.BLOCK:
                raise ValueError("MXFP4 experts need hidden and expert widths divisible by 32")
            del shapes["gate_up_proj"], shapes["down_proj"]
            B = mxfp4.BYTES_PER_BLOCK
            for name, shape in {
                "gate_up_proj_blocks": (L, E, 2 * F, D // 32, B),
                "gate_up_proj_scales": (L, E, 2 * F, D // 32),
                "down_proj_blocks": (L, E, D, F // 32, B),
                "down_proj_scales": (L, E, D, F // 32),
            }.items():
                param = _packed_param(rngs, shape, LAYER_AXES[name], name.endswith("scales"))
                setattr(self, name, param)
        for name, shape in shapes.items():
            init = "ones" if "norm" in name else "zeros" if "bias" in name else "normal"
            setattr(self, name, _param(rngs, shape, LAYER_AXES[name], param_dtype, init))


class GptOss(CausalLM):
    """GptOssForCausalLM. `mesh` (optional) steers activation sharding and expert parallelism."""

    def make_layers(self, cfg, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
        return GptOssLayers(cfg, param_dtype, rngs, expert_weights_format(self.opts) == "mxfp4")

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
        D, H, k = cfg.hidden_size, cfg.head_dim, cfg.num_experts_per_tok
        inputs = decoder.prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        inv_freq, attn_factor = cfg.rope_parameters.inv_freq(H)
        cos_BTh, sin_BTh = rope_cos_sin(inputs.positions_BT, inv_freq, attn_factor, dt)
        act = gpt_oss_glu(cfg.swiglu_alpha, cfg.swiglu_limit)
        moe_impl = moe_implementation(self.opts)
        sliding_L = np.array([t == SLIDING for t in cfg.layer_types])
        mixed = bool(sliding_L.any() and not sliding_L.all())

        x_BTD = self.embed(tokens_BT)

        def layer(x_BTD, xs):
            w, kv, sliding = xs
            w = {
                n: v if n in _PACKED else v.astype(jnp.float32 if n in _FP32_WEIGHTS else dt)
                for n, v in w.items()
            }
            if "gate_up_proj_blocks" in w:
                w["gate_up_proj"], w["down_proj"] = _decode_experts(w, dt)
            h_BTD = rms_norm(x_BTD, w["input_layernorm"], cfg.rms_norm_eps)
            q_BTNH, k_BTKH, v_BTKH = decoder.project_qkv(h_BTD, w, cfg.attention_bias, mesh)
            q_BTNH = apply_rope(q_BTNH, cos_BTh, sin_BTh)
            k_BTKH = apply_rope(k_BTKH, cos_BTh, sin_BTh)
            k_all, v_all, new_kv = decoder.update_kv(kv, k_BTKH, v_BTKH, inputs, dt)

            def attend(window):
                return decoder.attend(
                    q_BTNH,
                    k_all,
                    v_all,
                    inputs,
                    scale=H**-0.5,
                    implementation=self.opts.attention,
                    cached=kv is not None,
                    mesh=mesh,
                    sliding_window=window,
                    sinks_N=w["sinks"],
                )

            if mixed:
                a_BTNH = jax.lax.cond(
                    sliding, lambda: attend(cfg.sliding_window), lambda: attend(None)
                )
            else:
                a_BTNH = attend(cfg.sliding_window if sliding_L.all() else None)
            x_BTD = x_BTD + decoder.project_out(a_BTNH, w, cfg.attention_bias)

            h_MD = rms_norm(x_BTD, w["post_attention_layernorm"], cfg.rms_norm_eps)
            h_MD = h_MD.reshape(B * T, D)
            logits_ME = router_logits(h_MD, w["router"], w["router_bias"])
            weights_Mk, experts_Mk = topk_then_softmax(logits_ME, k)
            ex = Experts(
                (w["gate_up_proj"],), (w["gate_up_proj_bias"],), w["down_proj"], w["down_proj_bias"]
            )
            y_MD = experts_apply(moe_impl, h_MD, weights_Mk, experts_Mk, ex, act, mesh)
            x_BTD = x_BTD + y_MD.reshape(B, T, D)
            x_BTD = constrain(x_BTD, ("act_batch", "act_seq", "act_embed"), mesh)
            return x_BTD, new_kv

        cache_xs = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH)
        xs = (decoder.stacked_weights(self.layers), cache_xs, jnp.asarray(sliding_L))
        x_BTD, new_kv = decoder.scan_layers(layer, x_BTD, xs, self.opts.remat)
        hidden_BTD = rms_norm(x_BTD, self.norm[...], cfg.rms_norm_eps)
        return hidden_BTD, decoder.finish_cache(cache, new_kv, inputs)
