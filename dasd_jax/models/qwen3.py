"""Qwen3 dense decoder (Qwen3-0.6B ... 32B, Qwen3-4B-Instruct-2507) in Flax NNX.

Consumes a Hugging Face `config.json` (as `Qwen3Config`) and token ids; produces final hidden
states, fp32 logits, and an updated KV cache. Weights load from / save to Hugging Face
safetensors through `dasd_jax.models.checkpoint`.

Shape letters (used in every tensor name and einsum in this package):
  B batch   T query length   S key/value (cache) length   D hidden size
  N query heads   K kv heads   G = N // K   H head dim   F MLP width   V vocab   L layers

Layout choices:
- Layers are *stacked*: every per-layer weight has a leading L dim and the forward pass is a
  `jax.lax.scan` over layers (one compiled layer instead of 36; remat applies per layer).
- Weights are stored in `param_dtype` (fp32 master weights for training, bf16 to serve) and
  cast to the compute `dtype` one layer at a time inside the scan.
- Numerically sensitive parts run in fp32 as in transformers: RMSNorm statistics, attention
  softmax, logits (bf16 matmul with fp32 accumulation, which is at least as exact as HF's
  bf16 matmul followed by `.float()`).
- Packing: `segment_ids` (0 = padding) and per-token `positions` are explicit, so documents
  packed in one row never attend to each other and each restarts its RoPE positions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from dasd_jax.models import decoder
from dasd_jax.models.decoder import REMAT_POLICIES, KVCache  # noqa: F401 - re-exported
from dasd_jax.sharding import constrain

# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class Qwen3Config:
    """Architecture numbers, named as in Hugging Face's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dtype: str = "bfloat16"  # the checkpoint's storage dtype ("torch_dtype" in older files)
    model_type: str = "qwen3"
    # every key of the source config.json, so that saving writes back what was loaded
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> Qwen3Config:
        if d.get("model_type") != "qwen3":
            raise ValueError(f"{source}: model_type {d.get('model_type')!r} is not 'qwen3'")
        if d.get("use_sliding_window"):
            raise NotImplementedError(f"{source}: Qwen3 sliding-window layers are not supported")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise NotImplementedError(f"{source}: rope_type {rope_type!r} is not supported")
        theta = rope.get("rope_theta", d.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{source}: neither rope_theta nor rope_parameters.rope_theta set")
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if k not in d
        ]
        if missing:
            raise ValueError(f"{source}: missing keys {missing}")
        n_heads = d["num_attention_heads"]
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=d.get("num_key_value_heads", n_heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            max_position_embeddings=d.get("max_position_embeddings", 40960),
            hidden_act=d.get("hidden_act", "silu"),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            dtype=d.get("dtype") or d.get("torch_dtype") or "bfloat16",
            extra=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Qwen3Config:
        f = Path(path) / "config.json"
        return cls.from_hf_dict(json.loads(f.read_text()), source=str(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents; keys of the loaded file are kept, ours override."""
        d = dict(self.extra)
        d.update(
            architectures=["Qwen3ForCausalLM"],
            model_type="qwen3",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act=self.hidden_act,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            dtype=self.dtype,
        )
        d.pop("torch_dtype", None)
        d.pop("rope_scaling", None)
        d.pop("rope_theta", None)
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": self.rope_theta}
        d.setdefault("use_sliding_window", False)
        d.setdefault("attention_dropout", 0.0)
        return d

    @property
    def num_params(self) -> int:
        D, F, L, V = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.vocab_size,
        )
        N, K, H = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = D * N * H * 2 + D * K * H * 2 + 2 * H
        if self.attention_bias:
            attn += N * H + 2 * K * H + D
        per_layer = attn + 3 * D * F + 2 * D
        return L * per_layer + V * D * (1 if self.tie_word_embeddings else 2) + D


@dataclass(frozen=True)
class ModelOptions:
    """How to run a model (not what it is): dtypes, attention backend, remat."""

    dtype: str = "bfloat16"  # compute dtype; "float32" for parity tests
    param_dtype: str = "float32"  # storage of weights (fp32 master weights by default)
    attention: str = "auto"  # auto | xla | cudnn | splash
    remat: str = "none"  # none | full | dots  (per-layer rematerialisation policy)


# Published shapes, for eval_shape tests, docs and benchmarks. Real runs read config.json.
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "qwen3-0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-4b-instruct-2507": dict(
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        rope_theta=5_000_000.0,
        max_position_embeddings=262144,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "qwen3-32b": dict(
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


def shape_config(name: str) -> Qwen3Config:
    """A Qwen3Config for a published shape (vocab 151,936, head_dim 128)."""
    return Qwen3Config(vocab_size=151936, head_dim=128, **QWEN3_SHAPES[name])


# --------------------------------------------------------------------------- pieces


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Qwen3RMSNorm: statistics in fp32, cast back, then scale (same order as HF)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def rope(x_BTnH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half form; angles in fp32, cast to x's dtype as HF does."""
    H = x_BTnH.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, H, 2, dtype=jnp.float32) / H))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    angles_BTH = jnp.concatenate([angles_BTh, angles_BTh], axis=-1)
    cos = jnp.cos(angles_BTH)[:, :, None, :].astype(x_BTnH.dtype)
    sin = jnp.sin(angles_BTH)[:, :, None, :].astype(x_BTnH.dtype)
    x1, x2 = x_BTnH[..., : H // 2], x_BTnH[..., H // 2 :]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x_BTnH * cos + rotated * sin


def attention_block(x_BTD, w: dict, kv, inputs: decoder.Inputs, cfg, opts, mesh):
    """The attention half of a Qwen3 (and Qwen3-MoE) decoder layer: pre-norm, q/k/v (+ biases),
    per-head q/k RMSNorm, RoPE, cache write, attention, output projection, residual. `w`: this
    layer's weights in compute dtype; `kv`: this layer's (k, v) cache or None. Returns the new
    residual stream and this layer's updated cache (None without one)."""
    eps, pos_BT = cfg.rms_norm_eps, inputs.positions_BT
    h_BTD = rms_norm(x_BTD, w["input_layernorm"], eps)
    q_BTNH, k_BTKH, v_BTKH = decoder.project_qkv(h_BTD, w, cfg.attention_bias, mesh)
    q_BTNH = rope(rms_norm(q_BTNH, w["q_norm"], eps), pos_BT, cfg.rope_theta)
    k_BTKH = rope(rms_norm(k_BTKH, w["k_norm"], eps), pos_BT, cfg.rope_theta)
    k_all, v_all, new_kv = decoder.update_kv(kv, k_BTKH, v_BTKH, inputs, jnp.dtype(opts.dtype))
    a_BTNH = decoder.attend(
        q_BTNH,
        k_all,
        v_all,
        inputs,
        scale=cfg.head_dim**-0.5,
        implementation=opts.attention,
        cached=kv is not None,
        mesh=mesh,
    )
    return x_BTD + decoder.project_out(a_BTNH, w, cfg.attention_bias), new_kv


# per-layer weight name -> logical axes of its [L, ...] array
LAYER_AXES: dict[str, tuple[str | None, ...]] = {
    "q_proj": ("layers", "embed", "q_heads", "head_dim"),
    "k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "o_proj": ("layers", "q_heads", "head_dim", "embed"),
    "q_norm": ("layers", "norm"),
    "k_norm": ("layers", "norm"),
    "input_layernorm": ("layers", "norm"),
    "post_attention_layernorm": ("layers", "norm"),
    "gate_proj": ("layers", "embed", "mlp"),
    "up_proj": ("layers", "embed", "mlp"),
    "down_proj": ("layers", "mlp", "embed"),
    "q_bias": ("layers", "q_heads", "head_dim"),
    "k_bias": ("layers", "kv_heads", "head_dim"),
    "v_bias": ("layers", "kv_heads", "head_dim"),
    "o_bias": ("layers", "norm"),
}


def _param(rngs: nnx.Rngs, shape, axes, dtype, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        value = 0.02 * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=tuple(axes))


class Qwen3Layers(nnx.Module):
    """All decoder layers' weights, stacked on a leading L dim (HF names)."""

    def __init__(self, cfg: Qwen3Config, param_dtype, rngs: nnx.Rngs):
        L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
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
            "gate_proj": (L, D, F),
            "up_proj": (L, D, F),
            "down_proj": (L, F, D),
        }
        if cfg.attention_bias:
            shapes.update(q_bias=(L, N, H), k_bias=(L, K, H), v_bias=(L, K, H), o_bias=(L, D))
        for name, shape in shapes.items():
            init = "ones" if "norm" in name else "zeros" if "bias" in name else "normal"
            setattr(self, name, _param(rngs, shape, LAYER_AXES[name], param_dtype, init))


