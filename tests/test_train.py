"""Acceptance tests of issue 3 (training): meshes, multi-process, exact resume, gradient
accumulation, checkpoint portability, user errors, schedules, weight-decay mask, metrics, signals
and the NaN policy.

Every check compares against an independent computation: the 1-device run (for meshes and
processes), the uninterrupted run (for resume), ``jax.grad`` of a mean loss written here (for the
train step), closed-form NumPy (for schedules) or explicit parameter names (for the mask).

Cost control: one small corpus written here, the tiny preset at P=4, 6 steps of 8 x 32 tokens.
JAX start-up and compilation dominate, so the runs that need other processes share a persistent
compilation cache (the 1-device runs of one config compile once), and the slow 8-device and
2-process jobs start in the background at the first test while the in-process tests run.
This file doubles as the helper script those subprocesses execute (``python tests/test_train.py
CMD ...``, see the bottom).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["model.preset=tiny", "model.parscale_n=4", "data.seq_len=32", "batch_size=8", f"steps={STEPS}",
          "log_every=1", "data.heldout_fraction=0", "dtype=float32", "optim.lr=1e-2", "optim.warmup_steps=2",
          "checkpoint.every=2", "checkpoint.keep=3"]
MESHES_8 = {
    "data-fsdp-tensor": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
    "fsdp-stream-tensor": ["mesh.data=1", "mesh.fsdp=2", "mesh.stream=2", "mesh.tensor=2"],
}
TIMEOUT = 900  # seconds for one subprocess; generous: the machine may be shared


# ---- corpus, environment, subprocesses ----------------------------------------------------
def write_corpus(root: Path) -> str:
    """A few KB of code-like text in 8 files; every file holds bytes that are not valid UTF-8."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":",
             "caf\xe9", "na\xefve"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(8):
        lines = [" ".join(rng.choice(words, size=8)) for _ in range(40)]
        text = "\n".join(lines).encode("latin-1").replace(b"\n", b" \xff\xfe\x80\xc3\x28\n") + b"\n"
        (root / f"f{i}.py").write_bytes(text)
    return str(root / "*.py")


def sub_env(devices: int, cache: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_", "XLA_")) and k not in ("COORDINATOR_ADDRESS",)}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Job:
    """A background subprocess with its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self._out, self._err = open(f"{log}.out", "wb"), open(f"{log}.err", "wb")
        self.proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=self._out,
                                     stderr=self._err)

    def result(self, timeout: float = TIMEOUT) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._out.close()
        self._err.close()
        read = lambda p: Path(p).read_bytes().decode("utf-8", "replace")  # noqa: E731
        return rc, read(f"{self.log}.out"), read(f"{self.log}.err")


def run(args: list[str], env: dict[str, str], log: Path) -> tuple[int, str, str]:
    return Job(args, env, log).result()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def losses_of(summary_json: Path) -> dict[int, float]:
    return {int(s): float(v) for s, v in json.loads(summary_json.read_text())["losses"]}


def assert_close_losses(got: dict[int, float], want: dict[int, float], rtol: float) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for s in want:
        assert abs(got[s] - want[s]) <= rtol * abs(want[s]), (s, got[s], want[s])


def leaves(tree) -> dict[str, np.ndarray]:
    import jax

    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def ckpt_steps(workdir: Path) -> list[int]:
    """Steps whose directory holds orbax's commit marker (read here, not through the code under test)."""
    d = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and (d / n / "commit_success.txt").is_file())


def logged_losses(metrics: Path) -> dict[int, float]:
    """Steps with a loss record in metrics.jsonl so far (a line being written is skipped)."""
    out = {}
    if metrics.exists():
        for ln in metrics.read_text().splitlines():
            try:
                r = json.loads(ln)
            except ValueError:
                continue
            if "loss" in r:
                out[r["step"]] = r["loss"]
    return out


