"""HF safetensors <-> NNX: bit-exact round trip, sharded folders, clear errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from dasd_jax.models import checkpoint as ck
from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.sharding import make_mesh

FP32 = ModelOptions(dtype="float32", param_dtype="float32", attention="xla")


def _all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact_and_transformers_loads_it(hf_qwen3, tmp_path, dtype):
    src, hf = hf_qwen3(dtype=dtype, tie_word_embeddings=(dtype == "bfloat16"))
    mesh = make_mesh((1, 2, 4))  # sharded load and a gathered save
    model = ck.load_hf(src, mesh, FP32)
    out = ck.save_hf(model, tmp_path / "out", dtype=dtype)
    a, b = _all_tensors(src), _all_tensors(out)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].tobytes() == b[name].tobytes(), name
    # transformers loads our folder into exactly the model it loads from the source folder
    # (the in-memory `hf` is not the reference: its RoPE buffer was cast by `.to(bf16)`)
    load = transformers.AutoModelForCausalLM.from_pretrained
    reloaded, original = load(out).eval(), load(src).eval()
    tokens = torch.tensor(np.random.RandomState(0).randint(0, 256, (1, 9)))
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded(tokens).logits.float().numpy(), original(tokens).logits.float().numpy()
        )
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert not list(tmp_path.glob(".out.tmp-*")), "temporary folder left behind"


def test_sharded_folder_with_index_loads(hf_qwen3, tmp_path):
    src, hf = hf_qwen3()
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    mesh = make_mesh((2, 2, 2))
    model = ck.load_hf(sharded, mesh, FP32)
    tokens = np.random.RandomState(1).randint(0, 256, (2, 7))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))[0]), ref, atol=1e-4)
    # and our own sharded writer round-trips
    out = ck.save_hf(model, tmp_path / "ours", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").exists()
    a, b = _all_tensors(sharded), _all_tensors(out)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_loaded_arrays_are_placed_on_the_mesh(hf_qwen3):
    src, _ = hf_qwen3()
    mesh = make_mesh((1, 2, 4))
    model = ck.load_hf(src, mesh, FP32)
    gate = model.layers.gate_proj[...]
    assert gate.sharding.mesh.shape == mesh.shape
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    shard = gate.addressable_shards[0].data
    assert shard.shape == (gate.shape[0], gate.shape[1] // 2, gate.shape[2] // 4)


def _rewrite(folder, fn):
    f = folder / "model.safetensors"
    tensors = load_file(str(f))
    fn(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return f


def test_missing_tensor_is_named(hf_qwen3):
    src, _ = hf_qwen3()
    _rewrite(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ck.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        ck.load_hf(src, make_mesh((1, 1, 1), devices=jax.devices()[:1]), FP32)


def test_wrong_shape_names_tensor_and_file(hf_qwen3):
    src, _ = hf_qwen3()
    name = "model.layers.0.self_attn.k_proj.weight"
    f = _rewrite(src, lambda t: t.__setitem__(name, np.zeros((8, 64), np.float32)))
    with pytest.raises(ck.CheckpointError, match=rf"{f.name}.*{name}.*\(8, 64\)"):
        ck.load_hf(src, make_mesh((1, 1, 1), devices=jax.devices()[:1]), FP32)


def test_unexpected_tensor_is_named(hf_qwen3):
    src, _ = hf_qwen3()
    _rewrite(src, lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, "f4")))
    with pytest.raises(ck.CheckpointError, match=r"unexpected tensor model\.layers\.9"):
        ck.load_hf(src, make_mesh((1, 1, 1), devices=jax.devices()[:1]), FP32)


def test_unknown_model_type_and_missing_folder(hf_qwen3, tmp_path):
    src, _ = hf_qwen3()
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ck.CheckpointError, match=r"config\.json.*'llama'"):
        ck.read_config(src)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ck.read_config(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        ck.read_config(tmp_path / "empty")
