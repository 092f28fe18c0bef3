"""Training and export under faults: nothing non-finite is saved, exported or resumed from, a
failed or killed save leaves nothing under the final name nor any leftover, a resumed run logs
every step once, and unreadable or missing inputs are named.

Two tiny runs are shared by the module: `diverged` (an update turns a weight into NaN at step
3 while its loss, grad norm and lr are finite) and `old_version` (a NaN checkpoint written as
versions before the step's finite check wrote them)."""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import save_file

from dasd_jax import embedded, export
from dasd_jax.config import ConfigError, load_config
from dasd_jax.models import checkpoint as ck
from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
from dasd_jax.schema import SFTRecord, write_sft_records
from dasd_jax.sharding import make_mesh
from dasd_jax.tokenizer import build_qwen3_tokenizer
from dasd_jax.train import optim
from dasd_jax.train import stage as stage_lib
from dasd_jax.train.checkpoint import Checkpointer, NonFiniteCheckpoint
from dasd_jax.train.config import StageConfig, TrainConfig
from dasd_jax.train.step import make_train_step

FP32 = ModelOptions(dtype="float32", param_dtype="float32", attention="xla")
SMALL = Qwen3Config(
    vocab_size=256,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rope_theta=10000.0,
)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Runs of the same stage compile the same step: share XLA's cache between them."""
    old = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)  # fmt: skip
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
    from jax._src import compilation_cache  # forget the cache object bound to the tmp dir

    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny random Qwen3 with the real vocabulary and tokenizer (hidden 16, one layer)."""
    cfg = Qwen3Config.from_hf_dict(
        dict(
            embedded.TINY_QWEN3,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
        )
    )
    model = ck.init_model(cfg, _one_device(), FP32, seed=3)
    return ck.save_hf(model, tmp_path_factory.mktemp("student") / "hf",
                      tokenizer_dir=build_qwen3_tokenizer())  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    recs = [SFTRecord(f"low_t-{i}", r["input"], r["output"], "low_t")
            for i, r in enumerate(embedded.demo_rows())]  # fmt: skip
    write_sft_records(folder / "low_t.array_record", recs)
    return folder


def _one_device():
    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def _cfg(run_dir, student, records, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"student.path={student}", "student.dtype=float32",
        "student.attention=xla", "mesh.data=1", "train.seq_len=256", "train.global_batch=2",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.data_threads=2",
        "train.async_checkpoints=false", "train.tensorboard=false", "train.export_dtype=float32",
        f"stage1.sources.low_t.path={records}/low_t.array_record", "stage1.max_steps=4",
        "stage1.warmup_frac=0", "stage1.lr=1e-3", "stage1.lr_floor=1e-3", *extra])  # fmt: skip


def _nan_update_from(count: int) -> optax.GradientTransformation:
    """Adds NaN to one parameter's update from the `count`-th update on (0-based): an update
    that overflowed, with the loss, gradient and lr still finite."""

    def init(params):
        return {"n": jnp.zeros((), jnp.int32)}

    def update(updates, state, params=None):
        leaves, tree = jax.tree.flatten(updates)
        leaves[0] = leaves[0] + jnp.where(state["n"] >= count, jnp.nan, 0.0)
        return jax.tree.unflatten(tree, leaves), {"n": state["n"] + 1}

    return optax.GradientTransformation(init, update)


def _poisoned_optimizer(mp, count: int) -> None:
    original = optim.make_optimizer
    mp.setattr(optim, "make_optimizer",
               lambda tcfg, schedule: optax.chain(original(tcfg, schedule),
                                                  _nan_update_from(count)))  # fmt: skip


def _steps(run_dir) -> list[int]:
    text = (run_dir / "stage1" / "metrics.jsonl").read_text()
    return [json.loads(line)["step"] for line in text.splitlines()]


def _checkpoints(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "stage1" / "checkpoints").iterdir())


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# --------------------------------------------------------------------------- the train step


def test_train_step_flags_an_update_that_is_not_finite():
    """`all_finite` covers the state after the update, not only the loss computed before it."""
    mesh = _one_device()
    model = ck.init_model(SMALL, mesh, FP32, seed=1)
    schedule = optim.lr_schedule(StageConfig(lr=1e-3, lr_floor=1e-3, warmup_frac=0.0), 10)
    tx = optax.chain(optim.make_optimizer(TrainConfig(), schedule), _nan_update_from(1))
    model_def, params = nnx.split(model)
    opt_def, opt_state = nnx.split(nnx.Optimizer(model, tx, wrt=nnx.Param))
    step = jax.jit(make_train_step(model_def, opt_def, schedule, 16))
    rng = np.random.default_rng(0)
    ones = np.ones((2, 32))
    host = {"tokens": rng.integers(0, 256, (2, 32)), "loss_mask": ones,
            "positions": np.tile(np.arange(32), (2, 1)), "segment_ids": ones}  # fmt: skip
    batch = stage_lib.device_batch(host, mesh, 1)
    state = {"model": params, "opt": opt_state, "rng": jax.random.PRNGKey(0)}
    state, m1 = step(state, batch)
    state, m2 = step(state, batch)  # the poisoned update
    assert bool(m1["all_finite"])
    assert all(np.isfinite(float(m2[k])) for k in ("loss", "grad_norm", "lr"))
    assert not bool(m2["all_finite"])
    assert not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["model"]))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.lr=1e39", r"stage1: lr=1e\+39: must be a finite number in \(0, 1\]"),
        ("stage1.lr=.nan", r"stage1: lr=nan"),
        ("stage2.lr=.inf", r"stage2: lr=inf"),
        ("stage1.lr=0", r"stage1: lr=0\.0"),
        ("stage3.lr=-1e-5", r"stage3: lr=-1e-05"),
        ("stage1.lr_floor=.nan", r"stage1: lr_floor=nan"),
        ("stage1.epochs=.nan", r"stage1: epochs=nan"),
        ("train.clip_norm=.nan", r"train: clip_norm=nan"),
        ("train.b2=1.5", r"train: b2=1\.5"),
        ("train.eps=0", r"train: eps=0\.0"),
        ("train.weight_decay=.inf", r"train: weight_decay=inf"),
    ],
)
def test_config_refuses_a_nonfinite_or_absurd_learning_rate(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
    assert load_config(None, ["stage1.lr=1.0"]).stage1.lr == 1.0  # the bound itself is allowed


# --------------------------------------------------------------------------- a diverged step


@pytest.fixture(scope="module")
def diverged(tmp_path_factory, student, records):
    """Stage 1 whose 3rd update puts a NaN in the weights (loss, grad norm, lr finite)."""
    run_dir = tmp_path_factory.mktemp("diverged")
    with pytest.MonkeyPatch.context() as mp:
        _poisoned_optimizer(mp, count=2)
        with pytest.raises(stage_lib.NonFiniteLoss) as err:
            stage_lib.run(_cfg(run_dir, student, records), 1)
    return run_dir, str(err.value)


def test_a_nonfinite_update_is_never_saved(diverged, student, records):
    run_dir, message = diverged
    assert "loss is " in message and " at step 3 (grad norm " in message, message
    assert "not finite: the parameters or optimizer moments after the update" in message
    assert "lr 0.001" in message
    assert f"Last good checkpoint: step 2 in {run_dir}/stage1/checkpoints" in message
    # step 3 was not saved, so the good step 1 was not rotated out (keep_checkpoints=2)
    assert _checkpoints(run_dir) == ["1", "2"]
    assert not (run_dir / "stage1" / "final.json").exists()
    assert not (run_dir / "stage1" / "export").exists()
    assert _steps(run_dir) == [1, 2]
    cfg = _cfg(run_dir, student, records)
    init = stage_lib.resolve_init(cfg, 1)
    tx = optax.chain(optim.make_optimizer(cfg.train, lambda _: 1e-3), _nan_update_from(2))
    ts = stage_lib.build_state(cfg, init, make_mesh(cfg.mesh), tx)
    ckpt = Checkpointer(run_dir / "stage1" / "checkpoints", 1, 2)
    for step in (1, 2):  # the checkpoints left are good ones
        state, _ = ckpt.restore(step, ts.abstract)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
    ckpt.close()


def test_resume_cuts_metrics_back_to_the_checkpoint(diverged, student, records):
    """A killed run logged steps past its checkpoint (and tore its last line): the resumed run
    logs each step once."""
    run_dir, _ = diverged
    with (run_dir / "stage1" / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
        f.write('{"step": 4, "lo')  # killed mid-line
    with pytest.MonkeyPatch.context() as mp:
        _poisoned_optimizer(mp, count=10**6)  # the same optimizer state, never poisoned
        summary = stage_lib.run(_cfg(run_dir, student, records), 1)
    assert summary["start_step"] == 2 and summary["step"] == 4
    assert _steps(run_dir) == [1, 2, 3, 4]
    rows = [json.loads(x) for x in (run_dir / "stage1" / "metrics.jsonl").read_text().split("\n")
            if x]  # fmt: skip
    assert rows[2]["loss"] != 9.0 and all(np.isfinite(r["loss"]) for r in rows)
    assert (run_dir / "stage1" / "final.json").exists()


# --------------------------------------------------------------------------- an old NaN checkpoint


@pytest.fixture(scope="module")
def old_version(tmp_path_factory, student, records):
    """Stage 1 as versions before the finite check ran it: step 2's update made the weights
    NaN, its loss (computed before the update) was finite, and the step was saved."""
    run_dir = tmp_path_factory.mktemp("old_version")
    original = stage_lib.make_train_step

    def unchecked(*args, **kw):
        step = original(*args, **kw)

        def wrapped(state, batch):
            new, m = step(state, batch)
            bad = new["opt"]["step"][...] >= 2
            model = jax.tree.map(
                lambda x: jnp.where(bad, jnp.nan, x) if jnp.issubdtype(x.dtype, jnp.floating)
                else x, new["model"])  # fmt: skip
            return dict(new, model=model), dict(m, all_finite=jnp.asarray(True))

        return wrapped

    error = None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stage_lib, "make_train_step", unchecked)
        try:
            stage_lib.run(_cfg(run_dir, student, records, "stage1.max_steps=2"), 1)
        except Exception as e:  # noqa: BLE001 (the test below says which)
            error = e
    return run_dir, error


def test_the_stage_export_refuses_nonfinite_weights(old_version):
    run_dir, error = old_version
    assert isinstance(error, ck.NonFiniteWeights), error
    assert "stage1/export: tensor model.embed_tokens.weight has" in str(error)
    assert "NaN/inf" in str(error) and "refusing to write" in str(error)
    assert not (run_dir / "stage1" / "export").exists()
    assert not list((run_dir / "stage1").glob(".export.tmp-*"))  # its temporary folder too
    assert not (run_dir / "stage1" / "final.json").exists()
    assert _checkpoints(run_dir) == ["1", "2"]


def test_resume_refuses_a_nonfinite_checkpoint(old_version, student, records):
    run_dir, _ = old_version
    cfg = _cfg(run_dir, student, records, "stage1.max_steps=2")
    with pytest.raises(NonFiniteCheckpoint, match=rf"checkpoint step 2 in {run_dir}/stage1/"
                       r"checkpoints holds NaN or inf.*delete .*checkpoints/2 to resume from "
                       r"step 1"):  # fmt: skip
        stage_lib.run(cfg, 1)
    assert not (run_dir / "stage1" / "final.json").exists()


def _export_cfg(run_dir, student, step, out):
    return load_config(None, [f"run_dir={run_dir}", f"student.path={student}",
                              f"export.step={step}", f"export.output={out}",
                              "export.dtype=float32", "student.dtype=float32",
                              "student.attention=xla", "mesh.data=1"])  # fmt: skip


def test_export_refuses_a_nonfinite_checkpoint(old_version, student, tmp_path):
    run_dir, _ = old_version
    cfg = _export_cfg(run_dir, student, 2, tmp_path / "hf")
    with pytest.raises(export.ExportError, match=r"stage 1 step 2 is not exported: checkpoint "
                       r"step 2 in .* holds NaN or inf"):  # fmt: skip
        export.run(cfg)
    assert sorted(os.listdir(tmp_path)) == []  # nothing under the final name, no leftover


def test_export_publishes_only_a_verified_folder_and_sweeps_leftovers(
    old_version, student, tmp_path, monkeypatch
):
    run_dir, _ = old_version
    out = tmp_path / "hf"
    dead, mine = _dead_pid(), os.getpid()
    stale = [tmp_path / f".hf.tmp-{dead}-abcd1234", tmp_path / f".hf.tmp-{mine}-notmine"]
    kept = [tmp_path / f".hf.tmp-{os.getppid()}-live", tmp_path / f".other.tmp-{dead}-x",
            tmp_path / ".hf.tmp-x"]  # fmt: skip
    for p in stale + kept:
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"partial")
    cfg = _export_cfg(run_dir, student, 1, out)

    def mismatch(*args):
        raise export.ExportError("export check: tensor x differs from the checkpoint")

    monkeypatch.setattr(export, "_compare", mismatch)
    with pytest.raises(export.ExportError, match="differs"):
        export.run(cfg)
    assert not out.exists()  # the unverified folder never got its final name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    monkeypatch.undo()

    summary = export.run(cfg)
    assert summary["tensors_checked"] > 0 and (out / export.INFO_FILE).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf"] + [p.name for p in kept])
    model = ck.load_hf(out, _one_device(), FP32)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


# --------------------------------------------------------------------------- save_hf, load_hf


def test_save_hf_refuses_nonfinite_checks_its_files_and_sweeps_leftovers(tmp_path, monkeypatch):
    model = ck.init_model(SMALL, _one_device(), FP32, seed=2)
    out = tmp_path / "out"
    dead = _dead_pid()
    (tmp_path / f".out.tmp-{dead}-killed").mkdir()  # a save killed mid-way
    (tmp_path / f".out.tmp-{dead}-killed" / "model.safetensors").write_bytes(b"x" * 1000)
    assert ck.save_hf(model, out, dtype="float32") == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not a temporary folder's 0700

    emb = model.embed_tokens[...]
    big = tmp_path / "big"
    model.embed_tokens.set_value(emb.at[3, 1].set(1e6))  # finite, beyond float16's range
    with pytest.raises(ck.NonFiniteWeights, match=r"big: tensor model\.embed_tokens\.weight "
                       r"has 1 NaN/inf values .* as float16 \(finite before the cast"):  # fmt: skip
        ck.save_hf(model, big, dtype="float16")
    model.embed_tokens.set_value(emb.at[0, 0].set(jnp.nan))
    with pytest.raises(ck.NonFiniteWeights, match=r"embed_tokens.*it diverged"):
        ck.save_hf(model, out, dtype="float32")  # the old folder stays as it was
    model.embed_tokens.set_value(emb)

    def torn(tensors, filename, metadata=None):  # a full disk: the file ends early
        save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) - 10)

    monkeypatch.setattr(ck, "save_file", torn)
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors.*truncated"):
        ck.save_hf(model, big)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing half-written
    reloaded = ck.load_hf(out, _one_device(), FP32)
    np.testing.assert_array_equal(np.asarray(reloaded.embed_tokens[...]), np.asarray(emb))


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_names_the_file(tmp_path, sharded):
    model = ck.init_model(SMALL, _one_device(), FP32, seed=2)
    out = ck.save_hf(model, tmp_path / "hf", max_shard_bytes=20_000 if sharded else 4 * 2**30)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1 if sharded else len(files) == 1
    victim = files[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match=rf"{victim}: cannot read .*truncated or corrupt"):
        ck.load_hf(out, _one_device(), FP32)


def test_missing_model_folders_say_they_do_not_exist(tmp_path, records):
    missing = tmp_path / "nonexistent"
    with pytest.raises(stage_lib.StageError, match=rf"student\.path={missing} does not exist"):
        stage_lib.run(_cfg(tmp_path, missing, records), 1)
    cfg = _cfg(tmp_path, missing, records, f"stage2.init_from={missing}")
    with pytest.raises(stage_lib.StageError, match=rf"stage2\.init_from={missing}: .*does not"):
        stage_lib.resolve_init(cfg, 2)
    with pytest.raises(FileNotFoundError, match=rf"{missing} does not exist"):
        ck.load_hf(missing, _one_device(), FP32)
