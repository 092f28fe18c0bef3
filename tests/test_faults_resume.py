"""Resume under faults: a journal torn inside a UTF-8 character resumes (a bad line before the
last is an error naming it); the sample, score and mixed-policy stages refuse to add shards to
a folder made under other settings (the shard cut, batch shapes, models, input content),
naming them; a standalone score with no `score.input` reads the run directory's sample output.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from dasd_jax import embedded, records, score
from dasd_jax.config import load_config
from dasd_jax.mixed_policy import shards as mp_shards
from dasd_jax.mixed_policy import stage as mp_stage
from dasd_jax.sample import shards
from dasd_jax.schema import Candidate, SFTRecord, TokenScores, write_sft_records
from dasd_jax.tokenizer import encode_with_offsets, load_tokenizer


@pytest.fixture(scope="module")
def student():
    return embedded.tiny_student()  # the user cache the CLI demo uses (built once)


# --------------------------------------------------------------------------- journals

ENTRY = {"line": 3, "q": 0, "phase": "student", "candidates": [], "text": "日本語 ok"}
NEXT = {"line": 4, "q": 1, "phase": "student", "candidates": [], "text": "数学 かな"}


def _line(entry: dict) -> bytes:
    return (json.dumps(entry, ensure_ascii=False) + "\n").encode()


def _journal_of(kind: str, folder):
    """(journal path, read() -> the keys of the entries read) of a sample / mixed-policy shard."""
    if kind == "sample":
        shard = shards._Shard(0.6, 0, folder)
        return shard.journal, lambda: sorted(shards._read_journal(shard.journal))
    shard = mp_shards.Shard(0, folder, [{"q": q, "id": f"x{q}"} for q in range(4)])
    shard.journal.parent.mkdir(parents=True)

    def read():
        s = mp_shards.Shard(0, folder, shard.questions)
        s.read_journal()
        return sorted(e["line"] for e in s.student.values())

    return shard.journal, read


@pytest.mark.parametrize("kind", ["sample", "mixed_policy"])
@pytest.mark.parametrize("newline", [False, True], ids=["no-newline", "newline"])
def test_a_journal_torn_inside_a_utf8_character_is_dropped(tmp_path, kind, newline):
    path, read = _journal_of(kind, tmp_path)
    torn = _line(NEXT)
    torn = torn[: torn.index("数".encode()) + 1]  # killed after the first byte of 数
    path.write_bytes(_line(ENTRY) + torn + (b"\n" if newline else b""))
    assert read() == [3]
    assert path.read_bytes() == _line(ENTRY)  # rewritten without it: appends stay parseable
    with path.open("ab") as f:
        f.write(_line(NEXT))
    assert read() == [3, 4]


@pytest.mark.parametrize("kind", ["sample", "mixed_policy"])
def test_a_bad_journal_line_before_the_last_is_an_error_naming_it(tmp_path, kind):
    path, read = _journal_of(kind, tmp_path)
    path.write_bytes(_line(ENTRY) + b'{"line": 9, "text": "\xe6\x97"}\n' + _line(NEXT))
    with pytest.raises(
        shards.CorruptJournal, match=rf"{re.escape(str(path))}:2: not a journal entry"
    ):
        read()
    assert path.read_bytes().count(b"\n") == 3  # left as it was, for a human to look at


# --------------------------------------------------------------------------- sample


class FakeTeacher:
    """A `run_shards` backend without a model: the file handling is under test."""

    name = "fake"

    def prepare(self, prompt):
        return prompt, None if isinstance(prompt, str) and prompt.strip() else "empty_prompt"

    def stream(self, jobs, progress):
        for job in jobs:
            for i, seed in enumerate(job.seeds):
                text = f"{job.prompt[:12]} #{seed % 997}"
                scores = TokenScores(
                    "fake", "fake", [1, 2], [-0.5, -0.25], [(0, 1), (1, len(text))]
                )
                meta = {"line": job.key[2], "seed": seed}
                c = Candidate(job.prompt_id, i, job.prompt, text, job.temperature, "stop")
                c.teacher, c.meta = scores, meta
                yield job, i, c

    def occupancy(self):
        return None


def _prompts(path, n=5, edit=None):
    rows = [dict(r) for r in embedded.demo_rows()[:n]]
    if edit is not None:
        rows[edit]["input"] += " (edited)"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sample(run_dir, data, *extra, teacher="fake-teacher"):
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"sample.input={data}",
            "sample.n=2",
            "sample.temperatures=[0.6, 1.0]",
            "sample.prompts_per_shard=2",
            "mesh.data=1",
            *extra,
        ],
    )
    return shards.run_shards(cfg, FakeTeacher(), data, teacher)


def _refused(folder, key: str):
    """The error of a resume in `folder` under another value of `key`, naming both."""
    where = re.escape(str(folder))
    return pytest.raises(shards.SettingsChanged, match=rf"{where} holds shards .* \({key} differ")


def _parts(folder, pattern="part-*.jsonl"):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob(pattern))}


def test_sample_refuses_a_resume_under_other_settings(tmp_path):
    data = _prompts(tmp_path / "prompts.jsonl")
    run_dir = tmp_path / "run"
    _sample(run_dir, data)
    out = run_dir / "sample"
    ref = _parts(out)
    assert len(ref) == 6 and (run_dir / "sample.shards.json").exists()
    (out / "t1" / "part-000002.jsonl").unlink()  # killed before its last shard was done

    for extra, teacher, key in [
        (("sample.prompts_per_shard=3",), "fake-teacher", "sample.prompts_per_shard"),
        (("sample.n=3",), "fake-teacher", "sample.n"),
        (("seed=1",), "fake-teacher", "seed"),
        (("sample.slots=8",), "fake-teacher", "sample.slots"),  # batch shapes
        (("mesh.data=2",), "fake-teacher", "mesh.data"),
        (("teacher.dtype=float32",), "fake-teacher", "teacher_options.dtype"),
        ((), "another-teacher", "teacher"),
    ]:
        with _refused(out, key):
            _sample(run_dir, data, *extra, teacher=teacher)
    with pytest.raises(shards.SettingsChanged, match="input_sha256"):
        _sample(run_dir, _prompts(tmp_path / "edited.jsonl", edit=4), teacher="fake-teacher")
    # what changes no shard: another temperature (its own folder), the bad-row policy
    assert _parts(out) == {k: v for k, v in ref.items() if k != "t1/part-000002.jsonl"}
    _sample(run_dir, data, "sample.temperatures=[0.6, 1.0, 0.8]", "sample.on_bad_row=skip")
    got = _parts(out)
    assert {k: v for k, v in got.items() if not k.startswith("t0.8/")} == ref

    # shards with no record of their settings (an older version's) are not resumed either
    (run_dir / "sample.shards.json").unlink()
    (out / "t1" / "part-000002.jsonl").unlink()
    with pytest.raises(shards.SettingsChanged, match=r"there is no .*/sample\.shards\.json"):
        _sample(run_dir, data)
    # the folder moved aside (as --force does): a fresh start under any settings
    out.rename(tmp_path / "sample.old")
    _sample(run_dir, data, "sample.n=3")
    record = json.loads((run_dir / "sample.shards.json").read_text())
    assert record["settings"]["sample"]["n"] == 3 and len(_parts(out)) == 6


def test_a_kill_after_a_shard_is_published_leaves_no_dead_journal(tmp_path, monkeypatch):
    """Killed between publishing a part file and removing its journal: the re-run removes
    the journal (the part is the result) and the output equals an uninterrupted run's."""
    data = _prompts(tmp_path / "prompts.jsonl")
    _sample(tmp_path / "ref", data)
    ref = {**_parts(tmp_path / "ref" / "sample"), **_parts(tmp_path / "ref" / "sample", "rej*")}
    real_unlink = Path.unlink

    class Killed(BaseException):
        pass

    def unlink_or_die(self, *a, **k):
        if self.suffix == ".journal" and self.exists():
            raise Killed  # nothing after this runs
        return real_unlink(self, *a, **k)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(Path, "unlink", unlink_or_die)
    with pytest.raises(Killed):
        _sample(run_dir, data)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    out = run_dir / "sample"
    (dead,) = out.rglob("*.journal")
    assert dead.with_suffix(".jsonl").exists()  # its shard is done
    _sample(run_dir, data)
    assert not list(out.rglob("*.journal"))
    assert {**_parts(out), **_parts(out, "rej*")} == ref


