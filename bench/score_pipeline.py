"""End-to-end score-stage throughput: where the wall time goes (I/O, tokenization, compute).

    python bench/score_pipeline.py                       # CPU: embedded tiny student (seconds)
    python bench/score_pipeline.py --rows=512 --chars=6000
    python bench/score_pipeline.py --shape=qwen3-4b      # GPU: Qwen3-4B shape, bf16, random

Writes a synthetic input in the released formats (SFT JSONL `uuid, input, output, domain` plus
the teacher log-prob JSONL `sample_uuid, token_ids, logprobs` of each output's harmony form in
gpt-oss ids), then runs `dasd_jax.score.run` twice on it: the first run compiles (and builds
the log-prob join index), the second is measured (jitted functions are module level, so it
compiles nothing). Each phase is timed by wrapping the stage's own functions:

- read + join: reading lines, JSON parsing, the indexed log-prob lookup, teacher alignment
  (`ingest.Reader.candidates`);
- tokenize: rendering and tokenizing with offsets for each model (`score.Side.encode`);
- compute: batches to the device, forward + log-probs, back to the host
  (`score.ModelScorer.score`; synchronous, so device time is inside);
- other: batching, Candidate JSON encoding, atomic writes, progress.

The teacher comes from the released log-probs (the common case), so only the student runs a
forward pass; `--teacher-forward` scores the teacher with the tiny teacher model instead.
Prints a table and appends one JSON line to --out if given. Record results in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = (
    "we need to compute the sum so that each term is positive and then check the bound "
    "let x be an integer with 3.14 < x and f(x) = x^2 + 1 therefore"
).split()


def make_inputs(folder: Path, rows: int, chars: int, seed: int = 0) -> tuple[Path, Path]:
    import random

    from dasd_jax.select.filters import think_to_harmony
    from dasd_jax.tokenizer import build_gpt_oss_tokenizer, encode_with_offsets, load_tokenizer

    rng = random.Random(seed)
    oss = load_tokenizer(build_gpt_oss_tokenizer())
    head = len(encode_with_offsets(oss, "<|channel|>analysis<|message|>")[0])
    sft, lp = folder / "sft.jsonl", folder / "lp.jsonl"
    with sft.open("w") as f, lp.open("w") as g:
        for i in range(rows):
            n = rng.randint(chars // 2, chars)
            words, size = [], 0
            while size < n:
                w = rng.choice(WORDS)
                words.append(w + (".\n" if rng.random() < 0.08 else " "))
                size += len(words[-1])
            output = "<think>\n" + "".join(words).strip() + "\n</think>\n\nThe answer is 42."
            f.write(
                json.dumps(
                    {
                        "uuid": f"u{i}",
                        "input": f"Question {i}: what is x?",
                        "output": output,
                        "domain": "math",
                        "meta": "{}",
                    }
                )
                + "\n"
            )
            ids = encode_with_offsets(oss, think_to_harmony(output))[0][head:]
            g.write(
                json.dumps(
                    {
                        "sample_uuid": f"u{i}",
                        "token_ids": ids,
                        "logprobs": [round(-rng.random(), 4) for _ in ids],
                    }
                )
                + "\n"
            )
    return sft, lp


class Timers:
    def __init__(self):
        self.s = defaultdict(float)

    def wrap(self, owner, name: str, key: str):
        real = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                self.s[key] += time.perf_counter() - t0

        setattr(owner, name, timed)


def use_random_shape(shape: str) -> None:
    """GPU mode: the student is a random model of a published shape, made on the device
    (no multi-GB checkpoint to write); everything else is the stage's own code."""
    from dasd_jax import score
    from dasd_jax.models.checkpoint import init_model
    from dasd_jax.models.qwen3 import shape_config

    real_init = score.ModelScorer.__init__

    def init(self, model_path, model_cfg, chunk_size, mesh):
        import numpy as np

        self.path, self.mesh, self.chunk_size = model_path, mesh, chunk_size
        self.model = init_model(shape_config(shape), mesh, model_cfg.options())
        self.dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp", "expert")]))

    score.ModelScorer.__init__ = init
    return real_init


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny", help="tiny (embedded, CPU) | qwen3-4b | ...")
    p.add_argument("--rows", type=int, default=None)
    p.add_argument("--chars", type=int, default=None, help="max response characters")
    p.add_argument("--batch-tokens", type=int, default=None)
    p.add_argument("--teacher-forward", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tiny = a.shape == "tiny"
    rows = a.rows or (256 if tiny else 2048)
    chars = a.chars or (3000 if tiny else 24000)
    # CPU: the log-prob chunk holds rows x chunk x 151,936 fp32 logits; keep it < 1 GB
    batch_tokens = a.batch_tokens or (2048 if tiny else 65536)
    chunk = 128 if tiny else 1024

    import jax

    from dasd_jax import ingest, score
    from dasd_jax.config import load_config

    work = Path(tempfile.mkdtemp(prefix="score_pipeline."))
    sft, lp = make_inputs(work, rows, chars)
    if not tiny:
        use_random_shape(a.shape)
    dtype = "float32" if tiny else "bfloat16"
    over = [
        f"score.input={sft}",
        f"score.batch_tokens={batch_tokens}",
        f"score.chunk_size={chunk}",
        f"student.dtype={dtype}",
        f"student.param_dtype={dtype}",
        f"score.rows_per_shard={max(64, rows // 4)}",
        f"score.index_dir={work / 'idx'}",
    ]
    if a.teacher_forward:
        over.append("score.teacher_scoring=always")
    else:
        over.append(f"score.teacher_logprobs={lp}")
    if not tiny:
        from dasd_jax.tokenizer import build_qwen3_tokenizer

        over.append(f"student.path={build_qwen3_tokenizer()}")  # tokenizer only (random model)
    score.run(load_config(None, [f"run_dir={work / 'warm'}", *over]))  # compiles

    t = Timers()
    t.wrap(ingest.Reader, "candidates", "read + join")
    t.wrap(score.Side, "encode", "tokenize")
    t.wrap(score.ModelScorer, "score", "compute")
    t0 = time.perf_counter()
    summary = score.run(load_config(None, [f"run_dir={work / 'measured'}", *over]))
    wall = time.perf_counter() - t0
    phases = dict(t.s)
    phases["other"] = wall - sum(phases.values())
    tokens = summary["student_tokens"] + summary["teacher_tokens"]
    print(
        f"\nshape={a.shape} device={jax.devices()[0].device_kind} rows={summary['rows_out']} "
        f"student tokens={summary['student_tokens']} teacher tokens={summary['teacher_tokens']}"
        f" padding={summary['student_padding_fraction']}"
    )
    print(
        f"wall {wall:.2f} s: {summary['rows_out'] / wall:.1f} rows/s, {tokens / wall:.0f} "
        "tokens/s (tokens through a forward pass)"
    )
    for k, v in phases.items():
        print(f"  {k:<12}{v:>8.2f} s {100 * v / wall:>6.1f}%")
    if a.out:
        with open(a.out, "a") as f:
            f.write(
                json.dumps(
                    {
                        "shape": a.shape,
                        "device": jax.devices()[0].device_kind,
                        "rows": summary["rows_out"],
                        "wall_s": wall,
                        "tokens": tokens,
                        "phases_s": phases,
                        "padding": summary["student_padding_fraction"],
                        "teacher_forward": a.teacher_forward,
                        "date": time.strftime("%Y-%m-%d"),
                    }
                )
                + "\n"
            )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
