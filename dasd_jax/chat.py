"""Chat formats for scoring, and which tokens of a rendered text are the response's.

Consumes a prompt and a response (`<think>...</think>answer`); produces a `Rendering`: the
text a model reads (its own chat format, the response verbatim) with where the response's
characters sit in it, and, from a tokenizer's spans of that text, the response tokens and
their response-relative spans (`response_offsets`).

- `render_chatml`: Qwen3 ChatML (`tokenizer.render_chat`): the student, and Qwen-family
  teachers.
- `render_harmony`: gpt-oss harmony (system block, developer instructions, user, then the
  response's `<think>` part as the analysis channel and its answer as the final channel),
  rendered by `dasd_jax.models.harmony` (openai-harmony's exact text). Format tokens inside
  the response region (channel markers) get empty spans: they belong to no sentence.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_THINK_RE = re.compile(r"<think>\n?(?P<think>.*?)(?:\n?</think>(?:\n\n)?(?P<answer>.*))?\Z", re.S)


@dataclass(frozen=True)
class Rendering:
    """A prompt + response rendered in a model's chat format.

    Tokens starting in `region` are the response's tokens; `pieces` are `(text_start,
    text_end, response_start)`: where the response's characters sit in `text` (the rest of
    the region is format the model writes around them, e.g. harmony channel markers).
    """

    text: str
    region: tuple[int, int]
    pieces: tuple[tuple[int, int, int], ...]


def render_chatml(prompt: str, response: str, system_prompt: str | None) -> Rendering:
    from dasd_jax.tokenizer import render_chat

    r = render_chat(prompt, response, system_prompt)
    return Rendering(
        r.text, (r.response_start, r.response_end), ((r.response_start, r.response_end, 0),)
    )


def render_harmony(
    prompt: str, response: str, system_prompt: str | None, effort: str = "medium"
) -> Rendering:
    """gpt-oss harmony text of one exchange (`models.harmony.render`: openai-harmony's
    rendering), the response's `<think>` part as the analysis channel and its answer as the
    final channel; the system prompt as developer instructions. A response without
    `</think>` is an unterminated analysis (a truncated sample); one without `<think>` is a
    final message only."""
    from dasd_jax.models import harmony

    lstrip = len(response) - len(response.lstrip())
    m = _THINK_RE.match(response, lstrip) if response[lstrip:].startswith("<think>") else None
    if m is None:
        parts = [(None, None), (response, 0)]
    else:
        answer = m.group("answer")
        parts = [
            (m.group("think"), m.start("think")),
            (answer, m.start("answer") if answer is not None else None),
        ]
    h = harmony.render(
        prompt,
        parts[0][0],
        parts[1][0],
        developer=system_prompt or None,
        system=harmony.HarmonySystem(reasoning_effort=effort),
    )
    pieces = tuple(
        (span[0], span[1], r)
        for span, (_, r) in zip((h.analysis, h.final), parts, strict=True)
        if span is not None and r is not None and span[1] > span[0]
    )
    end = max(s[1] for s in (h.analysis, h.final) if s is not None)
    return Rendering(h.text, (h.completion_start, end), pieces)


def response_offsets(
    token_offsets: list[tuple[int, int]], rendering: Rendering
) -> tuple[int, int, list[tuple[int, int]]]:
    """(first, count, spans): the response tokens `first .. first+count-1` of a rendered
    text's tokens and their spans in response characters. Tokens outside every piece (format
    tokens inside the region) get an empty span at the current position. Each span is mapped
    on its own, so two tokens that share a split character (the byte rule of
    `tokenizer.encode_with_offsets`) still share it in the response."""
    a, b = rendering.region
    first = next((i for i, (s, _) in enumerate(token_offsets) if s >= a), len(token_offsets))
    last = first
    while last < len(token_offsets) and token_offsets[last][0] < b:
        last += 1
    spans: list[tuple[int, int]] = []
    cursor = 0
    for s, e in token_offsets[first:last]:
        lo = hi = None
        for ps, pe, r in rendering.pieces:
            if s < pe and e > ps:
                x, y = max(s, ps) - ps + r, min(e, pe) - ps + r
                lo = x if lo is None else lo
                hi = y
        if lo is None:
            spans.append((cursor, cursor))
        else:
            spans.append((lo, hi))
            cursor = hi
    return first, last - first, spans
