"""Training on a weighted mixture of prepared datasets (issue 21): kill -9 at random steps and
resume gives the uninterrupted run's train state bitwise; the held-out loss of each source beside
the total, data-wait time per logged step; the manifest fingerprint in every checkpoint and the
resume rules for a changed mixture or dataset; bad input as one line with nothing written.

The datasets are written by the contract writer of tests/test_mixture.py; the runs reuse the
subprocess helpers of tests/test_train.py and tests/test_robustness.py (one reference run; the
kill/resume runs share its persistent compilation cache).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from test_mixture import write_dataset
from test_robustness import assert_same_state, committed, helper, losses_of, records
from test_train import Job, one_line_error, run, sub_env

STEPS = 6
COMMON = ["model.preset=tiny", "model.parscale_n=2", "data.seq_len=32", "batch_size=8", f"steps={STEPS}",
          "log_every=1", "dtype=float32", "optim.lr=1e-2", "optim.warmup_steps=2", "checkpoint.every=1",
          "checkpoint.keep=10", "eval_every=3", "eval_windows=2", "eval_batch_size=2"]
WEIGHTS = (0.5, 0.3, 0.2)


def docs(rng, n_tokens: int) -> np.ndarray:
    """Byte ids with an EOS (258) every 40..120 tokens: text-like ids of the byte tokenizer."""
    ids = rng.integers(32, 127, size=n_tokens)
    pos = np.cumsum(rng.integers(40, 120, size=n_tokens // 40))
    ids[pos[pos < n_tokens]] = 258
    return ids


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtrain")
    rng = np.random.default_rng(0)
    paths = [write_dataset(root / name, docs(rng, 40000), heldout=docs(rng, 200), shard_tokens=16384)
             for name in ("web", "code", "math")]
    mix = ",".join(f"{p}:{w}" for p, w in zip(paths, WEIGHTS))
    return {"root": root, "cache": root / "jax-cache", "paths": paths, "mix": mix}


def argv(wd: Path, env, *extra: str) -> list[str]:
    return ["--workdir", str(wd), "--quiet", *COMMON, f"data.mixture={env['mix']}", *extra]


@pytest.fixture(scope="module")
def ref(env):
    """R: the uninterrupted run; W: a copy of R resumed to 8 steps with other weights, accepted."""
    root = env["root"]
    other = ",".join(f"{p}:{w}" for p, w in zip(env["paths"], (0.2, 0.3, 0.5)))
    scen = [{"name": "R", "argv": argv(root / "R", env)},
            {"name": "W", "copy": [str(root / "R"), str(root / "W")],
             "argv": argv(root / "W", env, "steps=8", f"data.mixture={other}", "--allow-changed", "data.mixture",
                          "steps")}]
    return {"root": root, "R": root / "R", "W": root / "W", "out": helper(env, "ref", scen)}


@pytest.mark.slow
def test_reference_run_logs_per_source_heldout_and_data_wait(ref, env):
    assert ref["out"]["R"]["rc"] == 0, ref["out"]["R"]["err"]
    recs = records(ref["R"] / "metrics.jsonl")
    evals = [r for r in recs if "eval_loss" in r and "event" not in r]  # the end record repeats the last
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:  # the total is the token-weighted mean of the sources' (equal held-out sizes here)
        each = [r[f"eval_loss/{n}"] for n in ("web", "code", "math")]
        assert all(np.isfinite(each)) and abs(r["eval_loss"] - np.mean(each)) < 1e-6 * abs(r["eval_loss"]), r
    logged = [r for r in recs if "loss" in r and r["step"] > 1]
    assert logged and all(r["data_wait_s"] >= 0 and 0 <= r["data_wait_fraction"] < 1 for r in logged)
    from parscale_jax import checkpoint as C
    from parscale_jax import data as D

    meta = C.read_step_meta(str(ref["R"] / "checkpoints" / str(STEPS)))
    srcs, _ = D.open_sources(D.DataConfig(mixture=env["mix"], seq_len=32))
    import hashlib

    want = hashlib.sha256(json.dumps([[s.name, json.loads((Path(s.path) / "manifest.json").read_text())["fingerprint"]]
                                      for s in srcs]).encode()).hexdigest()
    assert meta["data_fingerprint"] == want


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_is_bitwise(ref, env):
    """Killed twice (after a random checkpointed step each time) while every batch is slowed, then
    resumed to the end: the train state equals the uninterrupted run's, bit for bit."""
    root, wd = env["root"], env["root"] / "K"
    rng = np.random.default_rng(int(time.time()))
    first = int(rng.integers(1, 3))
    second = int(rng.integers(first + 1, STEPS - 1))
    for kill_after in (first, second):
        job = Job([str(Path(__file__).parent / "test_robustness.py"), "train", json.dumps({"slow_after": 1}),
                   *argv(wd, env)], sub_env(1, env["cache"]), root / f"K{kill_after}")
        deadline = time.time() + 900
        while time.time() < deadline and job.proc.poll() is None and kill_after not in committed_safe(wd):
            time.sleep(0.05)
        assert job.proc.poll() is None, job.result()
        job.proc.send_signal(signal.SIGKILL)
        rc, _, err = job.result()
        assert rc == -signal.SIGKILL, (kill_after, err[-2000:])
    rc, _, err = run(["train.py", *argv(wd, env)], sub_env(1, env["cache"]), root / "K-end")
    assert rc == 0, err[-3000:]
    assert_same_state(wd / "checkpoints" / str(STEPS), ref["R"] / "checkpoints" / str(STEPS))
    assert losses_of(wd / "metrics.jsonl") == losses_of(ref["R"] / "metrics.jsonl"), (first, second)


