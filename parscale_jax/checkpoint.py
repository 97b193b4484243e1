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

**Integrity.** Every save records checksums of what it wrote (``meta["integrity"]`` of a training
step, ``"integrity"`` in ``model_config.json``): two 32-bit sums per array over the bits of its
elements (their plain sum and their sum weighted by position, both mod 2**32), computed on the
devices for a sharded train state and in NumPy on the host; exact integer arithmetic, so the
same for every mesh. Any change of a single byte changes the plain sum. JSON items carry a
SHA-256. A reader verifies them: a training run falls back to the newest intact step (the
damaged ones are moved aside as ``<step>.damaged-<n>``, never deleted); eval.py and convert
stop with one line.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from parscale_jax.config import ModelConfig
from parscale_jax.errors import RunFailed, UserError
from parscale_jax.fileio import atomic_dir, fmt_bytes, free_bytes, is_no_space, tree_bytes, write_json

MODEL_CONFIG = "model_config.json"
CKPT_DIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"  # orbax writes it into a step before the final rename
INTEGRITY_VERSION = 1


# ---- integrity -------------------------------------------------------------------------------
class Damaged(Exception):
    """A checkpoint (or one of its items) fails to read or to match its checksums."""


def path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _bits_np(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        return a.astype(np.uint32).ravel()
    if a.dtype.itemsize not in (1, 2, 4):
        raise ValueError(f"no checksum for dtype {a.dtype}")
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize]).ravel()


def checksum_numpy(a: np.ndarray, chunk: int = 1 << 22) -> list[int]:
    """[sum of the element bits, sum of bits * (flat index + 1)], both mod 2**32 (see the module doc)."""
    b = _bits_np(np.asarray(a))
    c1 = c2 = 0
    for lo in range(0, b.size, chunk):
        part = b[lo: lo + chunk].astype(np.uint64)
        w = np.arange(lo + 1, lo + 1 + part.size, dtype=np.uint64) % np.uint64(2**32)
        c1 = (c1 + int(part.sum(dtype=np.uint64))) % 2**32
        c2 = (c2 + int(((part * w) % np.uint64(2**32)).sum(dtype=np.uint64))) % 2**32
    return [c1, c2]


def _sums(x: jax.Array) -> jax.Array:
    """The device version of :func:`checksum_numpy` plus the count of non-finite elements."""
    if x.dtype == jnp.bool_:
        b = x.astype(jnp.uint32)
    else:
        b = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        b = b.astype(jnp.uint32)
    w = jnp.arange(b.size, dtype=jnp.uint32).reshape(b.shape) + jnp.uint32(1)
    bad = jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros((), jnp.int32)
    return jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * w, dtype=jnp.uint32), bad.astype(jnp.uint32)])


@functools.lru_cache(maxsize=4)
def _sums_program(mesh) -> Callable:
    out = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    return jax.jit(lambda xs: [_sums(x) for x in xs], out_shardings=out)


