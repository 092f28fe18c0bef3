"""The score stage: parity with transformers, mesh/batch invariance, resume, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dasd_jax import embedded, score
from dasd_jax.config import load_config
from dasd_jax.records import BadRow
from dasd_jax.tokenizer import load_tokenizer, render_chat


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return embedded.tiny_student(tmp_path_factory.mktemp("cache"))


def _cfg(tmp_path, student, data, *extra):
    return load_config(None, [f"run_dir={tmp_path}", f"student.path={student}",
                              f"score.input={data}", "student.dtype=float32",
                              "student.attention=xla", "mesh.data=1", *extra])


def _rows(n=7, long_row=False):
    rows = embedded.demo_rows()
    rows = (rows * 3)[:n]
    rows = [dict(r, uuid=f"r{i}") for i, r in enumerate(rows)]
    if long_row:
        rows[2]["output"] = "<think>\n" + "step. " * 400 + "</think>\n\nok"
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_parts(folder):
    out = []
    for f in sorted(Path(folder).glob("part-*.jsonl")):
        out += [json.loads(x) for x in f.open()]
    return out


def test_logprobs_equal_a_direct_transformers_forward(tmp_path, student):
    rows = _rows(3)
    data = _write(tmp_path / "in.jsonl", rows)
    score.run(_cfg(tmp_path / "run", student, data))
    out = _read_parts(tmp_path / "run" / "score")
    tok = load_tokenizer(student)
    hf = transformers.AutoModelForCausalLM.from_pretrained(student).float().eval()
    for row, got in zip(rows, out, strict=True):
        r = render_chat(row["input"], row["output"])
        ids = tok.encode(r.text, add_special_tokens=False)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        ref = torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        k, n = got["n_prompt_tokens"], got["n_response_tokens"]
        assert got["token_ids"] == ids[k : k + n]
        np.testing.assert_allclose(got["logprobs"], ref.numpy()[k - 1 : k - 1 + n], atol=1e-5)
        # offsets tile the response text exactly
        text = row["output"]
        assert "".join(text[s:e] for s, e in got["offsets"]) == text


def test_same_logprobs_on_other_meshes_and_batch_sizes(tmp_path, student):
    data = _write(tmp_path / "in.jsonl", _rows(9))
    a = tmp_path / "a"
    score.run(_cfg(a, student, data, "score.batch_tokens=4096"))
    b = tmp_path / "b"
    score.run(_cfg(b, student, data, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
                   "score.batch_tokens=512", "score.bucket_multiple=64",
                   "score.rows_per_shard=4"))
    ra, rb = _read_parts(a / "score"), _read_parts(b / "score")
    assert [r["id"] for r in ra] == [r["id"] for r in rb]
    for x, y in zip(ra, rb, strict=True):
        assert x["token_ids"] == y["token_ids"]
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], atol=1e-5)


def test_killed_run_resumes_to_identical_output(tmp_path, student, monkeypatch):
    data = _write(tmp_path / "in.jsonl", _rows(10))
    full = tmp_path / "full"
    score.run(_cfg(full, student, data, "score.rows_per_shard=3"))
    part = tmp_path / "part"
    calls = {"n": 0}
    real = score.StudentScorer.score

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # dies inside the second shard
            raise KeyboardInterrupt("simulated kill")
        return real(self, *a, **k)

    monkeypatch.setattr(score.StudentScorer, "score", dying)
    with pytest.raises(KeyboardInterrupt):
        score.run(_cfg(part, student, data, "score.rows_per_shard=3"))
    done = sorted(p.name for p in (part / "score").glob("part-*.jsonl"))
    assert done and len(done) < 4
    assert not list((part / "score").glob(".*tmp")), "temporary file left behind"
    monkeypatch.setattr(score.StudentScorer, "score", real)
    summary = score.run(_cfg(part, student, data, "score.rows_per_shard=3"))
    assert summary["skipped_shards"] == len(done)
    for name in sorted(p.name for p in (full / "score").glob("part-*.jsonl")):
        assert (full / "score" / name).read_bytes() == (part / "score" / name).read_bytes()


def test_bad_input_is_located_or_rejected(tmp_path, student):
    rows = _rows(4, long_row=True)
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, "{not json")
    del rows[3]["output"]
    lines[4] = json.dumps(rows[3])
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadRow, match=r"bad\.jsonl:2: malformed JSON"):
        score.run(_cfg(tmp_path / "e", student, data))
    summary = score.run(_cfg(tmp_path / "s", student, data, "score.on_bad_row=skip",
                             "score.max_tokens=500"))
    rejects = [json.loads(x) for x in (tmp_path / "s" / "score").glob("rejects.*")
               .__next__().open()]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[2].startswith("malformed JSON")
    assert "missing field 'output'" in reasons[5]
    assert reasons[4].startswith("too_long")
    assert summary["rows_in"] == summary["rows_out"] + summary["rejects"] == 5


def test_plan_batches_covers_every_row_once():
    lengths = [5, 300, 129, 128, 1, 700, 64, 64, 64]
    batches = score.plan_batches(lengths, batch_tokens=1024, multiple=64, dp=2)
    seen = sorted(i for _, _, idx in batches for i in idx)
    assert seen == list(range(len(lengths)))
    for padded, rows, idx in batches:
        assert rows % 2 == 0 and len(idx) <= rows and padded % 64 == 0
        assert all(lengths[i] <= padded for i in idx)
