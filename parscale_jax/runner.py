"""The training loop: init, restore, step, save, finish.

``train(cfg, workdir)`` takes the workdir's lock, resumes from the newest *intact* checkpoint in
``workdir`` when there is one (params, optimizer state, step, RNG, data position; the config
may change only as :mod:`parscale_jax.resume` allows), otherwise starts from scratch or, with
``init_from``, from another checkpoint's backbone (stage 2 of the recipe). It returns a
:class:`TrainSummary`.

Every exit path (the end, a signal, a non-finite loss, a failed save, any error) leaves through
one ``ExitStack``: the save in flight is finished, the data workers, metric files and orbax's
threads are closed, and the lock is released. Nothing is written to a workdir before the run
is known to start except the lock (``config.yaml``, metrics and checkpoints come after the
checks, the data and the restore).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from parscale_jax import checkpoint as C
from parscale_jax import data as D
from parscale_jax import evaluate as E
from parscale_jax import flops as F
from parscale_jax import loading
from parscale_jax import model as M
from parscale_jax import recycle as R
from parscale_jax import resume
from parscale_jax import sharding as S
from parscale_jax import train_step as TS
from parscale_jax.errors import RunFailed, UserError
from parscale_jax.fileio import is_no_space, no_space, write_text
from parscale_jax.lock import WorkdirLock
from parscale_jax.metrics import MetricsWriter, Progress, fmt_duration, progress_values
from parscale_jax.train_config import TrainConfig


@dataclasses.dataclass
class TrainSummary:
    """What a run did. ``interrupted``: stopped by a signal after saving ``step``. For a run that
    was already complete, the held-out loss and throughput are those its last checkpoint recorded."""
    P: int
    params: int
    non_embedding_params: int
    start_step: int
    step: int
    interrupted: bool = False
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)  # (step, train loss) of this run
    tokens: int = 0                        # trained tokens up to ``step`` (all runs of the workdir)
    elapsed_s: float | None = None
    compile_s: float | None = None
    tokens_per_s: float | None = None      # the last log window
    mean_tokens_per_s: float | None = None  # after the compiling step
    mfu: float | None = None
    eval_loss: float | None = None         # held-out loss at ``step``
    eval_bpb: float | None = None
    eval_tokens: int | None = None
    changes: list[str] = dataclasses.field(default_factory=list)  # settings changed on resume (allowed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    except (RuntimeError, ValueError) as e:
        if "already" in str(e).lower():
            return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"distributed.initialize={want} but jax.distributed.initialize failed ({first}): set "
                        f"distributed.coordinator_address, num_processes and process_id, run where JAX finds the "
                        f"cluster itself (TPU pod, SLURM), or set distributed.initialize=false") from None


def _agree(nproc: int, *flags: int) -> list[int]:
    """The largest value of each flag over all processes (the flags themselves on one process)."""
    if nproc == 1:
        return [int(f) for f in flags]
    got = multihost_utils.process_allgather(np.asarray(flags, np.int64))
    return [int(x) for x in np.max(np.asarray(got).reshape(-1, len(flags)), axis=0)]


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


# ---- what the loop's parts share ---------------------------------------------------------------
@dataclasses.dataclass
class _Run:
    cfg: TrainConfig
    workdir: str
    log: Callable[..., None]
    verbose: bool
    nproc: int
    main: bool
    stack: contextlib.ExitStack
    started: bool = False              # config.yaml and metrics written: the run is on
    mesh: Any = None
    program: TS.TrainProgram | None = None
    tok: Any = None
    it: Any = None                     # the data iterator
    heldout: Any = None
    ckpt: C.Checkpointer | None = None
    writer: MetricsWriter | None = None
    progress: Progress | None = None
    signals: _Signals | None = None
    resume_step: int | None = None     # the checkpoint resumed from (None: a fresh start)
    accepted: list[str] = dataclasses.field(default_factory=list)
    saved_summary: dict = dataclasses.field(default_factory=dict)  # what the resumed checkpoint recorded
    init_note: dict = dataclasses.field(default_factory=dict)
    start: int = 0
    pending: tuple | None = None       # (step, metrics) of the last dispatched step: read one step late
    losses: list = dataclasses.field(default_factory=list)
    clock: dict = dataclasses.field(default_factory=dict)
    last: dict = dataclasses.field(default_factory=dict)   # tokens_per_s, mfu, eval_* so far

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.data.seq_len


# ---- the loop ----------------------------------------------------------------------------
def train(cfg: TrainConfig, workdir: str, verbose: bool = True) -> TrainSummary:
    """Train per ``cfg`` in ``workdir`` (see the module doc); a :class:`TrainSummary`."""
    maybe_initialize_distributed(cfg.distributed)
    with contextlib.ExitStack() as stack:
        try:
            run = init(cfg, workdir, verbose, stack)
            state = restore(run)
            begin(run, state)
            for step in range(run.start + 1, cfg.steps + 1):
                state = step_once(run, state, step)
                if step % cfg.checkpoint.every == 0 or step == cfg.steps or run.signals.caught is not None:
                    save(run, state, step)
                if run.signals.caught is not None:
                    return interrupted(run, step)
            return finish(run, state)
        except OSError as e:  # a full disk anywhere in the run (metrics, TensorBoard, caches): one line
            if is_no_space(e):
                raise no_space(getattr(e, "filename", None) or workdir, e) from None
            raise


def init(cfg: TrainConfig, workdir: str, verbose: bool, stack: contextlib.ExitStack) -> _Run:
    """Checks, the workdir lock, the data, the program and the checkpointer; nothing written but the lock."""
    nproc, main = jax.process_count(), jax.process_index() == 0
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if (verbose and main) else (lambda *a: None)
    run = _Run(cfg, os.path.abspath(workdir), log, verbose, nproc, main, stack)
    run.mesh = S.make_mesh(cfg.mesh)
    shards, micro = S.batch_shards(run.mesh), cfg.batch_size // cfg.optim.grad_accum
    if micro % shards:
        raise UserError(f"batch_size={cfg.batch_size} (micro-batch {micro} with optim.grad_accum="
                        f"{cfg.optim.grad_accum}) is not divisible by the {shards} data shards "
                        f"(mesh.data*mesh.fsdp): use a multiple of {shards * cfg.optim.grad_accum}")
    if cfg.batch_size % nproc:
        raise UserError(f"batch_size={cfg.batch_size} does not split over {nproc} processes: use a multiple of {nproc}")
    _open_workdir(run)
    # data before compiling: missing data fails early; a prepared dataset is opened by its manifest only
    run.it = D.train_iterator(cfg.data, None, cfg.batch_size, jax.process_index(), nproc, log=run.log)
    stack.callback(run.it.close)
    D.check_vocab(run.it.sources, cfg.model.vocab_size)
    run.tok = D.dataset_tokenizer(run.it.sources[0])  # for bits per byte (None: unknown)
    run.heldout = D.heldout_streams(run.it.sources) or None
    _precheck(run)
    run.program = TS.build(cfg, run.mesh)  # model, optimizer, state shardings, jitted step (shared with aot.py)
    # opened (and so tidied) only once the checks have passed
    warn = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)  # also when quiet
    run.ckpt = C.Checkpointer(run.workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=warn)
    stack.push(lambda typ, *_: run.ckpt.close(quiet=typ is not None))
    run.signals = stack.enter_context(_Signals())
    return run


def _open_workdir(run: _Run) -> None:
    """Check the path, create it, take the lock (process 0); an unstarted run leaves no new directory."""
    wd = run.workdir
    if os.path.exists(wd) and not os.path.isdir(wd):
        raise UserError(f"--workdir {wd} is a file: pass a directory (new or a run's workdir)")
    created = not os.path.exists(wd)
    try:
        os.makedirs(wd, exist_ok=True)
    except OSError as e:
        raise UserError(f"--workdir {wd} cannot be created ({e.strerror}): pass a writable directory") from None
    if created and run.main:  # runs after the lock is released (registered first)
        run.stack.callback(_remove_if_unstarted, run)
    err = None
    if run.main:
        try:
            run.stack.enter_context(WorkdirLock(wd))
        except UserError as e:
            err = e
    if _agree(run.nproc, err is not None)[0]:
        raise err or UserError(f"process 0 could not lock {wd}: see its message")


def _remove_if_unstarted(run: _Run) -> None:
    if not run.started:
        for d in (os.path.join(run.workdir, C.CKPT_DIR), run.workdir):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only if empty


def _precheck(run: _Run) -> None:
    """The resume rules on the newest step with readable metadata, before anything is loaded (restore
    checks each step it tries again)."""
    ckpt_dir = os.path.join(run.workdir, C.CKPT_DIR)
    for step in reversed(C.complete_steps(ckpt_dir)):
        try:
            meta = C.read_step_meta(os.path.join(ckpt_dir, str(step)))
        except C.Damaged:
            continue  # restore moves it aside
        resume.check(run.workdir, step, meta, run.cfg, run.it.fingerprint)
        return


# ---- restore -----------------------------------------------------------------------------------
def restore(run: _Run) -> dict:
    """The train state: the newest intact checkpoint's, or fresh (random or ``init_from``)."""
    program, cfg = run.program, run.cfg

    def accept(step: int, meta: dict) -> None:
        run.accepted = resume.check(run.workdir, step, meta, cfg, run.it.fingerprint)

    with S.activate(run.mesh):
        got = run.ckpt.restore(program.abstract_state, accept)
    if got is None:
        return _fresh(run)
    run.resume_step, state, data_state, meta = got
    run.saved_summary = meta.get("summary") or {}
    if resume.restarts_data(run.accepted):
        run.log("data position starts afresh: the data stream or batch changed")
    else:
        run.it.set_state(data_state, data_changed=resume.changes_data(run.accepted))
    run.log(f"resumed from {run.ckpt.dir}/{run.resume_step} (data batch {run.it.next_batch})")
    run.start = run.resume_step
    return state