def array_checksums(tree: Any) -> dict[str, tuple[list[int], int]]:
    """{path: ([c1, c2], non-finite elements)} of every array of a (sharded) pytree, computed on its devices."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    mesh = next((x.sharding.mesh for _, x in leaves if isinstance(getattr(x, "sharding", None), NamedSharding)), None)
    sums = _sums_program(mesh)([x for _, x in leaves])
    got = [np.asarray(s.addressable_shards[0].data if hasattr(s, "addressable_shards") else s) for s in sums]
    return {path_name(p): ([int(g[0]), int(g[1])], int(g[2])) for (p, _), g in zip(leaves, got)}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def with_integrity(meta: dict, arrays: dict[str, list[int]], data_state: Any = None) -> dict:
    """``meta`` plus its ``integrity`` record (array sums, the data item's and its own digest)."""
    rec = {"version": INTEGRITY_VERSION, "arrays": arrays}
    if data_state is not None:
        rec["data"] = _digest(data_state)
    rec["meta"] = _digest({k: v for k, v in meta.items() if k != "integrity"})
    return {**meta, "integrity": rec}


def check_meta_digest(meta: dict) -> None:
    rec = meta.get("integrity") if isinstance(meta, dict) else None
    if isinstance(rec, dict) and rec.get("meta") != _digest({k: v for k, v in meta.items() if k != "integrity"}):
        raise Damaged("its metadata does not match its checksum")


def check_arrays(got: dict[str, list[int]], meta: dict, scope: tuple[str, ...] | None = None) -> None:
    """Compare array sums with those recorded in ``meta``: every recorded array within ``scope``
    (path prefixes; None: all) must be there and match. :class:`Damaged` names the first that does not."""
    want = (meta.get("integrity") or {}).get("arrays") if isinstance(meta, dict) else None
    if not isinstance(want, dict):
        return  # written before checksums were recorded
    for name in sorted(want):
        if scope is not None and not name.startswith(scope):
            continue
        if name not in got:
            raise Damaged(f"array {name} is missing")
        if list(got[name]) != list(want[name]):
            raise Damaged(f"array {name} does not match its checksum")


def write_params(folder: str, cfg: ModelConfig, params: Any, extra: dict | None = None) -> None:
    """Write a model checkpoint's files (``params/``, ``model_config.json`` with the checksums) into ``folder``."""
    params = jax.device_get(params)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(os.path.join(folder, "params"), params)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    sums = {path_name(p): checksum_numpy(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    meta = {"model": cfg.to_dict(), **{k: v for k, v in (extra or {}).items() if k != "integrity"}}
    write_json(os.path.join(folder, MODEL_CONFIG), with_integrity(meta, sums))


def save_params(out_dir: str, cfg: ModelConfig, params: Any, extra: dict | None = None,
                replace: bool = False) -> str:
    """Write a standalone model checkpoint at ``out_dir`` atomically (``replace``: swap an existing one)."""
    with atomic_dir(out_dir, replace=replace) as tmp:
        write_params(tmp, cfg, params, extra)
    return os.path.abspath(out_dir)


def check_files(path: str) -> None:
    """The files an orbax pytree directory cannot be read without (:class:`Damaged` names a missing one)."""
    need = ["_METADATA"]
    if any(n.startswith("ocdbt.process_") for n in os.listdir(path)) if os.path.isdir(path) else False:
        need.append("manifest.ocdbt")
    for n in need:
        if not os.path.isfile(os.path.join(path, n)):
            raise Damaged(f"{os.path.basename(path)}/{n} is missing")


def restore_numpy(path: str, keep: tuple[str, ...] | None = None) -> Any:
    """Restore an orbax pytree as host numpy arrays, independent of the devices that saved it.
    ``keep``: only these top-level keys (the rest is not read)."""
    check_files(path)
    _quiet_orbax_leftovers()
    ckptr = ocp.PyTreeCheckpointer()
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # an item inside a manager step has no step metadata: expected
    try:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
        tree = dict(tree)
        if keep is not None:
            tree = {k: v for k, v in tree.items() if k in keep}
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        out = ckptr.restore(path, args=ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)) \
            if keep is not None else ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # a missing or damaged file: orbax and tensorstore raise many kinds
        raise Damaged(_reason(e)) from None
    finally:
        absl_log.setLevel(level)
        ckptr.close()
    return jax.tree.map(np.asarray, out)


def _quiet_orbax_leftovers() -> None:
    """An orbax read or write that fails on one array (a truncated or missing file, a full disk)
    leaves its operations on the others in flight: their coroutines are dropped unfinished or finish
    into orbax's closed event loop, and Python reports each as an unraisable exception (hundreds of
    traceback lines around our one-line error, at a moment that depends on the garbage collector).
    Drop exactly those: unraisables raised in orbax's own coroutines, and ``RuntimeError('Event
    loop is closed')``. Installed before a restore (the report may come before the error reaches
    us) and on a failed save; once."""
    prev = sys.unraisablehook
    if getattr(prev, "_parscale_quiet", False):
        return

    def hook(u):
        code = getattr(u.object, "cr_code", None) or getattr(u.object, "gi_code", None)
        in_orbax = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
        closed_loop = u.exc_type is RuntimeError and "Event loop is closed" in str(u.exc_value)
        if not (in_orbax or closed_loop):
            prev(u)

    hook._parscale_quiet = True
    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def verified_numpy(path: str, meta: dict, keep: tuple[str, ...] | None = None) -> Any:
    """:func:`restore_numpy` checked against the checksums recorded in ``meta``; :class:`Damaged` otherwise."""
    tree = restore_numpy(path, keep)
    sums = {path_name(p): checksum_numpy(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    check_arrays(sums, meta, None if keep is None else tuple(f"{k}/" for k in keep))
    return tree


def read_json_item(step_dir: str, name: str) -> dict:
    """A JSON item (``meta``, ``data``) of one step directory, read without orbax."""
    p = os.path.join(step_dir, name, "metadata")
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Damaged(f"its {name} item is unreadable ({type(e).__name__})") from None


# ---- training checkpoints ------------------------------------------------------------------
def complete_steps(ckpt_dir: str) -> list[int]:
    """Committed steps: directories named by an integer that hold orbax's commit marker (orbax's
    temporary directories, and a step cut off mid-write, mid-copy or mid-deletion, are excluded).
    The one place that says which steps exist; whether a step is intact is :meth:`Checkpointer.restore`'s
    (training) and :mod:`parscale_jax.loading`'s (reading) business."""
    if not os.path.isdir(ckpt_dir):
        return []
    return sorted(int(n) for n in os.listdir(ckpt_dir)
                  if n.isdigit() and os.path.isfile(os.path.join(ckpt_dir, n, COMMIT_MARKER)))


def read_step_meta(step_dir: str) -> dict:
    """The ``meta`` item of a step, checked against its own digest (:class:`Damaged` otherwise)."""
    meta = read_json_item(step_dir, "meta")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise Damaged("its meta item holds no model config")
    check_meta_digest(meta)
    return meta


def read_step_data(step_dir: str) -> dict:
    """The data position saved with a step (checked against its digest; :class:`Damaged` otherwise)."""
    data = read_json_item(step_dir, "data")
    want = (read_step_meta(step_dir).get("integrity") or {}).get("data")
    if want is not None and want != _digest(data):
        raise Damaged("its data item does not match its checksum")
    return data


def remove_unfinished(ckpt_dir: str) -> list[str]:
    """Remove what an interrupted save or deletion left: step directories without the commit
    marker and ``<step>.incomplete-<n>`` directories (an earlier version's name for them). Never
    resumable, never complete; damaged steps (``.damaged-<n>``) are kept. Returns the names."""
    gone = []
    if not os.path.isdir(ckpt_dir):
        return gone
    for n in sorted(os.listdir(ckpt_dir)):
        p = os.path.join(ckpt_dir, n)
        partial = n.isdigit() and not os.path.isfile(os.path.join(p, COMMIT_MARKER))
        if os.path.isdir(p) and (partial or ".incomplete-" in n):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(n)
    return gone


def set_aside(ckpt_dir: str, step: int) -> str:
    """Rename ``<step>`` to ``<step>.damaged-<n>`` (kept for inspection; never read again). Returns the new path."""
    p = os.path.join(ckpt_dir, str(step))
    i = 0
    while os.path.exists(f"{p}.damaged-{i}"):
        i += 1
    os.replace(p, f"{p}.damaged-{i}")
    return f"{p}.damaged-{i}"


def _warn(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _NoOrbaxErrors(logging.Filter):
    """Drops orbax's error logs (tracebacks of a failed save, from its background threads): the
    Checkpointer reports the failure itself, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


class Checkpointer:
    """Async, atomic, verified save / restore of (train state, data position, meta) under
    ``workdir/checkpoints``. Process 0 tidies the directory when it is opened (see
    :func:`remove_unfinished`); the caller holds the workdir lock."""

    def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, log: Callable = _warn):
        self.dir = os.path.join(os.path.abspath(workdir), CKPT_DIR)
        self.log = log
        if jax.process_index() == 0:
            gone = remove_unfinished(self.dir)
            if gone:
                log(f"removed {len(gone)} unfinished checkpoint director{'y' if len(gone) == 1 else 'ies'} "
                    f"(cut off while being written or deleted): {', '.join(gone)}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("parscale_jax: checkpoint directory tidied")
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                            enable_async_checkpointing=async_save)
        _quiet_orbax_leftovers()  # a failed save leaves tensorstore callbacks into a closed loop too
        self._quiet = _NoOrbaxErrors()
        logging.getLogger("absl").addFilter(self._quiet)
        self.mngr = ocp.CheckpointManager(self.dir, options=opts, item_names=("state", "data", "meta"))
        self._in_flight: int | None = None

    def all_steps(self) -> list[int]:
        """Complete steps only (with the commit marker; orbax on a POSIX path trusts any step directory)."""
        return complete_steps(self.dir)

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def read_meta(self, step: int) -> dict:
        return read_step_meta(os.path.join(self.dir, str(step)))


    # -- saving --
    def space_problem(self, step: int) -> str | None:
        """Why ``step`` cannot be saved for lack of space (free space below the newest saved
        step's size), or None. Only process 0 looks (the others return None)."""
        prev = self.latest_step()
        if jax.process_index() != 0 or prev is None:
            return None
        need, free = tree_bytes(os.path.join(self.dir, str(prev))), free_bytes(self.dir)
        if free is None or free >= need:
            return None
        return (f"not enough free space to save checkpoint {step} in {self.dir} ({fmt_bytes(free)} free, checkpoint "
                f"{prev} took {fmt_bytes(need)}): checkpoint {prev} is intact (the run resumes from it); free space "
                f"(or lower checkpoint.keep), then run the same command again")

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Start saving ``step`` (asynchronously with ``async_save``), its checksums in ``meta``."""
        sums = {k: v[0] for k, v in array_checksums(state).items()}
        meta = with_integrity(meta, sums, data_state)
        try:
            self.mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise self._failed(step, e) from None
        self._in_flight = step

    def _failed(self, step: int, e: BaseException) -> RunFailed:
        prev = [s for s in self.all_steps() if s != step]
        kept = f"checkpoint {prev[-1]} is intact (the run resumes from it)" if prev else "no earlier checkpoint exists"
        full = is_no_space(e)
        why = "no space left on device" if full else _reason(e)
        return RunFailed(f"checkpoint {step} could not be written to {self.dir} ({why}; {fmt_bytes(free_bytes(self.dir))} "
                         f"free): {kept}; {'free space' if full else 'fix the cause'}, then run the same command again")

    def poll(self) -> RunFailed | None:
        """The error of the save in flight if it has failed by now (never blocks)."""
        if self._in_flight is None or self.mngr.is_saving_in_progress():
            return None
        return self.settle()

    def settle(self) -> RunFailed | None:
        """Wait for the save in flight; its error, if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:
            return self._failed(step if step is not None else -1, e)
        return None

    def wait(self) -> None:
        """Wait for the save in flight; a failure is a :class:`RunFailed`."""
        err = self.settle()
        if err is not None:
            raise err

    # -- restoring --
    def _restore_one(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        check_files(os.path.join(self.dir, str(step), "state"))
        _quiet_orbax_leftovers()
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:
                raise Damaged(_reason(e)) from None
        return out["state"], out["data"]

    def restore(self, abstract_state: Any, accept: Callable[[int, dict], None] | None = None
                ) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data position, meta) of the newest intact step, restored onto the shardings
        of ``abstract_state`` (any mesh or device count); None when there is no step.

        Each candidate, newest first: its meta is read and checked, ``accept(step, meta)`` may
        refuse it (a UserError), its arrays and data item are restored and compared with their
        checksums. Damaged steps newer than the one used are moved aside with a warning; when no
        step is intact, nothing is moved and a UserError names them."""
        damaged: list[tuple[int, str]] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
                if accept is not None:
                    accept(step, meta)
                state, data = self._restore_one(step, abstract_state)
                sums = array_checksums(state)
                check_arrays({k: v[0] for k, v in sums.items()}, meta)
                want = (meta.get("integrity") or {}).get("data")
                if want is not None and want != _digest(data):
                    raise Damaged("its data item does not match its checksum")
            except Damaged as e:
                damaged.append((step, str(e)))
                continue
            self._set_aside(damaged, step)
            bad = [k for k, (_, n) in sums.items() if n and k.startswith(("params/", "frozen/"))]
            if bad:
                raise UserError(f"checkpoint {step} in {self.dir} holds NaN/Inf params ({bad[0]}; its checksums "
                                f"match, so it was saved that way): resume from an earlier step (move "
                                f"{os.path.join(self.dir, str(step))} aside) or start a new run")
            return step, state, data, meta
        if damaged:
            raise UserError(f"no intact checkpoint in {self.dir}: " + "; ".join(
                f"step {s} is damaged ({why})" for s, why in damaged) + ": restore the files, or start afresh "
                "in a new --workdir (nothing was moved)")
        return None

    def _set_aside(self, damaged: list[tuple[int, str]], used: int) -> None:
        if not damaged:
            return
        for step, why in damaged:
            moved = set_aside(self.dir, step) if jax.process_index() == 0 else "(process 0 moves it)"
            self.log(f"warning: checkpoint {step} is damaged ({why}): moved aside to {moved}; "
                     f"resuming from checkpoint {used}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("parscale_jax: damaged checkpoints moved aside")
        self.mngr.reload()

    def close(self, quiet: bool = False) -> None:
        """Wait for the save in flight and release orbax's threads. ``quiet``: an error is already
        on its way out, so a failing save in flight is not raised again."""
        err = self.settle()
        try:
            self.mngr.close()
        finally:
            logging.getLogger("absl").removeFilter(self._quiet)
        if err is not None and not quiet:
            raise err
