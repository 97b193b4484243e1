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
import jax.numpy as jnp
import optax


def schedule(cfg, steps: int) -> optax.Schedule:
    """The learning rate as a function of the step (0-based), from an OptimConfig."""
    lr, warm = cfg.lr, min(cfg.warmup_steps, max(steps - 1, 0))
    low = lr * cfg.min_lr_ratio

    def fn(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = lr * jnp.minimum(1.0, (step + 1) / max(warm, 1)) if warm else jnp.asarray(lr, jnp.float32)
        if cfg.schedule == "constant":
            after = jnp.asarray(lr, jnp.float32)
        elif cfg.schedule == "cosine":
            t = jnp.clip((step - warm) / max(steps - 1 - warm, 1), 0.0, 1.0)
            after = low + (lr - low) * 0.5 * (1 + jnp.cos(jnp.pi * t))
        else:  # wsd
            n_decay = max(int(round(cfg.decay_fraction * steps)), 1 if cfg.decay_fraction > 0 else 0)
            start = steps - n_decay
            t = jnp.clip((step - start + 1) / max(n_decay, 1), 0.0, 1.0) if n_decay else 0.0
            after = lr + (low - lr) * t
        return jnp.where(step < warm, warmup, after)

    return fn


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
