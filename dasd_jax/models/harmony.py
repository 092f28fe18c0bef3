"""gpt-oss's harmony chat format: render what the teacher saw and wrote, map it to `<think>`.

Consumes a conversation (system settings, optional developer instructions, the user's prompt)
and the teacher's channels (`analysis` = reasoning, `final` = answer); produces:
- `render_prompt` / `render_completion` / `render`: the exact text gpt-oss was conditioned on
  and produced, token for token what OpenAI's `openai-harmony` renderer emits (checked in
  tests against its output), so a teacher forward pass scores exactly the text it sampled;
- `parse_completion`: the messages of a sampled completion (channel, recipient, content and its
  character span), which tells a tool call (a recipient, or a `<|call|>` stop) from reasoning;
- `think_text` / `split_think`: the data's form `<think>\\n{analysis}\\n</think>\\n\\n{final}`
  (Qwen3's template layout; the same as `select.filters.harmony_to_think`) and back;
- `think_offsets`: teacher token spans in the harmony text -> spans in the `<think>` text,
  so teacher and student log-probs meet on the same characters (PAPER.md: DAS, Filter).

Format (o200k_harmony special tokens): every message is
`<|start|>{role}[<|channel|>{channel}]<|message|>{content}<|end|>`; the system message carries
the model identity, knowledge cutoff, optional current date, reasoning effort and the valid
channels; a system prompt of the data becomes developer `# Instructions`. Generation starts
after `<|start|>assistant`: the model writes `<|channel|>analysis<|message|>...<|end|>`, then
`<|start|>assistant<|channel|>final<|message|>...` and stops with `<|return|>`.

Re-tokenising rendered text gives the canonical tokenization; a sampler can emit a different
(non-canonical) split of the same text. Where the sampler recorded token ids and log-probs,
use those; recomputation scores the canonical tokens of the same characters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
RETURN, CALL, CONSTRAIN = "<|return|>", "<|call|>", "<|constrain|>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# ids in o200k_harmony
TOKEN_IDS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    RETURN: 200002,
    CONSTRAIN: 200003,
    CHANNEL: 200005,
    START: 200006,
    END: 200007,
    MESSAGE: 200008,
    CALL: 200012,
}
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
REASONING_EFFORTS = ("low", "medium", "high")

Span = tuple[int, int]


@dataclass(frozen=True)
class HarmonySystem:
    """The system message's settings (openai-harmony's SystemContent defaults).

    `current_date` ("YYYY-MM-DD") is left out when None; servers usually put today's date, so
    record the one the teacher was sampled with if it is known.
    """

    model_identity: str = DEFAULT_IDENTITY
    knowledge_cutoff: str | None = "2024-06"
    current_date: str | None = None
    reasoning_effort: str = "medium"
    channels: tuple[str, ...] = ("analysis", "commentary", "final")

    def __post_init__(self):
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort {self.reasoning_effort!r}: {REASONING_EFFORTS}")

    def content(self) -> str:
        lines = [self.model_identity]
        if self.knowledge_cutoff:
            lines.append(f"Knowledge cutoff: {self.knowledge_cutoff}")
        if self.current_date:
            lines.append(f"Current date: {self.current_date}")
        text = "\n".join(lines) + f"\n\nReasoning: {self.reasoning_effort}"
        if self.channels:
            text += (
                f"\n\n# Valid channels: {', '.join(self.channels)}. "
                "Channel must be included for every message."
            )
        return text


def message(role: str, content: str, channel: str | None = None) -> str:
    head = START + role + (CHANNEL + channel if channel else "")
    return head + MESSAGE + content + END


def render_prompt(
    user: str, developer: str | None = None, system: HarmonySystem = HarmonySystem()
) -> str:
    """System, optional developer instructions and the user turn, ending `<|start|>assistant`
    (what the teacher was conditioned on; openai-harmony's render_conversation_for_completion)."""
    text = message("system", system.content())
    if developer is not None:
        text += message("developer", f"# Instructions\n\n{developer}")
    return text + message("user", user) + START + "assistant"


def render_completion(analysis: str | None, final: str | None) -> str:
    """What the teacher wrote after `<|start|>assistant`.

    `analysis` then `final`, as sampled: `<|channel|>analysis<|message|>{analysis}<|end|>
    <|start|>assistant<|channel|>final<|message|>{final}<|return|>`. Without `final`, the
    reasoning was cut off (a truncated sample): no `<|end|>` after it.
    """
    if analysis is None and final is None:
        raise ValueError("a completion needs an analysis or a final message")
    text = ""
    if analysis is not None:
        text += CHANNEL + "analysis" + MESSAGE + analysis
        if final is None:
            return text
        text += END + START + "assistant"
    return text + CHANNEL + "final" + MESSAGE + final + RETURN


@dataclass(frozen=True)
class HarmonyText:
    """A rendered conversation: `text[completion_start:]` is what the teacher produced;
    `analysis` and `final` are the character spans of the two channels' contents."""

    text: str
    completion_start: int
    analysis: Span | None
    final: Span | None


def render(
    user: str,
    analysis: str | None,
    final: str | None,
    developer: str | None = None,
    system: HarmonySystem = HarmonySystem(),
) -> HarmonyText:
    prompt = render_prompt(user, developer, system)
    text = prompt + render_completion(analysis, final)
    a_span = f_span = None
    at = len(prompt)
    if analysis is not None:
        at += len(CHANNEL + "analysis" + MESSAGE)
        a_span = (at, at + len(analysis))
        at = a_span[1] + len(END + START + "assistant")
    if final is not None:
        at += len(CHANNEL + "final" + MESSAGE)
        f_span = (at, at + len(final))
    return HarmonyText(text, len(prompt), a_span, f_span)


# --------------------------------------------------------------------------- parsing


# Why a generated completion is refused (`GeneratedHarmony.reason`); docs/sample.md lists them.
MALFORMED = {
    "text_outside_message": "text between messages, or after <|return|>",
    "unknown_role": "a message whose role is not assistant",
    "unknown_channel": "a channel other than analysis, final or commentary (or none)",
    "repeated_channel": "a second analysis or final message",
    "final_before_analysis": "an analysis message after the final one",
    "tool_call": "a message to a recipient (to=...), a <|constrain|> format or a <|call|> stop",
    "commentary": "a commentary message (tool preambles; the data has no place for them)",
    "no_final_message": "the teacher stopped (<|return|>, an EOS) before any final message",
    "header_cut_off": "the completion ends inside a message header",
    "end_instead_of_return": "the final message ends with <|end|> or another EOS (repair off)",
    "unterminated_message": "a new <|start|> before the current message's stop token",
    "unexpected_token": "a harmony token where the format has none (e.g. <|message|> in text)",
}
REPAIR_FINAL_END = "cut_at_final_end"  # the final message's <|end|> taken as its <|return|>

_KINDS = {
    START: "start",
    END: "end",
    MESSAGE: "message",
    CHANNEL: "channel",
    RETURN: "return",
    CALL: "call",
    CONSTRAIN: "constrain",
}
# harmony's special tokens as text (servers that return text, dumps): split on these
_SPECIAL_TEXT = re.compile(
    r"<\|(?:start|end|message|channel|return|call|constrain|endoftext|startoftext)\|>"
)


@dataclass(frozen=True)
class GeneratedMessage:
    """One message of a generated completion: `content` is its token range [a, b); `stop`
    the kind of token that ended it (`end`, `return`, `call`, `special` for another EOS such
    as <|endoftext|>, "" when the tokens ran out first)."""

    role: str
    channel: str
    recipient: str | None
    constrained: bool
    content: tuple[int, int]
    stop: str


@dataclass(frozen=True)
class GeneratedHarmony:
    """A generated completion classified (`parse_generated`).

    Well formed (`reason is None`): an analysis then a final message, or a final alone,
    ending with `<|return|>`, or cut at max_tokens inside one of them (`truncated`), or, with
    the exact repair, a final message ended by `<|end|>` (`repair`): everything after it is
    dropped and `keep` < the number of tokens. `analysis` / `final` are content token ranges;
    `analysis_closed`: the analysis message ended with its `<|end|>`.
    """

    reason: str | None
    detail: str
    messages: tuple[GeneratedMessage, ...]
    n_tokens: int
    keep: int
    analysis: tuple[int, int] | None = None
    final: tuple[int, int] | None = None
    analysis_closed: bool = False
    truncated: bool = False
    repair: str | None = None
    at: int | None = None  # the token the reason (or the repair) points at

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def dropped(self) -> int:
        return self.n_tokens - self.keep

    def meta(self) -> dict:
        """What a record's `meta.harmony` says about how its text was read."""
        out: dict = {"truncated": self.truncated} if self.ok else {"reason": self.reason}
        if self.repair:
            out.update(repair=self.repair, dropped_tokens=self.dropped, detail=self.detail)
        elif not self.ok:
            out.update(detail=self.detail, at_token=self.at)
        return out


def _kind(piece: bytes | str, special: bool) -> str:
    if not special:
        return "text"
    text = piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece
    return _KINDS.get(text, "special")


def _text(piece: bytes | str) -> str:
    return piece.decode("utf-8", errors="replace") if isinstance(piece, bytes) else piece


def parse_generated(
    pieces: Sequence[bytes | str],
    special: Sequence[bool],
    ended_by: str | None = None,
    repair: bool = True,
) -> GeneratedHarmony:
    """Classify what gpt-oss generated after `<|start|>assistant` (the one parser of
    generated harmony: the sample stage, server dumps, the mixed-policy teacher).

    `pieces`: each token's bytes (or text), `special`: which are special tokens.
    `ended_by`: the stop token that ended generation when it is not among the pieces (our
    engine drops the EOS), e.g. `<|return|>`; "" when generation was cut (max_tokens, a stop
    string); None when unknown (the pieces alone tell). `repair`: take a final message's
    `<|end|>` (or another EOS) as its `<|return|>` and drop what follows: the kept text and
    log-probs are exactly what the teacher wrote (a causal model's earlier tokens do not
    depend on later ones). Not when a new message (`<|start|>`) follows that `<|end|>`: the
    teacher went on, and the completion is classified by that message (an analysis:
    `final_before_analysis`, a second final: `repeated_channel`, ...). Never raises:
    malformed input gives a `reason` from `MALFORMED`.
    """
    n = len(pieces)
    kinds = [_kind(p, s) for p, s in zip(pieces, special, strict=True)]
    last = _text(pieces[-1]) if n and special[-1] else None
    if ended_by and _SPECIAL_TEXT.fullmatch(ended_by) and ended_by != last:
        kinds.append(_kind(ended_by, True))  # a virtual last token, never kept
    msgs: list[GeneratedMessage] = []
    seen: dict[str, tuple[int, int]] = {}
    closed = False

    def result(reason=None, at=None, detail="", **kw) -> GeneratedHarmony:
        where = "" if at is None else f"token {at}: "
        return GeneratedHarmony(
            reason,
            where + detail,
            tuple(msgs),
            n,
            kw.pop("keep", n),
            seen.get("analysis"),
            seen.get("final"),
            closed,
            at=at,
            **kw,
        )

    i = 0
    while i < len(kinds):
        # ---- header: [<|start|>] role [<|channel|> channel [<|constrain|> fmt]] <|message|>
        h0 = i
        if kinds[i] in ("return", "call", "special"):  # the teacher stopped: no answer
            return result("no_final_message", i, f"{_name(kinds[i])} before any final message")
        if kinds[i] == "start":
            i += 1
        elif msgs and kinds[i] == "text":
            return result("text_outside_message", i, "text after a message's stop token")
        elif msgs or kinds[i] not in ("text", "channel", "message"):
            return result("unexpected_token", i, f"{_name(kinds[i])} where a header belongs")
        while i < len(kinds) and kinds[i] in ("text", "channel", "constrain"):
            i += 1
        if i == len(kinds):
            return result("header_cut_off", h0, "the completion ends inside a message header")
        if kinds[i] != "message":
            return result("unexpected_token", i, f"{_name(kinds[i])} inside a message header")
        role, channel, recipient, constrained = _header(pieces, kinds, h0, i, not msgs)
        # ---- content, then its stop token
        a = i = i + 1
        while i < len(kinds) and kinds[i] == "text":
            i += 1
        stop = "" if i == len(kinds) else kinds[i]
        if stop == "start":
            return result("unterminated_message", i, "<|start|> before the message's stop token")
        if stop in ("channel", "message", "constrain"):
            return result("unexpected_token", i, f"{_name(stop)} inside a message's content")
        msgs.append(GeneratedMessage(role, channel, recipient, constrained, (a, i), stop))
        # ---- what the message is, in order of the text
        if role != "assistant":
            return result("unknown_role", h0, f"role {role!r}")
        if recipient is not None or constrained or stop == "call":
            return result("tool_call", h0, f"a message to {recipient or '(a tool)'}")
        if channel == "commentary":
            return result("commentary", h0, "a commentary message")
        if channel not in ("analysis", "final"):
            return result("unknown_channel", h0, f"channel {channel!r}")
        if channel == "analysis" and "final" in seen:
            return result("final_before_analysis", h0, "an analysis message after the final")
        if channel in seen:
            return result("repeated_channel", h0, f"a second {channel} message")
        seen[channel] = (a, i)
        if channel == "analysis":
            if stop in ("return", "special"):
                return result("no_final_message", i, f"{_name(stop)} ends the analysis")
            closed = stop == "end"
            if stop == "":
                return result(truncated=True)
            i += 1
            continue
        # the final message
        if stop == "":
            return result(truncated=True)
        if stop == "return":
            if i + 1 < len(kinds):
                return result("text_outside_message", i + 1, "tokens after <|return|>")
            return result(keep=min(i + 1, n))
        if stop == "end" and i + 1 < len(kinds) and kinds[i + 1] == "start":
            i += 1  # the teacher went on with another message: its turn was not over
            continue
        if not repair:
            return result("end_instead_of_return", i, f"{_name(stop)} ends the final message")
        tail = len(kinds) - i - 1
        return result(
            keep=min(i + 1, n),
            repair=REPAIR_FINAL_END,
            at=i,
            detail=f"{_name(stop)} ends the final message; {tail} later tokens dropped",
        )
    if ended_by == "" or (ended_by is None and closed):
        # cut at max_tokens between messages, after a complete analysis
        return result(truncated=True)
    return result("no_final_message", n, "the completion ends without a final message")


def _name(kind: str) -> str:
    return next((t for t, k in _KINDS.items() if k == kind), "an EOS token" if kind else "")


def _header(pieces, kinds, h0: int, h1: int, first: bool) -> tuple[str, str, str | None, bool]:
    """(role, channel, recipient, constrained) of the header tokens [h0, h1)."""
    parts = {"role": "", "channel": "", "constrain": ""}
    at = "role"
    for k in range(h0, h1):
        if kinds[k] in ("channel", "constrain"):
            at = kinds[k]
        elif kinds[k] == "text":
            parts[at] += _text(pieces[k])
    words = parts["role"].split()
    # the prompt ends with `<|start|>assistant`: the first header may start at `<|channel|>`
    # (or at a recipient, ` to=functions.x`)
    role = "assistant" if first and kinds[h0] != "start" else (words[0] if words else "")
    channel = parts["channel"].split()
    to = re.search(r"to=(\S+)", parts["role"] + " " + parts["channel"])
    return (
        role,
        channel[0] if channel else "",
        to.group(1) if to else None,
        "constrain" in kinds[h0:h1],
    )


def split_special_text(text: str) -> tuple[list[str], list[bool]]:
    """Text with harmony's special tokens written out -> (pieces, is-special flags)."""
    pieces, special, pos = [], [], 0
    for m in _SPECIAL_TEXT.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
            special.append(False)
        pieces.append(m.group())
        special.append(True)
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
        special.append(False)
    return pieces, special


def think_parts(parsed: GeneratedHarmony, contents: dict[str, str]) -> tuple[str, str | None]:
    """(analysis, final) for `think_text` of a well-formed completion, from its messages'
    content texts. A complete analysis without a final (cut between messages) closes the
    thinking with an empty answer; one cut inside it stays open (final None)."""
    final = contents.get("final")
    if final is None and parsed.analysis_closed:
        final = ""
    return contents.get("analysis", ""), final


def parse_generated_text(
    text: str, ended_by: str | None = None, repair: bool = True
) -> tuple[GeneratedHarmony, str | None]:
    """`parse_generated` of a completion written out as text, with its `<think>` form
    (`think_text` of its analysis and final, `think_parts`' rule for a missing final); None
    for a malformed one."""
    pieces, special = split_special_text(text)
    parsed = parse_generated(pieces, special, ended_by, repair)
    if not parsed.ok:
        return parsed, None
    contents = {
        ch: "".join(pieces[r[0] : r[1]])
        for ch, r in (("analysis", parsed.analysis), ("final", parsed.final))
        if r is not None
    }
    return parsed, think_text(*think_parts(parsed, contents))


def harmony_to_think(text: str, ended_by: str | None = None, repair: bool = True) -> str:
    """The `<think>` form of a completion written out as text (`parse_generated_text`);
    ValueError naming the `MALFORMED` reason for a malformed one. Text without harmony tokens
    is returned as is."""
    if not _SPECIAL_TEXT.search(text):
        return text
    parsed, think = parse_generated_text(text, ended_by, repair)
    if think is None:
        raise ValueError(f"{parsed.reason}: {parsed.detail}")
    return think


# --------------------------------------------------------------------------- <think> form


def think_text(analysis: str, final: str | None) -> str:
    """`<think>\\n{analysis}\\n</think>\\n\\n{final}`; without a final, the open think block."""
    text = THINK_OPEN + "\n" + analysis
    if final is None:
        return text
    return text + "\n" + THINK_CLOSE + "\n\n" + final


def think_spans(analysis: str, final: str | None) -> tuple[Span, Span | None]:
    """Character spans of the analysis and the final answer inside `think_text(...)`."""
    a0 = len(THINK_OPEN) + 1
    a_span = (a0, a0 + len(analysis))
    if final is None:
        return a_span, None
    f0 = a_span[1] + len("\n" + THINK_CLOSE + "\n\n")
    return a_span, (f0, f0 + len(final))


_THINK = re.compile(r"<think>\n?(?P<think>.*?)\n?</think>(?:\n\n)?(?P<answer>.*)\Z", re.S)


def split_think(text: str) -> tuple[str, str]:
    """Inverse of `think_text` (the newlines around the tags are optional): (analysis, final)."""
    m = _THINK.match(text)
    if m is None:
        raise ValueError("expected '<think>...</think>answer' text")
    return m.group("think"), m.group("answer")


def channels_from_completion(
    text: str, ended_by: str | None = None, repair: bool = True
) -> tuple[str | None, str | None]:
    """(analysis, final) contents of a generated completion written out as text (None where a
    message is absent); ValueError naming the `MALFORMED` reason otherwise."""
    pieces, special = split_special_text(text)
    parsed = parse_generated(pieces, special, ended_by, repair)
    if not parsed.ok:
        raise ValueError(f"{parsed.reason}: {parsed.detail}")
    a, f = parsed.analysis, parsed.final
    return (
        None if a is None else "".join(pieces[a[0] : a[1]]),
        None if f is None else "".join(pieces[f[0] : f[1]]),
    )


# --------------------------------------------------------------------------- offsets


def map_spans(offsets: Sequence[Span], segments: Sequence[tuple[int, int, int]]) -> list[Span]:
    """Map character spans through aligned `segments` (src_start, dst_start, length).

    Characters inside a segment move with it; a span that touches no segment (markup, such as
    `<|channel|>` or the word "assistant") becomes the empty span at the destination position
    of the next segment (or the end of the last one), so the result stays ordered.
    """
    segs = sorted(segments)
    out = []
    for s, e in offsets:
        hit = [(max(s, a), min(e, a + n), b - a) for a, b, n in segs if s < a + n and a < e]
        if hit:
            out.append((hit[0][0] + hit[0][2], hit[-1][1] + hit[-1][2]))
            continue
        after = [b for a, b, _ in segs if a >= e]
        pos = after[0] if after else (segs[-1][1] + segs[-1][2] if segs else 0)
        out.append((pos, pos))
    return out


def think_offsets(
    rendered: HarmonyText, offsets: Sequence[Span], analysis: str, final: str | None
) -> list[Span]:
    """Teacher token spans in `rendered.text` -> spans in `think_text(analysis, final)`.

    Tokens of the analysis and final contents land on the same characters of the think text
    (the contents are verbatim in both); prompt and markup tokens get empty spans. Then the
    teacher's and the student's tokens (on the think text, or on the student's chat rendering
    of it) cover the same response characters.
    """
    a_think, f_think = think_spans(analysis, final)
    segments = []
    if rendered.analysis is not None:
        segments.append((rendered.analysis[0], a_think[0], len(analysis)))
    if rendered.final is not None and f_think is not None:
        segments.append((rendered.final[0], f_think[0], len(final)))
    return map_spans(offsets, segments)
