"""Sentence splitter and token -> sentence assignment: expected outputs written out by hand."""

import random

import numpy as np
import pytest

from dasd_jax.select.sentences import SplitterConfig, assign_tokens, split_sentences

COT = (
    "<think>\n"
    "Okay, let me compute the area. The radius is 3.14 cm, i.e. about pi. "
    "We need $A = \\pi r^2$. So the area is 1,000.5 units (approx.). Hmm... wait. "
    "Let me re-check.\n"
    "\n"
    "1. First, compute $r^2 = 9.86$.\n"
    "2. Then multiply, e.g. by Eq. 3 from Fig. 2 etc. and so on.\n"
    "(a) Case one: x > 0.\n"
    "- Bullet point. Another one!\n"
    "\n"
    "$$\n"
    "A = \\pi r^2.\n"
    "$$\n"
    "Therefore,\n"
    "\\[ x = \\frac{1}{2}. \\],\n"
    'so he said "it works." Then we continue? Yes! Done...\n'
    "```python\n"
    "def f(x):\n"
    "    return x. y = 3. Z\n"
    "```\n"
    "Is that right?! Dr. Smith vs. Mr. Jones. Next.</think>\n"
    "\n"
    "The answer is $\\boxed{\\frac{1}{2}}$.\n"
)

COT_SENTENCES = [
    "<think>\n",
    "Okay, let me compute the area. ",
    "The radius is 3.14 cm, i.e. about pi. ",
    "We need $A = \\pi r^2$. ",
    "So the area is 1,000.5 units (approx.). ",
    "Hmm... wait. ",
    "Let me re-check.\n\n",
    "1. First, compute $r^2 = 9.86$.\n",
    "2. Then multiply, e.g. by Eq. 3 from Fig. 2 etc. and so on.\n",
    "(a) Case one: x > 0.\n",
    "- Bullet point. ",
    "Another one!\n\n",
    "$$\nA = \\pi r^2.\n$$\n",
    "Therefore,\n",
    "\\[ x = \\frac{1}{2}. \\],\n",
    'so he said "it works." ',
    "Then we continue? ",
    "Yes! ",
    "Done...\n",
    "```python\ndef f(x):\n    return x. y = 3. Z\n```\n",
    "Is that right?! ",
    "Dr. Smith vs. Mr. Jones. ",
    "Next.",
    "</think>\n\n",
    "The answer is $\\boxed{\\frac{1}{2}}$.\n",
]


def pieces(text, cfg=None):
    return [text[a:b] for a, b in split_sentences(text, cfg)]


def assert_tiles(text, spans):
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a < b for a, b in spans)
    assert all(p[1] == q[0] for p, q in zip(spans, spans[1:], strict=False))


def test_realistic_cot_snippet():
    assert pieces(COT) == COT_SENTENCES
    assert_tiles(COT, split_sentences(COT))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Pi is 3.14159. Next.", ["Pi is 3.14159. ", "Next."]),
        ("It costs 1,000.5 dollars.", ["It costs 1,000.5 dollars."]),
        ("See Fig. 3 and Eq. 2. Then go.", ["See Fig. 3 and Eq. 2. ", "Then go."]),
        ("Apples, pears, etc. Then stop.", ["Apples, pears, etc. ", "Then stop."]),
        ("Hmm... Let me think. Wait… no.", ["Hmm... ", "Let me think. ", "Wait… no."]),
        ("Is it? Yes! Sure.", ["Is it? ", "Yes! ", "Sure."]),
        ("So 5! = 120. Good.", ["So 5! = 120. ", "Good."]),
        ('He said "done." (It is.) Next.', ['He said "done." ', "(It is.) ", "Next."]),
        ("**Step 1.** Compute.", ["**Step 1.** ", "Compute."]),
        ("a\n\n\nb", ["a\n\n\n", "b"]),
        ("  lead. Space", ["  lead. ", "Space"]),
        ("x $a. B$ y. Z", ["x $a. B$ y. ", "Z"]),
        ("x \\(a. B\\) y. Z", ["x \\(a. B\\) y. ", "Z"]),
        ("Run `f(x). Go` now. Ok", ["Run `f(x). Go` now. ", "Ok"]),
        ("It is \\$5. Then $x. Y$ z.", ["It is \\$5. ", "Then $x. Y$ z."]),
        ("Cost $5. Then 6.\nNext", ["Cost $5. ", "Then 6.\n", "Next"]),
        ("We get $$x = 1. Y$$ so done.", ["We get ", "$$x = 1. Y$$ ", "so done."]),
        ("<think>A.</think>B.", ["<think>", "A.", "</think>", "B."]),
        ("iv. Fourth item. Next", ["iv. Fourth item. ", "Next"]),
        ("2.3. Sub item here. Next", ["2.3. Sub item here. ", "Next"]),
        ("", []),
        ("   ", ["   "]),
    ],
)
def test_cot_rules(text, expected):
    assert pieces(text) == expected


