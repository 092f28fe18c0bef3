"""Sampling engine: decode equals full forwards, greedy/top-1, the sampling distribution,
exact truncation, continuous-batching invariance, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dasd_jax.models.checkpoint import load_hf
from dasd_jax.models.qwen3 import ModelOptions
from dasd_jax.sample import sampling
from dasd_jax.sample.driver import Driver, Request, generate
from dasd_jax.sample.engine import Engine, EngineConfig
from dasd_jax.sample.sampling import SamplingParams, sample_tokens, truncation_mask
from dasd_jax.sharding import MeshConfig, make_mesh

PROMPTS = [
    [5, 17, 33, 9, 100, 3, 77],
    [250, 11],
    [7],  # a one-token prompt: nothing to prefill, the token feeds the first decode step
    list(range(40, 61)),  # 21 tokens: three prefill chunks of 8, bucket 32
]


def _load(folder, mesh):
    model = load_hf(
        folder, mesh, ModelOptions(dtype="float32", param_dtype="float32", attention="xla")
    )
    # transformers' init gives nearly uniform logits (std ~0.2); sharpen them so that
    # temperatures differ measurably and argmax ties cannot happen by rounding
    model.lm_head.set_value(model.lm_head[...] * 25.0)
    return model


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_hf_qwen3

    path = tmp_path_factory.mktemp("sample_engine") / "hf"
    make_hf_qwen3(path, seed=3)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return _load(folder, make_mesh((1, 1, 1), devices=jax.devices()[:1]))


def _engine(model, slots=4, eos=(), steps=4):
    cfg = EngineConfig(
        max_concurrent_decodes=slots,
        max_prefill_length=32,
        max_decode_length=24,
        prefill_chunk=8,
        decode_steps=steps,
    )
    return Engine(model, cfg, eos_ids=eos)


@jax.jit
def _forward(model, tokens_1T):
    return model(tokens_1T)[0][0]


def _full_logits(model, seq, width=64):
    """Next-token logits after `seq` by a full (uncached) forward; right padding to a fixed
    width cannot change them (causal) and keeps to one compile."""
    padded = np.zeros((1, width), np.int32)
    padded[0, : len(seq)] = seq
    return np.asarray(_forward(model, jnp.asarray(padded)))[len(seq) - 1]


def test_greedy_and_decode_logits_equal_repeated_full_forwards(model):
    """Every slot at every step: the logits the decode step samples from equal a full
    forward's over the whole sequence, and greedy picks their argmax."""
    eng = _engine(model, slots=4)
    ds = eng.init_decode_state()
    for slot, p in enumerate(PROMPTS):
        pre = eng.prefill(padded_tokens=np.asarray(p), true_length=len(p))
        ds = eng.insert(pre, ds, slot)
    seqs = [list(p) for p in PROMPTS]
    for _ in range(10):
        logits = np.asarray(eng.next_logits(ds))
        ds, res = eng.generate(None, ds)
        res = res.convert_to_numpy()
        for slot, seq in enumerate(seqs):
            full = _full_logits(model, seq)
            np.testing.assert_allclose(logits[slot], full, atol=2e-4, rtol=1e-5)
            tok, valid, _ = res.data[slot]
            assert valid == 1 and tok == int(np.argmax(full))
            logp = jax.nn.log_softmax(jnp.asarray(full))[tok]
            np.testing.assert_allclose(res.logprobs[slot, 0], logp, atol=1e-5)
            assert res.logprobs[slot, 1] == 0.0  # greedy: a point mass
            seq.append(int(tok))


