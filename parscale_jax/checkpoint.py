"""Checkpoints (orbax). Minimal core for now: standalone model checkpoints.

A *model checkpoint* directory holds ``params/`` (orbax, float32 pytree {'backbone',
'prefix', 'aggregator'}) and ``model_config.json``. It is written to a temporary sibling
and renamed into place, so a half-written one is never picked up.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from parscale_jax.config import ModelConfig
from parscale_jax.errors import UserError

MODEL_CONFIG = "model_config.json"


def save_params(out_dir: str, cfg: ModelConfig, params: Any, extra: dict | None = None) -> str:
    """Write a standalone model checkpoint at ``out_dir`` atomically (replaces nothing)."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} already exists: choose a new output directory or remove it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "params"), jax.device_get(params))
        ckptr.wait_until_finished()
        with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
            json.dump({"model": cfg.to_dict(), **(extra or {})}, f, indent=2)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_params(path: str) -> tuple[ModelConfig, Any]:
    """Read a standalone model checkpoint: (ModelConfig, params as numpy arrays)."""
    path = os.path.abspath(path)
    cfg_file = os.path.join(path, MODEL_CONFIG)
    if not os.path.isfile(cfg_file):
        raise UserError(f"no model checkpoint at {path} (missing {MODEL_CONFIG}): pass a checkpoint directory")
    with open(cfg_file) as f:
        cfg = ModelConfig.from_dict(json.load(f)["model"])
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    params = jax.tree.map(np.asarray, params)
    check_finite(params)
    return cfg, params


def check_finite(params: Any) -> None:
    """Reject NaN/Inf params (e.g. an uninitialised prefix) with the name of the first bad leaf."""
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))):
            name = "/".join(str(getattr(k, "key", k)) for k in kp)
            raise UserError(f"param {name} holds NaN/Inf: the checkpoint is corrupt or was never initialised "
                            f"(re-initialise it, e.g. convert from-hf --P n gives fresh prefixes)")
