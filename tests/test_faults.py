"""Faults and bad input around the stages: errors that name what failed, one writer per run
directory, no leftovers, no secrets on the wire, no escape from the cache (docs/reliability.md).

The stage-specific faults are in test_faults_train.py (non-finite steps, checkpoints, export),
test_faults_verify.py (answer-check time limits) and test_faults_resume.py (journals, shard
settings); the kill -9 chain over every stage is in test_pipeline_e2e.py.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fake_gcs
import pytest

from dasd_jax import ingest, launch, pipeline, records, runlock, storage
from dasd_jax.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ errors naming what failed


def _write_bytes(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def test_a_non_utf8_line_is_one_bad_row_naming_file_line_and_byte(tmp_path):
    f = _write_bytes(
        tmp_path / "rows.jsonl",
        b'{"uuid": "a", "input": "x", "output": "y"}',
        b'{"uuid": "b", "input": "caf\xe9", "output": "y"}',  # Latin-1, not UTF-8
        b'{"uuid": "c", "input": "z", "output": "y"}',
    )
    bad: list[records.BadRow] = []
    rows = list(records.iter_jsonl(f, on_bad="skip", rejected=lambda e, raw: bad.append(e)))
    assert [r["uuid"] for _, r in rows] == ["a", "c"]  # the rows around it are not lost
    assert len(bad) == 1 and bad[0].line == 2 and bad[0].path == str(f)
    assert "not UTF-8" in bad[0].reason and "0xe9" in bad[0].reason
    with pytest.raises(records.BadRow, match=r"rows.jsonl:2: not UTF-8"):
        list(records.iter_jsonl(f))
    # the score stage's reader: the same BadRow, which its bad-row policy counts
    got = []
    for line, raw in ingest.iter_lines(f):
        try:
            got.append(ingest.parse_line(raw, f, line)["uuid"])
        except records.BadRow as e:
            got.append(e.reason)
    assert got[0] == "a" and got[2] == "c" and got[1].startswith("not UTF-8")


def test_a_missing_model_folder_says_it_does_not_exist(tmp_path):
    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.download_dir(missing)
    from dasd_jax.tokenizer import load_tokenizer

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "empty")


def test_the_score_stage_names_a_missing_student_folder(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"/nonexistent does not exist"):
        launch.main(["--stage=score", f"run_dir={tmp_path}", "student.path=/nonexistent"])


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  seq_len: 256\n  micro_batch: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML: line \d+, column \d+"):
        load_config(bad)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"run_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin\.yaml: not UTF-8"):
        load_config(latin)


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  seq_len: 256\n")
    with pytest.raises(ConfigError) as e:
        load_config(good, ["train.seq_len=abc"])
    assert str(e.value).startswith("command line (over ")
    assert "train.seq_len" in str(e.value)
    with pytest.raises(ConfigError, match=r"^command line: train\.seq_len"):
        load_config(None, ["train.seq_len=abc"])


def test_disk_full_names_the_file_being_written(tmp_path):
    out = tmp_path / "sub" / "part-000000.jsonl"
    with pytest.raises(OSError) as e:
        with records.atomic_write(out) as f:
            f.write("x")
            raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises
    assert e.value.errno == errno.ENOSPC
    assert str(out) in str(e.value) and e.value.filename == str(out)
    assert not out.exists() and os.listdir(out.parent) == []  # no temporary left


# ------------------------------------------------------------------------------ the run lock


def test_a_second_launcher_on_a_held_run_dir_refuses_naming_the_holder(tmp_path):
    with runlock.hold(tmp_path):
        proc = subprocess.run(
            [sys.executable, "-m", "dasd_jax.launch", "--stage=select", f"run_dir={tmp_path}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"run_dir {os.path.realpath(tmp_path)} is in use by pid {os.getpid()}" in proc.stderr
    assert not (tmp_path / "manifest.json").exists()  # it touched nothing


def test_the_lock_is_reentrant_and_released(tmp_path):
    with runlock.hold(tmp_path), runlock.hold(tmp_path / "." / ""):
        info = json.loads((tmp_path / runlock.LOCK).read_text())
        assert info["pid"] == os.getpid()
    with runlock.hold(tmp_path):  # released: taken again
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    code = textwrap.dedent(
        f"""
        import os, signal
        from dasd_jax import runlock
        with runlock.hold({str(tmp_path)!r}):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120)
    assert proc.returncode == -9
    left = json.loads((tmp_path / runlock.LOCK).read_text())
    assert left["pid"] != os.getpid()  # the dead process's record is still there
    with runlock.hold(tmp_path):  # the kernel released its flock: not stale, just free
        assert json.loads((tmp_path / runlock.LOCK).read_text())["pid"] == os.getpid()


