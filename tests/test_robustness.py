"""Acceptance tests of issue 15 (robustness): one run per workdir, checkpoints verified before they
are trusted, a full disk as one line, bad input as one line with nothing written, workers that die
with the trainer; and the resume rules.

Every check compares against an independent computation: the undisturbed reference run (bitwise,
the whole train state), checksums computed here in pure Python, closed-form learning rates, the
process table read from /proc, the files of the workdir before and after.

Cost control: one reference run per module; the runs that continue or damage it are copies of its
workdir, and the ones that need no process of their own run one after another in a single helper
process (``python tests/test_robustness.py runs JSON``, bottom of the file) that shares a persistent
compilation cache with the others. Input errors are checked in-process: they stop before anything
is compiled.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from test_train import Job, closed_form_lr, one_line_error, slow_data_after, sub_env, write_corpus

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["model.preset=tiny", "model.parscale_n=2", "data.seq_len=32", "batch_size=8", f"steps={STEPS}",
          "log_every=1", "data.heldout_fraction=0", "dtype=float32", "optim.lr=1e-2", "optim.warmup_steps=2",
          "checkpoint.every=2", "checkpoint.keep=3"]
DAMAGES = ("flip", "truncate", "metadata")


# ---- helpers --------------------------------------------------------------------------------------
def state_of(step_dir: Path) -> dict[str, np.ndarray]:
    """Every array of a step's train state (params, optimizer state, step, RNG), read with orbax here."""
    import jax

    from parscale_jax.checkpoint import restore_numpy

    tree = restore_numpy(str(step_dir / "state"))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = state_of(a), state_of(b)
    assert sa.keys() == sb.keys() and len(sa) > 20
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def committed(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and (d / n / "commit_success.txt").is_file())