def one_line_error(rc: int, err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- module fixtures ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    src = write_corpus(root / "corpus")
    return {"root": root, "src": src, "cache": root / "jax-cache", "data": [f"data.source={src}"]}


@pytest.fixture(scope="module")
def background(env):
    """Start the 8-device job and the 2 x 4-device job (with the first test that needs the reference
    run, so they overlap with everything after it); tests wait for them when needed."""
    root = env["root"]
    jobs = {"mesh8": Job([__file__, "mesh8", json.dumps({"src": env["src"], "root": str(root)})],
                         sub_env(8, None), root / "mesh8")}
    port = free_port()
    for i in range(2):
        argv = ["train.py", "--workdir", str(root / "mp"), "--quiet", "--summary-json", str(root / f"mp{i}.json"),
                *COMMON, *env["data"], *MESHES_8["data-fsdp-tensor"], "distributed.initialize=true",
                f"distributed.coordinator_address=localhost:{port}", "distributed.num_processes=2",
                f"distributed.process_id={i}"]
        jobs[f"mp{i}"] = Job(argv, sub_env(4, None), root / f"mp{i}")
    yield jobs
    for j in jobs.values():
        if j.proc.poll() is None:
            j.proc.kill()
        j.result()


@pytest.fixture(scope="module")
def mesh8(background, env):
    rc, out, err = background["mesh8"].result()
    assert rc == 0, err[-3000:]
    return json.loads((env["root"] / "mesh8.json").read_text())


@pytest.fixture(scope="module")
def ref(env, background):
    """Run A: the uninterrupted 1-device run (populates the compilation cache for the others)."""
    wd, out = env["root"] / "A", env["root"] / "A.json"
    # README's train command, scaled down by COMMON (configs/tiny.yaml is the tiny preset; every key
    # it sets that matters here is overridden, so the runs below without --config train the same)
    rc, _, err = run(["train.py", "--config", "configs/tiny.yaml", "--workdir", str(wd), "--quiet", "--summary-json",
                      str(out), *COMMON, *env["data"]], sub_env(1, env["cache"]), env["root"] / "A")
    assert rc == 0, err[-3000:]
    return {"workdir": wd, "losses": losses_of(out), "summary": json.loads(out.read_text())}


# ---- the reference run -----------------------------------------------------------------------
@pytest.mark.slow
def test_ref_run_is_sane(ref):
    L = ref["losses"]
    assert sorted(L) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in L.values())
    assert L[STEPS] < L[1] - 0.2  # it learns (the corpus is very repetitive)
    assert ckpt_steps(ref["workdir"]) == [2, 4, 6]


# ---- 3. SIGKILL, partial checkpoints, resume ------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_async_save_then_resume_is_bitwise(ref, env):
    from parscale_jax import loading

    root, wd = env["root"], env["root"] / "B"
    argv = ["--workdir", str(wd), "--quiet", "--summary-json", str(root / "B.json"), *COMMON, *env["data"]]
    # run B: SIGKILL in the middle of the async save of step 4 (its items written, not committed)
    rc, _, err = run([__file__, "train", json.dumps({"sigkill_in_save": 4}), *argv],
                     sub_env(1, env["cache"]), root / "B-killed")
    assert rc == -signal.SIGKILL, (rc, err[-3000:])
    names = os.listdir(wd / "checkpoints")
    assert ckpt_steps(wd) == [2], names                        # the previous checkpoint is complete
    assert any(n.startswith("4.") for n in names), names        # step 4 was cut off mid-write
    # also a step directory without its commit marker, newer than step 2 and at a step the
    # resumed run saves again (a copy cut off before its marker, e.g. on a non-atomic filesystem)
    shutil.copytree(wd / "checkpoints" / "2", wd / "checkpoints" / "6")
    for p in (wd / "checkpoints" / "6").rglob("commit_success.txt"):
        p.unlink()
    shutil.rmtree(wd / "checkpoints" / "6" / "state" / "d")

    # the loader picks the newest complete step: bitwise the uninterrupted run's step 2
    _, got = loading.load(str(wd))
    _, want = loading.load(str(ref["workdir"] / "checkpoints" / "2"))
    got, want = leaves(got), leaves(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)

    # resume with the same command: the losses after step 2 are bitwise run A's
    rc, _, err = run(["train.py", *argv], sub_env(1, env["cache"]), root / "B-resumed")
    assert rc == 0, err[-3000:]
    summary = json.loads((root / "B.json").read_text())
    assert summary["start_step"] == 2
    resumed = losses_of(root / "B.json")
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for s in resumed:
        assert resumed[s] == ref["losses"][s], (s, resumed[s], ref["losses"][s])
    assert ckpt_steps(wd) == [2, 4, 6]


