"""Teacher and student of the miniature replication: tokenizers, architectures, pre-training.

Consumes (prompt, response) pairs from `task.py` and a folder; produces Hugging Face folders
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json) that every dasd_jax
stage loads like a real checkpoint (`models.registry`, `tokenizer.load_tokenizer`):

- the teacher: a Qwen3-architecture model with its own byte-level BPE tokenizer (at most 512
  entries, merges learnt from its training prompts written in all four CoT styles), trained
  from scratch until it is accurate on the task;
- the student: a smaller Qwen3 (about 0.55x the teacher's parameters) with its own tokenizer
  (at most 360 entries, merges learnt from its own prompts in all styles) and its own prior:
  pre-trained briefly on a related distribution (short paths of 1-2 arrows with few
  distractors, in the `compact` style only; `task.STUDENT_PRETRAIN`). The task's text has few
  distinct words, so with the full preset both BPE trainers run out of merges at the same
  352 tokens, learnt in a different order: the token ids differ (the score stage still joins
  the two models through character offsets, as for gpt-oss and Qwen3) but a text is cut the
  same way. Teacher and student disagree through the prior: the student has never written the
  other styles nor a long path.

Both tokenizers carry the ChatML tokens the stages render with (`<|im_start|>`, `<|im_end|>`,
`<think>`, `</think>`, `<|endoftext|>`); `<|im_end|>` is EOS. Pre-training is a small optax
AdamW loop with the loss on response tokens (and the closing `<|im_end|>`), the same target
rule as `dasd_jax.train`. A finished model folder is written atomically (`save_hf`) with a
`pretrain.json` beside it; a folder that exists is reused, so a re-run skips it.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# GPT-2's pre-tokenization, except that a capital letter (the task's node names), with the
# ">" that follows it, is a piece of its own and never takes the space before it.
SPLIT_PATTERN = r"[A-Z]>?| ?[a-z]+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# Architecture numbers (config.json keys). The teacher is ~4x the student's non-embedding size.
TEACHER_ARCH = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
)
STUDENT_ARCH = dict(
    hidden_size=96,
    intermediate_size=288,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
)


# --------------------------------------------------------------------------- tokenizers


def _write_tokenizer(tok, out: Path) -> None:
    from tokenizers import decoders, processors

    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t.startswith("<|"),
        }
        for t in SPECIALS
    }
    config = {
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _add_specials(tok) -> None:
    from tokenizers import AddedToken

    tok.add_special_tokens(
        [AddedToken(t, special=t.startswith("<|"), normalized=False) for t in SPECIALS]
    )


def build_bpe_tokenizer(out: Path, corpus: list[str], vocab_size: int) -> Path:
    """Byte-level BPE trained on `corpus`, `vocab_size` entries including the 256 bytes and the
    ChatML tokens. Pre-tokenization: `SPLIT_PATTERN`."""
    from tokenizers import Regex, Tokenizer, pre_tokenizers, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE(fuse_unk=False))
    # a capital (the task's node names) followed by ">" and a lone capital are always tokens of
    # their own, never merged with a space or a neighbour: "X>" (leaving X) and "X" (arriving
    # at X) are one and the same token wherever they appear
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    _write_tokenizer(tok, out)
    return out


# --------------------------------------------------------------------------- pre-training


@dataclass(frozen=True)
class PretrainConfig:
    """A small AdamW loop (warmup then cosine) on padded rows of one example each."""

    steps: int = 1000
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"pretrain: steps, batch >= 1, lr > 0, warmup >= 0; got {self}")


def encode_examples(tokenizer, pairs: list[tuple[str, str]], system_prompt: str):
    """(tokens [N, T] int32, loss mask [N, T], lengths [N]): each (prompt, response) encoded by
    the SFT stages' own encoder (`dasd_jax.train.data.encode_record`: ChatML rendering, the
    loss on the response tokens and the closing `<|im_end|>`)."""
    from dasd_jax.schema import SFTRecord
    from dasd_jax.train.data import encode_record

    seqs, masks = [], []
    for i, (prompt, response) in enumerate(pairs):
        rec = SFTRecord(id=f"pretrain-{i}", prompt=prompt, response=response)
        ids, mask = encode_record(rec, tokenizer, system_prompt, mask_student_prefix=False)
        seqs.append(ids)
        masks.append(mask)
    longest = max(map(len, seqs))
    t = int(math.ceil(longest / 16) * 16)
    tokens = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.float32)
    for i, (ids, m) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i, : len(ids)] = ids
        mask[i, : len(m)] = m
    return tokens, mask, np.asarray([len(s) for s in seqs], np.int32)


def pretrain(
    out: Path,
    arch: dict,
    tokenizer_dir: Path,
    pairs: list[tuple[str, str]],
    cfg: PretrainConfig,
    system_prompt: str,
    name: str,
) -> Path:
    """Trains a fresh Qwen3 of `arch` on `pairs` and saves it as an HF folder at `out`
    (reused when it already exists). Writes `out/pretrain.json` (config, losses, seconds)."""
    if (out / "config.json").exists() and (out / "pretrain.json").exists():
        log.info("%s: reusing %s", name, out)
        return out
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from dasd_jax.models.checkpoint import init_model, save_hf
    from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
    from dasd_jax.progress import Progress
    from dasd_jax.sharding import make_mesh
    from dasd_jax.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir)
    tokens, mask, lengths = encode_examples(tok, pairs, system_prompt)
    hf = dict(
        model_type="qwen3",
        architectures=["Qwen3ForCausalLM"],
        vocab_size=len(tok),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        dtype="float32",
        **arch,
    )
    mcfg = Qwen3Config.from_hf_dict(hf, source=name)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = init_model(mcfg, mesh, ModelOptions(dtype="float32", attention="xla"), seed=cfg.seed)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1), cfg.lr * 0.05
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=cfg.weight_decay),
    )
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, tokens_BT, mask_BT, segments_BT):
        def loss_fn(model):
            logits_BTV, _ = model(tokens_BT, None, segments_BT)
            logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1])
            ll_BT = jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], -1)[..., 0]
            w_BT = mask_BT[:, 1:]
            return -jnp.sum(ll_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(tokens))
    pos = 0
    losses = []
    progress = Progress(f"pretrain {name}", cfg.steps, every_s=20.0)
    for i in range(cfg.steps):
        if pos + cfg.batch > len(order):
            order, pos = rng.permutation(len(tokens)), 0
        idx = order[pos : pos + cfg.batch]
        pos += cfg.batch
        t = min(int(math.ceil(lengths[idx].max() / 64) * 64), tokens.shape[1])  # few shapes
        segs = (np.arange(t)[None, :] < lengths[idx][:, None]).astype(np.int32)
        loss = step(model, opt, jnp.asarray(tokens[idx, :t]), jnp.asarray(mask[idx, :t]), segs)
        if i % 50 == 0 or i == cfg.steps - 1:
            losses.append((i, float(loss)))
            if not math.isfinite(losses[-1][1]):
                raise FloatingPointError(f"{name}: loss is {losses[-1][1]} at step {i}")
        progress.update(1, int(lengths[idx].sum()), loss=round(float(loss), 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_hf(model, out, tokenizer_dir=tokenizer_dir)
    info = {
        "name": name,
        "examples": len(pairs),
        "config": asdict(cfg),
        "arch": arch,
        "vocab_size": len(tok),
        "params": int(mcfg.num_params),
        "losses": losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "%s: %d steps, final loss %.4f, %.0f s", name, cfg.steps, losses[-1][1], info["seconds"]
    )
    return out


def styled_pairs(problems, styles, seed: int) -> list[tuple[str, str]]:
    """(prompt, response) per problem, each in a style drawn uniformly from `styles`."""
    from bench.replication.task import solve

    rng = random.Random(f"pretrain-styles-{seed}")
    return [(p.prompt, solve(p, rng.choice(styles))) for p in problems]
