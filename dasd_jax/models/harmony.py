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


@dataclass(frozen=True)
class HarmonyMessage:
    """One parsed assistant message. `span`: its content's characters in the parsed text.
    `stop`: the token that ended it ("" when the text ends first: a truncated sample)."""

    channel: str
    recipient: str | None
    content: str
    span: Span
    stop: str

    @property
    def is_tool_call(self) -> bool:
        return self.recipient is not None or self.stop == CALL


_HEADER = re.compile(
    r"(?:<\|start\|>(?P<role>[^<]*))?<\|channel\|>(?P<channel>[^<\s]+)(?P<rest>[^<]*)"
    r"(?:<\|constrain\|>[^<]*)?<\|message\|>"
)
_STOPS = (END, RETURN, CALL)


def parse_completion(text: str) -> list[HarmonyMessage]:
    """Messages of a completion (optionally starting with `<|start|>assistant`).

    A recipient (`to=functions.x`) may sit in the role or after the channel name. Raises
    ValueError on text between messages that is not harmony markup.
    """
    out: list[HarmonyMessage] = []
    pos = 0
    while pos < len(text):
        m = _HEADER.match(text, pos)
        if m is None:
            raise ValueError(f"not a harmony message at character {pos}: {text[pos : pos + 40]!r}")
        header = (m.group("role") or "") + " " + m.group("rest")
        to = re.search(r"to=(\S+)", header)
        start = m.end()
        ends = [(text.find(s, start), s) for s in _STOPS]
        ends = [(i, s) for i, s in ends if i >= 0]
        nxt = text.find(START, start)  # a message may be cut without a stop token
        if nxt >= 0:
            ends.append((nxt, ""))
        end, stop = min(ends) if ends else (len(text), "")
        out.append(
            HarmonyMessage(
                m.group("channel"), to.group(1) if to else None, text[start:end], (start, end), stop
            )
        )
        pos = end + len(stop)
    return out


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


def channels_from_completion(text: str) -> tuple[str | None, str | None]:
    """(analysis, final) of a plain completion (one of each at most); raises on tool calls or
    extra messages, which the data filters drop anyway."""
    analysis = final = None
    for msg in parse_completion(text):
        if msg.is_tool_call:
            raise ValueError(f"tool call to {msg.recipient!r} in the completion")
        if msg.channel == "analysis" and analysis is None and final is None:
            analysis = msg.content
        elif msg.channel == "final" and final is None:
            final = msg.content
        else:
            raise ValueError(f"unexpected {msg.channel!r} message in the completion")
    return analysis, final


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
