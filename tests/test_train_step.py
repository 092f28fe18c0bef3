"""SFT math: packed loss == unpacked, accumulation == one batch, overfitting one batch, the
optimizer recipe. A tiny random Qwen3 (vocab 256) in fp32 on fake-CPU meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dasd_jax.models.checkpoint import init_model
from dasd_jax.models.qwen3 import ModelOptions, Qwen3Config
from dasd_jax.sharding import make_mesh
from dasd_jax.train import optim
from dasd_jax.train.config import StageConfig, TrainConfig
from dasd_jax.train.stage import device_batch
from dasd_jax.train.step import grads_and_loss, make_train_step

CFG = Qwen3Config(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rope_theta=10000.0,
)
OPTS = ModelOptions(dtype="float32", param_dtype="float32", attention="xla")


def _docs(n, seed=0, lo=6, hi=40):
    """Random documents: (tokens, loss mask) with a prompt part (mask 0) then an answer."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        L = int(rng.integers(lo, hi))
        p = int(rng.integers(2, L - 2))
        out.append((rng.integers(0, 256, L).astype(np.int32), (np.arange(L) >= p).astype(np.int32)))
    return out


def _rows(docs_per_row, T):
    """Pack lists of documents into rows [R, T] (segments 1.., positions restart, pad 0)."""
    R = len(docs_per_row)
    b = {k: np.zeros((R, T), np.int32) for k in ("tokens", "loss_mask", "positions", "segment_ids")}
    for r, docs in enumerate(docs_per_row):
        at = 0
        for s, (tok, mask) in enumerate(docs, start=1):
            n = len(tok)
            b["tokens"][r, at : at + n] = tok
            b["loss_mask"][r, at : at + n] = mask
            b["positions"][r, at : at + n] = np.arange(n)
            b["segment_ids"][r, at : at + n] = s
            at += n
        assert at <= T
    return b


@functools.cache
def _grads_fn(model_def):  # one jitted function per model: compiles once per batch shape
    return jax.jit(lambda p, b: grads_and_loss(model_def, p, b, chunk_size=16))


def _loss_and_grads(model, host, mesh, accum):
    model_def, params = nnx.split(model)
    loss, grads, n = _grads_fn(model_def)(params, device_batch(host, mesh, accum))
    return float(loss), grads, float(n)


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_packed_loss_equals_unpacked():
    mesh = make_mesh((2, 2, 2))
    model = init_model(CFG, mesh, OPTS, seed=1)
    docs = _docs(8)
    packed = _rows([docs[0:3], docs[3:5], docs[5:7], docs[7:8]], T=128)
    unpacked = _rows([[d] for d in docs], T=48)
    l_p, g_p, n_p = _loss_and_grads(model, packed, mesh, 1)
    l_u, g_u, n_u = _loss_and_grads(model, unpacked, mesh, 1)
    # the loss tokens: each document's answer tokens after the first (t predicts t+1)
    assert n_p == n_u == sum(int(m[1:].sum()) for _, m in docs)
    np.testing.assert_allclose(l_p, l_u, rtol=1e-6)
    np.testing.assert_allclose(_flat(g_p), _flat(g_u), rtol=1e-4, atol=1e-7)
    # the check has teeth: packed rows whose documents may see each other give another loss
    leaky = dict(packed, segment_ids=(packed["segment_ids"] > 0).astype(np.int32))
    leaky["positions"] = np.where(leaky["segment_ids"] > 0, np.arange(128)[None], 0)
    assert abs(_loss_and_grads(model, leaky, mesh, 1)[0] - l_u) > 1e-4


def test_accumulation_of_4_micro_batches_equals_one_batch():
    """Tolerance (fp32, only the summation order differs): loss rtol 1e-6, gradients rtol 1e-5
    (atol 1e-8)."""
    mesh = make_mesh((1, 2, 4))  # 2-way batch split, 4-way tensor split
    model = init_model(CFG, mesh, OPTS, seed=2)
    # unequal loss-token counts per micro-batch: a mean of micro-batch means would differ
    docs = _docs(8, seed=3, lo=4, hi=60)
    host = _rows([[d] for d in docs], T=64)
    l1, g1, _ = _loss_and_grads(model, host, mesh, 1)
    l4, g4, _ = _loss_and_grads(model, host, mesh, 4)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    np.testing.assert_allclose(_flat(g4), _flat(g1), rtol=1e-5, atol=1e-8)
    # the check has teeth: micro-batches hold different numbers of loss tokens, so a mean of
    # per-micro-batch means (or a sum of them) would not equal the global mean
    counts = [int(host["loss_mask"][2 * i : 2 * i + 2, 1:].sum()) for i in range(4)]
    assert len(set(counts)) > 1, counts


