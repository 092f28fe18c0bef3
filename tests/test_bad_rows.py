"""The pipeline-wide bad-row policy (`bad_rows.*`, records.BadRows): a bad row is counted into
the stage's rejects with its reason and the stage goes on, until more than
`bad_rows.max_bad_fraction` of its rows are bad; then it stops naming the count, the top
reasons and the rejects. `on_bad_row=error` stops at the first. And the row that stopped the
README's first command on a fresh machine (tests/data/embedded_sample_malformed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dasd_jax import embedded, score
from dasd_jax.config import load_config
from dasd_jax.records import BadRow, BadRowPolicy, BadRows, TooManyBadRows, reason_key
from dasd_jax.sample.text import TokenText, map_response
from dasd_jax.select import stage as select_stage
from dasd_jax.tokenizer import build_gpt_oss_tokenizer, load_tokenizer

FIXTURE = Path(__file__).parent / "data" / "embedded_sample_malformed"


def test_policy_counts_then_stops_naming_count_reasons_and_rejects():
    rows = BadRows("score", BadRowPolicy(), "/run/score/rejects.*", total=100)
    for k in range(5):  # 5 of 100 is not more than 5%
        rows.add(BadRow("in.jsonl", k + 1, f"teacher_text_mismatch: tokens {k}"))
    assert rows.count == 5 and rows.reasons == {"teacher_text_mismatch": 5}
    with pytest.raises(TooManyBadRows) as e:
        rows.add(BadRow("in.jsonl", 9, "malformed JSON: Expecting value"))
    msg = str(e.value)
    assert "score: 6 of the input's 100 rows are bad (6.0% > bad_rows.max_bad_fraction=0.05)" in msg
    assert "teacher_text_mismatch (5), malformed JSON (1)" in msg and "/run/score/rejects.*" in msg
    # the final check on totals (a resumed run's shards included), and strict runs
    BadRows("s", BadRowPolicy(), "r").check(20, 1, {"x": 1})
    with pytest.raises(TooManyBadRows, match="2 of 20 rows"):
        BadRows("s", BadRowPolicy(), "r").check(20, 2, {"x": 2})
    with pytest.raises(BadRow, match="in.jsonl:3: bad"):
        BadRows("s", BadRowPolicy("error"), "r").add(BadRow("in.jsonl", 3, "bad"))
    assert BadRowPolicy().for_stage("") == BadRowPolicy()
    assert BadRowPolicy().for_stage("error").on_bad_row == "error"
    assert reason_key("missing field 'input' (has ['x'])") == "missing field 'input'"
    with pytest.raises(ValueError, match="max_bad_fraction"):
        BadRowPolicy(max_bad_fraction=float("nan"))


@pytest.fixture(scope="module")
def student():
    return embedded.tiny_student()  # the user cache the CLI demo uses (built once)


def _score_cfg(run, student, data, *extra):
    return load_config(
        None,
        [
            f"run_dir={run}",
            f"student.path={student}",
            f"score.input={data}",
            "score.teacher_scoring=never",
            "student.dtype=float32",
            "mesh.data=1",
            *extra,
        ],
    )


def _released(path: Path, n_bad: int, copies: int = 3) -> int:
    """The demo rows in the released SFT format, `copies` times; the first `n_bad` lines
    after the first row are replaced by bad ones (malformed JSON, a missing field)."""
    rows = [
        json.dumps({**r, "uuid": f"{r['uuid']}-{c}"})
        for c in range(copies)
        for r in embedded.demo_rows()
    ]
    for k in range(n_bad):
        rows[1 + k] = "{not json" if k % 2 == 0 else json.dumps({"uuid": "x", "output": "o"})
    path.write_text("\n".join(rows) + "\n")
    return len(rows)


def test_score_counts_a_few_bad_rows_and_stops_on_many(tmp_path, student):
    data = tmp_path / "released.jsonl"
    n = _released(data, 1)
    got = score.run(_score_cfg(tmp_path / "a", student, data))
    assert got["counts"] == {"in": n, "out": n - 1, "rejected": 1}
    assert got["reject_reasons"] == {"malformed JSON": 1}
    (reject,) = [
        json.loads(x) for f in (tmp_path / "a" / "score").glob("rejects.*") for x in f.open()
    ]
    assert (reject["file"], reject["line"]) == (str(data), 2)
    # strict: the first bad row stops the run, named by file and line
    with pytest.raises(BadRow, match=r"released\.jsonl:2: malformed JSON"):
        score.run(_score_cfg(tmp_path / "e", student, data, "score.on_bad_row=error"))
    # 3 of 36 (8%) are more than 5%: stops as soon as that is certain (the 2nd bad row)
    _released(data, 3)
    with pytest.raises(TooManyBadRows) as e:
        score.run(_score_cfg(tmp_path / "b", student, data))
    assert f"score: 2 of the input's {n} rows are bad" in str(e.value)
    assert "malformed JSON (1), missing field 'input' (1)" in str(e.value)
    assert str(tmp_path / "b" / "score" / "rejects.part-*.jsonl") in str(e.value)
    # the limit is a setting
    ok = score.run(_score_cfg(tmp_path / "c", student, data, "bad_rows.max_bad_fraction=0.1"))
    assert ok["counts"]["rejected"] == 3
    # select: the same policy over the scored lines
    part = next((tmp_path / "c" / "score").glob("part-*.jsonl"))
    lines = part.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:1] + ["{torn\n", "[]\n"] + lines[1:]))
    args = [f"run_dir={tmp_path / 'c'}", "select_stage.report=false"]
    with pytest.raises(TooManyBadRows, match=r"select: 2 of 35 rows are bad .*malformed JSON"):
        select_stage.run(load_config(None, args))
    s = select_stage.run(load_config(None, [*args, "bad_rows.max_bad_fraction=0.1"]))
    assert s["bad_rows"] == 2 and s["counts"]["in"] == 35


def test_text_not_in_nfc_form(tmp_path, student):
    """A response not in NFC is a counted reject named `not_nfc`; a prompt not in NFC is
    rendered NFC for the student (its tokenizer normalises it anyway) and scored."""
    rows = embedded.demo_rows()
    decomposed = "Cafe\u0301? "  # 'e' + combining acute: NFC composes it to 'é'
    rows[0] = {**rows[0], "input": decomposed + rows[0]["input"]}
    rows[1] = {**rows[1], "output": rows[1]["output"].replace("</think>", decomposed + "</think>")}
    data = tmp_path / "nfc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ("bad_rows.max_bad_fraction=0.1",)
    got = score.run(_score_cfg(tmp_path, student, data, *args))
    assert got["counts"] == {"in": 12, "out": 11, "rejected": 1}
    assert got["reject_reasons"] == {"not_nfc": 1}
    (r,) = [json.loads(x) for f in (tmp_path / "score").glob("rejects.*") for x in f.open()]
    assert r["line"] == 2 and r["reason"].startswith("not_nfc: character")


def test_the_row_that_stopped_the_first_command_is_a_counted_reject(tmp_path, student):
    """a127cfc's sample output, scored with the defaults: the pipeline goes on, the row is in
    the rejects with its reason (on a127cfc this raised BadRow and stopped `--stage=all`)."""
    got = score.run(_score_cfg(tmp_path, student, FIXTURE))
    assert got["counts"] == {"in": 48, "out": 47, "rejected": 1}
    (r,) = [json.loads(x) for f in (tmp_path / "score").glob("rejects.*") for x in f.open()]
    assert r["line"] == 3 and r["reason"].startswith("teacher_text_mismatch: teacher tokens 88")


def test_todays_parser_reads_the_fixture_rows(tmp_path):
    """The same token ids through today's sample mapping: row 3 is repaired exactly (cut at
    its final message's <|end|>), the malformed ones are refused with their reason, the rest
    give the responses a127cfc wrote."""
    tt = TokenText(load_tokenizer(build_gpt_oss_tokenizer()))
    got = {}
    for line, raw in enumerate((FIXTURE / "t1" / "part-000000.jsonl").open(), start=1):
        c = json.loads(raw)
        ids = c["teacher"]["token_ids"]
        text, offsets = tt.text(ids)
        ended = "" if c["finish_reason"] == "length" else tt.bytes_of(c["meta"]["stop"]).decode()
        m = map_response(text, ids, offsets, tt, "harmony", ended)
        got[line] = m.reason or (m.harmony or {}).get("repair") or "ok"
        if got[line] == "ok":
            assert m.response == c["response"] and m.keep == len(ids)
        if line == 3:
            assert m.response.endswith("</think>\n\n = \\boxed{408.")
            assert ids[m.keep - 1] == 200007 and m.harmony["dropped_tokens"] == len(ids) - m.keep
    bad = {k: v for k, v in got.items() if v != "ok"}
    assert bad == {
        3: "cut_at_final_end",
        8: "repeated_channel",
        13: "no_final_message",
        30: "no_final_message",
        40: "repeated_channel",
        48: "repeated_channel",
    }
