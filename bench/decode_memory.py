"""The paper's Figure 4 (batch-1 memory and latency of P streams vs parameters) from compiled decode programs.

    .venv/bin/python bench/decode_memory.py                         # one TPU v5e chip (v5e:1x1)
    .venv/bin/python bench/decode_memory.py --topology v5e:1x1 h100 # and one H100, once aot knows it

For each topology, ``python -m parscale_jax.aot --decode`` compiles the generator's decode step
(weights served in bfloat16, the cache donated, the decode mesh) for the paper-1.6b backbone at
P = 1, 2, 4, 8 and for the dense paper-2.8b and paper-4.4b, at batch 1 and 8, with a cache of
480 tokens: the paper's protocol averages input = output length over 64, 128, 256, 512, and
every byte of the step is affine in the cache length, so the mean length gives the mean. A
topology that ``aot`` does not know (e.g. ``h100`` before GPU targets exist) is marked
unavailable, not fatal. Per row: per-chip memory (XLA's memory analysis), bytes one step reads
(its arguments: the weights and the whole cache; XLA's cost-analysis bytes beside it), FLOPs,
and a latency estimate max(bytes / HBM bandwidth, FLOPs / peak) from parscale_jax.hardware.

Then the increases over paper-1.6b at P = 1, of P streams and of the dense model of equal loss
(the real 1.6B/2.8B/4.4B at their observed Stack-v2-Python losses, linear in loss, as the
paper's protocol reads its real models), beside the cost model's (``scaling cost``): the project
protocol (this engine's roofline vs the law's width-scaled dense model, on the same accelerator)
and the paper protocol (llm-analysis conventions, same accelerator). Each compile runs in its own
process; results are cached in the JSON (``--fresh`` recompiles). Writes
``bench/results/decode_memory.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

GiB = 2 ** 30
NAME = "decode_memory"
BASE = "paper-1.6b"
PROGRAMS = [(BASE, 1), (BASE, 2), (BASE, 4), (BASE, 8), ("paper-2.8b", 1), ("paper-4.4b", 1)]
BATCHES = (1, 8)
DATASET = "stack-v2-python"


def protocol_lengths() -> tuple[int, ...]:
    from parscale_jax.scaling.cost import LENGTHS

    return LENGTHS


def cache_len() -> int:
    """Input + output tokens, averaged over the protocol's lengths (480)."""
    return int(round(np.mean([2 * n for n in protocol_lengths()])))


def aot_args(topology: str, model: str, P: int, batch: int, serve: str) -> list[str]:
    return ["--config", f"configs/{model}.yaml", "--topology", topology, "--decode", "--batch", str(batch),
            "--max-len", str(cache_len()), f"model.parscale_n={P}", "dtype=bfloat16", "--serve-dtype", serve]


def compile_one(args: list[str]) -> dict:
    """One compile in a fresh process: its report, or {"unavailable": the one-line error}."""
    return B.aot_compile(args, NAME, unavailable_ok=True)


def accelerator(topology: str):
    """The hardware.ACCELERATORS entry of a topology ('v5e:1x1' -> tpu-v5e, 'h100' -> h100), or None."""
    from parscale_jax import aot
    from parscale_jax.errors import UserError
    from parscale_jax.hardware import ACCELERATORS

    try:
        return ACCELERATORS[aot.parse_topology(topology)[0]]
    except UserError:
        return ACCELERATORS.get(topology.split(":")[0].lower())


def step_row(r: dict, acc) -> dict:
    """Per-chip memory, bytes and FLOPs of one step, and its latency estimate on ``acc``."""
    pc = r["per_chip_bytes"]
    bytes_step = pc["arguments"]  # the weights and the whole (masked) cache are read every step
    # the model's FLOPs (XLA's cost analysis counts a scanned layer's loop body once: it
    # reports about a 36th of the layers' FLOPs and bytes; kept beside for reference)
    flops = r["model_flops_per_step"] / r["chips"]
    t_mem, t_flop = bytes_step / acc.hbm_bandwidth, flops / acc.bf16_flops
    return dict(total=pc["total"], arguments=pc["arguments"], temporaries=pc["temporaries"], aliased=pc["aliased"],
                weights=r["analytic_bytes"]["params"], cache=r["cache_bytes"], bytes_step=bytes_step,
                xla_bytes_accessed=r["step_cost"]["bytes_accessed"], xla_flops=r["step_cost"]["flops"], flops=flops, t_mem=t_mem, t_flop=t_flop,
                latency=max(t_mem, t_flop), bound="memory" if t_mem >= t_flop else "compute")


