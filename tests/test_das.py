"""DAS golden tables: every expected number below was worked out by hand."""

import hashlib
import math
import random
from dataclasses import replace

import numpy as np
import pytest

from dasd_jax.select.das import (
    SHARED,
    STUDENT,
    TEACHER,
    UNSCORED,
    Candidate,
    ResponseStats,
    SelectConfig,
    classify,
    counted_sentences,
    length_slope,
    rank_candidates,
    response_stats,
    score_response,
    select,
    sentence_logprob_means,
    sentence_probs,
    stable_hash,
)
from dasd_jax.select.sentences import split_sentences

ln = math.log


def test_sentence_logprob_means_and_geometric_mean():
    means = sentence_logprob_means(
        [-0.1, -0.3, -1.0, -2.0, -0.5, 0.0, float("nan")], [0, 0, 1, 1, -1, 3, 3], 4
    )
    # s0: (-0.1 - 0.3) / 2; s1: (-1 - 2) / 2; s2: no tokens; s3: the NaN token is ignored;
    # the -0.5 token belongs to no sentence.
    np.testing.assert_allclose(means[[0, 1, 3]], [-0.2, -1.5, 0.0], rtol=0, atol=1e-15)
    assert np.isnan(means[2])

    # geometric means: sqrt(0.5 * 0.125) = 0.25; 0.9; sqrt(1 * 0.25) = 0.5;
    # (0.2 * 0.4 * 0.8) ** (1/3) = 0.064 ** (1/3) = 0.4
    lp = [ln(0.5), ln(0.125), ln(0.9), ln(1.0), ln(0.25), ln(0.2), ln(0.4), ln(0.8)]
    ids = [0, 0, 1, 2, 2, 3, 3, 3]
    np.testing.assert_allclose(sentence_probs(lp, ids, 4), [0.25, 0.9, 0.5, 0.4], rtol=1e-12)


def test_sentence_logprob_means_errors():
    with pytest.raises(ValueError, match="same length"):
        sentence_logprob_means([0.0, 0.0], [0], 1)
    with pytest.raises(ValueError, match="n_sentences"):
        sentence_logprob_means([0.0], [2], 2)


def test_classify_beta_0_1():
    nan = float("nan")
    p_t = [0.9, 0.5, 0.6, 0.4, 0.3, 0.55, nan, 0.2, 0.81, 0.5]
    p_s = [0.5, 0.9, 0.5, 0.3, 0.4, 0.5, 0.5, nan, 0.7, 0.39]
    # +0.4 T; -0.4 S; +0.1 exactly (strict) Sh; +0.1 (0.10000000000000003 in floats) Sh;
    # -0.1 Sh; +0.05 Sh; NaN U; NaN U; +0.11 T; +0.11 T
    expected = [
        TEACHER,
        STUDENT,
        SHARED,
        SHARED,
        SHARED,
        SHARED,
        UNSCORED,
        UNSCORED,
        TEACHER,
        TEACHER,
    ]
    assert classify(p_t, p_s, beta=0.1).tolist() == expected


def test_classify_exact_binary_threshold_and_other_betas():
    # beta = 0.125 and differences that are exact in binary: equality is Shared.
    p_t = [0.625, 0.75, 0.5, 0.25, 0.5]
    p_s = [0.5, 0.5, 0.625, 0.5, 0.375]
    assert classify(p_t, p_s, beta=0.125).tolist() == [SHARED, TEACHER, SHARED, STUDENT, SHARED]
    # beta = 0.05 turns the 0.1 differences into Teacher / Student
    assert classify([0.6, 0.3], [0.5, 0.4], beta=0.05).tolist() == [TEACHER, STUDENT]
    # beta = 0: any difference beyond 1e-9 counts
    assert classify([0.5, 0.5, 0.5], [0.5, 0.500001, 0.5 + 1e-12], beta=0.0).tolist() == [
        SHARED,
        STUDENT,
        SHARED,
    ]


def test_response_stats_counts():
    kinds = [TEACHER, STUDENT, SHARED, TEACHER, UNSCORED, TEACHER, SHARED]
    assert response_stats(kinds) == ResponseStats(
        n_sentences=7,
        n_counted=7,
        n_teacher=3,
        n_student=1,
        n_shared=2,
        n_unscored=1,
        teacher_ratio=0.5,  # 3 / (3 + 1 + 2): the unscored one is not in the denominator
    )
    counted = [True, True, True, False, True, False, True]
    assert response_stats(kinds, counted) == ResponseStats(
        n_sentences=7,
        n_counted=5,
        n_teacher=1,
        n_student=1,
        n_shared=2,
        n_unscored=1,
        teacher_ratio=0.25,
    )
    assert response_stats([UNSCORED]).teacher_ratio == 0.0
    with pytest.raises(ValueError, match="shape"):
        response_stats([TEACHER], [True, False])


