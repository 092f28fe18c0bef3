"""The select report's Figure 6: Teacher / Student / Shared sentences in correct vs incorrect
candidates. The table on hand-made records; the stage with a judge hook, with the answer
filter's verdicts, with nobody judging; bad `select_stage.judge*` values."""

import json
import math

import pytest

from dasd_jax.config import ConfigError, load_config
from dasd_jax.schema import Candidate, TokenScores
from dasd_jax.select import correctness, das, report, stage
from dasd_jax.select.sentences import split_sentences

PROBS = {"T": (0.9, 0.5), "S": (0.5, 0.9), "H": (0.5, 0.5)}  # (p_T, p_S): Teacher/Student/Shared
HOOK_CALLS: list[tuple[str, int]] = []


def hook(response: str, gold, row: dict) -> bool | None:
    """A judge scorer: the answer sentence ends with the gold word; "?" cannot be judged."""
    assert "teacher" not in row and "student" not in row  # the row goes without token scores
    HOOK_CALLS.append((row["prompt_id"], row["candidate"]))
    if gold == "boom":
        raise RuntimeError("this scorer crashed")
    return None if gold == "?" else response.rstrip(".").endswith(gold)


def _cand(pid, idx, kinds, answer="it is four.", ref=None, *, scored=True, n_prompt=10):
    """A candidate whose counted sentences (the last is the answer) are of `kinds`, e.g.
    "TSH": one token each with the probabilities of PROBS; the tags get a student token."""
    n_body = len(kinds) - (1 if answer.strip() else 0)
    body = " ".join(f"{chr(65 + i)} is fine." for i in range(n_body))
    text = f"<think>\n{body}\n</think>\n\n{answer}"
    spans = split_sentences(text)
    content = [s for s in spans if text[s[0] : s[1]].strip() not in ("<think>", "</think>")]
    assert len(content) == len(kinds)
    p = dict(zip(content, kinds, strict=True))

    def side(k, offs):
        lps = [math.log(PROBS[p[o]][k]) if o in p else -0.5 for o in offs]
        return TokenScores("m", "t", list(range(len(offs))), lps, offs, n_prompt_tokens=n_prompt)

    return Candidate(
        pid,
        idx,
        f"prompt {pid}",
        text,
        temperature=0.6,
        domain="math",
        reference_answer=ref,
        teacher=side(0, content),
        student=side(1, spans) if scored else None,
    )


def _run(tmp_path, cands, *overrides):
    folder = tmp_path / "run" / "score"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "part-000000.jsonl").write_text(
        "".join(json.dumps(c.to_dict()) + "\n" for c in cands)
    )
    summary = stage.run(load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides]))
    out = tmp_path / "run" / "select"
    assert json.loads((out / "summary.json").read_text())["correctness"] == summary["correctness"]
    return summary["correctness"], (out / "report.md").read_text(), out / "plots"


def _stats(t, s, h, unscored=0):
    n = t + s + h
    return das.ResponseStats(n + unscored, n + unscored, t, s, h, unscored, t / n if n else 0.0)


def _seen(k, stats, correct, reasons=()):
    return stage.Seen("P", k, 0, k, "math", 0.6, list(reasons), 10, 5, stats, correct=correct)


def test_correctness_table_by_hand():
    seen = [
        _seen(0, _stats(3, 1, 0, unscored=2), True),  # unscored sentences are not counted
        _seen(1, _stats(5, 0, 2), True, ["too_long", "not_selected"]),  # rejected: counts
        _seen(2, _stats(1, 2, 1), False),
        _seen(3, _stats(9, 9, 9), None),  # not judged
        _seen(4, None, True),  # no sentence counts: outside the table
    ]
    table = correctness.correctness_table(seen, "math")
    assert table["source"] == "math" and table["not_judged"] == 1
    correct, incorrect = table["groups"]["correct"], table["groups"]["incorrect"]
    assert correct["candidates"] == 2 and incorrect["candidates"] == 1
    assert correct["mean"] == pytest.approx({"teacher": 4.0, "student": 0.5, "shared": 1.0})
    assert correct["share"] == pytest.approx(
        {"teacher": 8 / 11, "student": 1 / 11, "shared": 2 / 11}
    )
    assert incorrect["mean"] == pytest.approx({"teacher": 1.0, "student": 2.0, "shared": 1.0})
    assert incorrect["share"] == pytest.approx({"teacher": 0.25, "student": 0.5, "shared": 0.25})
    # an empty group has no mean or share; nothing judged, and no source, says so in the report
    empty = correctness.correctness_table(seen[:2], None)["groups"]["incorrect"]
    assert empty == {
        "candidates": 0,
        "mean": {"teacher": None, "student": None, "shared": None},
        "share": {"teacher": None, "student": None, "shared": None},
    }
    lines = report.correctness_markdown(correctness.correctness_table(seen, None))
    assert lines[0] == report.FIGURE6 and "No candidate judged" in lines[2]


