"""The stages on gs:// paths (tests/fake_gcs.py: in-memory Cloud Storage through etils.epath,
and the same objects served to array_record's C++ reader): score and select with run_dir on
the bucket equal a local run; an upload cut short leaves no output that looks whole and the
rerun resumes; training data, metrics, checkpoints and the HF export take gs:// paths."""

import json

import fake_gcs
import grain
import jax
import numpy as np
import pytest
from fsspec.implementations.memory import MemoryFile

from dasd_jax import embedded, ingest, score, storage
from dasd_jax.config import load_config
from dasd_jax.schema import SFTRecord
from dasd_jax.select import stage as select_stage
from dasd_jax.sharding import make_mesh
from dasd_jax.tokenizer import load_tokenizer
from dasd_jax.train import data as data_lib
from dasd_jax.train.checkpoint import checkpoint_dir
from dasd_jax.train.metrics import Metrics

N_ROWS = 4


@pytest.fixture(scope="module")
def models():
    return (embedded.tiny_student(),)  # the user cache the CLI demo uses (built once)


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    (tmp_path / "staging").mkdir()
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "cache"))
    return fake_gcs.install(monkeypatch, tmp_path / "staging")


def _put(gcs, key: str, data: bytes) -> str:
    gcs.store[key] = MemoryFile(gcs, key, data)
    return f"gs://{key}"


def _rows_jsonl() -> bytes:
    rows = embedded.demo_candidate_rows()[:N_ROWS]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _cfg(run_dir, models, data, *extra):
    (student,) = models
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            f"student.path={student}",
            f"score.input={data}",
            "score.rows_per_shard=2",
            "score.teacher_scoring=never",  # the student alone: file I/O is under test here
            "select.rule=random",  # needs no teacher scores
            "student.dtype=float32",
            "student.attention=xla",
            "mesh.data=1",
            "select_stage.report=false",
            *extra,
        ],
    )


def _under(gcs, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) :]: v for k, v in gcs.objects().items() if k.startswith(prefix)}


def test_score_and_select_on_a_gs_run_dir_equal_a_local_run(gcs, tmp_path, models, monkeypatch):
    data = _put(gcs, "bkt/in/rows.jsonl", _rows_jsonl())  # the input on the bucket too
    local = tmp_path / "local"
    ref = score.run(_cfg(local, models, data))
    got = score.run(_cfg("gs://bkt/run", models, data))

    objs = _under(gcs, "bkt/run/score/")
    assert sorted(objs) == sorted(p.name for p in (local / "score").iterdir())
    assert len([n for n in objs if n.startswith("part-") and n.endswith(".jsonl")]) == 2
    for name, blob in objs.items():
        if name not in ("summary.json", "metrics.jsonl"):  # these hold timings
            assert blob == (local / "score" / name).read_bytes(), name
    assert got["counts"] == ref["counts"] == {"in": N_ROWS, "out": N_ROWS, "rejected": 0}
    assert json.loads(objs["summary.json"])["rows_out"] == N_ROWS
    assert objs["metrics.jsonl"].count(b"\n") >= 1  # the local mirror, uploaded
    assert not [k for k in gcs.objects() if k.endswith(".tmp")]

    ref_sel = select_stage.run(_cfg(local, models, data, "select_stage.report=true"))
    sel = select_stage.run(_cfg("gs://bkt/run", models, data, "select_stage.report=true"))
    objs = _under(gcs, "bkt/run/select/")
    assert objs["selected.jsonl"] == (local / "select" / "selected.jsonl").read_bytes()
    rejects = objs["rejects.jsonl"].decode().replace("gs://bkt/run/", f"{local}/")
    assert rejects == (local / "select" / "rejects.jsonl").read_text()
    assert sel["counts"] == ref_sel["counts"]
    assert sel["selected"] == ref_sel["selected"] > 0
    assert {"report.md", "plots/filters.png", "summary.json"} <= set(objs)

    # the training set on the bucket: read back by Grain through array_record's own gs://
    # reader (served from the same fake objects), as training reads it
    requests = fake_gcs.serve(gcs, monkeypatch)
    (src,) = data_lib.resolve_sources(_cfg("gs://bkt/run", models, data).stage1, "gs://bkt/run", 1)
    assert src.files == ("gs://bkt/run/select/train-00000.array_record",)
    remote = grain.sources.ArrayRecordDataSource(list(src.files))
    mine = grain.sources.ArrayRecordDataSource([str(local / "select" / "train-00000.array_record")])
    assert len(remote) == len(mine) == sel["selected"]
    assert [SFTRecord.from_bytes(remote[i]) for i in range(len(remote))] == [
        SFTRecord.from_bytes(mine[i]) for i in range(len(mine))
    ]
    assert "bkt/run/select/train-00000.array_record" in requests