# --------------------------------------------------------------------------- score


def _sampled(student, run_dir, n=5):
    """<run_dir>/sample as a finished sample stage leaves it (the tiny student's tokens as
    the teacher's, made-up log-probs); returns its part files."""
    tok = load_tokenizer(student)
    rows = embedded.demo_rows()[:n]
    parts = {}
    for k, r in enumerate(rows):
        t = 0.6 if k < 3 else 1.0
        ids, offs = encode_with_offsets(tok, r["output"])
        lps = [-0.1 - 0.01 * ((i + k) % 7) for i in range(len(ids))]
        teacher = TokenScores("teacher", "tok", ids, lps, offs)
        c = Candidate(r["uuid"], 0, r["input"], r["output"], t, "stop", teacher=teacher)
        path = run_dir / "sample" / f"t{t:g}" / f"part-00000{k % 3 // 2}.jsonl"
        parts.setdefault(path, []).append(json.dumps(c.to_dict()) + "\n")
    for path, lines in parts.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(lines))
    (run_dir / "sample" / "summary.json").write_text("{}\n")
    return sorted(parts)


def _score_cfg(run_dir, student, *extra):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            "score.rows_per_shard=2",
            "score.teacher_scoring=never",  # the student alone: the stage's files are tested
            "student.dtype=float32",
            "student.attention=xla",
            "mesh.data=1",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory, student):
    """A run directory whose sample stage finished, scored with no score.input."""
    run_dir = tmp_path_factory.mktemp("scored")
    parts = _sampled(student, run_dir)
    summary = score.run(_score_cfg(run_dir, student))
    return run_dir, parts, summary


