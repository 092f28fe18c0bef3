"""A sampling engine on JetStream's Engine contract, for every model the checkpoint registry
loads (Qwen3, Qwen3-MoE, gpt-oss: anything with `init_cache` and `__call__(tokens, positions,
segment_ids, cache)` over a `qwen3.KVCache`).

Consumes a model (`checkpoint.load_hf`) and an `EngineConfig`; produces, through the
contract's calls:
- `prefill(params=, padded_tokens=, true_length=) -> Prefix`: the prompt's KV cache (padded
  to a bucket, computed in chunks), its last token, the request's sampling parameters;
- `init_decode_state() -> DecodeState`: a KV cache preallocated for `max_concurrent_decodes`
  slots of `cache_length` positions, sharded over the mesh's batch axes (slots) and tensor
  axis (kv heads), plus per-slot token, length and sampling state;
- `insert(prefix, decode_state, slot) -> DecodeState`: copies a prefix into a slot (the same
  prefix into n slots gives n samples of one prompt from one prefill);
- `generate(params, decode_state) -> (DecodeState, ResultTokens)`: one jitted step for all
  slots; `generate_steps(..., n)` runs n steps per host round trip (a `lax.scan`).

The prompt's *last* token is not prefilled: it is the first token a slot feeds to the decode
step, so every generated token, the first included, comes out of the same jitted sampler with
its slot's parameters and key, and prefill needs no sampling parameters (JetStream's
orchestrator calls prefill with none). The token at position p lives in cache slot p (the
model's cache contract); a slot whose `active` flag is off feeds segment id 0 and so writes
nothing. A slot stops on device at an EOS id or at its token budget (`max_tokens`, capped by
the cache length); stop strings are checked by the driver on text.

Each emitted token carries two log-probs (`sampling.sample_tokens`): under the model at T=1
and under the distribution actually sampled from.

Shape letters as in models/qwen3.py, plus n decode steps per call.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dasd_jax.models.qwen3 import KVCache
from dasd_jax.sample.sampling import SamplingParams, sample_tokens, slot_keys
from dasd_jax.sharding import named_sharding

log = logging.getLogger(__name__)

CACHE_AXES = ("layers", "act_batch", "cache_seq", "act_kv_heads", "act_head_dim")
_LAYER_AXIS, _SLOT_AXIS, _SEQ_AXIS = 0, 1, 2


@dataclass(frozen=True)
class EngineConfig:
    """Sizes of the engine: slots, prompt limit, cache length, compiled shapes."""

    max_concurrent_decodes: int = 64  # decode slots (batch of the decode step)
    max_prefill_length: int = 4096  # longest prompt in tokens (a power of two >= 16)
    max_decode_length: int = 32768  # tokens generated per slot at most
    min_prefill_bucket: int = 16  # prompts pad to a power of two >= this (few compiles)
    prefill_chunk: int = 1024  # long prompts prefill in chunks (rounded down to a power of 2)
    decode_steps: int = 8  # decode steps per host round trip (generate_steps)
    cache_dtype: str = ""  # "" = the model's compute dtype

    def __post_init__(self) -> None:
        p = self.max_prefill_length
        if p < 16 or p & (p - 1):
            raise ValueError(f"max_prefill_length must be a power of two >= 16, got {p}")
        for name in (
            "max_concurrent_decodes",
            "max_decode_length",
            "prefill_chunk",
            "decode_steps",
            "min_prefill_bucket",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def cache_length(self) -> int:
        return self.max_prefill_length + self.max_decode_length

    def buckets(self) -> list[int]:
        """Padded prompt lengths: powers of two from min_prefill_bucket to the limit."""
        b = max(16, 1 << (self.min_prefill_bucket - 1).bit_length())
        out = []
        while b < self.max_prefill_length:
            out.append(b)
            b *= 2
        return out + [self.max_prefill_length]


@jax.tree_util.register_dataclass
@dataclass
class Prefix:
    """A prefilled prompt: its cache (all prompt tokens but the last), the last token, and
    the sampling parameters of the request (replace them per sample: `with_sampling`)."""

    k_LBSKH: jax.Array  # [L, 1, bucket, K, H]
    v_LBSKH: jax.Array
    length: jax.Array  # int32 []: filled cache positions (prompt length - 1)
    token: jax.Array  # int32 []: the prompt's last token, fed to the first decode step
    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array
    seed: jax.Array  # uint32
    max_tokens: jax.Array

    def with_sampling(self, sp: SamplingParams) -> Prefix:
        return dataclasses.replace(self, **_sampling_arrays(sp))


def _sampling_arrays(sp: SamplingParams) -> dict[str, jax.Array]:
    return dict(
        temperature=jnp.asarray(sp.temperature, jnp.float32),
        top_p=jnp.asarray(sp.top_p, jnp.float32),
        top_k=jnp.asarray(sp.top_k, jnp.int32),
        seed=jnp.asarray(sp.seed, jnp.uint32),
        max_tokens=jnp.asarray(sp.max_tokens, jnp.int32),
    )


@jax.tree_util.register_dataclass
@dataclass
class DecodeState:
    """Everything the decode step transforms, one row per slot."""

    cache: KVCache  # [L, B, S, K, H]; lengths_B = filled positions = next token's position
    tokens_B: jax.Array  # next token to feed
    active_B: jax.Array  # bool: the slot is decoding
    generated_B: jax.Array  # tokens emitted so far (also the PRNG token index)
    max_tokens_B: jax.Array
    temperature_B: jax.Array
    top_p_B: jax.Array
    top_k_B: jax.Array
    seed_B: jax.Array


@dataclass
class SlotData:
    """JetStream's per-slot view: tokens [samples, 1], valid [samples, 1], lengths [samples]."""

    tokens: Any
    valid: Any
    lengths: Any


