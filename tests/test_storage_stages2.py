"""The remaining stages on gs:// paths (tests/fake_gcs.py: in-memory Cloud Storage through
etils.epath): sample with run_dir on the bucket equals a local run and resumes (journals in the
local mirror; a new machine redoes the unfinished shard); the pipeline's manifest, fingerprints,
`run_step`, `--force` and `--stage=all` on a gs:// run_dir; export to gs:// equals a local
export; the evaluate and mixed-policy stages' file I/O on the bucket."""

import dataclasses
import hashlib
import json
import os

import fake_gcs
import pytest
from fsspec.implementations.memory import MemoryFile

from dasd_jax import embedded, export, pipeline, storage
from dasd_jax.config import load_config
from dasd_jax.records import write_json, write_jsonl
from dasd_jax.sample import shards
from dasd_jax.sample import stage as sample_stage


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # built before `gcs` points DASD_JAX_CACHE at the test's folder
    teacher = embedded.tiny_random_teacher(tmp_path_factory.mktemp("cache"))  # flat logits
    return embedded.tiny_student(), teacher


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    (tmp_path / "staging").mkdir()
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "cache"))
    return fake_gcs.install(monkeypatch, tmp_path / "staging")


def _put(gcs, key: str, data: bytes) -> str:
    gcs.store[key] = MemoryFile(gcs, key, data)
    return f"gs://{key}"


def _under(gcs, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) :]: v for k, v in gcs.objects().items() if k.startswith(prefix)}


def _local_files(folder) -> dict[str, bytes]:
    return {n: open(os.path.join(folder, n), "rb").read() for n in storage.walk_files(folder)}


# --------------------------------------------------------------------------- sample


def _sample_cfg(run_dir, teacher, data):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"teacher.path={teacher}",
            f"sample.input={data}",
            "teacher.dtype=float32",
            "teacher.attention=xla",
            "mesh.data=1",
            "sample.n=2",
            "sample.slots=4",
            "sample.max_tokens=4",
            "sample.max_prefill_length=64",
            "sample.prompts_per_shard=2",
            "sample.decode_steps=4",
            'sample.stop=["\\n"]',
            "sample.on_bad_row=skip",
            "bad_rows.max_bad_fraction=1",
        ],
    )


def _shard_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """Part, stats and rejects files (summary.json and metrics.jsonl hold timings)."""
    return {k: v for k, v in files.items() if "/" in k and not k.endswith(".journal")}


