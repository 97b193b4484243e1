"""The parallel scaling law toolkit: fit, predict, inference cost and inference-aware planning.

numpy / scipy / matplotlib only (no jax), so it runs anywhere. Command line::

    python -m parscale_jax.scaling fit     [--data CSV] [--dataset NAME] [--plot fit.png] [--json out.json]
    python -m parscale_jax.scaling predict --N 1.6e9 --P 1 2 4 8 [--constants JSON | --dataset NAME] [--plot c.png]
    python -m parscale_jax.scaling cost    [--hardware a100] [--batch 1 2 4 8] [--measured bench.json] [--plot cost.png]
    python -m parscale_jax.scaling plan    [--chinchilla-params 7e9 | --target-loss L | --train-flops C]
                                           [--requests 1e9 | --inference-tokens D] [--plot plan.png]

Bad input exits with code 2 and one ``error: ...`` line on stderr (no traceback).

1. The parallel scaling law (spec section 4)
-------------------------------------------
N = non-embedding parameters (prefix and aggregator included for P > 1), P = streams::

    L(N, P) = E + (A * 1e9 / (N * (k ln P + 1))) ** alpha

P streams act like a dense model of ``N_eq = N * (k ln P + 1)`` parameters. The fit minimises
``sum_i huber_delta(log L_pred_i - log L_obs_i)`` (delta = 1e-3; ``huber(r) = r^2/2`` for
``|r| <= delta``, else ``delta * (|r| - delta/2)``) over (E, A, alpha, k) >= 0 with L-BFGS-B and
an analytic gradient, from every start of the grid E in exp{-1,-0.5,0}, A in exp{-4,-2,0,2,4},
alpha in {0,0.5,1,1.5,2}, k in {0.2,0.4,0.6,0.8} (300 starts), keeping the lowest objective. It is
optimised in the natural parametrisation with scipy's default tolerances, as the authors did;
the valley is flat, so the fourth digit of E, A, alpha depends on where L-BFGS-B stops
(``polish=True`` / ``--polish`` converges it tightly; the fit quality is the same to 1e-5).
R^2 = 1 - sum (L_obs - L_pred)^2 / sum (L_obs - mean L_obs)^2, on the losses.

2. Inference cost (spec section 5): :func:`inference_cost`
---------------------------------------------------------
Roofline model of one generate call: ``input_tokens`` prompt tokens per sequence (prefill; it
emits the first output token), then ``output_tokens - 1`` decode steps of one token. The P
streams are folded into the batch (``batch * P`` sequences) and each sequence's attention sees
its T prefix entries (T = 0 for P = 1). ``prefix_mode="tokens"`` (default, the paper's analytic
convention) instead runs the T prefix tokens through every layer as extra prompt tokens;
``"cache"`` is what the code does (prefix K/V are parameters, only read). With ``n`` = rows in a pass (``batch*P*s_q``), ``wb``,
``ab``, ``kvb`` bytes per weight / activation / cache element, the operators are

    linear(in, out)   FLOPs 2*n*in*out; bytes (in*out + bias)*wb + n*(in + out)*ab
    per layer         q_proj(H, nH*hd, bias), k_proj(H, nKV*hd, bias), v_proj(H, nKV*hd, bias),
                      attention: FLOPs 4*nH*hd*sum_q(keys seen) per sequence (query i of a pass
                        with `past` cached real tokens sees T + past + i + 1 keys); bytes
                        2*n*nH*hd*ab (read q, write o) + seqs*(T+past+s_q)*2*nKV*hd*kvb (cache),
                      o_proj(nH*hd, H), gate_proj(H, I), up_proj(H, I), down_proj(I, H),
                      2x rmsnorm (bytes 2*n*H*ab + H*wb), 2x residual_add (3*n*H*ab),
                      silu_mul (3*n*I*ab); elementwise FLOPs are not counted (as in flops.py)
    once per pass     embedding gather: bytes batch*s_q*H*wb + n*H*ab (the P copies);
                      final RMSNorm on the last position of each stream: 2*seqs*H*ab + H*wb;
                      aggregator (P > 1) on the last position: linear(P*H, H, bias),
                        linear(H, P, bias), weighted sum: bytes batch*(P*H + P + H)*ab;
                      lm_head linear(H, V) on the last position (``batch`` rows).

Each operator takes ``max(FLOPs / (peak * flop_eff), bytes / (bandwidth * bw_eff))`` (defaults
70% and 90%); latency is the sum over operators, layers, the prefill and every decode step.
Memory = weights (all parameters, embeddings included) + KV cache ``L * 2 * nKV * hd *
(T + input + output) * batch * P * kvb`` (the prefix copied into every stream's cache) + peak
activations (the largest activation read + write of one operator in the prefill).

Parameter scaling at equal loss: the dense model with ``N_eq = N_P * (k ln P + 1)`` (N_P = the
ParScale model's non-embedding count) has the base shape with hidden, MLP width and head
dimension all multiplied by one factor s (layers, heads, vocabulary fixed), s solved so the
non-embedding count is N_eq exactly (fractional widths are fine in an analytic model).

Measured latencies (``cost --measured FILE.json``): a JSON list of records ::

    {"P": 2, "batch": 1, "latency_s": 0.153, "model": "paper-1.6b",
     "input_tokens": 64, "output_tokens": 64, "hardware": "h100"}

``P`` (int >= 1), ``batch`` (int >= 1), ``latency_s`` (> 0, wall time of one generate call for
the whole batch: prefill + decode) and ``model`` are required. ``model`` is a preset name of
``parscale_jax.config.PRESETS`` (e.g. ``paper-1.6b``) or a mapping with the Hugging Face names
(``hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, vocab_size``; optional ``head_dim, parscale_n_tokens,
tie_word_embeddings``), e.g. ``ModelConfig.to_dict()``. ``input_tokens`` / ``output_tokens``
default to 64 and ``hardware`` to the command line's.

3. Inference-aware planning (spec section 6, Sardana et al. 2401.00448): :func:`plan_optimum`
------------------------------------------------------------------------------------------
``L(N, D, P) = E + A / (N (k ln P + 1))^alpha + B / D^beta`` (Hoffmann et al. constants by
default). Lifetime cost ``N(D) * (a*D + b)`` with, per objective,

    flops:    a = 6P,                 b = 2P * D_inf
    dollars:  a = 6P c / u_train,     b = 2P c (D_in / u_prefill + D_out / u_dec(P))

(c = dollars per FLOP = price per hour / 3600 / peak FLOP/s; u_dec(P) = min(P * u_dec, u_prefill)
because decoding is bandwidth-bound and the P streams share one read of the weights; pass
``decode_sharing=False`` for u_dec(P) = u_dec). Under ``L(N, D, P) = target``,
``N(D) = (A / (target - E - B D^-beta))^(1/alpha) / (k ln P + 1)``, and d/dD ln cost = 0 gives

    h(D) = a alpha (target - E - B D^-beta) - beta B D^-beta (a + b / D) = 0,

increasing in ln D with one root beyond ``D_min = (B / (target - E))^(1/beta)``; it is solved by
a bracketed Newton iteration in ln D (brentq as fallback). With b = 0 it gives Chinchilla's
``B D^-beta = alpha (target - E) / (alpha + beta)``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.hardware import ACCELERATORS

__all__ = [
    "UserError", "LawConstants", "LossData", "FitResult", "load_losses", "predict_loss",
    "equivalent_params", "params_for_loss", "huber", "fit_objective", "fit_law", "fit_dataset",
    "r_squared", "ModelShape", "Hardware", "HARDWARE", "shape_from_preset", "shape_from_mapping",
    "inference_cost", "dense_shape_for_params", "compare_at_equal_loss", "load_measurements",
    "ChinchillaLaw", "HOFFMANN", "PlanCosts", "chinchilla_optimum", "chinchilla_optimum_for_loss",
    "solve_tokens", "plan_optimum", "main",
]

DATA_PATH = Path(__file__).resolve().parent / "assets" / "parscale_paper_losses.csv"
REQUIRED_COLUMNS = ("dataset", "P", "non_embedding_params", "loss")
HUBER_DELTA = 1e-3
START_GRID: dict[str, tuple[float, ...]] = {
    "E": tuple(math.exp(v) for v in (-1.0, -0.5, 0.0)),
    "A": tuple(math.exp(v) for v in (-4.0, -2.0, 0.0, 2.0, 4.0)),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "k": (0.2, 0.4, 0.6, 0.8),
}
# What the paper reports (spec section 4), for side-by-side printing only; nothing is derived from it.
PAPER_CONSTANTS: dict[str, dict[str, float]] = {
    "stack-v2-python": dict(E=0.6913, A=0.01131, alpha=0.1894, k=0.3934, r2=0.9978),
    "pile": dict(E=1.2889, A=0.1973, alpha=0.1964, k=0.3344, r2=0.9987),
}
PAPER_HEADLINE = {"memory_ratio": 22.0, "latency_ratio": 6.0}


# ======================================================================================
# Data
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class LossData:
    """Observed losses: parallel arrays, one entry per (dataset, P, N) point."""

    dataset: np.ndarray  # str
    P: np.ndarray  # float, >= 1
    N: np.ndarray  # float, non-embedding parameters, > 0
    loss: np.ndarray  # float, > 0

    def datasets(self) -> list[str]:
        """Dataset names in order of first appearance."""
        return list(dict.fromkeys(self.dataset.tolist()))

    def select(self, name: str) -> "LossData":
        """The points of one dataset; UserError naming the available ones if it is absent."""
        if name not in set(self.dataset.tolist()):
            raise UserError(f"unknown dataset {name!r}: choose one of {self.datasets()} (the CSV's 'dataset' column)")
        m = self.dataset == name
        return LossData(self.dataset[m], self.P[m], self.N[m], self.loss[m])


def _positive_number(text: str, what: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{what} = {text!r} is not a number: write a plain decimal like 1.5e9") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} = {text!r} must be a positive finite number")
    return v


def load_losses(path: str | Path | None = None) -> LossData:
    """Read a CSV with columns dataset, P, non_embedding_params, loss (the packaged paper data by default)."""
    path = Path(path) if path is not None else DATA_PATH
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} not found: pass --data with a CSV of columns {', '.join(REQUIRED_COLUMNS)}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED_COLUMNS if c not in cols]
        if missing:
            raise UserError(f"{path}: missing column(s) {missing}: the header must contain {', '.join(REQUIRED_COLUMNS)}")
        rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    if not rows:
        raise UserError(f"{path}: no data rows: add one row per (dataset, P, non_embedding_params, loss) point")
    ds, P, N, L = [], [], [], []
    for i, r in enumerate(rows, start=2):
        ds.append(r["dataset"] or "default")
        p = _positive_number(r["P"], f"{path} line {i}: P")
        if p < 1:
            raise UserError(f"{path} line {i}: P = {r['P']!r} must be >= 1 (the number of parallel streams)")
        P.append(p)
        N.append(_positive_number(r["non_embedding_params"], f"{path} line {i}: non_embedding_params"))
        L.append(_positive_number(r["loss"], f"{path} line {i}: loss"))
    return LossData(np.array(ds), np.array(P, float), np.array(N, float), np.array(L, float))


# ======================================================================================
# The law
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class LawConstants:
    """Constants of ``L(N, P) = E + (A * 1e9 / (N * (k ln P + 1)))^alpha``."""

    E: float
    A: float
    alpha: float
    k: float

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any], where: str = "constants") -> "LawConstants":
        missing = [n for n in ("E", "A", "alpha", "k") if n not in d]
        if missing:
            raise UserError(f"{where}: missing {missing}: give E, A, alpha and k (e.g. the output of 'fit --json')")
        vals = {}
        for n in ("E", "A", "alpha", "k"):
            v = d[n]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise UserError(f"{where}: {n} = {v!r} must be a non-negative finite number")
            vals[n] = float(v)
        return cls(**vals)


def predict_loss(c: LawConstants, N: Any, P: Any) -> np.ndarray:
    """``E + (A * 1e9 / (N * (k ln P + 1)))^alpha`` (broadcasts over N and P)."""
    N, P = np.asarray(N, float), np.asarray(P, float)
    return c.E + (c.A * 1e9 / (N * (c.k * np.log(P) + 1.0))) ** c.alpha


def equivalent_params(N: Any, P: Any, k: float) -> np.ndarray:
    """Dense size with the same predicted loss: ``N * (k ln P + 1)``."""
    return np.asarray(N, float) * (k * np.log(np.asarray(P, float)) + 1.0)


def params_for_loss(c: LawConstants, loss: Any, P: Any = 1) -> np.ndarray:
    """Inverse of the law in N: ``N = A * 1e9 / ((L - E)^(1/alpha) * (k ln P + 1))`` (needs L > E)."""
    loss = np.asarray(loss, float)
    if np.any(loss <= c.E):
        raise UserError(f"target loss must exceed the irreducible loss E = {c.E:.4f}: choose a larger loss")
    return c.A * 1e9 / ((loss - c.E) ** (1.0 / c.alpha) * (c.k * np.log(np.asarray(P, float)) + 1.0))


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """``1 - sum (obs - pred)^2 / sum (obs - mean obs)^2``."""
    observed, predicted = np.asarray(observed, float), np.asarray(predicted, float)
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    ss_res = float(np.sum((observed - predicted) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


# ======================================================================================
# Fit
# ======================================================================================
def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """``r^2 / 2`` for ``|r| <= delta``, else ``delta * (|r| - delta / 2)``."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