SEG_TEXT = "<think>\nA b. C d.\n</think>\n\nAns. More."


def test_counted_sentences_segments():
    spans = split_sentences(SEG_TEXT)
    assert [SEG_TEXT[a:b] for a, b in spans] == [
        "<think>\n",
        "A b. ",
        "C d.\n",
        "</think>\n\n",
        "Ans. ",
        "More.",
    ]
    assert counted_sentences(SEG_TEXT, spans, "all").tolist() == [0, 1, 1, 0, 1, 1]
    assert counted_sentences(SEG_TEXT, spans, "think_only").tolist() == [0, 1, 1, 0, 0, 0]
    assert counted_sentences(SEG_TEXT, spans, "answer_only").tolist() == [0, 0, 0, 0, 1, 1]
    truncated = "<think>\nA b. C d."
    spans = split_sentences(truncated)
    assert counted_sentences(truncated, spans, "think_only").tolist() == [0, 1, 1]
    assert counted_sentences(truncated, spans, "answer_only").tolist() == [0, 0, 0]


# sentences: [0, 8) "<think>\n", [8, 14) "Good. ", [14, 19) "Bad.\n", [19, 29) "</think>\n\n",
# [29, 32) "Ok."
SCORE_TEXT = "<think>\nGood. Bad.\n</think>\n\nOk."
TEACHER_TOKENS = [
    ((8, 12), 0.8),
    ((12, 13), 0.8),  # p_T = 0.8
    ((13, 17), 0.25),
    ((17, 19), 1.0),  # " Bad" starts at a space: p_T = 0.5
    ((29, 32), 0.6),
]  # p_T = 0.6 (no teacher token on the tags: harmony)
STUDENT_TOKENS = [
    ((0, 7), 0.99),
    ((7, 8), 0.9),
    ((8, 10), 0.5),
    ((10, 13), 0.5),  # p_S = 0.5 -> Teacher (+0.3)
    ((14, 19), 0.9),  # p_S = 0.9 -> Student (-0.4)
    ((19, 27), 0.99),
    ((27, 29), 0.9),
    ((29, 31), 0.6),
    ((31, 32), 0.6),
]  # p_S = 0.6 -> Shared


def _score(**cfg):
    t_off, t_p = zip(*TEACHER_TOKENS, strict=True)
    s_off, s_p = zip(*STUDENT_TOKENS, strict=True)
    return score_response(SCORE_TEXT, t_off, np.log(t_p), s_off, np.log(s_p), SelectConfig(**cfg))


def test_score_response_end_to_end():
    scored = _score()
    assert scored.spans == [(0, 8), (8, 14), (14, 19), (19, 29), (29, 32)]
    np.testing.assert_allclose(scored.p_teacher[1:3], [0.8, 0.5], rtol=1e-12)
    assert np.isnan(scored.p_teacher[0]) and np.isnan(scored.p_teacher[3])
    assert scored.kinds.tolist() == [UNSCORED, TEACHER, STUDENT, UNSCORED, SHARED]
    assert scored.stats == ResponseStats(5, 3, 1, 1, 1, 0, 1 / 3)
    assert _score(segments="think_only").stats == ResponseStats(5, 2, 1, 1, 0, 0, 0.5)
    assert _score(segments="answer_only").stats == ResponseStats(5, 1, 0, 0, 1, 0, 0.0)
    # beta = 0.35: only the -0.4 sentence stays typed
    assert _score(beta=0.35).stats == ResponseStats(5, 3, 0, 1, 2, 0, 0.0)


# ------------------------------------------------------------------------- selection


def cand(pid, index, t, s, sh, tokens=None, chars=0, rejected=None):
    n = t + s + sh
    stats = ResponseStats(n, n, t, s, sh, 0, t / n if n else 0.0)
    return Candidate(
        pid, index, n_chars=chars, n_student_tokens=tokens, stats=stats, rejected=rejected
    )


P1 = [
    cand("p1", 0, 5, 1, 4, tokens=1000),  # ratio 0.5
    cand("p1", 1, 5, 1, 9, tokens=1500),  # ratio 1/3
    cand("p1", 2, 3, 0, 1, tokens=400),  # ratio 0.75
    cand("p1", 3, 5, 2, 3, tokens=900),  # ratio 0.5
    cand("p1", 4, 9, 0, 0, tokens=70000, rejected="too_long"),  # best, but filtered out
]


