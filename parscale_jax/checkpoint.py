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

Reading any of them (and Hugging Face directories) for inference, export or stage 2 is
:mod:`parscale_jax.loading`; :func:`restore_numpy` is its primitive: host numpy arrays,
whatever mesh wrote them.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from parscale_jax.config import ModelConfig
from parscale_jax.errors import UserError
from parscale_jax.fileio import atomic_dir, write_json

MODEL_CONFIG = "model_config.json"
CKPT_DIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step before the final rename


def write_params(folder: str, cfg: ModelConfig, params: Any, extra: dict | None = None) -> None:
    """Write a model checkpoint's files (``params/``, ``model_config.json``) into ``folder``."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(folder, "params"), jax.device_get(params))
    ckptr.wait_until_finished()
    write_json(os.path.join(folder, MODEL_CONFIG), {"model": cfg.to_dict(), **(extra or {})})


def save_params(out_dir: str, cfg: ModelConfig, params: Any, extra: dict | None = None,
                replace: bool = False) -> str:
    """Write a standalone model checkpoint at ``out_dir`` atomically (``replace``: swap an existing one)."""
    with atomic_dir(out_dir, replace=replace) as tmp:
        write_params(tmp, cfg, params, extra)
    return os.path.abspath(out_dir)


def restore_numpy(path: str, keep: tuple[str, ...] | None = None) -> Any:
    """Restore an orbax pytree as host numpy arrays, independent of the devices that saved it.
    ``keep``: only these top-level keys (the rest is not read)."""
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


def read_json_item(step_dir: str, name: str) -> dict:
    """A JSON item (``meta``, ``data``) of one step directory, read without orbax."""
    p = os.path.join(step_dir, name, "metadata")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"checkpoint {step_dir} has no readable {name} ({e}): it is incomplete; "
                        f"use an earlier step") from None


# ---- training checkpoints ------------------------------------------------------------------
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
        return read_json_item(os.path.join(self.dir, str(step)), "meta")

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