def test_sample_on_a_gs_run_dir_equals_a_local_run_and_resumes(gcs, tmp_path, models, monkeypatch):
    _, teacher = models
    rows = [dict(r, answer=f"a{i}") for i, r in enumerate(embedded.demo_rows()[:3])]
    rows.insert(1, {"uuid": "bad", "input": ""})  # a reject, so rejects files are not empty
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "prompts.jsonl").write_text(text)
    data = _put(gcs, "bkt/in/prompts.jsonl", text.encode())  # the prompts on the bucket too

    ref = sample_stage.run(_sample_cfg(tmp_path / "local", teacher, tmp_path / "prompts.jsonl"))
    local = _local_files(tmp_path / "local" / "sample")
    got = sample_stage.run(_sample_cfg("gs://bkt/run", teacher, data))
    objs = _under(gcs, "bkt/run/sample/")
    assert set(objs) == set(local)  # t0.6/ and t1/: 2 shards x (part, stats, rejects) each
    assert len(_shard_files(local)) == 12
    assert _shard_files(objs) == _shard_files(local)  # the same candidates, byte for byte
    for k in ("candidates", "prompts_in", "rejects", "candidates_per_temperature", "counts"):
        assert got[k] == ref[k]
    # random tokens may spell text not in NFC: such samples are refused, counted
    assert got["samples"] == 2 * 3 * 2 and got["rejects"] == 2
    assert json.loads(objs["summary.json"])["candidates"] == got["candidates"]
    assert objs["metrics.jsonl"].count(b"\n") >= 1  # the local mirror, uploaded
    assert not [k for k in gcs.objects() if k.endswith(".tmp") or k.endswith(".journal")]

    # killed after 3 journaled prompts: the journal is in this machine's mirror, finished
    # shards are on the bucket, complete
    real_append = shards._append_journal
    calls = [0]

    class Killed(BaseException):
        pass

    def append_then_die(*args, **kwargs):
        real_append(*args, **kwargs)
        calls[0] += 1
        if calls[0] == 3:
            raise Killed

    monkeypatch.setattr(shards, "_append_journal", append_then_die)
    with pytest.raises(Killed):
        sample_stage.run(_sample_cfg("gs://bkt/b", teacher, data))
    monkeypatch.setattr(shards, "_append_journal", real_append)
    mirror = tmp_path / "cache" / "remote" / "gs" / "bkt" / "b" / "sample"
    journals = {str(p.relative_to(mirror)): len(p.read_text().splitlines())
                for p in mirror.rglob("*.journal")}  # fmt: skip
    partial = _under(gcs, "bkt/b/sample/")
    parts = [k for k in partial if k.split("/")[1].startswith("part-") and k.endswith(".jsonl")]
    assert journals and sum(journals.values()) + len(parts) >= 3 > len(parts)
    assert all(partial[k] == local[k] for k in partial)  # finished shards are whole
    assert "summary.json" not in partial
    assert not [k for k in gcs.objects() if k.endswith(".tmp") or k.endswith(".journal")]

    # on the same machine the journals are reused; the result equals the uninterrupted run
    resumed = sample_stage.run(_sample_cfg("gs://bkt/b", teacher, data))
    assert resumed["skipped_shards"] == len(parts) and resumed["candidates"] == got["candidates"]
    objs = _shard_files(_under(gcs, "bkt/b/sample/"))
    stats = {k: json.loads(objs.pop(k)) for k in list(objs) if k.endswith(".stats.json")}
    assert objs == {k: v for k, v in _shard_files(local).items() if not k.endswith(".stats.json")}
    assert sum(s.pop("resumed_prompts") for s in stats.values()) == sum(journals.values())
    for k, s in stats.items():  # equal but for resumed_prompts
        want = json.loads(local[k])
        want.pop("resumed_prompts")
        assert s == want, k
    assert not list(mirror.rglob("*.journal"))

    # a new machine (another cache) sees no journal: the unfinished shard is redone, equal
    monkeypatch.setattr(shards, "_append_journal", append_then_die)
    calls[0] = 0
    with pytest.raises(Killed):
        sample_stage.run(_sample_cfg("gs://bkt/c", teacher, data))
    monkeypatch.setattr(shards, "_append_journal", real_append)
    old_mirror = tmp_path / "cache" / "remote" / "gs" / "bkt" / "c" / "sample"
    assert list(old_mirror.rglob("*.journal"))
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "machine2"))
    again = sample_stage.run(_sample_cfg("gs://bkt/c", teacher, data))
    assert again["skipped_shards"] == len(parts) and again["candidates"] == got["candidates"]
    # redone from scratch (resumed_prompts 0 everywhere): byte-equal to the local run
    assert _shard_files(_under(gcs, "bkt/c/sample/")) == _shard_files(local)
    assert list(old_mirror.rglob("*.journal"))  # the first machine's journal, never seen


# --------------------------------------------------------------------------- pipeline


