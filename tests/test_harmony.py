"""Harmony rendering (golden output of OpenAI's openai-harmony renderer), parsing, the
<think> mapping, and teacher/student character offsets on the real tokenizers."""

from __future__ import annotations

import pytest
from harmony_forms import A_, F_, GENERATED

from dasd_jax import tokenizer as tk
from dasd_jax.models import harmony as hm

SYSTEM = hm.HarmonySystem(current_date="2025-06-28", reasoning_effort="high")
USER = "Évaluez $\\int_0^1 x^2\\,dx$ 🤔 — 你好!\n```py\nprint('hi')\n```"
ANALYSIS = "We need ∫₀¹ x² dx = 1/3. Check: 🙂\n\nDone."
FINAL = "**Answer:** $\\frac{1}{3}$ ✅"

# openai-harmony 0.0.8, HarmonyEncodingName.HARMONY_GPT_OSS, render_conversation_for_training
# with auto_drop_analysis=False of [system(high, 2025-06-28), developer("You are a helpful
# assistant."), user(USER), assistant/analysis(ANALYSIS), assistant/final(FINAL)].
GOLDEN_TEXT = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: high\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every "
    "message.<|end|><|start|>developer<|message|># Instructions\n\nYou are a helpful "
    "assistant.<|end|><|start|>user<|message|>" + USER + "<|end|><|start|>assistant"
    "<|channel|>analysis<|message|>" + ANALYSIS + "<|end|><|start|>assistant<|channel|>final"
    "<|message|>" + FINAL + "<|return|>"
)
GOLDEN_IDS = [
    200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656,
    7788, 17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 198, 6576, 3521, 25, 220,
    1323, 20, 12, 3218, 12, 2029, 279, 30377, 289, 25, 1932, 279, 2, 13888, 18403, 25, 8450,
    11, 49159, 11, 1721, 13, 21030, 2804, 413, 7360, 395, 1753, 3176, 13, 200007, 200006,
    77944, 200008, 2, 68406, 279, 3575, 553, 261, 10297, 29186, 13, 200007, 200006, 1428,
    200008, 5859, 1594, 89, 126456, 491, 62, 15, 61, 16, 1215, 61, 17, 40037, 22100, 3, 93643,
    242, 2733, 220, 177519, 4175, 168394, 5823, 198, 1598, 706, 3686, 2515, 168394, 200007,
    200006, 173781, 200005, 35644, 200008, 2167, 1309, 35353, 104, 38207, 222, 84125, 1215,
    13848, 29472, 314, 220, 16, 14, 18, 13, 6208, 25, 41937, 24537, 13, 200007, 200006,
    173781, 200005, 17196, 200008, 410, 17045, 142760, 126456, 63757, 90, 16, 29124, 18,
    61526, 91349, 200002,
]  # fmt: skip
GOLDEN_PROMPT_TOKENS = 109  # render_conversation_for_completion(first three, assistant)
# default SystemContent (no date, medium effort), a user turn, for completion
GOLDEN_DEFAULT = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n# Valid channels: analysis, commentary, "
    "final. Channel must be included for every message.<|end|><|start|>user<|message|>Hi"
    "<|end|><|start|>assistant"
)

