"""Optimizer: AdamW with a weight-decay mask, global-norm clipping and the learning-rate schedules.

Weight decay applies to matrices only: not to norms (``scale``), biases or prefixes. Schedules:

* ``cosine``: linear warmup to ``lr``, cosine decay to ``min_lr_ratio * lr`` at the last step;
* ``wsd`` (warmup-stable-decay): warmup, constant ``lr``, then a linear decay to
  ``min_lr_ratio * lr`` over the last ``decay_fraction`` of the steps (the paper's recipe:
  a constant rate in stage 1, an annealed one in stage 2);
* ``constant``: warmup, then ``lr``.
"""
from __future__ import annotations

from typing import Any

import jax
import optax


def schedule(cfg, steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based), from an OptimConfig, composed of
    optax schedules: warmup ``lr * (s + 1) / warmup`` (the first step already learns), then the
    chosen shape (``join_schedules`` hands it the steps since the end of the warmup)."""
    lr, warm = cfg.lr, min(cfg.warmup_steps, max(steps - 1, 0))
    low = lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps=max(steps - 1 - warm, 1), alpha=cfg.min_lr_ratio)
    else:  # wsd: constant, then linear to ``low`` over the last n_decay steps, reached at the last step
        n_decay = max(int(round(cfg.decay_fraction * steps)), 1 if cfg.decay_fraction > 0 else 0)
        after = optax.constant_schedule(lr) if n_decay == 0 else optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, low, n_decay)], [steps - n_decay - 1 - warm])
    if warm == 0:
        return after
    warmup = optax.linear_schedule(lr / warm, lr, max(warm - 1, 1))
    return optax.join_schedules([warmup, after], [warm])


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: kernels and embeddings, not norms, biases or prefixes."""
    def decide(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        return not ("prefix" in keys or keys[-1] in ("bias", "scale"))

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(cfg, steps: int) -> optax.GradientTransformation:
    """clip -> AdamW(schedule, masked decay). The train step averages micro-batch grads first."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule(cfg, steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
