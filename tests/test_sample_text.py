"""Sampled ids -> text with exact spans; stop-string cuts; harmony -> <think> with the ingest
stage's token spans; prompt rendering."""

import pytest

from dasd_jax.models import harmony
from dasd_jax.models import harmony as hm
from dasd_jax.sample.text import Mapped, TokenText, cut_at, map_response, render_prompt
from dasd_jax.select.filters import harmony_to_think
from dasd_jax.tokenizer import (
    build_gpt_oss_tokenizer,
    build_qwen3_tokenizer,
    encode_with_offsets,
    load_tokenizer,
    render_chat,
    text_of_pieces,
)


@pytest.fixture(scope="module")
def qwen3():
    return TokenText(load_tokenizer(build_qwen3_tokenizer()))


@pytest.fixture(scope="module")
def gpt_oss():
    return TokenText(load_tokenizer(build_gpt_oss_tokenizer()))


def test_text_and_spans_from_sampled_ids(qwen3):
    text = "<think>\nCafé 🙂 = 2+2</think>\n\n4"
    ids = qwen3.tokenizer.encode(text, add_special_tokens=False)
    got, offsets = qwen3.text(ids)
    assert got == text
    assert offsets == encode_with_offsets(qwen3.tokenizer, text)[1]  # the one byte rule
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    # incremental building gives the same text; a character split across tokens lies in the
    # span of every token holding one of its bytes
    emoji = "🙂".encode()
    pieces = [emoji[:2], emoji[2:]]
    ids2 = [qwen3.id_of_bytes(p) for p in pieces]
    assert None not in ids2
    tb = qwen3.builder()
    assert [tb.add(i) for i in ids2] == ["", "🙂"]
    assert tb.finish() == ("🙂", [(0, 1), (0, 1)])
    # a sample cut inside a character and ids past the tokenizer (a padded vocabulary)
    got, offs = qwen3.text([ids2[0], 151_900])
    assert got == "\ufffd" and offs == [(0, 1), (1, 1)]


@pytest.mark.parametrize(
    "pieces, text, spans",
    [
        # "a" + the parrot's 4 bytes as 3 + 1, then "b": both tokens spell the parrot
        ([b"a\xf0\x9f\xa6", b"\x9cb"], "a🦜b", [(0, 2), (1, 3)]),
        # an empty piece inside a character sits at it
        ([b"\xf0\x9f", b"", b"\xa6\x9c"], "🦜", [(0, 1), (0, 0), (0, 1)]),
        # an unfinished character then "A": one U+FFFD held by the first token only
        ([b"\xf0\x9f", b"A"], "\ufffdA", [(0, 1), (1, 2)]),
        # a surrogate's 3 bytes are 3 invalid sequences, 3 U+FFFD
        ([b"x\xed", b"\xa0\x80y"], "x\ufffd\ufffd\ufffdy", [(0, 2), (2, 5)]),
        # a trailing incomplete character: U+FFFD, in the spans of the tokens holding it
        ([b"ok\xe6", b"\x97", b""], "ok\ufffd", [(0, 3), (2, 3), (3, 3)]),
    ],
)
def test_text_of_pieces_byte_rule(qwen3, pieces, text, spans):
    assert text_of_pieces(pieces) == (text, spans)
    ids = [qwen3.id_of_bytes(p) for p in pieces]
    if None not in ids:  # the builder, fed the same bytes as ids, agrees
        tb = qwen3.builder()
        streamed = "".join(tb.add(i) for i in ids)
        assert tb.finish() == (text, spans) and text.startswith(streamed)


def test_cut_at_keeps_the_tokens_that_start_before_the_stop(qwen3):
    text, offsets = "ab\ncd", [(0, 2), (2, 4), (4, 5)]
    assert cut_at(text, offsets, 2) == ("ab", [(0, 2)], 1)
    assert cut_at(text, offsets, 3) == ("ab\n", [(0, 2), (2, 3)], 2)
    assert cut_at(text, offsets, 0) == ("", [], 0)


def test_prompt_formats():
    assert render_prompt("Hi", "chatml", "Sys") == render_chat("Hi", None, "Sys").text
    assert render_prompt("Hi", "chatml", "") == render_chat("Hi", None, None).text
    h = render_prompt("Hi", "harmony", "Sys", "high")
    assert h == harmony.render_prompt("Hi", "Sys", harmony.HarmonySystem(reasoning_effort="high"))
    assert h.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")
    with pytest.raises(ValueError, match="prompt format"):
        render_prompt("Hi", "llama", None)