# ---- 4. gradient accumulation -----------------------------------------------------------------
@pytest.mark.slow
def test_grad_accum_equals_full_batch_and_independent_grad():
    import jax
    import jax.numpy as jnp
    import optax

    from parscale_jax import model as M
    from parscale_jax import train_step as TS
    from parscale_jax.config import preset

    cfg = preset("tiny", parscale_n=2)
    model = M.make_model(cfg, jnp.float32)
    params = M.init_params(model, jax.random.PRNGKey(1))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 259, size=(8, 17)), jnp.int32)

    def mean_nll(p):  # written here: log-softmax + gather, averaged over all B*S targets
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(mean_nll))(params)
    ref_loss, ref_grad = float(ref_loss), leaves(ref_grad)
    ref_norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in ref_grad.values()))

    # clip + SGD (an update linear in the gradient), its state extended by the gradient it was given
    sgd = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    tx = optax.GradientTransformation(
        lambda p: (sgd.init(p), jax.tree.map(jnp.zeros_like, p)),
        lambda g, s, p=None: (lambda u, s2: (u, (s2, g)))(*sgd.update(g, s[0], p)))
    got = {}
    for accum in (1, 4):
        state = TS.new_state(params, tx, False, jax.random.PRNGKey(0))
        new, m = jax.jit(TS.make_train_step(model, tx, grad_accum=accum))(state, tokens)
        assert abs(float(m["loss"]) - ref_loss) <= 1e-5 * ref_loss, accum
        assert abs(float(m["grad_norm"]) - ref_norm) <= 1e-5 * ref_norm, accum
        assert int(new["step"]) == 1
        got[accum] = new
    for accum in (1, 4):  # the step's gradient against the independent jax.grad of the mean loss
        g = leaves(got[accum]["opt_state"][1])
        assert g.keys() == ref_grad.keys()
        for k, want in ref_grad.items():
            scale = float(np.max(np.abs(want)))
            assert scale > 0, k
            assert np.max(np.abs(g[k].astype(np.float64) - want)) <= 1e-5 * scale, (accum, k)
    # updated params: 4 micro-batches of 2 equal one batch of 8, and equal params - 0.1 * clip(grad)
    # (AdamW is left out on purpose: its first step divides each gradient by its own size, so a
    # gradient near eps turns float32 summation-order noise into a visible update difference)
    p0, new1, new4 = leaves(params), leaves(got[1]["params"]), leaves(got[4]["params"])
    clip = min(1.0, 1.0 / ref_norm)
    for k in p0:
        want = p0[k].astype(np.float64) - 0.1 * clip * ref_grad[k]
        # 1e-5 of the largest update, plus the float32 rounding of the stored params
        tol = 1e-5 * 0.1 * clip * np.max(np.abs(ref_grad[k])) + 2 * np.spacing(np.max(np.abs(p0[k])))
        np.testing.assert_allclose(new4[k], new1[k], rtol=0, atol=tol, err_msg=k)
        np.testing.assert_allclose(new1[k], want, rtol=0, atol=tol, err_msg=k)


# ---- 6. bad input: one line, exit code 2 ------------------------------------------------------
def _main(argv, capsys) -> tuple[int, str]:
    from parscale_jax.cli import train

    capsys.readouterr()
    rc = train.main(argv)
    return rc, capsys.readouterr().err