def order(rule, cands=P1, **kw):
    return [c.index for c in rank_candidates(cands, SelectConfig(rule=rule, **kw))]


def test_rules_and_tie_break():
    # count 5 for 0, 1, 3 -> fewer Student sentences (0, 1 have 1) -> shorter (0: 1000 tokens)
    assert order("max_teacher_count") == [0, 1, 3, 2]
    # ratio 0.75 > 0.5 (0 and 3: equal count 5, fewer Student: 0) > 1/3
    assert order("max_teacher_ratio") == [2, 0, 3, 1]
    assert order("longest") == [1, 0, 3, 2]
    # count 3 first, then the three 5s by the same tie-break
    assert order("min_teacher_count") == [2, 0, 1, 3]


def test_length_matched_rule_by_hand():
    # Teacher count (t) against student tokens over the pool's unrejected candidates:
    # x = 10, 50, 10, 50 and y = 3, 6, 1, 5 -> slope = 140 / 1600 = 0.0875 (the rejected one,
    # far off the line, does not count)
    pool = [
        cand("p", 0, 3, 0, 0, tokens=10),
        cand("p", 1, 6, 0, 0, tokens=50),
        cand("q", 0, 1, 0, 0, tokens=10),
        cand("q", 1, 5, 0, 0, tokens=50),
        cand("q", 2, 40, 0, 0, tokens=12, rejected="too_long"),
    ]
    assert length_slope(pool, by_tokens=True) == pytest.approx(0.0875)
    cfg = SelectConfig(rule="max_teacher_count_for_length")
    # p: 3 - 0.875 = 2.125 beats 6 - 4.375 = 1.625, where the plain count keeps the long one;
    # q: 1 - 0.875 = 0.125 loses to 5 - 4.375 = 0.625
    picked = {(c.prompt_id, c.index) for c in select(pool, cfg).selected}
    assert picked == {("p", 0), ("q", 1)}
    plain = select(pool, SelectConfig(rule="max_teacher_count")).selected
    assert {(c.prompt_id, c.index) for c in plain} == {("p", 1), ("q", 1)}
    # one prompt alone uses its own slope, (6 - 3) / 40 = 0.075: 2.25 each, a tie that the
    # fixed tie-break (more Teacher sentences) settles
    assert order("max_teacher_count_for_length", pool[:2]) == [1, 0]
    # equal lengths: the slope is 0 and the rule is the plain count
    same = [cand("r", 0, 2, 0, 0, tokens=9), cand("r", 1, 4, 0, 0, tokens=9)]
    assert length_slope(same, by_tokens=True) == 0.0
    assert order("max_teacher_count_for_length", same) == [1, 0]
    with pytest.raises(ValueError, match="needs ResponseStats"):
        unscored = Candidate("s", 0, n_chars=5, n_student_tokens=3, stats=None)
        select([unscored, cand("s", 1, 1, 0, 0, tokens=4)], cfg)


def test_tie_break_down_to_index_and_longest_by_chars():
    twins = [cand("p", 7, 2, 1, 1, tokens=10), cand("p", 3, 2, 1, 1, tokens=10)]
    assert order("max_teacher_count", twins) == [3, 7]
    # one candidate lacks a student token count: the prompt is ranked by characters
    mixed = [
        cand("p", 0, 1, 0, 0, tokens=900, chars=100),
        cand("p", 1, 1, 0, 0, tokens=None, chars=300),
    ]
    assert order("longest", mixed) == [1, 0]


def test_random_rule_is_seeded_and_order_independent():
    cands = [cand(f"q{i // 4}", i % 4, 1, 0, 0) for i in range(40)]
    cfg = SelectConfig(rule="random", seed=3)
    picked = [(c.prompt_id, c.index) for c in select(cands, cfg).selected]
    shuffled = cands[:]
    random.Random(0).shuffle(shuffled)
    assert [(c.prompt_id, c.index) for c in select(shuffled, cfg).selected] == picked
    # the documented definition: smallest stable_hash(seed, prompt_id, index) per prompt
    expected = [
        (f"q{p}", min(range(4), key=lambda i, p=p: stable_hash(3, f"q{p}", i))) for p in range(10)
    ]
    assert picked == sorted(expected)
    other = [(c.prompt_id, c.index) for c in select(cands, replace(cfg, seed=4)).selected]
    assert other != picked
    # no scores needed for random
    bare = [Candidate("r", i, n_chars=10) for i in range(3)]
    assert len(select(bare, cfg).selected) == 1


