"""The training loop: mesh, state, data, jit-compiled step, checkpoints, metrics, signals.

``train(cfg, workdir)`` resumes from the newest complete checkpoint in ``workdir`` when
there is one (params, optimizer state, step, RNG, data position), otherwise starts from
scratch or, with ``init_from``, from another checkpoint's backbone (stage 2 of the recipe).
"""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from parscale_jax import checkpoint as C
from parscale_jax import data as D
from parscale_jax import evaluate as E
from parscale_jax import flops as F
from parscale_jax import model as M
from parscale_jax import recycle as R
from parscale_jax import sharding as S
from parscale_jax import train_step as TS
from parscale_jax.config import ModelConfig
from parscale_jax.config import diff as config_diff
from parscale_jax.errors import UserError
from parscale_jax.fileio import write_text
from parscale_jax.metrics import MetricsWriter, Progress, fmt_duration, progress_values
from parscale_jax.train_config import TrainConfig


# ---- multi-host --------------------------------------------------------------------------
def maybe_initialize_distributed(dcfg) -> None:
    """``jax.distributed.initialize`` from the config or the environment (once)."""
    want = dcfg.initialize
    env = any(k in os.environ for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS"))
    if want == "false" or (want == "auto" and not (env or dcfg.coordinator_address)):
        return
    kwargs = {}
    if dcfg.coordinator_address:
        kwargs["coordinator_address"] = dcfg.coordinator_address
    if dcfg.num_processes is not None:
        kwargs["num_processes"] = dcfg.num_processes
    if dcfg.process_id is not None:
        kwargs["process_id"] = dcfg.process_id
    if dcfg.local_device_ids:
        kwargs["local_device_ids"] = [int(i) for i in str(dcfg.local_device_ids).split(",")]
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "already" not in str(e).lower():
            raise


# ---- helpers -----------------------------------------------------------------------------


def check_workdir(workdir: str, cfg: TrainConfig, ckpt: C.Checkpointer) -> int | None:
    """The step to resume from (None: fresh); an incompatible checkpoint is a UserError."""
    step = ckpt.latest_step()
    if step is None:
        return None
    meta = ckpt.read_meta(step)
    saved = ModelConfig.from_dict(meta["model"])
    diff = config_diff(saved, cfg.model)
    if diff:
        raise UserError(f"workdir {workdir} holds a checkpoint (step {step}) of another model "
                        f"({'; '.join(diff)}): use a new --workdir or the same model config")
    if bool(meta.get("freeze_backbone")) != cfg.freeze_backbone:
        raise UserError(f"workdir {workdir} holds a checkpoint with freeze_backbone="
                        f"{str(bool(meta.get('freeze_backbone'))).lower()}: use a new --workdir or the same setting")
    return step


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


class _Signals:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint, waits for it and exits."""

    def __init__(self):
        self.caught: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.caught is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.caught = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def save_resolved_config(workdir: str, cfg: TrainConfig) -> None:
    write_text(os.path.join(workdir, "config.yaml"), cfg.to_yaml())


# ---- the loop ----------------------------------------------------------------------------
def train(cfg: TrainConfig, workdir: str, verbose: bool = True) -> dict[str, Any]:
    """Train per ``cfg`` in ``workdir``; returns a summary (final/held-out loss, tokens/s, ...)."""
    maybe_initialize_distributed(cfg.distributed)
    pid, nproc = jax.process_index(), jax.process_count()
    main = pid == 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if (verbose and main) else (lambda *a: None)

    mesh = S.make_mesh(cfg.mesh)
    shards = S.batch_shards(mesh)
    micro = cfg.batch_size // cfg.optim.grad_accum
    if micro % shards:
        raise UserError(f"batch_size={cfg.batch_size} (micro-batch {micro} with optim.grad_accum="
                        f"{cfg.optim.grad_accum}) is not divisible by the {shards} data shards "
                        f"(mesh.data*mesh.fsdp): use a multiple of {shards * cfg.optim.grad_accum}")
    if cfg.batch_size % nproc:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {nproc} processes: use a multiple of {nproc}")
    if cfg.freeze_backbone and cfg.model.parscale_n == 1:
        raise UserError("freeze_backbone=true with model.parscale_n=1 leaves nothing to train: set model.parscale_n > 1")

    os.makedirs(workdir, exist_ok=True)
    ckpt = C.Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    resume_step = check_workdir(workdir, cfg, ckpt)
    if main:
        save_resolved_config(workdir, cfg)

    # data first: missing/empty data fails before any compilation
    tok = D.load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids but model.vocab_size={cfg.model.vocab_size}: "
                        f"raise model.vocab_size to at least {tok.vocab_size}")
    it = D.train_iterator(cfg.data, tok, cfg.batch_size, pid, nproc)
    heldout = None
    if cfg.data.heldout_fraction > 0:
        heldout, heldout_bytes = D.heldout_tokens(cfg.data, tok)

    program = TS.build(cfg, mesh)  # model, optimizer, state shardings, jitted step (shared with aot.py)
    model, tx, lr_fn = program.model, program.tx, program.lr_fn
    shardings, abstract_sh = program.state_shardings, program.abstract_state
    rng = jax.random.PRNGKey(cfg.seed)

    init_note = {}
    with S.activate(mesh):
        if resume_step is None and cfg.init_from:
            host_params, init_note = R.init_from(cfg.init_from, cfg.model, jax.random.fold_in(rng, 1))
            init_fn = lambda r: TS.new_state(host_params, tx, cfg.freeze_backbone, r)  # noqa: E731
        else:
            init_fn = lambda r: TS.new_state(M.init_params(model, r), tx, cfg.freeze_backbone, r)  # noqa: E731
        t0 = time.perf_counter()
        if resume_step is not None:
            state, data_state, meta = ckpt.restore(resume_step, abstract_sh)
            it.set_state(data_state)
            log(f"resumed from {ckpt.dir}/{resume_step} (step {int(meta.get('step', resume_step))}, "
                f"data batch {data_state['next_batch']})")
        else:
            state = jax.jit(init_fn, out_shardings=shardings)(rng)
            if init_note:
                log(init_note["init"])
                if cfg.keep_data_position:
                    try:
                        dstate = C.Checkpointer(cfg.init_from, async_save=False)
                        s = dstate.latest_step()
                        if s is not None:
                            it.set_state(dstate.mngr.restore(s, args=C.ocp.args.Composite(
                                data=C.ocp.args.JsonRestore()))["data"])
                            log(f"data position continued from {cfg.init_from}")
                    except UserError:
                        raise
                    except Exception as e:
                        raise UserError(f"keep_data_position=true but {cfg.init_from} has no data position "
                                        f"({type(e).__name__}): drop keep_data_position") from None

        jstep, batch_sh = program.step, program.batch_sharding

    n_params = M.count_params(TS.full_params(state))
    opt_bytes = _nbytes(state["opt_state"])
    log(f"model: P={cfg.model.parscale_n}, {n_params:,} params "
        f"({M.count_params(TS.full_params(state), non_embedding=True):,} non-embedding); "
        f"mesh {dict(mesh.shape)}; {jax.device_count()} devices, {nproc} processes; dtype {cfg.dtype}")
    if cfg.freeze_backbone:
        saved = 2 * _nbytes(state["frozen"])
        log(f"backbone frozen: optimizer state {opt_bytes / 2**20:.2f} MiB, {saved / 2**20:.2f} MiB "
            f"(Adam moments of the backbone) not allocated")

    seq = cfg.data.seq_len
    tokens_per_step = cfg.batch_size * seq
    flops_tok = F.train_flops_per_token(cfg.model, seq)
    if cfg.peak_flops:
        peak, peak_src = cfg.peak_flops, "config peak_flops"
    else:
        peak, peak_src = F.device_peak_flops()
    peak_total = peak * jax.device_count()

    writer = MetricsWriter(workdir, enabled=main)
    start = int(jax.device_get(state["step"]))
    progress = Progress(cfg.steps, start, desc="train", enabled=verbose and main)
    summary: dict[str, Any] = {"P": cfg.model.parscale_n, "params": n_params, "start_step": start}
    if main and start == 0:
        writer.write(0, event="start", params=n_params, peak_flops=peak, peak_source=peak_src,
                     devices=jax.device_count(), processes=nproc, **{k: v for k, v in init_note.items()})

    def evaluate(step):
        if heldout is None:
            return None
        params = TS.full_params(state)
        n = cfg.eval_windows or None
        res = E.heldout_loss(model, params, heldout, seq, cfg.eval_batch_size, max_windows=n, tokenizer=tok)
        bpb = res["bits_per_byte"]
        writer.write(step, eval_loss=res["loss"], eval_bpb=bpb, eval_tokens=res["tokens"])
        progress.message(f"step {step}: held-out loss {res['loss']:.4f}" + (f", {bpb:.4f} bits/byte" if bpb else ""))
        return {"eval_loss": res["loss"], "eval_bpb": bpb, "eval_tokens": res["tokens"]}

    def save(step, reason=""):
        meta = {"model": cfg.model.to_dict(), "step": step, "freeze_backbone": cfg.freeze_backbone,
                "config": cfg.to_dict()}
        ckpt.save(step, state, it.get_state(), meta)
        if reason:
            progress.message(f"checkpoint {step} saved ({reason})")

    losses: list[tuple[int, float]] = []
    pending = None  # (step, metrics) of the last dispatched step: read one step late
    t_start = time.perf_counter()
    t_window, s_window = None, start
    compile_s = None
    stopped = None
    last_saved = resume_step

    def consume(step, m):
        nonlocal stopped
        loss = float(m["loss"])
        finite = bool(m["finite"])
        if not finite:
            if cfg.nan_policy == "stop":
                stopped = step
                raise UserError(f"loss is {loss} at step {step}: training stopped (no checkpoint written "
                                f"for it); lower optim.lr, or set nan_policy=skip to drop such steps")
            writer.write(step, skipped_nonfinite=True, loss=loss)
            progress.message(f"step {step}: non-finite loss {loss}, update skipped")
        losses.append((step, loss))
        return loss

    with _Signals() as sig:
        try:
            for step in range(start + 1, cfg.steps + 1):
                batch = next(it)["tokens"]
                gbatch = jax.make_array_from_process_local_data(batch_sh, batch, (cfg.batch_size, seq + 1))
                with S.activate(mesh):
                    state, metrics = jstep(state, gbatch)
                if compile_s is None:
                    jax.block_until_ready(metrics["loss"])
                    compile_s = time.perf_counter() - t_start
                    log(f"compiled and ran the first step in {compile_s:.1f}s")
                    t_window, s_window = time.perf_counter(), step
                    t_first, s_first = t_window, step
                    progress.begin(step)
                if pending is not None:
                    consume(*pending)
                pending = (step, metrics)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    loss = consume(*pending)
                    pending = None
                    now = time.perf_counter()
                    tps = mfu = None
                    if step > s_window:
                        tps = (step - s_window) * tokens_per_step / (now - t_window)
                        mfu = flops_tok * tps / peak_total
                    t_window, s_window = now, step
                    lr = float(metrics["lr"])
                    writer.write(step, loss=loss, lr=lr, grad_norm=float(metrics["grad_norm"]),
                                 tokens_per_s=tps, mfu=mfu, tokens=step * tokens_per_step)
                    progress.update(step, **progress_values(loss, tps, mfu))
                    summary.update(tokens_per_s=tps or summary.get("tokens_per_s"), mfu=mfu or summary.get("mfu"))
                if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    evaluate(step)
                if sig.caught is None and nproc > 1:
                    sig.caught = _any_process(sig.caught)
                if step % cfg.checkpoint.every == 0 or step == cfg.steps or sig.caught is not None:
                    if pending is not None:
                        consume(*pending)
                        pending = None
                    save(step, "signal" if sig.caught is not None else "")
                    last_saved = step
                if sig.caught is not None:
                    ckpt.wait()
                    progress.end()
                    log(f"caught signal {sig.caught}: checkpoint {step} written; resume with the same command")
                    summary.update(interrupted=True, step=step)
                    ckpt.close()
                    writer.close()
                    return summary
            if pending is not None:
                consume(*pending)
                pending = None
        finally:
            ckpt.wait()  # an earlier async save in flight finishes even when a NaN stops the run
            progress.end()

    elapsed = time.perf_counter() - t_start
    mean_tps = None
    if compile_s is not None and cfg.steps > s_first:  # the whole run after the compiling step
        mean_tps = (cfg.steps - s_first) * tokens_per_step / (time.perf_counter() - t_first)
    final_eval = evaluate(cfg.steps) or {}
    ckpt.close()
    if cfg.add_to and main:
        R.add_set_to(cfg.add_to, cfg.model, TS.full_params(jax.device_get(state)))
        log(f"added the P={cfg.model.parscale_n} prefix/aggregator set to {cfg.add_to}")
    writer.write(cfg.steps, event="end", elapsed_s=elapsed, compile_s=compile_s, mean_tokens_per_s=mean_tps,
                 **final_eval)
    writer.close()
    summary.update(final_eval, step=cfg.steps, elapsed_s=elapsed, compile_s=compile_s,
                   losses=losses, tokens=cfg.steps * tokens_per_step,
                   tokens_per_s=summary.get("tokens_per_s"), mean_tokens_per_s=mean_tps)
    log(f"done: {cfg.steps} steps in {fmt_duration(elapsed)}"
        + (f", held-out loss {final_eval['eval_loss']:.4f}" if final_eval else ""))
    return summary


def _any_process(flag) -> int | None:
    got = multihost_utils.process_allgather(np.asarray(0 if flag is None else int(flag), np.int32))
    hit = [int(x) for x in np.ravel(got) if int(x)]
    return hit[0] if hit else None
