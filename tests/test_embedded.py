"""The embedded tiny default: the trained gpt-oss teacher (exact subset loss, greedy decoding
writes the demo responses, transformers reads the same model, deterministic build), the demo
rows and the sample stage's caps for the teacher.

The teacher is built once per machine in the user cache (`embedded.tiny_teacher()`), shared
with every other test and the demo; only the determinism test trains (a few steps) elsewhere.
"""

import hashlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dasd_jax import embedded
from dasd_jax.config import load_config
from dasd_jax.models import registry
from dasd_jax.models.harmony import TOKEN_IDS
from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.sample import stage
from dasd_jax.select.filters import check_structure
from dasd_jax.sharding import make_mesh
from dasd_jax.tokenizer import build_gpt_oss_tokenizer, load_tokenizer

RETURN = TOKEN_IDS["<|return|>"]


@pytest.fixture(scope="module")
def teacher():
    return embedded.tiny_teacher()  # the user cache: trained once per machine


@pytest.fixture(scope="module")
def tokenizer(teacher):
    return load_tokenizer(teacher)


@pytest.fixture(scope="module")
def model(teacher):
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    return registry.load(teacher, mesh, ModelOptions(dtype="float32", attention="xla"))


def test_subset_nll_is_the_full_vocabulary_log_softmax():
    rng = np.random.default_rng(0)
    B, T, D, V = 2, 5, 8, 1000
    used = np.sort(rng.choice(V, 37, replace=False))
    w_DV = np.zeros((D, V), np.float32)
    w_DV[:, used] = 0.5 * rng.standard_normal((D, len(used)))
    h_BTD = rng.standard_normal((B, T, D)).astype(np.float32)
    targets_BT = rng.integers(0, len(used), (B, T))
    full = -jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h_BTD, w_DV), axis=-1)
    want = np.take_along_axis(np.asarray(full), used[targets_BT][..., None], -1)[..., 0]
    got = embedded.subset_nll(h_BTD, w_DV[:, used], jnp.asarray(targets_BT), V - len(used))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # without the unused tokens' mass the numbers are different: the term matters
    partial = embedded.subset_nll(h_BTD, w_DV[:, used], jnp.asarray(targets_BT), 0)
    assert np.all(np.asarray(partial) < want - 0.1)


def test_trained_teacher_loss_is_the_full_softmax_loss(teacher, tokenizer, model):
    info = embedded.teacher_info(teacher)
    assert info["steps"] == embedded.TeacherTraining().steps
    assert info["final_loss"] < 0.05 < 10 < info["first_loss"]
    seqs = embedded.teacher_sequences(tokenizer)
    batch, used = embedded.training_batch(seqs)
    assert info["used_tokens"] == len(used) and info["response_tokens"] == batch["mask_BT"].sum()
    V = model.cfg.vocab_size
    assert V == 201088 and model.cfg.model_type == "gpt_oss"
    ids_U = jnp.asarray(used)
    unembed_DV = model.unembed_DV()
    unused = np.setdiff1d(np.arange(V), used)
    assert not np.any(np.asarray(unembed_DV)[:, unused])  # the identity's premise, as saved
    used_arr = np.asarray(used)

    @jax.jit
    def both(tokens_1T, targets_1T):
        h_1TD, _ = model.hidden_states(tokens_1T)
        logp_1TV = jax.nn.log_softmax(model.logits(h_1TD), axis=-1)
        full = -jnp.take_along_axis(logp_1TV, ids_U[targets_1T][..., None], -1)[..., 0]
        sub = embedded.subset_nll(h_1TD, unembed_DV[:, ids_U], targets_1T, V - len(used))
        return full, sub

    total, count = 0.0, 0.0
    for b in range(len(seqs)):  # one row at a time: [T, V] fp32 logits are 167 MB
        tokens = used_arr[batch["tokens_BT"][b : b + 1]]  # the batch holds indices into U
        full, sub = both(tokens, batch["targets_BT"][b : b + 1])
        mask = batch["mask_BT"][b : b + 1]
        np.testing.assert_allclose(np.asarray(sub) * mask, np.asarray(full) * mask, atol=1e-4)
        total += float(np.sum(np.asarray(full) * mask))
        count += float(mask.sum())
    # the saved weights give the loss training reported (its last step's, before the update)
    assert total / count == pytest.approx(info["final_loss"], rel=0.25)