@pytest.mark.parametrize(
    "completion, ended",
    [
        (
            "<|channel|>analysis<|message|>Let me think: 2+2=4.<|end|><|start|>assistant"
            "<|channel|>final<|message|>It is **4**.<|return|>",
            None,
        ),
        ("<|channel|>analysis<|message|>Cut off in the mid", ""),  # a length-limited sample
        (  # the engine drops the EOS
            "<|channel|>analysis<|message|>Héllo 🤔 日本<|end|><|start|>assistant"
            "<|channel|>final<|message|>C 🎉",
            "<|return|>",
        ),
    ],
)
def test_harmony_maps_to_think_with_content_spans(gpt_oss, completion, ended):
    ids = gpt_oss.tokenizer.encode(completion, add_special_tokens=False)
    raw, offsets = gpt_oss.text(ids)
    assert raw == completion
    m = map_response(raw, ids, offsets, gpt_oss, "harmony", ended)
    assert m.reason is None and m.keep == len(ids) and m.response == harmony_to_think(raw)
    assert m.response.startswith("<think>\n")
    pieces = [gpt_oss.bytes_of(i) for i in ids]
    covered = set()
    for piece, i, (a, b) in zip(pieces, ids, m.offsets, strict=True):
        covered.update(range(a, b))
        if gpt_oss.is_special(i) or a == b or not _whole_utf8(piece):
            continue  # markers and header words fall in no sentence; split characters
        assert m.response[a:b] == piece.decode("utf-8")
    # the content tokens cover exactly the analysis and the final characters
    a_span, f_span = hm.think_spans(*hm.split_think(m.response)) if ended != "" else (None, None)
    if a_span is not None:
        assert covered == set(range(*a_span)) | set(range(*f_span))
    # spans are monotone and inside the response
    assert all(s1[0] <= s2[0] for s1, s2 in zip(m.offsets, m.offsets[1:], strict=False))
    assert m.offsets[-1][1] <= len(m.response)


def _whole_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_malformed_harmony_is_refused_and_the_repair_keeps_exact_tokens(gpt_oss):
    commentary = (
        "<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>B<|end|><|start|>assistant<|channel|>final<|message|>C"
    )
    ids = gpt_oss.tokenizer.encode(commentary, add_special_tokens=False)
    raw, offsets = gpt_oss.text(ids)
    m = map_response(raw, ids, offsets, gpt_oss, "harmony", "<|return|>")
    assert (m.reason, m.offsets, m.response) == ("commentary", None, raw)
    # the fixture's form: <|end|> after the final, text outside any message, another final
    good = "<|channel|>analysis<|message|>R<|end|><|start|>assistant<|channel|>final<|message|>4"
    tail = "<|end|> $x = 4.<|end|><|start|>assistant<|channel|>final<|message|>5"
    ids = gpt_oss.tokenizer.encode(good + tail, add_special_tokens=False)
    n_good = len(gpt_oss.tokenizer.encode(good + "<|end|>", add_special_tokens=False))
    raw, offsets = gpt_oss.text(ids)
    m = map_response(raw, ids, offsets, gpt_oss, "harmony", "<|return|>")
    assert m.reason is None and m.keep == n_good and len(m.offsets) == n_good
    assert m.response == "<think>\nR\n</think>\n\n4"
    assert m.harmony["repair"] == "cut_at_final_end" and m.harmony["dropped_tokens"] > 0
    off = map_response(raw, ids, offsets, gpt_oss, "harmony", "<|return|>", repair=False)
    assert off.reason == "end_instead_of_return"


def test_chatml_responses_are_unchanged(qwen3):
    ids = qwen3.tokenizer.encode("<think>\nx\n</think>\n\ny", add_special_tokens=False)
    raw, offsets = qwen3.text(ids)
    assert map_response(raw, ids, offsets, qwen3, "chatml") == Mapped(raw, offsets, len(ids))


def test_stop_strings_are_found_across_token_boundaries(qwen3):
    from dasd_jax.sample.driver import Driver, Request, _Run
    from dasd_jax.sample.sampling import SamplingParams

    text = "hello world, hello moon"
    ids = qwen3.tokenizer.encode(text, add_special_tokens=False)
    for stop, at in [("lo w", 3), ("moon", 19), ("d, h", 10), ("xyz", None)]:
        sp = SamplingParams(stop=(stop, "zzzz"))
        run = _Run(Request(0, [1], [sp]), 0, sp, qwen3.builder())
        hit = None
        for t in ids:
            hit = Driver._stop_string(None, run, t)
            if hit:
                break
        assert (hit[1] if hit else None) == at and (hit is None or hit[0] == stop)