def test_interrupted_uploads_leave_no_whole_looking_output_and_resume(gcs, models):
    data = _put(gcs, "bkt/in/rows.jsonl", _rows_jsonl())
    score.run(_cfg("gs://bkt/full", models, data))
    # shard 1's part file (its completion marker) breaks during its upload
    gcs.fail_upload = lambda path: path.startswith("bkt/run/score/.part-000001.jsonl.")
    with pytest.raises(OSError, match="connection reset"):
        score.run(_cfg("gs://bkt/run", models, data))
    names = set(_under(gcs, "bkt/run/score/"))
    assert "part-000000.jsonl" in names and "part-000001.jsonl" not in names
    assert "part-000001.stats.json" in names  # written before the marker: not "done"
    assert "summary.json" not in names
    assert not [k for k in gcs.objects() if k.endswith(".tmp")]  # the partial one deleted
    gcs.fail_upload = None
    summary = score.run(_cfg("gs://bkt/run", models, data))
    assert summary["skipped_shards"] == 1 and summary["counts"]["out"] == N_ROWS
    full, resumed = _under(gcs, "bkt/full/score/"), _under(gcs, "bkt/run/score/")
    for name in full:
        if name.startswith(("part-", "rejects.")):
            assert resumed[name] == full[name], name

    # the select stage's ArrayRecord upload breaks: no training file, no summary
    gcs.fail_upload = lambda path: ".train-00000.array_record." in path
    with pytest.raises(OSError, match="connection reset"):
        select_stage.run(_cfg("gs://bkt/run", models, data))
    names = set(_under(gcs, "bkt/run/select/"))
    assert "train-00000.array_record" not in names and "summary.json" not in names
    assert not [k for k in gcs.objects() if k.endswith(".tmp")]
    gcs.fail_upload = None
    assert select_stage.run(_cfg("gs://bkt/run", models, data))["selected"] > 0
    assert "train-00000.array_record" in _under(gcs, "bkt/run/select/")


def test_save_hf_to_gs_builds_locally_and_uploads_config_json_last(gcs, tmp_path, models):
    from dasd_jax.models.checkpoint import load_hf, save_hf

    student = models[0]
    model = load_hf(student, make_mesh((1, 1, 1), jax.devices()[:1]))
    ref = save_hf(model, tmp_path / "export", dtype="float32", tokenizer_dir=student)
    _put(gcs, "bkt/run/stage1/export/config.json", b"{}")  # a previous export's objects
    _put(gcs, "bkt/run/stage1/export/model-00001-of-00002.safetensors", b"stale")
    gcs.log.clear()
    out = save_hf(model, "gs://bkt/run/stage1/export", dtype="float32", tokenizer_dir=student)
    assert str(out) == "gs://bkt/run/stage1/export"
    objs = _under(gcs, "bkt/run/stage1/export/")
    assert objs == {p.name: p.read_bytes() for p in ref.iterdir()}  # stale shard gone
    deletes = [e[1] for e in gcs.log if e[0] == "delete" and not e[1].endswith(".tmp")]
    assert deletes[0].endswith("/config.json")  # the old folder stops looking complete first
    published = [e[2] for e in gcs.log if e[0] == "copy"]
    assert published[-1] == "bkt/run/stage1/export/config.json"  # the new one, last
    assert len(published) == len(objs)
    assert not (tmp_path / "cache" / "remote" / "gs" / "bkt" / "run" / "stage1" / "export").exists()
    # a later stage reads config + tokenizer from a local copy, without the weights
    local = storage.download_dir("gs://bkt/run/stage1/export", skip=("*.safetensors",))
    assert "config.json" in {p.name for p in tmp_path.joinpath(local).iterdir()}
    assert not list(tmp_path.joinpath(local).glob("*.safetensors"))
    assert load_tokenizer(local).encode("hello") == load_tokenizer(student).encode("hello")