BAD = {  # overrides -> words the one-line message must hold
    "unknown key": (["optim.learning_rate=1e-3"], ["optim.learning_rate"]),
    "unknown section key": (["nosuch.key=1"], ["nosuch"]),
    "mesh product": (["mesh.data=2"], ["mesh", "1 are available"]),
    "missing data": (["data.source=/nonexistent/corpus"], ["/nonexistent/corpus"]),
    "empty data": (["data.source={empty}"], ["{empty}", "empty"]),
    "empty data directory": (["data.source={emptydir}"], ["{emptydir}"]),
    "data shorter than a sequence": (["data.source={tiny}"], ["{tiny}", "seq_len"]),
    "incompatible checkpoint": (["model.parscale_n=2", "@A"], ["model.parscale_n 4 -> 2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_one_line_exit_2(case, env, ref, capsys, tmp_path):
    over, needles = BAD[case]
    paths = {"empty": tmp_path / "empty", "emptydir": tmp_path / "emptydir", "tiny": tmp_path / "tiny"}
    for p in paths.values():
        p.mkdir()
    (paths["empty"] / "a.txt").write_bytes(b"")
    (paths["tiny"] / "a.txt").write_bytes(b"abc")
    wd = tmp_path / "wd"
    if "@A" in over:
        shutil.copytree(ref["workdir"], wd)
        before = (wd / "config.yaml").read_text()
    over = [o.format(**paths) for o in over if o != "@A"]
    rc, err = _main(["--workdir", str(wd), "--quiet", *COMMON, *env["data"], *over], capsys)
    line = one_line_error(rc, err)
    for n in needles:
        assert n.format(**paths) in line, line
    if case == "incompatible checkpoint":
        assert (wd / "config.yaml").read_text() == before  # the workdir is left as it was
        assert ckpt_steps(wd) == [2, 4, 6]


@pytest.mark.slow
def test_non_utf8_text_never_crashes(env, ref):
    from parscale_jax import data as D
    from parscale_jax import train_config

    files = sorted(Path(env["src"]).parent.glob("*.py"))
    for f in files:
        with pytest.raises(UnicodeDecodeError):
            f.read_bytes().decode("utf-8")
    # the run's batches carry those bytes (0xff never occurs in UTF-8) and the run trained on them
    cfg = train_config.load(None, [*COMMON, *env["data"]])
    it = D.train_iterator(cfg.data, D.load_tokenizer("bytes"), cfg.batch_size)
    seen = np.concatenate([next(it)["tokens"].ravel() for _ in range(STEPS)])
    it.close()
    assert np.any(seen == 0xFF) and np.any(seen == 0xE9)
    assert all(math.isfinite(v) for v in ref["losses"].values())


# ---- 7. config typing -------------------------------------------------------------------------
def test_config_overrides_are_typed(tmp_path):
    from parscale_jax import train_config

    cfg = train_config.load(None, ["optim.lr=3e-4", "steps=7", "checkpoint.async_save=false",
                                   "distributed.initialize=true", "model.preset=tiny", "model.parscale_n=2",
                                   "peak_flops=1e12", "init_from=null"])
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.steps == 7 and type(cfg.steps) is int
    assert cfg.checkpoint.async_save is False
    assert cfg.distributed.initialize == "true"
    assert cfg.model.parscale_n == 2 and cfg.model.hidden_size == 64  # preset fields kept
    assert cfg.peak_flops == 1e12 and cfg.init_from is None
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  preset: tiny\noptim:\n  lr: 1e-3\n  grad_accum: 2\ndistributed:\n  initialize: false\n"
                 "steps: 10\n")
    cfg = train_config.load(str(y), ["optim.lr=2e-3"])  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.lr == 2e-3 and cfg.optim.grad_accum == 2 and cfg.steps == 10
    assert cfg.distributed.initialize == "false"
    # the resolved config round-trips through its YAML
    (tmp_path / "r.yaml").write_text(cfg.to_yaml())
    assert train_config.load(str(tmp_path / "r.yaml")) == cfg


BAD_CONFIG = {
    "optim.lr=abc": "optim.lr", "steps=2.5": "steps", "model.parscale_n=two": "model.parscale_n",
    "checkpoint.async_save=maybe": "checkpoint.async_save", "optim.schedule=linear": "optim.schedule",
    "mesh.data=0": "mesh.data", "dtype=float16": "dtype", "nan_policy=ignore": "nan_policy",
    "optim.grad_accum=3": "grad_accum", "distributed.initialize=sometimes": "distributed.initialize",
    "model.preset=huge": "model.preset", "data.nosuch=1": "data.nosuch", "optim=3": "optim",
    "lr": "key=value",
}


@pytest.mark.parametrize("override", sorted(BAD_CONFIG))
def test_config_errors_name_the_key(override):
    from parscale_jax import train_config
    from parscale_jax.errors import UserError

    with pytest.raises(UserError) as e:
        train_config.load(None, [override])
    assert BAD_CONFIG[override] in str(e.value) and "\n" not in str(e.value)


def test_yaml_file_errors(tmp_path):
    from parscale_jax import train_config
    from parscale_jax.errors import UserError

    cases = {"steps: ten\n": "steps", "optim: [1, 2]\n": "optim", "optim:\n  lr: [1\n": "YAML",
             "- a\n- b\n": "mapping", "optim:\n  warmup: 3\n": "optim.warmup"}
    for i, (text, needle) in enumerate(cases.items()):
        p = tmp_path / f"c{i}.yaml"
        p.write_text(text)
        with pytest.raises(UserError, match=needle):
            train_config.load(str(p))
    with pytest.raises(UserError, match="does not exist"):
        train_config.load(str(tmp_path / "missing.yaml"))


# ---- 7. schedules against closed-form NumPy ---------------------------------------------------
def closed_form_lr(kind, lr, warm, steps, min_ratio, frac) -> np.ndarray:
    """Linear warmup to lr over ``warm`` steps (lr*(s+1)/warm), then: constant; cosine from lr at
    step ``warm`` to lr*min_ratio at the last step; wsd: lr until the last round(frac*steps) steps,
    which fall linearly to lr*min_ratio at the last step."""
    warm = min(warm, steps - 1)
    low = lr * min_ratio
    out = np.empty(steps, np.float64)
    n_decay = round(frac * steps)
    for s in range(steps):
        if s < warm:
            out[s] = lr * (s + 1) / warm
        elif kind == "constant":
            out[s] = lr
        elif kind == "cosine":
            t = (s - warm) / (steps - 1 - warm)
            out[s] = low + (lr - low) * (1 + math.cos(math.pi * t)) / 2
        else:
            start = steps - n_decay
            out[s] = lr if s < start else lr - (lr - low) * (s - start + 1) / n_decay
    return out


@pytest.mark.parametrize("kind,warm,steps,frac", [("cosine", 5, 40, 0.2), ("cosine", 0, 17, 0.2),
                                                   ("wsd", 3, 40, 0.3), ("wsd", 0, 21, 0.1),
                                                   ("constant", 4, 12, 0.2), ("constant", 0, 5, 0.2)])
def test_lr_schedule_closed_form(kind, warm, steps, frac):
    from parscale_jax import optim as O
    from parscale_jax.train_config import OptimConfig

    cfg = OptimConfig(lr=3e-3, schedule=kind, warmup_steps=warm, min_lr_ratio=0.1, decay_fraction=frac)
    got = np.asarray([float(O.schedule(cfg, steps)(s)) for s in range(steps)])
    want = closed_form_lr(kind, 3e-3, warm, steps, 0.1, frac)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    if warm:
        assert abs(got[warm - 1] - 3e-3) < 1e-9  # warmup reaches the peak
    if kind != "constant":
        assert abs(got[-1] - 3e-4) < 1e-9       # and ends at min_lr_ratio * lr


# ---- 7. weight-decay mask ---------------------------------------------------------------------
def test_weight_decay_mask_spares_norms_biases_prefixes():
    import jax
    import jax.numpy as jnp

    from parscale_jax import model as M
    from parscale_jax import optim as O
    from parscale_jax.config import preset
    from parscale_jax.train_config import OptimConfig

    shapes = jax.eval_shape(lambda: M.init_params(M.make_model(preset("tiny", parscale_n=4)), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32), shapes)
    no_decay = {"aggregator/gate_in/bias", "aggregator/gate_out/bias", "prefix/k", "prefix/v",
                "backbone/final_norm/scale", "backbone/decoder/layers/input_norm/scale",
                "backbone/decoder/layers/post_attn_norm/scale", "backbone/decoder/layers/attn/q/bias",
                "backbone/decoder/layers/attn/k/bias", "backbone/decoder/layers/attn/v/bias"}
    decay = {"aggregator/gate_in/kernel", "aggregator/gate_out/kernel", "backbone/embed/embedding",
             "backbone/decoder/layers/attn/q/kernel", "backbone/decoder/layers/attn/k/kernel",
             "backbone/decoder/layers/attn/v/kernel", "backbone/decoder/layers/attn/o/kernel",
             "backbone/decoder/layers/mlp/gate/kernel", "backbone/decoder/layers/mlp/up/kernel",
             "backbone/decoder/layers/mlp/down/kernel"}
    mask = leaves(O.decay_mask(params))
    assert set(mask) == no_decay | decay
    assert {k for k, v in mask.items() if v} == decay
    # through the optimizer: zero gradients leave only the decay term -lr * wd * p
    tx = O.make_optimizer(OptimConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, schedule="constant",
                                      clip_norm=0.0), 10)
    upd, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(params)
    upd, p = leaves(upd), leaves(params)
    for k in p:
        want = -0.1 * 0.5 * p[k].astype(np.float64) if k in decay else np.zeros(p[k].shape)
        np.testing.assert_allclose(upd[k], want, rtol=1e-6, atol=1e-12, err_msg=k)


# ---- 7. metrics.jsonl and TensorBoard -------------------------------------------------------------
def _tb_scalars(folder: Path) -> dict[tuple[str, int], float]:
    """Scalars of the TFRecord event files (length, crc, Event proto, crc), parsed here."""
    from tensorboardX.proto import event_pb2

    out = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, list(folder.iterdir())
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i: i + 8])
            ev = event_pb2.Event.FromString(data[i + 12: i + 12 + n])
            i += 12 + n + 4
            for v in ev.summary.value:
                out[v.tag, ev.step] = v.simple_value
    return out