def test_loss_falls_when_overfitting_one_batch():
    mesh = make_mesh((2, 2, 2))
    model = init_model(CFG, mesh, OPTS, seed=4)
    host = _rows([[d] for d in _docs(4, seed=5)], T=48)
    scfg = StageConfig(lr=5e-3, lr_floor=5e-3, warmup_frac=0.0)
    schedule = optim.lr_schedule(scfg, 25)
    tx = optim.make_optimizer(TrainConfig(weight_decay=0.0), schedule)
    model_def, params = nnx.split(model)
    opt_def, opt_state = nnx.split(nnx.Optimizer(model, tx, wrt=nnx.Param))
    step = jax.jit(make_train_step(model_def, opt_def, schedule, 16), donate_argnums=0)
    state = {"model": params, "opt": opt_state, "rng": jax.random.PRNGKey(0)}
    batch = device_batch(host, mesh, 1)
    losses = []
    for _ in range(25):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > 5.0  # ~log(256) at random init
    assert losses[-1] < 0.25 * losses[0], losses
    assert int(state["opt"]["step"][...]) == 25


def test_optimizer_recipe():
    scfg = StageConfig()  # lr 5e-5, 10% warmup, cosine to 1e-5
    sched = optim.lr_schedule(scfg, 1000)
    assert float(sched(0)) == 0.0
    np.testing.assert_allclose(float(sched(50)), 2.5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(100)), 5e-5, rtol=1e-6)
    np.testing.assert_allclose(float(sched(550)), 3e-5, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(sched(1000)), 1e-5, rtol=1e-6)
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    model = init_model(CFG, mesh, OPTS)
    params = nnx.state(model, nnx.Param)
    mask = {
        jax.tree_util.keystr(p): v
        for p, v in jax.tree_util.tree_leaves_with_path(optim.decay_mask(params))
    }
    decayed = {k for k, v in mask.items() if v}
    assert any("q_proj" in k for k in decayed) and any("embed_tokens" in k for k in decayed)
    assert not any("norm" in k for k in decayed) and len(decayed) == 9
    # weight decay really skips norms: zero gradients move only the decayed weights
    tx = optim.make_optimizer(TrainConfig(), lambda _: 1e-2)
    pure = nnx.as_pure(params)
    zeros = jax.tree.map(jnp.zeros_like, pure)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(pure), pure)
    for p, u in jax.tree_util.tree_leaves_with_path(updates):
        moved = bool(np.any(np.asarray(u)))
        assert moved == ("norm" not in jax.tree_util.keystr(p)), jax.tree_util.keystr(p)
    # bf16 optimizer state option: both Adam moments stored in bf16
    tx16 = optim.make_optimizer(TrainConfig(opt_state_dtype="bfloat16"), lambda _: 1e-3)
    st = tx16.init(nnx.as_pure(nnx.state(model, nnx.Param)))
    dtypes = {x.dtype for x in jax.tree.leaves(st) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert isinstance(tx16, optax.GradientTransformation)


def test_remat_gives_the_same_gradients():
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    host = _rows([[d] for d in _docs(2, seed=6)], T=48)
    base = _loss_and_grads(init_model(CFG, mesh, OPTS, seed=7), host, mesh, 1)
    for remat in ("full",):  # per-layer rematerialisation, the long-context setting
        opts = ModelOptions(dtype="float32", param_dtype="float32", attention="xla", remat=remat)
        other = _loss_and_grads(init_model(CFG, mesh, opts, seed=7), host, mesh, 1)
        np.testing.assert_allclose(other[0], base[0], rtol=1e-6)
        np.testing.assert_allclose(_flat(other[1]), _flat(base[1]), rtol=1e-5, atol=1e-7)