def _fresh(run: _Run) -> dict:
    cfg, program = run.cfg, run.program
    rng = jax.random.PRNGKey(cfg.seed)
    if cfg.init_from:
        host_params, run.init_note = R.init_from(cfg.init_from, cfg.model, jax.random.fold_in(rng, 1))
        init_fn = lambda r: TS.new_state(host_params, program.tx, cfg.freeze_backbone, r)  # noqa: E731
    else:
        init_fn = lambda r: TS.new_state(M.init_params(program.model, r), program.tx, cfg.freeze_backbone, r)  # noqa: E731
    with S.activate(run.mesh):
        state = jax.jit(init_fn, out_shardings=program.state_shardings)(rng)
    if run.init_note:
        run.log(run.init_note["init"])
    if cfg.keep_data_position:
        run.it.set_state(_data_position_of(cfg.init_from))
        run.log(f"data position continued from {cfg.init_from} (batch {run.it.next_batch})")
    return state


def _data_position_of(path: str) -> dict:
    why = None
    if loading.kind_of(path) not in ("workdir", "step"):
        why = "a saved model or Hugging Face directory holds none"
    else:
        try:
            return C.read_step_data(loading.step_dir(path))
        except (UserError, C.Damaged) as e:
            why = str(e)
    raise UserError(f"keep_data_position=true but init_from={path} has no data position ({why}): "
                    f"drop keep_data_position")