_BAD_OBJECTIVE = 1e30


def fit_objective(theta: np.ndarray, N: np.ndarray, P: np.ndarray, loss: np.ndarray,
                  delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Huber objective on log losses and its gradient in theta = (E, A, alpha, k).

    With g = k ln P + 1, u = A 1e9 / (N g), pred = E + u^alpha, r = ln pred - ln loss:
    d/dE pred = 1, d/dA = alpha u^alpha / A, d/dalpha = u^alpha ln u, d/dk = -alpha u^alpha ln P / g,
    and d obj = sum clip(r, -delta, delta) / pred * d pred.
    """
    E, A, alpha, k = (float(t) for t in theta)
    lnP = np.log(P)
    g = k * lnP + 1.0
    with np.errstate(all="ignore"):
        u = A * 1e9 / (N * g)
        ua = u ** alpha
        pred = E + ua
        r = np.log(pred) - np.log(loss)
        val = float(np.sum(huber(r, delta)))
        if not math.isfinite(val):
            return _BAD_OBJECTIVE, np.zeros(4)
        w = np.clip(r, -delta, delta) / pred
        jac = np.stack([np.ones_like(u), alpha * ua / A, ua * np.log(u), -alpha * ua * lnP / g])
        grad = np.nan_to_num(jac @ w, nan=0.0, posinf=0.0, neginf=0.0)
    return val, grad


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A fitted law and its quality on the points it was fitted to."""

    dataset: str
    constants: LawConstants
    r2: float
    objective: float
    N: np.ndarray
    P: np.ndarray
    observed: np.ndarray
    predicted: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {**self.constants.to_dict(), "r2": self.r2, "objective": self.objective, "n_points": int(self.N.size)}


def _check_fittable(N: np.ndarray, P: np.ndarray, loss: np.ndarray, name: str) -> None:
    if not (N.shape == P.shape == loss.shape and N.ndim == 1):
        raise UserError(f"{name}: N, P and loss must be 1-d arrays of one length")
    if N.size < 4:
        raise UserError(f"dataset {name!r}: {N.size} point(s) cannot determine the 4 constants (E, A, alpha, k): give at least 4")
    if np.unique(P).size < 2:
        raise UserError(f"dataset {name!r}: all points have P = {P[0]:g}, so k is not identifiable: add points with another P")
    for arr, what in ((N, "N"), (loss, "loss")):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise UserError(f"{name}: every {what} must be a positive finite number")
    if not np.all(np.isfinite(P)) or np.any(P < 1):
        raise UserError(f"{name}: every P must be >= 1")


def fit_law(N: Any, P: Any, loss: Any, *, delta: float = HUBER_DELTA,
            grid: Mapping[str, Sequence[float]] | None = None, polish: bool = False,
            dataset: str = "data") -> FitResult:
    """Fit (E, A, alpha, k) >= 0 by L-BFGS-B from every start of ``grid`` (default: the spec's 300).

    Keeps the start with the lowest Huber objective; ``polish`` re-runs the winner with tight
    tolerances on a rescaled objective (same minimiser, converged to ~1e-7).
    """
    from scipy.optimize import minimize

    N, P, loss = (np.asarray(x, float).ravel() for x in (N, P, loss))
    _check_fittable(N, P, loss, dataset)
    grid = dict(START_GRID if grid is None else grid)
    bounds = [(0.0, None)] * 4
    best_val, best_x = math.inf, None
    for x0 in itertools.product(grid["E"], grid["A"], grid["alpha"], grid["k"]):
        res = minimize(fit_objective, np.array(x0, float), args=(N, P, loss, delta), jac=True,
                       method="L-BFGS-B", bounds=bounds)
        if math.isfinite(res.fun) and res.fun < best_val and np.all(np.isfinite(res.x)):
            best_val, best_x = float(res.fun), res.x
    if best_x is None or best_val >= _BAD_OBJECTIVE:
        raise UserError(f"{dataset}: the fit failed from every start: check that the losses decrease with N and P")
    if polish:
        scale = 1.0 / (delta * delta)

        def scaled(theta: np.ndarray) -> tuple[float, np.ndarray]:
            v, gr = fit_objective(theta, N, P, loss, delta)
            return v * scale, gr * scale

        res = minimize(scaled, best_x, jac=True, method="L-BFGS-B", bounds=bounds,
                       options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000))
        if res.fun / scale <= best_val:
            best_val, best_x = float(res.fun / scale), res.x
    c = LawConstants(*(float(v) for v in best_x))
    pred = predict_loss(c, N, P)
    return FitResult(dataset, c, r_squared(loss, pred), best_val, N, P, loss, pred)