def test_metrics_mirror_is_uploaded_and_continued_on_a_new_machine(gcs, tmp_path, monkeypatch):
    m = Metrics("gs://bkt/run/stage1", "stage1", 4, enabled=True, tensorboard=False)
    for step in (1, 2):
        m.log({"step": step, "loss": 1.0 / step})
    assert "bkt/run/stage1/metrics.jsonl" not in gcs.objects()  # appends stay local
    m.close()
    lines = gcs.objects()["bkt/run/stage1/metrics.jsonl"].decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    monkeypatch.setenv("DASD_JAX_CACHE", str(tmp_path / "other_machine"))
    m = Metrics("gs://bkt/run/stage1", "stage1", 4, enabled=True, tensorboard=False)
    m.log({"step": 3, "loss": 0.3})
    m.close()
    lines = gcs.objects()["bkt/run/stage1/metrics.jsonl"].decode().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_checkpoint_dir_keeps_gs_and_makes_local_absolute(tmp_path, monkeypatch):
    assert str(checkpoint_dir("gs://bkt/run/stage1/checkpoints")) == (
        "gs://bkt/run/stage1/checkpoints"
    )
    monkeypatch.chdir(tmp_path)
    assert str(checkpoint_dir("runs/x/checkpoints")) == str(tmp_path / "runs/x/checkpoints")


def test_storage_helpers_on_gs(gcs, tmp_path):
    assert storage.join("gs://bkt/run", "score", "part-000000.jsonl") == (
        "gs://bkt/run/score/part-000000.jsonl"
    )
    local = tmp_path / "folder"
    (local / "sub").mkdir(parents=True)
    for name in ("b.txt", "config.json", "sub/a.txt"):
        (local / name).write_text(name)
    assert storage.upload_dir(local, "gs://bkt/up", last="b.txt") == [
        "config.json",
        "sub/a.txt",
        "b.txt",
    ]
    assert _under(gcs, "bkt/up/") == {"b.txt": b"b.txt", "config.json": b"config.json",
                                      "sub/a.txt": b"sub/a.txt"}  # fmt: skip
    assert storage.isdir("gs://bkt/up") and not storage.isdir("gs://bkt/up/b.txt")
    assert storage.stat("gs://bkt/up/sub/a.txt")[0] == len("sub/a.txt")
    storage.copy("gs://bkt/up/b.txt", tmp_path / "back.txt")  # remote -> local, atomic
    assert (tmp_path / "back.txt").read_text() == "b.txt"
    storage.unlink("gs://bkt/up/b.txt")
    storage.unlink("gs://bkt/up/b.txt")  # missing_ok
    assert not storage.exists("gs://bkt/up/b.txt")
    mirror = storage.local_dir("gs://bkt/run/score")
    assert mirror == str(tmp_path / "cache" / "remote" / "gs" / "bkt" / "run" / "score")
    assert storage.local_dir(tmp_path / "x") == str(tmp_path / "x")

    # the released log-prob file on the bucket: the SQLite index is local, lookups seek
    rows = [{"sample_uuid": f"u{i}", "token_ids": [i, i + 1], "logprobs": [-0.5, -i]}
            for i in range(3)]  # fmt: skip
    lp = _put(gcs, "bkt/data/lp.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    index = ingest.LogprobIndex(lp, "gs://bkt/run/cache")
    assert str(index.index_path).startswith(str(tmp_path / "cache" / "remote"))
    assert index.get("u2") == ([2, 3], [-0.5, -2.0], 3) and index.get("nope") is None
    index.close()
    np.testing.assert_equal(index.stats["rows"], 3)