@jax.tree_util.register_dataclass
@dataclass
class ResultTokens:
    """One decode step's output, JetStream's layout plus our log-probs.

    `data` [B, 3] int32 holds token, valid, length (tokens generated so far) per slot in one
    array, so a single host copy serves the orchestrator; `logprobs` [B, 2] holds the token's
    log-prob under the model (T=1) and under the sampling distribution; `done` [B] marks the
    step at which a slot stopped on device (EOS or budget), `eos` [B] whether by EOS.
    """

    data: jax.Array
    logprobs: jax.Array
    done: jax.Array
    eos: jax.Array
    tokens_idx: tuple[int, int] = dataclasses.field(default=(0, 1), metadata=dict(static=True))
    valid_idx: tuple[int, int] = dataclasses.field(default=(1, 2), metadata=dict(static=True))
    length_idx: tuple[int, int] = dataclasses.field(default=(2, 3), metadata=dict(static=True))
    samples_per_slot: int = dataclasses.field(default=1, metadata=dict(static=True))

    def copy_to_host_async(self) -> None:
        for x in (self.data, self.logprobs, self.done, self.eos):
            if isinstance(x, jax.Array):
                x.copy_to_host_async()

    def convert_to_numpy(self) -> ResultTokens:
        return ResultTokens(
            *(np.asarray(x) for x in (self.data, self.logprobs, self.done, self.eos))
        )

    def get_result_at_slot(self, slot: int) -> SlotData:
        d = self.data[slot : slot + 1]
        return SlotData(tokens=d[:, 0:1], valid=d[:, 1:2], lengths=d[:, 2])


@jax.tree_util.register_dataclass
@dataclass
class StepResults:
    """n decode steps' outputs, host side after `jax.device_get`: arrays [n, B]."""

    token: jax.Array
    valid: jax.Array  # the slot emitted a token at this step
    logprob_model: jax.Array
    logprob_sampling: jax.Array
    done: jax.Array  # the slot stopped at this step (its token is the last one)
    eos: jax.Array  # ... because the token is an EOS id


# --------------------------------------------------------------------------- pure jitted math


def _prefill_chunk(graphdef, params, cache: KVCache, tokens_1C, start, n_valid):
    """Write prompt tokens [start, start + C) that lie below n_valid into a [1, P] cache."""
    model = nnx.merge(graphdef, params)
    C = tokens_1C.shape[1]
    positions_1C = start + jnp.arange(C, dtype=jnp.int32)[None, :]
    segments_1C = (positions_1C < n_valid).astype(jnp.int32)
    _, cache = model.hidden_states(tokens_1C, positions_1C, segments_1C, cache)
    return cache


