"""Pure pieces of the mixed-policy stage: which questions, how long the student may answer,
where its answer is cut, and the prefix that is kept.

Consumes question keys, token counts, a student answer as token byte pieces, and a seed;
produces:
- `choose_questions(keys, n, seed)`: a seeded, reproducible sample of n unique questions
  (independent of the order the keys came in);
- `student_cap(teacher_tokens, factor)`: the student's budget, ceil(factor x teacher tokens);
- `cut_interval(L, low, high, min_tokens)`: the token counts k strictly inside (low L, high L);
- `clean_boundaries(pieces)`: where a cut leaves whole UTF-8 characters on both sides;
- `sentence_boundaries(text, offsets, ...)`: token boundaries that are sentence boundaries;
- `choose_cut(...)`: k drawn uniformly from the interval with an RNG keyed by (seed, question
  id), so a resumed or re-run stage draws the same cut; optionally snapped to the nearest
  sentence boundary in the same interval;
- `prefix_of(pieces, k)`: the prefix text, the decode of exactly the first k tokens.

The prefix is cut on a token boundary, so the student's tokens are kept verbatim: its text
is the UTF-8 decode of their bytes (never re-encoded), and the teacher continues right after
its last character.
"""

from __future__ import annotations

import codecs
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dasd_jax.sample.text import text_of_pieces
from dasd_jax.select.sentences import SplitterConfig, split_sentences


def _hash_int(*parts: object) -> int:
    key = "\x00".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def choose_questions(keys: Sequence[str], n: int, seed: int) -> list[int]:
    """Indices into `keys` of min(n, len(keys)) questions, in a seeded random order.

    The keys (e.g. prompt hashes) must be unique. The draw is a permutation of the keys in
    sorted order, so it depends on the set of keys and the seed only, not on file order."""
    if len(set(keys)) != len(keys):
        raise ValueError("choose_questions: question keys must be unique")
    order = sorted(range(len(keys)), key=lambda i: keys[i])
    perm = np.random.default_rng(_hash_int("mixed_policy.questions", seed)).permutation(len(keys))
    return [order[j] for j in perm[: min(n, len(keys))]]


def student_cap(teacher_tokens: int, factor: float) -> int:
    """The student's token budget: ceil(factor x teacher_tokens), at least 1."""
    # round first so that 1.5 x 10 is 15, not 15.000000000000002 -> 16
    return max(1, math.ceil(round(factor * teacher_tokens, 9)))


def cut_interval(L: int, low: float, high: float, min_tokens: int = 1) -> tuple[int, int] | None:
    """(lo, hi): the integers k with low L < k < high L (an open interval: with high = 1 the
    teacher always replaces at least one token) and k >= min_tokens; None when empty."""
    lo = max(math.floor(low * L) + 1, min_tokens, 1)
    hi = math.ceil(high * L) - 1
    return (lo, hi) if lo <= hi else None


def clean_boundaries(pieces: Sequence[bytes]) -> np.ndarray:
    """bool[len(pieces) + 1]: entry k is True when the bytes of the first k tokens end on a
    whole UTF-8 character, so the prefix text is exactly the text's first characters (a
    character split over two tokens is never cut)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = np.ones(len(pieces) + 1, bool)
    for i, p in enumerate(pieces):
        dec.decode(p, final=False)
        out[i + 1] = dec.getstate()[0] == b""
    return out


def sentence_boundaries(
    text: str, offsets: Sequence[tuple[int, int]], splitter: SplitterConfig | None = None
) -> np.ndarray:
    """bool[len(offsets) + 1]: entry k is True when cutting before token k cuts between two
    sentences: the token starts inside the whitespace that ends a sentence, or exactly where
    the next one starts (BPE tokens often carry the space before a word, so the boundary
    before " The" is a sentence boundary when "The" starts a sentence)."""
    spans = split_sentences(text, splitter or SplitterConfig(kind="cot", max_chars=None))
    gaps = []  # [from, to]: positions where a cut separates sentence i from i + 1
    for start, end in spans[:-1]:
        body = text[start:end].rstrip()
        gaps.append((start + len(body), end))
    out = np.zeros(len(offsets) + 1, bool)
    if not gaps:
        return out
    g = np.asarray(gaps, np.int64)
    starts = np.asarray([s for s, _ in offsets], np.int64)
    j = np.searchsorted(g[:, 0], starts, side="right") - 1
    inside = (j >= 0) & (starts <= g[np.maximum(j, 0), 1])
    out[: len(offsets)] = inside
    return out


@dataclass(frozen=True)
class Cut:
    """Where one student answer of L tokens is cut: the prefix keeps tokens [0, k)."""

    L: int
    k: int  # tokens kept
    drawn: int  # k as drawn, before snapping / moving off a split character
    lo: int  # the interval the draw came from
    hi: int
    snapped: bool  # k is a sentence boundary (snap="sentence")

    @property
    def fraction(self) -> float:
        return self.k / self.L


def cut_seed(seed: int, question_id: str) -> int:
    return _hash_int("mixed_policy.cut", seed, question_id)


def choose_cut(
    L: int,
    question_id: str,
    seed: int,
    *,
    low: float = 0.5,
    high: float = 1.0,
    min_tokens: int = 1,
    clean: np.ndarray | None = None,
    sentences: np.ndarray | None = None,
) -> Cut | str:
    """The cut of an answer of L tokens, or the reason there is none ("too_short").

    k is uniform over `cut_interval(L, low, high, min_tokens)`, from an RNG keyed by (seed,
    question_id). `clean` (from `clean_boundaries`) moves k to the nearest boundary that does
    not split a character. `sentences` (from `sentence_boundaries`) snaps k to the nearest
    clean sentence boundary in the interval (ties: the earlier one); with none there, k stays
    as drawn and `snapped` is False."""
    iv = cut_interval(L, low, high, min_tokens)
    if iv is None:
        return "too_short"
    lo, hi = iv
    drawn = int(np.random.default_rng(cut_seed(seed, question_id)).integers(lo, hi + 1))
    ks = np.arange(lo, hi + 1)
    ok = np.ones(len(ks), bool) if clean is None else np.asarray(clean, bool)[lo : hi + 1]
    if not ok.any():
        return "too_short"
    snapped = False
    if sentences is not None:
        at_sentence = ok & np.asarray(sentences, bool)[lo : hi + 1]
        if at_sentence.any():
            ok, snapped = at_sentence, True
    cand = ks[ok]
    k = int(cand[np.argmin(np.abs(cand - drawn))])  # argmin: the earlier one on a tie
    return Cut(L=L, k=k, drawn=drawn, lo=lo, hi=hi, snapped=snapped)


def prefix_of(pieces: Sequence[bytes], k: int) -> str:
    """The text of the first k tokens: the UTF-8 decode of exactly their bytes."""
    return text_of_pieces(list(pieces[:k]))[0]
