"""Inference-aware planning (spec section 6; Sardana et al., arXiv 2401.00448) with P streams.

``L(N, D, P) = E + A / (N (k ln P + 1))^alpha + B / D^beta`` (Hoffmann et al. constants by default).
Lifetime cost ``N(D) (a D + b)`` under ``L(N, D, P) = target``:

    flops:    a = 6P,              b = 2P (D_in + D_out)
    dollars:  a = 6P c_tr / u_tr,  b = 2P c_inf (D_in / u_prefill + D_out / u_dec(P))

``c`` = price per hour / 3600 / peak FLOP/s of that phase's accelerator in its dtype (training and
inference each have their own). ``u_dec(P) = u_dec`` unless decode sharing is on; then
``max(u_dec, min(P u_dec, u_prefill))``: bandwidth-bound decoding reads the weights once for the
P streams, so utilisation grows with P up to the prefill's. At P = 1 both are Sardana et al.'s
cost exactly. With ``N(D) = (A / (target - E - B D^-beta))^(1/alpha) / (k ln P + 1)``,
d ln cost / dD = 0 is

    h(D) = a alpha (target - E - B D^-beta) - beta B D^-beta (a + b / D) = 0,

increasing in ln D with one root beyond ``(B / (target - E))^(1/beta)``, solved by a bracketed
Newton iteration in ln D (brentq as fallback); b = 0 gives Chinchilla.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.hardware import ACCELERATORS

TRAIN_DTYPES = ("bf16", "fp8")
INFER_DTYPES = ("bf16", "fp8", "int8")


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
    """Lifetime-cost knobs; the defaults are Sardana et al.'s (H100 at $2/h, bf16 training at 50%
    MFU, fp8 inference at 50% prefill / 1% decode MFU). ``objective``: 'flops' or 'dollars'."""

    objective: str = "flops"
    train_peak: float = ACCELERATORS["h100"].peak_flops("bf16")
    train_price: float = 2.0
    train_mfu: float = 0.5
    infer_peak: float = ACCELERATORS["h100"].peak_flops("fp8")
    infer_price: float = 2.0
    prefill_mfu: float = 0.5
    decode_mfu: float = 0.01
    decode_sharing: bool = False

    def decode_mfu_at(self, P: int) -> float:
        """Decode utilisation with P streams: ``u_dec``, or with sharing ``max(u_dec, min(P u_dec, u_prefill))``."""
        if not self.decode_sharing:
            return self.decode_mfu
        return max(self.decode_mfu, min(P * self.decode_mfu, self.prefill_mfu))

    def coefficients(self, P: int, d_in: float, d_out: float) -> tuple[float, float]:
        """(a, b) of cost = N * (a * D_train + b)."""
        if self.objective == "flops":
            return 6.0 * P, 2.0 * P * (d_in + d_out)
        if self.objective != "dollars":
            raise UserError(f"unknown objective {self.objective!r}: choose 'flops' or 'dollars'")
        c_tr = self.train_price / 3600.0 / self.train_peak
        c_in = self.infer_price / 3600.0 / self.infer_peak
        return (6.0 * P * c_tr / self.train_mfu,
                2.0 * P * c_in * (d_in / self.prefill_mfu + d_out / self.decode_mfu_at(P)))


def phase_peak(gpu: str, dtype: str, what: str) -> float:
    """Peak FLOP/s of ``gpu`` in ``dtype`` from :data:`parscale_jax.hardware.ACCELERATORS`."""
    acc = ACCELERATORS.get(gpu.lower())
    if acc is None:
        raise UserError(f"--{what}-gpu {gpu!r} is unknown: choose one of {sorted(ACCELERATORS)} "
                        f"or give --{what}-peak-flops")
    peak = acc.peak_flops(dtype)
    if peak is None:
        raise UserError(f"{acc.name} has no {dtype} peak in parscale_jax.hardware: choose another "
                        f"--{what}-dtype or give --{what}-peak-flops")
    return peak


def phase_price(gpu: str, what: str) -> float:
    """Default $/h of ``gpu`` (the hardware table's, from Sardana et al.'s code)."""
    acc = ACCELERATORS.get(gpu.lower())
    if acc is None or acc.price_per_hour is None:
        raise UserError(f"no default price for --{what}-gpu {gpu!r}: give --{what}-price in $ per hour")
    return acc.price_per_hour


def chinchilla_optimum(law: ChinchillaLaw, compute: float) -> tuple[float, float]:
    """Compute-optimal (N, D) for C = 6ND: ``N = G (C/6)^(beta/(alpha+beta))``,
    ``G = (alpha A / (beta B))^(1/(alpha+beta))``, D = C / (6N)."""
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1.0 / (a + b))
    N = G * (compute / 6.0) ** (b / (a + b))
    return N, compute / (6.0 * N)


def chinchilla_compute_for_params(law: ChinchillaLaw, n: float) -> float:
    """The C whose Chinchilla-optimal model has n parameters: ``6 (n / G)^((alpha+beta)/beta)``."""
    a, b = law.alpha, law.beta
    G = (a * law.A / (b * law.B)) ** (1.0 / (a + b))
    return 6.0 * (n / G) ** ((a + b) / b)


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
    x = min(max(math.log(chinchilla_optimum_for_loss(law, target)[1]), lo), hi)
    for _ in range(max_iter):
        h, dh = _h(x, law, target, a, b)
        if h == 0:
            return math.exp(x), "newton"
        if h < 0:
            lo = x
        else:
            hi = x
        xn = x - (h / dh if dh > 0 else math.inf)
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
                decode_mfu=costs.decode_mfu_at(P), loss=float(law.loss(N, D, P, k)))
