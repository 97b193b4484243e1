"""ParScale runs placed on a dense loss curve: the effective-parameter multiplier m(P) and k.

The paper's method, for a grid trained on the same tokens: dense (P = 1) models of several sizes
give the curve ``L(N) = E + (A / N) ** alpha``; a P-stream model of N parameters reaching loss L_P
is worth ``N_eff = L^-1(L_P)`` dense parameters, ``m(P) = N_eff / N``, and the parallel law says
``m(P) = 1 + k ln P``. N may count the streams' extra parameters (prefix and gate: the
conservative reading) or the backbone alone; both are reported.

Intervals come from a parametric bootstrap over seeds: each cell's mean loss is redrawn from
``Normal(mean, s^2 / n)`` with s the seed-to-seed standard deviation pooled over all cells (itself
redrawn from its chi-square distribution), the dense curve is refitted on every draw, and m, k and
the equal-compute figures are recomputed; the interval is the central ``level`` of the draws. It so
carries both the seed noise of the P runs and the uncertainty of the fitted curve. On synthetic
grids of the bench's shape (tests/test_parallel_law.py) the nominal 95% interval of k covered the
true k in 37 of 40 grids (0.925): slightly short of nominal, as percentile bootstraps of small
samples are.

Equal training compute: the same tokens for every run, so compute is FLOPs per token. The dense
runs' FLOPs per token are fitted as a power of N; a P run is compared with the dense model of the
same FLOPs (its loss read off the curve), and ``compute_multiplier`` is the dense compute that
reaches the P run's loss over the P run's compute (< 1: the P run is the worse use of compute).
numpy / scipy only.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from parscale_jax.errors import UserError

BIG = 1e12  # stands for an infinite N_eff (a loss at or below the curve's floor E)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One grid cell: a model trained at several seeds. ``N``: non-embedding parameters counting
    the streams' prefix and gate; ``N_backbone``: without them (= N for P = 1); ``flops``: training
    FLOPs per token; ``losses``: one held-out loss per seed."""

    name: str
    P: int
    N: float
    N_backbone: float
    flops: float
    losses: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses))


@dataclasses.dataclass(frozen=True)
class DenseCurve:
    """``L(N) = E + (A / N) ** alpha``."""

    E: float
    A: float
    alpha: float

    def loss(self, N: Any) -> np.ndarray:
        return self.E + (self.A / np.asarray(N, float)) ** self.alpha

    def params_for(self, loss: Any) -> np.ndarray:
        """The N at which the curve reaches ``loss`` (BIG at or below the floor E)."""
        gap = np.asarray(loss, float) - self.E
        with np.errstate(divide="ignore", over="ignore"):
            n = self.A / np.where(gap > 0, gap, np.nan) ** (1.0 / self.alpha)
        return np.where(np.isfinite(n) & (gap > 0), np.minimum(n, BIG), BIG)


def fit_dense(N: Sequence[float], loss: Sequence[float]) -> DenseCurve:
    """Least squares on log loss, E in [0, min loss), alpha in [0.01, 5], started from the best of a grid of E."""
    from scipy.optimize import least_squares

    lnN, L = np.log(np.asarray(N, float)), np.asarray(loss, float)
    if len(L) < 3 or len(np.unique(lnN)) < 3:
        raise UserError("the dense curve needs at least 3 model sizes: add dense runs")
    lo_E, hi_E = 0.0, float(L.min()) * (1 - 1e-6)

    def resid(th):
        E, lnA, a = th
        return np.log(E + np.exp(np.clip(a * (lnA - lnN), -700, 700))) - np.log(L)

    # start: for each floor E on a grid, log(L - E) is linear in ln N (slope -alpha); then polish
    best_x, best_cost = None, np.inf
    for E0 in np.linspace(0.0, 0.995, 40) * hi_E:
        slope, icpt = np.polyfit(lnN, np.log(L - E0), 1)
        a = float(np.clip(-slope, 0.01, 5.0))
        x0 = [E0, icpt / a, a]
        cost = float(np.sum(resid(x0) ** 2))
        if cost < best_cost:
            best_x, best_cost = x0, cost
    best = least_squares(resid, best_x, bounds=([lo_E, -np.inf, 0.01], [hi_E, np.inf, 5.0]))
    E, lnA, a = best.x
    return DenseCurve(float(E), float(math.exp(lnA)), float(a))