def test_top1_sampling_equals_greedy(model):
    eng = _engine(model, slots=4)
    greedy = [
        Request(i, p, [SamplingParams(temperature=0.0, max_tokens=12)])
        for i, p in enumerate(PROMPTS)
    ]
    top1 = [
        Request(
            i,
            p,
            [
                SamplingParams(temperature=t, top_k=1, seed=s, max_tokens=12)
                for t, s in ((0.7, 1), (1.3, 2), (1.0, 3))
            ],
        )
        for i, p in enumerate(PROMPTS)
    ]
    g = generate(eng, greedy)
    t = generate(eng, top1)
    for i in range(len(PROMPTS)):
        for c in t[i]:
            assert c.token_ids == g[i][0].token_ids
            np.testing.assert_allclose(c.logprobs, g[i][0].logprobs, atol=1e-6)
            assert c.sampling_logprobs == [0.0] * len(c.token_ids)
    # and real sampling does differ from greedy (the test above is not vacuous)
    s = generate(
        eng, [Request(0, PROMPTS[0], [SamplingParams(temperature=1.5, seed=9, max_tokens=12)])]
    )
    assert s[0][0].token_ids != g[0][0].token_ids


def _chi2_pvalue(samples, probs, min_expected=5.0):
    """Pearson chi-square p-value; tokens with small expected counts pooled into one bin."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(probs))
    expected = probs * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * (obs.sum() / exp.sum())  # fp rounding of the probabilities' sum
    return stats.chisquare(obs, exp).pvalue


def test_sampled_frequencies_match_softmax_over_temperature(model):
    """20,000 first-token draws (seeds 0..19999) from the tiny model's next-token logits,
    at T=0.7: a chi-square test against softmax(logits / T) passes at a fixed seed set, and
    the same test against T=1 (the wrong distribution) fails by far: the test has power."""
    eng = _engine(model, slots=1)
    ds = eng.insert(
        eng.prefill(padded_tokens=np.asarray(PROMPTS[0]), true_length=7), eng.init_decode_state(), 0
    )
    logits = np.asarray(eng.next_logits(ds))[0].astype(np.float64)
    n, T = 20000, 0.7
    B = jnp.full((n,), 1.0)
    keys = sampling.slot_keys(jnp.arange(n, dtype=jnp.uint32), jnp.zeros((n,), jnp.int32))
    tok, lpm, lps = jax.jit(sample_tokens)(
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.size)),
        B * T,
        B,
        jnp.zeros((n,), jnp.int32),
        keys,
    )
    tok = np.asarray(tok)

    def softmax(x):
        e = np.exp(x - x.max())
        return e / e.sum()

    p_T = softmax(logits / T)
    assert _chi2_pvalue(tok, p_T) > 1e-3
    assert _chi2_pvalue(tok, softmax(logits)) < 1e-12
    # the two reported log-probs are exactly those of the two distributions
    np.testing.assert_allclose(np.asarray(lpm), np.log(softmax(logits))[tok], atol=1e-5)
    np.testing.assert_allclose(np.asarray(lps), np.log(p_T)[tok], atol=1e-5)


def _reference_keep(x, p, k):
    order = np.argsort(-x, kind="stable")
    V = len(x)
    rank_keep = np.arange(V) < (k if k > 0 else V)
    probs = np.exp(x[order] - x[order].max()) * rank_keep
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep_sorted = rank_keep & ((before < p) | (p >= 1) | (np.arange(V) == 0))
    keep = np.zeros(V, bool)
    keep[order] = keep_sorted
    return keep


def test_top_p_top_k_truncate_exactly():
    rng = np.random.RandomState(0)
    V = 64
    rows = rng.randn(6, V).astype(np.float32) * 3
    rows[5, :10] = 20.0  # ties at the top-k boundary: broken by token id (stable sort)
    cases = [(1.0, 5), (0.5, 0), (0.9, 10), (0.3, 3), (1.0, 0), (1.0, 4)]
    p = jnp.asarray([c[0] for c in cases], jnp.float32)
    k = jnp.asarray([c[1] for c in cases], jnp.int32)
    got = np.asarray(jax.jit(truncation_mask)(jnp.asarray(rows), p, k))
    for i, (pp, kk) in enumerate(cases):
        want = _reference_keep(rows[i].astype(np.float64), pp, kk)
        np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}: p={pp} k={kk}")
    assert got[0].sum() == 5 and got[4].all() and got[5].sum() == 4
    np.testing.assert_array_equal(np.nonzero(got[5])[0], [0, 1, 2, 3])

    # sampling with truncation: support is exactly the kept set, frequencies match the
    # renormalised distribution, reported sampling log-probs are its log-probs
    n, T = 20000, 0.8
    x = rows[2]
    keep = _reference_keep(x.astype(np.float64) / T, 0.9, 10)
    keys = sampling.slot_keys(jnp.arange(n, dtype=jnp.uint32), jnp.full((n,), 5, jnp.int32))
    tok, _, lps = jax.jit(sample_tokens)(
        jnp.broadcast_to(jnp.asarray(x), (n, V)),
        jnp.full((n,), T),
        jnp.full((n,), 0.9),
        jnp.full((n,), 10, jnp.int32),
        keys,
    )
    tok = np.asarray(tok)
    assert set(np.unique(tok)) == set(np.nonzero(keep)[0])
    x64 = x.astype(np.float64)
    q = np.where(keep, np.exp(x64 / T - (x64 / T).max()), 0.0)
    q /= q.sum()
    assert _chi2_pvalue(tok, q) > 1e-3
    np.testing.assert_allclose(np.asarray(lps), np.log(q[tok]), atol=1e-5)


def _requests():
    """Mixed requests: n = 1..3 samples, greedy and sampled, top-p/top-k, an EOS."""
    params = [
        [SamplingParams(temperature=1.0, seed=11, max_tokens=9)],
        [SamplingParams(temperature=0.6, seed=s, max_tokens=14) for s in (1, 2, 3)],
        [SamplingParams(temperature=0.0, max_tokens=6)],
        [
            SamplingParams(temperature=1.2, top_p=0.8, top_k=20, seed=s, max_tokens=11)
            for s in (4, 5)
        ],
        [SamplingParams(temperature=1.0, seed=8, max_tokens=24)],
    ]
    prompts = PROMPTS + [[9, 8, 7, 6, 5, 4, 3, 2, 1]]
    return [Request(i, prompts[i], params[i]) for i in range(len(params))]


def _outputs(eng, requests):
    out = generate(eng, requests)
    return {(r, c.index): c for r, cs in out.items() for c in cs}


def test_continuous_batching_same_outputs_for_any_slots_order_and_mesh(model, folder):
    reqs = _requests()
    # an EOS id that some sample does produce, so stop-by-EOS is part of the comparison
    probe = _outputs(_engine(model, slots=4), reqs)
    eos = probe[(4, 0)].token_ids[5]
    ref = _outputs(_engine(model, slots=4, eos=(eos,)), reqs)
    assert any(c.finish_reason == "stop" and c.stop == eos for c in ref.values())
    assert any(c.finish_reason == "length" for c in ref.values())
    assert len(ref) == 8
    for key, c in ref.items():
        n = reqs[key[0]].samples[key[1]].max_tokens
        assert len(c.token_ids) == (n if c.finish_reason == "length" else len(c.token_ids))
        assert len(c.token_ids) <= n and eos not in c.token_ids

    sharded = _load(folder, make_mesh(MeshConfig(data=4, tensor=2)))
    variants = [
        (_engine(model, slots=1, eos=(eos,), steps=3), reqs),
        (_engine(model, slots=3, eos=(eos,), steps=1), [reqs[i] for i in (2, 0, 4, 1, 3)]),
        (_engine(sharded, slots=8, eos=(eos,)), reqs[::-1]),
    ]
    for eng, order in variants:
        got = _outputs(eng, order)
        assert got.keys() == ref.keys()
        for key in ref:
            assert got[key].token_ids == ref[key].token_ids, key
            assert got[key].finish_reason == ref[key].finish_reason
            np.testing.assert_allclose(got[key].logprobs, ref[key].logprobs, atol=1e-4)
            np.testing.assert_allclose(
                got[key].sampling_logprobs, ref[key].sampling_logprobs, atol=1e-4
            )


def test_n_samples_share_one_prefill(model, monkeypatch):
    eng = _engine(model, slots=4)
    calls = []
    orig = eng.prefill
    monkeypatch.setattr(eng, "prefill", lambda **kw: calls.append(1) or orig(**kw))
    reqs = [Request(0, PROMPTS[0], [SamplingParams(seed=s, max_tokens=5) for s in range(6)])]
    out = generate(eng, reqs)
    assert len(calls) == 1 and len(out[0]) == 6
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # different seeds, different text


def test_the_cache_budget_caps_max_tokens(model):
    eng = _engine(model, slots=4)  # cache length 32 + 24 = 56 positions
    out = generate(
        eng, [Request(0, PROMPTS[3], [SamplingParams(temperature=0.0, max_tokens=1000)])]
    )
    c = out[0][0]
    assert c.finish_reason == "length" and len(c.token_ids) == 56 - (len(PROMPTS[3]) - 1)


def test_bad_input_gives_clear_errors(model):
    eng = _engine(model, slots=2)
    with pytest.raises(ValueError, match="empty prompt"):
        list(Driver(eng).run([Request("a", [], [SamplingParams()])]))
    with pytest.raises(ValueError, match="prompt_too_long: 33 tokens > max_prefill_length=32"):
        list(Driver(eng).run([Request("b", list(range(33)), [SamplingParams()])]))
    with pytest.raises(ValueError, match="no samples"):
        list(Driver(eng).run([Request("c", [1, 2], [])]))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        list(Driver(eng).run([Request("d", [1, 2], [SamplingParams(stop=("x",))])]))
    for bad, match in [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(seed=-1), "seed"),
        (dict(stop=("",)), "stop"),
    ]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="power of two"):
        EngineConfig(max_prefill_length=100)


def test_engine_runs_every_registered_architecture(tmp_path):
    """Greedy decode equals full forwards for each model type the registry loads (the
    teacher ports use the same cache interface)."""
    from dasd_jax.models.checkpoint import ARCHITECTURES

    hf_tiny = pytest.importorskip("hf_tiny")
    makers = {"qwen3_moe": hf_tiny.make_qwen3_moe, "gpt_oss": hf_tiny.make_gpt_oss}
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    for name in sorted(set(ARCHITECTURES) & set(makers)):
        makers[name](tmp_path / name)
        m = load_hf(tmp_path / name, mesh, ModelOptions(dtype="float32", attention="xla"))
        eng = _engine(m, slots=2)
        out = generate(
            eng, [Request(0, PROMPTS[0], [SamplingParams(temperature=0.0, max_tokens=8)])]
        )
        seq = list(PROMPTS[0])
        for tok in out[0][0].token_ids:
            assert tok == int(np.argmax(_full_logits(m, seq))), name
            seq.append(tok)


def test_prefix_destination_sharding_matches_prefill_output(model):
    eng = _engine(model, slots=2)
    pre = eng.prefill(padded_tokens=np.asarray(PROMPTS[0]), true_length=7)
    dest = eng.get_prefix_destination_sharding()
    moved = jax.device_put(pre, dest)
    for a, b in itertools.islice(
        zip(jax.tree.leaves(pre), jax.tree.leaves(moved), strict=False), 4
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_decode_benchmark_smoke():
    """bench/decode.py's own functions on a tiny shape (so the benchmark cannot rot), and its
    roofline on the Qwen3-4B shape: 8.04 GB of bf16 weights + 64 x 640 x 147,456 B of KV cache
    per step at 3.35 TB/s."""
    import importlib.util
    from pathlib import Path

    from dasd_jax.models.qwen3 import Qwen3Config, shape_config

    path = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    spec = importlib.util.spec_from_file_location("bench_decode", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    roof = bench.roofline(shape_config("qwen3-4b"), 64, 512, 256, 3350.0)
    assert roof == pytest.approx(64 / ((4_022_468_096 * 2 + 64 * 640 * 147_456) / 3.35e12))
    assert 15_000 < roof < 15_400
    cfg = Qwen3Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    r = bench.bench_ours(cfg, batch=2, prompt=12, new=8, per_call=4)
    assert r["new"] == 8 and r["tokens_per_s"] > 0