def test_unclosed_code_fence_stops_at_think_close():
    text = "<think>\n```\ncode. More code.\n</think>\nA."
    assert pieces(text) == ["<think>\n", "```\ncode. More code.\n", "</think>\n", "A."]


def test_other_kinds():
    text = "One. Two.\n\nThree\nFour"
    assert pieces(text, SplitterConfig(kind="newline")) == ["One. Two.\n\n", "Three\n", "Four"]
    cfg = SplitterConfig(kind="regex", regex=r"(?<=[.!?])\s+")
    assert pieces(text, cfg) == ["One. ", "Two.\n\n", "Three\nFour"]


def test_max_chars_cuts_after_newline_then_whitespace_then_hard():
    cfg = SplitterConfig(kind="regex", regex=r"(?!)", max_chars=12)
    assert pieces("ab cd\nef gh ij kl", cfg) == ["ab cd\n", "ef gh ij kl"]
    assert pieces("abc def ghi jkl mno", cfg) == ["abc def ghi ", "jkl mno"]
    assert pieces("a" * 30, cfg) == ["a" * 12, "a" * 12, "a" * 6]
    # a code block longer than max_chars is cut too (runaway guard applies to units)
    code = "```\n" + "x = 1\n" * 5 + "```"
    assert pieces(code, SplitterConfig(max_chars=16)) == [
        "```\nx = 1\nx = 1\n",
        "x = 1\nx = 1\n",
        "x = 1\n```",
    ]


def test_min_chars_merges_prose_only():
    cfg = SplitterConfig(min_chars=8)  # non-whitespace characters
    text = "Ok. So. This is long. <think>Hi. Fine enough.</think>"
    assert pieces(text, cfg) == [
        "Ok. So. This is long. ",
        "<think>",
        "Hi. Fine enough.",
        "</think>",
    ]
    assert pieces("Long enough. Ok.", cfg) == ["Long enough. Ok."]


def test_config_validation():
    with pytest.raises(ValueError, match="regex"):
        SplitterConfig(kind="regex")
    with pytest.raises(ValueError, match="regex"):
        SplitterConfig(regex="x")
    with pytest.raises(ValueError, match="kind"):
        SplitterConfig(kind="nltk")
    with pytest.raises(ValueError, match="max_chars"):
        SplitterConfig(max_chars=0)


def test_fuzz_tiling_and_whitespace_rule():
    rng = random.Random(0)
    atoms = [
        "a",
        "B",
        " ",
        "\n",
        ". ",
        "? ",
        "3.1",
        "$",
        "$$",
        "\\[",
        "\\]",
        "\\(",
        "\\)",
        "```",
        "<think>",
        "</think>",
        "e.g. ",
        "...",
        "`",
        "\\",
        "\t",
        "1. ",
    ]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 60)))
        for cfg in (
            SplitterConfig(),
            SplitterConfig(max_chars=7, min_chars=3),
            SplitterConfig(kind="newline"),
        ):
            spans = split_sentences(text, cfg)
            assert_tiles(text, spans)
            assert all(not text[a].isspace() for a, _ in spans[1:]), (text, spans)


# ------------------------------------------------------------------------ assign_tokens

TEXT = "Hi there. Next one.\nLast"  # sentences [0, 10), [10, 20), [20, 24)