@pytest.mark.slow
def test_metrics_jsonl_and_tensorboard(ref):
    recs = [json.loads(ln) for ln in (ref["workdir"] / "metrics.jsonl").read_text().splitlines()]
    assert recs[0].get("event") == "start" and recs[-1].get("event") == "end"
    loss = {r["step"]: r["loss"] for r in recs if "loss" in r}
    assert loss == ref["losses"]
    lrs = {r["step"]: r["lr"] for r in recs if "lr" in r}
    cfg_lr = closed_form_lr("cosine", 1e-2, 2, STEPS, 0.1, 0.2)
    for s in range(1, STEPS + 1):  # the lr logged at step s is the one used for update s (0-based s-1)
        assert abs(lrs[s] - cfg_lr[s - 1]) <= 1e-6 * cfg_lr[s - 1]
    tb = _tb_scalars(ref["workdir"] / "tb")
    for s, v in loss.items():
        assert tb["loss", s] == np.float32(v)


# ---- 7. SIGTERM: checkpoint, clean exit, exact resume -------------------------------------------
@pytest.mark.slow
def test_sigterm_writes_checkpoint_and_exits_cleanly(ref, env):
    root, wd = env["root"], env["root"] / "T"
    argv = ["--workdir", str(wd), "--quiet", "--summary-json", str(root / "T.json"), *COMMON, *env["data"],
            "checkpoint.every=100"]  # no periodic save before the end: only the signal saves
    job = Job([__file__, "train", json.dumps({"slow_after": 2}), *argv], sub_env(1, env["cache"]), root / "T")
    deadline = time.time() + TIMEOUT
    metrics = wd / "metrics.jsonl"
    while time.time() < deadline and job.proc.poll() is None and 2 not in logged_losses(metrics):
        time.sleep(0.05)
    job.proc.send_signal(signal.SIGTERM)
    rc, _, err = job.result()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    steps = ckpt_steps(wd)
    assert len(steps) == 1 and 2 <= steps[0] < STEPS, (steps, err[-2000:])
    s = steps[0]
    summary = json.loads((root / "T.json").read_text())
    assert summary["interrupted"] is True and summary["step"] == s
    # resume with the same command: exact continuation
    rc, _, err = run(["train.py", *argv], sub_env(1, env["cache"]), root / "T-resumed")
    assert rc == 0, err[-3000:]
    resumed = losses_of(root / "T.json")
    assert resumed == {k: v for k, v in ref["losses"].items() if k > s}


