"""Filters: one case per reason, harmony round trip, repetition, math-verify in worker processes."""

import math
import time

import pytest

from dasd_jax.select.filters import (
    FilterConfig,
    FilterInput,
    apply_filters,
    check_repetition,
    check_structure,
    count_reasons,
    extract_final_answer,
    filter_batch,
    harmony_to_think,
    map_with_timeout,
    max_line_run,
    max_ngram_count,
    think_to_harmony,
    verify_answer,
)

GOOD = "<think>\nLet me add 2 and 2. That is 4.\n</think>\n\nThe answer is $\\boxed{4}$."


def test_length():
    cfg = FilterConfig()
    assert apply_filters(FilterInput(GOOD, n_student_tokens=65536), cfg) == []
    assert apply_filters(FilterInput(GOOD, n_student_tokens=65537), cfg) == ["too_long"]
    assert apply_filters(FilterInput(GOOD, 9), FilterConfig(max_tokens=8)) == ["too_long"]
    assert apply_filters(FilterInput(GOOD, 10**6), FilterConfig(length=False)) == []
    with pytest.raises(ValueError, match="n_student_tokens"):
        apply_filters(FilterInput(GOOD), cfg)


@pytest.mark.parametrize(
    "text, reason",
    [
        (GOOD, None),
        ("  \n" + GOOD, None),
        ("<think>\nCall it.\n<tool_call>{}</tool_call>\n</think>\n\nA", "tool_call"),
        ("<think>\nx to=functions.get_weather\n</think>\n\nA", "tool_call"),
        ("<think>\nR<|end|>\n</think>\n\nA", "harmony_markers"),
        ("The answer is 4.", "no_think"),
        ("<think>\nNo end in sight.", "no_think"),
        ("<think>\nA\n</think>\n<think>\nB\n</think>\n\nC", "bad_think"),
        ("Preamble. <think>\nA\n</think>\n\nC", "bad_think"),
        ("</think>\nA\n<think>\n\nC", "bad_think"),
        ("<think>\n \n</think>\n\nThe answer.", "empty_think"),
        ("<think>\nReasoning.\n</think>\n\n  \n", "empty_answer"),
    ],
)
def test_structure(text, reason):
    assert check_structure(text) == reason
    rec = FilterInput(text, n_student_tokens=10)
    assert apply_filters(rec) == ([] if reason is None else [reason])
    assert apply_filters(rec, FilterConfig(structure=False)) == []


HARMONY = (
    "<|channel|>analysis<|message|>We need 2+2.\nIt is 4.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>The answer is $\\boxed{4}$.<|return|>"
)
THINK = "<think>\nWe need 2+2.\nIt is 4.\n</think>\n\nThe answer is $\\boxed{4}$."


def test_harmony_round_trip():
    assert harmony_to_think(HARMONY) == THINK
    assert think_to_harmony(THINK) == HARMONY
    assert harmony_to_think("<|start|>assistant" + HARMONY) == THINK
    # servers strip the <|return|> stop token
    assert harmony_to_think(HARMONY.removesuffix("<|return|>")) == THINK
    # reasoning that ends in a newline survives both ways
    h2 = HARMONY.replace("It is 4.", "It is 4.\n")
    assert think_to_harmony(harmony_to_think(h2)) == h2
    # text without harmony messages is left alone; think_to_harmony needs <think>
    assert harmony_to_think(GOOD) == GOOD
    with pytest.raises(ValueError, match="<think>"):
        think_to_harmony("no tags")


def test_harmony_truncated_and_tool_calls():
    assert harmony_to_think("<|channel|>analysis<|message|>Still thinking") == (
        "<think>\nStill thinking"
    )
    assert think_to_harmony("<think>\nStill thinking") == (
        "<|channel|>analysis<|message|>Still thinking"
    )
    assert harmony_to_think("<|channel|>analysis<|message|>R<|end|>") == "<think>\nR\n</think>\n\n"
    tool = (
        "<|channel|>analysis<|message|>Use tool.<|end|><|start|>assistant to=functions.calc"
        '<|channel|>commentary json<|message|>{"x":1}<|call|>'
    )
    # the one parser of generated harmony refuses a tool call, naming it
    with pytest.raises(ValueError, match="tool_call"):
        harmony_to_think(tool)
    assert check_structure(tool) == "tool_call"


PHRASE = " ".join(f"w{i}" for i in range(20)) + " "  # 20 distinct words


def test_ngram_repetition():
    # 20 copies: 400 words, 381 windows; the window starting at a copy boundary occurs at
    # positions 0, 20, ..., 380 -> 20 times (the other rotations 19 times) -> reject.
    assert max_ngram_count(PHRASE * 20, 20) == 20
    assert max_ngram_count(PHRASE * 19, 20) == 19
    cfg = FilterConfig()
    assert check_repetition(PHRASE * 20, cfg) == "ngram_repetition"
    assert check_repetition(PHRASE * 19, cfg) is None
    assert max_ngram_count("a b c a b c a b", 3) == 2  # abc, bca, cab, abc, bca, cab
    assert max_ngram_count("too short", 3) == 0
    assert check_repetition(PHRASE * 5, FilterConfig(ngram_n=5, ngram_repeats=5)) == (
        "ngram_repetition"
    )