def test_assign_tokens_straddling_rule():
    spans = split_sentences(TEXT)
    assert spans == [(0, 10), (10, 20), (20, 24)]
    tokens = [
        (0, 2),  # "Hi"
        (2, 8),  # " there"
        (8, 9),  # "."
        (9, 14),  # " Next": starts in sentence 0's trailing space, first visible char in 1
        (14, 18),  # " one"
        (18, 20),  # ".\n"
        (20, 24),  # "Last"
        (9, 10),  # " ": whitespace only -> its first character -> sentence 0
        (7, 11),  # "e. N": straddles, first non-whitespace "e" is in sentence 0
        (19, 22),  # "\nLa": first non-whitespace "L" is in sentence 2
        (5, 5),  # empty (a special token without text) -> -1
        (30, 32),  # beyond the text -> -1
    ]
    ids = assign_tokens(tokens, spans, TEXT)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 0, 0, 2, -1, -1]


def test_assign_tokens_gaps_and_errors():
    ids = assign_tokens([(0, 2), (6, 8), (10, 12)], [(0, 5), (10, 15)], "x" * 15)
    assert ids.tolist() == [0, -1, 1]
    assert assign_tokens(np.zeros((0, 2)), [(0, 3)], "abc").tolist() == []
    with pytest.raises(ValueError, match="sorted"):
        assign_tokens([(0, 1)], [(5, 9), (0, 5)], "x" * 9)


def naive_assign(offsets, spans, text):
    out = []
    for s, e in offsets:
        if e <= s:
            out.append(-1)
            continue
        anchor = next((i for i in range(s, min(e, len(text))) if not text[i].isspace()), s)
        out.append(next((k for k, (a, b) in enumerate(spans) if a <= anchor < b), -1))
    return out


def test_assign_tokens_matches_naive_reference():
    rng = random.Random(1)
    for _ in range(50):
        text = "".join(rng.choice("ab .\n\u00a0\u2003é") for _ in range(rng.randint(1, 80)))
        spans = split_sentences(text, SplitterConfig(kind="regex", regex=r"[.\n]\s*"))
        offsets, pos = [], 0
        while pos < len(text):
            step = rng.randint(0, 4)
            offsets.append((pos, min(pos + step, len(text))))
            pos += max(step, 1)
        assert assign_tokens(offsets, spans, text).tolist() == naive_assign(offsets, spans, text)


# ------------------------------------------------------------ CJK and abbreviations

# A Chinese chain of thought: sentences end at 。！？ with no space after them (CJK text has
# none); inline math is never split; a full-width ． between digits is a decimal point.
ZH_COT = (
    "<think>\n"
    "首先，设方程为 $x^2 - 5x + 6 = 0$。"
    "因式分解得 $(x-2)(x-3) = 0$！"
    "所以 $x = 2$ 或 $x = 3$，对吗？！"
    "验证：当 $x = 2$ 时，$4 - 10 + 6 = 0$。"
    "两根的平均值是２．５，符合 $-b/2a$。"
    "老师说：“检查完毕。”我同意。 Let me double check.\n"
    "</think>\n\n"
    "答案：$x = 2$ 或 $x = 3$。"
)
ZH_SENTENCES = [
    "<think>\n",
    "首先，设方程为 $x^2 - 5x + 6 = 0$。",
    "因式分解得 $(x-2)(x-3) = 0$！",
    "所以 $x = 2$ 或 $x = 3$，对吗？！",
    "验证：当 $x = 2$ 时，$4 - 10 + 6 = 0$。",
    "两根的平均值是２．５，符合 $-b/2a$。",
    "老师说：“检查完毕。”",
    "我同意。 ",
    "Let me double check.\n",
    "</think>\n\n",
    "答案：$x = 2$ 或 $x = 3$。",
]

# A Japanese one: full-width enumerators ("１．") do not end a sentence, a quotation closed by
# 」 and continued by the particle と stays in its sentence, a full-width space is whitespace.
JA_COT = (
    "<think>\n"
    "まず、三角形の面積を求めます。底辺は６ｃｍ、高さは４ｃｍです！\n"
    "１．面積＝底辺×高さ÷２なので、$6 \\times 4 \\div 2 = 12$ になります。\n"
    "２．本当にそうでしょうか？「念のため確認しよう。」と考えました。　"
    "（底辺と高さは直角です。）問題ありません…！"
    "答えは１２ｃｍ²です。\n"
    "</think>\n\n"
    "答え：１２ｃｍ²"
)
JA_SENTENCES = [
    "<think>\n",
    "まず、三角形の面積を求めます。",
    "底辺は６ｃｍ、高さは４ｃｍです！\n",
    "１．面積＝底辺×高さ÷２なので、$6 \\times 4 \\div 2 = 12$ になります。\n",
    "２．本当にそうでしょうか？",
    "「念のため確認しよう。」と考えました。　",
    "（底辺と高さは直角です。）",
    "問題ありません…！",
    "答えは１２ｃｍ²です。\n",
    "</think>\n\n",
    "答え：１２ｃｍ²",
]


