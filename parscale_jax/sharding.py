"""The device mesh and the logical-axis rules that map the model's annotations onto it.

Mesh axes (outer to inner): ``data`` (pure data parallelism), ``fsdp`` (data parallelism with
params and optimizer state sharded, ZeRO-3 style), ``stream`` (the P streams, independent until
the aggregation) and ``tensor`` (heads, MLP and vocabulary, Megatron style). The same code runs
on one CPU device (every axis 1) and on a pod slice.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as Pspec

from parscale_jax.errors import UserError

AXES = ("data", "fsdp", "stream", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes); names not listed are replicated.
RULES: tuple[tuple[str, Any], ...] = (
    # params
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("stream", "stream"),
    # activations
    ("activation_batch", BATCH_AXES),
    ("activation_batch_data", "data"),  # a step of resharding (the embedding lookup)
    ("activation_stream", "stream"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Resolve -1 and check that the product equals the device count (UserError otherwise)."""
    sizes = {a: int(getattr(mesh_cfg, a)) for a in AXES}
    fixed = math.prod(v for v in sizes.values() if v != -1)
    free = [a for a, v in sizes.items() if v == -1]
    if free:
        if n_devices % fixed:
            raise UserError(f"mesh {_fmt(sizes)} does not fit {n_devices} devices: the fixed axes' product "
                            f"{fixed} must divide the device count; change mesh.*")
        sizes[free[0]] = n_devices // fixed
    if math.prod(sizes.values()) != n_devices:
        raise UserError(f"mesh {_fmt(sizes)} has {math.prod(sizes.values())} devices but {n_devices} are "
                        f"available: make mesh.data*fsdp*tensor*stream = {n_devices} (or set one axis to -1)")
    return sizes


DEFAULT_MESH = {"data": -1, "fsdp": 1, "stream": 1, "tensor": 1}


def decode_mesh_shape(mesh_cfg, n_devices: int, heads: int, mlp: int, streams: int) -> dict[str, int]:
    """The mesh a decode program runs on. A mesh the config sets is kept (:func:`mesh_shape`).
    The default (``data=-1``, every other axis 1), which replicates the weights on every chip,
    is replaced for decoding, where one pass over the weights is the whole step: ``tensor`` =
    the largest divisor of the device count that divides the attention heads and the MLP width
    (weights split over heads, MLP and vocabulary), then ``stream`` = the largest divisor of the
    devices left that divides P (the streams' prefixes, cache and compute split), ``data`` the
    rest (batch rows). KV heads fewer than ``tensor``: see :func:`cache_kv_repeat`."""
    sizes = {a: int(getattr(mesh_cfg, a)) for a in AXES}
    if sizes != DEFAULT_MESH:
        return mesh_shape(mesh_cfg, n_devices)
    divisors = [d for d in range(1, n_devices + 1) if n_devices % d == 0]
    tensor = max(d for d in divisors if heads % d == 0 and mlp % d == 0)
    stream = max(d for d in divisors if (n_devices // tensor) % d == 0 and streams % d == 0)
    return {"data": n_devices // (tensor * stream), "fsdp": 1, "stream": stream, "tensor": tensor}


def cache_kv_repeat(kv_heads: int, tensor: int) -> int:
    """How many times a decode cache stores each KV head (``model.init_cache``'s ``kv_repeat``):
    ``tensor / kv_heads`` when the tensor axis is a multiple of the KV heads and larger, so the
    cache's heads split evenly (one per chip, each chip the head its query heads read); else 1.
    Each chip then holds 1/tensor of the cache instead of all of it, and the step needs no
    per-chip copy of a head (XLA's answer to 2 heads split over 4 chips)."""
    return tensor // kv_heads if tensor > kv_heads and tensor % kv_heads == 0 else 1


def _fmt(sizes: dict[str, int]) -> str:
    return " ".join(f"{a}={v}" for a, v in sizes.items())


def make_mesh(mesh_cfg, devices: list | None = None, sizes: dict[str, int] | None = None) -> Mesh:
    """The mesh of ``devices`` (default: all) with every axis of type Auto (sharding propagated
    by XLA from the params' and the logical constraints' shardings). Activate it with
    :func:`activate` (``jax.set_mesh`` plus the logical axis rules). ``sizes``: axis sizes
    already resolved (e.g. :func:`decode_mesh_shape`) instead of ``mesh_cfg``'s."""
    devices = jax.devices() if devices is None else list(devices)
    sizes = mesh_shape(mesh_cfg, len(devices)) if sizes is None else sizes
    shape = tuple(sizes[a] for a in AXES)
    auto = (AxisType.Auto,) * len(AXES)
    try:  # a topology-aware device order (ICI neighbours on inner axes)
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except Exception:  # e.g. CPU devices or an odd topology: plain order
        return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=auto)


@contextlib.contextmanager
def activate(mesh: Mesh):
    """``jax.set_mesh(mesh)`` and the logical axis rules for it: the context in which the model
    is traced (flax's logical constraints only apply under ``jax.set_mesh``)."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(mesh)):
        yield


def rules_for(mesh: Mesh) -> tuple[tuple[str, Any], ...]:
    """The rules with axes of size 1 dropped (keeps specs readable; same placement)."""
    out = []
    for name, axes in RULES:
        tup = axes if isinstance(axes, tuple) else (axes,)
        kept = tuple(a for a in tup if mesh.shape[a] > 1)
        out.append((name, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return tuple(out)


def logical_to_spec(names: Pspec | tuple | None, shape: tuple[int, ...], mesh: Mesh) -> Pspec:
    """Mesh PartitionSpec for one array from its logical names; a dimension that the mesh axes
    do not divide evenly is replicated instead (e.g. 2 KV heads on tensor=4)."""
    if names is None:
        return Pspec()
    rules = dict(rules_for(mesh))
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, tuple(names)):
        axes = rules.get(name) if name is not None else None
        tup = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        tup = tuple(a for a in tup if a not in used)
        if tup and dim % math.prod(mesh.shape[a] for a in tup) == 0:
            used.update(tup)
            out.append(tup if len(tup) > 1 else tup[0])
        else:
            out.append(None)
    return Pspec(*out)


def tree_shardings(logical: Any, abstract: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree from its logical PartitionSpecs and shapes."""
    is_spec = lambda x: isinstance(x, Pspec)  # noqa: E731
    return jax.tree.map(lambda names, a: NamedSharding(mesh, logical_to_spec(names, a.shape, mesh)),
                        logical, abstract, is_leaf=is_spec)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sequences split over data x fsdp; the length axis whole."""
    return NamedSharding(mesh, Pspec(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, Pspec())


def batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