def observed_losses() -> dict[str, float]:
    """Observed Stack-v2-Python losses of the compiled programs (the paper's data)."""
    from parscale_jax.scaling.law import load_losses
    from parscale_jax.scaling.shapes import shape_from_preset

    data = load_losses()
    data.select(DATASET)
    out = {}
    for model, P in PROGRAMS:
        loss = data.observed(DATASET, shape_from_preset(model).nonembedding_params(P), P)
        if loss is None:
            raise SystemExit(f"no observed {DATASET} loss for {model} at P={P}")
        out[f"{model}@{P}"] = float(loss)
    return out


def dense_at(points: list[tuple[float, float]], loss: float) -> float:
    """The dense models' value, linear in loss (the end segment beyond their range), as the
    paper's protocol reads its real models."""
    xs, ys = zip(*sorted(points))
    j = int(np.clip(np.searchsorted(xs, loss), 1, len(xs) - 1))
    return ys[j - 1] + (ys[j] - ys[j - 1]) * (loss - xs[j - 1]) / (xs[j] - xs[j - 1])


def compiled_increases(steps: dict, losses: dict, batch: int) -> list[dict]:
    """P streams vs the dense models of equal loss, from the compiled rows of one batch."""
    base = steps[(BASE, 1, batch)]
    dense = [(losses[f"{m}@1"], steps[(m, 1, batch)]) for m in (BASE, "paper-2.8b", "paper-4.4b")]
    rows = []
    for P in (2, 4, 8):
        par, loss = steps[(BASE, P, batch)], losses[f"{BASE}@{P}"]
        row = dict(P=P, batch=batch, loss=loss)
        for key in ("total", "latency", "weights", "cache", "temporaries"):
            d = dense_at([(x, s[key]) for x, s in dense], loss)
            row[f"{key}_increase_parscale"] = par[key] - base[key]
            row[f"{key}_increase_dense"] = d - base[key]
        for key in ("total", "latency"):
            row[f"{key}_ratio"] = row[f"{key}_increase_dense"] / row[f"{key}_increase_parscale"]
        rows.append(row)
    return rows


def model_increases(acc) -> dict[str, list[dict]]:
    """``scaling cost`` on the same accelerator: both protocols, P 1..8, batch 1 and 8."""
    from parscale_jax.scaling.cost import Hardware, compare_at_equal_loss
    from parscale_jax.scaling.law import law_for, load_losses
    from parscale_jax.scaling.paper_cost import paper_comparison
    from parscale_jax.scaling.shapes import shape_from_preset

    hw = Hardware(acc.name, acc.bf16_flops, acc.hbm_bandwidth, acc.hbm_bytes)
    data = load_losses()
    constants = law_for(data, DATASET)[0]
    project = compare_at_equal_loss(shape_from_preset(BASE), [1, 2, 4, 8], list(BATCHES), hw, constants)
    paper = paper_comparison(BASE, [1, 2, 4, 8], list(BATCHES), hw, load_losses(), DATASET)
    return {"project": project, "paper": paper}


def parts_check(steps: dict, project: list[dict], batch: int) -> dict:
    """The compiled P = 8 vs P = 1 memory increase against the project protocol's, part by part."""
    c8, c1 = steps[(BASE, 8, batch)], steps[(BASE, 1, batch)]
    m8 = next(r for r in project if r["P"] == 8 and r["batch"] == batch)["parscale"]
    m1 = next(r for r in project if r["P"] == 1 and r["batch"] == batch)["parscale"]
    out = {"batch": batch,
           "compiled": {"weights": c8["weights"] - c1["weights"], "cache": c8["cache"] - c1["cache"],
                        "other": (c8["total"] - c8["weights"] - c8["cache"]) - (c1["total"] - c1["weights"] - c1["cache"]),
                        "total": c8["total"] - c1["total"]},
           "model": {"weights": m8["weights_bytes"] - m1["weights_bytes"], "cache": m8["kv_cache_bytes"] - m1["kv_cache_bytes"],
                     "other": m8["activation_bytes"] - m1["activation_bytes"],
                     "total": m8["memory_bytes"] - m1["memory_bytes"]}}
    out["relative_difference"] = out["compiled"]["total"] / out["model"]["total"] - 1
    out["within_15_percent"] = abs(out["relative_difference"]) <= 0.15
    return out


