"""Per-slot next-token sampling: temperature, top-k, top-p, greedy, per-request seeds.

Consumes fp32 logits [B, V] (one row per decode slot) and per-slot sampling parameters;
produces the chosen token per slot and two log-probs of it:
- `logprob_model`: log softmax(logits)[token], the model's own distribution at temperature 1
  (what DAS compares as p_T, whatever the sampling settings were);
- `logprob_sampling`: the log-probability under the distribution actually sampled from
  (temperature, then top-k, then top-p on the renormalised top-k distribution, as vLLM and
  transformers order them); 0 for greedy or top-1, where that distribution is a point mass.

Randomness: the key of a slot's draw is `fold_in(key(seed), token_index)`, a function of the
request's seed and the index of the token in its response only. A request therefore samples
the same tokens whatever slot it occupies, whatever else is decoding beside it and in
whatever order requests arrive (the driver's invariance tests rely on this).

The draw is Gumbel-max over vocabulary ids: noise is indexed by token id, the truncation
(top-k/top-p) only masks logits, so a row that truncates nothing draws exactly the token it
would draw on the path without truncation; the full sort that top-p needs runs only when some
slot truncates (`lax.cond`).

Shape letters: B slots, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

MAX_SEED = 2**32  # seeds are uint32 (jax.random.key's range); callers reduce larger ones


@dataclass(frozen=True)
class SamplingParams:
    """How one response is sampled. temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()  # stop strings (host side); EOS ids come from the model

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, int | float) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.seed, int) or not (0 <= self.seed < MAX_SEED):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def slot_keys(seed_B: jax.Array, index_B: jax.Array) -> jax.Array:
    """PRNG key per slot from (request seed, token index): independent of slot and order."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(
        seed_B.astype(jnp.uint32), index_B.astype(jnp.int32)
    )


def _pick(x_BV: jax.Array, token_B: jax.Array) -> jax.Array:
    """x[b, token[b]] by compare-and-sum: stays a local reduction when V is sharded."""
    hit_BV = jnp.arange(x_BV.shape[-1], dtype=jnp.int32)[None, :] == token_B[:, None]
    return jnp.sum(jnp.where(hit_BV, x_BV, 0.0), axis=-1)


def truncation_mask(scaled_BV: jax.Array, top_p_B: jax.Array, top_k_B: jax.Array) -> jax.Array:
    """Tokens kept by top-k then top-p, by rank in a stable descending sort of each row.

    Top-k keeps ranks < k (k = 0: all). Top-p then keeps the smallest prefix of the sorted,
    top-k-renormalised distribution whose mass reaches p: a token is kept when the mass
    strictly before it is < p. The most likely token is always kept.
    """
    B, V = scaled_BV.shape
    order_BV = jnp.argsort(-scaled_BV, axis=-1, stable=True)
    sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
    rank_V = jnp.arange(V, dtype=jnp.int32)
    k_B = jnp.where(top_k_B > 0, top_k_B, V)
    in_k_BV = rank_V[None, :] < k_B[:, None]
    probs_BV = jax.nn.softmax(jnp.where(in_k_BV, sorted_BV, -jnp.inf), axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    # p = 1 keeps everything: an fp32 cumsum can reach 1.0 before the last tokens
    in_p_BV = (before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
    keep_sorted_BV = in_k_BV & (in_p_BV | (rank_V[None, :] == 0))
    rows_B1 = jnp.arange(B)[:, None]
    return jnp.zeros((B, V), bool).at[rows_B1, order_BV].set(keep_sorted_BV)


def sample_tokens(
    logits_BV: jax.Array,
    temperature_B: jax.Array,
    top_p_B: jax.Array,
    top_k_B: jax.Array,
    keys_B: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token_B, logprob_model_B, logprob_sampling_B); see the module docstring."""
    logits_BV = logits_BV.astype(jnp.float32)
    V = logits_BV.shape[-1]
    logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    greedy_B = temperature_B <= 0
    scaled_BV = logits_BV / jnp.where(greedy_B, 1.0, temperature_B)[:, None]
    truncates_B = ((top_p_B < 1.0) | (top_k_B > 0)) & ~greedy_B
    keep_BV = jax.lax.cond(
        jnp.any(truncates_B),
        lambda: truncation_mask(scaled_BV, top_p_B, top_k_B) | ~truncates_B[:, None],
        lambda: jnp.ones(logits_BV.shape, bool),
    )
    masked_BV = jnp.where(keep_BV, scaled_BV, -jnp.inf)
    gumbel_BV = jax.vmap(lambda k: jax.random.gumbel(k, (V,), jnp.float32))(keys_B)
    drawn_B = jnp.argmax(masked_BV + gumbel_BV, axis=-1).astype(jnp.int32)
    token_B = jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), drawn_B)
    lp_model_B = _pick(logp_BV, token_B)
    lp_sampling_B = _pick(jax.nn.log_softmax(masked_BV, axis=-1), token_B)
    # a point mass (greedy, or a truncation to one token) has log-prob exactly 0
    single_B = greedy_B | (jnp.sum(keep_BV, axis=-1) == 1)
    return token_B, lp_model_B, jnp.where(single_B, 0.0, lp_sampling_B)
