"""Plots of the scaling toolkit (matplotlib, imported lazily, Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.scaling.law import FitResult, LawConstants, predict_loss


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_writable(*paths: str | Path | None) -> None:
    """UserError before any work if an output's directory is missing."""
    for p in paths:
        if p is not None and Path(p).is_dir():
            raise UserError(f"cannot write {str(p)!r}: it is a directory: give a file name")
        if p is not None and not Path(p).resolve().parent.is_dir():
            raise UserError(f"cannot write {str(p)!r}: directory {str(Path(p).parent)!r} does not exist: create it first")


def _save(fig: Any, path: str | Path) -> None:
    check_writable(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _plt().close(fig)


def _billions_axis(ax: Any, axis: str = "x") -> None:
    """Log scale with ticks labelled in billions (0.5B, 1B, 2B, ...), no crowded minor labels."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    a.set_major_locator(FixedLocator([v * 10.0 ** e for e in range(7, 13) for v in (1, 2, 5)]))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e9:g}B"))
    a.set_minor_formatter(NullFormatter())


def plot_fit(results: Sequence[FitResult], path: str | Path) -> None:
    """Observed points and fitted curves, loss vs N (log x), one colour per P, one panel per dataset."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.9), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, fr in zip(axes[0], results):
        Ps = sorted(set(fr.P.tolist()))
        grid = np.geomspace(fr.N.min() / 1.3, fr.N.max() * 1.3, 200)
        for i, p in enumerate(Ps):
            col = cmap(i / max(1, len(Ps) - 1) * 0.9)
            m = fr.P == p
            ax.scatter(fr.N[m], fr.observed[m], color=col, s=22, zorder=3)
            ax.plot(grid, predict_loss(fr.constants, grid, p), color=col, lw=1.4, label=f"P={p:g}")
        c = fr.constants
        _billions_axis(ax)
        ax.set_xlabel("non-embedding parameters N")
        ax.set_ylabel("loss")
        ax.set_title(f"{fr.dataset}: E={c.E:.3f} A={c.A:.3g} α={c.alpha:.3f} k={c.k:.3f}, R²={fr.r2:.4f}",
                     fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_contour(c: LawConstants, path: str | Path, N_range: tuple[float, float] = (3e8, 1e10),
                 P_max: float = 16.0, points: Sequence[tuple[float, float]] = (), title: str = "") -> None:
    """Predicted loss over (N, P), log axes; lines of equal loss are lines of equal N*(k ln P+1)."""
    plt = _plt()
    N = np.geomspace(*N_range, 200)
    P = np.geomspace(1.0, P_max, 120)
    NN, PP = np.meshgrid(N, P)
    Z = predict_loss(c, NN, PP)
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    cs = ax.contourf(NN, PP, Z, levels=14, cmap="viridis_r")
    lines = ax.contour(NN, PP, Z, levels=cs.levels[::2], colors="k", linewidths=0.6)
    ax.clabel(lines, fmt="%.3f", fontsize=7)
    fig.colorbar(cs, ax=ax, label="predicted loss")
    if points:
        pn, pp = zip(*points)
        ax.scatter(pn, pp, c="w", edgecolors="k", s=18, zorder=3, label="queried (N, P)")
        ax.legend(fontsize=8, loc="upper right")
    _billions_axis(ax)
    ax.set_yscale("log", base=2)
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    ax.yaxis.set_major_locator(FixedLocator([2.0 ** i for i in range(0, int(math.log2(P_max)) + 1)]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("parallel streams P")
    ax.set_title(title or f"L = {c.E:.3f} + (A·1e9/(N(k ln P+1)))^{c.alpha:.3f}, k={c.k:.3f}", fontsize=9)
    _save(fig, path)


def plot_cost(panels: Sequence[tuple[str, Sequence[Mapping[str, Any]]]], path: str | Path, title: str) -> None:
    """Loss vs memory and vs latency at batch 1: ParScale (P streams) and parameter scaling, one
    line style per protocol (``panels``: (protocol name, its rows))."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for ls, (proto, rows) in zip(("-", "--"), panels):
        b = min(r["batch"] for r in rows)
        rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["P"])
        loss = [r["loss"] for r in rs]
        for ax, key, scale in ((axes[0], "memory_bytes", 2.0 ** -30), (axes[1], "latency_s", 1.0)):
            ax.plot([r["parscale"][key] * scale for r in rs], loss, "o" + ls, color="C0",
                    label=f"ParScale ({proto}, batch {b})")
            ax.plot([r["dense"][key] * scale for r in rs], loss, "s" + ls, color="C3",
                    label=f"parameter scaling ({proto}, batch {b})")
            for r in rs if ls == "-" else ():
                ax.annotate(f"P={r['P']}", (r["parscale"][key] * scale, r["loss"]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("inference memory (GiB)")
    axes[1].set_xlabel("latency of one generate call (s), mean over lengths")
    for ax in axes:
        ax.set_ylabel("loss (observed or predicted)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_plan(sweep: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Left: optimal N and D at P=1 relative to Chinchilla vs lifetime requests, per objective.
    Right: optimal lifetime cost of P streams over P=1's, per objective (every key but 'requests')."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    req = [s["requests"] for s in sweep]
    objectives = [k for k in sweep[0] if k != "requests"]
    styles = dict(zip(objectives, ("-", "--", ":", "-.")))
    for obj in objectives[:2]:
        base = [s[obj][1] for s in sweep]
        axes[0].plot(req, [r["N"] / r["chinchilla_N"] for r in base], styles[obj], color="C0",
                     label=f"N / N_chinchilla ({obj})")
        axes[0].plot(req, [r["D"] / r["chinchilla_D"] for r in base], styles[obj], color="C1",
                     label=f"D / D_chinchilla ({obj})")
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("lifetime requests (70 in + 215 out tokens)")
    axes[0].set_ylabel("ratio to Chinchilla-optimal (P=1)")
    axes[0].legend(fontsize=7)
    for i, P in enumerate(sorted(sweep[0][objectives[0]])):
        for obj in objectives if P > 1 else ():
            axes[1].plot(req, [s[obj][P]["total_cost"] / s[obj][1]["total_cost"] for s in sweep], styles[obj],
                         color=f"C{i + 2}", label=f"P={P} ({obj})")
    axes[1].axhline(1.0, color="k", lw=0.5)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("lifetime requests")
    axes[1].set_ylabel("optimal lifetime cost, P streams / P=1")
    axes[1].set_ylim(0.0, axes[1].get_ylim()[1] * 1.35)  # room for the legend above the curves
    axes[1].legend(fontsize=6, ncol=3, loc="upper right")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