def run_compiles(a, cache: dict) -> dict:
    programs = [(m, P) for m, P in PROGRAMS if not a.only or f"{m}@{P}" in a.only]
    for topo in a.topology:
        for model, P in programs:
            for b in BATCHES:
                key = f"{topo}|{model}|{P}|{b}|{a.serve_dtype}"
                if key in cache and not a.fresh:
                    continue
                B.log(f"compiling {key} ...")
                cache[key] = compile_one(aot_args(topo, model, P, b, a.serve_dtype))
                B.log(f"  {cache[key].get('unavailable') or format(cache[key]['per_chip_bytes']['total'] / GiB, '.3f') + ' GiB/chip'}")
                save(cache, partial=True, path=a.cache)
                if "unavailable" in cache[key]:
                    break
            if "unavailable" in cache.get(f"{topo}|{model}|{P}|1|{a.serve_dtype}", {}):
                break
    return cache


def save(cache: dict, partial: bool = False, payload: dict | None = None, md: str = "", path: str = "") -> None:
    payload = dict(payload or {}, compiles=cache)
    if partial:
        path = path or os.path.join(B.RESULTS, f"{NAME}.json")
        old = json.load(open(path)) if os.path.exists(path) else {}
        payload = {**old, "compiles": cache}
        from parscale_jax.fileio import atomic_file

        with atomic_file(path) as f:
            json.dump(payload, f, indent=1)
        return
    B.write_results(NAME, payload, md, "Decode memory and latency of P streams vs parameters, from compiled programs")


def analyse(a, cache: dict) -> dict:
    """Per topology: the step rows, the compiled increases and the cost model's."""
    losses = observed_losses()
    out = {"losses": losses, "cache_len": cache_len(), "topologies": {}}
    for topo in a.topology:
        recs = {(m, P, b): cache[f"{topo}|{m}|{P}|{b}|{a.serve_dtype}"] for m, P in PROGRAMS for b in BATCHES
                if f"{topo}|{m}|{P}|{b}|{a.serve_dtype}" in cache}
        bad = [r["unavailable"] for r in recs.values() if "unavailable" in r]
        acc = accelerator(topo)
        if bad or acc is None or len(recs) < len(PROGRAMS) * len(BATCHES):
            out["topologies"][topo] = {"unavailable": bad[0] if bad else "no accelerator entry or compiles missing"}
            continue
        steps = {k: step_row(r, acc) for k, r in recs.items()}
        model = model_increases(acc)
        out["topologies"][topo] = {
            "accelerator": acc.key, "steps": [dict(model=k[0], P=k[1], batch=k[2], **v) for k, v in steps.items()],
            "compiled": [r for b in BATCHES for r in compiled_increases(steps, losses, b)],
            "model": {p: [{k: v for k, v in r.items() if k not in ("parscale", "dense", "base")} for r in rows]
                      for p, rows in model.items()},
            "parts_check": [parts_check(steps, model["project"], b) for b in BATCHES]}
    return out


# ---- report -------------------------------------------------------------------------------------
def _g(x: float) -> str:
    return f"{x / GiB:.3f}"