def begin(run: _Run, state: dict) -> None:
    """The run is on: config.yaml, the metrics (past the resumed step dropped), the progress display."""
    cfg = run.cfg
    if run.main:
        write_text(os.path.join(run.workdir, "config.yaml"), cfg.to_yaml())
    run.writer = MetricsWriter(run.workdir, enabled=run.main, resume_step=run.resume_step)
    run.stack.callback(run.writer.close)
    run.started = True
    params = TS.full_params(state)
    n = M.count_params(params)
    run.log(f"model: P={cfg.model.parscale_n}, {n:,} params ({M.count_params(params, non_embedding=True):,} "
            f"non-embedding); mesh {dict(run.mesh.shape)}; {jax.device_count()} devices, {run.nproc} processes; "
            f"dtype {cfg.dtype}")
    if cfg.freeze_backbone:
        run.log(f"backbone frozen: optimizer state {_nbytes(state['opt_state']) / 2**20:.2f} MiB, "
                f"{2 * _nbytes(state['frozen']) / 2**20:.2f} MiB (Adam moments of the backbone) not allocated")
    if run.accepted:
        run.log(f"resuming with changed settings (allow_changed): {'; '.join(run.accepted)}")
        run.writer.write(run.start, event="resume", changes=run.accepted)
    peak, src = (cfg.peak_flops, "config peak_flops") if cfg.peak_flops else F.device_peak_flops()
    run.clock.update(peak_total=peak * jax.device_count(), flops_tok=F.train_flops_per_token(cfg.model, cfg.data.seq_len))
    if run.start == 0:
        run.writer.write(0, event="start", params=n, peak_flops=peak, peak_source=src, devices=jax.device_count(),
                         processes=run.nproc, **run.init_note)
    run.progress = Progress(cfg.steps, run.start, desc="train", enabled=run.verbose and run.main)
    run.stack.callback(run.progress.end)
    run.clock["t_start"] = time.perf_counter()