def _insert(prefix: Prefix, ds: DecodeState, slot) -> DecodeState:
    S = ds.cache.k_LBSKH.shape[_SEQ_AXIS]
    dt = ds.cache.k_LBSKH.dtype
    at = (0, slot, 0, 0, 0)
    k = jax.lax.dynamic_update_slice(ds.cache.k_LBSKH, prefix.k_LBSKH.astype(dt), at)
    v = jax.lax.dynamic_update_slice(ds.cache.v_LBSKH, prefix.v_LBSKH.astype(dt), at)
    # the budget is capped so that the last fed token still has a cache position
    budget = jnp.minimum(prefix.max_tokens, S - prefix.length)
    return DecodeState(
        cache=KVCache(k, v, ds.cache.lengths_B.at[slot].set(prefix.length)),
        tokens_B=ds.tokens_B.at[slot].set(prefix.token),
        active_B=ds.active_B.at[slot].set(True),
        generated_B=ds.generated_B.at[slot].set(0),
        max_tokens_B=ds.max_tokens_B.at[slot].set(budget),
        temperature_B=ds.temperature_B.at[slot].set(prefix.temperature),
        top_p_B=ds.top_p_B.at[slot].set(prefix.top_p),
        top_k_B=ds.top_k_B.at[slot].set(prefix.top_k),
        seed_B=ds.seed_B.at[slot].set(prefix.seed),
    )


def _release(ds: DecodeState, slot) -> DecodeState:
    return dataclasses.replace(ds, active_B=ds.active_B.at[slot].set(False))


def step_logits(model, ds: DecodeState) -> tuple[jax.Array, KVCache]:
    """fp32 logits [B, V] of every slot's next token, and the cache with the fed token
    written (inactive slots feed segment id 0: nothing is written for them)."""
    active_B1 = ds.active_B[:, None].astype(jnp.int32)
    logits_B1V, cache = model(
        ds.tokens_B[:, None], ds.cache.lengths_B[:, None], active_B1, ds.cache
    )
    return logits_B1V[:, 0], cache


def decode_step(model, ds: DecodeState, eos_E: jax.Array) -> tuple[DecodeState, tuple]:
    """One token for every active slot: forward with the cache, sample, update the state."""
    active_B = ds.active_B
    logits_BV, cache = step_logits(model, ds)
    keys_B = slot_keys(ds.seed_B, ds.generated_B)
    token_B, lp_model_B, lp_sampling_B = sample_tokens(
        logits_BV, ds.temperature_B, ds.top_p_B, ds.top_k_B, keys_B
    )
    generated_B = ds.generated_B + active_B.astype(jnp.int32)
    eos_B = active_B & jnp.any(token_B[:, None] == eos_E[None, :], axis=-1)
    done_B = active_B & (eos_B | (generated_B >= ds.max_tokens_B))
    new = dataclasses.replace(
        ds,
        cache=cache,
        tokens_B=jnp.where(active_B, token_B, ds.tokens_B),
        active_B=active_B & ~done_B,
        generated_B=generated_B,
    )
    return new, (token_B, active_B, lp_model_B, lp_sampling_B, done_B, eos_B, generated_B)


def _generate_steps(graphdef, params, ds: DecodeState, eos_E, n: int):
    model = nnx.merge(graphdef, params)

    def body(ds, _):
        ds, out = decode_step(model, ds, eos_E)
        return ds, out

    ds, (tok, valid, lpm, lps, done, eos, _) = jax.lax.scan(body, ds, None, length=n)
    return ds, StepResults(tok, valid, lpm, lps, done, eos)


def _next_logits(graphdef, params, ds: DecodeState) -> jax.Array:
    return step_logits(nnx.merge(graphdef, params), ds)[0]


def _generate_one(graphdef, params, ds: DecodeState, eos_E):
    model = nnx.merge(graphdef, params)
    ds, (tok, valid, lpm, lps, done, eos, generated) = decode_step(model, ds, eos_E)
    data = jnp.stack([tok, valid.astype(jnp.int32), generated], axis=-1)
    return ds, ResultTokens(data, jnp.stack([lpm, lps], axis=-1), done, eos)