def damage(step_dir: Path, how: str) -> str:
    """Damage a step the way the issue lists: one byte flipped in the largest array file, that file
    cut to half, or the state's _METADATA deleted. Returns what was done."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    if how == "flip":
        b = bytearray(big.read_bytes())
        b[len(b) // 2] ^= 0x10
        big.write_bytes(bytes(b))
    elif how == "truncate":
        big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    else:
        big = step_dir / "state" / "_METADATA"
        big.unlink()
    return f"{how} {big}"


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under ``root``: what a refused run must leave as it was."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def records(metrics: Path) -> list[dict]:
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def losses_of(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in records(metrics) if "loss" in r]


def helper(env, name: str, scenarios: list[dict]) -> dict:
    """Run scenarios in one helper process (see the bottom); {name: {"rc", "err"}}."""
    out = env["root"] / f"{name}.json"
    job = Job([__file__, "runs", json.dumps({"out": str(out), "scenarios": scenarios})],
              sub_env(1, env["cache"]), env["root"] / name)
    rc, _, err = job.result()
    assert rc == 0, err[-3000:]
    return json.loads(out.read_text())


def argv(workdir: Path, env, *extra: str) -> list[str]:
    return ["--workdir", str(workdir), "--quiet", *COMMON, *env["data"], *extra]


# ---- module fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    src = write_corpus(root / "corpus")
    return {"root": root, "cache": root / "jax-cache", "data": [f"data.source={src}"]}


@pytest.fixture(scope="module")
def runs(env):
    """The reference run R, then in the same helper process: copies of R with the newest step damaged
    (flip / truncate / metadata), each re-run to the same steps; a copy resumed with steps=8 accepted
    by --allow-changed; a copy resumed with a changed optim.lr (refused)."""
    root = env["root"]
    scen = [{"name": "R", "argv": argv(root / "R", env)}]
    for how in DAMAGES:
        scen.append({"name": how, "copy": [str(root / "R"), str(root / how)], "damage": how,
                     "argv": argv(root / how, env)})
    scen.append({"name": "longer", "copy": [str(root / "R"), str(root / "longer")],
                 "argv": argv(root / "longer", env, "steps=8", "--allow-changed", "steps")})
    return {"root": root, "R": root / "R", "out": helper(env, "runs", scen)}


# ---- the reference run ----------------------------------------------------------------------------
@pytest.mark.slow
def test_reference_run(runs):
    r = runs["out"]["R"]
    assert r["rc"] == 0 and r["err"] == "", r["err"]
    assert committed(runs["R"]) == [2, 4, 6]
    assert not (runs["R"] / "train.lock").exists()
    steps = [s for s, _ in losses_of(runs["R"] / "metrics.jsonl")]
    assert steps == list(range(1, STEPS + 1))


# ---- 2. damaged checkpoints -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_newest_step_falls_back_and_retrains_bitwise(runs, how):
    r, wd = runs["out"][how], runs["root"] / how
    assert r["rc"] == 0, r["err"]
    lines = r["err"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint 6 is damaged") and "6.damaged-0" in lines[0] \
        and "resuming from checkpoint 4" in lines[0], lines
    assert committed(wd) == [2, 4, 6]
    assert (wd / "checkpoints" / "6.damaged-0" / "state").is_dir()  # moved aside, never deleted
    assert_same_state(wd / "checkpoints" / "6", runs["R"] / "checkpoints" / "6")
    # metrics: every step once, the re-trained steps with the reference's losses
    assert losses_of(wd / "metrics.jsonl") == losses_of(runs["R"] / "metrics.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["metadata", "model-flip", "model-truncate"])
def test_eval_and_convert_on_a_damaged_checkpoint_one_line(runs, how, tmp_path, capsys):
    """They verify the arrays they read (the params): a training step without its _METADATA; a saved
    model (params only, so any damage hits them) with a byte flipped in, or half cut off, its largest file."""
    from parscale_jax import checkpoint as C
    from parscale_jax import convert, loading
    from parscale_jax.cli import eval as eval_cli

    if how.startswith("model"):
        ckpt = tmp_path / "model"
        C.save_params(str(ckpt), *loading.load(str(runs["R"])))
        big = max((p for p in (ckpt / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        b = bytearray(big.read_bytes())
        if how == "model-flip":
            b[len(b) // 2] ^= 0x10
        big.write_bytes(bytes(b) if how == "model-flip" else bytes(b[: len(b) // 2]))
        where = "model is damaged"
    else:
        ckpt = tmp_path / "w"
        shutil.copytree(runs["R"], ckpt)
        damage(ckpt / "checkpoints" / "6", how)
        where = "checkpoints/6 is damaged"
    for main, args in ((eval_cli.main, ["--checkpoint", str(ckpt), "--max-windows", "1"]),
                       (convert.main, ["to-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")])):
        capsys.readouterr()
        line = one_line_error(main(args), capsys.readouterr().err)
        assert where in line, line
    assert not (tmp_path / "hf").exists()


def test_leftovers_of_an_aborted_orbax_read_are_dropped_and_nothing_else(monkeypatch):
    """A truncated array file makes orbax drop its other reads unfinished; Python reports each as an
    unraisable exception from an orbax coroutine (seen as 450 lines around the one-line warning).
    Those, and "Event loop is closed", are dropped; any other unraisable still reaches the hook."""
    import types

    from parscale_jax import checkpoint as C

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    C._quiet_orbax_leftovers()
    C._quiet_orbax_leftovers()  # installed once: the second call does not wrap the first

    def coroutine_in(folder: str):
        ns: dict = {}
        exec(compile("async def _read():\n    pass\n", os.path.join(os.sep, "site", folder, "x.py"), "exec"), ns)
        return ns["_read"]()

    def report(obj, exc):
        sys.unraisablehook(types.SimpleNamespace(object=obj, exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                                 err_msg=None))

    ours, theirs = coroutine_in("orbax"), coroutine_in("elsewhere")
    try:
        report(ours, ValueError("tensorstore: truncated"))
        report(None, RuntimeError("Event loop is closed"))
        report(theirs, ValueError("a real problem"))
        report(None, RuntimeError("another problem"))
    finally:
        ours.close()
        theirs.close()
    assert [str(u.exc_value) for u in seen] == ["a real problem", "another problem"]


def test_checksums_match_an_independent_computation_and_see_every_byte():
    """Device sums (jax) and host sums (numpy) equal the definition computed in pure Python, and a
    change of any single byte of an array changes them."""
    import jax.numpy as jnp
    import ml_dtypes

    from parscale_jax import checkpoint as C

    def by_definition(a: np.ndarray) -> list[int]:
        width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize] if a.dtype != np.bool_ else None
        bits = [int(x) for x in (a.astype(np.uint8) if width is None else a.view(width)).ravel()]
        return [sum(bits) % 2**32, sum(b * (i + 1) for i, b in enumerate(bits)) % 2**32]

    rng = np.random.default_rng(0)
    arrays = {"f32": rng.normal(size=(3, 5)).astype(np.float32), "bf16": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
              "i32": rng.integers(-2**31, 2**31 - 1, size=(4, 4), dtype=np.int32), "u32": np.asarray(2**32 - 1, np.uint32),
              "bool": rng.random(9) > 0.5, "big": np.full((1000,), np.float32(3e38))}
    device = C.array_checksums({k: jnp.asarray(v) for k, v in arrays.items()})
    for k, a in arrays.items():
        want = by_definition(a)
        assert C.checksum_numpy(a) == want, k
        assert device[k][0] == want, k
        assert device[k][1] == (int(np.sum(~np.isfinite(a))) if a.dtype.kind == "f" else 0), k
    a = arrays["f32"]
    raw = bytearray(a.tobytes())
    for i in range(len(raw)):
        for bit in (0, 7):
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            assert C.checksum_numpy(np.frombuffer(bytes(flipped), np.float32))[0] != C.checksum_numpy(a)[0], (i, bit)


# ---- 5. resume rules -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_allowed_change_is_applied_and_logged(runs):
    r, wd = runs["out"]["longer"], runs["root"] / "longer"
    assert r["rc"] == 0 and r["err"] == "", r["err"]
    recs = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    resume = [x for x in recs if x.get("event") == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == STEPS and resume[0]["changes"] == ["steps 6 -> 8"]
    lrs = {x["step"]: x["lr"] for x in recs if "lr" in x}
    want6, want8 = closed_form_lr("cosine", 1e-2, 2, 6, 0.1, 0.2), closed_form_lr("cosine", 1e-2, 2, 8, 0.1, 0.2)
    for s in (1, 6):
        assert math.isclose(lrs[s], want6[s - 1], rel_tol=1e-6)  # the first 6 steps: the schedule of steps=6
    for s in (7, 8):
        assert math.isclose(lrs[s], want8[s - 1], rel_tol=1e-6)  # after the resume: that of steps=8
    assert committed(wd) == [4, 6, 8]
    meta = json.loads((wd / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["config"]["steps"] == 8  # the next resume compares against the new value


def _refused(env, wd: Path, capsys, *extra: str) -> str:
    from parscale_jax.cli import train

    before = snapshot(wd)
    capsys.readouterr()
    line = one_line_error(train.main(argv(wd, env, *extra)), capsys.readouterr().err)
    assert snapshot(wd) == before, "a refused run wrote to the workdir"
    return line


@pytest.mark.slow
def test_changed_settings_and_steps_below_the_checkpoint_are_refused(runs, env, tmp_path, capsys):
    wd = tmp_path / "w"
    shutil.copytree(runs["R"], wd)
    line = _refused(env, wd, capsys, "optim.lr=5e-3", "optim.b2=0.99", "dtype=bfloat16")
    for want in ("optim.lr 0.01 -> 0.005", "optim.b2 0.95 -> 0.99", "dtype 'float32' -> 'bfloat16'",
                 "--allow-changed dtype optim.b2 optim.lr"):
        assert want in line, line
    line = _refused(env, wd, capsys, "optim.lr=5e-3", "--allow-changed", "optim.b2")  # lr still refused
    assert "optim.lr" in line and "optim.b2" not in line, line
    line = _refused(env, wd, capsys, "steps=4", "--allow-changed", "steps")
    assert "steps=4 is below the step of the newest checkpoint" in line and "(6)" in line, line
    line = _refused(env, wd, capsys, "--allow-changed", "optim.nosuch")
    assert "optim.nosuch" in line, line


def test_resume_rules_unit(tmp_path):
    """Which keys may change freely, which only when allowed (by key or section), which never."""
    from parscale_jax import resume, train_config
    from parscale_jax.errors import UserError

    saved = train_config.load(None, COMMON)
    meta = {"model": saved.model.to_dict(), "freeze_backbone": False, "config": saved.to_dict()}
    ok = train_config.load(None, [*COMMON, "mesh.data=1", "checkpoint.keep=1", "data.worker_count=2", "remat=full",
                                  "eval_every=3", "nan_policy=skip", "log_every=5"])
    assert resume.check("w", 6, meta, ok) == []
    changed = train_config.load(None, [*COMMON, "optim.lr=2e-2", "batch_size=16", "data.seed=3", "seed=1"])
    with pytest.raises(UserError, match="batch_size 8 -> 16; data.seed 0 -> 3; optim.lr 0.01 -> 0.02; seed 0 -> 1"):
        resume.check("w", 6, meta, changed)
    allowed = train_config.load(None, [*COMMON, "optim.lr=2e-2", "batch_size=16", "data.seed=3", "seed=1",
                                       "allow_changed=optim,data,batch_size seed"])
    got = resume.check("w", 6, meta, allowed)
    assert got == ["batch_size 8 -> 16", "data.seed 0 -> 3", "optim.lr 0.01 -> 0.02", "seed 0 -> 1"]
    assert resume.restarts_data(got) and not resume.restarts_data(["optim.lr 0.01 -> 0.02"])
    other = train_config.load(None, [*COMMON, "model.parscale_n=4", "allow_changed=model"])
    with pytest.raises(UserError, match="another model"):
        resume.check("w", 6, meta, other)


# ---- 1. one run per workdir -------------------------------------------------------------------------
@pytest.mark.slow
def test_second_run_on_a_busy_workdir_exits_2_naming_the_first(runs, env, capsys):
    from parscale_jax.cli import train

    wd = env["root"] / "busy"
    first = Job([__file__, "train", json.dumps({"slow_after": 1}), *argv(wd, env)], sub_env(1, env["cache"]),
                env["root"] / "busy")
    t0 = time.time()
    while not (wd / "train.lock").exists() or time.time() - t0 < 3:
        assert first.proc.poll() is None, first.result()
        time.sleep(0.05)
    capsys.readouterr()
    line = one_line_error(train.main(argv(wd, env)), capsys.readouterr().err)
    assert f"pid {first.proc.pid} on host" in line and "in use by another training run" in line, line
    rc, _, err = first.result()
    assert rc == 0 and err == "", err
    assert not (wd / "train.lock").exists()
    assert_same_state(wd / "checkpoints" / "6", runs["R"] / "checkpoints" / "6")


def test_workdir_lock_unit(tmp_path, capsys):
    """Held: refused naming the holder; released: gone; a dead holder on this host: taken over with a
    warning; a holder on another host: never taken over."""
    import socket

    from parscale_jax.errors import UserError
    from parscale_jax.lock import WorkdirLock

    held = WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(UserError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        WorkdirLock(str(tmp_path)).acquire()  # flock is per open file: a second open conflicts
    held.release()
    assert not (tmp_path / "train.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / "train.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time()}))
    capsys.readouterr()
    with WorkdirLock(str(tmp_path)):
        err = capsys.readouterr().err
        assert err.startswith("warning: took over the stale lock of pid") and f"pid {dead.pid}" in err, err
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": time.time()}))
    with pytest.raises(UserError, match="another host.*remove"):
        WorkdirLock(str(tmp_path)).acquire()


# ---- 3. disk full ----------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.fixture(scope="module")
def disk(runs, env):
    """Two saves that fail: onto a small tmpfs (when this user may mount one) that holds one checkpoint
    and a half, and with ENOSPC injected into orbax's background writer at step 4; then both resumed
    once space is back (the tmpfs remounted larger)."""
    from parscale_jax.fileio import tree_bytes

    root = env["root"]
    mnt = root / "tmpfs"
    size = (int(1.5 * tree_bytes(str(runs["R"] / "checkpoints" / "2"))) + (256 << 10)) // 4096 * 4096
    cases = {"injected": root / "injected"}
    if _mount_tmpfs(mnt, size):
        cases["tmpfs"] = mnt / "w"
    try:
        mark = root / "injected.failed_at"
        failed = helper(env, "disk-fail", [{"name": n, "argv": argv(wd, env), "hooks": {
            "enospc_in_save": 4, "mark": str(mark)} if n == "injected" else {}} for n, wd in cases.items()])
        failed_at = float(mark.read_text())
        snap = {n: (committed(wd), records(wd / "metrics.jsonl"), (wd / "train.lock").exists())
                for n, wd in cases.items()}
        if "tmpfs" in cases:
            subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True, timeout=30)
        resumed = helper(env, "disk-resume", [{"name": n, "argv": argv(wd, env)} for n, wd in cases.items()])
        finals = {n: state_of(wd / "checkpoints" / str(STEPS)) for n, wd in cases.items() if resumed[n]["rc"] == 0}
    finally:
        if "tmpfs" in cases:
            subprocess.run(["umount", str(mnt)], timeout=30)
    return {"cases": cases, "failed": failed, "snap": snap, "resumed": resumed, "finals": finals,
            "failed_at": failed_at}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["injected", "tmpfs"])
def test_full_disk_one_line_then_resume_bitwise(disk, runs, case):
    if case not in disk["cases"]:
        pytest.skip("mounting a tmpfs needs root here: the injected fault covers the acceptance")
    r = disk["failed"][case]
    lines = r["err"].splitlines()
    assert r["rc"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), r["err"]
    line = lines[0]
    steps, recs, locked = disk["snap"][case]
    losses = [(r["step"], r["time"]) for r in recs if "loss" in r]
    if case == "injected":  # the background write failed: reported at the next step, not the next save
        assert "checkpoint 4 could not be written" in line and "no space left on device" in line, line
        after = [s for s, t in losses if t > disk["failed_at"]]
        assert len(after) <= 1 and losses[-1][0] >= 4, (after, losses)
    else:  # the free-space check before the save of step 4 (the last save took more than is left)
        assert "not enough free space to save checkpoint 4" in line, line
        assert losses[-1][0] == 4, losses
    assert "free" in line and "checkpoint 2 is intact" in line, line
    assert steps == [2] and not locked
    want = state_of(runs["R"] / "checkpoints" / "6")
    assert disk["resumed"][case]["rc"] == 0, disk["resumed"][case]["err"]
    got = disk["finals"][case]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


# ---- 4. bad input: one line, exit 2, nothing written ----------------------------------------------------
BAD_RUN = {  # extra argv -> words of the one-line message
    "seq_len=1": (["data.seq_len=1"], ["data.seq_len=1", ">= 2"]),
    "lr=inf": (["optim.lr=.inf"], ["optim.lr", "finite"]),
    "lr=nan": (["optim.lr=.nan"], ["optim.lr", "finite"]),
    "b2=1": (["optim.b2=1"], ["optim.b2", "[0, 1)"]),
    "peak_flops=-1": (["peak_flops=-1"], ["peak_flops", "positive"]),
    "keep_data_position": (["keep_data_position=true"], ["keep_data_position", "init_from"]),
    "freeze P=1": (["freeze_backbone=true", "model.parscale_n=1"], ["nothing to train"]),
    "workdir is a file": (["--workdir", "{file}"], ["{file}", "is a file"]),
    "config is a directory": (["--config", "{dir}"], ["{dir}", "is a directory"]),
    "distributed without coordinator": (["distributed.initialize=true"], ["distributed.initialize", "coordinator"]),
    "allow_changed unknown": (["allow_changed=optim.nope"], ["optim.nope"]),
}


@pytest.mark.parametrize("case", sorted(BAD_RUN))
def test_bad_run_input_one_line_exit_2_nothing_written(case, env, tmp_path, capsys, monkeypatch):
    from parscale_jax.cli import train

    for k in ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri"):
        monkeypatch.delenv(k, raising=False)
    extra, needles = BAD_RUN[case]
    paths = {"file": tmp_path / "a-file", "dir": tmp_path / "a-dir"}
    paths["file"].write_text("x")
    paths["dir"].mkdir()
    wd = tmp_path / "wd"
    before = snapshot(tmp_path)
    extra = [e.format(**paths) for e in extra]
    capsys.readouterr()
    line = one_line_error(train.main([*argv(wd, env), *extra]), capsys.readouterr().err)
    for n in needles:
        assert n.format(**paths) in line, line
    assert snapshot(tmp_path) == before and not wd.exists()


@pytest.mark.slow
def test_model_config_that_does_not_fit_its_arrays(runs, tmp_path, capsys):
    from parscale_jax import checkpoint as C
    from parscale_jax import loading
    from parscale_jax.cli import eval as eval_cli

    cfg, params = loading.load(str(runs["R"]))
    C.save_params(str(tmp_path / "m"), cfg, params)
    meta = json.loads((tmp_path / "m" / "model_config.json").read_text())
    meta["model"]["intermediate_size"] = 96
    (tmp_path / "m" / "model_config.json").write_text(json.dumps(meta))
    capsys.readouterr()
    line = one_line_error(eval_cli.main(["--checkpoint", str(tmp_path / "m"), "--max-windows", "1"]),
                          capsys.readouterr().err)
    assert "do not match its model config" in line and "160" in line and "96" in line, line


def test_integer_hf_weights_are_refused(tmp_path, capsys):
    import jax
    from safetensors.numpy import load_file, save_file

    from parscale_jax import convert, hf
    from parscale_jax import model as M
    from parscale_jax.config import preset

    cfg = preset("tiny", parscale_n=1)
    params = jax.tree.map(np.asarray, M.init_params(M.make_model(cfg), jax.random.PRNGKey(0)))
    hf.save_hf(str(tmp_path / "hf"), cfg, params)
    f = next((tmp_path / "hf").glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(n for n in tensors if "embed" in n)
    tensors[name] = tensors[name].astype(np.int64)
    save_file(tensors, str(f))
    capsys.readouterr()
    line = one_line_error(convert.main(["from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "o")]),
                          capsys.readouterr().err)
    assert name in line and "I64" in line, line
    assert not (tmp_path / "o").exists()


def test_metrics_records_past_the_resumed_step_are_dropped(tmp_path):
    from parscale_jax.metrics import MetricsWriter

    p = tmp_path / "metrics.jsonl"
    recs = [{"step": 0, "event": "start"}] + [{"step": s, "loss": float(s)} for s in range(1, 6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 6, "lo')  # a torn last line
    w = MetricsWriter(str(tmp_path), resume_step=3)
    w.write(4, loss=40.0)
    w.close()
    got = [json.loads(x) for x in p.read_text().splitlines()]
    assert [(r["step"], r.get("loss")) for r in got] == [(0, None), (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


# ---- 6. leaks ----------------------------------------------------------------------------------------
def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc (read here, not through the code under test)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{d}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_leaves_no_worker_behind_and_a_stale_lock_is_taken_over(env, capsys):
    from parscale_jax.lock import WorkdirLock

    wd = env["root"] / "kill9"
    job = Job([__file__, "train", json.dumps({"slow_after": 1}), *argv(wd, env, "data.worker_count=2", "steps=50")],
              sub_env(1, env["cache"]), env["root"] / "kill9")
    kids: set[int] = set()
    try:
        deadline = time.time() + 600
        while time.time() < deadline and job.proc.poll() is None and not losses_of_safe(wd / "metrics.jsonl"):
            time.sleep(0.1)
        assert job.proc.poll() is None, job.result()
        kids = _descendants(job.proc.pid)
        assert len(kids) >= 2, kids  # the two grain workers (and python's resource tracker)
        job.proc.send_signal(signal.SIGKILL)
        job.result()
        t0 = time.time()
        while time.time() - t0 < 10 and any(_alive(k) for k in kids):
            time.sleep(0.1)
        assert not [k for k in kids if _alive(k)], "processes of the killed run are still alive after 10 s"
    finally:
        for k in kids:
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)
    capsys.readouterr()
    with WorkdirLock(str(wd)):  # the lock file of the killed run: stale, taken over with a warning
        assert f"stale lock of pid {job.proc.pid}" in capsys.readouterr().err


def losses_of_safe(metrics: Path) -> list:
    with contextlib.suppress(OSError, ValueError):
        return losses_of(metrics)
    return []


# ---- helper script (run in subprocesses) ----------------------------------------------------------------
def _hooks(hooks: dict) -> None:
    """Test hooks: ``slow_after``: every batch after that many takes a second; ``enospc_in_save``: the
    background write of that step fails with ENOSPC (in orbax's commit, as a full disk would); the
    time it failed is written to ``mark``."""
    import orbax.checkpoint as ocp

    if "slow_after" in hooks:
        slow_data_after(hooks["slow_after"])
    if "enospc_in_save" in hooks:
        finalize = ocp.CompositeCheckpointHandler.finalize

        def failing_finalize(self, directory, *a, **k):
            if Path(str(directory)).name.startswith(f"{hooks['enospc_in_save']}."):
                Path(hooks["mark"]).write_text(repr(time.time()))
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
            return finalize(self, directory, *a, **k)

        ocp.CompositeCheckpointHandler.finalize = failing_finalize


def _run_scenarios(args: dict) -> None:
    """Each scenario: optionally copy a workdir and damage its newest step, then train.main(argv) with
    its hooks; stderr captured at the file-descriptor level (everything the run prints)."""
    import orbax.checkpoint as ocp

    from parscale_jax import data as D
    from parscale_jax.cli import train

    saved = (D.DataIterator.__next__, ocp.CompositeCheckpointHandler.finalize)
    out = {}
    for sc in args["scenarios"]:
        if "copy" in sc:
            shutil.copytree(*sc["copy"])
        if "damage" in sc:
            damage(Path(sc["copy"][1]) / "checkpoints" / str(STEPS), sc["damage"])
        _hooks(sc.get("hooks", {}))
        sys.stderr.flush()
        fd = os.dup(2)
        with tempfile.TemporaryFile() as f:
            os.dup2(f.fileno(), 2)
            try:
                rc = train.main(sc["argv"])
            finally:
                sys.stderr.flush()
                os.dup2(fd, 2)
                os.close(fd)
            f.seek(0)
            out[sc["name"]] = {"rc": rc, "err": f.read().decode("utf-8", "replace")}
        D.DataIterator.__next__, ocp.CompositeCheckpointHandler.finalize = saved
    Path(args["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "runs":
        _run_scenarios(json.loads(sys.argv[2]))
    elif cmd == "train":
        from parscale_jax.cli import train as _train_cli

        _hooks(json.loads(sys.argv[2]))
        sys.exit(_train_cli.main(sys.argv[3:]))
    else:
        raise SystemExit(f"unknown helper command {cmd}")