def fit_dataset(data: LossData, name: str, **kw: Any) -> FitResult:
    """Fit one dataset of ``data``."""
    d = data.select(name)
    return fit_law(d.N, d.P, d.loss, dataset=name, **kw)


@functools.lru_cache(maxsize=8)
def _packaged_fit(name: str) -> LawConstants:
    return fit_dataset(load_losses(), name).constants


def _fit_table(fr: FitResult) -> str:
    c = fr.constants
    lines = [f"[{fr.dataset}]  E={c.E:.4f}  A={c.A:.4g}  alpha={c.alpha:.4f}  k={c.k:.4f}  "
             f"R^2={fr.r2:.4f}  ({fr.N.size} points, Huber objective {fr.objective:.4e})"]
    ref = PAPER_CONSTANTS.get(fr.dataset)
    if ref is not None:
        lines.append(f"  paper:  E={ref['E']:.4f}  A={ref['A']:.4g}  alpha={ref['alpha']:.4f}  "
                     f"k={ref['k']:.4f}  R^2={ref['r2']:.4f}")
    lines.append(f"  {'dataset':<16} {'P':>3} {'N':>14} {'observed':>9} {'predicted':>9} {'error':>8}")
    for n, p, o, q in zip(fr.N, fr.P, fr.observed, fr.predicted):
        lines.append(f"  {fr.dataset:<16} {p:>3g} {n:>14,.0f} {o:>9.4f} {q:>9.4f} {q - o:>+8.4f}")
    return "\n".join(lines)


# ======================================================================================
# Inference cost
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen2/ParScale shape; widths may be fractional (analytic dense equivalents)."""

    hidden_size: float
    intermediate_size: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: float
    vocab_size: int
    prefix_tokens: int = 48
    tie_embeddings: bool = False

    def nonembedding_params(self, P: int = 1) -> float:
        """Per layer ``H*nH*hd + nH*hd + 2*(H*nKV*hd + nKV*hd) + nH*hd*H + 3*H*I + 2H``, plus the final
        norm H; for P > 1 add ``2*L*nKV*T*hd*P`` prefix values and ``P*(H*H + H + 1) + H`` aggregator."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        nH, nKV, L = self.num_heads, self.num_kv_heads, self.num_layers
        layer = H * nH * hd + nH * hd + 2 * (H * nKV * hd + nKV * hd) + nH * hd * H + 3 * H * I + 2 * H
        n = L * layer + H
        if P > 1:
            n += 2 * L * nKV * self.prefix_tokens * hd * P + P * (H * H + H + 1) + H
        return float(n)

    def embedding_params(self) -> float:
        """``V*H``, twice when the LM head is untied."""
        return float(self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2))

    def scaled(self, s: float) -> "ModelShape":
        """Hidden, MLP and head widths multiplied by ``s`` (layers, heads, vocabulary kept)."""
        return dataclasses.replace(self, hidden_size=self.hidden_size * s,
                                   intermediate_size=self.intermediate_size * s, head_dim=self.head_dim * s)

    def describe(self) -> str:
        return (f"H={self.hidden_size:.0f} I={self.intermediate_size:.0f} L={self.num_layers} "
                f"heads={self.num_heads}/{self.num_kv_heads} hd={self.head_dim:.1f} V={self.vocab_size}")


