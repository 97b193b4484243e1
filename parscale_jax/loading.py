"""The one loader: every kind of checkpoint, read once, for evaluation, export, stage 2 and recycling.

Kinds (told apart by what the directory holds):

=========  ====================================================================================
workdir    a training run directory, ``checkpoints/<step>/``: its newest *complete* step is read
step       one ``checkpoints/<step>`` directory of a workdir (refused if cut off mid-write)
model      a saved model: ``model_config.json`` + ``params/`` (single-P or multi-P params)
hf         a Hugging Face directory: ``config.json`` (qwen2 / qwen2_parscale) + safetensors
=========  ====================================================================================

A *multi-P* checkpoint (a saved model whose params are ``{"backbone", "sets"}``, see
:mod:`parscale_jax.params`) holds several P over one backbone.

**Choosing P (the one rule).** ``P`` given: that P's params, or an error listing the P the
checkpoint holds. ``P=None``: the checkpoint's own P (``parscale_n`` of the config it was saved
with) when it holds that set, otherwise the largest P it holds.

**The tokenizer of a checkpoint** (:func:`tokenizer_of`): a ``tokenizer.json`` beside it, else the
``tokenizer`` its ``model_config.json`` names, else the training run's ``data.tokenizer``; None
means the byte tokenizer.

Everything comes back as host numpy arrays, whatever mesh wrote them, checked before it is
trusted: against the checksums saved with it (a damaged checkpoint is one line naming what is
damaged and what to use instead), against the shapes its model config implies, and for NaN/Inf.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from parscale_jax import hf
from parscale_jax import model as M
from parscale_jax.checkpoint import (CKPT_DIR, COMMIT_MARKER, MODEL_CONFIG, Damaged, complete_steps, read_step_meta,
                                     verified_numpy)
from parscale_jax.config import ModelConfig
from parscale_jax.data.tokenizer import is_byte_tokenizer_json
from parscale_jax.errors import UserError
from parscale_jax.params import available_P, check_finite, is_multi, select_P

KINDS = ("workdir", "step", "model", "hf")


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str                 # absolute, as given
    kind: str                 # one of KINDS
    cfg: ModelConfig          # the config it was saved with
    params: dict              # numpy; single-P or multi-P
    meta: dict                # step meta (with "config", the run's TrainConfig dict) or model_config.json

    @property
    def available_P(self) -> list[int]:
        return available_P(self.params)

    @property
    def is_multi(self) -> bool:
        return is_multi(self.params)

    def default_P(self) -> int:
        """The rule for P=None: the saved config's P when held, else the largest held."""
        avail = self.available_P
        return self.cfg.parscale_n if self.cfg.parscale_n in avail else max(avail)

    def at(self, P: int | None = None) -> tuple[ModelConfig, dict]:
        """(ModelConfig at P, single-P params) by the rule of this module."""
        P = self.default_P() if P is None else int(P)
        return self.cfg.replace(parscale_n=P), select_P(self.params, P)


# ---- telling the kinds apart -----------------------------------------------------------------
def _newest_step(workdir: str) -> str:
    steps = complete_steps(os.path.join(workdir, CKPT_DIR))
    if not steps:
        raise UserError(f"workdir {workdir} holds no complete checkpoint yet: train longer or pass another path")
    return os.path.join(workdir, CKPT_DIR, str(steps[-1]))


