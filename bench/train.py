"""SFT train-step throughput, MFU and peak memory: dasd_jax vs HF transformers + PyTorch AdamW.

    python bench/train.py                          # tiny shape, CPU smoke run (a minute)
    python bench/train.py --shape=qwen3-4b         # Qwen3-4B shape: 4x4096 and 1x16384
    python bench/train.py --shape=qwen3-4b --cases=1x32768 --no-baseline   # 32K on one GPU

Both sides train a randomly initialised model of the same shape, full fine-tune, with fp32
master weights and fp32 AdamW state, bf16 compute and per-layer activation checkpointing, on
a [batch, seq] block of random tokens with the loss on every token:
- dasd_jax: `train.step.make_train_step` (chunked log-prob loss, AdamW + clip as in the
  recipe, `remat=full`), jitted with the state donated;
- baseline: transformers `Qwen3ForCausalLM` (sdpa attention) in fp32 under
  `torch.autocast(bfloat16)`, `gradient_checkpointing_enable()`, `torch.optim.AdamW` (fused on
  CUDA), `model(ids, labels=ids).loss`: what an HF Trainer run with bf16=True does.
Each side runs in its own subprocess (JAX and PyTorch would otherwise share the GPU's memory),
one after the other, in the same invocation. Prints tokens/s, MFU (model FLOPs as in
`train.metrics`: 6 x matmul params x tokens + causal attention; rematerialisation not counted;
vendor dense bf16 peak) and peak device memory (CPU: XLA's compiled temp size, HF: n/a), and
appends JSON lines to --out. Record GPU/TPU results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
)


def _config(shape: str):
    from dasd_jax.models.qwen3 import Qwen3Config, shape_config

    if shape == "tiny":
        return Qwen3Config(rope_theta=1e6, **TINY)
    return shape_config(shape)


def _flops(cfg, B: int, T: int) -> float:
    import numpy as np

    from dasd_jax.train.metrics import step_flops

    return step_flops(cfg, B * T, np.full(B, T))


def bench_ours(cfg, B: int, T: int, steps: int, attention: str, chunk: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dasd_jax.models.checkpoint import init_model
    from dasd_jax.models.qwen3 import ModelOptions
    from dasd_jax.sharding import make_mesh
    from dasd_jax.train import optim
    from dasd_jax.train.config import StageConfig, TrainConfig
    from dasd_jax.train.stage import device_batch
    from dasd_jax.train.step import make_train_step

    dev = jax.devices()[0]
    mesh = make_mesh((1, 1, 1), devices=[dev])
    opts = ModelOptions(dtype="bfloat16", param_dtype="float32", attention=attention, remat="full")
    model = init_model(cfg, mesh, opts)
    schedule = optim.lr_schedule(StageConfig(warmup_frac=0.0), 1000)
    tx = optim.make_optimizer(TrainConfig(), schedule)
    model_def, params = nnx.split(model)
    opt_def, opt_state = nnx.split(nnx.Optimizer(model, tx, wrt=nnx.Param))
    del model
    step = jax.jit(make_train_step(model_def, opt_def, schedule, chunk), donate_argnums=0)
    state = {"model": params, "opt": opt_state, "rng": jax.random.PRNGKey(0)}
    rng = np.random.RandomState(0)
    host = {
        "tokens": rng.randint(0, cfg.vocab_size, (B, T)).astype(np.int32),
        "loss_mask": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32),
    }
    batch = device_batch(host, mesh, 1)
    compiled = step.lower(state, batch).compile()
    state, m = step(state, batch)  # warm-up
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    stats = dev.memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    if peak is None:  # CPU: no allocator statistics; XLA's own estimate of the step's memory
        ma = compiled.memory_analysis()
        peak = ma.temp_size_in_bytes + ma.argument_size_in_bytes if ma else None
    assert bool(jnp.isfinite(m["loss"]))
    return dict(
        impl="dasd_jax",
        tokens_per_s=B * T / dt,
        step_s=dt,
        peak_bytes=peak,
        device=str(dev.device_kind),
        loss=float(m["loss"]),
    )


def bench_hf(cfg, B: int, T: int, steps: int) -> dict:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_cfg = transformers.Qwen3Config(
        **{
            k: v
            for k, v in cfg.to_hf_dict().items()
            if k not in ("architectures", "model_type", "dtype")
        }
    )
    hf_cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_cfg).float().train()
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=5e-5,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.1,
        fused=device == "cuda",
    )
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    try:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        dt = (time.perf_counter() - t0) / steps
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        return dict(
            impl="hf-transformers+torch-adamw",
            tokens_per_s=B * T / dt,
            step_s=dt,
            peak_bytes=peak,
            device=name,
        )
    except torch.OutOfMemoryError:
        return dict(
            impl="hf-transformers+torch-adamw", tokens_per_s=None, error="OOM", device=device
        )


def _child(a) -> None:
    cfg = _config(a.shape)
    B, T = (int(x) for x in a.cases.split("x"))
    try:
        r = (
            bench_ours(cfg, B, T, a.steps, a.attention, a.chunk)
            if a.impl == "ours"
            else bench_hf(cfg, B, T, a.steps)
        )
    except Exception as e:  # e.g. XLA out of memory: report it, do not lose the other rows
        r = dict(impl=a.impl, tokens_per_s=None, error=f"{type(e).__name__}: {e}"[:300])
    from dasd_jax.train.metrics import peak_flops

    peak = peak_flops(r.get("device", ""))
    if r.get("tokens_per_s") and peak:
        r["mfu"] = _flops(cfg, B, T) / r["step_s"] / peak
    print("RESULT " + json.dumps({**r, "batch": B, "seq": T}))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny", help="tiny | qwen3-4b | qwen3-8b | ...")
    p.add_argument("--cases", default=None, help="BxT list, e.g. 4x4096,1x16384")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--attention", default="auto")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=None, help="append results as JSON lines")
    p.add_argument("--impl", default=None, help=argparse.SUPPRESS)  # child process
    a = p.parse_args()
    tiny = a.shape == "tiny"
    a.steps = a.steps or (2 if tiny else 5)
    if a.impl:
        return _child(a)
    cases = a.cases or ("2x256,1x512" if tiny else "4x4096,1x16384")
    rows = []
    for case in cases.split(","):
        for impl in ["ours"] + ([] if a.no_baseline else ["hf"]):
            cmd = [
                sys.executable,
                __file__,
                f"--impl={impl}",
                f"--shape={a.shape}",
                f"--cases={case}",
                f"--steps={a.steps}",
                f"--chunk={a.chunk}",
                f"--attention={a.attention}",
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if not lines:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{impl} {case}: no result")
            rows.append(json.loads(lines[-1][7:]))
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"  # noqa: E731
    pct = lambda x: f"{100 * x:.1f}%" if x else "n/a"  # noqa: E731
    print(f"shape={a.shape} steps={a.steps} chunk={a.chunk} device={rows[0].get('device')}")
    print(f"{'case':>9} {'impl':>28} {'tok/s':>10} {'MFU':>7} {'peak mem':>10}")
    for r in rows:
        tps = f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else r.get("error", "?")[:10]
        print(
            f"{r['batch']}x{r['seq']:>6} {r['impl']:>28} {tps:>10} {pct(r.get('mfu')):>7} "
            f"{gib(r.get('peak_bytes')):>10}"
        )
    by_case = {}
    for r in rows:
        by_case.setdefault((r["batch"], r["seq"]), {})[r["impl"]] = r.get("tokens_per_s")
    for (B, T), d in by_case.items():
        ours, hf = d.get("dasd_jax"), d.get("hf-transformers+torch-adamw")
        if ours and hf:
            print(f"{B}x{T}: dasd_jax / HF = {ours / hf:.2f}x")
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(
                    json.dumps({**r, "shape": a.shape, "date": time.strftime("%Y-%m-%d")}) + "\n"
                )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    main()
