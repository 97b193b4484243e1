"""Checkpoints (orbax): training checkpoints in a workdir and standalone model checkpoints.

* A **training workdir** holds ``checkpoints/<step>/`` written by :class:`Checkpointer`
  (an orbax CheckpointManager): ``state`` (params, optimizer state, step, RNG; sharded
  arrays), ``data`` (the data iterator's position, JSON) and ``meta`` (the model config and
  run facts, JSON). Orbax writes each step to a temporary directory and renames it into
  place when every item is written (the commit), so a checkpoint cut off mid-write is never
  listed, and leftovers are removed at the next start.
* A **model checkpoint** holds ``params/`` (orbax, float32 pytree {'backbone', 'prefix',
  'aggregator'}, or a multi-P tree, see :mod:`parscale_jax.recycle`) and
  ``model_config.json``; written to a temporary sibling and renamed into place.

:func:`load_params` reads either (a workdir, one of its step directories, or a model
checkpoint) as numpy arrays on the host, whatever mesh wrote it.
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
    """(ModelConfig, params as numpy arrays) from a model checkpoint, a training workdir (its
    newest complete step) or one step directory of a workdir."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: pass a training workdir, one of its "
                        f"checkpoints/<step> directories or a saved model directory")
    if os.path.isdir(os.path.join(path, CKPT_DIR)):  # a workdir
        steps = complete_steps(os.path.join(path, CKPT_DIR))
        if not steps:
            raise UserError(f"workdir {path} holds no complete checkpoint yet: train longer or pass another path")
        path = os.path.join(path, CKPT_DIR, str(steps[-1]))
    if os.path.isfile(os.path.join(path, "meta", "metadata")) or os.path.isdir(os.path.join(path, "state")):
        if not os.path.isfile(os.path.join(path, COMMIT_MARKER)):
            raise UserError(f"checkpoint {path} has no {COMMIT_MARKER}: it was cut off while being written; "
                            f"pass the workdir (its newest complete step is used) or an earlier step")
        meta = _read_json_item(path, "meta")
        cfg = ModelConfig.from_dict(meta["model"])
        state = restore_numpy(os.path.join(path, "state"), keep=("params", "frozen"))
        params = {**state.get("frozen", {}), **state["params"]}
    else:
        cfg_file = os.path.join(path, MODEL_CONFIG)
        if not os.path.isfile(cfg_file):
            raise UserError(f"no checkpoint at {path} (neither {MODEL_CONFIG} nor a training step): "
                            f"pass a training workdir or a saved model directory")
        with open(cfg_file) as f:
            cfg = ModelConfig.from_dict(json.load(f)["model"])
        params = restore_numpy(os.path.join(path, "params"))
    check_finite(params)
    return cfg, params


def restore_numpy(path: str, keep: tuple[str, ...] | None = None) -> Any:
    """Restore an orbax pytree as host numpy arrays, independent of the devices that saved it.
    ``keep``: only these top-level keys (the rest is not read)."""
    import logging

    ckptr = ocp.PyTreeCheckpointer()
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # an item inside a manager step has no step metadata: expected
    try:
        meta = ckptr.metadata(path)
    finally:
        absl_log.setLevel(level)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    tree = dict(tree)
    if keep is not None:
        tree = {k: v for k, v in tree.items() if k in keep}
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)) \
        if keep is not None else ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return jax.tree.map(np.asarray, out)


def _read_json_item(step_dir: str, name: str) -> dict:
    p = os.path.join(step_dir, name, "metadata")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {step_dir} has no readable {name} ({e}): it is incomplete; "
                        f"use an earlier step") from None


# ---- training checkpoints ------------------------------------------------------------------
CKPT_DIR = "checkpoints"


COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step before the final rename


def complete_steps(ckpt_dir: str) -> list[int]:
    """Committed steps: directories named by an integer that hold orbax's commit marker (orbax's
    temporary directories, and a step cut off mid-copy or mid-rename on a non-atomic filesystem,
    are excluded)."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isfile(os.path.join(ckpt_dir, n, COMMIT_MARKER)))


def set_aside_uncommitted(ckpt_dir: str) -> list[str]:
    """Rename step directories without the commit marker to ``<step>.incomplete-<n>``: they are
    never resumed from, and orbax (which trusts any step directory on a POSIX path) would
    otherwise refuse to save that step again. Returns the new names."""
    moved = []
    if not os.path.isdir(ckpt_dir):
        return moved
    for n in os.listdir(ckpt_dir):
        p = os.path.join(ckpt_dir, n)
        if n.isdigit() and os.path.isdir(p) and not os.path.isfile(os.path.join(p, COMMIT_MARKER)):
            i = 0
            while os.path.exists(f"{p}.incomplete-{i}"):
                i += 1
            os.replace(p, f"{p}.incomplete-{i}")
            moved.append(f"{n}.incomplete-{i}")
    return moved


class Checkpointer:
    """Async, atomic save / restore of (train state, data position, meta) under ``workdir/checkpoints``."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
        self.dir = os.path.join(os.path.abspath(workdir), CKPT_DIR)
        if jax.process_index() == 0:
            set_aside_uncommitted(self.dir)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                            enable_async_checkpointing=async_save)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        """Complete steps only (with the commit marker; orbax on a POSIX path trusts any step directory)."""
        return complete_steps(self.dir)

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        return self.mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        return _read_json_item(os.path.join(self.dir, str(step)), "meta")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restore onto the shardings of ``abstract_state`` (ShapeDtypeStructs with .sharding):
        any mesh or device count."""
        out = self.mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()


def check_finite(params: Any) -> None:
    """Reject NaN/Inf params (e.g. an uninitialised prefix) with the name of the first bad leaf."""
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not np.all(np.isfinite(np.asarray(leaf, dtype=np.float32))):
            name = "/".join(str(getattr(k, "key", k)) for k in kp)
            raise UserError(f"param {name} holds NaN/Inf: the checkpoint is corrupt or was never initialised "
                            f"(re-initialise it, e.g. convert from-hf --P n gives fresh prefixes)")
