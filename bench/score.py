"""Token log-prob (scoring) throughput and peak memory: dasd_jax vs HF transformers.

    python bench/score.py                          # tiny shape, CPU smoke run (seconds)
    python bench/score.py --shape=qwen3-4b         # Qwen3-4B shape, bf16, 8x4096 and 2x16384

Both sides get random weights of the same shape in bf16 and compute log p(token_t | <t) for
every position of a [batch, seq] block, the work of DAS scoring. Baseline: HF transformers
(PyTorch, sdpa attention) run in the same process on the same device, doing what a user of
transformers does: `model(ids).logits.float().log_softmax(-1).gather(...)`, which
materialises fp32 logits. Prints tokens/s, peak device memory and the ratio ours/HF per case,
and appends a JSON line to --out if given. Record GPU/TPU results in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = dict(
    vocab_size=151936,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)


def _config(shape: str):
    from dasd_jax.models.qwen3 import Qwen3Config, shape_config

    if shape == "tiny":
        return Qwen3Config(rope_theta=1e6, **TINY)
    return shape_config(shape)


def bench_ours(cfg, cases, steps: int, chunk: int, attention: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dasd_jax.logprobs import sequence_logprobs
    from dasd_jax.models.checkpoint import init_model
    from dasd_jax.models.qwen3 import ModelOptions
    from dasd_jax.sharding import batch_sharding, make_mesh

    dev = jax.devices()[0]
    mesh = make_mesh((1, 1, 1), devices=[dev])
    opts = ModelOptions(dtype="bfloat16", param_dtype="bfloat16", attention=attention)
    model = init_model(cfg, mesh, opts)

    @nnx.jit
    def score(model, tokens):
        return sequence_logprobs(model, tokens, chunk_size=chunk)[0]

    out = []
    for B, T in cases:
        tokens = jax.device_put(
            jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (B, T)), jnp.int32),
            batch_sharding(mesh),
        )
        score(model, tokens).block_until_ready()  # compile
        stats0 = dev.memory_stats() or {}
        t0 = time.perf_counter()
        for _ in range(steps):
            r = score(model, tokens)
        r.block_until_ready()
        dt = (time.perf_counter() - t0) / steps
        stats = dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        if peak is None:  # CPU: no allocator stats; report XLA's compiled temp size instead
            compiled = score.lower(model, tokens).compile() if hasattr(score, "lower") else None
            peak = compiled.memory_analysis().temp_size_in_bytes if compiled else None
        out.append(
            dict(
                impl="dasd_jax",
                batch=B,
                seq=T,
                tokens_per_s=B * T / dt,
                step_s=dt,
                peak_bytes=peak,
                device=str(dev.device_kind),
                baseline_peak_before=stats0.get("peak_bytes_in_use"),
            )
        )
    return out


def bench_hf(cfg, cases, steps: int) -> list[dict]:
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
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    out = []
    for B, T in cases:
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)

        def step(ids=ids):
            with torch.no_grad():
                logits = model(ids).logits.float()
                return torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])

        try:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / steps
            peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
            out.append(
                dict(
                    impl="hf-transformers-sdpa",
                    batch=B,
                    seq=T,
                    tokens_per_s=B * T / dt,
                    step_s=dt,
                    peak_bytes=peak,
                    device=device,
                )
            )
        except torch.OutOfMemoryError:
            out.append(
                dict(
                    impl="hf-transformers-sdpa",
                    batch=B,
                    seq=T,
                    tokens_per_s=None,
                    step_s=None,
                    peak_bytes=None,
                    device=device,
                    error="OOM",
                )
            )
            torch.cuda.empty_cache()
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny", help="tiny | qwen3-4b | qwen3-8b | ...")
    p.add_argument("--cases", default=None, help="BxT list, e.g. 8x4096,2x16384")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--attention", default="auto")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=None, help="append results as JSON lines")
    a = p.parse_args()
    tiny = a.shape == "tiny"
    cases = a.cases or ("2x256,1x512" if tiny else "8x4096,2x16384")
    cases = [tuple(int(x) for x in c.split("x")) for c in cases.split(",")]
    steps = a.steps or (2 if tiny else 5)
    cfg = _config(a.shape)
    ours = bench_ours(cfg, cases, steps, a.chunk, a.attention)
    hf = [] if a.no_baseline else bench_hf(cfg, cases, steps)
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b else "n/a"  # noqa: E731
    print(f"shape={a.shape} device={ours[0]['device']} steps={steps} chunk={a.chunk}")
    print(
        f"{'case':>10} {'dasd_jax tok/s':>15} {'HF tok/s':>12} {'ratio':>7} "
        f"{'dasd_jax peak':>14} {'HF peak':>10}"
    )
    for i, o in enumerate(ours):
        h = hf[i] if hf else {}
        ratio = (o["tokens_per_s"] / h["tokens_per_s"]) if h.get("tokens_per_s") else None
        print(
            f"{o['batch']}x{o['seq']:>6} {o['tokens_per_s']:>15.0f} "
            f"{(h.get('tokens_per_s') or 0):>12.0f} "
            f"{(f'{ratio:.2f}x' if ratio else 'n/a'):>7} {gib(o['peak_bytes']):>14} "
            f"{gib(h.get('peak_bytes')):>10}"
        )
    if a.out:
        with open(a.out, "a") as f:
            for r in ours + hf:
                f.write(
                    json.dumps({**r, "shape": a.shape, "date": time.strftime("%Y-%m-%d")}) + "\n"
                )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
