"""The training state and the jit-compiled train step (pure functions).

State (a dict pytree, what a checkpoint holds)::

    {"step": int32[], "params": trainable groups, "frozen": frozen groups (only when the
     backbone is frozen), "opt_state": optax state of the trainable groups only,
     "rng": uint32[2] (advanced every step; reserved for stochastic regularisers)}

A frozen backbone gets no gradient and no optimizer state: it lives in ``frozen``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as Pspec

from parscale_jax import model as M
from parscale_jax import optim as O
from parscale_jax import sharding as S
from parscale_jax.errors import UserError
from parscale_jax.loss import sequence_nll


def split_params(params: dict, freeze_backbone: bool) -> tuple[dict, dict]:
    """(trainable groups, frozen groups)."""
    if not freeze_backbone:
        return dict(params), {}
    if "prefix" not in params:
        raise ValueError("freeze_backbone with P=1 leaves nothing to train")
    return {g: v for g, v in params.items() if g != "backbone"}, {"backbone": params["backbone"]}


def full_params(state: dict) -> dict:
    """The model's params ({'backbone', 'prefix', 'aggregator'}) from a train state."""
    return {**state.get("frozen", {}), **state["params"]}


def new_state(params: dict, tx: optax.GradientTransformation, freeze_backbone: bool, rng: jax.Array) -> dict:
    trainable, frozen = split_params(params, freeze_backbone)
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable),
             "rng": jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng}
    if frozen:
        state["frozen"] = frozen
    return state


def _path_keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(abstract_state: dict, param_logical: dict, mesh) -> dict:
    """NamedShardings for the whole state: params by their logical axes, optimizer moments like
    the param they belong to (matched by path suffix), scalars replicated."""
    abstract_params = {**abstract_state.get("frozen", {}), **abstract_state["params"]}
    param_sh = S.tree_shardings({g: param_logical[g] for g in abstract_params}, abstract_params, mesh)
    by_path = {}
    for path, sh in jax.tree_util.tree_leaves_with_path(param_sh, is_leaf=lambda x: isinstance(x, NamedSharding)):
        by_path[_path_keys(path)] = sh
    rep = NamedSharding(mesh, Pspec())

    def pick(path, leaf):
        keys = _path_keys(path)
        for i in range(len(keys)):
            sh = by_path.get(keys[i:])
            if sh is not None and len(sh.spec) <= len(leaf.shape):
                return sh
        return rep

    return {k: (jax.tree_util.tree_map_with_path(pick, v) if k in ("params", "frozen", "opt_state")
                else jax.tree.map(lambda _: rep, v))
            for k, v in abstract_state.items()}


def make_train_step(model: M.ParScaleLM, tx: optax.GradientTransformation, grad_accum: int = 1,
                    nan_policy: str = "stop", lr_fn: Callable | None = None) -> Callable:
    """``step(state, tokens [B, S+1]) -> (state, metrics)``; the loss is the mean next-token
    NLL over all B*S targets; with ``grad_accum`` = k the batch is processed as k micro-batches
    of B/k sequences whose gradient sums are added before one update (same result as one batch).
    ``nan_policy="skip"`` keeps the old params/optimizer state when the loss, the gradients or the
    updated params are not finite (``metrics["finite"]``; ``metrics["params_finite"]`` tells the last apart)."""

    def summed_loss(trainable, frozen, tokens):
        return jnp.sum(sequence_nll(model, {**frozen, **trainable}, tokens))

    grad_fn = jax.value_and_grad(summed_loss)

    def step(state, tokens):
        trainable, frozen = state["params"], state.get("frozen", {})
        B, W = tokens.shape
        n_targets = B * (W - 1)
        if grad_accum == 1:
            loss_sum, grads = grad_fn(trainable, frozen, tokens)
        else:
            micro = tokens.reshape(grad_accum, B // grad_accum, W)
            micro = jax.lax.with_sharding_constraint(micro, Pspec(None, S.BATCH_AXES, None)) \
                if _mesh_active() else micro

            def body(carry, mb):
                l_acc, g_acc = carry
                l, g = grad_fn(trainable, frozen, mb)
                return (l_acc + l, jax.tree.map(jnp.add, g_acc, g)), None

            zeros = jax.tree.map(jnp.zeros_like, trainable)
            (loss_sum, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro)
        loss = loss_sum / n_targets
        grads = jax.tree.map(lambda g: g / n_targets, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        params = optax.apply_updates(trainable, updates)
        params_finite = jax.tree.reduce(jnp.logical_and, jax.tree.map(lambda p: jnp.all(jnp.isfinite(p)), params))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
        if nan_policy == "skip":
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, trainable), keep(opt_state, state["opt_state"])
        rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"]))
        new = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": rng}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, "params_finite": params_finite}
        if lr_fn is not None:
            metrics["lr"] = lr_fn(state["step"])
        return new, metrics

    return step


class TrainProgram(NamedTuple):
    """Everything :func:`build` derives from a training config and a mesh: what train.py runs
    and what ``python -m parscale_jax.aot`` compiles for a TPU topology."""
    model: M.ParScaleLM
    tx: optax.GradientTransformation
    lr_fn: Callable
    state_shardings: dict           # NamedShardings of the train state
    abstract_state: dict            # jax.ShapeDtypeStruct per leaf, with its sharding
    batch_sharding: NamedSharding   # tokens [batch_size, seq_len + 1]
    step: Callable                  # jit(step), state donated


def build(cfg, mesh, platform: str | None = None) -> TrainProgram:
    """The model, optimizer, abstract train state with its shardings and the jitted step for a
    TrainConfig on ``mesh``; nothing is allocated. ``platform`` resolves ``attention_impl=auto``
    (default: jax's default backend)."""
    stream_axis = "stream" if mesh.shape["stream"] > 1 else None
    if stream_axis and cfg.model.parscale_n % mesh.shape["stream"]:
        raise UserError(f"mesh.stream={mesh.shape['stream']} does not divide model.parscale_n="
                        f"{cfg.model.parscale_n}: choose a divisor of P for mesh.stream")
    model = M.make_model(cfg.model, cfg.dtype, cfg.remat, cfg.scan_layers, stream_mesh_axis=stream_axis,
                         platform=platform)
    tx, lr_fn = O.make_optimizer(cfg.optim, cfg.steps), O.schedule(cfg.optim, cfg.steps)
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
    abstract = jax.eval_shape(lambda r: new_state(M.init_params(model, r), tx, cfg.freeze_backbone, r), rng)
    shardings = state_shardings(abstract, M.logical_axes(model), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    batch_sh = S.batch_sharding(mesh)
    step_fn = make_train_step(model, tx, cfg.optim.grad_accum, cfg.nan_policy, lr_fn)
    # traced (by a call or .lower) under S.activate(mesh), which the caller enters
    step = jax.jit(step_fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, S.replicated(mesh)),
                   donate_argnums=(0,))
    return TrainProgram(model, tx, lr_fn, shardings, abstract, batch_sh, step)


def _mesh_active() -> bool:
    from flax.linen import meta

    return bool(meta.global_mesh_defined())
