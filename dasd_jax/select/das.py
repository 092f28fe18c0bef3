"""Divergence-Aware Sampling (DAS): score candidates by sentence type and pick per prompt.

Consumes, per candidate response: its text, the teacher's and the student's per-token
log-probs with each tokenizer's character offsets into that text (from sampling and the
``score`` stage), or already-computed ``ResponseStats``. Produces per-sentence probabilities
and types, per-response counts (``ResponseStats``) and, across a prompt's candidates, the kept
ones (``select``), with a report of the prompts that kept nothing.

The method (paper step 3; the classification is from the companion provenance paper):

* sentence probability under a model = geometric mean of its token probabilities in the
  sentence = ``exp(mean log p)``; each model uses its own tokenizer, joined through characters;
* Teacher sentence iff ``p_T - p_S > beta``; Student sentence iff ``p_S - p_T > beta``; else
  Shared. ``beta`` is an absolute difference of probabilities in [0, 1] (0.1 was best);
* keep, per prompt, the candidate with the most Teacher sentences.

Choices the paper leaves open, made here and exposed in ``SelectConfig``:

* inequalities are strict: a difference equal to ``beta`` is Shared. Probabilities differ in
  the last bits from the decimals a person writes, so "equal" means within 1e-9;
* a sentence with no token on either side has no probability there: it is "unscored" and
  excluded from every count and from the ratio's denominator;
* the ``<think>`` / ``</think>`` tag sentences are never counted: they are format, not
  content, and the teacher never wrote them (gpt-oss writes harmony channel markers);
* ``segments``: whether sentences of the thinking part, the answer, or both are counted;
* ``rule``, ``top_k``, the tie-break and the ``budget`` semantics (see ``select``).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal, get_args

import numpy as np

from dasd_jax.select.sentences import (
    THINK_CLOSE,
    THINK_OPEN,
    Span,
    SplitterConfig,
    assign_tokens,
    split_sentences,
)

Rule = Literal[
    "max_teacher_count",
    "max_teacher_ratio",
    "max_teacher_count_for_length",
    "longest",
    "random",
    "min_teacher_count",
]
RULES: tuple[str, ...] = get_args(Rule)
NEEDS_STATS = ("max_teacher_count", "max_teacher_ratio", "max_teacher_count_for_length",
                "min_teacher_count")  # fmt: skip
Segments = Literal["all", "think_only", "answer_only"]

# Slack on the strict inequalities: 0.4 - 0.3 is 0.10000000000000003 in binary floating point,
# which a person means as "exactly beta" (Shared).
_EPS = 1e-9


class SentenceKind(IntEnum):
    """Type of a sentence. UNSCORED: no token of one model falls in it."""

    UNSCORED = -1
    SHARED = 0
    TEACHER = 1
    STUDENT = 2


TEACHER, STUDENT, SHARED, UNSCORED = (
    SentenceKind.TEACHER,
    SentenceKind.STUDENT,
    SentenceKind.SHARED,
    SentenceKind.UNSCORED,
)


@dataclass(frozen=True)
class SelectConfig:
    """Options of DAS selection (config keys ``select.<field>``).

    rule: how a prompt's candidates are ranked. ``max_teacher_count`` (the paper's; best in the
      ablation), ``max_teacher_ratio``, ``longest`` (student tokens; characters for a prompt
      where any candidate lacks a student token count), ``random`` (seeded, see ``select``),
      ``min_teacher_count`` (the ablation's worst, for comparisons),
      ``max_teacher_count_for_length`` (a length-matched DAS, a control: the Teacher sentences
      beyond what the candidate's length predicts, ``n_teacher - b * length``, where ``b`` is
      the least-squares slope of Teacher count on length over every scored candidate of the
      run; among candidates of equal length it is ``max_teacher_count``, and a candidate that
      is only longer gains nothing on average).
    beta: threshold on ``|p_T - p_S|`` (absolute probabilities in [0, 1]).
    top_k: candidates kept per prompt (the paper keeps one, implicitly).
    seed: for ``random`` and the ``budget`` prompt subset.
    budget: total number of samples to keep across prompts; None keeps every prompt's top_k.
    budget_mode: ``prompts`` (default) takes a seeded random subset of prompts, the same subset
      for every rule, so DAS and random differ only in which candidate they keep (the paper's
      "DAS vs random at 50K" comparison); ``score`` keeps the globally best-ranked samples
      under ``rule`` (for ``random`` that is a seeded random subset of samples).
    segments: which sentences count: ``all``, ``think_only`` (before ``</think>``) or
      ``answer_only`` (after it). The paper does not say; ``all`` treats them alike.
    splitter: the sentence splitter.
    """

    rule: Rule = "max_teacher_count"
    beta: float = 0.1
    top_k: int = 1
    seed: int = 0
    budget: int | None = None
    budget_mode: Literal["prompts", "score"] = "prompts"
    segments: Segments = "all"
    splitter: SplitterConfig = field(default_factory=SplitterConfig)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"select.rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 <= self.beta < 1.0:
            raise ValueError(f"select.beta must be in [0, 1), got {self.beta}")
        if self.top_k < 1:
            raise ValueError(f"select.top_k must be >= 1, got {self.top_k}")
        if self.budget is not None and self.budget < 0:
            raise ValueError(f"select.budget must be >= 0 or None, got {self.budget}")
        if self.budget_mode not in ("prompts", "score"):
            raise ValueError(
                f"select.budget_mode must be prompts or score, got {self.budget_mode!r}"
            )
        if self.segments not in ("all", "think_only", "answer_only"):
            raise ValueError(
                f"select.segments must be all, think_only or answer_only, got {self.segments!r}"
            )


# ----------------------------------------------------------------------------- scoring


def sentence_logprob_means(
    token_logprobs: Sequence[float] | np.ndarray,
    token_sentence_ids: Sequence[int] | np.ndarray,
    n_sentences: int,
) -> np.ndarray:
    """Mean token log-prob per sentence, ``float64[n_sentences]``; NaN for a sentence with no
    tokens. Tokens with sentence id -1 (outside every sentence) and NaN log-probs (a server
    may return null for a token) are ignored. ``exp`` of it is the sentence probability."""
    logprobs = np.asarray(token_logprobs, dtype=np.float64)
    ids = np.asarray(token_sentence_ids, dtype=np.int64)
    if logprobs.shape != ids.shape or logprobs.ndim != 1:
        raise ValueError(
            f"token_logprobs {logprobs.shape} and token_sentence_ids {ids.shape} must be "
            "1-D and of the same length"
        )
    if np.any(ids >= n_sentences):
        raise ValueError(f"a token sentence id is >= n_sentences={n_sentences}")
    keep = (ids >= 0) & ~np.isnan(logprobs)
    # float64 sums: a 2,000-token sentence of log-probs near -1e-3 loses nothing.
    sums = np.bincount(ids[keep], weights=logprobs[keep], minlength=n_sentences)
    counts = np.bincount(ids[keep], minlength=n_sentences)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def sentence_probs(
    token_logprobs: Sequence[float] | np.ndarray,
    token_sentence_ids: Sequence[int] | np.ndarray,
    n_sentences: int,
) -> np.ndarray:
    """Geometric mean of token probabilities per sentence, ``exp(mean log p)``; NaN if empty."""
    return np.exp(sentence_logprob_means(token_logprobs, token_sentence_ids, n_sentences))


def classify(
    p_teacher: Sequence[float] | np.ndarray,
    p_student: Sequence[float] | np.ndarray,
    beta: float = 0.1,
) -> np.ndarray:
    """``int8`` array of ``SentenceKind``: TEACHER iff p_T - p_S > beta, STUDENT iff
    p_S - p_T > beta (strict, within 1e-9), else SHARED; UNSCORED where either is NaN."""
    p_t = np.asarray(p_teacher, dtype=np.float64)
    p_s = np.asarray(p_student, dtype=np.float64)
    delta = p_t - p_s
    kinds = np.full(delta.shape, SHARED, dtype=np.int8)
    kinds[delta > beta + _EPS] = TEACHER
    kinds[-delta > beta + _EPS] = STUDENT
    kinds[np.isnan(delta)] = UNSCORED
    return kinds


def counted_sentences(text: str, spans: Sequence[Span], segments: Segments = "all") -> np.ndarray:
    """``bool[S]``: which sentences count under ``segments``. Tag-only sentences never count.

    The thinking part is everything before the first ``</think>``; the answer is everything
    from the end of that tag. A response without ``</think>`` is all thinking (truncated).
    """
    close = text.find(THINK_CLOSE)
    answer_from = len(text) if close < 0 else close + len(THINK_CLOSE)
    mask = np.zeros(len(spans), dtype=bool)
    for i, (start, end) in enumerate(spans):
        body = text[start:end].strip()
        if not body or body in (THINK_OPEN, THINK_CLOSE):
            continue
        if segments == "think_only":
            mask[i] = close < 0 or start < close
        elif segments == "answer_only":
            mask[i] = start >= answer_from
        else:
            mask[i] = True
    return mask


@dataclass(frozen=True)
class ResponseStats:
    """Sentence counts of one response.

    n_sentences: all sentences of the response; n_counted: those in the counted segments (no
    tags); n_unscored: counted ones with no token on one side (excluded from the rest);
    teacher_ratio: n_teacher / (n_teacher + n_student + n_shared), 0.0 when that is 0.
    """

    n_sentences: int
    n_counted: int
    n_teacher: int
    n_student: int
    n_shared: int
    n_unscored: int
    teacher_ratio: float


def response_stats(
    kinds: Sequence[int] | np.ndarray, counted: Sequence[bool] | np.ndarray | None = None
) -> ResponseStats:
    """Count sentence kinds (from ``classify``) over the ``counted`` sentences (default all)."""
    kinds = np.asarray(kinds, dtype=np.int64)
    mask = np.ones(kinds.shape, bool) if counted is None else np.asarray(counted, dtype=bool)
    if mask.shape != kinds.shape:
        raise ValueError(f"counted {mask.shape} and kinds {kinds.shape} differ in shape")
    k = kinds[mask]
    n_teacher = int(np.sum(k == TEACHER))
    n_student = int(np.sum(k == STUDENT))
    n_shared = int(np.sum(k == SHARED))
    n_scored = n_teacher + n_student + n_shared
    return ResponseStats(
        n_sentences=int(kinds.size),
        n_counted=int(k.size),
        n_teacher=n_teacher,
        n_student=n_student,
        n_shared=n_shared,
        n_unscored=int(k.size) - n_scored,
        teacher_ratio=n_teacher / n_scored if n_scored else 0.0,
    )


@dataclass(frozen=True)
class ScoredResponse:
    """Per-sentence detail of one response (for reports and plots) and its counts."""

    spans: list[Span]
    p_teacher: np.ndarray  # float64[S], NaN where no teacher token
    p_student: np.ndarray  # float64[S], NaN where no student token
    kinds: np.ndarray  # int8[S], SentenceKind
    counted: np.ndarray  # bool[S]
    stats: ResponseStats


def score_response(
    text: str,
    teacher_offsets: Sequence[tuple[int, int]] | np.ndarray,
    teacher_logprobs: Sequence[float] | np.ndarray,
    student_offsets: Sequence[tuple[int, int]] | np.ndarray,
    student_logprobs: Sequence[float] | np.ndarray,
    cfg: SelectConfig | None = None,
) -> ScoredResponse:
    """Split ``text``, map both models' tokens to sentences, classify and count.

    Offsets are characters of ``text`` for each model's tokens of it (the teacher's gpt-oss
    tokens, the student's Qwen tokens), aligned with the log-prob lists.
    """
    cfg = cfg or SelectConfig()
    spans = split_sentences(text, cfg.splitter)
    n = len(spans)
    p_t = sentence_probs(teacher_logprobs, assign_tokens(teacher_offsets, spans, text), n)
    p_s = sentence_probs(student_logprobs, assign_tokens(student_offsets, spans, text), n)
    kinds = classify(p_t, p_s, cfg.beta)
    counted = counted_sentences(text, spans, cfg.segments)
    return ScoredResponse(spans, p_t, p_s, kinds, counted, response_stats(kinds, counted))


# ---------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class Candidate:
    """One candidate response of a prompt, as selection sees it.

    index: the candidate's stable number within its prompt (e.g. its sample number), the last
      tie-break. n_chars / n_student_tokens: lengths (``longest`` and the "shorter" tie-break).
    stats: None is allowed for ``random`` and ``longest`` (no scoring needed); counts then read
      as 0 in the tie-break. rejected: the first filter reason, None if the candidate passed.
    """

    prompt_id: str
    index: int
    n_chars: int
    n_student_tokens: int | None = None
    stats: ResponseStats | None = None
    rejected: str | None = None


@dataclass(frozen=True)
class Selection:
    """What ``select`` kept, best first within each prompt, prompts sorted by id.

    empty_prompts: prompts whose every candidate was rejected by a filter (they yield nothing).
    over_budget_prompts: prompts with a kept candidate left out by the budget.
    """

    selected: list[Candidate]
    empty_prompts: list[str]
    over_budget_prompts: list[str]
    n_prompts: int
    n_candidates: int
    n_rejected: int


def stable_hash(*parts: object) -> int:
    """64-bit hash of ``parts`` that is the same in every process and run (unlike ``hash()``,
    which is salted per process), so seeded choices do not depend on order or sharding."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _rank_key(
    c: Candidate, rule: Rule, length_by_tokens: bool, seed: int, slope: float = 0.0
) -> tuple:
    """Sort key (ascending = better). After the rule's primary score the tie-break is fixed:
    more Teacher sentences, then fewer Student sentences, then shorter, then lower index.
    slope: Teacher sentences per unit of length, for ``max_teacher_count_for_length``."""
    s = c.stats
    n_teacher = s.n_teacher if s else 0
    n_student = s.n_student if s else 0
    length = c.n_student_tokens if length_by_tokens else c.n_chars
    if rule in NEEDS_STATS and s is None:
        raise ValueError(
            f"rule {rule!r} needs ResponseStats: candidate {c.index} of prompt "
            f"{c.prompt_id!r} was not scored"
        )
    if rule == "max_teacher_count":
        primary: tuple = (-n_teacher,)
    elif rule == "max_teacher_ratio":
        primary = (-s.teacher_ratio,)
    elif rule == "min_teacher_count":
        primary = (n_teacher,)
    elif rule == "max_teacher_count_for_length":
        primary = (-(n_teacher - slope * length),)
    elif rule == "longest":
        primary = (-length,)
    else:  # random: a per-candidate stable hash is a seeded permutation that does not
        # depend on the order in which candidates arrive
        primary = (stable_hash(seed, c.prompt_id, c.index),)
    return (*primary, -n_teacher, n_student, length, c.index)