def fit_k(P: Sequence[float], m: Sequence[float]) -> float:
    """Least-squares k of ``m = 1 + k ln P`` (intercept fixed at 1, as in the law)."""
    x, y = np.log(np.asarray(P, float)), np.asarray(m, float) - 1.0
    return float(np.sum(x * y) / np.sum(x * x))


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(seed-to-seed standard deviation pooled over the groups, its degrees of freedom)."""
    ss = sum(float(np.sum((np.asarray(g, float) - np.mean(g)) ** 2)) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    return (math.sqrt(ss / df) if df else 0.0), df


def _point(dense: list[Cell], par: list[Cell], d_mean: np.ndarray, p_mean: np.ndarray) -> dict[str, Any]:
    """Every figure of the analysis from one set of cell means."""
    curve = fit_dense([c.N for c in dense], d_mean)
    n_eff = curve.params_for(p_mean)
    Ps = np.array([c.P for c in par], float)
    m = n_eff / np.array([c.N for c in par])
    m_bb = n_eff / np.array([c.N_backbone for c in par])
    slope, icpt = np.polyfit(np.log([c.N for c in dense]), np.log([c.flops for c in dense]), 1)
    flops_p = np.array([c.flops for c in par])
    n_same_flops = np.exp((np.log(flops_p) - icpt) / slope)
    dense_at_flops = curve.loss(n_same_flops)
    flops_needed = np.exp(icpt + slope * np.log(np.minimum(n_eff, BIG)))
    return {"curve": curve, "m": m, "m_backbone": m_bb, "k": fit_k(Ps, m), "k_backbone": fit_k(Ps, m_bb),
            "n_eff": n_eff, "dense_at_flops": dense_at_flops, "delta_at_flops": p_mean - dense_at_flops,
            "compute_multiplier": flops_needed / flops_p, "n_same_flops": n_same_flops}


def analyze(cells: Sequence[Cell], n_boot: int = 400, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """m(P), k and the equal-compute comparison, each as ``[low, mid, high]`` (see the module doc).
    ``mid`` is the estimate from the cell means; low/high the bootstrap's central ``level``."""
    dense = sorted((c for c in cells if c.P == 1), key=lambda c: c.N)
    par = sorted((c for c in cells if c.P > 1), key=lambda c: c.P)
    if not par:
        raise UserError("no P > 1 runs to place on the dense curve: run the ParScale cells")
    d_mean = np.array([c.mean for c in dense])
    p_mean = np.array([c.mean for c in par])
    mid = _point(dense, par, d_mean, p_mean)
    sd, df = pooled_sd([c.losses for c in cells])
    rng = np.random.default_rng(seed)
    d_n = np.array([len(c.losses) for c in dense], float)
    p_n = np.array([len(c.losses) for c in par], float)
    keys = ("m", "m_backbone", "k", "k_backbone", "delta_at_flops", "compute_multiplier")
    draws: dict[str, list] = {k: [] for k in keys}
    for _ in range(n_boot if df else 0):
        s = sd * math.sqrt(df / rng.chisquare(df))
        pt = _point(dense, par, d_mean + rng.normal(size=len(dense)) * s / np.sqrt(d_n),
                    p_mean + rng.normal(size=len(par)) * s / np.sqrt(p_n))
        for k in keys:
            draws[k].append(pt[k])
    q = (50 * (1 - level), 50 * (1 + level))

    def band(k):
        if not draws[k]:
            return np.stack([np.asarray(mid[k], float)] * 3, axis=-1)
        lo, hi = np.percentile(np.array(draws[k], float), q, axis=0)
        return np.stack([lo, np.asarray(mid[k], float), hi], axis=-1)

    curve = mid["curve"]
    resid = np.log(d_mean) - np.log(curve.loss([c.N for c in dense]))
    out = {"curve": dataclasses.asdict(curve), "curve_rms_log_residual": float(np.sqrt(np.mean(resid ** 2))),
           "seed_sd": sd, "seed_df": df, "n_boot": n_boot if df else 0, "level": level,
           "k": band("k").tolist(), "k_backbone": band("k_backbone").tolist(), "per_P": {}}
    bands = {k: band(k) for k in ("m", "m_backbone", "delta_at_flops", "compute_multiplier")}
    for i, c in enumerate(par):
        out["per_P"][c.P] = {"name": c.name, "N": c.N, "N_backbone": c.N_backbone, "loss": float(p_mean[i]),
                             "N_eff": float(mid["n_eff"][i]), "dense_N_same_flops": float(mid["n_same_flops"][i]),
                             "dense_loss_same_flops": float(mid["dense_at_flops"][i]),
                             **{k: bands[k][i].tolist() for k in bands}}
    return out
