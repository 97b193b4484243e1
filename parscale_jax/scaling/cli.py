"""Command line of the scaling toolkit (docs/scaling.md has the reference)::

    python -m parscale_jax.scaling fit     [--data CSV] [--dataset NAME] [--polish] [--plot PNG] [--json OUT]
    python -m parscale_jax.scaling predict --N 1.6B [--P 1 2 4 8] [--constants JSON | --dataset NAME] [--plot PNG]
    python -m parscale_jax.scaling cost    [--protocol paper|project|both] [--base PRESET] [--P ...] [--batch ...]
                                           [--lengths 64 128 256 512] [--measured JSON] [--plot PNG] [--json OUT]
    python -m parscale_jax.scaling plan    [--chinchilla-params 7e9 | --target-loss L | --train-flops C]
                                           [--requests 1e9] [--train-gpu h100 --infer-gpu h100 ...] [--json OUT]

Numbers take K/M/B/T suffixes (1.6B). Bad input: one ``error: ...`` line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from typing import Any, Sequence

from parscale_jax.errors import UserError
from parscale_jax.fileio import write_text
from parscale_jax.scaling import report
from parscale_jax.scaling.report import law_source
from parscale_jax.scaling.cost import HARDWARE, LENGTHS, PREFIX_MODES
from parscale_jax.scaling.law import equivalent_params, fit_dataset, fit_table, load_losses, predict_loss
from parscale_jax.scaling.plan import INFER_DTYPES, TRAIN_DTYPES
from parscale_jax.scaling.plots import check_writable, plot_contour, plot_fit
from parscale_jax.scaling.shapes import DEFAULT_BASE

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _number(text: str) -> float:
    """A positive number, optionally with a K/M/B/T suffix (``1.6B``, ``500M``)."""
    t = text.strip()
    mult = 1.0
    if t and t[-1].lower() in _SUFFIX:
        mult, t = _SUFFIX[t[-1].lower()], t[:-1]
    try:
        v = float(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 1.6e9, 1.6B, 500M)") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive finite number")
    return v


def _nonneg(text: str) -> float:
    try:
        if float(text) == 0.0:
            return 0.0
    except ValueError:
        pass
    return _number(text)


def _count(text: str) -> int:
    v = _number(text)
    if v != int(v):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number")
    return int(v)


def _fraction(text: str) -> float:
    v = _number(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must lie in (0, 1]")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse whose errors become a one-line UserError (exit 2, no usage dump), and which reads
    ``-1.6B`` or ``-5e8`` as a (bad) value rather than an unknown option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def _cmd_fit(args: argparse.Namespace) -> int:
    check_writable(args.plot, args.json)
    data = load_losses(args.data)
    names = [args.dataset] if args.dataset else data.datasets()
    results = [fit_dataset(data, n, polish=args.polish) for n in names]
    for fr in results:
        print(fit_table(fr))
        print()
        for w in fr.warnings:
            print(f"warning: {w}", file=sys.stderr)
    if args.json:
        write_text(args.json, json.dumps({fr.dataset: fr.to_dict() for fr in results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_fit(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    check_writable(args.plot)
    c, src = law_source(args)
    print(f"constants ({src}): E={c.E:.4f} A={c.A:.4g} alpha={c.alpha:.4f} k={c.k:.4f}")
    print(f"{'N':>14} {'P':>3} {'loss':>8} {'equivalent dense N':>19} {'x N':>6}")
    for n in args.N:
        for p in args.P:
            eq = float(equivalent_params(n, p, c.k))
            print(f"{n:>14,.0f} {p:>3d} {float(predict_loss(c, n, p)):>8.4f} {eq:>19,.0f} {eq / n:>6.3f}")
    if args.plot:
        lo, hi = min(args.N), max(args.N)
        plot_contour(c, args.plot, (min(lo / 3, 3e8), max(hi * 3, 1e10)), max(16.0, max(args.P)),
                     [(n, p) for n in args.N for p in args.P],
                     title=f"{src}: E={c.E:.3f} A={c.A:.3g} α={c.alpha:.3f} k={c.k:.3f}")
        print(f"wrote {args.plot}")
    return 0


def _law_flags(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--data", default=None, help="loss CSV (default: the packaged paper data)")
    sp.add_argument("--dataset", default=None, help="dataset of the CSV (default: stack-v2-python)")
    sp.add_argument("--constants", default=None, help="JSON file or inline JSON with E, A, alpha, k")


def _add_fit_predict(sub: Any) -> None:
    f = sub.add_parser("fit", help="fit the parallel scaling law")
    f.add_argument("--data", default=None, help="CSV with dataset,P,non_embedding_params,loss (default: packaged)")
    f.add_argument("--dataset", default=None, help="fit only this dataset (default: each separately)")
    f.add_argument("--polish", action="store_true", help="converge the best start to tight tolerance")
    f.add_argument("--plot", default=None, help="write the fit plot (PNG)")
    f.add_argument("--json", default=None, help="write constants and R^2 per dataset")
    pr = sub.add_parser("predict", help="loss and equivalent dense size at (N, P)")
    pr.add_argument("--N", type=_number, nargs="+", required=True, help="non-embedding parameters (1.6e9, 1.6B)")
    pr.add_argument("--P", type=_count, nargs="+", default=[1, 2, 4, 8], help="streams")
    _law_flags(pr)
    pr.add_argument("--plot", default=None, help="write a loss contour over (N, P) (PNG)")


def _add_cost(sub: Any) -> None:
    c = sub.add_parser("cost", help="inference memory/latency: ParScale vs parameter scaling at equal loss")
    c.add_argument("--protocol", choices=("paper", "project", "both"), default="both",
                   help="paper: cost_analysis.py's method (llm-analysis, real models' observed losses); "
                        "project: this project's engine vs the law's dense model; both (default)")
    _law_flags(c)
    c.add_argument("--base", default=DEFAULT_BASE, help=f"ParScale model preset (default {DEFAULT_BASE})")
    c.add_argument("--P", type=_count, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--batch", type=_count, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--lengths", type=_count, nargs="+", default=list(LENGTHS),
                   help="input = output lengths to average over (default 64 128 256 512, as the paper)")
    c.add_argument("--hardware", default="a100", help=f"one of {sorted(HARDWARE)} (default a100, as the paper)")
    c.add_argument("--peak-flops", type=_number, default=None, help="override peak FLOP/s")
    c.add_argument("--bandwidth", type=_number, default=None, help="override HBM bandwidth, bytes/s")
    c.add_argument("--memory-gb", type=_number, default=None, help="override HBM capacity, GB")
    c.add_argument("--flop-eff", type=_fraction, default=0.7)
    c.add_argument("--bw-eff", type=_fraction, default=0.9)
    c.add_argument("--prefix-mode", choices=PREFIX_MODES, default="cache",
                   help="project protocol: cache (as parscale_jax runs: prefix K/V read from the cache) or "
                        "tokens (the prefix as extra prompt tokens through every layer)")
    c.add_argument("--measured", default=None, help="benchmark JSON of {P, batch, latency_s, model} records")
    c.add_argument("--plot", default=None)
    c.add_argument("--json", default=None, help="write the rows, memory_ratio and latency_ratio")


def _add_plan(sub: Any) -> None:
    pl = sub.add_parser("plan", help="inference-aware optimum (Sardana et al.) with P streams")
    pl.add_argument("--target-loss", type=_number, default=None)
    pl.add_argument("--train-flops", type=_number, default=None, help="target = Chinchilla-optimal loss of this budget")
    pl.add_argument("--chinchilla-params", type=_number, default=None,
                    help="target = quality of a Chinchilla-optimal model of this size (default 7B)")
    pl.add_argument("--requests", type=_nonneg, default=None, help="lifetime requests (default 1e9)")
    pl.add_argument("--inference-tokens", type=_nonneg, default=None, help="lifetime inference tokens")
    pl.add_argument("--input-tokens", type=_count, default=70)
    pl.add_argument("--output-tokens", type=_count, default=215)
    pl.add_argument("--P", type=_count, nargs="+", default=[1, 2, 4, 8])
    pl.add_argument("--k", type=_nonneg, default=None, help="ParScale k (default: the Pile fit)")
    for name, v in (("E", 1.69), ("A", 406.4), ("B", 410.7), ("alpha", 0.336), ("beta", 0.283)):
        pl.add_argument(f"--{name}", type=_number, default=v)
    for phase, dtypes, dt in (("train", TRAIN_DTYPES, "bf16"), ("infer", INFER_DTYPES, "fp8")):
        pl.add_argument(f"--{phase}-gpu", default="h100", help="accelerator of parscale_jax.hardware (default h100)")
        pl.add_argument(f"--{phase}-dtype", choices=dtypes, default=dt, help=f"default {dt}")
        pl.add_argument(f"--{phase}-price", type=_number, default=None, help="$ per hour (default: the table's)")
        pl.add_argument(f"--{phase}-peak-flops", type=_number, default=None, help="override the table's peak")
    pl.add_argument("--train-mfu", type=_fraction, default=0.5)
    pl.add_argument("--prefill-mfu", type=_fraction, default=0.5)
    pl.add_argument("--decode-mfu", type=_fraction, default=0.01)
    pl.add_argument("--decode-sharing", choices=("off", "on"), default="off",
                    help="on: P streams share one weight read while decoding, so decode MFU becomes "
                         "max(u, min(P u, prefill MFU)); off (default): P streams cost P times the FLOPs at u")
    pl.add_argument("--plot", default=None)
    pl.add_argument("--json", default=None, help="write the flops and dollars tables")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m parscale_jax.scaling",
                description="The parallel scaling law: fit, predict, inference cost, inference-aware planning.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    _add_fit_predict(sub)
    _add_cost(sub)
    _add_plan(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``UserError`` becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        args = build_parser().parse_args(argv)
        if args.command is None:
            raise UserError("choose a command: fit, predict, cost or plan (add --help for options)")
        cmds = {"fit": _cmd_fit, "predict": _cmd_predict, "cost": report.cmd_cost, "plan": report.cmd_plan}
        return cmds[args.command](args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"error: {e.strerror or e}: {getattr(e, 'filename', '') or ''} (check the path and permissions)",
              file=sys.stderr)
        return 2
