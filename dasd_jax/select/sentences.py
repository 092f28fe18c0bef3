"""Sentence splitting for long chain-of-thought text, and token -> sentence assignment.

Consumes a response text (``<think>...</think>answer``) and, for `assign_tokens`, one
tokenizer's character offsets into that text (``tokenizer.encode_with_offsets`` or, for
sampled ids, ``tokenizer.text_of_pieces``). Produces sentence spans in characters,
``list[tuple[int, int]]``, and a sentence index per token. DAS (``das.py``) scores each
model's tokens per sentence, so the two tokenizers (gpt-oss o200k_harmony for the teacher,
Qwen for the student) only ever meet through these character spans.

The paper does not say which splitter it used (regex, NLTK, newline...): ``SplitterConfig``
makes it an option. The default ``"cot"`` splitter follows these rules:

* Spans tile the text: contiguous, non-empty, covering ``[0, len(text))``. Whitespace between
  two sentences belongs to the **preceding** sentence (leading whitespace of the text belongs to
  the first one), so every sentence after the first starts at a non-whitespace character
  (for ``kind="regex"``, unless the pattern cuts before whitespace).
* A newline ends a sentence (blank lines are whitespace of the sentence they follow).
* ``.``, ``?``, ``!``, ``...``, ``…`` (optionally followed by closing quotes, brackets or
  markdown ``*``) end a sentence when followed by horizontal whitespace and then a character
  that is not a lowercase letter nor one of ``,;:=)``. This keeps decimals (3.14, 1,000.5),
  "Hmm... maybe", "e.g., x" and "n! = 120" together.
* CJK sentence ends: a run of terminators holding one of ``。｡．！？‼⁇⁈⁉`` ("？！", "…！" and
  "?！" too), optionally followed by closing quotes or brackets (``」』）】”`` ...), ends a
  sentence with **no** whitespace after it (CJK text has none); whitespace after it, a
  full-width space included, belongs to it. It does not end one before a comma or ``;:=)``
  (ASCII or full-width: "５！＝１２０"), nor when a closed quotation is continued by the
  Japanese particle と / って ("「本当？」と聞いた。" is one sentence). A full-width ``．``
  between two digits is a decimal point ("３．１４") and after a line-initial enumerator
  ("１．") an enumerator, as ``.`` is. A Chinese quotation that ends with its sentence ends
  one: "他问：“为什么？”" then "我答：..." (the usual convention for Chinese).
* A single ``.`` after a known abbreviation (e.g., i.e., vs., Dr., Fig., Eq., ...) or after a
  line-initial enumerator ("1.", "2.3.", "a.", "iv.") never ends a sentence. "etc." is not an
  abbreviation here: the lowercase rule already keeps "etc. and" together.
* A month abbreviation (Jan., Feb., Sept., ...) or a dotted initialism (groups of one or two
  letters joined by dots: U.S., U.K., Ph.D., a.m., p.m.) ends a sentence only
  when the next word is a common sentence opener (``SENTENCE_OPENERS``: The, It, Then, We,
  ...). A period after an initialism is ambiguous ("the U.S. Army" vs "in the U.S. The next
  year"); most occurrences in running text are inside a sentence, and a wrong cut splits a
  name across two sentences while a wrong merge only makes one sentence longer, so the
  default is "inside", overridden by the opener words that rarely continue a name
  ("in the U.S. Congress passed it" stays one sentence). A single capital ("the answer is
  B. Let me check") is not an initial: in chains of thought it is an answer or a point.
* Never split inside math or inline code: inline ``$...$``, ``\\(...\\)`` and `` `...` ``
  (closed on the same line, otherwise the opener is plain text; ``\\$`` is a dollar sign) and
  display ``$$...$$`` / ``\\[...\\]``. A display block is its own sentence, together with
  the punctuation right after it (the comma or period that ends ``\\[ x = 1 \\],``).
* A fenced code block (from a line starting with three backticks to the closing fence line, or
  to ``</think>`` / the end when unclosed) is one sentence and is not split by punctuation.
* ``<think>`` and ``</think>`` are sentences of their own (each tag boundary is a boundary).

Afterwards ``min_chars`` merges short prose sentences and ``max_chars`` hard-cuts runaway ones
(see ``SplitterConfig``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Span = tuple[int, int]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class SplitterConfig:
    """How responses are cut into sentences.

    kind: ``"cot"`` (the rules in the module docstring), ``"newline"`` (one sentence per line,
      blank lines attached to the line before; ignores math/code) or ``"regex"`` (a cut after
      every match of ``regex``; zero-width patterns such as ``(?<=[.!?])\\s+`` work too).
    regex: the pattern for ``kind="regex"``; must be None otherwise.
    max_chars: hard cut for runaway sentences (a code block, a line with no punctuation, a
      degenerate loop). A longer sentence is cut at the last newline within the limit, else at
      the last whitespace, else exactly at the limit. Applies to every kind and to code/math
      units too, so that one sentence never dominates a response. None disables it.
    min_chars: a prose sentence with fewer non-whitespace characters is merged into the next
      prose sentence (or the previous one when it is the last). Tags, code and display math
      are never merged. 0 (default) disables it: the paper scores every sentence.
    """

    kind: Literal["cot", "newline", "regex"] = "cot"
    regex: str | None = None
    max_chars: int | None = 2000
    min_chars: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("cot", "newline", "regex"):
            raise ValueError(f"splitter kind must be cot, newline or regex, got {self.kind!r}")
        if (self.kind == "regex") != (self.regex is not None):
            raise ValueError("splitter.regex must be set exactly when splitter.kind == 'regex'")
        if self.regex is not None:
            re.compile(self.regex)  # fail at config time, not on the first response
        if self.max_chars is not None and self.max_chars < 1:
            raise ValueError(f"splitter.max_chars must be >= 1 or None, got {self.max_chars}")
        if self.min_chars < 0:
            raise ValueError(f"splitter.min_chars must be >= 0, got {self.min_chars}")


# Structural units of the "cot" splitter, found left to right (the first alternative that
# matches at a position wins, so a `$` inside a code block is code, not math).
_UNIT_RE = re.compile(
    r"(?P<esc>\\[\\$])"  # `\\` and `\$` are plain text; they must not open math
    r"|(?P<tag></?think>)"
    r"|(?P<code>^[ \t]*```[^\n]*\n(?s:.*?)(?:^[ \t]*```[ \t]*$|(?=</think>)|\Z))"
    r"|(?P<display>\$\$(?:(?!</think>)[\s\S])+?\$\$|\\\[(?:(?!</think>)[\s\S])+?\\\])"
    r"|(?P<inline>\$(?:[^$\n\\]|\\.)+?\$|\\\((?:[^\n\\]|\\.)*?\\\)|`[^`\n]+`)",
    re.MULTILINE,
)
_AFTER_DISPLAY_RE = re.compile(r"[ \t]*[.,;:!?]*")
_WS_RE = re.compile(r"\s*")
_NEWLINE_RE = re.compile(r"[^\S\n]*\n\s*")
_TERMINATOR_RE = re.compile(r"(?P<term>[.?!…]+)[\"'”’»)\]}*]*[^\S\n]+(?=\S)")
# CJK sentence ends: a run of terminators holding at least one full-width one, then closing
# quotes/brackets, then optional horizontal whitespace; no whitespace is needed after it.
_CJK_ENDS = "。｡．！？‼⁇⁈⁉"
_CJK_TERMINATOR_RE = re.compile(
    rf"(?P<term>[.?!…]*+[{_CJK_ENDS}][.?!…{_CJK_ENDS}]*+)"
    r"(?P<close>[\"'”’»)\]}*」』）】〕〉》〗〙〛＂＇］｝｣]*+)[^\S\n]*+(?=\S)"
)  # possessive: a run or closers at the end of the text are never cut inside
_WORD_BEFORE_RE = re.compile(r"[A-Za-z][A-Za-z.]*\Z")
_ENUMERATOR_RE = re.compile(r"\d+(?:\.\d+)*|[A-Za-z]|[ivx]{1,4}|[IVX]{1,4}")
_INITIALISM_RE = re.compile(r"[A-Za-z]{1,2}(?:\.[A-Za-z]{1,2})+")  # the word before a final "."
_NEXT_WORD_RE = re.compile(r"[A-Za-z]+")
_NO_CUT_BEFORE = frozenset(",;:=)")
_NO_CUT_BEFORE_CJK = frozenset(",;:=)，、；：＝")
# Japanese quotation particles: 「…。」と言った continues the sentence the quotation is in.
_QUOTATIVE = ("と", "って")
# Words that a single `.` follows without ending the sentence (compared lowercased).
ABBREVIATIONS = frozenset(
    "e.g i.e vs cf dr mr mrs ms prof fig figs eq eqs approx resp ref refs thm lem prop cor "
    "al ch vol pp def ca".split()
)
# Month abbreviations ("Jan. 1775", compared lowercased); they and dotted initialisms (U.S.,
# Ph.D., p.m.) end a sentence only before one of SENTENCE_OPENERS (compared as written).
MONTHS = frozenset("jan feb mar apr jun jul aug sep sept oct nov dec".split())
# Capitalised words that start sentences but rarely continue a name after an initialism or a
# month ("the U.S. The next year" ends a sentence; "the U.S. Army" does not).
SENTENCE_OPENERS = frozenset(
    "A An The This That These Those It Its I We You He She They There Then So But And Or If "
    "In On At As For From When While After Before Since Because However Therefore Thus Hence "
    "Also Now Next First Finally Let Wait Hmm Okay Yes No Note Here What Why How Our My Their "
    "His Her".split()
)


def split_sentences(text: str, cfg: SplitterConfig | None = None) -> list[Span]:
    """Cut ``text`` into sentence spans ``[(start, end), ...]`` that tile it exactly."""
    cfg = cfg or SplitterConfig()
    if not text:
        return []
    if cfg.kind == "cot":
        cuts, units = _cot_cuts(text)
    elif cfg.kind == "newline":
        cuts, units = {m.end() for m in _NEWLINE_RE.finditer(text)}, set()
    else:
        cuts, units = {m.end() for m in re.finditer(cfg.regex, text)}, set()
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    spans = _absorb_blank(text, list(zip(bounds[:-1], bounds[1:], strict=True)), units)
    if cfg.min_chars > 0:
        spans = _merge_short(text, spans, units, cfg.min_chars)
    if cfg.max_chars is not None:
        spans = [piece for span in spans for piece in _hard_cut(text, span, cfg.max_chars)]
    return spans


def _absorb_blank(text: str, spans: list[Span], units: set[int]) -> list[Span]:
    """Whitespace-only spans join the sentence before them (at the very start: after them)."""
    out: list[Span] = []
    lead: int | None = None
    for start, end in spans:
        if text[start:end].isspace():
            if out:
                out[-1] = (out[-1][0], end)
            elif lead is None:
                lead = start
            continue
        if lead is not None:
            if start in units:
                units.add(lead)
            start, lead = lead, None
        out.append((start, end))
    if lead is not None:  # the whole text is whitespace
        out.append((lead, spans[-1][1]))
    return out


def _cot_cuts(text: str) -> tuple[set[int], set[int]]:
    """Cut positions of the "cot" rules, and the start offsets of the unit sentences."""
    cuts: set[int] = set()
    unit_starts: set[int] = set()
    masked: list[str] = []  # text with units and inline math blanked out, same length
    last = 0
    for m in _UNIT_RE.finditer(text):
        kind = m.lastgroup
        if kind == "esc":
            continue
        masked.append(text[last : m.start()])
        masked.append("_" * (m.end() - m.start()))
        last = m.end()
        if kind == "inline":
            continue
        end = m.end()
        if kind == "display":
            end = _AFTER_DISPLAY_RE.match(text, end).end()
            masked.append("_" * (end - last))
            last = end
        start = _WS_RE.match(text, m.start()).end()  # a fence's indentation is whitespace
        cuts.add(start)
        cuts.add(_WS_RE.match(text, end).end())
        unit_starts.add(start)
    masked.append(text[last:])
    prose = "".join(masked)

    cuts.update(m.end() for m in _NEWLINE_RE.finditer(prose))
    for m in _TERMINATOR_RE.finditer(prose):
        if prose[m.end()].islower() or prose[m.end()] in _NO_CUT_BEFORE:
            continue
        if m.group("term") == "." and (
            _is_abbreviation(prose, m.start(), m.end()) or _is_enumerator(prose, m.start())
        ):
            continue
        cuts.add(m.end())
    cuts.update(m.end() for m in _CJK_TERMINATOR_RE.finditer(prose) if _cjk_ends(prose, m))
    return cuts, unit_starts


def _cjk_ends(prose: str, m: re.Match) -> bool:
    after = prose[m.end()]
    if after in _NO_CUT_BEFORE_CJK:
        return False
    if m.group("close") and prose.startswith(_QUOTATIVE, m.end()):
        return False
    if m.group("term") == "．":  # full-width full stop: also a decimal point, an enumerator
        dot = m.start()
        if dot > 0 and prose[dot - 1].isdigit() and m.end() == dot + 1 and after.isdigit():
            return False
        return not _is_enumerator(prose, dot)
    return True


def _is_abbreviation(prose: str, dot: int, next_word: int) -> bool:
    """Whether the `.` at `dot`, followed by whitespace and a word at `next_word`, closes an
    abbreviation inside the sentence rather than the sentence."""
    # A 15-character window is enough: abbreviations are short, and a longer word seen only
    # in part can never equal one.
    word = _WORD_BEFORE_RE.search(prose, max(0, dot - 15), dot)
    if word is None:
        return False
    key = word.group().lower().strip(".")
    if key in ABBREVIATIONS:
        return True
    if key in MONTHS or _INITIALISM_RE.fullmatch(word.group()):
        following = _NEXT_WORD_RE.match(prose, next_word)
        return following is None or following.group() not in SENTENCE_OPENERS
    return False


def _is_enumerator(prose: str, dot: int) -> bool:
    line_start = prose.rfind("\n", 0, dot) + 1
    head = prose[line_start:dot].strip().lstrip("#>*-+ \t")
    return _ENUMERATOR_RE.fullmatch(head) is not None


def _merge_short(text: str, spans: list[Span], units: set[int], min_chars: int) -> list[Span]:
    def short(span: Span) -> bool:
        body = text[span[0] : span[1]]
        return span[0] not in units and len(body) - sum(map(str.isspace, body)) < min_chars

    # Forward: a short prose sentence absorbs the prose sentence after it.
    forward: list[Span] = []
    for span in spans:
        if forward and short(forward[-1]) and span[0] not in units:
            forward[-1] = (forward[-1][0], span[1])
        else:
            forward.append(span)
    # Backward: one still short (followed by a unit or the end) joins the prose before it.
    out: list[Span] = []
    for span in forward:
        if out and short(span) and out[-1][0] not in units:
            out[-1] = (out[-1][0], span[1])
        else:
            out.append(span)
    return out


_CUT_RE = re.compile(r"\s+(?=\S)")


def _hard_cut(text: str, span: Span, max_chars: int) -> list[Span]:
    start, end = span
    pieces = []
    while end - start > max_chars:
        limit = start + max_chars
        # Prefer the last cut after a newline, then after any whitespace, so that the next
        # piece starts at a non-whitespace character like every other sentence.
        cut, after_newline = None, False
        for m in _CUT_RE.finditer(text, start, limit + 1):
            if m.end() > limit:
                break
            newline = "\n" in m.group()
            if newline or not after_newline:
                cut, after_newline = m.end(), newline
        if cut is None:
            # No whitespace to cut after: cut at the limit, or after a whitespace run that
            # straddles it (the piece then exceeds max_chars by that whitespace only).
            cut = _WS_RE.match(text, limit, end).end()
        pieces.append((start, cut))
        start = cut
    if start < end:
        pieces.append((start, end))
    return pieces


@functools.cache
def _whitespace_codepoints() -> np.ndarray:
    # Every code point for which str.isspace() is true lies below U+3001.
    return np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def assign_tokens(
    token_offsets: Sequence[tuple[int, int]] | np.ndarray,
    sentence_spans: Sequence[Span] | np.ndarray,
    text: str,
) -> np.ndarray:
    """Sentence index of each token, ``int64[N]``; -1 where a token falls in no sentence.

    Rule for a token that straddles a boundary: it belongs to the sentence that contains its
    **first non-whitespace character** (a whitespace-only token: its first character).
    BPE tokens carry the space before a word (" The"), and that space belongs to the previous
    sentence by the splitter's whitespace rule, so "first character" would hand every
    sentence-initial word to the previous sentence. Tokens with ``end <= start`` (special
    tokens without text) or whose anchor lies outside every span get -1. Offsets are
    characters of ``text`` (not bytes), by the byte rule of ``tokenizer.text_of_pieces``: a
    token's span covers every character any of its bytes belongs to, so a token holding only
    part of an emoji spans that emoji and counts in its sentence, and spans of neighbouring
    tokens may share that one character. Nothing here needs spans to tile, be sorted or be
    disjoint: each token is placed on its own.

    Vectorised with ``np.searchsorted``: O((N + S) log) for N tokens and S sentences.
    """
    offsets = np.asarray(token_offsets, dtype=np.int64).reshape(-1, 2)
    spans = np.asarray(sentence_spans, dtype=np.int64).reshape(-1, 2)
    if len(spans) > 1 and np.any(np.diff(spans[:, 0]) <= 0):
        raise ValueError("sentence spans must be sorted by start and not repeat")
    starts_tok, ends_tok = offsets[:, 0], offsets[:, 1]

    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    non_ws = np.flatnonzero(~np.isin(codes, _whitespace_codepoints()))
    j = np.searchsorted(non_ws, starts_tok)
    first_visible = non_ws[np.minimum(j, len(non_ws) - 1)] if len(non_ws) else starts_tok
    in_token = (j < len(non_ws)) & (first_visible < ends_tok)
    anchor = np.where(in_token, first_visible, starts_tok)

    k = np.searchsorted(spans[:, 0], anchor, side="right") - 1
    k_safe = np.maximum(k, 0)
    inside = (k >= 0) & (anchor < spans[k_safe, 1]) if len(spans) else np.zeros_like(k, bool)
    valid = inside & (ends_tok > starts_tok) & (starts_tok >= 0)
    return np.where(valid, k, -1).astype(np.int64)