def _nbytes(tree) -> int:
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ---- step --------------------------------------------------------------------------------------
def step_once(run: _Run, state: dict, step: int) -> dict:
    """Dispatch one step; read the previous one's metrics; log, evaluate (also at the last step,
    before its save), and stop on a failed save or a signal (on any process)."""
    cfg, program = run.cfg, run.program
    t0 = time.perf_counter()
    batch = next(run.it)["tokens"]
    run.clock["wait"] = run.clock.get("wait", 0.0) + time.perf_counter() - t0  # the step waited for data
    gbatch = jax.make_array_from_process_local_data(program.batch_sharding, batch,
                                                    (cfg.batch_size, cfg.data.seq_len + 1))
    with S.activate(run.mesh):
        state, metrics = program.step(state, gbatch)
    if "compile_s" not in run.clock:
        jax.block_until_ready(metrics["loss"])
        now = time.perf_counter()
        run.clock.update(compile_s=now - run.clock["t_start"], t_first=now, s_first=step, t_window=now,
                         s_window=step, wait=0.0)
        run.log(f"compiled and ran the first step in {run.clock['compile_s']:.1f}s")
        run.progress.begin(step)
    _flush(run)
    run.pending = (step, metrics)
    if step % cfg.log_every == 0 or step == cfg.steps:
        _log_step(run, step)
    if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
        _flush(run)
        evaluate(run, state, step)
    err = run.ckpt.poll()
    sig, failed = _agree(run.nproc, run.signals.caught or 0, err is not None)
    if failed:
        raise err or RunFailed("another process could not write its checkpoint: see its message")
    run.signals.caught = sig or None
    return state


def _flush(run: _Run) -> None:
    if run.pending is not None:
        _consume(run, *run.pending)
        run.pending = None


def _consume(run: _Run, step: int, m: dict) -> float:
    loss = float(m["loss"])
    if not bool(m["finite"]):
        if run.cfg.nan_policy == "stop":
            raise UserError(_nonfinite(step, m))
        run.writer.write(step, skipped_nonfinite=True, loss=loss)
        run.progress.message(f"step {step}: non-finite {'params' if np.isfinite(loss) else 'loss'}, update skipped")
    run.losses.append((step, loss))
    return loss