def test_line_and_periodic_repetition():
    cfg = FilterConfig()
    line = "The same line here, again.\n"
    assert check_repetition(line * 10, cfg) == "line_repetition"
    assert check_repetition(line * 9, cfg) is None
    assert check_repetition((line + "\n") * 10, cfg) == "line_repetition"  # blanks ignored
    assert max_line_run("ok\n" * 50, 10) == 0  # trivial (short) lines do not count
    assert max_line_run(f"{line}{line}Other line, different.\n{line}", 10) == 2
    # one "word" of 120 characters: no n-gram to count, a periodic run of "10"
    assert check_repetition("x = " + "10" * 60, cfg) == "periodic_repetition"
    assert check_repetition("x = 1" + " 1" * 60, cfg) == "ngram_repetition"  # 61 words
    assert check_repetition("ab" * 50, cfg) == "periodic_repetition"
    assert check_repetition("ab" * 49, cfg) is None
    assert check_repetition("-" * 300 + "\n" + "=" * 300, cfg) is None  # rulers
    assert check_repetition(GOOD, cfg) is None
    assert check_repetition(GOOD, FilterConfig(line_repeats=1, line_min_chars=5)) == (
        "line_repetition"
    )


def test_repetition_is_fast_on_long_text():
    words = [f"tok{i % 997}x{i % 13}" for i in range(60_000)]  # no 20-gram repeats 20 times
    text = "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12))
    start = time.perf_counter()
    assert check_repetition(text, FilterConfig()) is None
    assert time.perf_counter() - start < 2.0


def test_extract_final_answer():
    assert (
        extract_final_answer("<think>\nx\n</think>\n\nSo $\\boxed{\\frac{1}{2}}$ or \\boxed{3}.")
        == "\\boxed{3}"
    )
    assert extract_final_answer("<think>a</think>\\boxed{\\frac{1}{\\sqrt{2}}}") == (
        "\\boxed{\\frac{1}{\\sqrt{2}}}"
    )
    assert extract_final_answer("<think>a</think>\n\nThe answer is 7.") == "The answer is 7."
    assert extract_final_answer("<think>no end") is None
    assert extract_final_answer("<think>a</think>\n \n") is None


def test_verify_answer_in_process():
    assert verify_answer("1/2", "0.5") is True
    assert verify_answer("\\frac{1}{2}", "\\boxed{\\frac{1}{2}}") is True
    assert verify_answer("\\frac12", "$0.5$") is True
    assert verify_answer("3", "\\boxed{4}") is False
    assert verify_answer("", "4") is None  # an unparseable reference cannot be checked


def answer_text(ans):
    return f"<think>\nCompute.\n</think>\n\nSo the answer is ${ans}$."


def test_filter_batch_answers_in_worker_pool():
    cfg = FilterConfig(answer=True, answer_workers=2, answer_timeout_s=20.0)
    records = [
        FilterInput(answer_text("\\boxed{0.5}"), 10, reference_answer="1/2"),
        FilterInput(answer_text("\\boxed{\\frac{1}{2}}"), 10, reference_answer="0.5"),
        FilterInput(answer_text("\\boxed{3}"), 10, reference_answer="4"),
        FilterInput(answer_text("\\boxed{3}"), 10, reference_answer=None),  # not checked
        FilterInput("no think tags, $\\boxed{4}$", 10, reference_answer="4"),  # not reached
        FilterInput(answer_text("\\boxed{3}"), 10**6, reference_answer="4"),
        FilterInput(answer_text("7"), 10, reference_answer="7"),  # no \boxed: whole answer
    ]
    reasons = filter_batch(records, cfg)
    assert reasons == [[], [], ["wrong_answer"], [], ["no_think"], ["too_long"], []]
    assert count_reasons(reasons) == {
        "kept": 4,
        "no_think": 1,
        "rejected": 3,
        "too_long": 1,
        "total": 7,
        "wrong_answer": 1,
    }
    # the answer filter is off by default
    assert filter_batch(records[2:3]) == [[]]


def test_map_with_timeout_kills_a_stuck_item_and_finishes_the_others():
    start = time.perf_counter()
    out = map_with_timeout(time.sleep, [(0,), (0,), (30,), (0.2,), (0,)], timeout_s=1.0, workers=2)
    assert [status for status, _ in out] == ["ok", "ok", "timeout", "ok", "ok"]
    assert time.perf_counter() - start < 15
    out = map_with_timeout(math.sqrt, [(4.0,), (-1.0,)], timeout_s=5.0, workers=1)
    assert out[0] == ("ok", 2.0)
    assert out[1][0] == "error" and "ValueError" in out[1][1]
    assert map_with_timeout(math.sqrt, [], timeout_s=1.0) == []


def test_config_validation():
    with pytest.raises(ValueError, match="ngram_n"):
        FilterConfig(ngram_n=0)
    with pytest.raises(ValueError, match="answer_timeout_s"):
        FilterConfig(answer_timeout_s=0)
