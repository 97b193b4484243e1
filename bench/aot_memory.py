"""Per-chip memory of the paper's six backbones x P on a TPU slice or GPUs, compiled on this CPU host.

    .venv/bin/python bench/aot_memory.py                      # v5p:4x4x2 (v5p-64, 32 chips), seq 2048
    .venv/bin/python bench/aot_memory.py --models paper-0.5b --P 8 --topology v5p:2x2x2
    .venv/bin/python bench/aot_memory.py --topology h100:8 --seq 4096     # 8x H100 (fsdp=8)
    .venv/bin/python bench/aot_memory.py --topology h100 --no-slope       # one H100, 1 sequence only

For each backbone (configs/paper-*.yaml) and P, ``python -m parscale_jax.aot`` compiles train.py's
step (bf16, remat=full, fsdp over every chip, one sequence per chip) and, for the largest
sequences per chip, the same step at two sequences per chip: memory is affine in the batch, so
the two compiles give bytes per extra sequence and the largest count that fits the chip's HBM
(``--verify`` compiles that count too). Each compile runs in its own process; results are cached
in the JSON (``--fresh`` recompiles), so an interrupted run resumes. Also reported: model FLOPs
per step (parscale_jax.flops) and the project's analytic estimate over the compiled total.
Writes ``bench/results/aot_memory.{json,md}`` for TPU topologies and
``bench/results/aot_memory_gpu.{json,md}`` for GPU ones (that table: every GPU topology and
sequence length compiled so far, one section each; ``fits`` against the memory JAX can use).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

GiB = 2 ** 30
MODELS = ["paper-0.5b", "paper-0.7b", "paper-1.1b", "paper-1.6b", "paper-2.8b", "paper-4.4b"]
NAME = "aot_memory"


def aot_args(model: str, P: int, seq: int, topology: str, chips: int, per_chip: int) -> list[str]:
    return ["--config", f"configs/{model}.yaml", "--topology", topology, f"model.parscale_n={P}",
            f"data.seq_len={seq}", f"batch_size={chips * per_chip}", f"mesh.fsdp={chips}", "mesh.data=1"]


def compile_one(args: list[str]) -> dict:
    """One compile in a fresh process (its memory is returned when it ends)."""
    return B.aot_compile(args, NAME)


def row(cache: dict, model: str, P: int, a) -> dict:
    """Compile at 1 and 2 sequences/chip (cached), fit the line, optionally verify its answer."""
    chips = a.chips
    got = {}
    for b in (1,) + (() if a.no_slope else (2,)) + ((a.verify_at.get((model, P)),) if a.verify_at.get((model, P)) else ()):
        key = f"{model}/P{P}/seq{a.seq}/{a.topology}/b{b}"
        if a.cached_only and key not in cache:
            continue
        if key not in cache or a.fresh:
            B.log(f"compiling {key} ...")
            cache[key] = compile_one(aot_args(model, P, a.seq, a.topology, chips, b))
            B.log(f"  {cache[key]['per_chip_bytes']['total'] / GiB:.2f} GiB in {cache[key]['compile_s']:.0f} s")
        got[b] = cache[key]
    if 1 not in got:
        return None
    one, two = got[1], got.get(2)
    from parscale_jax import aot  # the analytic estimate of this checkout (no compile)

    analytic = aot.analytic_train_bytes(aot.resolve_config(f"configs/{model}.yaml", aot_args(
        model, P, a.seq, a.topology, chips, 1)[4:]), one["mesh"], "gpu" if aot.is_gpu(a.topology) else "tpu")
    per_seq = two["per_chip_bytes"]["total"] - one["per_chip_bytes"]["total"] if two else None
    hbm = one.get("budget_bytes", one["hbm_bytes"])
    largest = None
    if per_seq is not None:
        largest = 1 + int((hbm - one["per_chip_bytes"]["total"]) // max(per_seq, 1)) if one["fits"] else 0
    return {"model": model, "P": P, "seq": a.seq, "topology": a.topology, "chips": chips,
            "per_chip_total": one["per_chip_bytes"]["total"], "per_chip": one["per_chip_bytes"],
            "bytes_per_sequence": per_seq, "largest_sequences_per_chip": largest,
            "model_flops_per_step": one["model_flops_per_step"], "analytic_total": analytic["total"],
            "analytic": analytic, "attention_impl": one["attention_impl"], "fits": one["fits"],
            "hbm_bytes": one["hbm_bytes"], "budget_bytes": hbm, "compile_s": one["compile_s"],
            "verified": {str(b): got[b]["per_chip_bytes"]["total"] for b in got if b > 2},
            "command": B.aot_command(aot_args(model, P, a.seq, a.topology, chips, 1))}


def markdown(rows: list[dict], a) -> str:
    head = ["model", "P", "per-chip total (1 seq/chip)", "per extra sequence", "largest sequences/chip",
            "model FLOPs/step (1 seq/chip)", "analytic / compiled", "fits"]
    na = "not compiled yet"
    body = [[r["model"], r["P"], f"{r['per_chip_total'] / GiB:.2f} GiB",
             f"{r['bytes_per_sequence'] / GiB:.2f} GiB" if r["bytes_per_sequence"] is not None else na,
             r["largest_sequences_per_chip"] if r["largest_sequences_per_chip"] is not None else na,
             f"{r['model_flops_per_step']:.3e}",
             f"{r['analytic_total'] / r['per_chip_total']:.2f}", "yes" if r["fits"] else "no"] for r in rows]
    hbm = rows[0]["hbm_bytes"] / GiB if rows else 0
    budget = (f"; fits = the total is at most {rows[0]['budget_bytes'] / GiB:.2f} GiB, the memory JAX can use"
              if rows and rows[0]["budget_bytes"] != rows[0]["hbm_bytes"] else "")
    text = [f"Topology {a.topology} ({a.chips} chips, {hbm:.2f} GiB memory each{budget}), seq {a.seq}, bf16, remat=full, "
            f"fsdp={a.chips}, attention {rows[0]['attention_impl'] if rows else '?'}; one row's command:", "",
            f"    {rows[0]['command'] if rows else ''}", "",
            "(batch_size = chips x sequences/chip; largest sequences/chip from the compiles at 1 and 2 "
            "sequences/chip: memory is affine in the batch)", "", B.md_table(head, body)]
    checks = [r for r in rows if r["verified"]]
    if checks:
        text += ["", "Checks of the fit (compiled at the predicted largest count):", ""]
        text += [f"- {r['model']} P={r['P']}: {b} sequences/chip -> {v / GiB:.2f} GiB "
                 f"(fits: {v <= r['budget_bytes']})" for r in checks for b, v in r["verified"].items()]
    return "\n".join(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--topology", default="v5p:4x4x2", help="TPU slice (default v5p-64: 32 chips)")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--P", nargs="+", type=int, default=[1, 2, 4, 8])
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--verify", nargs="*", default=[], metavar="MODEL:P",
                    help="also compile the predicted largest count for these rows (e.g. paper-0.5b:8)")
    ap.add_argument("--fresh", action="store_true", help="recompile cached rows")
    ap.add_argument("--jobs", type=int, default=1, help="compiles at a time (each a process)")
    ap.add_argument("--cached-only", action="store_true", help="no compiles: the table of what is cached")
    ap.add_argument("--no-slope", action="store_true", help="compile 1 sequence/chip only (no largest count)")
    a = ap.parse_args(argv)
    from parscale_jax import aot

    name = NAME + ("_gpu" if aot.is_gpu(a.topology) else "")

    a.chips = 1
    for d in aot.parse_topology(a.topology)[1]:
        a.chips *= d
    path = os.path.join(B.RESULTS, f"{name}.json")
    cache = json.load(open(path)).get("compiles", {}) if os.path.exists(path) else {}
    a.verify_at = {}
    if a.jobs > 1 and not a.cached_only:  # compile the rows' two batches ahead, a.jobs processes at a time
        from concurrent.futures import ThreadPoolExecutor

        todo = {f"{m}/P{P}/seq{a.seq}/{a.topology}/b{b}": aot_args(m, P, a.seq, a.topology, a.chips, b)
                for b in (1,) + (() if a.no_slope else (2,)) for m in a.models for P in a.P}  # every row's total first
        todo = {k: v for k, v in todo.items() if a.fresh or k not in cache}
        with ThreadPoolExecutor(a.jobs) as pool:
            for key, res in zip(todo, pool.map(compile_one, todo.values())):
                cache[key] = res
                B.log(f"{key}: {res['per_chip_bytes']['total'] / GiB:.2f} GiB in {res['compile_s']:.0f} s")
                with open(path + ".tmp", "w") as f:
                    json.dump({"compiles": cache}, f)
                os.replace(path + ".tmp", path)
    rows = []
    for model in a.models:
        for P in a.P:
            r = row(cache, model, P, a)
            if r is None:
                continue
            if f"{model}:{P}" in a.verify and r["largest_sequences_per_chip"]:  # compile the predicted count
                a.verify_at[(model, P)] = r["largest_sequences_per_chip"]
                r = row(cache, model, P, a)
            rows.append(r)
            if name == NAME:
                B.write_results(NAME, {"rows": rows, "compiles": cache, "command": B.command_line()},
                                markdown(rows, a), "Per-chip memory of the paper's backbones (AOT-compiled for TPU)")
            else:  # every GPU topology and sequence length compiled so far, one section each
                sections = gpu_sections(cache, a)
                B.write_results(name, {"rows": [r for _, rs in sections for r in rs], "compiles": cache,
                                       "command": B.command_line()}, "\n\n".join(md for md, _ in sections),
                                "Per-GPU memory of the paper's backbones (AOT-compiled for NVIDIA GPUs)")
    print(markdown(rows, a))
    return 0


def gpu_sections(cache: dict, a) -> list[tuple[str, list[dict]]]:
    """(markdown, rows) per (topology, seq) in the cache, from its compiles alone."""
    from parscale_jax import aot

    out = []
    groups = sorted({(k.split("/")[3], int(k.split("/")[2][3:])) for k in cache}, key=lambda t: (-len(t[0]), t))
    for topology, seq in groups:
        # from the cache alone: every cached 2-sequence compile counts, whatever this run's --no-slope
        b = argparse.Namespace(**{**vars(a), "topology": topology, "seq": seq, "cached_only": True, "verify_at": {},
                                  "no_slope": False,
                                  "chips": math.prod(aot.parse_topology(topology)[1])})
        rows = [r for m in MODELS for P in (1, 2, 4, 8) if (r := row(cache, m, P, b)) is not None]
        if rows:
            out.append((markdown(rows, b), rows))
    return out


if __name__ == "__main__":
    sys.exit(main())
