"""Text around the engine: prompts in, sampled token ids out as text with exact offsets.

Consumes a tokenizer (a checkpoint's own) and produces:
- `render_prompt(prompt, fmt, system_prompt)`: the generation prompt of one user message in
  the teacher's chat format: `chatml` (Qwen3; `tokenizer.render_chat`) or `harmony`
  (gpt-oss: `models.harmony.render_prompt`, the renderer the score stage also uses);
- `TokenText`: the UTF-8 bytes of any token id (cached), and `TextBuilder`, which turns a
  stream of sampled ids into text plus a [start, end) character span per token that tiles the
  text. Sampled ids need not be the tokenizer's canonical encoding of their text, so spans are
  derived from the ids' own bytes, never by re-encoding: the rule of
  `tokenizer.encode_with_offsets` (a character belongs to the token holding its last byte);
  bytes that are not valid UTF-8 become U+FFFD (as `bytes.decode(errors="replace")`); ids
  the tokenizer does not know (a model's vocabulary is often padded past it) are empty;
- `map_response(raw, ids, offsets, ...)`: the raw text in the `<think>...</think>answer` form
  the later stages read (gpt-oss harmony channels mapped by `select.filters.harmony_to_think`;
  ChatML unchanged), with token spans in it (for harmony by the ingest stage's own rule).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass, field

from dasd_jax.select.filters import harmony_to_think
from dasd_jax.tokenizer import render_chat, token_bytes


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


def text_of_pieces(pieces: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """Text of byte pieces and a span per piece (the `TextBuilder` rule)."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts = [dec.decode(p, final=False) for p in pieces]
    tail = dec.decode(b"", final=True)
    if tail:  # a trailing incomplete character: the token holding its last byte
        parts[max(k for k, p in enumerate(pieces) if p)] += tail
    offsets, pos = [], 0
    for p in parts:
        offsets.append((pos, pos + len(p)))
        pos += len(p)
    return "".join(parts), offsets


@dataclass
class TextBuilder:
    """Incremental text of a token stream: `add(id)` appends, `text` grows as characters
    complete; `finish()` flushes a trailing incomplete character (as U+FFFD)."""

    source: TokenText
    pieces: list[str] = field(default_factory=list)
    length: int = 0
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    _parts: list[str] = field(default_factory=list)
    _last: int = 0  # the last token with bytes

    def add(self, token_id: int) -> str:
        b = self.source.bytes_of(token_id)
        if b:
            self._last = len(self.pieces)
        piece = self._decoder.decode(b, final=False)
        self.pieces.append(piece)
        self._parts.append(piece)
        self.length += len(piece)
        return piece

    @property
    def text(self) -> str:
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def finish(self) -> tuple[str, list[tuple[int, int]]]:
        tail = self._decoder.decode(b"", final=True)
        if tail:  # a trailing incomplete character: the token holding its last byte
            self.pieces[self._last] += tail
            self._parts.append(tail)
            self.length += len(tail)
        offsets, pos = [], 0
        for p in self.pieces:
            offsets.append((pos, pos + len(p)))
            pos += len(p)
        return self.text, offsets


def cut_at(
    text: str, offsets: list[tuple[int, int]], cut: int
) -> tuple[str, list[tuple[int, int]], int]:
    """Text cut at char `cut`; keeps the tokens that start before it (the last one clipped).
    Returns (text, offsets, number of tokens kept)."""
    n = sum(1 for s, _ in offsets if s < cut) if cut > 0 else 0
    kept = [(s, min(e, cut)) for s, e in offsets[:n]]
    return text[:cut], kept, n


# --------------------------------------------------------------------------- <think> form


def map_response(
    raw: str,
    ids: Sequence[int],
    offsets: list[tuple[int, int]] | None,
    token_text: TokenText,
    fmt: str,
) -> tuple[str, list[tuple[int, int]] | None, str | None]:
    """(response, token spans in it, problem) for raw generated text.

    ChatML text is already in `<think>...</think>answer` form (Qwen3 writes the tags as
    tokens): unchanged. Harmony text becomes `harmony_to_think(raw)`, and token spans follow
    the ingest rule (`ingest.align_teacher_tokens`): content tokens keep their characters,
    channel-marker tokens get empty spans, `<think>`/`</think>` belong to no token. Spans that
    cannot be aligned (text between messages that the mapping drops) are None, with the reason.
    """
    if fmt != "harmony":
        return raw, offsets, None
    from dasd_jax.ingest import align_teacher_tokens, harmony_markers

    response = harmony_to_think(raw)
    pieces = [token_text.bytes_of(i) for i in ids]
    markers = harmony_markers(pieces, [token_text.is_special(i) for i in ids])
    try:
        return response, align_teacher_tokens(pieces, markers, response), None
    except ValueError as e:
        return response, None, str(e)