def committed_safe(wd: Path) -> list[int]:
    try:
        return committed(wd)
    except OSError:
        return []


@pytest.mark.slow
def test_changed_weights_need_allow_changed_and_are_recorded(ref, env, capsys, tmp_path):
    w = ref["out"]["W"]
    assert w["rc"] == 0, w["err"]
    resumed = [r for r in records(ref["W"] / "metrics.jsonl") if r.get("event") == "resume"]
    assert len(resumed) == 1 and any(c.startswith("data.mixture ") for c in resumed[0]["changes"]), resumed
    assert committed(ref["W"])[-1] == 8
    wd = tmp_path / "refused"
    shutil.copytree(ref["R"], wd)
    other = ",".join(f"{p}:{x}" for p, x in zip(env["paths"], (0.2, 0.3, 0.5)))
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    rc, err = _main(argv(wd, env, "steps=8", f"data.mixture={other}", "--allow-changed", "steps"), capsys)
    line = one_line_error(rc, err)
    assert "data.mixture" in line and "--allow-changed" in line, line
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before


def test_changed_dataset_is_refused_unless_allowed(ref, env):
    """The rule on a checkpoint's recorded fingerprint (the runner passes its datasets' own)."""
    from parscale_jax import resume, train_config
    from parscale_jax.errors import UserError

    cfg = train_config.load(None, [*COMMON, f"data.mixture={env['mix']}"])
    meta = {"model": cfg.model.to_dict(), "config": cfg.to_dict(), "data_fingerprint": "a" * 64}
    assert resume.check("wd", 3, meta, cfg, "a" * 64) == []
    with pytest.raises(UserError, match=r"changed dataset \(manifest fingerprint aaaaaaaaaaaa -> bbbbbbbbbbbb\).*"
                                        r"--allow-changed data"):
        resume.check("wd", 3, meta, cfg, "b" * 64)
    allowed = train_config.load(None, [*COMMON, f"data.mixture={env['mix']}", "allow_changed=data"])
    got = resume.check("wd", 3, meta, allowed, "b" * 64)
    assert got == [f"data.fingerprint {'a' * 64!r} -> {'b' * 64!r}"]
    assert resume.changes_data(got) and not resume.restarts_data(got)


def _main(args, capsys):
    from parscale_jax.cli import train

    capsys.readouterr()
    rc = train.main(args)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["vocab", "unknown", "weight", "newer", "truncated"])
def test_bad_input_one_line_exit_2_nothing_written(case, env, tmp_path, capsys):
    rng = np.random.default_rng(1)
    good = env["paths"][0]
    if case == "vocab":
        bad = write_dataset(tmp_path / "big", np.full(500, 400), vocab_size=1000)
        mix, want = f"{good}:1,{bad}:1", "token id 400 (its manifest's largest) is outside the model's vocabulary"
    elif case == "unknown":
        mix, want = f"{good}:1,{tmp_path / 'nosuch'}:1", f"data source {tmp_path / 'nosuch'} does not exist"
    elif case == "weight":
        mix, want = f"{good}:1,{env['paths'][1]}:-0.5", "weight '-0.5' of"
    elif case == "newer":
        bad = write_dataset(tmp_path / "newer", docs(rng, 5000), version=2)
        mix, want = f"{good}:1,{bad}:1", "newer than this parscale-jax reads"
    else:
        bad = write_dataset(tmp_path / "cut", docs(rng, 5000), shard_tokens=1000)
        with open(Path(bad) / "train-00003.bin", "r+b") as f:
            f.truncate(10)
        mix, want = f"{good}:1,{bad}:1", "train-00003.bin has 10 bytes, the manifest says 2000"
    wd = tmp_path / "wd"
    rc, err = _main(["--workdir", str(wd), "--quiet", *COMMON, f"data.mixture={mix}"], capsys)
    line = one_line_error(rc, err)
    assert want in line, line
    assert not wd.exists()
