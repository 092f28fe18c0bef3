"""Teacher scoring throughput (tokens/s) for a gpt-oss-shaped model: dense-dispatch vs grouped MoE.

    python bench/teacher_score.py                        # tiny gpt-oss shape, CPU smoke (secs)
    python bench/teacher_score.py --shape=gpt-oss-20b    # full 20b shape, bf16, for a GPU

Random weights (nothing to download). Each case scores a [batch, seq] block of random tokens
with `logprobs.sequence_logprobs`, i.e. log p(token_t | <t) at every position, the work of
recomputing teacher log-probs for DAS. The two MoE paths (moe.py) are timed on the same
model: "dense" runs every expert on every token (the reference; E/k times the expert FLOPs),
"grouped" sorts (token, expert) pairs and runs `jax.lax.ragged_dot`. Prints tokens/s per path
and the ratio grouped/dense, and appends JSON lines to --out if given. With more than one
device the model is laid out on a (data, expert) mesh (--expert sets the expert axis), so the
grouped path runs expert-parallel. `--expert-weights=mxfp4` keeps the experts packed as in the
released checkpoints (gpt-oss-120b: ~65 GB in all, so it fits one 80 GB GPU).

The 20b shape in bf16 is 42 GB of weights: one 80 GB GPU holds it with room for activations at
the default 1 x 4096 (the dense path's [tokens, experts, 2F] activation is the limit: 1.5 GB per
layer at 4096 tokens). Record GPU results in bench/RESULTS.md with the device and jax version.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    num_local_experts=32,  # gpt-oss-20b's E and k, at a small width
    num_experts_per_tok=4,
    sliding_window=128,
)


def _config(shape: str):
    from dasd_jax.models.gpt_oss import GptOssConfig, shape_config

    if shape == "tiny":
        return GptOssConfig(**TINY)
    return shape_config(shape)


def _mesh(expert: int):
    import jax

    from dasd_jax.sharding import MeshConfig, make_mesh

    n = len(jax.devices())
    if n == 1:
        return make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return make_mesh(MeshConfig(data=-1, expert=expert))


def run(
    shape: str, cases, steps: int, chunk: int, dtype: str, expert: int, impls, weights: str
) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dasd_jax.logprobs import sequence_logprobs
    from dasd_jax.models import registry
    from dasd_jax.models.moe import MoeOptions
    from dasd_jax.sharding import batch_sharding

    cfg = _config(shape)
    mesh = _mesh(expert)
    opts = lambda moe: MoeOptions(  # noqa: E731
        dtype=dtype, param_dtype=dtype, attention="auto", moe=moe, expert_weights=weights
    )
    base = opts("grouped")
    t0 = time.perf_counter()
    model = registry.init(cfg, mesh, base)
    jax.block_until_ready(nnx.state(model))
    print(
        f"init {cfg.num_params / 1e9:.3f}B params ({cfg.num_active_params / 1e9:.3f}B active) "
        f"on {dict(mesh.shape)} in {time.perf_counter() - t0:.1f}s"
    )

    @nnx.jit
    def score(model, tokens):
        return sequence_logprobs(model, tokens, chunk_size=chunk)[0]

    results = []
    for B, T in cases:
        rng = np.random.RandomState(0)
        tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (B, T)), jnp.int32)
        tokens = jax.device_put(tokens, batch_sharding(mesh))
        row = {"shape": shape, "batch": B, "seq": T, "dtype": dtype, "expert_weights": weights}
        row["mesh"] = dict(mesh.shape)
        outs = {}
        for impl in impls:
            model.opts = opts(impl)
            t0 = time.perf_counter()
            out = jax.block_until_ready(score(model, tokens))  # compile + first run
            compile_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(steps):
                out = score(model, tokens)
            jax.block_until_ready(out)
            dt = (time.perf_counter() - t0) / steps
            outs[impl] = np.asarray(out, np.float32)
            row[f"{impl}_tok_s"] = B * T / dt
            row[f"{impl}_compile_s"] = compile_s
            print(f"  {impl:8s} {B}x{T}: {B * T / dt:12,.0f} tok/s  (compile {compile_s:.1f}s)")
        if len(outs) == 2:
            row["grouped_over_dense"] = row["grouped_tok_s"] / row["dense_tok_s"]
            row["max_abs_logp_diff"] = float(np.abs(outs["grouped"] - outs["dense"]).max())
            print(
                f"  grouped/dense = {row['grouped_over_dense']:.2f}x  "
                f"(max |logp diff| {row['max_abs_logp_diff']:.2e})"
            )
        results.append(row)
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="tiny", choices=["tiny", "gpt-oss-20b", "gpt-oss-120b"])
    p.add_argument("--cases", default=None, help="BxT,BxT,... (default by shape)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--chunk", type=int, default=1024, help="log-prob vocab chunk (positions)")
    p.add_argument("--dtype", default=None, help="compute and weight dtype")
    p.add_argument("--expert", type=int, default=1, help="expert mesh axis (multi-device)")
    p.add_argument("--moe", default="dense,grouped")
    p.add_argument(
        "--expert-weights",
        default="dense",
        choices=["dense", "mxfp4"],
        help="mxfp4: experts held packed and decoded per layer (gpt-oss-120b on one GPU)",
    )
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args(argv)
    tiny = a.shape == "tiny"
    cases = a.cases or ("2x256,1x1024" if tiny else "1x4096,4x4096")
    cases = [tuple(int(v) for v in c.split("x")) for c in cases.split(",")]
    steps = a.steps or (2 if tiny else 5)
    dtype = a.dtype or ("float32" if tiny else "bfloat16")
    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}")
    rows = run(a.shape, cases, steps, a.chunk, dtype, a.expert, a.moe.split(","), a.expert_weights)
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": jax.devices()[0].device_kind}) + "\n")


if __name__ == "__main__":
    main()