def test_score_with_no_input_reads_the_run_dirs_sample_output(scored):
    run_dir, parts, summary = scored
    assert summary["input"] == str(run_dir / "sample")
    assert summary["counts"] == {"in": 5, "out": 5, "rejected": 0}
    assert sorted(summary["files"]) == [str(p) for p in parts]
    got = [
        json.loads(x) for f in sorted((run_dir / "score").glob("part-*.jsonl")) for x in f.open()
    ]
    want = [r["uuid"] for r in embedded.demo_rows()[:5]]
    assert sorted(c["prompt_id"] for c in got) == sorted(want)
    assert not (run_dir / "inputs").exists()  # no demo rows written
    record = json.loads((run_dir / "score.shards.json").read_text())["settings"]
    assert [f["path"] for f in record["input_files"]] == [
        "{run_dir}" + str(p)[len(str(run_dir)) :] for p in parts
    ]
    assert record["score"]["rows_per_shard"] == 2 and record["student"]["dtype"] == "float32"


def test_score_with_no_input_uses_the_demo_rows_only_without_sample_output(
    tmp_path, student, caplog
):
    cfg = _score_cfg(tmp_path / "fresh", student)
    with caplog.at_level(logging.WARNING, logger="dasd_jax.score"):
        _, spec, files = score.resolve_inputs(cfg)
    assert files == [spec] == [str(tmp_path / "fresh" / "inputs" / "demo.jsonl")]
    assert "EMBEDDED DEMO rows" in caplog.text
    # a sample run that has not finished: neither its partial output nor the demo rows
    journal = tmp_path / "killed" / "sample" / "t0.6" / "part-000000.journal"
    journal.parent.mkdir(parents=True)
    journal.write_text('{"line": 1, "candidates": []}\n')
    with pytest.raises(FileNotFoundError, match=r"unfinished sample run .*score\.input="):
        score.resolve_inputs(_score_cfg(tmp_path / "killed", student))
    # a finished shard's journal (a kill after its part was published) is a dead leftover
    journal.with_suffix(".jsonl").write_text("")
    (tmp_path / "killed" / "sample" / "summary.json").write_text("{}\n")
    assert score.input_spec(_score_cfg(tmp_path / "killed", student)) == str(journal.parents[1])


def _resumable(scored, tmp_path):
    """A copy of the scored run directory whose last shard a kill interrupted."""
    run_dir = shutil.copytree(scored[0], tmp_path / "run")
    (run_dir / "score" / "part-000002.jsonl").unlink()
    return run_dir


@pytest.mark.parametrize(
    "override, key",
    [
        ("score.rows_per_shard=3", "score.rows_per_shard"),  # another cut: rows twice or never
        # batch shapes: log-probs differ in the last bits (docs/score.md)
        ("score.batch_tokens=512", "score.batch_tokens"),
        ("score.bucket_multiple=64", "score.bucket_multiple"),
        ("score.chunk_size=512", "score.chunk_size"),
        ("mesh.fsdp=2", "mesh.fsdp"),
        ("student.dtype=bfloat16", "student.dtype"),
        ("score.system_prompt=hi", "score.system_prompt"),
    ],
)
def test_score_refuses_a_resume_under_other_settings(scored, tmp_path, student, override, key):
    run_dir = _resumable(scored, tmp_path)
    out = run_dir / "score"
    with _refused(out, key):
        score.run(_score_cfg(run_dir, student, override))
    assert not (out / "part-000002.jsonl").exists()