# ---- 7. NaN policy ----------------------------------------------------------------------------------
NAN_RUN = ["model.preset=tiny", "model.parscale_n=1", "data.seq_len=16", "batch_size=4", "steps=3", "log_every=1",
           "data.heldout_fraction=0", "dtype=float32", "optim.lr=1e30", "optim.warmup_steps=0",
           "optim.schedule=constant", "checkpoint.every=1", "checkpoint.keep=5", "checkpoint.async_save=false"]


@pytest.mark.slow
def test_nan_policy_stop_names_the_step(env, capsys, tmp_path):
    rc, err = _main(["--workdir", str(tmp_path), "--quiet", *NAN_RUN, *env["data"], "nan_policy=stop"], capsys)
    line = one_line_error(rc, err)
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    finite = [r["step"] for r in recs if "loss" in r]
    assert finite == list(range(1, len(finite) + 1)) and len(finite) >= 1
    assert all(math.isfinite(r["loss"]) for r in recs if "loss" in r)
    assert f"at step {len(finite) + 1}" in line, line
    assert len(finite) + 1 not in ckpt_steps(tmp_path)


@pytest.mark.slow
def test_nan_policy_skip_keeps_params(env, capsys, tmp_path):
    from parscale_jax import checkpoint as C

    rc, err = _main(["--workdir", str(tmp_path), "--quiet", *NAN_RUN, *env["data"], "nan_policy=skip"], capsys)
    assert rc == 0, err
    recs = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    skipped = sorted({r["step"] for r in recs if r.get("skipped_nonfinite")})
    assert skipped and skipped == list(range(skipped[0], 4)) and skipped[0] >= 2, recs
    assert ckpt_steps(tmp_path) == [1, 2, 3]
    last_good = skipped[0] - 1
    state = {s: leaves(C.restore_numpy(str(tmp_path / "checkpoints" / str(s) / "state"))) for s in (last_good, 3)}
    kept = [k for k in state[last_good] if k.startswith(("params/", "opt_state/"))]
    assert len(kept) > 20, sorted(state[last_good])
    for k in kept:  # params and optimizer state after the skipped steps: bitwise the last good ones
        np.testing.assert_array_equal(state[3][k], state[last_good][k], err_msg=k)
        assert np.all(np.isfinite(state[3][k])), k
    assert int(state[3]["step"]) == 3


