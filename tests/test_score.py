"""The score stage: parity with transformers (student, Qwen3 teacher, gpt-oss teacher on its
harmony rendering), mesh/batch invariance, resume, bad input, the released log-prob join."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hf_tiny import make_gpt_oss

from dasd_jax import chat, embedded, score
from dasd_jax.config import load_config
from dasd_jax.records import BadRow
from dasd_jax.schema import Candidate
from dasd_jax.select.filters import think_to_harmony
from dasd_jax.tokenizer import (
    build_gpt_oss_tokenizer,
    encode_with_offsets,
    load_tokenizer,
    render_chat,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def student(cache):
    return embedded.tiny_student(cache)


@pytest.fixture(scope="module")
def teacher(cache):
    return embedded.tiny_random_teacher(cache)  # random tiny Qwen3 (ChatML)


def _cfg(tmp_path, student, data, *extra, teacher=None):
    return load_config(
        None,
        [
            f"run_dir={tmp_path}",
            f"student.path={student}",
            f"score.input={data}",
            "student.dtype=float32",
            "student.attention=xla",
            "teacher.dtype=float32",
            "teacher.attention=xla",
            "mesh.data=1",
            *([f"teacher.path={teacher}"] if teacher else []),
            *extra,
        ],
    )


def _rows(n=7, long_row=False):
    rows = embedded.demo_rows()
    rows = (rows * 3)[:n]
    rows = [dict(r, uuid=f"r{i}") for i, r in enumerate(rows)]
    if long_row:
        rows[2]["output"] = "<think>\n" + "step. " * 400 + "</think>\n\nok"
    return rows


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _read_parts(folder):
    out = []
    for f in sorted(Path(folder).glob("part-*.jsonl")):
        out += [Candidate.from_dict(json.loads(x)) for x in f.open()]
    return out


def _hf_logprobs(folder, ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_logprobs_equal_a_direct_transformers_forward(tmp_path, student, teacher):
    rows = _rows(3)
    data = _write(tmp_path / "in.jsonl", rows)
    summary = score.run(_cfg(tmp_path / "run", student, data, teacher=teacher))
    assert summary["teacher_from"] == {"logprobs": 0, "model": 3, "none": 0}
    out = _read_parts(tmp_path / "run" / "score")
    tok = load_tokenizer(student)
    for row, got in zip(rows, out, strict=True):
        r = render_chat(row["input"], row["output"])
        ids = tok.encode(r.text, add_special_tokens=False)
        text = row["output"]
        for side, folder in ((got.student, student), (got.teacher, teacher)):
            ref = _hf_logprobs(folder, ids).numpy()
            k, n = side.n_prompt_tokens, len(side.token_ids)
            assert side.token_ids == ids[k : k + n] and ids[k + n] == 151645  # <|im_end|>
            np.testing.assert_allclose(side.logprobs, ref[k - 1 : k - 1 + n], atol=1e-5)
            assert "".join(text[s:e] for s, e in side.offsets) == text  # tiles the response
        assert not np.allclose(got.student.logprobs, got.teacher.logprobs, atol=1e-3)


def test_gpt_oss_teacher_scores_its_harmony_rendering(tmp_path, student):
    folder = tmp_path / "gpt_oss"
    make_gpt_oss(
        folder, vocab_size=201088, eos_token_id=200002, pad_token_id=199999, bos_token_id=199998
    )
    tok_dir = build_gpt_oss_tokenizer()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / f, folder / f)
    rows = _rows(2)
    data = _write(tmp_path / "in.jsonl", rows)
    score.run(_cfg(tmp_path / "run", student, data, teacher=folder))
    out = _read_parts(tmp_path / "run" / "score")
    tok = load_tokenizer(folder)
    for row, got in zip(rows, out, strict=True):
        r = chat.render_harmony(row["input"], row["output"], "You are a helpful assistant.")
        assert think_to_harmony(row["output"]) in r.text
        ids, _ = encode_with_offsets(tok, r.text)
        t = got.teacher
        k, n = t.n_prompt_tokens, len(t.token_ids)
        assert ids[k] == 200005 and t.token_ids == ids[k : k + n]  # from <|channel|>
        assert ids[k + n] == 200002  # <|return|> closes it, outside the response
        np.testing.assert_allclose(
            t.logprobs, _hf_logprobs(folder, ids).numpy()[k - 1 : k - 1 + n], atol=1e-4
        )
        content = "".join(row["output"][s:e] for s, e in t.offsets)
        think, answer = row["output"][len("<think>\n") :].split("\n</think>\n\n")
        assert content == think + answer  # markers: empty spans; tags: no teacher token


def test_same_logprobs_on_other_meshes_and_batch_sizes(tmp_path, student, teacher):
    data = _write(tmp_path / "in.jsonl", _rows(6))
    a = tmp_path / "a"
    score.run(_cfg(a, student, data, "score.batch_tokens=4096", teacher=teacher))
    b = tmp_path / "b"
    score.run(
        _cfg(
            b,
            student,
            data,
            "mesh.data=2",
            "mesh.fsdp=2",
            "mesh.tensor=2",
            "score.batch_tokens=512",
            "score.rows_per_shard=4",
            teacher=teacher,
        )
    )
    ra, rb = _read_parts(a / "score"), _read_parts(b / "score")
    assert [(r.prompt_id, r.candidate) for r in ra] == [(r.prompt_id, r.candidate) for r in rb]
    for x, y in zip(ra, rb, strict=True):
        for sx, sy in ((x.student, y.student), (x.teacher, y.teacher)):
            assert sx.token_ids == sy.token_ids and sx.offsets == sy.offsets
            np.testing.assert_allclose(sx.logprobs, sy.logprobs, atol=1e-5)


def test_killed_run_resumes_to_identical_output(tmp_path, student, teacher, monkeypatch):
    data = _write(tmp_path / "in.jsonl", _rows(10))
    full = tmp_path / "full"
    score.run(_cfg(full, student, data, "score.rows_per_shard=3", teacher=teacher))
    part = tmp_path / "part"
    shards = []
    real_shard, real = score._score_shard, score.ModelScorer.score

    def counting(ctx, shard, *a, **k):
        shards.append(shard)
        return real_shard(ctx, shard, *a, **k)

    def dying(self, *a, **k):
        if len(shards) == 2 and self.path == teacher:  # the teacher's pass of shard 2
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(score, "_score_shard", counting)
    monkeypatch.setattr(score.ModelScorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        score.run(_cfg(part, student, data, "score.rows_per_shard=3", teacher=teacher))
    done = sorted(p.name for p in (part / "score").glob("part-*.jsonl"))
    assert done == ["part-000000.jsonl"]
    assert not list((part / "score").glob(".*tmp")), "temporary file left behind"
    monkeypatch.setattr(score.ModelScorer, "score", real)
    summary = score.run(_cfg(part, student, data, "score.rows_per_shard=3", teacher=teacher))
    assert summary["skipped_shards"] == 1 and summary["rows_out"] == 10
    names = sorted(p.name for p in (full / "score").glob("*part-*"))
    assert len(names) == 12  # 4 shards x (part, stats, rejects)
    for name in names:
        assert (full / "score" / name).read_bytes() == (part / "score" / name).read_bytes()


def _join_files(tmp_path, rows):
    """Released-style log-prob rows (gpt-oss ids of each output's harmony form)."""
    tok = load_tokenizer(build_gpt_oss_tokenizer())
    head = len(encode_with_offsets(tok, "<|channel|>analysis<|message|>")[0])
    lp = []
    for r in rows:
        ids = encode_with_offsets(tok, think_to_harmony(r["output"]))[0][head:]
        lp.append(
            {
                "sample_uuid": r["uuid"],
                "token_ids": ids,
                "logprobs": [-0.1 - 0.01 * (i % 5) for i in range(len(ids))],
            }
        )
    return lp


def test_released_logprobs_join_needs_no_teacher_forward(tmp_path, student, monkeypatch):
    rows = _rows(4)
    data = _write(tmp_path / "sft.jsonl", rows)
    lp = _write(tmp_path / "lp.jsonl", _join_files(tmp_path, rows))
    monkeypatch.setattr(embedded, "tiny_teacher", lambda *a, **k: pytest.fail("teacher used"))
    summary = score.run(
        _cfg(
            tmp_path / "run", student, data, f"score.teacher_logprobs={lp}", "score.temperature=0.6"
        )
    )
    assert summary["teacher_from"] == {"logprobs": 4, "model": 0, "none": 0}
    assert summary["logprob_index"]["rows"] == 4
    for c in _read_parts(tmp_path / "run" / "score"):
        assert c.temperature == 0.6 and c.teacher.logprobs[0] == pytest.approx(-0.1)
        assert len(c.teacher.offsets) == len(c.teacher.token_ids)


def test_bad_input_is_located_or_rejected(tmp_path, student, teacher):
    rows = _rows(6, long_row=True)
    lp = _join_files(tmp_path, rows)
    lp[3]["logprobs"] = lp[3]["logprobs"][:-2]  # r3: length mismatch in the log-prob file
    del lp[4]  # r4: unknown uuid in the join
    lp_path = _write(tmp_path / "lp.jsonl", lp)
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, "{not json")  # line 2
    missing = dict(rows[5])
    del missing["output"]
    lines[6] = json.dumps(missing)  # line 7: r5 without its output
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # the teacher model is a tiny Qwen3; the recorded log-probs are gpt-oss ids
    join = (
        f"score.teacher_logprobs={lp_path}",
        f"score.teacher_tokenizer={build_gpt_oss_tokenizer()}",
    )
    strict = (*join, "score.on_bad_row=error")  # stop at the first bad row
    with pytest.raises(BadRow, match=r"bad\.jsonl:2: malformed JSON"):
        score.run(_cfg(tmp_path / "e1", student, data, *strict, teacher=teacher))
    del lines[1]
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        BadRow,
        match=r"bad\.jsonl:4: logprob_length_mismatch: token_ids has \d+ entries, logprobs "
        r"has \d+ \(teacher log-prob row .*lp\.jsonl:4\)",
    ):
        score.run(_cfg(tmp_path / "e2", student, data, *strict, teacher=teacher))
    lines.insert(1, "{not json")
    data.write_text("\n".join(lines) + "\n")
    summary = score.run(
        _cfg(
            tmp_path / "s",
            student,
            data,
            *join,
            "score.on_bad_row=skip",
            "bad_rows.max_bad_fraction=1",  # most of these few rows are bad on purpose
            "score.max_tokens=500",
            teacher=teacher,
        )
    )
    rejects = [
        json.loads(x) for x in (tmp_path / "s" / "score" / "rejects.part-000000.jsonl").open()
    ]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[2].startswith("malformed JSON")
    assert reasons[4].startswith("too_long")
    assert "logprob_length_mismatch" in reasons[5] and "lp.jsonl:4" in reasons[5]
    assert reasons[6].startswith("unknown_uuid: 'r4'")
    assert "missing field 'output'" in reasons[7]
    assert summary["rows_in"] == 7 and summary["rows_out"] == 2 and summary["rejects"] == 5
    assert summary["teacher_from"]["logprobs"] == 2


def test_plan_batches_covers_every_row_once():
    lengths = [5, 300, 129, 128, 1, 700, 64, 64, 64]
    batches = score.plan_batches(lengths, batch_tokens=1024, multiple=64, dp=2)
    seen = sorted(i for _, _, idx in batches for i in idx)
    assert seen == list(range(len(lengths)))
    for padded, rows, idx in batches:
        assert rows % 2 == 0 and len(idx) <= rows and padded % 64 == 0
        assert all(lengths[i] <= padded for i in idx)
