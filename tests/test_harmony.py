"""Harmony rendering (golden output of OpenAI's openai-harmony renderer), parsing, the
<think> mapping, and teacher/student character offsets on the real tokenizers."""

from __future__ import annotations

import pytest

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


def test_parse_completion_and_channels():
    completion = GOLDEN_TEXT[len(hm.render_prompt(USER, "You are a helpful assistant.", SYSTEM)) :]
    msgs = hm.parse_completion(completion)
    assert [(m.channel, m.content, m.stop) for m in msgs] == [
        ("analysis", ANALYSIS, hm.END),
        ("final", FINAL, hm.RETURN),
    ]
    assert all(completion[m.span[0] : m.span[1]] == m.content for m in msgs)
    assert hm.channels_from_completion(completion) == (ANALYSIS, FINAL)
    # a truncated sample: reasoning without its <|end|>
    assert hm.channels_from_completion("<|channel|>analysis<|message|>so far") == ("so far", None)
    tool = (
        "<|channel|>analysis<|message|>need a tool<|end|><|start|>assistant<|channel|>commentary"
        ' to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
    )
    msgs = hm.parse_completion(tool)
    assert msgs[1].recipient == "functions.get_weather" and msgs[1].is_tool_call
    with pytest.raises(ValueError, match="tool call"):
        hm.channels_from_completion(tool)
    with pytest.raises(ValueError, match="not a harmony message"):
        hm.parse_completion("plain text")


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
    reasoning and the answer is covered exactly once by each model's tokens."""
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
    assert "".join(response[s:e] for s, e in s_resp) == response  # student tiles it all

    for name, spans in (("teacher", t_resp), ("student", s_resp)):
        for lo, hi in (a, f):
            covered = [0] * (hi - lo)
            for s, e in spans:
                for c in range(max(s, lo), min(e, hi)):
                    covered[c - lo] += 1
            assert covered == [1] * (hi - lo), name
    # the teacher's tokens cover only its own text: none of the <think> markup
    assert "".join(response[s:e] for s, e in t_resp) == analysis + final
    assert len(t_ids) != len(s_ids) or t_ids != s_ids  # two different tokenizations


def test_map_spans_places_markup_at_boundaries():
    segs = [(10, 0, 5), (20, 8, 3)]
    assert hm.map_spans([(0, 10), (10, 12), (12, 15), (15, 20), (20, 23), (23, 30)], segs) == [
        (0, 0), (0, 2), (2, 5), (8, 8), (8, 11), (11, 11),
    ]  # fmt: skip