def test_chinese_chain_of_thought():
    assert pieces(ZH_COT) == ZH_SENTENCES
    assert_tiles(ZH_COT, split_sentences(ZH_COT))


def test_japanese_chain_of_thought():
    assert pieces(JA_COT) == JA_SENTENCES
    assert_tiles(JA_COT, split_sentences(JA_COT))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("第一句。第二句！第三句？", ["第一句。", "第二句！", "第三句？"]),
        ("真的吗？！是的。", ["真的吗？！", "是的。"]),
        ("真的吗?！是的‼好", ["真的吗?！", "是的‼", "好"]),
        ("他问：“为什么？”我答：“因为。”", ["他问：“为什么？”", "我答：“因为。”"]),
        ("『終わり。』次", ["『終わり。』", "次"]),
        ("【注意！】下一步", ["【注意！】", "下一步"]),
        ("结果。 Next", ["结果。 ", "Next"]),
        ("结果。　次へ", ["结果。　", "次へ"]),
        ("第一。\n第二", ["第一。\n", "第二"]),
        ("ここで終わり．次に進む．", ["ここで終わり．", "次に進む．"]),
        ("π≈３．１４。下一步", ["π≈３．１４。", "下一步"]),
        ("值为3．5。好", ["值为3．5。", "好"]),
        ("５！＝１２０。好", ["５！＝１２０。", "好"]),
        ("好吧。，然后", ["好吧。，然后"]),
        ("$a。b$ 之后。再", ["$a。b$ 之后。", "再"]),
        ("`f()。g` 之后", ["`f()。g` 之后"]),
        ("「本当？」と聞いた。次", ["「本当？」と聞いた。", "次"]),
        ("「本当？」って聞いた。", ["「本当？」って聞いた。"]),
        ("结束。", ["结束。"]),
        ("对吗？！", ["对吗？！"]),
        ("他说：“好？！”", ["他说：“好？！”"]),
    ],
)
def test_cjk_sentence_ends(text, expected):
    assert pieces(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "The U.S. Army was founded in Jan. 1775. It grew.",
            ["The U.S. Army was founded in Jan. 1775. ", "It grew."],
        ),
        ("Meet on Feb. 14 or Sept. 3. Then go.", ["Meet on Feb. 14 or Sept. 3. ", "Then go."]),
        ("The U.K. Parliament voted. Next.", ["The U.K. Parliament voted. ", "Next."]),
        ("The 5 p.m. News starts. Ok.", ["The 5 p.m. News starts. ", "Ok."]),
        ("She earned a Ph.D. Her thesis won.", ["She earned a Ph.D. ", "Her thesis won."]),
        # An initialism or month that ends a sentence: it ends one only before a common
        # sentence opener ("The", "It", "Then", ...), otherwise it is read as inside one.
        (
            "He moved to the U.S. The next year he left.",
            ["He moved to the U.S. ", "The next year he left."],
        ),
        ("We met at 9 a.m. Then we left.", ["We met at 9 a.m. ", "Then we left."]),
        ("It was cold in Dec. It snowed.", ["It was cold in Dec. ", "It snowed."]),
        ("He moved to the U.S. Congress passed it.", ["He moved to the U.S. Congress passed it."]),
        # unchanged: a single capital is an answer choice or a point, not an initial
        ("The answer is B. Let me check.", ["The answer is B. ", "Let me check."]),
        ("Is it 3? No. Let me redo it.", ["Is it 3? ", "No. ", "Let me redo it."]),
        ("See config.py. Then run.", ["See config.py. ", "Then run."]),
    ],
)
def test_abbreviations_and_initialisms(text, expected):
    assert pieces(text) == expected


def test_fuzz_cjk_tiling_and_whitespace_rule():
    rng = random.Random(2)
    atoms = list("好と。．３」“” \u3000\n，$A") + ["？！"]
    for _ in range(300):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 40)))
        spans = split_sentences(text)
        assert_tiles(text, spans)
        assert all(not text[a].isspace() for a, _ in spans[1:]), (text, spans)