def test_greedy_sampling_writes_the_demo_responses(teacher, tokenizer):
    cfg = load_config(
        None,
        [
            f"teacher.path={teacher}",
            "teacher.dtype=float32",
            "teacher.attention=xla",
            "mesh.data=1",
            "sample.slots=4",
            "sample.max_prefill_length=128",
            "sample.max_tokens=160",
        ],
    )
    sampler = stage.TeacherSampler(teacher, cfg)
    assert sampler.format == "harmony" and RETURN in sampler.engine.eos_ids
    rows = [embedded.demo_rows()[k] for k in (0, 2, 9)]
    seqs = embedded.teacher_sequences(tokenizer, rows)
    for row, (prompt_ids, _) in zip(rows, seqs, strict=True):
        assert sampler.encode_prompt(row["input"]) == prompt_ids  # trained on what it is fed
    out = sampler.sample([r["input"] for r in rows], temperature=0.0, n=1)
    for row, (_, response_ids), (cand,) in zip(rows, seqs, out, strict=True):
        ids = cand.teacher.token_ids
        assert ids[:40] == response_ids[:40]
        # the whole response, and its harmony form maps back to the row's <think> form
        assert cand.finish_reason == "stop" and cand.meta["stop"] == RETURN
        assert ids == response_ids[:-1]  # <|return|> ends it and is not a response token
        assert cand.response == row["output"] and check_structure(cand.response) is None
        think, answer = row["output"][len("<think>\n") :].split("\n</think>\n\n")
        assert "".join(cand.response[s:e] for s, e in cand.teacher.offsets) == think + answer


def test_transformers_reads_the_same_teacher(teacher, tokenizer, model):
    hf = transformers.GptOssForCausalLM.from_pretrained(
        teacher, attn_implementation="eager", dtype=torch.float32
    ).eval()
    assert hf.config.layer_types == ["sliding_attention", "full_attention"]
    prompt, response = embedded.teacher_sequences(tokenizer)[1]
    ids = prompt + response
    assert len(ids) > 2 * hf.config.sliding_window  # the window cuts in
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    ours = np.asarray(model(jnp.asarray([ids], jnp.int32))[0][0])
    np.testing.assert_allclose(ours, ref, atol=2e-3, rtol=1e-4)
    # and transformers' greedy next tokens are the trained response
    k = len(prompt) - 1
    assert ref[k:-1].argmax(-1).tolist() == response


def _weights_hash(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_the_build_is_deterministic(tmp_path, teacher):
    tok = build_gpt_oss_tokenizer()
    training = embedded.TeacherTraining(steps=3, warmup_steps=1)
    a = embedded.build_teacher(tmp_path / "a", training, tok)
    b = embedded.build_teacher(tmp_path / "b", training, tok)
    assert _weights_hash(a) == _weights_hash(b) != _weights_hash(teacher)
    assert embedded.teacher_info(a)["final_loss"] == embedded.teacher_info(b)["final_loss"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folder left


def test_bad_training_settings_name_the_key():
    with pytest.raises(ValueError, match="warmup_steps"):
        embedded.TeacherTraining(steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="reasoning_effort"):
        embedded.TeacherTraining(reasoning_effort="max")
    bad = dict(embedded.demo_rows()[0], output="<think>\nno end")
    with pytest.raises(ValueError, match="demo row 0"):
        embedded.teacher_sequences(load_tokenizer(build_gpt_oss_tokenizer()), [bad])


def test_demo_rows_and_candidates():
    rows = embedded.demo_rows()
    assert len(rows) == len({r["uuid"] for r in rows}) >= 10
    math_rows = [r for r in rows if r["domain"] == "math"]
    assert len(math_rows) > len(rows) / 2
    for r in rows:
        assert check_structure(r["output"]) is None
        boxed = re.findall(r"\\boxed\{(.*)\}\$", r["output"])
        if r["domain"] == "math":
            assert boxed == [r["answer"]], r["uuid"]
        else:
            assert "answer" not in r
    cands = embedded.demo_candidate_rows()
    assert len(cands) == 2 * len(rows) + 2 and len({c["uuid"] for c in cands}) == len(cands)
    assert {c["input"] for c in cands} == {r["input"] for r in rows}
    rejected = [c for c in cands if check_structure(c["output"])]
    assert len(rejected) == 1  # no </think>; the repeated-line one is well-formed


def test_sample_caps_fit_the_trained_teacher():
    tok = load_tokenizer(build_gpt_oss_tokenizer())
    seqs = embedded.teacher_sequences(tok)
    caps = stage.EMBEDDED_TEACHER_DEMO
    longest = max(len(r) - 1 for _, r in seqs)  # <|return|> is not counted
    assert 1.25 * longest <= caps["max_tokens"] <= 1.5 * longest
    assert max(len(p) for p, _ in seqs) <= caps["max_prefill_length"]
    cfg = stage.embedded_demo_config(load_config(None, []))
    assert cfg.sample.stop == () and cfg.sample.max_tokens == caps["max_tokens"]
    # the random-model caps keep their meaning (other stages use them for the student)
    assert stage.EMBEDDED_DEMO["stop"] == ("\n",)
