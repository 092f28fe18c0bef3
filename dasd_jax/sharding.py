"""The one sharding table: logical axis names -> mesh axes, and the mesh itself.

Consumes a `MeshConfig` (sizes of the `data`, `fsdp`, `expert`, `tensor` axes) and produces a
`jax.sharding.Mesh` plus `NamedSharding`s for parameters and activations.

Every parameter carries a tuple of *logical* axis names as NNX metadata (`logical_axes`);
activations are constrained with `constrain(x, logical_axes)`. `LOGICAL_RULES` below is the
only place that says which mesh axes a logical axis is split over. Weight and activation
axes use distinct names (reusing one raises DuplicateSpecError in JAX).

Divisibility: a dimension is split over a mesh axis only when the axis size divides it
(e.g. Qwen3-4B has 8 kv heads; on tensor=16 the kv-head dim stays replicated). Such a
fallback is logged once per (name, shape); it is a property of the shapes, not of the
platform, so a CPU mesh shards exactly like a TPU mesh of the same sizes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

# Mesh axes, outermost first: `tensor` is innermost so it maps to the fastest links.
# `expert` splits MoE experts; outside the experts it acts as one more data axis.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # activations' batch dim is split over these
TENSOR_AXIS = "tensor"

# logical axis -> mesh axes it is split over (None: replicated). Weights first, then
# activations. This table is the single source of truth for the layout.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    # weights
    "layers": None,
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": None,
    "mlp": ("tensor",),
    "norm": None,
    "experts": ("expert",),
    # activations
    "act_batch": ("data", "fsdp", "expert"),
    "act_seq": None,
    "act_embed": None,
    "act_heads": ("tensor",),
    "act_kv_heads": ("tensor",),
    "act_head_dim": None,
    "act_mlp": ("tensor",),
    "act_vocab": ("tensor",),
    "cache_seq": None,
}


@dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; -1 on at most one axis means 'all remaining devices'."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


def make_mesh(cfg: MeshConfig | Sequence[int] = MeshConfig(), devices=None) -> Mesh:
    """A (data, fsdp, expert, tensor) mesh over all global devices (or `devices`).

    `cfg` is a MeshConfig or a tuple (data, fsdp, tensor) with expert=1.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(cfg, MeshConfig):
        if len(cfg) != 3:
            raise ValueError(f"mesh tuple needs 3 sizes (data, fsdp, tensor), got {cfg}")
        cfg = MeshConfig(data=cfg[0], fsdp=cfg[1], tensor=cfg[2])
    sizes = [cfg.data, cfg.fsdp, cfg.expert, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    n = int(np.prod(sizes))
    if n < len(devices) and jax.process_count() == 1:
        log.warning(
            "mesh %s uses %d of the %d devices",
            dict(zip(MESH_AXES, sizes, strict=True)),
            n,
            len(devices),
        )
        devices = devices[:n]
    if n != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {int(np.prod(sizes))} devices, "
            f"{len(devices)} are present"
        )
    # Auto axes: activations are steered with with_sharding_constraint and GSPMD
    # propagates the rest (Explicit axes would reject those constraints).
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


_warned: set[tuple] = set()


def logical_to_spec(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh
) -> PartitionSpec:
    """PartitionSpec for a tensor whose dims have these logical names.

    A mesh axis is used at most once per tensor (first dim wins) and only where its size
    divides the dim; otherwise that dim is replicated over it.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical_axes):
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} is not in sharding.LOGICAL_RULES")
        rule = LOGICAL_RULES.get(name) if name is not None else None
        axes = []
        for ax in rule or ():
            if ax in used or mesh.shape.get(ax, 1) == 1:
                continue
            prod = int(np.prod([mesh.shape[a] for a in axes + [ax]]))
            if shape is not None and shape[i] % prod:
                key = (name, tuple(shape), ax)
                if key not in _warned:
                    _warned.add(key)
                    log.info(
                        "dim %s=%d not divisible by mesh axis %s; replicated", name, shape[i], ax
                    )
                continue
            axes.append(ax)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def named_sharding(
    logical_axes: Sequence[str | None], shape: Sequence[int] | None, mesh: Mesh
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def constrain(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | None):
    """with_sharding_constraint by logical names; identity when no mesh is given."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, ...] input array: batch over BATCH_AXES, rest replicated."""
    return named_sharding(("act_batch",) + (None,) * (ndim - 1), None, mesh)