def _nonfinite(step: int, m: dict) -> str:
    loss, gn, lr = float(m["loss"]), float(m["grad_norm"]), float(m.get("lr", float("nan")))
    if np.isfinite(loss) and np.isfinite(gn) and not bool(m["params_finite"]):
        what = f"the update of step {step} made the params NaN/Inf (loss {loss:.4g}, grad norm {gn:.4g}, lr {lr:.4g})"
    else:
        what = f"loss is {loss} (grad norm {gn}) at step {step}"
    return (f"{what}: training stopped (no checkpoint written for it); lower optim.lr or raise optim.warmup_steps, "
            f"or set nan_policy=skip to drop such steps")


def _log_step(run: _Run, step: int) -> None:
    step_, metrics = run.pending
    loss = _consume(run, step_, metrics)
    run.pending = None
    c, now = run.clock, time.perf_counter()
    tps = mfu = wait = wait_frac = None
    if step > c["s_window"]:
        tps = (step - c["s_window"]) * run.tokens_per_step / (now - c["t_window"])
        mfu = c["flops_tok"] * tps / c["peak_total"]
        wait, wait_frac = c.get("wait", 0.0) / (step - c["s_window"]), c.get("wait", 0.0) / (now - c["t_window"])
    c.update(t_window=now, s_window=step, wait=0.0)
    run.writer.write(step, loss=loss, lr=float(metrics["lr"]), grad_norm=float(metrics["grad_norm"]),
                     tokens_per_s=tps, mfu=mfu, tokens=step * run.tokens_per_step, data_wait_s=wait,
                     data_wait_fraction=wait_frac)
    run.progress.update(step, **progress_values(loss, tps, mfu))
    if tps:
        run.last.update(tokens_per_s=tps, mfu=mfu)


def evaluate(run: _Run, state: dict, step: int) -> None:
    """The held-out loss (``evaluate.heldout_loss``, what eval.py computes) when there is a held-out
    split; with a mixture, each source's beside the total (over all their scored tokens)."""
    if not run.heldout:
        return
    cfg, params = run.cfg, TS.full_params(state)
    per = [(name, E.heldout_loss(run.program.model, params, stream, cfg.data.seq_len, cfg.eval_batch_size,
                                 max_windows=cfg.eval_windows or None, tokenizer=run.tok))
           for name, stream in run.heldout]
    tokens = sum(r["tokens"] for _, r in per)
    loss = sum(r["nll"] for _, r in per) / tokens
    n_bytes = sum(r["bytes"] or 0 for _, r in per) if all(r["bytes"] for _, r in per) else None
    bpb = E.bits_per_byte(loss, tokens, n_bytes)
    extra = {}
    if cfg.data.mixture:
        for key, (_, r) in zip(_source_keys([n for n, _ in per]), per):
            extra[f"eval_loss/{key}"] = r["loss"]
            if r["bits_per_byte"] is not None:
                extra[f"eval_bpb/{key}"] = r["bits_per_byte"]
    run.writer.write(step, eval_loss=loss, eval_bpb=bpb, eval_tokens=tokens, **extra)
    each = "".join(f"; {k.split('/', 1)[1]} {v:.4f}" for k, v in extra.items() if k.startswith("eval_loss/"))
    run.progress.message(f"step {step}: held-out loss {loss:.4f}" + (f", {bpb:.4f} bits/byte" if bpb else "") + each)
    run.last.update(eval_step=step, eval_loss=loss, eval_bpb=bpb, eval_tokens=tokens)


def _source_keys(names: list[str]) -> list[str]:
    """Short metric names of the mixture's sources: the last path component (numbered when equal)."""
    base = [os.path.basename(os.path.normpath(n)) or n for n in names]
    return [b if base.count(b) == 1 else f"{b}{i}" for i, b in enumerate(base)]


