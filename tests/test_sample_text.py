"""Sampled ids -> text with exact spans; stop-string cuts; harmony -> <think> with the ingest
stage's token spans; prompt rendering."""

import pytest

from dasd_jax.models import harmony
from dasd_jax.sample.text import TokenText, cut_at, map_response, render_prompt
from dasd_jax.select.filters import harmony_to_think
from dasd_jax.tokenizer import (
    build_gpt_oss_tokenizer,
    build_qwen3_tokenizer,
    load_tokenizer,
    render_chat,
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
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    # incremental building gives the same pieces, a character split across tokens belongs
    # to the token holding its last byte
    emoji = "🙂".encode()
    pieces = [emoji[:2], emoji[2:]]
    ids2 = [qwen3.id_of_bytes(p) for p in pieces]
    assert None not in ids2
    tb = qwen3.builder()
    assert [tb.add(i) for i in ids2] == ["", "🙂"]
    assert tb.finish() == ("🙂", [(0, 0), (0, 1)])
    # a sample cut inside a character and ids past the tokenizer (a padded vocabulary)
    got, offs = qwen3.text([ids2[0], 151_900])
    assert got == "\ufffd" and offs == [(0, 1), (1, 1)]


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
    "completion",
    [
        "<|channel|>analysis<|message|>Let me think: 2+2=4.<|end|><|start|>assistant"
        "<|channel|>final<|message|>It is **4**.<|return|>",
        "<|channel|>analysis<|message|>Cut off in the mid",  # a length-limited sample
        "<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>commentary"
        "<|message|>B<|end|><|start|>assistant<|channel|>final<|message|>C",
    ],
)
def test_harmony_maps_to_think_with_content_spans(gpt_oss, completion):
    ids = gpt_oss.tokenizer.encode(completion, add_special_tokens=False)
    raw, offsets = gpt_oss.text(ids)
    assert raw == completion
    response, spans, problem = map_response(raw, ids, offsets, gpt_oss, "harmony")
    assert problem is None and response == harmony_to_think(raw)
    assert response.startswith("<think>\n")
    pieces = [gpt_oss.bytes_of(i) for i in ids]
    for piece, i, (a, b) in zip(pieces, ids, spans, strict=True):
        if gpt_oss.is_special(i) or a == b:
            continue  # channel markers fall in no sentence
        assert response[a:b] == piece.decode("utf-8")
    # spans are monotone and inside the response
    assert all(s1[0] <= s2[0] for s1, s2 in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= len(response)


def test_chatml_responses_are_unchanged(qwen3):
    ids = qwen3.tokenizer.encode("<think>\nx\n</think>\n\ny", add_special_tokens=False)
    raw, offsets = qwen3.text(ids)
    assert map_response(raw, ids, offsets, qwen3, "chatml") == (raw, offsets, None)


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
