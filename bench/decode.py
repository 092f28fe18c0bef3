"""Decode throughput (generated tokens/s): the sampling engine vs HF `generate` vs the HBM
roofline.

    python bench/decode.py                       # tiny shape, CPU smoke run (a minute)
    python bench/decode.py --shape=qwen3-4b      # Qwen3-4B shape, bf16, batch 64 and 256

Both sides get random weights of the same shape in bf16, a 512-token prompt per sequence (the
same prompt in every slot: prefill is not what is measured) and sample (T=1, top-p 1) a fixed
number of tokens with no early stop. Ours: `Engine.generate_steps` (one jitted call of
`--steps-per-call` decode steps for all slots), timed after a warm-up call; tokens/s = batch x
steps / seconds. Baseline, in the same process on the same device: transformers
`generate(do_sample=True, cache_implementation="static")`, decode rate = batch x (new - 1) /
(time of `new` tokens - time of 1 token), i.e. with its prefill subtracted.

Roofline: a decode step must read every weight once (bf16) and each slot's KV cache up to its
position; tokens/s <= batch / ((weight bytes + KV bytes at the mean position) / HBM bandwidth).
`--hbm-gbps` defaults to the device's datasheet figure (H100 SXM 3350, H200 4800 GB/s); on a
CPU no roofline is printed. Results go to stdout and, with --out, as JSON lines; record them in
bench/RESULTS.md.
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
HBM_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def _config(shape: str):
    from dasd_jax.models.qwen3 import Qwen3Config, shape_config

    if shape == "tiny":
        return Qwen3Config(rope_theta=1e6, **TINY)
    return shape_config(shape)


def roofline(cfg, batch: int, prompt: int, new: int, gbps: float | None) -> float | None:
    """Upper bound on generated tokens/s from HBM bandwidth (weights + KV read per step)."""
    if not gbps:
        return None
    kv_per_token = cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2 * 2
    mean_pos = prompt + new / 2
    step_bytes = cfg.num_params * 2 + batch * mean_pos * kv_per_token
    return batch / (step_bytes / (gbps * 1e9))


def bench_ours(cfg, batch: int, prompt: int, new: int, per_call: int) -> dict:
    import jax
    import numpy as np

    from dasd_jax.models.checkpoint import init_model
    from dasd_jax.models.qwen3 import ModelOptions
    from dasd_jax.sample.engine import Engine, EngineConfig
    from dasd_jax.sample.sampling import SamplingParams
    from dasd_jax.sharding import make_mesh

    dev = jax.devices()[0]
    mesh = make_mesh((1, 1, 1), devices=[dev])
    model = init_model(
        cfg, mesh, ModelOptions(dtype="bfloat16", param_dtype="bfloat16", attention="auto")
    )
    calls = max(1, new // per_call)
    p = 1 << max(4, (prompt - 1).bit_length())
    eng = Engine(
        model,
        EngineConfig(
            max_concurrent_decodes=batch,
            max_prefill_length=p,
            max_decode_length=(calls + 1) * per_call,
            decode_steps=per_call,
        ),
    )
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, prompt)
    prefix = eng.prefill(padded_tokens=tokens, true_length=prompt)
    ds = eng.init_decode_state()
    for slot in range(batch):
        sp = SamplingParams(temperature=1.0, seed=slot, max_tokens=(calls + 1) * per_call)
        ds = eng.insert(prefix.with_sampling(sp), ds, slot)
    ds, r = eng.generate_steps(None, ds)  # compile + warm-up
    jax.block_until_ready(r)
    t0 = time.perf_counter()
    for _ in range(calls):
        ds, r = eng.generate_steps(None, ds)
    jax.block_until_ready(r)
    dt = time.perf_counter() - t0
    assert bool(np.asarray(r.valid).all()), "a slot stopped early"
    return dict(
        impl="dasd_jax",
        batch=batch,
        prompt=prompt,
        new=calls * per_call,
        tokens_per_s=batch * calls * per_call / dt,
        step_ms=1e3 * dt / (calls * per_call),
        device=str(dev.device_kind),
    )


def bench_hf(cfg, batch: int, prompt: int, new: int) -> dict:
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
    with torch.device(device):
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)

    def run(n: int) -> float:
        kw = dict(
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            cache_implementation="static",
            pad_token_id=0,
        )
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    try:
        run(2)  # warm-up
        t1, tn = run(1), run(new)
    except torch.OutOfMemoryError:
        return dict(
            impl="hf-generate-static",
            batch=batch,
            prompt=prompt,
            new=new,
            tokens_per_s=None,
            error="OOM",
            device=device,
        )
    return dict(
        impl="hf-generate-static",
        batch=batch,
        prompt=prompt,
        new=new,
        tokens_per_s=batch * (new - 1) / max(tn - t1, 1e-9),
        device=device,
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny", help="tiny | qwen3-4b | qwen3-8b | ...")
    p.add_argument("--batches", default=None, help="e.g. 64,256")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (512)")
    p.add_argument("--new", type=int, default=None, help="generated tokens timed")
    p.add_argument("--steps-per-call", type=int, default=16)
    p.add_argument("--hbm-gbps", type=float, default=None)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", default=None, help="append results as JSON lines")
    a = p.parse_args()
    tiny = a.shape == "tiny"
    batches = [int(b) for b in (a.batches or ("4,16" if tiny else "64,256")).split(",")]
    prompt = a.prompt or (32 if tiny else 512)
    new = a.new or (32 if tiny else 256)
    per_call = min(a.steps_per_call, new)
    cfg = _config(a.shape)
    rows = []
    for b in batches:
        ours = bench_ours(cfg, b, prompt, new, per_call)
        kind = ours["device"]
        gbps = a.hbm_gbps or next((v for k, v in HBM_GBPS.items() if k in kind), None)
        ours["roofline_tokens_per_s"] = roofline(cfg, b, prompt, ours["new"], gbps)
        hf = None if a.no_baseline else bench_hf(cfg, b, prompt, new)
        rows += [ours] + ([hf] if hf else [])
        roof = ours["roofline_tokens_per_s"]
        hf_tps = hf and hf.get("tokens_per_s")
        print(
            f"batch {b:>4} prompt {prompt} new {ours['new']}: dasd_jax "
            f"{ours['tokens_per_s']:,.0f} tok/s ({ours['step_ms']:.1f} ms/step)"
            + (
                f", HF generate {hf_tps:,.0f} tok/s ({ours['tokens_per_s'] / hf_tps:.2f}x)"
                if hf_tps
                else ", HF generate n/a"
            )
            + (
                f", roofline {roof:,.0f} tok/s ({ours['tokens_per_s'] / roof:.0%})"
                if roof
                else ", no roofline (no HBM figure for this device)"
            )
            + f"  [{kind}]",
            flush=True,
        )
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(
                    json.dumps({**r, "shape": a.shape, "date": time.strftime("%Y-%m-%d")}) + "\n"
                )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
