"""The params pytree: its groups, multi-P checkpoints, and the checks every reader applies.

A single-P tree is ``{"backbone", "prefix", "aggregator"}`` (``prefix`` and ``aggregator``
only for P > 1). A *multi-P* tree serves several P over one backbone::

    {"backbone": ..., "sets": {"P2": {"prefix", "aggregator"}, "P4": {...}}}

(``"P1": {}`` marks that the bare backbone is itself a valid P=1 model). :func:`select_P`
returns the single-P tree the model takes. Writing multi-P trees (``to_multi``, ``add_set``)
is part of recycling (:mod:`parscale_jax.recycle`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from parscale_jax.errors import UserError

SET_GROUPS = ("prefix", "aggregator")


def set_key(P: int) -> str:
    return f"P{int(P)}"


def is_multi(params: dict) -> bool:
    return "sets" in params


def params_P(params: dict) -> int:
    """P of a single-P params tree, read off the prefix shape ([L, P, nKV, T, hd])."""
    return int(params["prefix"]["k"].shape[1]) if "prefix" in params else 1


def available_P(params: dict) -> list[int]:
    """The P values a params tree can run at."""
    if is_multi(params):
        return sorted(int(k[1:]) for k in params["sets"])
    return [params_P(params)]


def select_P(params: dict, P: int) -> dict:
    """The single-P params for ``P`` (an error listing the available P otherwise)."""
    avail = available_P(params)
    if int(P) not in avail:
        raise UserError(f"P={P} is not in this checkpoint: available P = {avail}; pass one of them with --P")
    if not is_multi(params):
        return params
    return {"backbone": params["backbone"], **params["sets"][set_key(P)]}


def trees_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def check_finite(params: Any) -> None:
    """Reject NaN/Inf params (e.g. an uninitialised prefix) with the name of the first bad leaf."""
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))):
            name = "/".join(str(getattr(k, "key", k)) for k in kp)
            raise UserError(f"param {name} holds NaN/Inf: the checkpoint is corrupt or was never initialised "
                            f"(re-initialise it, e.g. convert from-hf --P n gives fresh prefixes)")