# ---- last: the tests that wait for the background jobs ----------------------------------------
# ---- 1. meshes of 8 simulated devices -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("mesh", sorted(MESHES_8))
def test_8_devices_match_1_device(mesh8, ref, mesh):
    got = mesh8["runs"][mesh]
    want_shape = {"data": 1, "fsdp": 1, "stream": 1, "tensor": 1}
    want_shape.update({kv.split("=")[0][5:]: int(kv.split("=")[1]) for kv in MESHES_8[mesh]})
    assert got["devices"] == 8 and got["mesh"] == want_shape
    assert_close_losses({int(k): v for k, v in got["losses"]}, ref["losses"], rtol=1e-5)


# ---- 2. two processes x 4 devices -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_2_processes_match_1_process_8_devices(background, mesh8, env):
    results = [background[f"mp{i}"].result() for i in range(2)]
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    per_proc = [losses_of(env["root"] / f"mp{i}.json") for i in range(2)]
    assert per_proc[0] == per_proc[1]
    one_proc = {int(k): v for k, v in mesh8["runs"]["data-fsdp-tensor"]["losses"]}
    assert_close_losses(per_proc[0], one_proc, rtol=1e-5)
    assert ckpt_steps(env["root"] / "mp") == [2, 4, 6]
    from parscale_jax import loading

    cfg, params = loading.load(str(env["root"] / "mp"))
    assert cfg.parscale_n == 4 and set(params) == {"backbone", "prefix", "aggregator"}


