"""The ``cost`` and ``plan`` commands: tables on stdout, ``--json`` files, plots."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.fileio import write_text
from parscale_jax.scaling.cost import HARDWARE, Hardware, compare_at_equal_loss, inference_cost, load_measurements
from parscale_jax.scaling.law import LawConstants, law_for, load_losses
from parscale_jax.scaling.paper_cost import paper_comparison
from parscale_jax.scaling.plan import (ChinchillaLaw, PlanCosts, chinchilla_compute_for_params, chinchilla_optimum,
                                       phase_peak, phase_price, plan_optimum)
from parscale_jax.scaling.plots import check_writable, plot_cost, plot_plan
from parscale_jax.scaling.shapes import shape_from_preset

PAPER_HEADLINE = {"memory_ratio": 22.0, "latency_ratio": 6.0}  # the paper, 1.6B, P=8, batch 1
GiB = 2.0 ** 30


def law_source(args: argparse.Namespace) -> tuple[LawConstants, str]:
    """--constants (a file or inline JSON; a fit JSON keyed by dataset is fine) or the fit of --dataset."""
    if getattr(args, "constants", None):
        text = args.constants
        src = text if text.lstrip().startswith("{") else None
        if src is None:
            if Path(text).is_dir():
                raise UserError(f"--constants {text!r} is a directory: pass the JSON file (e.g. from 'fit --json')")
            if not Path(text).is_file():
                raise UserError(f"--constants {text!r}: no such file: pass a JSON file or inline JSON like "
                                "'{\"E\":0.69,\"A\":0.0113,\"alpha\":0.189,\"k\":0.393}'")
            src = Path(text).read_text(encoding="utf-8-sig", errors="replace")
        try:
            d = json.loads(src)
        except json.JSONDecodeError as e:
            raise UserError(f"--constants: invalid JSON ({e.msg}): fix it or use 'fit --json'") from None
        if not isinstance(d, dict):
            raise UserError("--constants: expected a JSON object with E, A, alpha, k")
        if "E" not in d:
            keys = [k for k, v in d.items() if isinstance(v, dict)]
            name = args.dataset or (keys[0] if len(keys) == 1 else None)
            if name is None or name not in d:
                raise UserError(f"--constants holds datasets {keys}: pick one with --dataset")
            return LawConstants.from_mapping(d[name], where=f"--constants[{name}]"), name
        return LawConstants.from_mapping(d, where="--constants"), "given constants"
    return law_for(load_losses(args.data), args.dataset or "stack-v2-python")


def hardware(args: argparse.Namespace) -> Hardware:
    key = args.hardware.lower()
    if key not in HARDWARE:
        raise UserError(f"unknown hardware {args.hardware!r}: choose one of {sorted(HARDWARE)} "
                        "or give --peak-flops and --bandwidth")
    hw = HARDWARE[key]
    if args.peak_flops or args.bandwidth or args.memory_gb:
        hw = Hardware(f"{hw.name} (overridden)", args.peak_flops or hw.peak_flops, args.bandwidth or hw.bandwidth,
                      (args.memory_gb * 1e9) if args.memory_gb else hw.memory_bytes)
    return hw


def _finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None (valid JSON)."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj: Any) -> None:
    write_text(str(path), json.dumps(_finite(obj), indent=1) + "\n")
    print(f"wrote {path}")


def _x(v: float) -> str:
    return f"{v:>6.1f}" if math.isfinite(v) else f"{'-':>6}"


def _print_rows(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'batch':>5} {'P':>2} {'loss':>7} | {'ParScale':^15} | {'param. scaling':^15} | "
          f"{'memory increase (GiB)':^24} | {'latency increase (ms)':^24}")
    print(f"{'':>16} | {'GiB':>7} {'s':>7} | {'GiB':>7} {'s':>7} | {'ParS':>8} {'dense':>8} {'x less':>6} | "
          f"{'ParS':>8} {'dense':>8} {'x less':>6}")
    for r in rows:
        par, den = r["parscale"], r["dense"]
        mark = " (extrapolated)" if r.get("extrapolated") else ""
        print(f"{r['batch']:>5} {r['P']:>2} {r['loss']:>7.4f} | {par['memory_bytes'] / GiB:>7.3f} "
              f"{par['latency_s']:>7.4f} | {den['memory_bytes'] / GiB:>7.3f} {den['latency_s']:>7.4f} | "
              f"{r['memory_increase_parscale'] / GiB:>8.4f} {r['memory_increase_dense'] / GiB:>8.4f} "
              f"{_x(r['memory_ratio'])} | {r['latency_increase_parscale'] * 1e3:>8.2f} "
              f"{r['latency_increase_dense'] * 1e3:>8.2f} {_x(r['latency_ratio'])}{mark}")


def _print_parts(rows: Sequence[dict[str, Any]]) -> None:
    b = min(r["batch"] for r in rows)
    print(f"memory parts at batch {b} (GiB; mean over lengths): weights + KV cache + activations")
    for r in (r for r in rows if r["batch"] == b):
        for who in ("parscale", "dense"):
            m = r[who]
            if "weights_bytes" in m and (who == "parscale" or r["P"] > 1):
                label = f"P={r['P']}" if who == "parscale" else f"dense at P={r['P']}'s loss"
                print(f"  {label:<22} {m['weights_bytes'] / GiB:8.4f} + {m['kv_cache_bytes'] / GiB:7.4f} + "
                      f"{m['activation_bytes'] / GiB:7.4f} = {m['memory_bytes'] / GiB:8.4f}")


def _summary(name: str, setting: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    at = next(r for r in rows if r["batch"] == min(x["batch"] for x in rows) and r["P"] == max(x["P"] for x in rows))
    return dict(protocol=name, setting=setting, P=at["P"], batch=at["batch"], memory_ratio=at["memory_ratio"],
                latency_ratio=at["latency_ratio"], rows=rows)


def _paper(args: argparse.Namespace, hw: Hardware, Ps: list[int], batches: list[int],
           lengths: list[int]) -> dict[str, Any]:
    dataset = args.dataset or "stack-v2-python"
    rows = paper_comparison(args.base, Ps, batches, hw, load_losses(args.data), dataset, lengths,
                            flop_eff=args.flop_eff, bw_eff=args.bw_eff)
    setting = (f"{args.base} on {hw.name} at {args.flop_eff:.0%} of {hw.peak_flops / 1e12:.0f} TFLOP/s and "
               f"{args.bw_eff:.0%} of {hw.bandwidth / 1e12:.2f} TB/s, fp16, llm-analysis conventions (the authors' "
               f"cost_analysis.py); mean over input = output length {lengths}; parameter scaling = the real P=1 "
               f"models at their observed {dataset} losses, linear in loss")
    print(f"== paper protocol: {setting}")
    _print_rows(rows)
    _print_parts(rows)
    return _summary("paper", setting, rows)


def _project(args: argparse.Namespace, hw: Hardware, Ps: list[int], batches: list[int],
             lengths: list[int]) -> dict[str, Any]:
    c, src = law_source(args)
    base = shape_from_preset(args.base)
    rows = compare_at_equal_loss(base, Ps, batches, hw, c, lengths=lengths, flop_eff=args.flop_eff,
                                 bw_eff=args.bw_eff, prefix_mode=args.prefix_mode)
    setting = (f"{args.base} ({base.describe()}) on {hw.name} at {args.flop_eff:.0%} / {args.bw_eff:.0%}, bf16, "
               f"per-operator roofline of parscale_jax's generate call, prefix as {args.prefix_mode}; mean over "
               f"input = output length {lengths}; parameter scaling = the widths scaled to N_P (k ln P + 1) "
               f"(law: {src}, k={c.k:.4f}); losses predicted")
    print(f"== project protocol: {setting}")
    _print_rows(rows)
    _print_parts(rows)
    too_big = sorted({r["batch"] for r in rows if not (r["parscale"]["fits_in_memory"] >= 1 and
                                                       r["dense"]["fits_in_memory"] >= 1)})
    if too_big:
        print(f"note: at batch {too_big} some models exceed the {hw.memory_bytes / 1e9:.0f} GB of one {hw.name}")
    return _summary("project", setting, rows)


def _print_measured(args: argparse.Namespace, hw: Hardware, recs: list[dict[str, Any]]) -> None:
    print(f"\nmeasured vs the project's model ({args.measured}):")
    print(f"{'model':>14} {'hardware':>10} {'P':>2} {'batch':>5} {'in+out':>7} {'measured s':>11} "
          f"{'model s':>9} {'meas/model':>10}")
    for m in recs:
        h = HARDWARE[m["hardware"]] if m["hardware"] else hw
        pred = inference_cost(m["shape"], m["P"], m["batch"], h, input_tokens=m["input_tokens"],
                              output_tokens=m["output_tokens"], flop_eff=args.flop_eff, bw_eff=args.bw_eff,
                              prefix_mode=args.prefix_mode)
        print(f"{m['model']:>14} {m['hardware'] or args.hardware:>10} {m['P']:>2} {m['batch']:>5} "
              f"{m['input_tokens']:>3}+{m['output_tokens']:<3} {m['latency_s']:>11.4g} {pred['latency_s']:>9.3g} "
              f"{m['latency_s'] / pred['latency_s']:>10.2f}")


def cmd_cost(args: argparse.Namespace) -> int:
    check_writable(args.plot, args.json)
    recs = load_measurements(args.measured) if args.measured else []
    hw = hardware(args)
    Ps, batches, lengths = sorted(set([1] + args.P)), sorted(set(args.batch)), sorted(set(args.lengths))
    out: dict[str, Any] = {}
    if args.protocol in ("paper", "both"):
        out["paper"] = _paper(args, hw, Ps, batches, lengths)
        print()
    if args.protocol in ("project", "both"):
        out["project"] = _project(args, hw, Ps, batches, lengths)
        print()
    for s in out.values():
        print(f"{s['protocol'] + ' protocol':<17} batch {s['batch']}, P={s['P']}: {_x(s['memory_ratio'])}x less "
              f"memory increase, {_x(s['latency_ratio'])}x less latency increase than parameter scaling")
    print(f"{'paper (Fig. 4)':<17} batch 1, P=8: up to {PAPER_HEADLINE['memory_ratio']:.0f}x less memory increase, "
          f"{PAPER_HEADLINE['latency_ratio']:.0f}x less latency increase (1.6B)")
    if recs:
        _print_measured(args, hw, recs)
    if args.json:
        write_json(args.json, out[args.protocol] if args.protocol != "both" else out)
    if args.plot:
        plot_cost([(s["protocol"], s["rows"]) for s in out.values()], args.plot, f"{args.base}, {hw.name}")
        print(f"wrote {args.plot}")
    return 0


def _plan_target(args: argparse.Namespace, law: ChinchillaLaw) -> tuple[float, str]:
    given = [x is not None for x in (args.target_loss, args.train_flops, args.chinchilla_params)]
    if sum(given) > 1:
        raise UserError("give only one of --target-loss, --train-flops, --chinchilla-params")
    if args.target_loss is not None:
        if args.target_loss <= law.E:
            raise UserError(f"--target-loss {args.target_loss} must exceed E = {law.E}: choose a larger loss")
        return args.target_loss, f"target loss {args.target_loss:.4f}"
    if args.train_flops is not None:
        n, d = chinchilla_optimum(law, args.train_flops)
        return float(law.loss(n, d)), f"Chinchilla-optimal loss of {args.train_flops:.3g} training FLOPs"
    n_param = args.chinchilla_params or 7e9
    n, d = chinchilla_optimum(law, chinchilla_compute_for_params(law, n_param))
    return float(law.loss(n, d)), f"quality of a Chinchilla-optimal {n_param / 1e9:g}B model ({d / 1e9:.0f}B tokens)"


def plan_costs(args: argparse.Namespace, decode_sharing: bool | None = None) -> PlanCosts:
    """The dollars objective's knobs from the command line (defaults: Sardana et al.'s)."""
    def peak(phase: str) -> float:
        given = getattr(args, f"{phase}_peak_flops")
        return given or phase_peak(getattr(args, f"{phase}_gpu"), getattr(args, f"{phase}_dtype"), phase)

    def price(phase: str) -> float:
        return getattr(args, f"{phase}_price") or phase_price(getattr(args, f"{phase}_gpu"), phase)

    sharing = args.decode_sharing == "on" if decode_sharing is None else decode_sharing
    return PlanCosts("dollars", peak("train"), price("train"), args.train_mfu, peak("infer"), price("infer"),
                     args.prefill_mfu, args.decode_mfu, sharing)


def _plan_rows(res: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [dict(P=r["P"], params=r["N"], tokens=r["D"], train=r["train_cost"], inference=r["inference_cost"],
                 total=r["total_cost"], tokens_per_param=r["tokens_per_param"], decode_mfu=r["decode_mfu"],
                 chinchilla_total=r["chinchilla_total_cost"], solver=r["solver"]) for r in res]


def _print_plan(res: Sequence[dict[str, Any]], unit: str) -> None:
    best = min(res, key=lambda r: r["total_cost"])
    print(f"{'P':>2} {'N':>9} {'D_train':>10} {'D/N':>7} {'train ' + unit:>12} {'inference ' + unit:>14} "
          f"{'total ' + unit:>12} {'vs P=' + str(res[0]['P']):>8}")
    for r in res:
        print(f"{r['P']:>2} {r['N'] / 1e9:>8.3f}B {r['D'] / 1e9:>9.1f}B {r['tokens_per_param']:>7.1f} "
              f"{r['train_cost']:>12.4g} {r['inference_cost']:>14.4g} {r['total_cost']:>12.4g} "
              f"{r['total_cost'] / res[0]['total_cost'] - 1:>+8.1%}{' <- best' if r is best else ''}")


def _sharing_effect(law: ChinchillaLaw, target: float, k: float, Ps: Sequence[int], d_in: float, d_out: float,
                    args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for P in Ps:
        off, on = (plan_optimum(law, target, P=P, k=k, inference_in=d_in, inference_out=d_out,
                                costs=plan_costs(args, s)) for s in (False, True))
        out.append(dict(P=P, off=_plan_rows([off])[0], on=_plan_rows([on])[0]))
    print(f"decode sharing (dollars): off = each stream's decode FLOPs billed at {args.decode_mfu:.0%} MFU; on = the "
          f"streams share one weight read, MFU max(u, min(P u, {args.prefill_mfu:.0%}))")
    print(f"{'P':>2} {'decode MFU off / on':>19} {'N off / on':>19} {'total $ off':>12} {'total $ on':>11} "
          f"{'on / off':>8} {'on vs P=1':>9}")
    for e in out:
        f, n = e["off"], e["on"]
        mfu = f"{f['decode_mfu']:.1%} / {n['decode_mfu']:.1%}"
        size = f"{f['params'] / 1e9:.3f}B / {n['params'] / 1e9:.3f}B"
        print(f"{e['P']:>2} {mfu:>19} {size:>19} {f['total']:>12.4g} {n['total']:>11.4g} {n['total'] / f['total']:>8.3f} "
              f"{n['total'] / out[0]['on']['total'] - 1:>+9.1%}")
    return out


def _plan_sweep(law: ChinchillaLaw, target: float, k: float, Ps: Sequence[int], args: argparse.Namespace,
                costs: dict[str, PlanCosts]) -> list[dict[str, Any]]:
    sweep = []
    for req in np.geomspace(1e6, 1e12, 25):
        row: dict[str, Any] = {"requests": float(req)}
        for obj, c in costs.items():
            row[obj] = {P: plan_optimum(law, target, P=P, k=k, inference_in=req * args.input_tokens,
                                        inference_out=req * args.output_tokens, costs=c) for P in sorted(set([1, *Ps]))}
        sweep.append(row)
    return sweep


def cmd_plan(args: argparse.Namespace) -> int:
    check_writable(args.plot, args.json)
    law = ChinchillaLaw(args.E, args.A, args.B, args.alpha, args.beta)
    target, tdesc = _plan_target(args, law)
    k, ksrc = (args.k, "--k") if args.k is not None else (law_for(load_losses(), "pile")[0].k, "the Pile fit")
    if args.inference_tokens is not None and args.requests is not None:
        raise UserError("give only one of --requests and --inference-tokens")
    per_req = args.input_tokens + args.output_tokens
    requests = args.inference_tokens / per_req if args.inference_tokens is not None else (
        args.requests if args.requests is not None else 1e9)
    d_in, d_out = requests * args.input_tokens, requests * args.output_tokens
    Ps = sorted(set(args.P))
    costs = {"flops": PlanCosts("flops"), "dollars": plan_costs(args)}
    dc = costs["dollars"]
    print(f"loss law: E={law.E} A={law.A} B={law.B} alpha={law.alpha} beta={law.beta}; k={k:.4f} ({ksrc})")
    print(f"target: {tdesc} -> L = {target:.6f}")
    print(f"inference: {requests:.4g} requests x ({args.input_tokens} in + {args.output_tokens} out) = "
          f"{d_in + d_out:.4g} tokens")
    print(f"dollars: training {args.train_gpu} {args.train_dtype} {dc.train_peak / 1e12:.0f} TFLOP/s at "
          f"${dc.train_price:.2f}/h, MFU {dc.train_mfu:.0%}; inference {args.infer_gpu} {args.infer_dtype} "
          f"{dc.infer_peak / 1e12:.0f} TFLOP/s at ${dc.infer_price:.2f}/h, prefill MFU {dc.prefill_mfu:.0%}, "
          f"decode MFU {dc.decode_mfu:.0%}; decode sharing {args.decode_sharing}")
    out: dict[str, Any] = dict(target_loss=target, target=tdesc, requests=requests, input_tokens=args.input_tokens,
                               output_tokens=args.output_tokens, k=k, k_source=ksrc, law=law.__dict__)
    for obj, c in costs.items():
        res = [plan_optimum(law, target, P=P, k=k, inference_in=d_in, inference_out=d_out, costs=c) for P in Ps]
        print(f"\nobjective: {obj}")
        _print_plan(res, "FLOPs" if obj == "flops" else "$")
        p1 = res[0]
        print(f"Chinchilla-optimal at P={p1['P']}: N={p1['chinchilla_N'] / 1e9:.3f}B, D={p1['chinchilla_D'] / 1e9:.1f}B; "
              f"inference-aware: N x{p1['N'] / p1['chinchilla_N']:.3f}, D x{p1['D'] / p1['chinchilla_D']:.3f}, "
              f"cost {p1['total_cost'] / p1['chinchilla_total_cost'] - 1:+.1%}")
        out[obj] = dict(rows=_plan_rows(res))
    out["dollars"].update(decode_sharing=args.decode_sharing == "on", setting=dict(dc.__dict__))
    if any(P > 1 for P in Ps):
        print()
        out["dollars"]["decode_sharing_effect"] = _sharing_effect(law, target, k, Ps, d_in, d_out, args)
    if args.json:
        write_json(args.json, out)
    if args.plot:
        curves = {"flops": costs["flops"], "$, sharing off": plan_costs(args, False), "$, sharing on": plan_costs(args, True)}
        plot_plan(_plan_sweep(law, target, k, Ps, args, curves), args.plot,
                  f"inference-aware optimum, {tdesc.split(' (')[0]}, L={target:.3f}")
        print(f"wrote {args.plot}")
    return 0
