"""`python -m dasd_jax.launch --stage=all` on the embedded default, end to end, as a newcomer
runs it (a subprocess with no config), then a re-run that skips everything.

Checks that every step completed, that counts balance at every step (in = out + rejected),
that each stage's outputs exist and agree with the next stage's inputs (rows selected ->
records trained on, mixed-policy rows -> stage-3 data, checkpoints -> evaluation rows).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

import pytest

from dasd_jax import faults, pipeline

ROOT = Path(__file__).resolve().parents[1]


def _launch(run_dir: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env or {})}
    env.pop("XLA_FLAGS", None)  # as a user runs it: one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "dasd_jax.launch", "--stage=all", f"run_dir={run_dir}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("all")
    # every durable write, by step: where the kill -9 test below aims its kills
    proc = _launch(run_dir, env={faults.TRACE_ENV: str(run_dir.parent / "trace")})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return run_dir, proc


def _records(folder: Path) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for f in sorted(folder.glob("*.array_record")):
        reader = ArrayRecordReader(str(f))
        out += [json.loads(b) for b in reader.read_all()]
        reader.close()
    return out


def test_every_step_completes_and_counts_balance(run):
    run_dir, proc = run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    steps = manifest["steps"]
    assert list(steps) == [s.name for s in pipeline.STEPS]
    for name, entry in steps.items():
        assert entry["status"] == "complete", (name, entry.get("error"))
        assert entry["counts_balance"], (name, entry["counts"])
        assert entry["code_version"]["source_sha256"]
    for name in ("sample", "score", "select", "select_high_t", "mixed_policy", "evaluate"):
        c = steps[name]["counts"]
        assert c and c["in"] > 0, (name, c)
    report = (run_dir / "pipeline.md").read_text()
    assert "| evaluate | ran |" in report and "## Evaluation" in report
    assert "pipeline.md" in proc.stdout or "dasd_jax pipeline" in proc.stdout


def test_outputs_chain_from_stage_to_stage(run):
    run_dir, _ = run
    steps = json.loads((run_dir / "manifest.json").read_text())["steps"]
    # sample -> score: every sampled candidate was scored or rejected with a reason
    sample = json.loads((run_dir / "sample" / "summary.json").read_text())
    score = steps["score"]["counts"]
    assert score["in"] == sample["candidates"]
    # score -> select: the two temperature classes partition the scored candidates
    lo, hi = steps["select"]["counts"], steps["select_high_t"]["counts"]
    assert lo["in"] == hi["in"] == score["out"]
    assert lo["other_temperature"] == hi["out"] + hi["rejected"]
    # select -> SFT records: what stages 1 and 2 read is what select wrote
    low = _records(run_dir / "select")
    high = _records(run_dir / "select_high_t")
    assert len(low) == lo["out"] and len(high) == hi["out"]
    assert all(r["temperature"] < 0.8 for r in low) and all(r["temperature"] >= 0.8 for r in high)
    # mixed policy -> stage 3 data, with provenance
    mixed = _records(run_dir / "mixed_policy")
    assert len(mixed) == steps["mixed_policy"]["counts"]["out"]
    for r in mixed:
        assert r["source"] == "mixed_policy"
        assert 0 < r["student_prefix_chars"] < len(r["response"])
    # each stage finished and exported; stage 2 continued from stage 1, 3 from 2
    for n in (1, 2, 3):
        final = json.loads((run_dir / f"stage{n}" / "final.json").read_text())
        assert final["step"] > 0
        assert (run_dir / f"stage{n}" / "export" / "config.json").exists()
    export = steps["export"]["summary"]
    assert export["stage"] == 3 and Path(export["output"], "dasd_export.json").exists()
    # evaluation covered base and the three stages
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    text = json.dumps(results)
    for name in ("base", "stage1", "stage2", "stage3"):
        assert name in text, name


def test_rerun_skips_every_complete_step(run):
    run_dir, _ = run
    before = json.loads((run_dir / "manifest.json").read_text())
    proc = _launch(run_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = json.loads((run_dir / "manifest.json").read_text())
    assert after["steps"] == before["steps"]  # nothing re-ran, nothing re-recorded
    assert (run_dir / "pipeline.md").read_text().count("| skipped |") == len(pipeline.STEPS)


# What records when, how fast or how the work was split between runs, not what was made:
# progress logs (rows/s over time), the manifest and pipeline.md (times, argv), Orbax's own
# checkpoint metadata (timestamps; the weights are compared through each stage's export) and
# TensorBoard event files (named by time). Everything else is compared byte for byte, except
# that these keys are left out of JSON files: the resumed run's figures differ by design.
_NOT_COMPARED = (
    "manifest.json",
    "pipeline.md",
    "sample/metrics.jsonl",
    "score/metrics.jsonl",
    "mixed_policy/metrics.jsonl",
    "evaluate/metrics.jsonl",
    "stage*/checkpoints/*",
    "stage*/tensorboard/*",
)  # fnmatch patterns: `*` also matches `/`
_RUN_KEYS = {
    "seconds", "tokens_per_s", "rows_per_s", "mfu", "slot_occupancy",
    "resumed_prompts", "resumed_questions", "skipped_shards", "shards_written",
}  # fmt: skip


def _without_run_keys(x):
    if isinstance(x, dict):
        return {k: _without_run_keys(v) for k, v in x.items() if k not in _RUN_KEYS}
    if isinstance(x, list):
        return [_without_run_keys(v) for v in x]
    return x


def _comparable(run_dir: Path) -> dict[str, str]:
    """relative name -> SHA-256 of the file (of its JSON without `_RUN_KEYS`)."""
    out = {}
    for f in sorted(run_dir.rglob("*")):
        rel = f.relative_to(run_dir)
        if (
            not f.is_file()
            or rel.name == ".lock"
            or any(fnmatch(rel.as_posix(), p) for p in _NOT_COMPARED)
        ):
            continue
        data = f.read_bytes()
        if f.suffix == ".json":
            data = json.dumps(_without_run_keys(json.loads(data)), sort_keys=True).encode()
        elif f.suffix == ".jsonl":
            rows = [_without_run_keys(json.loads(line)) for line in data.splitlines() if line]
            data = json.dumps(rows, sort_keys=True).encode()
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def test_kill_9_inside_every_step_then_a_rerun_gives_byte_identical_outputs(run):
    """The reduced kill-and-resume chain: one `--stage=all` per step, each SIGKILLed (no
    cleanup of any kind: no finally, no atexit) at the middle durable write of that step, so
    that each run first resumes and finishes the step the previous run died in; then one run
    to the end. Every output is identical to the uninterrupted run's (`_comparable`).

    The killed runs use the uninterrupted run's own path (moved aside first): outputs record
    absolute paths (e.g. the student a mixed-policy row came from), so only then can binary
    files such as ArrayRecords be compared byte for byte. Last in this module for that reason.
    """
    ref_dir, _ = run
    trace = (ref_dir.parent / "trace").read_text().split("\n")
    writes = Counter(line.split()[0] for line in trace if line)
    saved = ref_dir.with_name(ref_dir.name + "-uninterrupted")
    ref_dir.rename(saved)
    for step in pipeline.STEPS:
        assert writes[step.name] > 0, (step.name, writes)  # every step has a point to die at
        at = (writes[step.name] + 1) // 2
        proc = _launch(ref_dir, env={faults.ENV: f"{at}@{step.name}"})
        assert proc.returncode == -signal.SIGKILL, (step.name, at, proc.stderr[-4000:])
        entry = json.loads((ref_dir / "manifest.json").read_text())["steps"][step.name]
        assert entry["status"] == "running", (step.name, entry)  # it died inside the step
    proc = _launch(ref_dir)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want, got = _comparable(saved), _comparable(ref_dir)
    assert sorted(got) == sorted(want)
    assert [k for k in want if want[k] != got[k]] == []
    assert len(want) > 50  # the data of every stage, not a handful of files