def test_run_step_holds_the_lock_against_another_process(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    step = pipeline.STEP_BY_NAME["select"]
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import time\nfrom dasd_jax import runlock\nwith runlock.hold({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runlock.RunLocked, match="is in use by pid"):
            pipeline.run_step(cfg, step, lambda c: {"counts": {"in": 0, "out": 0}})
        assert not (tmp_path / "manifest.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    return fake_gcs.install(monkeypatch, tmp_path)


def test_a_gcs_lock_refuses_a_live_holder_and_takes_over_a_stale_one(gcs):
    run_dir = "gs://bucket/runs/a"
    with runlock.hold(run_dir, heartbeat_s=3600):
        # what another process does (this one would re-enter): it sees a fresh heartbeat
        with pytest.raises(runlock.RunLocked, match="last heartbeat"):
            runlock._RemoteLock(run_dir, runlock.STALE_S, 3600)
    lock = storage.join(run_dir, runlock.LOCK)
    with storage.atomic_write(lock) as f:  # a holder that was preempted an hour ago
        json.dump({"pid": 1, "host": "gone", "heartbeat": 0.0}, f)
    with runlock.hold(run_dir, heartbeat_s=3600):
        assert json.loads(storage.read_text(lock))["pid"] == os.getpid()
    assert not storage.exists(lock)  # released: removed


# ---------------------------------------------------------------------------------- leftovers


def test_a_step_sweeps_the_temporaries_a_killed_run_left_in_its_outputs(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    step = pipeline.STEP_BY_NAME["select_high_t"]
    cfg = pipeline.with_overrides(cfg, step, None, [f"run_dir={tmp_path}"])
    plots = tmp_path / "select_high_t" / "plots"
    plots.mkdir(parents=True)
    # what a kill during plotting leaves (storage.atomic_path's temporary name), and ours
    left = plots / ".sentence_types.png.k2x9_a0q.tmp"
    left.write_bytes(b"half a png")
    manifest_tmp = tmp_path / ".manifest.json.abcd1234.tmp"
    manifest_tmp.write_text("{")
    keep = plots / "notes.tmp"  # a user's file, not one of our temporaries
    keep.write_text("mine")
    (tmp_path / "score").mkdir()
    seen = []

    def stage(c):
        seen.append(left.exists() or manifest_tmp.exists())
        return {"counts": {"in": 0, "out": 0}}

    pipeline.run_step(cfg, step, stage)
    assert seen == [False]  # gone before the stage ran
    assert keep.exists()


def test_a_killed_write_leaves_a_temporary_that_is_recognised():
    for name in (".sentence_types.png.k2x9_a0q.tmp", ".part-000001.jsonl." + "ab" * 16 + ".tmp"):
        assert storage.is_temporary(name), name
    for name in ("part-000001.jsonl", "x.tmp", ".hidden", ".part.jsonl.journal"):
        assert not storage.is_temporary(name), name


# ----------------------------------------------------------------------------------- security


def test_a_gcs_path_with_dot_dot_cannot_escape_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "cache"))
    inside = storage.local_dir("gs://bucket/a/../b")
    assert inside == str(tmp_path / "cache" / "remote" / "gs" / "bucket" / "b")
    for bad in ("gs://bucket/../../../etc", "gs://../x", "gs://bucket/a/../../.."):
        with pytest.raises(ValueError, match="climbs out of the bucket"):
            storage.local_dir(bad)
    assert not (tmp_path / "etc").exists()


def test_help_says_a_custom_scorer_runs_code_named_by_the_config(capsys):
    with pytest.raises(SystemExit):
        launch.main(["--help"])
    out = capsys.readouterr().out
    assert "evaluate.scorer=package.module:function imports and runs" in out


def test_an_api_key_is_never_sent_in_clear_text_to_another_machine(monkeypatch):
    from dasd_jax.sample.config import OpenAIConfig
    from dasd_jax.sample.openai_client import OpenAIClient

    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret")
    for url in ("http://10.0.0.5:8000/v1", "http://teacher.example.com/v1"):
        with pytest.raises(ValueError, match="would be sent in clear text"):
            OpenAIClient(OpenAIConfig(base_url=url))
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "https://x.example/v1"):
        assert OpenAIClient(OpenAIConfig(base_url=url)).headers["Authorization"]
    opted_in = OpenAIConfig(base_url="http://10.0.0.5:8000/v1", allow_plain_http_key=True)
    assert OpenAIClient(opted_in).headers["Authorization"] == "Bearer sk-secret"
    monkeypatch.delenv("OPENAI_API_KEY")  # no key, nothing to leak
    assert "Authorization" not in OpenAIClient(OpenAIConfig(base_url="http://10.0.0.5/v1")).headers


# ----------------------------------------------------------------------------- silent passes


def test_select_on_an_empty_input_stops_instead_of_completing(tmp_path):
    from dasd_jax.select import stage as select_stage

    scored = tmp_path / "score"
    scored.mkdir()
    (scored / "part-000000.jsonl").write_text("")
    cfg = load_config(None, [f"run_dir={tmp_path}", f"select_stage.input={scored}"])
    with pytest.raises(
        records.EmptyInput, match=r"select_stage.input=.*score \(1 parts\) has no rows"
    ):
        select_stage.run(cfg)
    assert not (tmp_path / "select" / "summary.json").exists()


def test_duplicate_ids_name_both_places():
    seen = records.DuplicateIds("uuid")
    seen.check("a", "in.jsonl", 1)
    seen.check("b", "in.jsonl", 2)
    with pytest.raises(records.BadRow) as e:
        seen.check("a", "more.jsonl", 7)
    assert e.value.path == "more.jsonl" and e.value.line == 7
    assert records.reason_key(e.value.reason) == "duplicate_id"
    assert "already read at in.jsonl:1" in e.value.reason


def _fake_stage(stage: str):
    def run(cfg):
        for out in pipeline.OUTPUTS[stage](cfg):
            out.mkdir(parents=True, exist_ok=True)
            (out / "part-000000.jsonl").write_text("{}\n")
        return {"counts": {"in": 1, "out": 1, "rejected": 0}}

    return run


def test_a_standalone_score_records_what_the_pipeline_would(tmp_path):
    """`--stage=score` with no score.input after `--stage=sample` scores <run_dir>/sample and
    records it so: a later `--stage=all` skips it instead of calling its config changed."""
    overrides = [f"run_dir={tmp_path}"]
    pipeline.run_step(
        load_config(None, overrides), pipeline.STEP_BY_NAME["sample"], _fake_stage("sample")
    )
    (tmp_path / "sample" / "summary.json").write_text("{}")
    step, cfg = pipeline.single_step("score", load_config(None, overrides), None, overrides)
    assert cfg.score.input == str(tmp_path / "sample")
    pipeline.run_step(cfg, step, _fake_stage("score"))
    calls = []

    def stages(stage):
        calls.append(stage)
        return _fake_stage(stage)

    pipeline.run_all(None, overrides, stages)
    assert "sample" not in calls and "score" not in calls  # both complete, both skipped


def test_force_redoes_a_step_that_was_killed_instead_of_resuming_it(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    step = pipeline.STEP_BY_NAME["select"]
    (tmp_path / "score").mkdir()

    def killed(c):
        (tmp_path / "select").mkdir()
        (tmp_path / "select" / "part-000000.jsonl").write_text("half\n")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_step(cfg, step, killed)
    pipeline.run_step(cfg, step, _fake_stage("select"), force=True)
    assert (tmp_path / "select" / "part-000000.jsonl").read_text() == "{}\n"
    assert [p.name.split(".old-")[0] for p in tmp_path.glob("select.old-*")] == ["select"]