TEXTS = [  # Unicode, LaTeX, code, emoji (incl. ZWJ sequences and skin tones), CJK, RTL
    (ANALYSIS, FINAL),
    ("Let f(x)=\\sum_{n\\ge1} \\frac{x^n}{n!}; so f'(x)=f(x)+1 ⇒ f=e^x-1.", "$e^x - 1$"),
    ('```rust\nfn main() { println!("héllo {}", 42); }\n```\nLooks fine 👍🏽', "Yes."),
    ("家族 👨\u200d👩\u200d👧 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢; עברית ✓", "日本語: はい 🎉"),
    ("  leading spaces\n\n\ttabs\r\n", "  trailing  "),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache = tmp_path_factory.mktemp("tok_cache")
    return (
        tk.load_tokenizer(tk.build_gpt_oss_tokenizer(cache)),
        tk.load_tokenizer(tk.build_qwen3_tokenizer(cache)),
    )


def test_render_equals_openai_harmony_golden(tokenizers):
    gpt_oss, _ = tokenizers
    r = hm.render(USER, ANALYSIS, FINAL, developer="You are a helpful assistant.", system=SYSTEM)
    assert r.text == GOLDEN_TEXT
    assert r.text[r.analysis[0] : r.analysis[1]] == ANALYSIS
    assert r.text[r.final[0] : r.final[1]] == FINAL
    ids, _ = tk.encode_with_offsets(gpt_oss, r.text)
    assert ids == GOLDEN_IDS
    prompt_ids, _ = tk.encode_with_offsets(gpt_oss, r.text[: r.completion_start])
    assert len(prompt_ids) == GOLDEN_PROMPT_TOKENS and prompt_ids == ids[:GOLDEN_PROMPT_TOKENS]
    assert hm.render_prompt("Hi") == GOLDEN_DEFAULT
    assert ids[-1] == hm.TOKEN_IDS[hm.RETURN]


def test_parse_generated_well_formed_and_channels():
    completion = GOLDEN_TEXT[len(hm.render_prompt(USER, "You are a helpful assistant.", SYSTEM)) :]
    pieces, special = hm.split_special_text(completion)
    parsed = hm.parse_generated(pieces, special)
    assert parsed.ok and not parsed.truncated and parsed.keep == len(pieces)
    assert [(m.channel, m.stop) for m in parsed.messages] == [
        ("analysis", "end"),
        ("final", "return"),
    ]
    assert "".join(pieces[slice(*parsed.analysis)]) == ANALYSIS
    assert "".join(pieces[slice(*parsed.final)]) == FINAL
    assert hm.channels_from_completion(completion) == (ANALYSIS, FINAL)
    # a truncated sample: reasoning without its <|end|>
    assert hm.channels_from_completion("<|channel|>analysis<|message|>so far") == ("so far", None)
    assert hm.channels_from_completion("<|channel|>final<|message|>4<|return|>") == (None, "4")
    tool = (
        "<|channel|>analysis<|message|>need a tool<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    parsed = hm.parse_generated(*hm.split_special_text(tool))
    assert parsed.reason == "tool_call" and parsed.messages[1].recipient == "functions.get_weather"
    assert parsed.messages[1].constrained and parsed.messages[1].stop == "call"
    with pytest.raises(ValueError, match="tool_call"):
        hm.channels_from_completion(tool)


@pytest.mark.parametrize("text, ended_by, repair, reason", GENERATED)
def test_every_malformed_form_is_named(text, ended_by, repair, reason):
    parsed = hm.parse_generated(*hm.split_special_text(text), ended_by, repair)
    assert parsed.reason == reason, parsed.detail
    assert parsed.ok == (reason is None)
    if reason is not None:
        assert reason in hm.MALFORMED and parsed.detail.startswith("token ")
    if reason is not None and text:  # text without harmony tokens passes through as is
        with pytest.raises(ValueError, match=reason):
            hm.harmony_to_think(text, ended_by, repair)


def test_the_table_covers_every_reason():
    assert {r for *_, r in GENERATED} - {None} == set(hm.MALFORMED)


def test_repair_cuts_at_the_final_messages_end():
    """The fixture's form (tiny teacher, T=1.0): the final ends with <|end|>, then text outside
    any message, then another final. The repair keeps everything up to that <|end|>."""
    text = A_ + F_ + "<|end|> $x = 408.<|end|>" + F_ + "<|return|>"
    pieces, special = hm.split_special_text(text)
    parsed = hm.parse_generated(pieces, special)
    assert parsed.ok and parsed.repair == hm.REPAIR_FINAL_END
    assert pieces[parsed.keep - 1] == "<|end|>" and parsed.keep == 12
    assert parsed.dropped == len(pieces) - 12
    assert parsed.meta()["dropped_tokens"] == parsed.dropped
    assert hm.harmony_to_think(text) == "<think>\nReason.\n</think>\n\nAnswer."
    # the same completion ended by another EOS, or cut right after the <|end|>
    assert hm.parse_generated(*hm.split_special_text(A_ + F_), "<|endoftext|>").repair
    assert hm.parse_generated(*hm.split_special_text(A_ + F_ + "<|end|>"), "").repair
    # a new message after the final's <|end|> is not repaired: the teacher went on
    again = A_ + F_ + "<|end|>" + F_ + "<|return|>"
    assert hm.parse_generated(*hm.split_special_text(again)).reason == "repeated_channel"
    off = hm.parse_generated(pieces, special, repair=False)
    assert off.reason == "end_instead_of_return" and off.keep == len(pieces)


def test_parse_generated_on_real_token_ids(tokenizers):
    """Token ids of the real o200k_harmony vocabulary, ended by the EOS the engine drops;
    text that spells a marker without being its special token is content, not structure."""
    gpt_oss, _ = tokenizers
    ids = gpt_oss.encode(A_ + F_, add_special_tokens=False)
    lit = gpt_oss.encode("<|end|>", add_special_tokens=False, split_special_tokens=True)
    assert hm.TOKEN_IDS[hm.END] not in lit and len(lit) > 1
    for extra in ([], lit):
        pieces = tk.token_bytes(gpt_oss, ids + extra)
        special = [i >= 199998 for i in ids + extra]  # o200k_harmony's special ids
        parsed = hm.parse_generated(pieces, special, "<|return|>")
        assert parsed.ok and parsed.keep == len(ids) + len(extra) and not parsed.repair
        final = b"".join(pieces[slice(*parsed.final)]).decode()
        assert final == "Answer." + ("<|end|>" if extra else "")


def test_think_mapping_round_trip_and_agrees_with_the_filters():
    text = hm.think_text(ANALYSIS, FINAL)
    assert text == f"<think>\n{ANALYSIS}\n</think>\n\n{FINAL}"
    assert hm.split_think(text) == (ANALYSIS, FINAL)
    a, f = hm.think_spans(ANALYSIS, FINAL)
    assert text[a[0] : a[1]] == ANALYSIS and text[f[0] : f[1]] == FINAL
    with pytest.raises(ValueError, match="think"):
        hm.split_think("no tags")
    from dasd_jax.select import filters

    completion = hm.render_completion(ANALYSIS, FINAL)
    assert filters.harmony_to_think(completion) == text
    assert filters.think_to_harmony(text) == completion


@pytest.mark.parametrize("analysis, final", TEXTS)
def test_teacher_and_student_offsets_cover_the_same_text(tokenizers, analysis, final):
    """The teacher's gpt-oss tokens of its harmony text and the student's Qwen3 tokens of its
    ChatML text, both mapped onto the response in <think> form: every character of the
    reasoning and the answer is covered by each model's tokens: exactly once when a character
    split across tokens goes to the last token holding its bytes (each span cut at the next
    one's start), and by the spans themselves at least once, more than once only where a token
    boundary splits a multi-byte character (the byte rule: each of those tokens spells it)."""
    gpt_oss, qwen3 = tokenizers
    response = hm.think_text(analysis, final)
    a, f = hm.think_spans(analysis, final)

    rendered = hm.render("Solve it.", analysis, final, system=SYSTEM)
    t_ids, t_off = tk.encode_with_offsets(gpt_oss, rendered.text)
    assert gpt_oss.decode(t_ids) == rendered.text
    t_resp = hm.think_offsets(rendered, t_off, analysis, final)

    chat = tk.render_chat("Solve it.", response)
    s_ids, s_off = tk.encode_with_offsets(qwen3, chat.text)
    s_resp = [
        (
            max(s, chat.response_start) - chat.response_start,
            min(e, chat.response_end) - chat.response_start,
        )
        for s, e in s_off
        if s < chat.response_end and e > chat.response_start
    ]
    assert "".join(response[s:e] for s, e in _cut_at_next_start(s_resp)) == response

    def coverage(spans, lo, hi):
        covered = [0] * (hi - lo)
        for s, e in spans:
            for c in range(max(s, lo), min(e, hi)):
                covered[c - lo] += 1
        return covered

    for name, spans in (("teacher", t_resp), ("student", s_resp)):
        for lo, hi in (a, f):
            assert coverage(_cut_at_next_start(spans), lo, hi) == [1] * (hi - lo), name
            for c, k in enumerate(coverage(spans, lo, hi), lo):
                assert k == 1 or (k > 1 and len(response[c].encode()) > 1), (name, c)
    # the teacher's tokens cover only its own text: none of the <think> markup
    assert "".join(response[s:e] for s, e in _cut_at_next_start(t_resp)) == analysis + final
    assert len(t_ids) != len(s_ids) or t_ids != s_ids  # two different tokenizations


def _cut_at_next_start(spans):
    """Each span cut at the next one's start: a character split across tokens goes to the last
    token holding its bytes (the tiling the byte rule's overlapping spans give back)."""
    nxt = [s for s, _ in spans[1:]] + [spans[-1][1]]
    return [(a, max(a, min(b, c))) for (a, b), c in zip(spans, nxt, strict=True)]


def test_map_spans_places_markup_at_boundaries():
    segs = [(10, 0, 5), (20, 8, 3)]
    assert hm.map_spans([(0, 10), (10, 12), (12, 15), (15, 20), (20, 23), (23, 30)], segs) == [
        (0, 0), (0, 2), (2, 5), (8, 8), (8, 11), (11, 11),
    ]  # fmt: skip