def rank_candidates(
    candidates: Sequence[Candidate],
    cfg: SelectConfig,
    slope: float | None = None,
    by_tokens: bool | None = None,
) -> list[Candidate]:
    """The unrejected candidates of one prompt, best first under ``cfg.rule``. slope: for
    ``max_teacher_count_for_length``, the pool's (``length_slope``), in the length unit
    ``by_tokens`` (None: these candidates' slope, and tokens if they all have a count)."""
    kept = [c for c in candidates if c.rejected is None]
    # Lengths must be comparable within a prompt: tokens only if every candidate has them.
    if by_tokens is None:
        by_tokens = all(c.n_student_tokens is not None for c in kept)
    if slope is None:
        slope = length_slope(kept, by_tokens) if cfg.rule == "max_teacher_count_for_length" else 0
    return sorted(kept, key=lambda c: _rank_key(c, cfg.rule, by_tokens, cfg.seed, slope))


def length_slope(candidates: Sequence[Candidate], by_tokens: bool) -> float:
    """Least-squares slope of the Teacher-sentence count on length (student tokens, or
    characters) over the scored, unrejected candidates; 0 when every length is the same."""
    pts = [
        (c.n_student_tokens if by_tokens else c.n_chars, c.stats.n_teacher)
        for c in candidates
        if c.rejected is None and c.stats is not None
    ]
    if len(pts) < 2:
        return 0.0
    x, y = np.asarray(pts, float).T
    var = float(((x - x.mean()) ** 2).sum())
    return float(((x - x.mean()) * (y - y.mean())).sum() / var) if var > 0 else 0.0