class CausalLM(nnx.Module):
    """The public methods every decoder here shares (Qwen3, Qwen3-MoE, gpt-oss).

    The parameters every one of them has are made here, in this order (it fixes the random
    init): `embed_tokens`, the stacked `layers` (a subclass's `make_layers`), the final
    `norm`, `lm_head` when the embeddings are untied. A subclass implements `make_layers` and
    `hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache)`.
    """

    def __init__(
        self,
        cfg: Any,
        opts: ModelOptions = ModelOptions(),
        *,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
    ):
        self.cfg = cfg
        self.opts = opts
        self.mesh = mesh
        pdt = jnp.dtype(opts.param_dtype)
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = _param(rngs, (V, D), ("vocab", "embed"), pdt)
        self.layers = self.make_layers(cfg, pdt, rngs)
        self.norm = _param(rngs, (D,), ("norm",), pdt, "ones")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (D, V), ("embed", "vocab"), pdt)

    def make_layers(self, cfg: Any, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings [B, T, D] in compute dtype, sharded like the residual stream."""
        x_BTD = self.embed_tokens[...].astype(jnp.dtype(self.opts.dtype))[tokens_BT]
        return constrain(x_BTD, ("act_batch", "act_seq", "act_embed"), self.mesh)

    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """fp32 logits [B, T, V] and the updated cache. Use for short T (decode, tests);
        scoring and training go through `hidden_states` + `logprobs.token_logprobs`."""
        hidden_BTD, cache = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache)
        return self.logits(hidden_BTD), cache

    def unembed_DV(self) -> jax.Array:
        """The output projection [D, V] in compute dtype (the embedding when tied)."""
        dt = jnp.dtype(self.opts.dtype)
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].astype(dt).T
        return self.lm_head[...].astype(dt)

    def logits(self, hidden_BTD: jax.Array) -> jax.Array:
        logits_BTV = jnp.einsum(
            "btd,dv->btv", hidden_BTD, self.unembed_DV(), preferred_element_type=jnp.float32
        )
        return constrain(logits_BTV, ("act_batch", "act_seq", "act_vocab"), self.mesh)

    def init_cache(self, batch: int, max_length: int, dtype: str | None = None) -> KVCache:
        c = self.cfg
        shape = (c.num_hidden_layers, batch, max_length, c.num_key_value_heads, c.head_dim)
        dt = jnp.dtype(dtype or self.opts.dtype)
        k = jnp.zeros(shape, dt)
        if self.mesh is not None:
            axes = ("layers", "act_batch", "cache_seq", "act_kv_heads", "act_head_dim")
            k = constrain(k, axes, self.mesh)
        return KVCache(k, k, jnp.zeros((batch,), jnp.int32))


class Qwen3(CausalLM):
    """Qwen3ForCausalLM. `mesh` (optional) steers activation sharding."""

    def make_layers(self, cfg, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
        return Qwen3Layers(cfg, param_dtype, rngs)

    def hidden_states(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states [B, T, D] in compute dtype, and the updated cache.

        Without a cache: positions default to 0..T-1 and segment ids to 1 (one document).
        With a cache: each row is one sequence; the token at position p is written to slot
        p (tokens with segment id 0 are not written) and attends to slots <= p.
        """
        cfg, dt, mesh = self.cfg, jnp.dtype(self.opts.dtype), self.mesh
        inputs = decoder.prepare_inputs(tokens_BT, positions_BT, segment_ids_BT, cache)
        x_BTD = self.embed(tokens_BT)

        def layer(x_BTD, xs):
            w, kv = xs
            w = {k: v.astype(dt) for k, v in w.items()}
            x_BTD, new_kv = attention_block(x_BTD, w, kv, inputs, cfg, self.opts, mesh)
            h_BTD = rms_norm(x_BTD, w["post_attention_layernorm"], cfg.rms_norm_eps)
            gate_BTF = jnp.einsum("btd,df->btf", h_BTD, w["gate_proj"])
            up_BTF = jnp.einsum("btd,df->btf", h_BTD, w["up_proj"])
            act_BTF = constrain(
                jax.nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_seq", "act_mlp"), mesh
            )
            x_BTD = x_BTD + jnp.einsum("btf,fd->btd", act_BTF, w["down_proj"])
            x_BTD = constrain(x_BTD, ("act_batch", "act_seq", "act_embed"), mesh)
            return x_BTD, new_kv

        cache_xs = None if cache is None else (cache.k_LBSKH, cache.v_LBSKH)
        xs = (decoder.stacked_weights(self.layers), cache_xs)
        x_BTD, new_kv = decoder.scan_layers(layer, x_BTD, xs, self.opts.remat)
        hidden_BTD = rms_norm(x_BTD, self.norm[...], cfg.rms_norm_eps)
        return hidden_BTD, decoder.finish_cache(cache, new_kv, inputs)
