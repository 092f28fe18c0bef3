"""The export stage: a stage checkpoint (any step) -> an HF folder transformers loads, equal to
the checkpoint; re-runs are no-ops; missing checkpoints name the stage to run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dasd_jax import export
from dasd_jax.config import load_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Stage 1 on the embedded tiny student for 3 steps, a checkpoint at every step."""
    from dasd_jax.train import stage as train_stage

    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(
        None,
        [
            f"run_dir={run_dir}",
            "stage1.max_steps=3",
            "train.checkpoint_every=1",
            "train.async_checkpoints=false",
            "train.tensorboard=false",
            "mesh.data=1",
        ],
    )
    summary = train_stage.run(cfg, 1)
    assert summary["step"] == 3
    return cfg


def test_export_an_earlier_step_loads_in_transformers_and_matches(trained, tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from dasd_jax.models.checkpoint import load_hf
    from dasd_jax.sharding import make_mesh
    from dasd_jax.train.checkpoint import abstract_arrays, restore_model, shardings_of

    out = tmp_path / "hf"
    cfg = load_config(
        None,
        [
            f"run_dir={trained.run_dir}",
            "export.stage=1",
            "export.step=2",
            f"export.output={out}",
            "export.dtype=float32",
            "student.dtype=float32",
            "mesh.data=1",
        ],
    )
    summary = export.run(cfg)
    assert (summary["stage"], summary["step"], summary["tensors_checked"]) == (1, 2, 13)
    info = json.loads((out / export.INFO_FILE).read_text())
    assert info["step"] == 2 and set(info["files"]) == {"model.safetensors"}

    # the exported weights are step 2's, not the final step's
    from flax import nnx

    mesh = make_mesh(cfg.mesh)
    ours = load_hf(out, mesh, cfg.student.options())
    model_def, abs_state = nnx.split(nnx.eval_shape(lambda: ours))
    step2 = restore_model(
        trained.run_dir + "/stage1/checkpoints",
        2,
        abstract_arrays(abs_state, shardings_of(abs_state, mesh)),
    )
    step3 = restore_model(
        trained.run_dir + "/stage1/checkpoints",
        3,
        abstract_arrays(abs_state, shardings_of(abs_state, mesh)),
    )
    emb = np.asarray(ours.embed_tokens[...])
    np.testing.assert_array_equal(emb, np.asarray(nnx.merge(model_def, step2).embed_tokens[...]))
    assert not np.array_equal(emb, np.asarray(nnx.merge(model_def, step3).embed_tokens[...]))

    # transformers reads the folder (tokenizer with its chat template too) and agrees
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 17 * 24?"}], tokenize=False
    )
    assert "<|im_start|>user" in text
    ids = tok(text, return_tensors="pt").input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(ids).logits[0].numpy()
    got = np.asarray(ours(np.asarray(ids))[0])[0]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_export_rerun_is_a_noop_and_other_exports_are_refused(trained):
    cfg = load_config(None, [f"run_dir={trained.run_dir}", "mesh.data=1"])
    first = export.run(cfg)  # latest: stage 1, its final step
    assert (first["stage"], first["step"]) == (1, 3)
    again = export.run(cfg)
    assert again["already_done"] and again["files"] == first["files"]
    other = load_config(
        None,
        [
            f"run_dir={trained.run_dir}",
            "mesh.data=1",
            "export.step=1",
            f"export.output={first['output']}",
        ],
    )
    with pytest.raises(export.ExportError, match="already holds another export"):
        export.run(other)


def test_missing_checkpoints_name_the_stage(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path}", "export.stage=2"])
    with pytest.raises(export.ExportError, match=r"--stage=2` first"):
        export.run(cfg)
    cfg = load_config(None, [f"run_dir={tmp_path}"])
    with pytest.raises(export.ExportError, match=r"no checkpoint of any stage.*--stage=1"):
        export.run(cfg)


def test_missing_step_lists_the_steps(trained):
    cfg = load_config(None, [f"run_dir={trained.run_dir}", "export.step=7", "mesh.data=1"])
    with pytest.raises(export.ExportError, match=r"steps \[1, 2, 3\]"):
        export.run(cfg)