def markdown(res: dict, a) -> str:
    lines = [f"Decode step compiled by `python -m parscale_jax.aot --decode` (weights served in {a.serve_dtype}, "
             f"cache donated, cache of {res['cache_len']} tokens = mean input + output of the paper's protocol), "
             f"one chip per topology. GiB per chip; bytes/step = the step's arguments (every weight and the "
             f"whole cache are read once); latency = max(bytes / HBM bandwidth, FLOPs / peak). Dense of equal "
             f"loss: the real paper-1.6b/2.8b/4.4b at their observed {DATASET} losses, linear in loss.", ""]
    for topo, t in res["topologies"].items():
        lines.append(f"## {topo}")
        if "unavailable" in t:
            lines += ["", f"unavailable: `{t['unavailable']}`", ""]
            continue
        lines += ["", B.md_table(
            ["model", "P", "batch", "total", "weights", "cache", "temporaries", "aliased", "bytes/step",
             "XLA bytes accessed (loop body once)", "GFLOP/step", "latency ms", "bound"],
            [[s["model"], s["P"], s["batch"], _g(s["total"]), _g(s["weights"]), _g(s["cache"]), _g(s["temporaries"]),
              _g(s["aliased"]), _g(s["bytes_step"]), _g(s["xla_bytes_accessed"]), f"{s['flops'] / 1e9:.1f}",
              f"{s['latency'] * 1e3:.3f}", s["bound"]] for s in t["steps"]]), ""]
        proj = {(r["P"], r["batch"]): r for r in t["model"]["project"]}
        pap = {(r["P"], r["batch"]): r for r in t["model"]["paper"]}
        lines += ["Increases over paper-1.6b at P = 1 (GiB, ms) and dense/ParScale ratios: compiled, then the cost "
                  "model (`scaling cost`, same accelerator), project and paper protocols.", "", B.md_table(
                      ["P", "batch", "mem +ParScale", "mem +dense", "mem ratio", "project mem ratio",
                       "paper mem ratio", "lat +ParScale", "lat +dense", "lat ratio", "project lat ratio",
                       "paper lat ratio"],
                      [[r["P"], r["batch"], _g(r["total_increase_parscale"]), _g(r["total_increase_dense"]),
                        f"{r['total_ratio']:.1f}", f"{proj[(r['P'], r['batch'])]['memory_ratio']:.1f}",
                        f"{pap[(r['P'], r['batch'])]['memory_ratio']:.1f}",
                        f"{r['latency_increase_parscale'] * 1e3:.3f}", f"{r['latency_increase_dense'] * 1e3:.3f}",
                        f"{r['latency_ratio']:.1f}", f"{proj[(r['P'], r['batch'])]['latency_ratio']:.1f}",
                        f"{pap[(r['P'], r['batch'])]['latency_ratio']:.1f}"] for r in t["compiled"]]), ""]
        lines += ["P = 8 vs P = 1 memory increase, compiled vs the project protocol's model, by part (GiB; the "
                  "model's 'other' is the prefill's peak activations, the compiled 'other' the step's temporaries, "
                  "outputs not aliased and code):", "", B.md_table(
                      ["batch", "weights (compiled / model)", "cache", "other", "total", "compiled / model - 1",
                       "within 15%"],
                      [[c["batch"], f"{_g(c['compiled']['weights'])} / {_g(c['model']['weights'])}",
                        f"{_g(c['compiled']['cache'])} / {_g(c['model']['cache'])}",
                        f"{_g(c['compiled']['other'])} / {_g(c['model']['other'])}",
                        f"{_g(c['compiled']['total'])} / {_g(c['model']['total'])}",
                        f"{c['relative_difference']:+.1%}", "yes" if c["within_15_percent"] else "no"]
                       for c in t["parts_check"]]), ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    topos = [k for k, t in res["topologies"].items() if "unavailable" not in t]
    if not topos:
        return
    fig, axes = plt.subplots(len(topos), 2, figsize=(10, 3.8 * len(topos)), squeeze=False)
    for i, topo in enumerate(topos):
        t = res["topologies"][topo]
        for j, (key, mkey, label) in enumerate((("total", "memory", "memory"), ("latency", "latency", "latency"))):
            ax = axes[i][j]
            for b, mark in zip(BATCHES, ("o", "s")):
                rows = [r for r in t["compiled"] if r["batch"] == b]
                proj = [r for r in t["model"]["project"] if r["batch"] == b and r["P"] > 1]
                pap = [r for r in t["model"]["paper"] if r["batch"] == b and r["P"] > 1]
                Ps = [r["P"] for r in rows]
                ax.plot(Ps, [r[f"{key}_ratio"] for r in rows], marker=mark, label=f"compiled, batch {b}")
                ax.plot(Ps, [r[f"{mkey}_ratio"] for r in proj], marker=mark, ls="--", label=f"project model, batch {b}")
                ax.plot(Ps, [r[f"{mkey}_ratio"] for r in pap], marker=mark, ls=":", label=f"paper model, batch {b}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("P")
            ax.set_ylabel(f"{label} increase: dense / ParScale")
            ax.set_title(f"{topo}: {label}")
            ax.legend(fontsize=7)
    B.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", nargs="+", default=["v5e:1x1"],
                    help="aot topologies, one chip each (e.g. v5e:1x1 h100); unknown ones are marked unavailable")
    ap.add_argument("--serve-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--fresh", action="store_true", help="recompile (ignore the compiles cached in the JSON)")
    ap.add_argument("--only", nargs="+", default=None, metavar="MODEL@P",
                    help="compile only these programs (e.g. paper-2.8b@1), into --cache, and stop")
    ap.add_argument("--cache", default=None, help="with --only: the JSON its compiles go to (merged by hand)")
    a = ap.parse_args(argv)
    path = os.path.join(B.RESULTS, f"{NAME}.json")
    cache = {} if a.fresh or not os.path.exists(path) else json.load(open(path)).get("compiles", {})
    if a.only:
        run_compiles(a, {})
        return 0
    cache = run_compiles(a, cache)
    res = analyse(a, cache)
    md = markdown(res, a)
    save(cache, payload={**res, "command": B.command_line()}, md=md)
    plot(res, os.path.join(B.RESULTS, f"{NAME}.png"))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