# ---- save and the ends -------------------------------------------------------------------------
def save(run: _Run, state: dict, step: int) -> None:
    """Save ``step`` (asynchronously): its metrics read first, free space checked on every process."""
    _flush(run)
    err = run.ckpt.settle()  # the previous save is over (orbax would wait for it too): its failure first
    problem = None if err else run.ckpt.space_problem(step)
    failed, full = _agree(run.nproc, err is not None, problem is not None)
    if failed or full:
        raise err or RunFailed(problem or "another process could not write a checkpoint or found too little "
                               "free space for the next one: see its message")
    cfg = run.cfg
    meta = {"model": cfg.model.to_dict(), "step": step, "freeze_backbone": cfg.freeze_backbone,
            "config": cfg.to_dict(), "summary": _recorded(run, step), "data_fingerprint": run.it.fingerprint}
    run.ckpt.save(step, state, run.it.get_state(), meta)
    if run.signals.caught is not None:
        run.progress.message(f"checkpoint {step} saved (signal)")


def _mean_tokens_per_s(run: _Run, step: int) -> float | None:
    c = run.clock
    if "t_first" not in c or step <= c["s_first"]:
        return None
    return (step - c["s_first"]) * run.tokens_per_step / (time.perf_counter() - c["t_first"])


def _recorded(run: _Run, step: int) -> dict:
    """What a checkpoint records of the run so far (a finished run's summary comes from here)."""
    ev = {k: run.last.get(k) for k in ("eval_loss", "eval_bpb", "eval_tokens")} \
        if run.last.get("eval_step") == step else {}
    return {"mean_tokens_per_s": _mean_tokens_per_s(run, step), "tokens_per_s": run.last.get("tokens_per_s"),
            "compile_s": run.clock.get("compile_s"), **ev}


def _summary(run: _Run, step: int, **extra: Any) -> TrainSummary:
    params = run.program.abstract_state["params"] | run.program.abstract_state.get("frozen", {})
    ran = step > run.start
    rec = {} if ran else run.saved_summary
    return TrainSummary(
        P=run.cfg.model.parscale_n, params=M.count_params(params), non_embedding_params=M.count_params(
            params, non_embedding=True), start_step=run.start, step=step, losses=run.losses,
        tokens=step * run.tokens_per_step, compile_s=run.clock.get("compile_s", rec.get("compile_s")),
        elapsed_s=time.perf_counter() - run.clock["t_start"],
        tokens_per_s=run.last.get("tokens_per_s", rec.get("tokens_per_s")), mfu=run.last.get("mfu"),
        mean_tokens_per_s=_mean_tokens_per_s(run, step) if ran else rec.get("mean_tokens_per_s"),
        eval_loss=run.last.get("eval_loss", rec.get("eval_loss")), eval_bpb=run.last.get("eval_bpb", rec.get("eval_bpb")),
        eval_tokens=run.last.get("eval_tokens", rec.get("eval_tokens")), changes=run.accepted, **extra)


def interrupted(run: _Run, step: int) -> TrainSummary:
    run.ckpt.wait()
    run.progress.end()
    run.log(f"caught signal {run.signals.caught}: checkpoint {step} written; resume with the same command")
    return _summary(run, step, interrupted=True)


def finish(run: _Run, state: dict) -> TrainSummary:
    """Wait for the last save, add the P set to ``add_to``, write the end record."""
    cfg = run.cfg
    run.ckpt.wait()
    run.progress.end()
    if cfg.add_to and run.main:
        R.add_set_to(cfg.add_to, cfg.model, TS.full_params(jax.device_get(state)))
        run.log(f"added the P={cfg.model.parscale_n} prefix/aggregator set to {cfg.add_to}")
    summary = _summary(run, cfg.steps)
    if cfg.steps > run.start:
        run.writer.write(cfg.steps, event="end", elapsed_s=summary.elapsed_s, compile_s=summary.compile_s,
                         mean_tokens_per_s=summary.mean_tokens_per_s, eval_loss=summary.eval_loss,
                         eval_bpb=summary.eval_bpb, eval_tokens=summary.eval_tokens)
    run.log(f"done: {cfg.steps} steps" + (f" ({cfg.steps - run.start} in {fmt_duration(summary.elapsed_s)})"
                                          if cfg.steps > run.start else ", already complete")
            + (f", held-out loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""))
    return summary