_PREFILL = jax.jit(_prefill_chunk, static_argnums=(0,), donate_argnums=(2,))
_INSERT = jax.jit(_insert, donate_argnums=(1,))
_RELEASE = jax.jit(_release, donate_argnums=(0,))
_STEPS = jax.jit(_generate_steps, static_argnums=(0, 4), donate_argnums=(2,))
_ONE = jax.jit(_generate_one, static_argnums=(0,), donate_argnums=(2,))
_LOGITS = jax.jit(_next_logits, static_argnums=(0,))

# --------------------------------------------------------------------------- engine


def eos_ids_of(model_dir: str | Path | None, model_cfg, tokenizer=None) -> list[int]:
    """EOS ids: config.json's eos_token_id, generation_config.json's, the tokenizer's."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)

    add(getattr(model_cfg, "eos_token_id", None))
    if model_dir is not None:
        gen = Path(model_dir) / "generation_config.json"
        if gen.exists():
            add(json.loads(gen.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return sorted(ids)


class Engine:
    """JetStream's Engine contract over one of our models (see the module docstring).

    `params` is the model's `nnx.State`; the compiled functions merge it with the model's
    graph, so weights can be swapped (`load_params`) without recompiling.
    """

    def __init__(
        self,
        model,
        config: EngineConfig = EngineConfig(),
        eos_ids: Sequence[int] = (),
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.model_cfg = model.cfg
        self._mesh = mesh if mesh is not None else model.mesh
        if self._mesh is None:
            raise ValueError("the engine needs a mesh: build the model with one (load_hf does)")
        self.graphdef, self.params = nnx.split(model)
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self._eos_E = jnp.asarray(self.eos_ids or (-1,), jnp.int32)  # -1 matches no token
        cdt = config.cache_dtype or model.opts.dtype
        self.cache_dtype = jnp.dtype(cdt)
        self._ds_sharding = self._decode_state_sharding()
        gd = self.graphdef
        # module-level jitted functions with the graph as a static argument: engines over
        # the same model and shapes share compilations
        self._prefill_fn = functools.partial(_PREFILL, gd)
        self._steps_fn = functools.partial(_STEPS, gd)
        self._one_fn = functools.partial(_ONE, gd)
        self._logits_fn = functools.partial(_LOGITS, gd)
        self._zeros_fns: dict[tuple, Any] = {}

    # ---- properties of the contract

    @property
    def max_concurrent_decodes(self) -> int:
        return self.config.max_concurrent_decodes

    @property
    def max_prefill_length(self) -> int:
        return self.config.max_prefill_length

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def colocated_cpus(self) -> None:
        return None

    @property
    def cache_length(self) -> int:
        return self.config.cache_length

    def load_params(self, *args, **kwargs):
        return self.params

    # ---- shardings

    def _cache_sharding(self, batch: int, length: int) -> NamedSharding:
        c = self.model_cfg
        shape = (c.num_hidden_layers, batch, length, c.num_key_value_heads, c.head_dim)
        return named_sharding(CACHE_AXES, shape, self._mesh)

    def _decode_state_sharding(self) -> DecodeState:
        B = self.max_concurrent_decodes
        per_slot = named_sharding(("act_batch",), (B,), self._mesh)
        kv = self._cache_sharding(B, self.cache_length)
        return DecodeState(KVCache(kv, kv, per_slot), *([per_slot] * 8))

    def get_prefix_destination_sharding(self) -> Prefix:
        """Where a prefix must live to be inserted: kv heads over `tensor`, the rest
        replicated (one prompt has no batch dim to split)."""
        kv = self._cache_sharding(1, self.max_prefill_length)
        scalar = NamedSharding(self._mesh, PartitionSpec())
        return Prefix(kv, kv, *([scalar] * 7))

    # ---- the contract

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        """All slots empty; the cache preallocated and sharded (never gathered on one chip)."""
        B = self.max_concurrent_decodes
        # every leaf its own buffer: the decode step donates the state, and a buffer donated
        # twice in one call is an error
        k, v = self._zeros(B, self.cache_length), self._zeros(B, self.cache_length)
        i32 = lambda: jnp.zeros((B,), jnp.int32)  # noqa: E731
        f32 = lambda: jnp.ones((B,), jnp.float32)  # noqa: E731
        ds = DecodeState(
            KVCache(k, v, i32()),
            i32(),
            jnp.zeros((B,), bool),
            i32(),
            i32(),
            f32(),
            f32(),
            i32(),
            jnp.zeros((B,), jnp.uint32),
        )
        return jax.device_put(ds, self._ds_sharding)

    def _zeros(self, batch: int, length: int) -> jax.Array:
        """A zero cache array [L, batch, length, K, H], created directly in its sharding."""
        key = (batch, length)
        if key not in self._zeros_fns:
            c = self.model_cfg
            shape = (c.num_hidden_layers, batch, length, c.num_key_value_heads, c.head_dim)
            self._zeros_fns[key] = jax.jit(
                functools.partial(jnp.zeros, shape, self.cache_dtype),
                out_shardings=self._cache_sharding(batch, length),
            )
        return self._zeros_fns[key]()

    def bucket_for(self, n: int) -> int:
        for b in self.config.buckets():
            if b >= n:
                return b
        raise ValueError(f"{n} tokens exceed max_prefill_length={self.max_prefill_length}")

    def validate_prompt(self, n_tokens: int) -> None:
        """ValueError for a prompt the engine cannot take (what the stage records as reason)."""
        if n_tokens < 1:
            raise ValueError("empty prompt: at least one token is needed")
        if n_tokens > self.max_prefill_length:
            raise ValueError(
                f"prompt_too_long: {n_tokens} tokens > max_prefill_length={self.max_prefill_length}"
            )

    def prefill(
        self,
        *,
        params=None,
        existing_prefix: Prefix | None = None,
        padded_tokens,
        true_length: int,
        sampling: SamplingParams | None = None,
    ) -> Prefix:
        """The KV cache of `padded_tokens[:true_length]`, padded to a bucket.

        `sampling` defaults to greedy with the full decode budget (what JetStream's
        orchestrator gets: it passes no sampling parameters).
        """
        if existing_prefix is not None:
            raise NotImplementedError("existing_prefix (prefix caching) is not supported")
        params = self.params if params is None else params
        true_length = int(true_length)
        self.validate_prompt(true_length)
        tokens = np.asarray(jax.device_get(padded_tokens)).reshape(-1)[:true_length]
        n_cache = true_length - 1  # the last token is fed by the first decode step
        P = self.bucket_for(max(n_cache, 1))
        # a power of two, so it divides the bucket and the prefix never outgrows the slot
        chunk = min(1 << (self.config.prefill_chunk.bit_length() - 1), P)
        cache = KVCache(self._zeros(1, P), self._zeros(1, P), jnp.zeros((1,), jnp.int32))
        padded = np.zeros((P,), np.int32)
        padded[:n_cache] = tokens[:n_cache]
        for start in range(0, n_cache, chunk):
            cache = self._prefill_fn(
                params,
                cache,
                jnp.asarray(padded[None, start : start + chunk]),
                jnp.int32(start),
                jnp.int32(n_cache),
            )
        sp = sampling or SamplingParams(temperature=0.0, max_tokens=self.config.max_decode_length)
        return Prefix(
            cache.k_LBSKH,
            cache.v_LBSKH,
            jnp.asarray(n_cache, jnp.int32),
            jnp.asarray(int(tokens[-1]), jnp.int32),
            **_sampling_arrays(sp),
        )

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Copy `prefix` into `slot` (donates `decode_state`; the prefix stays valid, so one
        prefix can fill several slots)."""
        return _INSERT(prefix, decode_state, jnp.int32(slot))

    def release(self, decode_state: DecodeState, slot: int) -> DecodeState:
        """Stop a slot on device (e.g. the driver found a stop string in its text)."""
        return _RELEASE(decode_state, jnp.int32(slot))

    def generate(self, params, decode_state: DecodeState) -> tuple[DecodeState, ResultTokens]:
        """One decode step for all slots (JetStream's contract)."""
        params = self.params if params is None else params
        return self._one_fn(params, decode_state, self._eos_E)

    def next_logits(self, decode_state: DecodeState, params=None) -> jax.Array:
        """fp32 logits [B, V] the next decode step samples from; the state is unchanged."""
        return self._logits_fn(self.params if params is None else params, decode_state)

    def generate_steps(
        self, params, decode_state: DecodeState, n: int | None = None
    ) -> tuple[DecodeState, StepResults]:
        """`n` decode steps (default `config.decode_steps`) in one call: arrays [n, B]."""
        params = self.params if params is None else params
        return self._steps_fn(params, decode_state, self._eos_E, n or self.config.decode_steps)