# ---- 5. an 8-device checkpoint restores on 1 device -----------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_8_device_checkpoint_resumes_on_1_device(mesh8, env):
    from parscale_jax import loading

    src = Path(mesh8["runs"]["data-fsdp-tensor"]["workdir"])
    assert ckpt_steps(src) == [2, 4, 6]
    wd = env["root"] / "from8"
    shutil.copytree(src, wd)
    for s in (4, 6):  # keep only step 2 of the 8-device run
        shutil.rmtree(wd / "checkpoints" / str(s))
    out = env["root"] / "from8.json"
    rc, _, err = run(["train.py", "--workdir", str(wd), "--quiet", "--summary-json", str(out), *COMMON, *env["data"]],
                     sub_env(1, env["cache"]), env["root"] / "from8")
    assert rc == 0, err[-3000:]
    assert json.loads(out.read_text())["start_step"] == 2
    eight = {int(k): v for k, v in mesh8["runs"]["data-fsdp-tensor"]["losses"] if int(k) > 2}
    assert_close_losses(losses_of(out), eight, rtol=1e-5)
    # the loader reads the 8-device step 6 on this 1-device process; it matches the 1-device continuation
    cfg8, p8 = loading.load(str(src))
    cfg1, p1 = loading.load(str(wd))
    assert cfg8 == cfg1 and cfg8.parscale_n == 4
    p8, p1 = leaves(p8), leaves(p1)
    assert p8.keys() == p1.keys()
    for k in p1:
        assert p8[k].shape == p1[k].shape and p8[k].dtype == np.float32
        assert np.linalg.norm(p8[k] - p1[k]) <= 1e-4 * np.linalg.norm(p1[k]) + 1e-7, k


# ---- 6. (continued) ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.multiprocess
def test_batch_not_divisible_by_data_shards(mesh8):
    rc, err = mesh8["batch_error"]
    line = one_line_error(rc, err)
    assert "batch_size=6" in line and "4 data shards" in line, line


# ---- helper script (run in subprocesses) ------------------------------------------------------------
def _mesh8(args: dict) -> None:
    import jax

    from parscale_jax import runner, sharding, train_config
    from parscale_jax.cli import train

    root = Path(args["root"])
    out = {"runs": {}}
    for name, mesh in MESHES_8.items():
        cfg = train_config.load(None, [*COMMON, f"data.source={args['src']}", *mesh])
        wd = root / f"w8-{name}"
        summary = runner.train(cfg, str(wd), verbose=False)
        out["runs"][name] = {"losses": summary.losses, "workdir": str(wd), "devices": jax.device_count(),
                             "mesh": dict(sharding.make_mesh(cfg.mesh).shape)}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = train.main(["--workdir", str(root / "w8-bad"), "--quiet", *COMMON, f"data.source={args['src']}",
                         *MESHES_8["data-fsdp-tensor"], "batch_size=6"])
    out["batch_error"] = [rc, err.getvalue()]
    (root / "mesh8.json").write_text(json.dumps(out))


def _train(hooks: dict, argv: list[str]) -> int:
    """train.main with test hooks: ``sigkill_in_save``: SIGKILL this process in the background
    thread of that step's async save, when its items are written but before orbax commits it
    (deterministic, unlike a kill from outside); ``slow_after``: every batch after that many
    takes a second."""
    import orbax.checkpoint as ocp

    from parscale_jax.cli import train

    if "sigkill_in_save" in hooks:
        finalize = ocp.CompositeCheckpointHandler.finalize

        def killing_finalize(self, directory, *a, **k):
            if Path(str(directory)).name.startswith(f"{hooks['sigkill_in_save']}."):
                os.kill(os.getpid(), signal.SIGKILL)
            return finalize(self, directory, *a, **k)

        ocp.CompositeCheckpointHandler.finalize = killing_finalize
    if "slow_after" in hooks:
        slow_data_after(hooks["slow_after"])
    return train.main(argv)


def slow_data_after(n: int) -> None:
    """Test hook (in a helper process): every batch after the first ``n`` takes a second."""
    from parscale_jax import data as D

    nxt = D.DataIterator.__next__

    def slow_next(self):
        if self.next_batch >= n:
            time.sleep(1.0)
        return nxt(self)

    D.DataIterator.__next__ = slow_next


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "mesh8":
        _mesh8(json.loads(sys.argv[2]))
    elif cmd == "train":
        sys.exit(_train(json.loads(sys.argv[2]), sys.argv[3:]))
    else:
        raise SystemExit(f"unknown helper command {cmd}")
