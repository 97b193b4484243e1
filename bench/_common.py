"""Shared helpers of the benchmark scripts: environment record, result files, timing.

Every script writes ``bench/results/<name>.json`` (the rows plus ``env``: device, versions,
threads, load, the exact command) and ``bench/results/<name>.md`` (the same rows as a table,
with the command and environment in a header), and PNG plots beside them.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from parscale_jax.fileio import atomic_file, write_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def aot_command(args: Sequence[str]) -> str:
    """The shell line of one ``python -m parscale_jax.aot`` compile (for the results' records)."""
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", "-m", "parscale_jax.aot", *args])


def aot_compile(args: Sequence[str], name: str, unavailable_ok: bool = False) -> dict[str, Any]:
    """One aot compile in a fresh process (its memory is returned when it ends): its JSON report
    plus ``compile_s`` and ``command``. With ``unavailable_ok`` a one-line user error (exit 2, e.g.
    a topology aot does not know) gives ``{"unavailable": the line, "command": ...}``."""
    out = os.path.join(RESULTS, f".{name}.{os.getpid()}.{abs(hash(tuple(args)))}.tmp.json")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "parscale_jax.aot", *args, "--json", out], cwd=ROOT,
                       capture_output=True, text=True)
    if unavailable_ok and p.returncode == 2:
        return {"unavailable": (p.stderr.strip().splitlines() or ["error"])[-1], "command": aot_command(args)}
    if p.returncode != 0:
        raise SystemExit(f"compile failed: {aot_command(args)}\n{p.stderr[-3000:]}")
    with open(out) as f:
        r = json.load(f)
    os.remove(out)
    return {**r, "compile_s": time.perf_counter() - t, "command": aot_command(args)}


def command_line() -> str:
    """The command that ran this script, relative to the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return " ".join(shlex.quote(a) for a in [".venv/bin/python", script, *sys.argv[1:]])


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None


def environment(extra_modules: Sequence[str] = ()) -> dict[str, Any]:
    """Device, library versions, cores and the load average (the machine is shared)."""
    import jax

    dev = jax.devices()[0]
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command_line(),
        "git_commit": _git_commit(),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '') or ''}".strip(),
        "jax_devices": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("jax", "jaxlib", "flax", "optax", "numpy", *extra_modules)},
    }
    return env


def env_lines(env: dict[str, Any]) -> list[str]:
    v = ", ".join(f"{k} {x}" for k, x in env["versions"].items() if x)
    return [f"- command: `{env['command']}`",
            f"- device: {env['device']} ({env['cpu']}, {env['cpu_count']} cores); {v}; Python {env['python']}",
            f"- date: {env['date']}, commit {env['git_commit']}, load average at the end "
            f"{env['load_average_1_5_15']} (shared machine)"]


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def write_results(name: str, payload: dict[str, Any], md_body: str, title: str, out_dir: str = RESULTS) -> tuple[str, str]:
    """Write ``<out_dir>/<name>.json`` and ``.md``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")
    payload = dict(payload)
    payload.setdefault("env", environment())
    with atomic_file(jpath) as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")
    write_text(mpath, f"# {title}\n\n" + "\n".join(env_lines(payload["env"])) + "\n\n" + md_body.rstrip() + "\n")
    return jpath, mpath


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` (which must block until done), after ``warmup``."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fmt(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:,.{nd}f}"


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# name -> (overrides of the tiny preset, train batch, seq_len): the backbones timed by
# train_throughput.py and vs_torch.py
BACKBONES = {
    "tiny": (dict(), 16, 128),
    "small": (dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, parscale_n_tokens=48), 8, 128),
}


def train_fresh(cfg: Any, workdir: str, verbose: bool = False) -> tuple[dict, Any, float]:
    """Train ``cfg`` from scratch in ``workdir`` (emptied first): (the run's summary dict, its
    final params, wall seconds). An interrupted run raises KeyboardInterrupt."""
    import shutil
    import time

    from parscale_jax import loading, runner

    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.time()
    summary = runner.train(cfg, workdir, verbose=verbose).to_dict()
    wall = time.time() - t0
    if summary.get("interrupted"):
        raise KeyboardInterrupt
    return summary, loading.load(workdir)[1], wall


def save_figure(fig: Any, path: str) -> None:
    """Tight layout, write the PNG, free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
