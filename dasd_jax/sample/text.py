"""Text around the engine: prompts in, sampled token ids out as text with exact offsets.

Consumes a tokenizer (a checkpoint's own) and produces:
- `render_prompt(prompt, fmt, system_prompt)`: the generation prompt of one user message in
  the teacher's chat format: `chatml` (Qwen3; `tokenizer.render_chat`) or `harmony`
  (gpt-oss: `models.harmony.render_prompt`, the renderer the score stage also uses);
- `TokenText`: the UTF-8 bytes of any token id (cached), and `TextBuilder`, which turns a
  stream of sampled ids into text plus a [start, end) character span per token that covers
  the text. Sampled ids need not be the tokenizer's canonical encoding of their text, so spans
  are derived from the ids' own bytes, never by re-encoding: the byte rule of
  `tokenizer.text_of_pieces` (re-exported here; a token's span covers every character any of
  its bytes belongs to, so a character split across tokens lies in each of their spans);
  bytes that are not valid UTF-8 become U+FFFD (as `bytes.decode(errors="replace")`); ids
  the tokenizer does not know (a model's vocabulary is often padded past it) are empty;
- `map_response(raw, ids, offsets, ...)`: the raw text in the `<think>...</think>answer` form
  the later stages read (ChatML unchanged; gpt-oss harmony classified by the one parser of
  generated harmony, `models.harmony.parse_generated`, and refused with its reason when
  malformed), with a span per kept token.
"""

from __future__ import annotations

import codecs
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from dasd_jax.tokenizer import nfc_problem, render_chat, text_of_pieces, token_bytes


def prompt_format_for(model_type: str, fmt: str) -> str:
    """`auto` -> harmony for gpt-oss, chatml otherwise."""
    if fmt != "auto":
        return fmt
    return "harmony" if model_type == "gpt_oss" else "chatml"


def render_prompt(
    prompt: str, fmt: str, system_prompt: str | None, reasoning_effort: str = "high"
) -> str:
    """The text that precedes the assistant's first generated token."""
    if fmt == "chatml":
        return render_chat(prompt, None, system_prompt or None).text
    if fmt == "harmony":
        from dasd_jax.models import harmony

        system = harmony.HarmonySystem(reasoning_effort=reasoning_effort)
        return harmony.render_prompt(prompt, system_prompt or None, system)
    raise ValueError(f"prompt format {fmt!r}: use auto, chatml or harmony")


