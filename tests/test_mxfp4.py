"""MXFP4: decode by hand from the format's definition, against transformers' dequantiser, and a
real-layout MXFP4 gpt-oss folder loaded like transformers loads it."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_tiny import hf_logits, make_gpt_oss, to_mxfp4_folder
from safetensors.numpy import load_file

from dasd_jax.models import checkpoint as ck
from dasd_jax.models import mxfp4
from dasd_jax.models.moe import MoeOptions
from dasd_jax.sharding import MeshConfig, make_mesh

FP32 = MoeOptions(dtype="float32", param_dtype="float32", attention="xla")


def test_e2m1_code_points():
    # sign | exponent (2 bits, bias 1) | mantissa (1 bit); exponent 0 is subnormal
    by_hand = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    np.testing.assert_array_equal(mxfp4.FP4_E2M1_VALUES[:8], by_hand)
    np.testing.assert_array_equal(mxfp4.FP4_E2M1_VALUES[8:], [-v for v in by_hand])
    from transformers.integrations.mxfp4 import FP4_VALUES

    np.testing.assert_array_equal(mxfp4.FP4_E2M1_VALUES, FP4_VALUES)


def test_decode_one_block_by_hand():
    blocks = np.zeros((1, 16), np.uint8)
    # byte 0: low nibble 0b0011 = +1.5 (element 0), high nibble 0b1111 = -6 (element 1)
    blocks[0, 0] = 0xF3
    # byte 1: low 0b1001 = -0.5 (element 2), high 0b0101 = +3 (element 3)
    blocks[0, 1] = 0x59
    # byte 15: low 0b0110 = +4 (element 30), high 0b1000 = -0 (element 31)
    blocks[0, 15] = 0x86
    scale = np.array([127 + 3], np.uint8)  # E8M0: 2^(130 - 127) = 8
    out = mxfp4.dequantize(blocks, scale)  # [G=1, 16] -> [32]
    expected = np.zeros(32, np.float32)
    expected[[0, 1, 2, 3, 30]] = [1.5 * 8, -6 * 8, -0.5 * 8, 3 * 8, 4 * 8]
    np.testing.assert_array_equal(out, expected)
    assert np.signbit(out[31])  # -0 stays negative zero
    tiny = mxfp4.dequantize(blocks, np.array([127 - 10], np.uint8))  # 2^-10
    assert tiny[0] == 1.5 * 2.0**-10
    assert np.isnan(mxfp4.dequantize(blocks, np.array([255], np.uint8))).all()  # NaN scale


def test_decode_equals_transformers_dequantiser():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, (3, 10, 4, 16)).astype(np.uint8)  # [E, R, G, 16]
    scales = rng.randint(100, 150, (3, 10, 4)).astype(np.uint8)
    for torch_dt, np_dt in ((torch.float32, np.float32), (torch.bfloat16, ml_dtypes.bfloat16)):
        ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch_dt)
        got = mxfp4.hf_layout_dequantize(blocks, scales, np_dt)
        assert got.shape == tuple(ref.shape) == mxfp4.hf_layout_shape(blocks.shape) == (3, 128, 10)
        np.testing.assert_array_equal(got.astype(np.float32), ref.float().numpy())
    on_device = mxfp4.dequantize_jnp(jnp.asarray(blocks), jnp.asarray(scales), jnp.float32)
    np.testing.assert_array_equal(np.asarray(on_device), mxfp4.dequantize(blocks, scales))


def test_quantize_round_trips_representable_values():
    rng = np.random.RandomState(1)
    codes = rng.randint(0, 16, (5, 64))
    codes[:, ::32] = 7  # each block's max is 6, so its shared exponent is recovered exactly
    x = mxfp4.FP4_E2M1_VALUES[codes] * np.ldexp(1.0, rng.randint(-8, 8, (5, 1)))
    blocks, scales = mxfp4.quantize(x)
    np.testing.assert_array_equal(mxfp4.dequantize(blocks, scales), x)
    # arbitrary values: within half a step of the block's grid (step <= 2 * 2^e at the top)
    y = rng.randn(4, 96).astype(np.float32)
    back = mxfp4.dequantize(*mxfp4.quantize(y))
    amax = np.abs(y.reshape(4, 3, 32)).max(-1, keepdims=True)
    assert (np.abs(back - y).reshape(4, 3, 32) <= amax / 4 + 1e-7).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4.quantize(np.zeros(40))


def test_mxfp4_checkpoint_loads_like_transformers(tmp_path):
    """A gpt-oss folder in the real checkpoints' layout (experts as *_blocks/*_scales plus a
    quantization_config): our loader and transformers' (dequantising on CPU) give the same
    weights and logits; saving writes a plain folder that transformers loads."""
    make_gpt_oss(tmp_path / "plain")
    decoded = to_mxfp4_folder(tmp_path / "plain", tmp_path / "mxfp4")
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in load_file(
        str(tmp_path / "mxfp4" / "model.safetensors")
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "mxfp4",
        quantization_config=transformers.Mxfp4Config(dequantize=True),
        dtype=torch.float32,
    ).eval()
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    model = ck.load_hf(tmp_path / "mxfp4", mesh, FP32)
    w = decoded["model.layers.2.mlp.experts.down_proj"]  # HF [E, F, D]
    np.testing.assert_array_equal(np.asarray(model.layers.down_proj[...][2]), w)
    np.testing.assert_array_equal(hf.model.layers[2].mlp.experts.down_proj.detach().numpy(), w)
    tokens = np.random.RandomState(2).randint(0, 256, (2, 11))
    ref = hf_logits(hf, tokens)
    got = np.asarray(jax.jit(lambda m, t: m(t)[0])(model, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    # bf16 parameters decode exactly too (every MXFP4 value is a bf16 value)
    bf16 = ck.load_hf(tmp_path / "mxfp4", mesh, MoeOptions(param_dtype="bfloat16"))
    np.testing.assert_array_equal(np.asarray(bf16.layers.down_proj[...][2]).astype(np.float32), w)
    out = ck.save_hf(model, tmp_path / "saved", dtype="float32")
    assert "quantization_config" not in (out / "config.json").read_text()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), ref, atol=1e-6, rtol=0)


def test_experts_held_as_mxfp4_on_device(tmp_path):
    """expert_weights="mxfp4": the packed bytes go to the devices as stored (uint8, split over
    `expert`), are decoded per layer inside the scan, and give the decoded model's logits;
    saving writes them back bit-exactly, with the quantization_config, and transformers loads
    the result."""
    make_gpt_oss(tmp_path / "plain")
    to_mxfp4_folder(tmp_path / "plain", tmp_path / "mxfp4")
    mesh = make_mesh(MeshConfig(data=2, expert=4))
    decoded = ck.load_hf(tmp_path / "mxfp4", mesh, FP32)
    packed_opts = MoeOptions(dtype="float32", param_dtype="float32", expert_weights="mxfp4")
    packed = ck.load_hf(tmp_path / "mxfp4", mesh, packed_opts)
    blocks = packed.layers.gate_up_proj_blocks[...]
    assert blocks.dtype == np.uint8 and not hasattr(packed.layers, "gate_up_proj")
    assert blocks.sharding.spec[1] == "expert" and blocks.addressable_shards[0].data.shape[1] == 1
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 256, (4, 9)))
    fwd = jax.jit(lambda m, t: m(t)[0])
    np.testing.assert_allclose(
        np.asarray(fwd(packed, tokens)), np.asarray(fwd(decoded, tokens)), atol=1e-5, rtol=0
    )
    out = ck.save_hf(packed, tmp_path / "saved", dtype="float32")
    a = load_file(str(tmp_path / "mxfp4" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert '"quant_method": "mxfp4"' in (out / "config.json").read_text()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        out, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32
    ).eval()
    np.testing.assert_allclose(
        hf_logits(hf, np.asarray(tokens)), np.asarray(fwd(decoded, tokens)), atol=1e-4, rtol=0
    )
    with pytest.raises(ck.CheckpointError, match="gate_up_proj_blocks is missing"):
        ck.load_hf(tmp_path / "plain", mesh, packed_opts)
