"""The two-stage recipe, frozen-backbone PEFT and dynamic P, as pure functions on params.

* **Stage 2** (recycling): take a P=1 backbone, add freshly initialised prefixes and a gate
  for P streams (:func:`stage2_init`); the backbone is kept bitwise.
* **Freezing**: :func:`trainable_mask` marks the groups an optimizer may change; with a
  frozen backbone only ``prefix`` and ``aggregator`` train.
* **Dynamic P**: one backbone can serve several P. A *multi-P* params tree is
  ``{"backbone": ..., "sets": {"P2": {"prefix", "aggregator"}, "P4": {...}}}`` (``"P1": {}``
  marks that the bare backbone is itself a valid P=1 model). :func:`select_P` returns the
  ordinary single-P tree the model takes; :func:`add_set` adds or replaces one P's set.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from parscale_jax import model as M
from parscale_jax.config import ModelConfig
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


def to_multi(params: dict, include_p1: bool = False) -> dict:
    """Wrap a single-P tree (or return a multi-P tree unchanged)."""
    if is_multi(params):
        return params
    sets = {set_key(params_P(params)): {g: params[g] for g in SET_GROUPS if g in params}}
    if include_p1:
        sets[set_key(1)] = {}
    return {"backbone": params["backbone"], "sets": sets}


def add_set(multi: dict, single: dict, check_backbone: bool = True) -> dict:
    """Add (or replace) the prefix/aggregator set of ``single`` to ``multi`` over the same backbone."""
    multi = to_multi(multi)
    if check_backbone and not trees_equal(multi["backbone"], single["backbone"]):
        raise UserError("the new P's backbone differs from the checkpoint's: only a run with "
                        "freeze_backbone=true can add its prefix/aggregator set to a shared backbone")
    sets = dict(multi["sets"])
    sets[set_key(params_P(single))] = {g: single[g] for g in SET_GROUPS if g in single}
    return {"backbone": multi["backbone"], "sets": sets}


def stage2_init(backbone: dict, cfg: ModelConfig, rng: jax.Array) -> dict:
    """Params for P = cfg.parscale_n over an existing backbone: fresh prefix and gate, backbone kept."""
    fresh = M.init_params(M.make_model(cfg), rng)
    want = jax.tree.map(np.shape, fresh["backbone"])
    got = jax.tree.map(np.shape, backbone)
    if want != got:
        raise UserError("the init_from backbone does not fit model config: its shapes differ "
                        "(use the same model sizes as the stage-1 run, changing only parscale_n)")
    return {**fresh, "backbone": backbone}


def trainable_mask(params: dict, freeze_backbone: bool) -> dict:
    """A bool pytree like ``params``: True where the optimizer may change the leaf."""
    return {g: jax.tree.map(lambda _: not (freeze_backbone and g == "backbone"), sub)
            for g, sub in params.items()}


def trees_equal(a: Any, b: Any) -> bool:
    """Bitwise equality of two pytrees of arrays."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
