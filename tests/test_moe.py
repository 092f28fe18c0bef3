"""MoE routing and expert compute: HF's routers, grouped == dense, expert parallelism, no drops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dasd_jax.models import moe
from dasd_jax.sharding import MeshConfig, make_mesh

M, D, F = 24, 16, 8


def _experts(rng, E, gpt_oss: bool) -> moe.Experts:
    n = lambda *s: jnp.asarray(rng.randn(*s).astype(np.float32))  # noqa: E731
    if gpt_oss:
        return moe.Experts((n(E, D, F, 2),), (n(E, F, 2),), n(E, F, D), n(E, D))
    return moe.Experts((n(E, D, F), n(E, D, F)), (None, None), n(E, F, D))


def _act(gpt_oss: bool):
    return moe.gpt_oss_glu(1.702, 1.5) if gpt_oss else moe.silu_glu


def test_gpt_oss_router_matches_transformers():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    cfg = transformers.GptOssConfig(hidden_size=D, num_local_experts=6, num_experts_per_tok=3)
    router = GptOssTopKRouter(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        router.weight.normal_()
        router.bias.normal_()
    x = torch.randn(M, D)
    _, scores, idx = router(x)
    logits = moe.router_logits(
        jnp.asarray(x.numpy()),
        jnp.asarray(router.weight.detach().numpy().T),
        jnp.asarray(router.bias.detach().numpy()),
    )
    w, e = moe.topk_then_softmax(logits, 3)
    np.testing.assert_array_equal(np.asarray(e), idx.numpy())
    np.testing.assert_allclose(np.asarray(w), scores.detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_moe_router_matches_transformers(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = transformers.Qwen3MoeConfig(
        hidden_size=D, num_experts=8, num_experts_per_tok=2, norm_topk_prob=norm
    )
    router = Qwen3MoeTopKRouter(cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        router.weight.normal_()
    x = torch.randn(M, D)
    _, scores, idx = router(x)
    logits = moe.router_logits(
        jnp.asarray(x.numpy()), jnp.asarray(router.weight.detach().numpy().T)
    )
    w, e = moe.softmax_then_topk(logits, 2, norm)
    np.testing.assert_array_equal(np.asarray(e), idx.numpy())
    np.testing.assert_allclose(np.asarray(w), scores.detach().numpy(), atol=1e-6)
    assert np.allclose(np.asarray(w).sum(-1), 1.0) == norm


@pytest.mark.parametrize("gpt_oss", [True, False], ids=["gpt_oss", "qwen3_moe"])
@pytest.mark.parametrize("E, k", [(4, 1), (8, 2), (6, 4)])
def test_grouped_equals_dense(gpt_oss, E, k):
    rng = np.random.RandomState(E * 10 + k)
    ex = _experts(rng, E, gpt_oss)
    x = jnp.asarray(rng.randn(M, D).astype(np.float32))
    w, e = moe.topk_then_softmax(jnp.asarray(rng.randn(M, E).astype(np.float32)), k)
    dense = moe.experts_dense(x, w, e, ex, _act(gpt_oss))
    grouped = moe.experts_grouped(x, w, e, ex, _act(gpt_oss))
    assert np.abs(np.asarray(dense)).max() > 0.1
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(dense), atol=1e-5, rtol=1e-5)


def test_every_token_on_one_expert_is_not_dropped():
    """The worst imbalance: all M*k pairs on expert 0 (k=1) or experts 0 and 1. No capacity
    factor, so nothing is dropped and grouped still equals dense (and is non-zero for all)."""
    rng = np.random.RandomState(0)
    ex = _experts(rng, 4, True)
    x = jnp.asarray(rng.randn(M, D).astype(np.float32))
    for e_Mk in (np.zeros((M, 1)), np.tile([[0, 1]], (M, 1))):
        e = jnp.asarray(e_Mk, jnp.int32)
        w = jnp.full(e.shape, 1.0 / e.shape[1])
        dense = np.asarray(moe.experts_dense(x, w, e, ex, _act(True)))
        grouped = np.asarray(moe.experts_grouped(x, w, e, ex, _act(True)))
        np.testing.assert_allclose(grouped, dense, atol=1e-5, rtol=1e-5)
        assert (np.abs(grouped).max(-1) > 0).all()


def test_grouped_gradients_equal_dense():
    rng = np.random.RandomState(1)
    ex = _experts(rng, 4, False)
    x = jnp.asarray(rng.randn(M, D).astype(np.float32))
    w, e = moe.topk_then_softmax(jnp.asarray(rng.randn(M, 4).astype(np.float32)), 2)

    def loss(fn, ex, x):
        return jnp.sum(fn(x, w, e, ex, moe.silu_glu) ** 2)

    g_dense = jax.grad(lambda ex, x: loss(moe.experts_dense, ex, x), argnums=(0, 1))(ex, x)
    g_grouped = jax.grad(lambda ex, x: loss(moe.experts_grouped, ex, x), argnums=(0, 1))(ex, x)
    for a, b in zip(jax.tree.leaves(g_dense), jax.tree.leaves(g_grouped), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "mesh_cfg, m",
    [
        (MeshConfig(data=2, expert=4), M),
        (MeshConfig(data=8), M),
        (MeshConfig(data=1, fsdp=2, expert=2, tensor=2), M),
        (MeshConfig(data=1, expert=8), M),
        (MeshConfig(data=2, expert=4), 10),  # tokens not divisible: replicated over expert
    ],
    ids=["data2-expert4", "data8", "fsdp2-expert2-tensor2", "expert8", "indivisible-tokens"],
)
@pytest.mark.parametrize("gpt_oss", [True, False], ids=["gpt_oss", "qwen3_moe"])
def test_expert_parallel_grouped_equals_local(mesh_cfg, m, gpt_oss):
    rng = np.random.RandomState(2)
    E, k = 8, 2
    ex = _experts(rng, E, gpt_oss)
    x = jnp.asarray(rng.randn(m, D).astype(np.float32))
    w, e = moe.topk_then_softmax(jnp.asarray(rng.randn(m, E).astype(np.float32)), k)
    ref = np.asarray(moe.experts_dense(x, w, e, ex, _act(gpt_oss)))
    mesh = make_mesh(mesh_cfg)
    fn = jax.jit(lambda x, w, e, ex: moe.experts_grouped(x, w, e, ex, _act(gpt_oss), mesh))
    got = np.asarray(fn(x, w, e, ex))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    if mesh.shape["expert"] > 1:
        # the expert-parallel path ran: tokens split over `expert` are gathered and the
        # outputs reduce-scattered back; tokens that cannot be split are summed (all-reduce)
        hlo = fn.lower(x, w, e, ex).as_text()
        batch = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
        assert ("reduce_scatter" if m % batch == 0 else "all_reduce") in hlo


def test_bad_implementation_is_rejected():
    with pytest.raises(ValueError, match="moe implementation"):
        moe.MoeOptions(moe="capacity")
