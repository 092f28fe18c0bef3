"""Select (paper steps 3 and 4): filter candidate responses and keep, per prompt, the ones
richest in Teacher sentences (Divergence-Aware Sampling).

``sentences`` splits responses and maps tokens to sentences, ``das`` scores and selects,
``filters`` rejects malformed, over-long, repetitive or (optionally) wrong responses.
"""

from dasd_jax.select.das import (
    Candidate,
    ResponseStats,
    ScoredResponse,
    SelectConfig,
    Selection,
    SentenceKind,
    classify,
    counted_sentences,
    rank_candidates,
    response_stats,
    score_response,
    select,
    sentence_logprob_means,
    sentence_probs,
    stable_hash,
)
from dasd_jax.select.filters import (
    FilterConfig,
    FilterInput,
    apply_filters,
    check_length,
    check_repetition,
    check_structure,
    count_reasons,
    extract_final_answer,
    filter_batch,
    harmony_to_think,
    map_with_timeout,
    think_to_harmony,
    verify_answer,
)
from dasd_jax.select.sentences import SplitterConfig, assign_tokens, split_sentences

__all__ = [
    "Candidate",
    "FilterConfig",
    "FilterInput",
    "ResponseStats",
    "ScoredResponse",
    "SelectConfig",
    "Selection",
    "SentenceKind",
    "SplitterConfig",
    "apply_filters",
    "assign_tokens",
    "check_length",
    "check_repetition",
    "check_structure",
    "classify",
    "count_reasons",
    "counted_sentences",
    "extract_final_answer",
    "filter_batch",
    "harmony_to_think",
    "map_with_timeout",
    "rank_candidates",
    "response_stats",
    "score_response",
    "select",
    "sentence_logprob_means",
    "sentence_probs",
    "split_sentences",
    "stable_hash",
    "think_to_harmony",
    "verify_answer",
]
