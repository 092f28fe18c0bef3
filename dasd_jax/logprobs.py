"""Token log-probabilities without ever holding [batch, seq, vocab] fp32 logits.

Consumes final hidden states [B, T, D], the output projection [D, V] and target ids [B, T];
produces log p(target_t | context) per position (and optionally the entropy of the
predictive distribution). This is the kernel of DAS scoring (student and teacher log-probs)
and of the SFT loss (`-mean(logp * loss_mask)`).

The sequence is cut into chunks of C positions and a `lax.scan` projects one chunk at a time:
peak temporary memory is O(B * C * V) instead of O(B * T * V) (at B=8, T=4096 and Qwen's
151,936-entry vocabulary the full fp32 array alone would be 20 GB). The chunk body is
rematerialised, so the backward pass of the SFT loss has the same bound.

The target logit is picked with a compare-and-sum over the vocab rather than a gather, which
stays correct when the vocab dim is sharded over the `tensor` mesh axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunk_stats(h_BCD, unembed_DV, targets_BC, with_entropy: bool):
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, unembed_DV, preferred_element_type=jnp.float32)
    lse_BC = jax.nn.logsumexp(logits_BCV, axis=-1)
    vocab_V = jnp.arange(logits_BCV.shape[-1], dtype=targets_BC.dtype)
    hit_BCV = vocab_V[None, None, :] == targets_BC[..., None]
    target_logit_BC = jnp.sum(jnp.where(hit_BCV, logits_BCV, 0.0), axis=-1)
    logp_BC = target_logit_BC - lse_BC
    if not with_entropy:
        return logp_BC, None
    probs_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    entropy_BC = lse_BC - jnp.sum(probs_BCV * logits_BCV, axis=-1)
    return logp_BC, entropy_BC


@functools.partial(jax.jit, static_argnames=("chunk_size", "with_entropy"))
def token_logprobs(
    hidden_BTD: jax.Array,
    unembed_DV: jax.Array,
    targets_BT: jax.Array,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """log softmax(hidden @ unembed)[target] per position, fp32 [B, T] (and entropy [B, T]).

    `hidden_BTD[:, t]` must be the state that predicts `targets_BT[:, t]` (callers shift).
    """
    B, T, D = hidden_BTD.shape
    C = min(chunk_size, T)
    n_chunks = -(-T // C)
    pad = n_chunks * C - T
    if pad:
        hidden_BTD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0)))
        targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    h_nBCD = hidden_BTD.reshape(B, n_chunks, C, D).transpose(1, 0, 2, 3)
    t_nBC = targets_BT.astype(jnp.int32).reshape(B, n_chunks, C).transpose(1, 0, 2)

    @jax.checkpoint
    def body(_, xs):
        h_BCD, t_BC = xs
        return None, _chunk_stats(h_BCD, unembed_DV, t_BC, with_entropy)

    _, (logp_nBC, ent_nBC) = jax.lax.scan(body, None, (h_nBCD, t_nBC))
    logp_BT = logp_nBC.transpose(1, 0, 2).reshape(B, n_chunks * C)[:, :T]
    if not with_entropy:
        return logp_BT, None
    return logp_BT, ent_nBC.transpose(1, 0, 2).reshape(B, n_chunks * C)[:, :T]


def next_token_targets(
    tokens_BT: jax.Array, positions_BT: jax.Array, segment_ids_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Targets for 'hidden at t predicts token t+1', and where that prediction is valid.

    Returns (targets_BT, valid_BT): targets[:, t] = tokens[:, t+1]; valid where t+1 is in the
    same (non-padding) document as t. The last position of every row is invalid.
    """
    nxt = lambda a: jnp.pad(a[:, 1:], ((0, 0), (0, 1)))  # noqa: E731
    targets = nxt(tokens_BT)
    same_doc = (nxt(segment_ids_BT) == segment_ids_BT) & (segment_ids_BT != 0)
    follows = nxt(positions_BT) == positions_BT + 1
    valid = same_doc & follows
    valid = valid.at[:, -1].set(False)
    return targets, valid


def sequence_logprobs(
    model,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
    *,
    chunk_size: int = 1024,
    with_entropy: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """log p(y_t | y_<t) for every position t of every row, fp32 [B, T].

    Position t holds the log-prob of token t given the tokens before it in its document;
    the first token of each document (and padding) gets 0. Entropy (optional) is that of
    the distribution which predicted token t, aligned the same way.
    """
    B, T = tokens_BT.shape
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    hidden_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT)
    targets, valid = next_token_targets(tokens_BT, positions_BT, segment_ids_BT)
    logp, ent = token_logprobs(
        hidden_BTD, model.unembed_DV(), targets, chunk_size=chunk_size, with_entropy=with_entropy
    )
    shift = lambda a: jnp.pad(jnp.where(valid, a, 0.0)[:, :-1], ((0, 0), (1, 0)))  # noqa: E731
    return shift(logp), (shift(ent) if with_entropy else None)
