"""Recycling: the two-stage recipe, frozen-backbone sets and dynamic P, on params and checkpoints.

* **Stage 2**: take a backbone (usually P=1), add freshly initialised prefixes and a gate for
  P streams (:func:`stage2_init`); the backbone is kept bitwise. :func:`init_from` does this
  for a run's ``init_from`` checkpoint (reusing that P's set when a multi-P checkpoint has it).
* **Dynamic P**: one backbone can serve several P. :func:`to_multi` wraps a single-P tree in a
  multi-P one, :func:`add_set` adds or replaces one P's set, and :func:`add_set_to` does both
  on a saved multi-P checkpoint (a run's ``add_to``). Reading them is
  :mod:`parscale_jax.params` / :mod:`parscale_jax.loading`.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from parscale_jax import loading
from parscale_jax import model as M
from parscale_jax.checkpoint import save_params
from parscale_jax.config import ModelConfig, diff
from parscale_jax.errors import UserError
from parscale_jax.params import SET_GROUPS, is_multi, params_P, set_key, trees_equal

# config fields a stage-2 run may change relative to its init_from checkpoint (besides P)
_STAGE2_FREE = ("model.parscale_attn_smooth", "model.max_position_embeddings")


def stage2_init(backbone: dict, cfg: ModelConfig, rng: jax.Array) -> dict:
    """Params for P = cfg.parscale_n over an existing backbone: fresh prefix and gate, backbone kept."""
    fresh = M.init_params(M.make_model(cfg), rng)
    want = jax.tree.map(np.shape, fresh["backbone"])
    got = jax.tree.map(np.shape, backbone)
    if want != got:
        raise UserError("the init_from backbone does not fit model config: its shapes differ "
                        "(use the same model sizes as the stage-1 run, changing only parscale_n)")
    return {**fresh, "backbone": backbone}


def init_from(path: str, cfg: ModelConfig, rng: jax.Array) -> tuple[dict, dict]:
    """Stage-2 init from the checkpoint at ``path`` (any kind, read once): its backbone with its
    own set for ``cfg.parscale_n`` when it holds one, else fresh prefixes and aggregator.
    Returns (params, a note for the log and metrics)."""
    src = loading.read(path)
    P, src_P = cfg.parscale_n, src.cfg.parscale_n
    bad = [d for d in diff(src.cfg.replace(parscale_n=P), cfg) if not d.startswith(_STAGE2_FREE)]
    if bad:
        raise UserError(f"init_from={path} has another backbone ({'; '.join(bad)}): "
                        f"use the same model sizes as that run, changing only model.parscale_n")
    if P in src.available_P:
        _, params = src.at(P)
        what = f"all params from {path}" if P == src_P else f"backbone and P={P} set from {path}"
        return params, {"init_from": path, "init": what}
    # jitted: one compile instead of op-by-op init, and the unused fresh backbone is never built
    params = jax.tree.map(np.asarray, jax.jit(stage2_init, static_argnums=1)(src.params["backbone"], cfg, rng))
    return params, {"init_from": path,
                    "init": f"backbone from {path} (P={src_P}); fresh prefix/aggregator for P={P}"}


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


def add_set_to(path: str, cfg: ModelConfig, params: dict) -> None:
    """Add this run's prefix/aggregator set to the multi-P model checkpoint at ``path`` (created
    with the backbone and a P=1 entry if absent); the backbone must be bitwise the one stored
    there. The checkpoint is replaced atomically: readers see the old one or the new one."""
    params = jax.tree.map(np.asarray, params)
    if not os.path.exists(path):
        save_params(path, cfg, to_multi(params, include_p1=True))
        return
    base = loading.read(path)
    if base.kind != "model":
        raise UserError(f"add_to={path} is a {base.kind} checkpoint, not a saved multi-P model: use a new path")
    if diff(base.cfg.replace(parscale_n=cfg.parscale_n, parscale_attn_smooth=cfg.parscale_attn_smooth), cfg):
        raise UserError(f"add_to={path} holds another backbone: use a new path")
    include_p1 = base.cfg.parscale_n == 1 or set_key(1) in base.params.get("sets", {})
    multi = add_set(to_multi(base.params, include_p1=include_p1), params)
    save_params(path, base.cfg, multi, extra={k: v for k, v in base.meta.items() if k != "model"}, replace=True)
