"""The sample stage: well-formed candidates, resume after a real kill, bad input, continuation."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dasd_jax import embedded
from dasd_jax.config import ConfigError, load_config
from dasd_jax.records import BadRow, TooManyBadRows
from dasd_jax.sample import shards, stage
from dasd_jax.sample.driver import Request, generate
from dasd_jax.schema import Candidate

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return embedded.tiny_random_teacher(tmp_path_factory.mktemp("cache"))  # flat logits, ChatML


def _overrides(run_dir, teacher, data, *extra):
    return [
        f"run_dir={run_dir}",
        f"teacher.path={teacher}",
        f"sample.input={data}",
        "teacher.dtype=float32",
        "teacher.attention=xla",
        "mesh.data=1",
        "sample.n=2",
        "sample.slots=4",
        f"sample.max_tokens={MAX_TOKENS}",
        "sample.max_prefill_length=64",
        "sample.prompts_per_shard=2",
        "sample.decode_steps=4",
        'sample.stop=["\\n"]',
        "sample.answer_field=answer",
        *extra,
    ]


def _cfg(run_dir, teacher, data, *extra):
    return load_config(None, _overrides(run_dir, teacher, data, *extra))


def _prompts(tmp_path, n=5):
    rows = [dict(r, answer=f"a{i}") for i, r in enumerate(embedded.demo_rows()[:n])]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _read(folder):
    out = {}
    for f in sorted(Path(folder).rglob("part-*.jsonl")):
        if f.name.endswith(".jsonl") and "rejects" not in f.name:
            out[str(f.relative_to(folder))] = f.read_text()
    return out


def test_candidates_are_well_formed(tmp_path, teacher):
    data, rows = _prompts(tmp_path)
    summary = stage.run(_cfg(tmp_path / "run", teacher, data))
    assert summary["samples"] == 5 * 2 * 2 and summary["rejects"] == 0
    # random tokens may spell text not in NFC (e.g. a CJK compatibility ideograph): such a
    # sample is refused with its reason, as the score stage would refuse it
    refused = []
    for f in sorted((tmp_path / "run" / "sample").glob("t*/rejects.part-*.jsonl")):
        refused += [json.loads(x) for x in f.read_text().splitlines()]
    assert len(refused) == summary["candidates_rejected"]
    assert all(r["reason"] == "not_nfc" for r in refused)
    per_t = summary["candidates_per_temperature"]
    assert summary["candidates"] + len(refused) == sum(per_t.values()) + len(refused) == 20
    reasons = summary["finish_reasons"]
    assert reasons.get("stop", 0) > 0 and reasons.get("length", 0) > 0  # both paths ran
    from dasd_jax.sample.text import TokenText
    from dasd_jax.tokenizer import load_tokenizer

    tt = TokenText(load_tokenizer(teacher))
    files = _read(tmp_path / "run" / "sample")
    assert sorted(files) == [f"t{t}/part-00000{i}.jsonl" for t in ("0.6", "1") for i in range(3)]
    seen = set()
    for _name, text in files.items():
        for raw in text.splitlines():
            c = Candidate.from_dict(json.loads(raw))
            seen.add((c.temperature, c.prompt_id, c.candidate))
            t = c.teacher
            n = len(t.token_ids)
            assert len(t.logprobs) == len(t.sampling_logprobs) == len(t.offsets) == n
            # the response is the tokens' text (cut before a stop string), offsets tile it
            full, _ = tt.text(t.token_ids)
            if c.finish_reason == "length":
                assert n == MAX_TOKENS and full == c.response and c.meta["stop"] is None
            else:
                assert c.meta["stop"] == "\n" and full.index("\n") == len(c.response)
            if n == 0:  # the first token began with the stop string
                assert c.response == ""
                continue
            assert t.offsets[0][0] == 0 and t.offsets[-1][1] == len(c.response)
            # consecutive spans meet, or share the one character a token boundary splits
            assert all(
                a[1] - b[0] in (0, 1) for a, b in zip(t.offsets, t.offsets[1:], strict=False)
            )
            assert max(t.logprobs) <= 0 and max(t.sampling_logprobs) <= 0
            if c.temperature == 1.0:  # T=1, no truncation: the same distribution
                np.testing.assert_allclose(t.sampling_logprobs, t.logprobs, atol=1e-4)
            else:  # T=0.6: another distribution (the random model's logits are flat, so the
                # gap is small, but it is there for every token)
                gap = np.abs(np.subtract(t.sampling_logprobs, t.logprobs))
                assert gap.min() > 1e-4
            row = rows[int(c.prompt_id.split("-")[1])]
            assert c.prompt == row["input"] and c.domain == row["domain"]
            assert c.reference_answer == row["answer"]
            assert c.meta["seed"] == stage.candidate_seed(
                0, c.prompt_id, c.temperature, c.candidate
            )
    seen |= {(r["temperature"], r["prompt_id"], r["candidate"]) for r in refused}
    assert len(seen) == 20
    stats = json.loads((tmp_path / "run/sample/t1/part-000002.stats.json").read_text())
    assert stats["prompts_in"] == 1 and stats["samples"] == 2


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from dasd_jax.config import load_config
    from dasd_jax.sample import shards, stage

    calls = [0]
    append = shards._append_journal

    def append_then_die(*args, **kwargs):
        append(*args, **kwargs)
        calls[0] += 1
        if calls[0] == {kill_after}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind runs

    shards._append_journal = append_then_die
    stage.run(load_config(None, {overrides!r}))
""")


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path, teacher):
    data, _ = _prompts(tmp_path)
    stage.run(_cfg(tmp_path / "ref", teacher, data))
    ref = _read(tmp_path / "ref" / "sample")

    run_dir = tmp_path / "killed"
    script = KILL_SCRIPT.format(
        root=str(ROOT), kill_after=3, overrides=_overrides(run_dir, teacher, data)
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    out = run_dir / "sample"
    # killed after 3 finished prompts: they are in journals, finished shards are complete
    journals = {f.name: len(f.read_text().splitlines()) for f in out.rglob("*.journal")}
    partial = _read(out)
    assert journals and partial
    assert sum(journals.values()) + 2 * len(partial) >= 3
    assert set(partial) < set(ref) and all(partial[k] == ref[k] for k in partial)

    summary = stage.run(_cfg(run_dir, teacher, data))
    assert summary["skipped_shards"] == len(partial) and summary["samples"] == 20
    assert _read(out) == ref
    assert not list(out.rglob("*.journal"))
    resumed = sum(json.loads(f.read_text())["resumed_prompts"] for f in out.rglob("*.stats.json"))
    assert resumed == sum(journals.values())
    # a second restart has nothing left to do
    again = stage.run(_cfg(run_dir, teacher, data))
    assert again["shards_written"] == 0 and _read(out) == ref


def test_a_torn_journal_line_is_dropped(tmp_path):
    shard = shards._Shard(0.6, 0, tmp_path)
    c = Candidate("p", 0, "q", "r", 0.6, "stop", meta={"line": 3})
    shards._append_journal(shard.journal, 3, [c])
    with shard.journal.open("a") as f:
        f.write('{"line": 4, "candidates": [{"prompt_id"')  # killed mid-append
    assert list(shards._read_journal(shard.journal)) == [3]
    shards._append_journal(shard.journal, 5, [c])
    assert list(shards._read_journal(shard.journal)) == [3, 5]


def test_bad_prompts_are_rejected_with_their_reason(tmp_path, teacher):
    lines = [
        json.dumps({"uuid": "ok", "input": "What is 2 + 2?"}),
        json.dumps({"uuid": "empty", "input": ""}),
        json.dumps({"uuid": "blank", "input": "  \n "}),
        json.dumps({"uuid": "long", "input": "word " * 200}),
        json.dumps({"uuid": "missing", "question": "no input field"}),
        json.dumps({"uuid": "number", "input": 42}),
        "{not json",
    ]
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ("sample.prompts_per_shard=10", "sample.temperatures=[1.0]")
    # the pipeline-wide policy: 6 of 7 bad prompt lines stop the run at the first one that
    # makes the share certain to pass 5%, naming the count, the reason and the rejects
    with pytest.raises(
        TooManyBadRows, match=r"sample: 1 of the input's 7 rows .*empty_prompt \(1\)"
    ):
        stage.run(_cfg(tmp_path / "default", teacher, data, *args))
    summary = stage.run(
        _cfg(
            tmp_path / "run",
            teacher,
            data,
            "sample.on_bad_row=skip",
            "bad_rows.max_bad_fraction=1",
            *args,
        )
    )
    assert summary["prompts_out"] == 1 and summary["rejects"] == 6
    assert summary["prompts_in"] == 7 and summary["candidates"] == 2
    rejects = [
        json.loads(x)
        for x in (tmp_path / "run/sample/t1/rejects.part-000000.jsonl").read_text().splitlines()
    ]
    reasons = {r["line"]: r["reason"] for r in rejects}
    assert reasons[2] == reasons[3] == "empty_prompt"
    assert reasons[4].startswith("prompt_too_long: ") and "max_prefill_length=64" in reasons[4]
    assert reasons[5].startswith("missing field 'input'")
    assert reasons[6] == "field 'input' should be a string"
    assert reasons[7].startswith("malformed JSON")

    with pytest.raises(BadRow, match=r"bad.jsonl:2: empty_prompt"):
        strict = ("sample.prompts_per_shard=10", "sample.on_bad_row=error")
        stage.run(_cfg(tmp_path / "run2", teacher, data, *strict))
    for bad, key in [
        ("sample.temperatures=[-0.5]", "sample.temperatures"),
        ("sample.temperatures=[.nan]", "sample.temperatures"),
        ("sample.temperatures=[]", "sample.temperatures"),
        ("sample.top_p=0", "sample.top_p"),
        ("sample.n=0", "sample.n"),
        ("sample.max_prefill_length=100", "sample.max_prefill_length"),
    ]:
        with pytest.raises(ConfigError, match=key):
            load_config(None, [bad])


def test_continuation_extends_the_prefix(tmp_path, teacher):
    cfg = _cfg(tmp_path, teacher, "unused.jsonl", "sample.max_prefill_length=128")
    sampler = stage.TeacherSampler(teacher, cfg)
    prompt, prefix = "What is 17 * 24?", "<think>\nI need 17 * 24. Split it"
    cands = sampler.continue_(prompt, prefix, temperature=1.0, n=2, max_tokens=6)
    assert [c.candidate for c in cands] == [0, 1]
    prefix_ids = sampler.tokenizer.encode(prefix, add_special_tokens=False)
    for c in cands:
        assert c.response.startswith(prefix) and c.meta["student_prefix_chars"] == len(prefix)
        assert c.meta["prefix_tokens"] == len(prefix_ids)
        t = c.teacher
        assert len(t.token_ids) == len(t.logprobs) == len(t.offsets) <= 6
        assert t.offsets[0][0] == len(prefix) and t.offsets[-1][1] == len(c.response)
    # the same as the engine continuing the concatenated tokens with the same seeds
    req = Request(
        "x",
        sampler.encode_prompt(prompt) + prefix_ids,
        [sampler.params(1.0, s, 6) for s in [cands[0].meta["seed"], cands[1].meta["seed"]]],
    )
    direct = generate(sampler.engine, [req], sampler.token_text)["x"]
    assert [d.token_ids for d in direct] == [c.teacher.token_ids for c in cands]
    # token-id prefixes give the same continuation as the text they spell
    by_ids = sampler.continue_(prompt, prefix_ids, temperature=1.0, n=2, max_tokens=6)
    assert [c.response for c in by_ids] == [c.response for c in cands]
    with pytest.raises(ValueError, match="prompt_too_long"):
        sampler.continue_(prompt, "word " * 200, temperature=1.0)
