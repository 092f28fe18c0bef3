"""MXFP4 (OCP Microscaling FP4) weights: decode, encode, and gpt-oss's checkpoint layout.

Consumes packed MXFP4 tensors as real gpt-oss checkpoints store their experts: `*_blocks`
(uint8 [..., G, 16], two FP4 codes per byte) and `*_scales` (uint8 [..., G], one shared
exponent per block of 32 values). Produces dense arrays (numpy on the host for loading, jax on
device for weights held quantised), and the inverse encoding for tests and writers.

The format (OCP Microscaling Formats spec v1.0):
- an element is FP4 E2M1: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa. Exponent 0
  is subnormal (0 or 0.5); otherwise 2^(e-1) * (1 + m/2). So the 16 codes are
  +-{0, 0.5, 1, 1.5, 2, 3, 4, 6};
- a block of 32 elements shares one E8M0 scale byte s: the block's values are
  element * 2^(s - 127); s = 255 is NaN;
- packing: byte j of a block holds element 2j in its low nibble and 2j+1 in its high nibble.

gpt-oss layout: `gate_up_proj_blocks` is [E, 2F, D/32, 16] and `down_proj_blocks` [E, D, F/32, 16],
i.e. the packed (last) axis is the matmul's input dim. Decoding gives [E, out, in]; transformers
then swaps the last two axes to its in-memory layout [E, in, out] (`hf_layout_*` below).

Every FP4 value times a power of two in E8M0's range is exact in bfloat16 and float32, so
decoding straight into the parameter dtype loses nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BLOCK = 32  # elements per shared scale
BYTES_PER_BLOCK = BLOCK // 2
SCALE_BIAS = 127
SCALE_NAN = 255


def _e2m1_values() -> np.ndarray:
    """The 16 E2M1 code points, computed from the bit layout (not typed in)."""
    out = np.empty(16, np.float32)
    for code in range(16):
        sign = -1.0 if code & 0b1000 else 1.0
        exp = (code >> 1) & 0b11
        man = code & 0b1
        mag = 0.5 * man if exp == 0 else 2.0 ** (exp - 1) * (1.0 + 0.5 * man)
        out[code] = sign * mag
    return out


FP4_E2M1_VALUES = _e2m1_values()


def decoded_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of `dequantize(blocks, scales)`: [..., G, 16] -> [..., G * 32]."""
    *prefix, g, b = blocks_shape
    if b != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks must end in {BYTES_PER_BLOCK} bytes, got {blocks_shape}")
    return (*prefix, g * BLOCK)


def _check(blocks_shape, scales_shape) -> None:
    decoded_shape(blocks_shape)
    if tuple(blocks_shape[:-1]) != tuple(scales_shape):
        raise ValueError(
            f"MXFP4 scales {tuple(scales_shape)} do not match blocks {tuple(blocks_shape)}"
        )


def dequantize(
    blocks: np.ndarray, scales: np.ndarray, dtype=np.float32, chunk_rows: int = 1 << 20
) -> np.ndarray:
    """Host decode: uint8 blocks [..., G, 16] and scales [..., G] -> values [..., G * 32].

    Works through the rows in chunks of `chunk_rows` blocks so the temporaries stay small next
    to the output (a gpt-oss-120b layer's gate_up is 66M blocks).
    """
    blocks = np.asarray(blocks)
    scales = np.asarray(scales)
    _check(blocks.shape, scales.shape)
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise TypeError(f"MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    out_shape = decoded_shape(blocks.shape)
    rows = int(np.prod(blocks.shape[:-1]))
    blk = blocks.reshape(rows, BYTES_PER_BLOCK)
    exp = scales.reshape(rows).astype(np.int32)
    out = np.empty((rows, BLOCK), dtype)
    for r0 in range(0, rows, chunk_rows):
        r1 = min(rows, r0 + chunk_rows)
        b = blk[r0:r1]
        vals = np.empty((r1 - r0, BYTES_PER_BLOCK, 2), np.float32)
        vals[..., 0] = FP4_E2M1_VALUES[b & 0x0F]
        vals[..., 1] = FP4_E2M1_VALUES[b >> 4]
        e = exp[r0:r1]
        scale = np.ldexp(np.float32(1.0), np.minimum(e, SCALE_NAN - 1) - SCALE_BIAS)
        scale = np.where(e == SCALE_NAN, np.float32(np.nan), scale)
        out[r0:r1] = (vals.reshape(r1 - r0, BLOCK) * scale[:, None]).astype(dtype)
    return out.reshape(out_shape)


def dequantize_jnp(blocks: jax.Array, scales: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Device decode, same contract as `dequantize` (for weights held quantised)."""
    _check(blocks.shape, scales.shape)
    lut = jnp.asarray(FP4_E2M1_VALUES)
    lo = lut[(blocks & 0x0F).astype(jnp.int32)]
    hi = lut[(blocks >> 4).astype(jnp.int32)]
    vals = jnp.stack([lo, hi], axis=-1).reshape(*blocks.shape[:-1], BLOCK)
    e = scales.astype(jnp.int32)
    pow2 = jnp.ldexp(jnp.float32(1.0), jnp.minimum(e, SCALE_NAN - 1) - SCALE_BIAS)
    scale = jnp.where(e == SCALE_NAN, jnp.nan, pow2)
    vals = vals * scale[..., None]
    return vals.reshape(*blocks.shape[:-2], -1).astype(dtype)


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode [..., C] (C a multiple of 32) as (blocks [..., C/32, 16], scales [..., C/32]).

    The OCP recipe: shared exponent floor(log2(amax)) - 2 (2 = E2M1's largest exponent, so
    the block's largest magnitude lands in [4, 8) and is clamped to 6), then round each element
    to the nearest code, ties to the even code. An all-zero block gets exponent 2^-127.
    """
    x = np.asarray(x, np.float32)
    if x.shape[-1] % BLOCK:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of {BLOCK}")
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        shared = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -127)
    s = np.clip(shared + SCALE_BIAS, 0, SCALE_NAN - 1).astype(np.uint8)
    q = xb / np.ldexp(np.float32(1.0), s.astype(np.int32) - SCALE_BIAS)[..., None]
    mags = FP4_E2M1_VALUES[:8]  # codes 0..7, increasing
    dist = np.abs(np.abs(q)[..., None] - mags)
    best = dist.min(axis=-1, keepdims=True)
    tie = dist == best
    even = tie & (np.arange(8) % 2 == 0)
    code = np.where(even.any(-1), even.argmax(-1), tie.argmax(-1)).astype(np.uint8)
    code = np.where((q < 0) & (code != 0), code | 0b1000, code).astype(np.uint8)
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    # contiguous: safetensors' numpy writer ignores strides
    return np.ascontiguousarray(packed, np.uint8), np.ascontiguousarray(s)


def hf_layout_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of transformers' dequantised parameter: blocks [..., R, G, 16] -> [..., G*32, R]."""
    *prefix, r, g, _ = blocks_shape
    decoded_shape(blocks_shape)  # validates the block size
    return (*prefix, g * BLOCK, r)


def hf_layout_dequantize(blocks: np.ndarray, scales: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Decode as transformers' `convert_moe_packed_tensors`: [..., R, G, 16] -> [..., G*32, R]."""
    return np.ascontiguousarray(np.swapaxes(dequantize(blocks, scales, dtype), -1, -2))


def hf_layout_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `hf_layout_dequantize` (up to rounding): [..., C, R] -> (blocks, scales)."""
    return quantize(np.swapaxes(np.asarray(w, np.float32), -1, -2))
