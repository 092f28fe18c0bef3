"""SFT stages end to end on CPU: kill-and-resume is bit-exact, stage chaining with a fresh
optimizer, the export loads in transformers with our logits, NaN stops cleanly, bad input."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dasd_jax import embedded, launch
from dasd_jax.config import load_config
from dasd_jax.models.checkpoint import init_model, load_hf, save_hf
from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
from dasd_jax.schema import SFTRecord, write_sft_records
from dasd_jax.sharding import make_mesh
from dasd_jax.tokenizer import build_qwen3_tokenizer, load_tokenizer, render_chat
from dasd_jax.train import stage as stage_lib
from dasd_jax.train.checkpoint import Checkpointer

STEPS = 6


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
        )  # fmt: skip
    )
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = init_model(cfg, mesh, ModelOptions(dtype="float32"), seed=3)
    return save_hf(model, tmp_path_factory.mktemp("student") / "hf",
                   tokenizer_dir=build_qwen3_tokenizer())  # fmt: skip


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = embedded.demo_rows()
    for name in ("low_t", "high_t"):
        recs = [SFTRecord(f"{name}-{i}", r["input"], r["output"], name)
                for i, r in enumerate(rows)]  # fmt: skip
        write_sft_records(folder / f"{name}.array_record", recs)
    return folder


def _cfg(run_dir, student, records, *extra):
    return load_config(None, [
        f"run_dir={run_dir}", f"student.path={student}", "student.dtype=float32",
        "student.attention=xla", "mesh.data=2", "train.seq_len=256", "train.global_batch=4",
        "train.micro_batch=2", "train.checkpoint_every=2", "train.data_threads=2",
        "train.export_dtype=float32", f"stage1.sources.low_t.path={records}/low_t.array_record",
        f"stage1.max_steps={STEPS}", "stage1.warmup_frac=0.2", "stage1.lr=1e-3",
        f"stage2.sources.high_t.path={records}/high_t.array_record", "stage2.max_steps=2",
        "stage2.warmup_frac=0.5", "stage2.lr=1e-3", *extra])  # fmt: skip


def _metrics(run_dir, stage=1):
    rows = {}
    for line in (run_dir / f"stage{stage}" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            rows[row["step"]] = row  # a step re-done after a crash: the last one counts
    return rows


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, student, records):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    summary = stage_lib.run(_cfg(run_dir, student, records), 1)
    assert summary["step"] == STEPS and not summary["demo"]
    return run_dir


def test_kill_and_resume_is_bit_exact(tmp_path, student, records, stage1_run):
    cfg = _cfg(tmp_path, student, records)

    def sigterm_at_2(step, row):
        if step == 2:
            signal.raise_signal(signal.SIGTERM)

    s = stage_lib.run(cfg, 1, on_step=sigterm_at_2)
    assert s["preempted"] and s["step"] == 3  # saved at the next step boundary
    assert Checkpointer(tmp_path / "stage1" / "checkpoints", 2, 3).latest_step() == 3

    def crash_at_5(step, row):
        if step == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        stage_lib.run(cfg, 1, on_step=crash_at_5)  # resumes at 3, dies after 5 (last ckpt 4)
    s = stage_lib.run(cfg, 1)  # resumes at 4
    assert s["start_step"] == 4 and s["step"] == STEPS

    want, got = _metrics(stage1_run), _metrics(tmp_path)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:  # bit-exact: the very same floats, the same batches
        for key in ("loss", "grad_norm", "lr", "data_hash", "loss_tokens", "tokens"):
            assert got[step][key] == want[step][key], (step, key)
    assert len({r["data_hash"] for r in want.values()}) == STEPS  # batches differ per step
    assert want[STEPS]["loss"] < want[1]["loss"]
    a = load_hf(stage1_run / "stage1" / "export", make_mesh((1, 1, 1), jax.devices()[:1]))
    b = load_hf(tmp_path / "stage1" / "export", make_mesh((1, 1, 1), jax.devices()[:1]))
    for (k, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b)),
                              strict=True):  # fmt: skip
        assert np.array_equal(np.asarray(x), np.asarray(y)), k


def test_stage2_starts_from_stage1_weights_with_fresh_optimizer(stage1_run, student, records):
    cfg = _cfg(stage1_run, student, records)
    init = stage_lib.resolve_init(cfg, 2)
    assert init.kind == "stage" and init.step == STEPS
    mesh = make_mesh(cfg.mesh)
    from dasd_jax.train import optim

    tx = optim.make_optimizer(cfg.train, optim.lr_schedule(cfg.stage2, 2))
    ts = stage_lib.build_state(cfg, init, mesh, tx)
    state = stage_lib.fresh_state(cfg, init, ts, mesh, tx)
    # the weights: stage 1's last step (its fp32 export holds the same numbers)
    exported = nnx.state(load_hf(stage1_run / "stage1" / "export", mesh, cfg.student.options()))
    for (k, x), (_, y) in zip(nnx.to_flat_state(state["model"]),
                              nnx.to_flat_state(exported), strict=True):  # fmt: skip
        assert np.array_equal(np.asarray(x), np.asarray(y)), k
    # the optimizer: fresh (step 0, zero moments), although stage 1's holds 6 steps
    assert int(state["opt"]["step"][...]) == 0
    moments = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt"]["opt_state"])
               if "mu" in jax.tree_util.keystr(p) or "nu" in jax.tree_util.keystr(p)]  # fmt: skip
    assert moments and all(not np.any(np.asarray(m)) for m in moments)
    ck = Checkpointer(stage1_run / "stage1" / "checkpoints", 2, 3)
    old, _ = ck.restore(STEPS, ts.abstract)
    ck.close()
    assert int(old["opt"]["step"][...]) == STEPS

    s = stage_lib.run(cfg, 2)
    assert s["step"] == 2 and (stage1_run / "stage2" / "final.json").exists()
    m1, m2 = _metrics(stage1_run, 1), _metrics(stage1_run, 2)
    assert m2[1]["lr"] == 0.0 and m2[2]["lr"] == pytest.approx(1e-3)  # a new warmup
    assert m1[STEPS]["lr"] != m2[1]["lr"]
    assert m2[1]["tokens/high_t"] > 0 and "tokens/low_t" not in m2[1]


def test_export_loads_in_transformers_with_our_logits(stage1_run, student, records):
    cfg = _cfg(stage1_run, student, records)
    init = stage_lib.resolve_init(cfg, 2)
    mesh = make_mesh(cfg.mesh)
    from dasd_jax.train import optim

    tx = optim.make_optimizer(cfg.train, optim.lr_schedule(cfg.stage1, STEPS))
    ts = stage_lib.build_state(cfg, init, mesh, tx)
    ck = Checkpointer(stage1_run / "stage1" / "checkpoints", 2, 3)
    state, meta = ck.restore(STEPS, ts.abstract)
    ck.close()
    assert meta["step"] == STEPS
    ours = nnx.merge(ts.model_def, state["model"])  # the trained model, from its checkpoint
    tok = load_tokenizer(stage1_run / "stage1" / "export")
    row = embedded.demo_rows()[0]
    ids = tok.encode(render_chat(row["input"], row["output"]).text, add_special_tokens=False)
    logits, _ = ours(jnp.asarray([ids], jnp.int32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(stage1_run / "stage1" / "export")
    with torch.no_grad():
        ref = hf.float().eval()(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref).max() > 1e-3


def test_nonfinite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, student, records,
                                                            monkeypatch):  # fmt: skip
    original = stage_lib.make_train_step

    def poisoned(*args, **kw):
        step = original(*args, **kw)

        def wrapped(state, batch):
            new, m = step(state, batch)
            bad = new["opt"]["step"][...] >= 3  # the loss of step 3 is NaN
            return new, dict(m, loss=jnp.where(bad, jnp.nan, m["loss"]))

        return wrapped

    monkeypatch.setattr(stage_lib, "make_train_step", poisoned)
    cfg = _cfg(tmp_path, student, records)
    with pytest.raises(stage_lib.NonFiniteLoss, match=r"loss is nan at step 3.*Last good "
                       r"checkpoint: step 2"):  # fmt: skip
        stage_lib.run(cfg, 1)
    ckpts = sorted(p.name for p in (tmp_path / "stage1" / "checkpoints").iterdir())
    assert ckpts == ["2"]  # step 4 (due) was never written, step 2 is intact
    assert not (tmp_path / "stage1" / "final.json").exists()
    steps = [json.loads(x)["step"] for x in (tmp_path / "stage1" / "metrics.jsonl").open()]
    assert 3 not in steps


def test_stage2_without_stage1_names_what_to_run(tmp_path, student, records):
    with pytest.raises(stage_lib.StageError, match=r"stage1/final\.json does not exist.*"
                       r"--stage=1"):  # fmt: skip
        stage_lib.run(_cfg(tmp_path, student, records), 2)
    with pytest.raises(stage_lib.StageError, match="not a Hugging Face folder"):
        stage_lib.run(_cfg(tmp_path, student, records, f"stage3.init_from={tmp_path}"), 3)


def test_launch_stage1_embedded_demo(tmp_path, capsys):
    """`python -m dasd_jax.launch --stage=1` with no data: the embedded demo set."""
    assert launch.main(["--stage=1", f"run_dir={tmp_path}", "mesh.data=1",
                        "stage1.max_steps=2", "student.dtype=float32"]) == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["demo"] and summary["step"] == 2
    final = json.loads((tmp_path / "stage1" / "final.json").read_text())
    assert final["embedded"] and (tmp_path / "demo_data" / "stage1.array_record").exists()
    assert (tmp_path / "stage1" / "export" / "config.json").exists()
    assert list((tmp_path / "stage1" / "tensorboard").glob("events.out.tfevents.*"))


def test_full_scale_config_state_fits_sharded(tmp_path):
    """configs/train_qwen3_4b.yaml on the Qwen3-4B shape, checked with eval_shape only: fp32
    weights + fp32 Adam moments (12 bytes per parameter), every large array split over the
    8-way fsdp axis, nothing allocated."""
    from pathlib import Path

    from dasd_jax.models.qwen3 import shape_config
    from dasd_jax.train import optim

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "train_qwen3_4b.yaml", ["mesh.fsdp=8"])
    assert (cfg.train.seq_len, cfg.train.global_batch, cfg.stage1.lr) == (65536, 64, 5e-5)
    assert cfg.stage3.sources["off_policy"].max_records == 20000
    shape = shape_config("qwen3-4b-instruct-2507")
    (tmp_path / "config.json").write_text(json.dumps(shape.to_hf_dict()))
    init = stage_lib.Init("hf", tmp_path, None, tmp_path, False)
    mesh = make_mesh(cfg.mesh)
    tx = optim.make_optimizer(cfg.train, optim.lr_schedule(cfg.stage1, 1000))
    ts = stage_lib.build_state(cfg, init, mesh, tx)
    leaves = jax.tree.leaves(ts.abstract)
    total = sum(x.size * x.dtype.itemsize for x in leaves)
    per_device = sum(
        x.dtype.itemsize * int(np.prod(x.sharding.shard_shape(x.shape))) for x in leaves
    )
    n = shape.num_params
    assert 4.0e9 < n < 4.1e9
    assert abs(total - 12 * n) < 1e6  # params + mu + nu, fp32
    assert per_device < 1.01 * total / 8  # optimizer state sharded like the parameters


def test_embedded_student_gets_cpu_geometry_on_selected_records(tmp_path):
    """Regression: after a real select run, stage 1 of the embedded tiny student must not
    fall back to the paper's 64 x 64K-token batches (which exhausted memory on a CPU)."""
    from pathlib import Path

    from dasd_jax.train.config import TrainConfig

    recs = [SFTRecord(f"r{i}", "q", "<think>a</think>b", source="low_t") for i in range(4)]
    write_sft_records(tmp_path / "select" / "train-00000.array_record", recs)
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    init = stage_lib.Init("hf", Path("unused"), None, Path("unused"), embedded=True)
    sources, tcfg, scfg, demo = stage_lib.resolve_data(cfg, 1, init, batch_ways=1)
    assert not demo and sources  # the selected records, not the demo rows
    assert tcfg.seq_len == stage_lib.DEMO_TRAIN["seq_len"] < TrainConfig().seq_len
    assert tcfg.global_batch == 2 and scfg.max_steps == stage_lib.DEMO_MAX_STEPS
    real = stage_lib.Init("hf", Path("unused"), None, Path("unused"), embedded=False)
    assert stage_lib.resolve_data(cfg, 1, real)[1].seq_len == TrainConfig().seq_len