class TokenText:
    """Bytes of token ids, cached; unknown ids (padded vocabulary) are empty."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._n = len(tokenizer)
        self._cache: dict[int, bytes] = {}
        self._special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}

    def bytes_of(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = token_bytes(self.tokenizer, [token_id])[0] if 0 <= token_id < self._n else b""
            self._cache[token_id] = b
        return b

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def builder(self) -> TextBuilder:
        return TextBuilder(self)

    def text(self, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
        return text_of_pieces([self.bytes_of(i) for i in ids])

    def id_of_bytes(self, piece: bytes) -> int | None:
        """The token id whose bytes are `piece` (servers that report bytes, not ids)."""
        if not hasattr(self, "_by_bytes"):
            ids = list(range(self._n))
            self._by_bytes: dict[bytes, int] = {}
            for i, b in zip(ids, token_bytes(self.tokenizer, ids), strict=True):
                self._by_bytes.setdefault(b, i)
        return self._by_bytes.get(piece)


@dataclass
class TextBuilder:
    """Incremental text of a token stream: `add(id)` appends a token and returns the
    characters it completes (`text` grows as characters complete); `finish()` gives the whole
    text, a trailing incomplete character flushed as U+FFFD, with each token's span by the
    byte rule of `tokenizer.text_of_pieces` (the same text and spans as `text_of_pieces` of
    the tokens' bytes)."""

    source: TokenText
    length: int = 0
    _bytes: list[bytes] = field(default_factory=list)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _parts: list[str] = field(default_factory=list)

    def add(self, token_id: int) -> str:
        b = self.source.bytes_of(token_id)
        self._bytes.append(b)
        piece = self._decoder.decode(b, final=False)
        self._parts.append(piece)
        self.length += len(piece)
        return piece

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def finish(self) -> tuple[str, list[tuple[int, int]]]:
        text, offsets = text_of_pieces(self._bytes)
        self._parts[:], self.length = [text], len(text)
        return text, offsets


def cut_at(
    text: str, offsets: list[tuple[int, int]], cut: int
) -> tuple[str, list[tuple[int, int]], int]:
    """Text cut at char `cut`; keeps the tokens that start before it (the last one clipped).
    Returns (text, offsets, number of tokens kept)."""
    n = sum(1 for s, _ in offsets if s < cut) if cut > 0 else 0
    kept = [(s, min(e, cut)) for s, e in offsets[:n]]
    return text[:cut], kept, n


# --------------------------------------------------------------------------- <think> form


@dataclass(frozen=True)
class Mapped:
    """A generated completion in the later stages' form (`map_response`).

    `response`: `<think>...</think>answer` text (for a refused completion: the raw text);
    `offsets`: a span in `response` per kept token; `keep`: the tokens it covers (fewer than
    generated when an exact repair dropped a tail); `reason`: why it is refused
    (`models.harmony.MALFORMED`), None when usable; `harmony`: how its harmony was read
    (`GeneratedHarmony.meta()`, for the candidate's `meta.harmony`).
    """

    response: str
    offsets: list[tuple[int, int]] | None
    keep: int
    reason: str | None = None
    harmony: dict | None = None
    detail: str | None = None  # a refused one: what is wrong, and where
    at_char: int | None = None  # ... as a character of the raw text, when known


def ended_by(finish_reason: str, stop: int | str | None, token_text: TokenText) -> str | None:
    """The `ended_by` of `models.harmony.parse_generated` for an engine completion: the EOS
    token's text (the driver drops it from the ids), "" when cut (max tokens, a stop string)."""
    if finish_reason == "length" or isinstance(stop, str):
        return ""
    if isinstance(stop, int) and token_text.is_special(stop):
        return token_text.bytes_of(stop).decode("utf-8", errors="replace")
    return None


def map_response(
    raw: str,
    ids: Sequence[int],
    offsets: list[tuple[int, int]] | None,
    token_text: TokenText,
    fmt: str,
    ended: str | None = None,
    repair: bool = True,
) -> Mapped:
    """The later stages' form of raw generated text and its token ids: ChatML text is already
    in `<think>...</think>answer` form (Qwen3 writes the tags as tokens) and stays as it is;
    harmony goes through `map_harmony`. A response not in Unicode NFC form is refused
    (`not_nfc`: `tokenizer.nfc_problem`), as the score stage would refuse it."""
    if fmt != "harmony":
        mapped = Mapped(raw, offsets, len(ids))
    else:
        pieces = [token_text.bytes_of(i) for i in ids]
        mapped = map_harmony(pieces, [token_text.is_special(i) for i in ids], ended, repair)
        if mapped.reason is not None:
            return dataclasses.replace(mapped, response=raw)
    problem = nfc_problem(mapped.response)
    if problem is not None:
        # `problem` names the character and the text around it (in the response, not `raw`)
        return Mapped(raw, None, len(ids), "not_nfc", mapped.harmony, problem)
    return mapped


def map_harmony(
    pieces: Sequence[bytes],
    special: Sequence[bool],
    ended: str | None = None,
    repair: bool = True,
) -> Mapped:
    """Generated harmony tokens (their bytes, which are special) -> `Mapped`.

    Classified by `models.harmony.parse_generated` (the one parser; `ended`: its `ended_by`,
    `repair`: the exact repair of a final message's `<|end|>`): a well-formed completion
    becomes `think_text(analysis, final)`, each content token keeping its characters
    (`text_of_pieces` per message), every other token (channel markers, header words) an empty
    span at the end of the content before it; a malformed one is refused with its reason (its
    `response` is then the pieces' text).
    """
    from dasd_jax.models import harmony

    parsed = harmony.parse_generated(pieces, special, ended, repair)
    if not parsed.ok:
        text, spans = text_of_pieces(pieces)
        at = spans[parsed.at][0] if parsed.at is not None and parsed.at < len(spans) else len(text)
        return Mapped(text, None, len(pieces), parsed.reason, parsed.meta(), parsed.detail, at)
    segments = {
        ch: (r[0], *text_of_pieces(pieces[r[0] : r[1]]))
        for ch, r in (("analysis", parsed.analysis), ("final", parsed.final))
        if r is not None
    }
    analysis, final = harmony.think_parts(parsed, {ch: s[1] for ch, s in segments.items()})
    where = dict(zip(("analysis", "final"), harmony.think_spans(analysis, final), strict=True))
    spans: list[tuple[int, int] | None] = [None] * parsed.keep
    for ch, (first, _, seg) in segments.items():
        base = where[ch][0]
        for j, (s, e) in enumerate(seg):
            spans[first + j] = (base + s, base + e)
    cursor = 0
    for k, span in enumerate(spans):  # markers: empty, at the end of the content before them
        if span is None:
            spans[k] = (cursor, cursor)
        else:
            cursor = span[1]
    return Mapped(harmony.think_text(analysis, final), spans, parsed.keep, None, parsed.meta())