def select(candidates: Iterable[Candidate], cfg: SelectConfig | None = None) -> Selection:
    """Keep the ``top_k`` best candidates of each prompt, then apply the ``budget``.

    Budget semantics (``budget`` samples in all):
    * ``budget_mode="prompts"``: prompts with at least one kept candidate are ordered by
      ``stable_hash(seed, prompt_id)`` and taken in that order until the budget is full (the
      last prompt may contribute fewer than top_k, its best ones). The subset depends only on
      seed and prompt ids, so every rule sees the same prompts: only the choice differs.
    * ``budget_mode="score"``: all kept samples are ranked together by ``rule``'s key (with
      the same tie-break, then prompt id) and the best ``budget`` are kept.
    """
    cfg = cfg or SelectConfig()
    by_prompt: dict[str, list[Candidate]] = defaultdict(list)
    n_candidates = n_rejected = 0
    for c in candidates:
        by_prompt[c.prompt_id].append(c)
        n_candidates += 1
        n_rejected += c.rejected is not None
    for pid, group in by_prompt.items():
        if len({c.index for c in group}) != len(group):
            raise ValueError(f"prompt {pid!r} has two candidates with the same index")

    every = [c for group in by_prompt.values() for c in group if c.rejected is None]
    # One length unit for the whole pool: tokens only if every kept sample has them.
    pool_by_tokens = all(c.n_student_tokens is not None for c in every)
    slope = (
        length_slope(every, pool_by_tokens) if cfg.rule == "max_teacher_count_for_length" else 0.0
    )
    chosen: dict[str, list[Candidate]] = {}
    empty: list[str] = []
    for pid in sorted(by_prompt):
        # the pool's length unit for the slope; every other rule compares within the prompt
        unit = pool_by_tokens if cfg.rule == "max_teacher_count_for_length" else None
        ranked = rank_candidates(by_prompt[pid], cfg, slope, unit)[: cfg.top_k]
        if ranked:
            chosen[pid] = ranked
        else:
            empty.append(pid)

    over: list[str] = []
    if cfg.budget is not None:
        if cfg.budget_mode == "prompts":
            order = sorted(chosen, key=lambda pid: (stable_hash(cfg.seed, pid), pid))
            left = cfg.budget
            for pid in order:
                take = min(left, len(chosen[pid]))
                left -= take
                if take == 0:
                    over.append(pid)
                    del chosen[pid]
                else:
                    chosen[pid] = chosen[pid][:take]
        else:
            pool = []
            # One length unit across prompts: tokens only if every kept sample has them.
            by_tokens = all(c.n_student_tokens is not None for g in chosen.values() for c in g)
            for pid, group in chosen.items():
                for c in group:
                    key = _rank_key(c, cfg.rule, by_tokens, cfg.seed, slope)
                    pool.append((key[:-1], pid, c.index, c))
            pool.sort(key=lambda item: item[:3])
            keep = {(pid, idx) for _, pid, idx, _ in pool[: cfg.budget]}
            for pid in list(chosen):
                chosen[pid] = [c for c in chosen[pid] if (pid, c.index) in keep]
                if not chosen[pid]:
                    over.append(pid)
                    del chosen[pid]
        over.sort()

    selected = [c for pid in sorted(chosen) for c in chosen[pid]]
    return Selection(
        selected=selected,
        empty_prompts=empty,
        over_budget_prompts=over,
        n_prompts=len(by_prompt),
        n_candidates=n_candidates,
        n_rejected=n_rejected,
    )