def test_score_refuses_other_input_and_resumes_on_other_devices(scored, tmp_path, student, caplog):
    run_dir = _resumable(scored, tmp_path)
    out = run_dir / "score"
    part = run_dir / "sample" / "t1" / "part-000000.jsonl"
    original = part.read_bytes()
    part.write_bytes(original.replace(b'"stop"', b'"length"'))
    with pytest.raises(shards.SettingsChanged, match=r"input_files"):
        score.run(_score_cfg(run_dir, student))
    part.write_bytes(original)
    # other chips (a resume after a preemption): logged, the shard is redone, equal here
    record = json.loads((run_dir / "score.shards.json").read_text())
    assert record["device"]["device_kind"] == "cpu"
    record["device"]["device_kind"] = "TPU v5 lite"
    (run_dir / "score.shards.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="dasd_jax.sample.shards"):
        summary = score.run(_score_cfg(run_dir, student))
    assert "TPU v5 lite" in caplog.text and summary["skipped_shards"] == 2
    here, there = str(run_dir).encode(), str(scored[0]).encode()  # candidates name their file
    moved = {k: v.replace(here, there) for k, v in _parts(out, "*part-*").items()}
    assert moved == _parts(scored[0] / "score", "*part-*")
    (run_dir / "score.shards.json").unlink()
    (out / "part-000002.jsonl").unlink()
    with pytest.raises(shards.SettingsChanged, match=r"there is no .*/score\.shards\.json"):
        score.run(_score_cfg(run_dir, student))


# --------------------------------------------------------------------------- mixed policy


def test_mixed_policy_refuses_a_plan_of_other_sources_or_engines(tmp_path, student, monkeypatch):
    rows = embedded.demo_rows()[:4]
    source = tmp_path / "select" / "train-00000.array_record"
    write_sft_records(
        source, [SFTRecord(r["uuid"], r["input"], r["output"], "low_t") for r in rows]
    )

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop  # the plan is written: no model needs to run for this test

    monkeypatch.setattr(mp_stage, "student_phase", stop)

    def run(*extra):
        cfg = load_config(
            None,
            [
                f"run_dir={tmp_path}",
                f"mixed_policy.student={student}",
                f"teacher.path={student}",  # never loaded here
                "mixed_policy.demo=false",
                "mesh.data=1",
                *extra,
            ],
        )
        mp_stage.run(cfg)

    with pytest.raises(Stop):
        run()
    assert (tmp_path / "mixed_policy" / "plan.json").exists()
    with pytest.raises(Stop):
        run()  # the same settings resume
    for extra, key in [
        (("sample.slots=8",), "engine"),
        (("sample.decode_steps=4",), "engine"),
        (("teacher.dtype=float32",), "models"),
    ]:
        with pytest.raises(mp_stage.StageError, match=rf"other settings \({key} differ"):
            run(*extra)
    # the same file name, other records: the plan's record indices would point elsewhere
    write_sft_records(source, [SFTRecord(r["uuid"], r["output"], r["input"], "x") for r in rows])
    with pytest.raises(mp_stage.StageError, match=r"source_content"):
        run()


def test_sample_rejects_a_repeated_prompt_id_and_stops_on_an_empty_input(tmp_path):
    rows = [dict(r) for r in embedded.demo_rows()[:5]]
    rows[3]["uuid"] = rows[0]["uuid"]  # a second row under the first one's id
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # max_bad_fraction=0.5: one duplicate in 5 rows is a counted reject here, not a stop
    summary = _sample(tmp_path / "run", data, "bad_rows.max_bad_fraction=0.5")
    rejects = [
        json.loads(line)
        for f in sorted((tmp_path / "run" / "sample").glob("t*/rejects.part-*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    dup = [r for r in rejects if r["reason"].startswith("duplicate_id")]
    assert [r["line"] for r in dup] == [4, 4]  # once per temperature, the later row
    assert f"already read at {data}:1" in dup[0]["reason"]
    assert summary["prompts_in"] == 10 and summary["rejects"] == 2  # 5 rows x 2 temperatures
    # a resume rejects the same rows (done shards still register their ids)
    again = _sample(tmp_path / "run", data, "bad_rows.max_bad_fraction=0.5")
    assert again["rejects"] == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(records.EmptyInput, match=r"sample.input=.*empty\.jsonl has no rows"):
        _sample(tmp_path / "run2", empty)


def test_score_stops_on_an_empty_input(tmp_path, student):
    empty = tmp_path / "rows.jsonl"
    empty.write_text("")
    with pytest.raises(records.EmptyInput, match=r"score.input=.*rows\.jsonl \(1 files\) has no"):
        score.run(_score_cfg(tmp_path / "run", student, f"score.input={empty}"))
    assert not (tmp_path / "run" / "score" / "summary.json").exists()