def test_fingerprint_of_a_gs_folder_equals_the_local_one(gcs, tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(b"x" * 10)
    big = bytes(range(256)) * (9 << 10)  # 2.25 MiB: only the first and last MiB are hashed
    (folder / "sub" / "big.bin").write_bytes(big)
    (folder / "sub.b").write_text("sorted after sub/ by parts, before it as a string")
    (folder / ".a.jsonl.x.tmp").write_text("ignored")
    storage.upload_dir(folder, "gs://bkt/d")
    local, remote = pipeline.fingerprint(folder), pipeline.fingerprint("gs://bkt/d")
    assert remote["path"] == "gs://bkt/d" and remote["kind"] == "dir"
    assert (remote["files"], remote["bytes"]) == (3, 10 + len(big) + 49)
    assert {k: remote[k] for k in ("files", "bytes", "sha256")} == {
        k: local[k] for k in ("files", "bytes", "sha256")
    }
    one = pipeline.fingerprint("gs://bkt/d/sub/big.bin")
    assert (
        one["kind"] == "file"
        and one["sha256"] == pipeline.fingerprint(folder / "sub/big.bin")["sha256"]
    )
    # a change in the middle of a big file is not seen (by design); at an end it is
    mid = big[: len(big) // 2] + b"!" + big[len(big) // 2 + 1 :]
    _put(gcs, "bkt/d/sub/big.bin", mid)
    assert pipeline.fingerprint("gs://bkt/d")["sha256"] == local["sha256"]
    _put(gcs, "bkt/d/sub/big.bin", big[:-1] + b"!")
    assert pipeline.fingerprint("gs://bkt/d")["sha256"] != local["sha256"]
    assert pipeline.fingerprint("gs://bkt/nope") == {"path": "gs://bkt/nope", "kind": "missing"}


def _gs_stage(calls: list[str]):
    """A stand-in stage: records the call and writes the step's outputs through storage."""

    def make(stage: str):
        def run(cfg):
            name = pipeline.step_for(stage, cfg).name
            calls.append(name)
            for out in pipeline.OUTPUTS[stage](cfg):
                assert os.fspath(out).startswith("gs://bkt/run/"), out
                if out.suffix == ".json":
                    write_json(out, {"step": 1, "stage": stage})
                else:
                    with storage.atomic_write(out / "part-00000.jsonl") as f:
                        f.write(f"{name}\n")
            return {"counts": {"in": 3, "out": 2, "rejected": 1}}

        return run

    return make


def test_manifest_and_run_step_on_a_gs_run_dir(gcs):
    calls: list[str] = []
    score = _put(gcs, "bkt/run/score/part-000000.jsonl", b'{"a": 1}\n')
    cfg = load_config(None, ["run_dir=gs://bkt/run"])
    step = pipeline.step_for("select", cfg)
    with pytest.raises(pipeline.PipelineError, match=r"stage1/final.json.*--stage=1"):
        pipeline.run_step(cfg, pipeline.step_for("2", cfg), _gs_stage(calls)("2"))
    pipeline.run_step(cfg, step, _gs_stage(calls)("select"))
    manifest = json.loads(gcs.objects()["bkt/run/manifest.json"])
    entry = manifest["steps"]["select"]
    assert manifest["run_dir"] == "gs://bkt/run" and entry["status"] == "complete"
    (inp,) = entry["inputs"]
    assert (inp["path"], inp["kind"], inp["files"]) == ("gs://bkt/run/score", "dir", 1)
    assert entry["outputs"][0]["path"] == "gs://bkt/run/select"
    assert entry["outputs"][0]["files"] == 1

    pipeline.run_step(cfg, step, _gs_stage(calls)("select"))  # unchanged: runs again
    assert calls == ["select", "select"]
    _put(gcs, score.removeprefix("gs://"), b'{"a": 2}\n')
    with pytest.raises(pipeline.PipelineError, match=r"input gs://bkt/run/score: changed"):
        pipeline.run_step(cfg, step, _gs_stage(calls)("select"))
    pipeline.run_step(cfg, step, _gs_stage(calls)("select"), force=True)
    moved = [k for k in gcs.objects() if k.startswith("bkt/run/select.old-")]
    assert len(moved) == 1 and moved[0].endswith("/part-00000.jsonl")  # moved aside whole
    assert "bkt/run/select/part-00000.jsonl" in gcs.objects()  # then written again
    assert calls == ["select"] * 3
    assert not [k for k in gcs.objects() if k.endswith(".tmp")]


def test_stage_all_on_a_gs_run_dir_writes_the_report_and_skips_on_rerun(gcs):
    calls: list[str] = []
    summary = pipeline.run_all(None, ["run_dir=gs://bkt/run"], _gs_stage(calls))
    assert calls == [s.name for s in pipeline.STEPS]
    assert summary["manifest"] == "gs://bkt/run/manifest.json"
    assert summary["report"] == "gs://bkt/run/pipeline.md"
    report = gcs.objects()["bkt/run/pipeline.md"].decode()
    assert report.count("| ran |") == len(calls) and "- gs://bkt/run/manifest.json" in report
    steps = json.loads(gcs.objects()["bkt/run/manifest.json"])["steps"]
    assert {s["status"] for s in steps.values()} == {"complete"}
    pipeline.run_all(None, ["run_dir=gs://bkt/run"], _gs_stage(calls))
    assert len(calls) == len(pipeline.STEPS)  # every step skipped
    report = gcs.objects()["bkt/run/pipeline.md"].decode()
    assert report.count("| skipped |") == len(calls)


# --------------------------------------------------------------------------- export


def _stage1_checkpoint(cfg, student) -> None:
    """A stage-1 checkpoint in the train stage's layout (its `model` item), of the student's
    own weights: what the export stage reads, without a training run."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from dasd_jax.models.checkpoint import load_hf
    from dasd_jax.sharding import make_mesh
    from dasd_jax.train.checkpoint import checkpoint_dir
    from dasd_jax.train.stage import stage_dir

    model = load_hf(student, make_mesh(cfg.mesh), cfg.student.options())
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    folder = checkpoint_dir(stage_dir(cfg, 1) / "checkpoints")
    with ocp.CheckpointManager(folder, options=options) as manager:
        manager.save(1, args=ocp.args.Composite(model=ocp.args.StandardSave(nnx.split(model)[1])))


def test_export_to_gs_equals_a_local_export(gcs, tmp_path, models):
    student, _ = models
    base = [
        f"run_dir={tmp_path / 'run'}",
        f"student.path={student}",
        "student.dtype=float32",
        "export.stage=1",
        "export.dtype=float32",
        "mesh.data=1",
    ]
    _stage1_checkpoint(load_config(None, base), student)
    ref = export.run(load_config(None, [*base, f"export.output={tmp_path / 'hf'}"]))
    gcs.log.clear()
    got = export.run(load_config(None, [*base, "export.output=gs://bkt/exports/s1"]))
    assert got["output"] == "gs://bkt/exports/s1" and got["tensors_checked"] == 13
    assert got["step"] == ref["step"] == 1 and got["files"] == ref["files"]  # tensor hashes
    objs = _under(gcs, "bkt/exports/s1/")
    local = _local_files(tmp_path / "hf")
    assert set(objs) == set(local) and len(objs) >= 4
    for name in local:
        if name != export.INFO_FILE:  # holds timings and the output path
            assert objs[name] == local[name], name
    published = [e[2] for e in gcs.log if e[0] == "copy"]
    assert published[-1] == f"bkt/exports/s1/{export.INFO_FILE}"  # written last
    assert published.index("bkt/exports/s1/config.json") == len(published) - 2
    # the read-back copy was downloaded to a temporary folder and removed
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("export-check")]
    again = export.run(load_config(None, [*base, "export.output=gs://bkt/exports/s1"]))
    assert again["already_done"] and again["output"] == "gs://bkt/exports/s1"
    assert not [k for k in gcs.objects() if k.endswith(".tmp")]


# --------------------------------------------------------------------------- evaluate, mixed


def test_evaluate_reads_gs_checkpoints_and_benchmarks_and_writes_pairs(gcs, models):
    from dasd_jax.evaluate import stage as ev_stage

    student, _ = models
    storage.upload_dir(student, "gs://bkt/run/stage2/export", last="config.json")
    final = {"step": 7, "export": "gs://bkt/run/stage2/export", "embedded": False}
    _put(gcs, "bkt/run/stage2/final.json", json.dumps(final).encode())
    bench_rows = embedded.demo_benchmark()[:3]
    bench = _put(
        gcs, "bkt/b/math.jsonl", "".join(json.dumps(r) + "\n" for r in bench_rows).encode()
    )
    cfg = load_config(
        None,
        [
            "run_dir=gs://bkt/run",
            'evaluate.checkpoints=["stage2", "mine=gs://bkt/run/stage2/export"]',
            f'evaluate.benchmarks=["{bench}"]',
            "evaluate.problems_per_shard=2",
            "evaluate.k=2",
            "evaluate.pass_k=[1]",
        ],
    )
    cks = ev_stage.resolve_checkpoints(cfg)
    assert [(c.name, str(c.path), c.step) for c in cks] == [
        ("stage2", "gs://bkt/run/stage2/export", 7),
        ("mine", "gs://bkt/run/stage2/export", None),
    ]
    (b,) = ev_stage.resolve_benchmarks(cfg)
    assert (b.name, len(b.problems)) == ("math", 3)
    assert b.sha256 == hashlib.sha256(gcs.objects()["bkt/b/math.jsonl"]).hexdigest()
    settings = ev_stage.pair_settings(cfg, cks[0], b)
    assert settings["checkpoint"] == "gs://bkt/run/stage2/export"  # not folded into the cwd

    # a pair's parts on the bucket -> samples.jsonl, then summary.json; the parts go
    pair = storage.as_path("gs://bkt/run/evaluate/stage2/math")
    rows = [
        {"id": p.id, "line": p.line, "answer": p.answer, "k": 2, "n_correct": n,
         "correct": [True] * n + [False] * (2 - n), "finish_reasons": ["stop", "length"],
         "lengths": [3, 8], "response_chars": [5, 20]}
        for p, n in zip(b.problems, (2, 1, 0), strict=True)
    ]  # fmt: skip
    write_json(pair / "settings.json", settings)
    write_jsonl(pair / "part-000000.jsonl", rows[:2])
    assert ev_stage._pair_done(pair, settings) is None
    with pytest.raises(RuntimeError, match=r"parts \['part-000001.jsonl'\] are missing"):
        ev_stage.finalize_pair(cfg, cks[0], b, pair, settings, 1.0)
    write_jsonl(pair / "part-000001.jsonl", rows[2:])
    s = ev_stage.finalize_pair(cfg, cks[0], b, pair, settings, 1.0)
    assert s["avg@k"] == pytest.approx(0.5) and s["pass@k"]["1"] == pytest.approx(0.5)
    assert sorted(_under(gcs, "bkt/run/evaluate/stage2/math/")) == ["samples.jsonl", "summary.json"]
    assert ev_stage._pair_done(pair, settings)["avg@k"] == s["avg@k"]
    other = dict(settings, k=4)
    with pytest.raises(RuntimeError, match="differing: k"):
        ev_stage._pair_done(pair, other)
    # the checkpoint is loaded from a local copy of the bucket's folder
    local = storage.download_dir(cks[0].path)
    assert _local_files(local) == _local_files(student)


def test_mixed_policy_shards_and_student_on_gs(gcs, tmp_path, models):
    from dasd_jax.mixed_policy import shards as mp_shards
    from dasd_jax.mixed_policy import stage as mp_stage
    from dasd_jax.schema import SFTRecord, read_sft_records

    student, _ = models
    storage.upload_dir(student, "gs://bkt/run/stage2/export", last="config.json")
    final = {"step": 3, "export": "gs://bkt/run/stage2/export", "embedded": False}
    _put(gcs, "bkt/run/stage2/final.json", json.dumps(final).encode())
    cfg = load_config(None, ["run_dir=gs://bkt/run"])
    path, embedded_student = mp_stage.resolve_student(cfg)
    assert (str(path), embedded_student) == ("gs://bkt/run/stage2/export", False)

    out = "gs://bkt/run/mixed_policy"
    local = storage.local_dir(out)
    questions = [{"q": 0, "id": "a"}, {"q": 1, "id": "b"}]
    sh = mp_shards.Shard(0, out, questions, local=local)
    rec = SFTRecord("mixed_policy/a", "P?", "<think>\nx\n</think>\n\ny", source="mixed_policy")
    sh.append({"q": 0, "phase": "student", "L": 4, "k": 2})
    sh.append(
        {"q": 0, "phase": "final", "record": dataclasses.asdict(rec), "sample": {"question": "a"}}
    )
    assert os.path.exists(os.path.join(local, "shards", "shard-00000.journal"))
    assert not _under(gcs, "bkt/run/mixed_policy/")  # nothing published before the end
    sh.append(mp_shards.reject(questions[1], "not_capped", cap=4))
    objs = _under(gcs, "bkt/run/mixed_policy/")
    assert sorted(objs) == [
        "shards/done-00000.json",
        "shards/rejects-00000.jsonl",
        "shards/samples-00000.jsonl",
        "train-00000.array_record",
    ]
    assert json.loads(objs["shards/done-00000.json"])["kept"] == 1
    published = [e[2] for e in gcs.log if e[0] == "copy"]
    assert published[-1] == "bkt/run/mixed_policy/shards/done-00000.json"  # the marker, last
    assert not os.path.exists(os.path.join(local, "shards", "shard-00000.journal"))
    storage.copy(f"{out}/train-00000.array_record", tmp_path / "train.array_record")
    assert list(read_sft_records(tmp_path / "train.array_record")) == [rec]