def shape_from_mapping(d: Mapping[str, Any], where: str = "model") -> ModelShape:
    """A shape from Hugging Face / :class:`ModelConfig` names (``hidden_size``, ``num_hidden_layers`` ...)."""
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    missing = [n for n in need if n not in d]
    if missing:
        raise UserError(f"{where}: missing {missing}: give a preset name or all of {list(need)}")
    vals = {}
    for n in need:
        v = d[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{where}: {n} = {v!r} must be a positive number")
        vals[n] = v
    hd = d.get("head_dim") or vals["hidden_size"] / vals["num_attention_heads"]
    return ModelShape(hidden_size=float(vals["hidden_size"]), intermediate_size=float(vals["intermediate_size"]),
                      num_layers=int(vals["num_hidden_layers"]), num_heads=int(vals["num_attention_heads"]),
                      num_kv_heads=int(vals["num_key_value_heads"]), head_dim=float(hd),
                      vocab_size=int(vals["vocab_size"]), prefix_tokens=int(d.get("parscale_n_tokens", 48)),
                      tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def shape_from_preset(name: str) -> ModelShape:
    """A shape from ``parscale_jax.config.PRESETS`` (e.g. ``paper-1.6b``, spec section 4a)."""
    from parscale_jax.config import PRESETS

    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}: choose a preset of {sorted(PRESETS)} or give a shape mapping")
    base = {"parscale_n_tokens": 48, "tie_word_embeddings": True, "num_key_value_heads": 2}
    return shape_from_mapping({**base, **PRESETS[name]}, where=f"preset {name}")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak dense bf16 FLOP/s, HBM bandwidth (bytes/s) and HBM capacity (bytes) of one accelerator."""

    name: str
    peak_flops: float
    bandwidth: float
    memory_bytes: float


HARDWARE: dict[str, Hardware] = {
    k: Hardware(a.name, a.bf16_flops, a.hbm_bandwidth, a.hbm_bytes)
    for k, a in ACCELERATORS.items() if k in ("a100", "a100-40gb", "h100", "h200", "tpu-v5e", "tpu-v5p")
}


PREFIX_MODES = ("tokens", "cache")


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    flops: float
    weight_bytes: float
    act_bytes: float
    kv_bytes: float = 0.0
    count: int = 1  # how many times it runs in the pass (layers)

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes


def _linear(name: str, n: float, din: float, dout: float, bias: bool, wb: float, ab: float, count: int = 1) -> _Op:
    return _Op(name, 2.0 * n * din * dout, (din * dout + (dout if bias else 0.0)) * wb, n * (din + dout) * ab, 0.0, count)


def _pass_ops(s: ModelShape, P: int, batch: int, s_q: int, past: int, wb: float, ab: float, kvb: float) -> list[_Op]:
    """Operators of one forward pass over ``s_q`` new tokens per sequence with ``past`` cached real tokens."""
    H, I, hd, V = s.hidden_size, s.intermediate_size, s.head_dim, s.vocab_size
    nH, nKV, L = s.num_heads, s.num_kv_heads, s.num_layers
    T = s.prefix_tokens if P > 1 else 0
    seqs = batch * P
    n = seqs * s_q
    keys_seen = s_q * (T + past) + s_q * (s_q + 1) / 2.0  # per sequence and head
    ops = [
        _Op("embed", 0.0, batch * s_q * H * wb, n * H * ab),
        _linear("q_proj", n, H, nH * hd, True, wb, ab, L),
        _linear("k_proj", n, H, nKV * hd, True, wb, ab, L),
        _linear("v_proj", n, H, nKV * hd, True, wb, ab, L),
        _Op("attention", 4.0 * seqs * nH * hd * keys_seen, 0.0, 2.0 * n * nH * hd * ab,
            seqs * (T + past + s_q) * 2 * nKV * hd * kvb, L),
        _linear("o_proj", n, nH * hd, H, False, wb, ab, L),
        _linear("gate_proj", n, H, I, False, wb, ab, L),
        _linear("up_proj", n, H, I, False, wb, ab, L),
        _linear("down_proj", n, I, H, False, wb, ab, L),
        _Op("rmsnorm", 0.0, H * wb, 2.0 * n * H * ab, 0.0, 2 * L),
        _Op("residual_add", 0.0, 0.0, 3.0 * n * H * ab, 0.0, 2 * L),
        _Op("silu_mul", 0.0, 0.0, 3.0 * n * I * ab, 0.0, L),
        _Op("final_norm", 0.0, H * wb, 2.0 * seqs * H * ab),
    ]
    if P > 1:
        ops += [
            _linear("aggregator_in", batch, P * H, H, True, wb, ab),
            _linear("aggregator_out", batch, H, P, True, wb, ab),
            _Op("aggregate", 0.0, 0.0, batch * (P * H + P + H) * ab),
        ]
    ops.append(_linear("lm_head", batch, H, V, False, wb, ab))
    return ops


def _pass_totals(ops: Iterable[_Op], hw: Hardware, flop_eff: float, bw_eff: float) -> tuple[float, float, float]:
    """(seconds, FLOPs, bytes) of a pass: each operator at max(FLOP time, byte time)."""
    t = f = b = 0.0
    for op in ops:
        t += op.count * max(op.flops / (hw.peak_flops * flop_eff), op.bytes / (hw.bandwidth * bw_eff))
        f += op.count * op.flops
        b += op.count * op.bytes
    return t, f, b


def inference_cost(shape: ModelShape, P: int, batch: int, hw: Hardware, *, input_tokens: int = 64,
                   output_tokens: int = 64, flop_eff: float = 0.7, bw_eff: float = 0.9,
                   weight_bytes: float = 2.0, act_bytes: float = 2.0, kv_bytes: float = 2.0,
                   prefix_mode: str = "tokens") -> dict[str, float]:
    """Analytic memory (bytes) and latency (seconds) of one generate call; see the module docstring.

    ``prefix_mode``: "tokens" (the paper's analytic convention: the T prefix tokens are added to
    each stream's prompt and run through every layer) or "cache" (what the authors' code and
    parscale_jax do: the prefix K/V are parameters copied into the cache, only read by attention).

    Returns weights_bytes, kv_cache_bytes, activation_bytes, memory_bytes, fits_in_memory (1.0 when
    memory_bytes <= hw.memory_bytes, else 0.0), prefill_s, decode_s,
    latency_s, prefill_flops, decode_flops, prefill_bytes, decode_bytes, params, nonembedding_params.
    """
    if P < 1 or batch < 1 or input_tokens < 1 or output_tokens < 1:
        raise UserError("P, batch, input_tokens and output_tokens must all be >= 1")
    if not (0 < flop_eff <= 1 and 0 < bw_eff <= 1):
        raise UserError("efficiency factors must lie in (0, 1]")
    if prefix_mode not in PREFIX_MODES:
        raise UserError(f"unknown prefix mode {prefix_mode!r}: choose one of {PREFIX_MODES}")
    T = shape.prefix_tokens if P > 1 else 0
    run_shape, s_in = shape, input_tokens
    if prefix_mode == "tokens" and T:
        # the paper's convention: the prefix runs through every layer as T extra prompt tokens
        run_shape, s_in = dataclasses.replace(shape, prefix_tokens=0), T + input_tokens
    prefill = _pass_ops(run_shape, P, batch, s_in, 0, weight_bytes, act_bytes, kv_bytes)
    t_pre, f_pre, b_pre = _pass_totals(prefill, hw, flop_eff, bw_eff)
    t_dec = f_dec = b_dec = 0.0
    for j in range(output_tokens - 1):
        t, f, b = _pass_totals(_pass_ops(run_shape, P, batch, 1, s_in + j, weight_bytes, act_bytes, kv_bytes),
                               hw, flop_eff, bw_eff)
        t_dec, f_dec, b_dec = t_dec + t, f_dec + f, b_dec + b
    nonemb = shape.nonembedding_params(P)
    params = nonemb + shape.embedding_params()
    weights = params * weight_bytes
    kv = (shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim * (T + input_tokens + output_tokens)
          * batch * P * kv_bytes)
    acts = max(op.act_bytes for op in prefill)
    return dict(weights_bytes=weights, kv_cache_bytes=kv, activation_bytes=acts, memory_bytes=weights + kv + acts,
                fits_in_memory=float(weights + kv + acts <= hw.memory_bytes),
                prefill_s=t_pre, decode_s=t_dec, latency_s=t_pre + t_dec, prefill_flops=f_pre,
                decode_flops=f_dec, prefill_bytes=b_pre, decode_bytes=b_dec, params=params,
                nonembedding_params=nonemb)


def dense_shape_for_params(base: ModelShape, n_target: float) -> ModelShape:
    """The base shape with widths scaled by the s > 0 that makes its (P=1) non-embedding count ``n_target``."""
    from scipy.optimize import brentq

    if not n_target > 0:
        raise UserError("target parameter count must be positive")
    n0 = base.nonembedding_params(1)
    f = lambda s: math.log(base.scaled(s).nonembedding_params(1) / n_target)  # noqa: E731
    lo, hi = 1e-3, 1e3
    if f(lo) > 0 or f(hi) < 0:
        raise UserError(f"cannot scale a {n0:.3g}-parameter base to {n_target:.3g} parameters: pick a closer base")
    return base.scaled(brentq(f, lo, hi, xtol=1e-14, rtol=1e-14))


def compare_at_equal_loss(base: ModelShape, Ps: Sequence[int], batches: Sequence[int], hw: Hardware,
                          constants: LawConstants, **cost_kw: Any) -> list[dict[str, Any]]:
    """ParScale (base shape, P streams) vs parameter scaling (dense, same predicted loss) per batch size.

    Increases are over the P=1 base at the same batch; ``memory_ratio`` = dense memory increase /
    ParScale memory increase, likewise ``latency_ratio`` (the paper's "x less increase").
    """
    rows = []
    for b in batches:
        ref = inference_cost(base, 1, b, hw, **cost_kw)
        for P in Ps:
            n_p = base.nonembedding_params(P)
            n_eq = float(equivalent_params(n_p, P, constants.k))
            dense = dense_shape_for_params(base, n_eq)
            par = inference_cost(base, P, b, hw, **cost_kw)
            den = inference_cost(dense, 1, b, hw, **cost_kw)
            row = dict(P=P, batch=b, loss=float(predict_loss(constants, n_p, P)), N=n_p, N_dense=n_eq,
                       dense_hidden=dense.hidden_size, parscale=par, dense=den, base=ref)
            for key, out in (("memory", "memory_bytes"), ("latency", "latency_s")):
                dp, dd = par[out] - ref[out], den[out] - ref[out]
                row[f"{key}_increase_parscale"] = dp
                row[f"{key}_increase_dense"] = dd
                row[f"{key}_ratio"] = dd / dp if P > 1 and dp > 0 else float("nan")
            rows.append(row)
    return rows


def _int_field(rec: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = rec.get(key, default)
    if v is None:
        raise UserError(f"{where}: missing {key!r}: each record needs P, batch, latency_s and model")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise UserError(f"{where}: {key} = {v!r} must be an integer >= 1")
    return int(v)


def load_measurements(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a measured-latency JSON (schema in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"measurement file {str(path)!r} not found: pass a JSON list of "
                        "{P, batch, latency_s, model} records")
    try:
        recs = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}): fix the file") from None
    if isinstance(recs, dict) and isinstance(recs.get("records"), list):
        recs = recs["records"]
    if not isinstance(recs, list) or not recs:
        raise UserError(f"{path}: expected a non-empty JSON list of {{P, batch, latency_s, model}} records")
    out = []
    for i, r in enumerate(recs):
        where = f"{path} record {i}"
        if not isinstance(r, dict):
            raise UserError(f"{where}: not an object: each record is {{P, batch, latency_s, model}}")
        lat = r.get("latency_s")
        if isinstance(lat, bool) or not isinstance(lat, (int, float)) or not math.isfinite(lat) or lat <= 0:
            raise UserError(f"{where}: latency_s = {lat!r} must be a positive number of seconds")
        model = r.get("model")
        if isinstance(model, str):
            shape = shape_from_preset(model)
        elif isinstance(model, dict):
            shape = shape_from_mapping(model, where=f"{where} model")
        else:
            raise UserError(f"{where}: model must be a preset name or a shape mapping")
        hwname = r.get("hardware")
        if hwname is not None and (not isinstance(hwname, str) or hwname.lower() not in HARDWARE):
            raise UserError(f"{where}: unknown hardware {hwname!r}: choose one of {sorted(HARDWARE)}")
        out.append(dict(P=_int_field(r, "P", where), batch=_int_field(r, "batch", where), latency_s=float(lat),
                        model=model if isinstance(model, str) else "custom", shape=shape,
                        input_tokens=_int_field(r, "input_tokens", where, 64),
                        output_tokens=_int_field(r, "output_tokens", where, 64),
                        hardware=hwname.lower() if isinstance(hwname, str) else None))
    return out


# ======================================================================================
# Inference-aware planning
# ======================================================================================
@dataclasses.dataclass(frozen=True)
class ChinchillaLaw:
    """``L(N, D, P) = E + A / (N (k ln P + 1))^alpha + B / D^beta``."""

    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.336
    beta: float = 0.283

    def loss(self, N: Any, D: Any, P: Any = 1, k: float = 0.0) -> np.ndarray:
        neff = np.asarray(N, float) * (k * np.log(np.asarray(P, float)) + 1.0)
        return self.E + self.A / neff ** self.alpha + self.B / np.asarray(D, float) ** self.beta

    def params_for(self, target: float, D: float, P: int = 1, k: float = 0.0) -> float:
        """N with ``L(N, D, P) = target``: ``(A / (target - E - B D^-beta))^(1/alpha) / (k ln P + 1)``."""
        rest = target - self.E - self.B * D ** -self.beta
        if rest <= 0:
            return math.inf
        return (self.A / rest) ** (1.0 / self.alpha) / (k * math.log(P) + 1.0)


HOFFMANN = ChinchillaLaw()


@dataclasses.dataclass(frozen=True)
class PlanCosts:
    """Lifetime-cost knobs. ``objective``: 'flops' or 'dollars' (see the module docstring)."""

    objective: str = "flops"
    u_train: float = 0.5
    u_prefill: float = 0.5
    u_decode: float = 0.01
    price_per_hour: float = 2.0
    peak_flops: float = 989e12  # H100 SXM dense bf16
    decode_sharing: bool = True

    def coefficients(self, P: int, d_in: float, d_out: float) -> tuple[float, float]:
        """(a, b) of cost = N * (a * D_train + b)."""
        if self.objective == "flops":
            return 6.0 * P, 2.0 * P * (d_in + d_out)
        if self.objective != "dollars":
            raise UserError(f"unknown objective {self.objective!r}: choose 'flops' or 'dollars'")
        c = self.price_per_hour / 3600.0 / self.peak_flops
        u_dec = min(P * self.u_decode, self.u_prefill) if self.decode_sharing else self.u_decode
        return 6.0 * P * c / self.u_train, 2.0 * P * c * (d_in / self.u_prefill + d_out / u_dec)


def chinchilla_optimum(law: ChinchillaLaw, compute: float) -> tuple[float, float]:
    """Compute-optimal (N, D) for C = 6ND: ``N = G (C/6)^(beta/(alpha+beta))``,
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``, D = C / (6N)."""
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1.0 / (a + b))
    N = G * (compute / 6.0) ** (b / (a + b))
    return N, compute / (6.0 * N)


def chinchilla_optimum_for_loss(law: ChinchillaLaw, target: float, P: int = 1, k: float = 0.0) -> tuple[float, float]:
    """Training-FLOP-optimal (N, D) at ``L = target`` (no inference): ``B D^-beta = alpha (target-E)/(alpha+beta)``."""
    if target <= law.E:
        raise UserError(f"target loss {target} must exceed E = {law.E}: choose a larger target")
    D = (law.B * (law.alpha + law.beta) / (law.alpha * (target - law.E))) ** (1.0 / law.beta)
    return law.params_for(target, D, P, k), D


def _h(x: float, law: ChinchillaLaw, target: float, a: float, b: float) -> tuple[float, float]:
    """h(ln D) of the module docstring and dh/d ln D."""
    D = math.exp(x)
    s = law.B * math.exp(-law.beta * x)
    al, be = law.alpha, law.beta
    h = a * al * (target - law.E - s) - be * s * (a + b / D)
    dh = a * al * be * s + be * be * s * (a + b / D) + be * s * b / D
    return h, dh


def solve_tokens(law: ChinchillaLaw, target: float, a: float, b: float, *, tol: float = 1e-12,
                 max_iter: int = 100) -> tuple[float, str]:
    """Root D of h(D) = 0 (cost-optimal training tokens). Returns (D, method)."""
    from scipy.optimize import brentq

    if target <= law.E:
        raise UserError(f"target loss {target} must exceed E = {law.E}: choose a larger target")
    if a <= 0 or b < 0:
        raise UserError("cost coefficients must satisfy a > 0, b >= 0")
    lo = math.log(law.B / (target - law.E)) / law.beta  # ln D_min: h(lo) < 0
    hi = lo + 1.0
    while _h(hi, law, target, a, b)[0] < 0:
        hi = lo + 2.0 * (hi - lo)
        if hi - lo > 1e4:
            raise UserError("no optimum found: check the plan's constants")
    # Newton from the Chinchilla point (b = 0), kept inside the bracket [lo, hi] (bisect if it leaves).
    x = math.log(chinchilla_optimum_for_loss(law, target)[1])
    x = min(max(x, lo), hi)
    for _ in range(max_iter):
        h, dh = _h(x, law, target, a, b)
        if h == 0:
            return math.exp(x), "newton"
        if h < 0:
            lo = x
        else:
            hi = x
        step = h / dh if dh > 0 else math.inf
        xn = x - step
        if not (lo < xn < hi):
            xn = 0.5 * (lo + hi)
        if abs(xn - x) < tol * max(1.0, abs(x)):
            return math.exp(xn), "newton"
        x = xn
    root = brentq(lambda z: _h(z, law, target, a, b)[0], lo, hi, xtol=1e-14)
    return math.exp(root), "brentq"


def plan_optimum(law: ChinchillaLaw, target: float, *, P: int = 1, k: float = 0.0, inference_in: float = 0.0,
                 inference_out: float = 0.0, costs: PlanCosts = PlanCosts()) -> dict[str, Any]:
    """Cost-optimal (N, D_train) at ``L(N, D, P) = target`` with ``inference_in + inference_out`` lifetime
    inference tokens (prompt, generated). Returns N, D, P, the cost split and the Chinchilla point."""
    if P < 1:
        raise UserError("P must be >= 1")
    if inference_in < 0 or inference_out < 0:
        raise UserError("inference demand must be >= 0")
    a, b = costs.coefficients(P, inference_in, inference_out)
    D, method = solve_tokens(law, target, a, b)
    N = law.params_for(target, D, P, k)
    n_c, d_c = chinchilla_optimum_for_loss(law, target, P, k)
    train = a * N * D
    return dict(P=P, N=N, D=D, tokens_per_param=D / N, train_cost=train, inference_cost=b * N,
                total_cost=train + b * N, chinchilla_N=n_c, chinchilla_D=d_c,
                chinchilla_total_cost=n_c * (a * d_c + b), objective=costs.objective, solver=method,
                loss=float(law.loss(N, D, P, k)))


# ======================================================================================
# Plots (matplotlib imported lazily, Agg backend)
# ======================================================================================
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _check_writable(*paths: str | Path | None) -> None:
    """UserError before any work if an output's directory is missing."""
    for p in paths:
        if p is not None and not Path(p).resolve().parent.is_dir():
            raise UserError(f"cannot write {str(p)!r}: directory {str(Path(p).parent)!r} does not exist: create it first")


def _save(fig: Any, path: str | Path) -> None:
    _check_writable(path)
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


def plot_cost(rows: Sequence[Mapping[str, Any]], path: str | Path, hw_name: str) -> None:
    """Predicted loss vs memory and vs latency: ParScale (P streams) and parameter scaling, per batch."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    batches = sorted({r["batch"] for r in rows})
    shown = [b for b in batches if b in (batches[0], batches[-1])]
    for ls, b in zip(("-", "--"), shown):
        rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["P"])
        loss = [r["loss"] for r in rs]
        for ax, key, scale in ((axes[0], "memory_bytes", 1e-9), (axes[1], "latency_s", 1.0)):
            face = None if b == shown[0] else "none"
            ax.plot([r["parscale"][key] * scale for r in rs], loss, "o" + ls, color="C0", mfc=face,
                    label=f"ParScale, batch {b}")
            ax.plot([r["dense"][key] * scale for r in rs], loss, "s" + ls, color="C3", mfc=face,
                    label=f"parameter scaling, batch {b}")
            if b == shown[0]:
                for r in rs:
                    ax.annotate(f"P={r['P']}", (r["parscale"][key] * scale, r["loss"]), fontsize=7,
                                xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("inference memory (GB)")
    axes[1].set_xlabel("latency of 64+64 tokens (s)")
    for ax in axes:
        ax.set_ylabel("predicted loss (Stack-V2-Python law)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"1.6B-class model, equal predicted loss, {hw_name}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_plan(sweep: Sequence[Mapping[str, Any]], path: str | Path, title: str) -> None:
    """Left: optimal N and D relative to Chinchilla vs lifetime requests. Right: cost of P vs P=1."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    req = [s["requests"] for s in sweep]
    for obj, ls in (("flops", "-"), ("dollars", "--")):
        base = [s[obj][1] for s in sweep]
        axes[0].plot(req, [r["N"] / r["chinchilla_N"] for r in base], ls, color="C0", label=f"N / N_chinchilla ({obj})")
        axes[0].plot(req, [r["D"] / r["chinchilla_D"] for r in base], ls, color="C1", label=f"D / D_chinchilla ({obj})")
    axes[0].axhline(1.0, color="k", lw=0.5)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("lifetime requests (70 in + 215 out tokens)")
    axes[0].set_ylabel("ratio to Chinchilla-optimal (P=1)")
    axes[0].legend(fontsize=7)
    Ps = sorted(sweep[0]["dollars"])
    for i, P in enumerate(Ps):
        if P == 1:
            continue
        for obj, ls in (("flops", "-"), ("dollars", "--")):
            axes[1].plot(req, [s[obj][P]["total_cost"] / s[obj][1]["total_cost"] for s in sweep], ls,
                         color=f"C{i + 2}", label=f"P={P} ({obj})")
    axes[1].axhline(1.0, color="k", lw=0.5)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("lifetime requests")
    axes[1].set_ylabel("optimal lifetime cost, P streams / P=1")
    axes[1].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ======================================================================================
# Command line
# ======================================================================================
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
    if text.strip() in ("0", "0.0"):
        return 0.0
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
    """argparse whose errors become a one-line UserError (exit 2, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message} (see '{self.prog} --help')")


def _load_constants(args: argparse.Namespace) -> tuple[LawConstants, str]:
    """--constants (file or inline JSON; a fit JSON keyed by dataset is fine) or a fit of --dataset."""
    if getattr(args, "constants", None):
        text = args.constants
        p = Path(text)
        src = text if text.lstrip().startswith("{") else None
        if src is None:
            if not p.is_file():
                raise UserError(f"--constants {text!r}: no such file: pass a JSON file or inline JSON like "
                                "'{\"E\":0.69,\"A\":0.0113,\"alpha\":0.189,\"k\":0.393}'")
            src = p.read_text()
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
    name = args.dataset or "stack-v2-python"
    data = load_losses(args.data)
    if args.data is None:
        data.select(name)
        return _packaged_fit(name), f"fit of {name}"
    return fit_dataset(data, name).constants, f"fit of {name}"


def _cmd_fit(args: argparse.Namespace) -> int:
    _check_writable(args.plot, args.json)
    data = load_losses(args.data)
    names = [args.dataset] if args.dataset else data.datasets()
    results = [fit_dataset(data, n, polish=args.polish) for n in names]
    for fr in results:
        print(_fit_table(fr))
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({fr.dataset: fr.to_dict() for fr in results}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_fit(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    _check_writable(args.plot)
    c, src = _load_constants(args)
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


def _hardware(args: argparse.Namespace) -> Hardware:
    key = args.hardware.lower()
    if key not in HARDWARE:
        raise UserError(f"unknown hardware {args.hardware!r}: choose one of {sorted(HARDWARE)} "
                        "or give --peak-flops and --bandwidth")
    hw = HARDWARE[key]
    if args.peak_flops or args.bandwidth or args.memory_gb:
        hw = Hardware(f"{hw.name} (overridden)", args.peak_flops or hw.peak_flops, args.bandwidth or hw.bandwidth,
                      (args.memory_gb * 1e9) if args.memory_gb else hw.memory_bytes)
    return hw


def _ratio(x: float) -> str:
    return f"{x:>6.1f}" if math.isfinite(x) else f"{'-':>6}"


def _cmd_cost(args: argparse.Namespace) -> int:
    _check_writable(args.plot, args.json)
    recs = load_measurements(args.measured) if args.measured else []
    c, src = _load_constants(args)
    hw = _hardware(args)
    base = shape_from_preset(args.base)
    kw = dict(input_tokens=args.input_tokens, output_tokens=args.output_tokens, flop_eff=args.flop_eff,
              bw_eff=args.bw_eff, prefix_mode=args.prefix_mode)
    Ps = sorted(set([1] + args.P))
    rows = compare_at_equal_loss(base, Ps, args.batch, hw, c, **kw)
    print(f"{args.base} ({base.describe()}), {hw.name}: peak {hw.peak_flops / 1e12:.0f} TFLOP/s x {args.flop_eff:.0%}, "
          f"{hw.bandwidth / 1e12:.2f} TB/s x {args.bw_eff:.0%}; {args.input_tokens} in + {args.output_tokens} out "
          f"tokens; prefix as {args.prefix_mode}; loss law: {src} (k={c.k:.4f})")
    print(f"{'':>16} | {'ParScale':^17} | {'param. scaling, same loss':^27} | "
          f"{'memory increase':^24} | {'latency increase':^24}")
    print(f"{'batch':>5} {'P':>2} {'loss':>7} | {'GB':>8} {'s':>8} | {'N':>9} {'GB':>8} {'s':>8} | "
          f"{'ParS GB':>8} {'dense GB':>8} {'x less':>6} | {'ParS ms':>8} {'dense ms':>8} {'x less':>6}")
    for r in rows:
        par, den = r["parscale"], r["dense"]
        print(f"{r['batch']:>5} {r['P']:>2} {r['loss']:>7.4f} | {par['memory_bytes'] / 1e9:>8.3f} "
              f"{par['latency_s']:>8.4f} | {r['N_dense'] / 1e9:>8.3f}B {den['memory_bytes'] / 1e9:>8.3f} "
              f"{den['latency_s']:>8.4f} | {r['memory_increase_parscale'] / 1e9:>8.4f} "
              f"{r['memory_increase_dense'] / 1e9:>8.4f} {_ratio(r['memory_ratio'])} | "
              f"{r['latency_increase_parscale'] * 1e3:>8.2f} {r['latency_increase_dense'] * 1e3:>8.2f} "
              f"{_ratio(r['latency_ratio'])}")
    too_big = sorted({r["batch"] for r in rows if not (r["parscale"]["fits_in_memory"] and r["dense"]["fits_in_memory"])})
    if too_big:
        print(f"note: at batch {too_big} some models exceed the {hw.memory_bytes / 1e9:.0f} GB of one {hw.name}")
    b0 = min(args.batch)
    print()
    for mode in PREFIX_MODES:
        rs = rows if mode == args.prefix_mode else compare_at_equal_loss(base, Ps, [b0], hw, c, **{**kw, "prefix_mode": mode})
        for r in rs:
            if r["batch"] == b0 and r["P"] > 1:
                print(f"batch {b0}, P={r['P']}, prefix as {mode:<6}: {r['memory_ratio']:5.1f}x less memory increase, "
                      f"{r['latency_ratio']:5.1f}x less latency increase than parameter scaling")
    print(f"paper (batch 1): up to {PAPER_HEADLINE['memory_ratio']:.0f}x less memory increase and "
          f"{PAPER_HEADLINE['latency_ratio']:.0f}x less latency increase")
    if recs:
        print(f"\nmeasured vs model ({args.measured}):")
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
    if args.json:
        out = [{k: v for k, v in r.items()} for r in rows]
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_cost(rows, args.plot, hw.name)
        print(f"wrote {args.plot}")
    return 0


def _plan_k(args: argparse.Namespace) -> tuple[float, str]:
    if args.k is not None:
        return args.k, "--k"
    return _packaged_fit("pile").k, "ParScale Pile fit"


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
    # the Chinchilla-optimal model of n_param parameters: solve C with N_opt(C) = n_param.
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1.0 / (a + b))
    C = 6.0 * (n_param / G) ** ((a + b) / b)
    n, d = chinchilla_optimum(law, C)
    return float(law.loss(n, d)), f"quality of a Chinchilla-optimal {n_param / 1e9:g}B model ({d / 1e9:.0f}B tokens)"


def _cmd_plan(args: argparse.Namespace) -> int:
    _check_writable(args.plot)
    law = ChinchillaLaw(args.E, args.A, args.B, args.alpha, args.beta)
    target, tdesc = _plan_target(args, law)
    k, ksrc = _plan_k(args)
    per_req = args.input_tokens + args.output_tokens
    if args.inference_tokens is not None and args.requests is not None:
        raise UserError("give only one of --requests and --inference-tokens")
    if args.inference_tokens is not None:
        requests = args.inference_tokens / per_req
    else:
        requests = args.requests if args.requests is not None else 1e9
    d_in, d_out = requests * args.input_tokens, requests * args.output_tokens
    Ps = sorted(set(args.P))
    base = dict(u_train=args.mfu_train, u_prefill=args.mfu_prefill, u_decode=args.mfu_decode,
                price_per_hour=args.price_per_hour, peak_flops=args.peak_flops,
                decode_sharing=not args.no_decode_sharing)
    print(f"loss law: E={law.E} A={law.A} B={law.B} alpha={law.alpha} beta={law.beta}; k={k:.4f} ({ksrc})")
    print(f"target: {tdesc} -> L = {target:.4f}")
    print(f"inference: {requests:.3g} requests x ({args.input_tokens} in + {args.output_tokens} out) = "
          f"{d_in + d_out:.3g} tokens")
    unit = {"flops": ("FLOPs", 1.0), "dollars": ("$", 1.0)}
    for obj in ("flops", "dollars"):
        costs = PlanCosts(objective=obj, **base)
        res = [plan_optimum(law, target, P=P, k=k, inference_in=d_in, inference_out=d_out, costs=costs) for P in Ps]
        best = min(res, key=lambda r: r["total_cost"])
        u = unit[obj][0]
        print(f"\nobjective: {obj}" + (f" (train/prefill MFU {args.mfu_train:.0%}/{args.mfu_prefill:.0%}, decode "
                                       f"{args.mfu_decode:.0%}{' x P' if not args.no_decode_sharing else ''}, "
                                       f"${args.price_per_hour}/h at {args.peak_flops / 1e12:.0f} TFLOP/s)"
                                       if obj == "dollars" else ""))
        print(f"{'P':>2} {'N':>9} {'D_train':>10} {'D/N':>6} {'train ' + u:>12} {'inference ' + u:>13} "
              f"{'total ' + u:>12} {'vs Chinchilla':>13} {'solver':>7}")
        for r in res:
            mark = " <- best" if r is best else ""
            print(f"{r['P']:>2} {r['N'] / 1e9:>8.2f}B {r['D'] / 1e9:>9.0f}B {r['tokens_per_param']:>6.1f} "
                  f"{r['train_cost']:>12.3e} {r['inference_cost']:>13.3e} {r['total_cost']:>12.3e} "
                  f"{r['total_cost'] / r['chinchilla_total_cost'] - 1:>+12.1%} {r['solver']:>7}{mark}")
        p1 = next((r for r in res if r["P"] == 1), res[0])
        print(f"Chinchilla-optimal at P={p1['P']}: N={p1['chinchilla_N'] / 1e9:.2f}B, D={p1['chinchilla_D'] / 1e9:.0f}B "
              f"({p1['chinchilla_D'] / p1['chinchilla_N']:.1f} tokens/param); inference-aware: "
              f"N={p1['N'] / 1e9:.2f}B ({p1['N'] / p1['chinchilla_N']:.2f}x), D={p1['D'] / 1e9:.0f}B "
              f"({p1['D'] / p1['chinchilla_D']:.2f}x), saving {1 - p1['total_cost'] / p1['chinchilla_total_cost']:.1%}")
    if args.plot:
        sweep = []
        for req in np.geomspace(1e6, 1e12, 25):
            row: dict[str, Any] = {"requests": float(req)}
            for obj in ("flops", "dollars"):
                costs = PlanCosts(objective=obj, **base)
                row[obj] = {P: plan_optimum(law, target, P=P, k=k, inference_in=req * args.input_tokens,
                                            inference_out=req * args.output_tokens, costs=costs) for P in sorted(set([1] + Ps))}
            sweep.append(row)
        plot_plan(sweep, args.plot, f"inference-aware optimum, {tdesc.split(' (')[0]}, L={target:.3f}")
        print(f"wrote {args.plot}")
    return 0


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m parscale_jax.scaling", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    def law_source(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--data", default=None, help="loss CSV (default: the packaged paper data)")
        sp.add_argument("--dataset", default=None, help="dataset whose fit to use (default: stack-v2-python)")
        sp.add_argument("--constants", default=None, help="JSON file or inline JSON with E, A, alpha, k")

    f = sub.add_parser("fit", help="fit the parallel scaling law")
    f.add_argument("--data", default=None, help="CSV with dataset,P,non_embedding_params,loss (default: packaged)")
    f.add_argument("--dataset", default=None, help="fit only this dataset (default: each separately)")
    f.add_argument("--polish", action="store_true", help="converge the best start to tight tolerance")
    f.add_argument("--plot", default=None, help="write the fit plot (PNG)")
    f.add_argument("--json", default=None, help="write constants and R^2 per dataset")

    pr = sub.add_parser("predict", help="loss and equivalent dense size at (N, P)")
    pr.add_argument("--N", type=_number, nargs="+", required=True, help="non-embedding parameters (1.6e9, 1.6B)")
    pr.add_argument("--P", type=_count, nargs="+", default=[1, 2, 4, 8], help="streams")
    law_source(pr)
    pr.add_argument("--plot", default=None, help="write a loss contour over (N, P) (PNG)")

    c = sub.add_parser("cost", help="inference memory/latency: ParScale vs parameter scaling at equal loss")
    law_source(c)
    c.add_argument("--hardware", default="a100", help=f"one of {sorted(HARDWARE)} (default a100, as the paper)")
    c.add_argument("--peak-flops", type=_number, default=None, help="override peak bf16 FLOP/s")
    c.add_argument("--bandwidth", type=_number, default=None, help="override HBM bandwidth, bytes/s")
    c.add_argument("--memory-gb", type=_number, default=None, help="override HBM capacity, GB")
    c.add_argument("--base", default="paper-1.6b", help="base model preset (default paper-1.6b)")
    c.add_argument("--P", type=_count, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--batch", type=_count, nargs="+", default=[1, 2, 4, 8])
    c.add_argument("--input-tokens", type=_count, default=64)
    c.add_argument("--output-tokens", type=_count, default=64)
    c.add_argument("--flop-eff", type=_fraction, default=0.7)
    c.add_argument("--bw-eff", type=_fraction, default=0.9)
    c.add_argument("--prefix-mode", choices=PREFIX_MODES, default="tokens",
                   help="tokens: the paper's convention (prefix = T extra prompt tokens through every layer); "
                        "cache: prefix K/V only read from the cache, as the implementation runs")
    c.add_argument("--measured", default=None, help="benchmark JSON of {P, batch, latency_s, model} records")
    c.add_argument("--plot", default=None)
    c.add_argument("--json", default=None)

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
    pl.add_argument("--mfu-train", type=_fraction, default=0.5)
    pl.add_argument("--mfu-prefill", type=_fraction, default=0.5)
    pl.add_argument("--mfu-decode", type=_fraction, default=0.01)
    pl.add_argument("--no-decode-sharing", action="store_true",
                    help="decode MFU stays u_dec at any P (default: min(P*u_dec, u_prefill))")
    pl.add_argument("--price-per-hour", type=_number, default=2.0)
    pl.add_argument("--peak-flops", type=_number, default=989e12)
    pl.add_argument("--plot", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; ``UserError`` becomes one ``error: ...`` line on stderr and exit code 2."""
    try:
        parser = _build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            raise UserError("choose a command: fit, predict, cost or plan (add --help for options)")
        return {"fit": _cmd_fit, "predict": _cmd_predict, "cost": _cmd_cost, "plan": _cmd_plan}[args.command](args)
    except UserError as e:
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        print(f"error: {e.strerror or e}: {getattr(e, 'filename', '') or ''} (check the path and permissions)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