def test_stage_judges_the_whole_scored_pool_with_a_hook(tmp_path):
    HOOK_CALLS.clear()
    cands = [
        _cand("P1", 0, "TTHH", ref="four"),  # correct, kept
        _cand("P1", 1, "TSHH", ref="five"),  # incorrect, not selected
        _cand("P2", 0, "TTTT", ref="four", n_prompt=70000),  # correct, rejected too_long
        _cand("P2", 1, "HHHH"),  # no reference answer: not judged
        _cand("P3", 0, "HHHH", ref="?"),  # the scorer has no verdict: not judged
        _cand("P3", 1, "HHHH", ref="boom"),  # the scorer raises: not judged
        _cand("P4", 0, "TTTT", ref="four", scored=False),  # no student scores: never judged
    ]
    table, md, plots = _run(
        tmp_path,
        cands,
        "select_stage.judge=test_select_correctness:hook",
        "select_stage.judge_workers=0",
    )
    assert sorted(HOOK_CALLS) == [("P1", 0), ("P1", 1), ("P2", 0), ("P3", 0), ("P3", 1)]
    assert table["source"] == "test_select_correctness:hook" and table["not_judged"] == 3
    correct, incorrect = table["groups"]["correct"], table["groups"]["incorrect"]
    assert correct == {
        "candidates": 2,
        "mean": {"teacher": 3.0, "student": 0.0, "shared": 1.0},
        "share": {"teacher": 0.75, "student": 0.0, "shared": 0.25},
    }
    assert incorrect == {
        "candidates": 1,
        "mean": {"teacher": 1.0, "student": 1.0, "shared": 2.0},
        "share": {"teacher": 0.25, "student": 0.25, "shared": 0.5},
    }
    assert report.FIGURE6 in md
    assert "| correct | 2 | 3.00 | 0.00 | 1.00 | 0.750 | 0.000 | 0.250 |" in md
    assert "| incorrect | 1 | 1.00 | 1.00 | 2.00 | 0.250 | 0.250 | 0.500 |" in md
    assert "3 scored candidates not judged" in md
    assert "![correctness](plots/correctness.png)" in md
    assert (plots / "correctness.png").read_bytes()[:4] == b"\x89PNG"


def test_default_judge_is_the_answer_filter_when_it_is_on(tmp_path):
    cands = [
        _cand("P1", 0, "TTTH", "so it is \\boxed{4}.", ref="4"),  # correct
        _cand("P1", 1, "THHH", "so it is \\boxed{1/2}.", ref="0.5"),  # correct (equivalent)
        _cand("P2", 0, "SSHH", "so it is \\boxed{3}.", ref="4"),  # wrong_answer: incorrect
        _cand("P2", 1, "HHHH", "so it is \\boxed{4}.", ref=""),  # gold math-verify can't parse
        _cand("P3", 0, "TTTT", "so it is \\boxed{4}."),  # no reference answer
        _cand("P3", 1, "TTT", "", ref="4"),  # empty_answer: the check never ran
    ]
    table, md, plots = _run(
        tmp_path, cands, "filters.answer=true", "filters.answer_workers=1", "student.path=/x"
    )
    assert table["source"] == "filters.answer" and table["not_judged"] == 3
    correct, incorrect = table["groups"]["correct"], table["groups"]["incorrect"]
    assert correct["candidates"] == 2 and correct["mean"]["teacher"] == 2.0
    assert correct["share"]["shared"] == pytest.approx(4 / 8)
    assert incorrect["candidates"] == 1 and incorrect["mean"]["student"] == 2.0
    assert "Judged by `filters.answer`" in md and (plots / "correctness.png").exists()
    # the same candidates with the filter off and a real student: nobody judges, one line says
    # so; `none` judges nothing even on the embedded default (student.path "")
    for overrides in (["student.path=/x"], ["select_stage.judge=none"]):
        table, md, plots = _run(tmp_path, cands, *overrides)
        assert table["source"] is None and table["not_judged"] == 6
        assert [g["candidates"] for g in table["groups"].values()] == [0, 0]
        assert "No candidate judged: set `select_stage.judge=math`" in md
        assert not (plots / "correctness.png").exists()


@pytest.mark.parametrize(
    "override, key",
    [
        ("select_stage.judge=bogus", "select_stage.judge must be"),
        ("select_stage.judge=:f", "select_stage.judge must be"),  # no module
        ("select_stage.judge=a:b:c", "select_stage.judge must be"),
        ("select_stage.judge=off", "select_stage.judge: expected str"),  # YAML: false
        ("select_stage.judge_timeout_s=0", "select_stage.judge_timeout_s must be"),
        ("select_stage.judge_timeout_s=.inf", "select_stage.judge_timeout_s must be"),
        ("select_stage.judge_workers=-1", "select_stage.judge_workers must be"),
    ],
)
def test_bad_judge_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_a_judge_that_cannot_be_imported_fails_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"select_stage\.judge='no_such_module:f': cannot import"):
        _run(tmp_path, [_cand("P1", 0, "TTHH", ref="four")], "select_stage.judge=no_such_module:f")
