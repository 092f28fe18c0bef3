"""The pipeline's manifest and `--stage=all` logic, with stand-in stages (fast).

The stand-ins write each step's real output paths (OUTPUTS) and read its inputs, so the
skip / resume / changed-input logic runs exactly as it does around the real stages; the real
stages end to end are in test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dasd_jax import pipeline
from dasd_jax.config import load_config


class Killed(RuntimeError):
    pass


def fake_stages(calls: list[str], kill_at: str | None = None):
    """stage name -> run(cfg) that records the call and writes the step's outputs."""

    def make(stage: str):
        def run(cfg):
            name = pipeline.step_for(stage, cfg).name
            calls.append(name)
            if name == kill_at:
                raise Killed(name)
            for out in pipeline.OUTPUTS[stage](cfg):
                if out.suffix == ".json":
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps({"step": 1, "stage": stage}))
                else:
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "part-00000.jsonl").write_text(f"{name}\n")
            return {"counts": {"in": 3, "out": 2, "rejected": 1}, "stage": stage}

        return run

    return make


def run_all(tmp_path: Path, calls, kill_at=None, force=False, extra=()):
    return pipeline.run_all(
        None, [f"run_dir={tmp_path}", *extra], fake_stages(calls, kill_at), force=force
    )


ORDER = [s.name for s in pipeline.STEPS]


def test_all_runs_every_step_in_order_and_writes_the_manifest(tmp_path):
    calls: list[str] = []
    summary = run_all(tmp_path, calls)
    assert calls == ORDER
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["steps"]) == ORDER
    for name, entry in manifest["steps"].items():
        assert entry["status"] == "complete", name
        assert entry["counts"] == {"in": 3, "out": 2, "rejected": 1}
        assert entry["counts_balance"] is True
        assert entry["code_version"]["version"]
        assert all(o["kind"] != "missing" for o in entry["outputs"]), name
    # the select steps got their temperature class and output folder
    sel = manifest["steps"]["select_high_t"]["config"]["select_stage"]
    assert sel["temperatures"] == "high_t" and sel["output"] == f"{tmp_path}/select_high_t"
    assert manifest["steps"]["score"]["config"]["score"]["input"] == f"{tmp_path}/sample"
    assert [r["status"] for r in summary["steps"]] == ["ran"] * len(ORDER)
    assert (tmp_path / "pipeline.md").read_text().count("| ran |") == len(ORDER)


def test_rerun_after_a_kill_continues_from_the_last_complete_step(tmp_path):
    calls: list[str] = []
    with pytest.raises(Killed):
        run_all(tmp_path, calls, kill_at="2")
    assert calls == ORDER[: ORDER.index("2") + 1]
    entry = json.loads((tmp_path / "manifest.json").read_text())["steps"]["2"]
    assert entry["status"] == "failed" and "Killed" in entry["error"]
    calls.clear()
    summary = run_all(tmp_path, calls)
    assert calls == ORDER[ORDER.index("2") :]
    statuses = {r["step"]: r["status"] for r in summary["steps"]}
    assert all(statuses[s] == "skipped" for s in ORDER[: ORDER.index("2")])
    # and a third run does nothing
    calls.clear()
    run_all(tmp_path, calls)
    assert calls == []


def test_changed_input_is_detected_and_force_redoes_downstream(tmp_path):
    calls: list[str] = []
    run_all(tmp_path, calls)
    # another score output appears under the select step's input
    (tmp_path / "score" / "part-00001.jsonl").write_text("new rows\n")
    calls.clear()
    with pytest.raises(pipeline.PipelineError, match=r"step select .*input .*score: changed"):
        run_all(tmp_path, calls)
    assert calls == []
    run_all(tmp_path, calls, force=True)
    # --force redoes the changed step and every later one; earlier ones stay
    assert calls == ORDER[ORDER.index("select") :]
    old = sorted(p.name for p in tmp_path.glob("select.old-*"))
    assert old, "the old select output was moved aside, not deleted"


def test_changed_config_names_the_key(tmp_path):
    calls: list[str] = []
    run_all(tmp_path, calls)
    with pytest.raises(pipeline.PipelineError, match=r"step 1 .*config: stage1\.lr"):
        run_all(tmp_path, [], extra=["stage1.lr=0.5"])


def test_single_stage_run_detects_changed_inputs(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    (tmp_path / "score").mkdir(parents=True)
    (tmp_path / "score" / "part-00000.jsonl").write_text("a\n")
    calls: list[str] = []
    step = pipeline.step_for("select", cfg)
    assert step.name == "select"
    pipeline.run_step(cfg, step, fake_stages(calls)("select"))
    pipeline.run_step(cfg, step, fake_stages(calls)("select"))  # unchanged: runs again
    (tmp_path / "score" / "part-00000.jsonl").write_text("b\n")
    with pytest.raises(pipeline.PipelineError, match="--force"):
        pipeline.run_step(cfg, step, fake_stages(calls)("select"))
    pipeline.run_step(cfg, step, fake_stages(calls)("select"), force=True)
    assert calls == ["select"] * 3


def test_missing_upstream_names_the_stage_to_run_first(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    for stage, first in (("select", "score"), ("2", "1"), ("3", "2"), ("mixed_policy", "2")):
        with pytest.raises(pipeline.PipelineError, match=rf"--stage={first}` first"):
            pipeline.run_step(cfg, pipeline.step_for(stage, cfg), lambda c: {})
    assert not (tmp_path / "manifest.json").exists() or all(
        e["status"] != "complete"
        for e in json.loads((tmp_path / "manifest.json").read_text())["steps"].values()
    )


def test_user_input_skips_sampling(tmp_path):
    data = tmp_path / "released.jsonl"
    data.write_text('{"uuid": "a", "input": "q", "output": "r"}\n')
    calls: list[str] = []
    summary = run_all(tmp_path, calls, extra=[f"score.input={data}"])
    assert calls == ORDER[1:]
    assert summary["steps"][0] == {"step": "sample", "status": "not used"}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["steps"]["score"]["config"]["score"]["input"] == str(data)
    assert manifest["steps"]["score"]["inputs"][0]["kind"] == "file"


def test_counts_balance():
    assert pipeline.counts_balance({"in": 5, "out": 3, "rejected": 2})
    assert pipeline.counts_balance({"in": 5, "out": 1, "rejected": 2, "other_temperature": 2})
    assert not pipeline.counts_balance({"in": 5, "out": 3, "rejected": 1})
    assert pipeline.counts_balance(None)
    sample = {"prompts_in": 4, "prompts_out": 3, "rejects": 1, "candidates": 24}
    assert pipeline.counts_of("sample", sample) == {
        "in": 4,
        "out": 3,
        "rejected": 1,
        "candidates": 24,
    }


def test_fingerprint_sees_content_not_mtime(tmp_path):
    f = tmp_path / "d" / "x.jsonl"
    f.parent.mkdir()
    f.write_text("abc\n")
    a = pipeline.fingerprint(tmp_path / "d")
    f.write_text("abc\n")  # rewritten, same bytes
    assert pipeline.fingerprint(tmp_path / "d")["sha256"] == a["sha256"]
    f.write_text("abd\n")
    assert pipeline.fingerprint(tmp_path / "d")["sha256"] != a["sha256"]
    (tmp_path / "d" / ".x.jsonl.tmp").write_text("partial")  # our temporaries are ignored
    assert pipeline.fingerprint(tmp_path / "d")["files"] == 1
    assert pipeline.fingerprint(tmp_path / "nope")["kind"] == "missing"
