"""dasd_jax.storage: atomic writes, reads, exists and glob, for local paths and gs:// paths.

gs:// runs through etils.epath's real fsspec backend (the one used with gcsfs on TPU VMs)
over an in-memory stand-in for Cloud Storage (tests/fake_gcs.py): flat objects, an object
appears only when its upload is finalised (when the file is closed, even by an exception, as
fsspec does), rename is a server-side copy then a delete. No network.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import fake_gcs
import pytest
from fsspec.implementations.memory import MemoryFile

from dasd_jax import storage

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- local paths


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def test_local_write_read_round_trip_utf8(tmp_path):
    target = tmp_path / "a" / "b" / "part-000000.jsonl"  # parents are created
    with storage.atomic_write(target) as f:
        f.write('{"x": "héllo ∑"}\n')
    assert target.read_bytes() == '{"x": "héllo ∑"}\n'.encode()
    with storage.open_read(target) as f:
        assert f.read() == '{"x": "héllo ∑"}\n'
    with storage.atomic_write(str(tmp_path / "bin"), "wb") as f:
        f.write(b"\x00\xff")
    with storage.open_read(tmp_path / "bin", "rb") as f:
        assert f.read() == b"\x00\xff"
    assert _leftovers(target.parent) == [] and _leftovers(tmp_path) == []


def test_local_final_name_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.json"
    with storage.atomic_write(target) as f:
        f.write("half")
        assert not target.exists()  # nothing under the final name while writing
        f.write(" and the rest")
    assert target.read_text() == "half and the rest"
    with storage.atomic_write(target) as f:
        f.write("new")
        assert target.read_text() == "half and the rest"  # readers still see the old file
    assert target.read_text() == "new"


def test_local_error_in_writer_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError, match="boom"), storage.atomic_write(target) as f:
        f.write("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_local_killed_writer_leaves_no_file_under_final_name(tmp_path):
    target = tmp_path / "part-000003.jsonl"
    code = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        from dasd_jax import storage
        with storage.atomic_write({str(target)!r}) as f:
            f.write("row\\n" * 1000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert not target.exists()
    assert len(_leftovers(tmp_path)) == 1  # the abandoned temporary sibling, never matched
    assert storage.glob(tmp_path / "part-*.jsonl") == []


def _write_by_name(name, data):  # a writer that wants a file name, like ArrayRecordWriter
    with open(name, "wb") as f:
        f.write(data)


def test_local_atomic_path_publishes_only_on_success(tmp_path):
    target = tmp_path / "sel" / "train-00000.array_record"
    with storage.atomic_path(target) as name:
        assert Path(name).parent == target.parent and name != str(target)
        _write_by_name(name, b"records")
        assert not target.exists()
    assert target.read_bytes() == b"records"
    with pytest.raises(RuntimeError), storage.atomic_path(target) as name:
        _write_by_name(name, b"half")
        raise RuntimeError
    assert target.read_bytes() == b"records" and _leftovers(target.parent) == []


def test_local_exists_makedirs_glob(tmp_path, monkeypatch):
    storage.makedirs(tmp_path / "x" / "y")
    storage.makedirs(tmp_path / "x" / "y")  # idempotent
    assert storage.exists(tmp_path / "x" / "y") and not storage.exists(tmp_path / "nope")
    for i in (2, 0, 1):
        (tmp_path / "x" / f"part-{i:06d}.jsonl").write_text("")
    (tmp_path / "x" / ".part-000009.jsonl.abc.tmp").write_text("")
    want = [str(tmp_path / "x" / f"part-{i:06d}.jsonl") for i in range(3)]
    assert storage.glob(str(tmp_path / "x" / "part-*.jsonl")) == want
    assert storage.glob(tmp_path / "*" / "part-00000[01].jsonl") == want[:2]
    assert storage.glob(tmp_path / "missing" / "*.jsonl") == []
    assert storage.glob(tmp_path / "x" / "part-000001.jsonl") == [want[1]]  # no wildcard
    monkeypatch.chdir(tmp_path / "x")
    assert storage.glob("part-*.jsonl") == [f"part-{i:06d}.jsonl" for i in range(3)]
    with pytest.raises(ValueError, match=r"\*\*"):
        storage.glob(tmp_path / "**" / "*.jsonl")


def test_bad_modes_and_missing_input_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="mode"), storage.atomic_write(tmp_path / "a", "a"):
        pass
    with pytest.raises(ValueError, match="mode"):
        storage.open_read(tmp_path / "a", "w")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        storage.open_read(tmp_path / "missing.jsonl")


def test_is_remote():
    assert storage.is_remote("gs://bucket/x") and not storage.is_remote("/data/x")
    assert not storage.is_remote(Path("relative/x"))
    assert str(storage.as_path("gs://b/run") / "score") == "gs://b/run/score"


# ---------------------------------------------------------------- gs:// paths


@pytest.fixture
def gcs(monkeypatch, tmp_path):
    return fake_gcs.install(monkeypatch, tmp_path)


def test_gcs_write_read_round_trip(gcs, tmp_path):
    with storage.atomic_write("gs://bkt/run/score/part-000000.jsonl") as f:
        f.write('{"x": "héllo ∑"}\n')
    assert gcs.objects() == {"bkt/run/score/part-000000.jsonl": '{"x": "héllo ∑"}\n'.encode()}
    with storage.open_read("gs://bkt/run/score/part-000000.jsonl") as f:
        assert f.read() == '{"x": "héllo ∑"}\n'
    with storage.atomic_write("gs://bkt/run/ckpt.bin", "wb") as f:
        f.write(b"\x00\xff")
    with storage.open_read("gs://bkt/run/ckpt.bin", "rb") as f:
        assert f.read() == b"\x00\xff"
    assert list(tmp_path.iterdir()) == []  # local staging files removed


def test_gcs_final_object_is_made_only_from_a_finished_temporary_object(gcs):
    final = "bkt/run/score/part-000001.jsonl"
    content = "".join(f'{{"row": {i}}}\n' for i in range(1000))
    with storage.atomic_write("gs://" + final) as f:
        f.write(content[:10])
        assert gcs.log == [] and gcs.objects() == {}  # nothing uploaded while writing
        f.write(content[10:])
    finalized = [e for e in gcs.log if e[0] == "finalize"]
    ((_, tmp, uploaded),) = finalized  # exactly one upload, of the whole content
    assert uploaded == content.encode()
    assert tmp.startswith("bkt/run/score/.part-000001.jsonl.") and tmp.endswith(".tmp")
    assert tmp != final
    # The final name is touched once: a server-side copy of the complete temporary object.
    assert [e for e in gcs.log if final in e] == [("copy", tmp, final)]
    assert gcs.log[-1] == ("delete", tmp)
    assert gcs.objects() == {final: content.encode()}


def test_gcs_error_in_writer_uploads_nothing(gcs, tmp_path):
    with storage.atomic_write("gs://bkt/run/out.json") as f:
        f.write("old")
    gcs.log.clear()
    with (
        pytest.raises(RuntimeError, match="boom"),
        storage.atomic_write("gs://bkt/run/out.json") as f,
    ):
        f.write("partial")
        assert storage.open_read("gs://bkt/run/out.json").read() == "old"
        raise RuntimeError("boom")
    assert gcs.log == [] and gcs.objects() == {"bkt/run/out.json": b"old"}
    assert list(tmp_path.iterdir()) == []


def test_gcs_interrupted_upload_never_shows_a_partial_final_object(gcs, tmp_path):
    gcs.fail_upload = lambda path: path.endswith(".tmp")
    with pytest.raises(OSError, match="connection reset"):
        with storage.atomic_write("gs://bkt/run/score/part-000002.jsonl") as f:
            f.write("row\n" * 100)
    # The failed upload was finalised partially (as fsspec does on close), under the
    # temporary name only; it was then deleted, and the final name never existed.
    ((_, tmp, partial),) = [e for e in gcs.log if e[0] == "finalize"]
    assert tmp.endswith(".tmp") and 0 < len(partial) < len("row\n" * 100)
    assert ("delete", tmp) in gcs.log
    assert [e for e in gcs.log if e[0] == "copy"] == []
    assert gcs.objects() == {}
    assert not storage.exists("gs://bkt/run/score/part-000002.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_gcs_atomic_path_uploads_a_finished_file_only(gcs, tmp_path):
    with storage.atomic_path("gs://bkt/run/select/train-00000.array_record") as name:
        assert str(tmp_path) in name  # a local staging file
        _write_by_name(name, b"records")
        assert gcs.objects() == {}
    assert gcs.objects() == {"bkt/run/select/train-00000.array_record": b"records"}
    with pytest.raises(RuntimeError), storage.atomic_path("gs://bkt/run/x.array_record") as name:
        _write_by_name(name, b"half")
        raise RuntimeError
    assert list(gcs.objects()) == ["bkt/run/select/train-00000.array_record"]
    assert list(tmp_path.iterdir()) == []


def test_gcs_exists_glob_makedirs(gcs):
    storage.makedirs("gs://bkt/run/score")  # no-op: FakeGCS.makedirs would raise
    assert gcs.objects() == {}
    for i in (1, 0):
        with storage.atomic_write(f"gs://bkt/run/score/part-{i:06d}.jsonl") as f:
            f.write("x\n")
    gcs.store["bkt/run/score/.part-000002.jsonl.dead.tmp"] = MemoryFile(gcs, "k", b"half")
    assert storage.exists("gs://bkt/run/score/part-000001.jsonl")
    assert not storage.exists("gs://bkt/run/score/part-000002.jsonl")
    assert storage.glob("gs://bkt/run/score/part-*.jsonl") == [
        "gs://bkt/run/score/part-000000.jsonl",
        "gs://bkt/run/score/part-000001.jsonl",
    ]
    assert storage.glob("gs://bkt/run/*/part-000001.jsonl") == [
        "gs://bkt/run/score/part-000001.jsonl"
    ]
    assert storage.glob("gs://bkt/other/*.jsonl") == []
    with pytest.raises(FileNotFoundError, match="gs://bkt/run/score/missing.jsonl"):
        storage.open_read("gs://bkt/run/score/missing.jsonl")