def _is_step(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta", "metadata")) or os.path.isdir(os.path.join(path, "state"))


def kind_of(path: str) -> str:
    """Which of :data:`KINDS` ``path`` is (a UserError naming what was expected otherwise)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist: pass a training workdir, one of its "
                        f"checkpoints/<step> directories, a saved model or a Hugging Face directory")
    if os.path.isdir(os.path.join(path, CKPT_DIR)):
        return "workdir"
    if _is_step(path):
        return "step"
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)):
        return "model"
    mt = hf.model_type(path)
    if mt in hf.HF_MODEL_TYPES:
        return "hf"
    if mt is not None:
        raise UserError(f"{os.path.join(path, 'config.json')} has model_type {mt!r}: only qwen2 and qwen2_parscale "
                        f"Hugging Face checkpoints can be loaded (convert others to Qwen2 first)")
    raise UserError(f"no checkpoint at {path} (no {MODEL_CONFIG}, training step or Hugging Face config.json): "
                    f"pass a training workdir, a saved model or a Hugging Face directory")


def step_dir(path: str) -> str:
    """The step directory a workdir or step path stands for (the newest complete step of a workdir)."""
    path = os.path.abspath(path)
    step = _newest_step(path) if kind_of(path) == "workdir" else path
    if not os.path.isfile(os.path.join(step, COMMIT_MARKER)):
        raise UserError(f"checkpoint {step} has no {COMMIT_MARKER}: it was cut off while being written; "
                        f"pass the workdir (its newest complete step is used) or an earlier step")
    return step


def _read_model_config(path: str) -> dict:
    cfg_file = os.path.join(path, MODEL_CONFIG)
    try:
        with open(cfg_file) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{cfg_file} is not readable JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise UserError(f"{cfg_file} has no model config: the checkpoint is damaged")
    return meta


# ---- reading ---------------------------------------------------------------------------------
def _damaged(where: str, kind: str, why: str) -> UserError:
    fix = "pass an earlier step (checkpoints/<step>), or resume the training run, which sets a damaged step aside" \
        if kind in ("workdir", "step") else "restore it from a copy, or convert/save it again"
    return UserError(f"checkpoint {where} is damaged ({why}): {fix}")


def _check_shapes(where: str, cfg: ModelConfig, params: dict) -> None:
    """The arrays have the shapes the saved model config implies (for every P the checkpoint holds)."""
    for P in available_P(params):
        want = M.abstract_params(M.make_model(cfg.replace(parscale_n=P)))
        got = select_P(params, P)
        want_s = {k: v.shape for k, v in _named(want).items()}
        got_s = {k: tuple(v.shape) for k, v in _named(got).items()}
        if want_s != got_s:
            bad = sorted(set(want_s) ^ set(got_s)) or [k for k in want_s if want_s[k] != got_s[k]]
            k = bad[0]
            raise UserError(f"checkpoint {where}: its arrays do not match its model config at P={P} ({k}: "
                            f"{got_s.get(k, 'missing')} in the files, {want_s.get(k, 'none')} by the config): the "
                            f"config was edited or belongs to other weights; restore the matching config")


def _named(tree: Any) -> dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def read(path: str) -> Checkpoint:
    """Read a checkpoint of any kind once: its config, all its params (every P set) and metadata."""
    path = os.path.abspath(path)
    kind = kind_of(path)
    if kind == "hf":
        cfg, params = hf.load_hf(path)
        _check_shapes(path, cfg, params)
        return Checkpoint(path, kind, cfg, params, {"source": {"format": "huggingface", "path": path}})
    where = step_dir(path) if kind in ("workdir", "step") else path
    try:
        if kind in ("workdir", "step"):
            meta = read_step_meta(where)
            state = verified_numpy(os.path.join(where, "state"), meta, keep=("params", "frozen"))
            params = {**state.get("frozen", {}), **state["params"]}
        else:
            meta = _read_model_config(path)
            params = verified_numpy(os.path.join(path, "params"), meta)
    except Damaged as e:
        raise _damaged(where, kind, str(e)) from None
    cfg = ModelConfig.from_dict(meta["model"])
    _check_shapes(where, cfg, params)
    check_finite(params)
    return Checkpoint(path, kind, cfg, params, meta)


def load(path: str, P: int | None = None) -> tuple[ModelConfig, dict]:
    """(ModelConfig at the chosen P, single-P numpy params) of any checkpoint (see the P rule above)."""
    return read(path).at(P)


# ---- metadata without the arrays ---------------------------------------------------------------
def run_config(path: str) -> dict | None:
    """The training config (``TrainConfig.to_dict()``) saved with a training checkpoint (a workdir:
    its newest complete step; or one step directory), or None for other checkpoints."""
    try:
        if kind_of(path) not in ("workdir", "step"):
            return None
        meta = read_step_meta(step_dir(path))
    except (UserError, Damaged):
        return None
    cfg = meta.get("config") if isinstance(meta, dict) else None
    return cfg if isinstance(cfg, dict) else None


def _tokenizer_path(p: str, base: str) -> str:
    """``p`` resolved: relative to the checkpoint, else to the working directory (as the training
    run saw it); unchanged when neither holds a tokenizer (its reader then names the problem)."""
    for cand in ([p] if os.path.isabs(p) else [os.path.join(base, p), p]):
        if os.path.isfile(cand):
            return cand
        if os.path.isfile(os.path.join(cand, "tokenizer.json")):
            return os.path.join(cand, "tokenizer.json")
    return p


def tokenizer_of(path: str) -> str | None:
    """The tokenizer.json of a checkpoint by the rule of this module (None: the byte tokenizer, also
    when the file beside it is the byte tokenizer's Hugging Face form, as exports carry it).
    A tokenizer named by the checkpoint but absent is returned as named: its reader reports it."""
    path = os.path.abspath(path)
    beside = os.path.join(path, "tokenizer.json")
    if os.path.isfile(beside):
        return None if is_byte_tokenizer_json(beside) else beside
    named: Any = None
    if os.path.isfile(os.path.join(path, MODEL_CONFIG)):
        named = _read_model_config(path).get("tokenizer")
        if isinstance(named, dict):
            named = named.get("path")
    if not isinstance(named, str):
        named = ((run_config(path) or {}).get("data") or {}).get("tokenizer")
    if not isinstance(named, str) or named == "bytes":
        return None
    return _tokenizer_path(os.path.expanduser(named), path)