def test_stable_hash_is_pinned():
    # A regression pin: changing the hash silently changes every seeded selection.
    assert stable_hash(0, "p1", 0) == stable_hash(0, "p1", 0)
    assert stable_hash(0, "p1", 0) != stable_hash(1, "p1", 0)
    # the documented definition: blake2b-64 of the parts joined by \x1f, little-endian
    digest = hashlib.blake2b(b"0\x1fp1\x1f0", digest_size=8).digest()
    assert stable_hash(0, "p1", 0) == int.from_bytes(digest, "little") == 15011781738659167857


def test_select_top_k_and_all_filtered_prompt():
    p3 = [cand("p3", 0, 1, 0, 0, rejected="too_long"), cand("p3", 1, 2, 0, 0, rejected="no_think")]
    p2 = [cand("p2", 0, 1, 0, 0, tokens=5), cand("p2", 1, 4, 0, 0, tokens=5)]
    out = select(p3 + P1 + p2, SelectConfig(top_k=2))
    assert [(c.prompt_id, c.index) for c in out.selected] == [
        ("p1", 0),
        ("p1", 1),
        ("p2", 1),
        ("p2", 0),
    ]
    assert out.empty_prompts == ["p3"]
    assert out.over_budget_prompts == []
    assert (out.n_prompts, out.n_candidates, out.n_rejected) == (3, 9, 3)
    assert [c.index for c in select(P1).selected] == [0]


def test_budget_prompts_mode_same_subset_for_every_rule():
    cands = [
        cand(f"q{p}", i, t=(p * 7 + i * 3) % 5, s=i % 2, sh=1, tokens=100 + i)
        for p in range(6)
        for i in range(3)
    ]
    cands.append(cand("empty", 0, 1, 0, 0, rejected="too_long"))
    hash_order = sorted((f"q{p}" for p in range(6)), key=lambda pid: stable_hash(0, pid))
    results = {}
    for rule in ("max_teacher_count", "random", "min_teacher_count"):
        out = select(cands, SelectConfig(rule=rule, budget=3))
        results[rule] = {c.prompt_id: c.index for c in out.selected}
        assert sorted(results[rule]) == sorted(hash_order[:3])
        assert out.over_budget_prompts == sorted(hash_order[3:])
        assert out.empty_prompts == ["empty"]
    # same prompts, different choices: max count and min count disagree somewhere
    assert results["max_teacher_count"] != results["min_teacher_count"]

    # top_k = 2, budget 3: the first prompt gives 2, the second its best one only
    out = select(cands, SelectConfig(top_k=2, budget=3))
    first, second = hash_order[0], hash_order[1]
    best = {
        pid: [
            c.index
            for c in rank_candidates([c for c in cands if c.prompt_id == pid], SelectConfig())
        ]
        for pid in hash_order
    }
    assert [(c.prompt_id, c.index) for c in out.selected] == sorted(
        [(first, best[first][0]), (first, best[first][1]), (second, best[second][0])],
        key=lambda x: x[0],
    )


def test_budget_score_mode():
    cands = [
        cand("a", 0, 7, 0, 1, tokens=10),
        cand("a", 1, 1, 0, 1, tokens=10),  # best 7
        cand("b", 0, 2, 0, 1, tokens=10),  # best 2
        cand("c", 0, 5, 1, 1, tokens=10),
        cand("c", 1, 5, 0, 1, tokens=20),  # best: c1
        cand("d", 0, 5, 0, 1, tokens=10),  # 5 Teacher, 0 Student, shorter than c1
    ]
    out = select(cands, SelectConfig(budget=2, budget_mode="score"))
    assert [(c.prompt_id, c.index) for c in out.selected] == [("a", 0), ("d", 0)]
    assert out.over_budget_prompts == ["b", "c"]
    out = select(cands, SelectConfig(budget=10, budget_mode="score"))
    assert len(out.selected) == 4 and out.over_budget_prompts == []
    assert select(cands, SelectConfig(budget=0)).selected == []


def test_select_errors():
    with pytest.raises(ValueError, match="needs ResponseStats"):
        select([Candidate("p", 0, n_chars=3)], SelectConfig())
    with pytest.raises(ValueError, match="same index"):
        select([cand("p", 0, 1, 0, 0), cand("p", 0, 2, 0, 0)])
    with pytest.raises(ValueError, match="rule"):
        SelectConfig(rule="best")
    with pytest.raises(ValueError, match="beta"):
        SelectConfig(beta=1.5)
    with pytest.raises(ValueError, match="segments"):
        SelectConfig(segments="think")
