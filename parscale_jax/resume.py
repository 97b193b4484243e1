"""Resuming a run: what the config may change between the run that wrote a checkpoint and the
run that resumes from it.

* **Never**: the model architecture (``model.*``) and ``freeze_backbone``: the arrays would not
  fit. A one-line error names the differences.
* **Freely**: how the run is executed or observed (:data:`FREE`): the mesh, checkpointing,
  multi-host set-up, logging and evaluation cadence, remat, layer scan, the NaN policy, data
  workers and prefetch, stage-2 keys that only matter at the start (``init_from``,
  ``keep_data_position``) or at the end (``add_to``).
* **Only when allowed**: everything else changes what the run computes (``steps``, ``optim.*``,
  ``batch_size``, ``dtype``, ``seed``, the data stream ``data.*``). A change is refused with one
  line listing it, unless ``allow_changed`` (``--allow-changed KEY ...``) names the key or its
  section; an accepted change is logged, and later checkpoints record the new values. A change
  of the data stream or of ``batch_size`` restarts the data position at the first batch of the
  new stream.
* ``steps`` below the checkpoint's step is an error whatever is allowed.
"""
from __future__ import annotations

from typing import Any

from parscale_jax.config import ModelConfig
from parscale_jax.config import diff as model_diff
from parscale_jax.errors import UserError
from parscale_jax.train_config import TrainConfig, allowed_changes

FREE = ("mesh.", "checkpoint.", "distributed.", "log_every", "eval_every", "eval_windows", "eval_batch_size",
        "peak_flops", "remat", "scan_layers", "nan_policy", "init_from", "keep_data_position", "add_to",
        "allow_changed", "data.worker_count", "data.prefetch")
DATA_POSITION = ("data.", "batch_size")  # a change here: the data position starts afresh
KEEP_POSITION = ("data.mixture", "data.fingerprint")  # except these: the record order is stateless, the batch carries over


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def _check_model(workdir: str, step: int, meta: dict, cfg: TrainConfig) -> None:
    diff = model_diff(ModelConfig.from_dict(meta["model"]), cfg.model)
    if diff:
        raise UserError(f"workdir {workdir} holds a checkpoint (step {step}) of another model "
                        f"({'; '.join(diff)}): use a new --workdir or the same model config")
    if bool(meta.get("freeze_backbone")) != cfg.freeze_backbone:
        raise UserError(f"workdir {workdir} holds a checkpoint with freeze_backbone="
                        f"{str(bool(meta.get('freeze_backbone'))).lower()}: use a new --workdir or the same setting")


def changes(saved: dict, cfg: TrainConfig) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) of every key outside :data:`FREE` and ``model.*`` that differs."""
    old, new = _flat(saved), _flat(cfg.to_dict())
    return [(k, old.get(k), new[k]) for k in sorted(new)
            if not k.startswith("model.") and k != "freeze_backbone" and not _free(k) and old.get(k) != new[k]
            and k in old]


def check(workdir: str, step: int, meta: dict, cfg: TrainConfig, data_fingerprint: str | None = None) -> list[str]:
    """Check a resume from ``step`` (its ``meta``) under ``cfg``; returns the accepted changes as
    ``"key old -> new"`` (empty: none). A UserError (one line) for anything refused.
    ``data_fingerprint``: the run's datasets' (manifests') fingerprint, compared with the one the
    checkpoint recorded (key ``data.fingerprint``, accepted by ``--allow-changed data``)."""
    _check_model(workdir, step, meta, cfg)
    if cfg.steps < step:
        raise UserError(f"steps={cfg.steps} is below the step of the newest checkpoint in {workdir} ({step}): "
                        f"pass steps >= {step} (steps={step} only evaluates it), or use a new --workdir")
    saved = meta.get("config")
    if not isinstance(saved, dict):
        return []  # written before the config was saved with each step
    found = changes(saved, cfg)
    old_fp = meta.get("data_fingerprint")
    if data_fingerprint is not None and old_fp is not None and old_fp != data_fingerprint \
            and not any(k.startswith("data.") and k != "data.mixture" for k, _, _ in found):
        found.append(("data.fingerprint", old_fp, data_fingerprint))  # same settings, other data: say so
    allow = allowed_changes(cfg.allow_changed)
    refused = [c for c in found if c[0] not in allow and c[0].split(".")[0] not in allow]
    if any(k == "data.fingerprint" for k, _, _ in refused):
        raise UserError(f"resuming {workdir} (checkpoint {step}) on a changed dataset (manifest fingerprint "
                        f"{str(old_fp)[:12]} -> {data_fingerprint[:12]}): use the data it was trained on, or accept "
                        f"the change with --allow-changed data")
    if refused:
        listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in refused)
        keys = " ".join(k for k, _, _ in refused)
        raise UserError(f"resuming {workdir} (checkpoint {step}) with changed settings: {listed}; go back to the "
                        f"saved values, or accept the change with --allow-changed {keys} "
                        f"(or allow_changed={','.join(k for k, _, _ in refused)})")
    return [f"{k} {old!r} -> {new!r}" for k, old, new in found]


def restarts_data(accepted: list[str]) -> bool:
    """Whether the accepted changes touch the data stream or the batch (the position starts afresh).
    A changed mixture or dataset (:data:`KEEP_POSITION`) keeps the batch index."""
    keys = [c.split(" ")[0] for c in accepted]
    return any(k.startswith(DATA_POSITION) and not _free(k) and k not in KEEP_POSITION for k in keys)


def changes_data(accepted: list[str]) -> bool:
    """Whether a changed mixture or dataset was accepted (the data position carries over anyway)."""
    return any(c.split(" ")[0] in KEEP_POSITION for c in accepted)
