"""The parallel scaling law (spec section 4): the observed losses, the law and its fit.

``L(N, P) = E + (A * 1e9 / (N * (k ln P + 1))) ** alpha``; N = non-embedding parameters (prefix and
aggregator included for P > 1). The fit minimises the Huber loss (delta 1e-3) between log observed
and log predicted losses with L-BFGS-B from the spec's 300 starts; docs/scaling.md has the details.
The fits of the packaged paper data ship as constants (``assets/parscale_paper_fits.json``, the
output of ``fit --json``, keyed to the CSV's SHA-256); other data is fitted once per process.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from parscale_jax.errors import UserError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DATA_PATH = ASSETS / "parscale_paper_losses.csv"
FITS_PATH = ASSETS / "parscale_paper_fits.json"
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


# ---- data ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossData:
    """Observed losses: parallel arrays, one entry per (dataset, P, N) point."""

    dataset: np.ndarray  # str
    P: np.ndarray  # float, >= 1
    N: np.ndarray  # float, non-embedding parameters, > 0
    loss: np.ndarray  # float, > 0
    sha256: str = ""  # of the file the points came from ("" if built in memory)

    def datasets(self) -> list[str]:
        """Dataset names in order of first appearance."""
        return list(dict.fromkeys(self.dataset.tolist()))

    def select(self, name: str) -> "LossData":
        """The points of one dataset; UserError naming the available ones if it is absent."""
        if name not in set(self.dataset.tolist()):
            raise UserError(f"unknown dataset {name!r}: choose one of {self.datasets()} (the CSV's 'dataset' column)")
        m = self.dataset == name
        return LossData(self.dataset[m], self.P[m], self.N[m], self.loss[m], self.sha256)

    def observed(self, name: str, N: float, P: float) -> float | None:
        """The observed loss of (dataset, N, P), or None if the data has no such point."""
        m = (self.dataset == name) & (self.P == P) & (np.abs(self.N - N) <= 0.5)
        return float(self.loss[m][0]) if m.any() else None


def _positive_number(text: str, what: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise UserError(f"{what} = {text!r} is not a number: write a plain decimal like 1.5e9") from None
    if not math.isfinite(v) or v <= 0:
        raise UserError(f"{what} = {text!r} must be a positive finite number")
    return v


def _read_text(path: Path) -> tuple[str, str]:
    """(text, sha256) of a UTF-8 file (a byte-order mark is allowed); one-line errors otherwise."""
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a directory: pass the CSV file itself (columns {', '.join(REQUIRED_COLUMNS)})")
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} not found: pass --data with a CSV of columns {', '.join(REQUIRED_COLUMNS)}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "save the CSV as UTF-8") from None
    return text, hashlib.sha256(raw).hexdigest()


def load_losses(path: str | Path | None = None) -> LossData:
    """Read a CSV with columns dataset, P, non_embedding_params, loss (the packaged paper data by default)."""
    path = Path(path) if path is not None else DATA_PATH
    text, sha = _read_text(path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}: the header must contain {', '.join(REQUIRED_COLUMNS)}")
    ds, P, N, L = [], [], [], []
    for r in reader:
        i = reader.line_num
        r = {(k or "").strip(): (v or "").strip() for k, v in r.items()}
        if not r["dataset"]:
            raise UserError(f"{path} line {i}: empty dataset name: fill in the 'dataset' column (e.g. stack-v2-python)")
        ds.append(r["dataset"])
        p = _positive_number(r["P"], f"{path} line {i}: P")
        if p < 1:
            raise UserError(f"{path} line {i}: P = {r['P']!r} must be >= 1 (the number of parallel streams)")
        P.append(p)
        N.append(_positive_number(r["non_embedding_params"], f"{path} line {i}: non_embedding_params"))
        L.append(_positive_number(r["loss"], f"{path} line {i}: loss"))
    if not ds:
        raise UserError(f"{path}: no data rows: add one row per (dataset, P, non_embedding_params, loss) point")
    return LossData(np.array(ds), np.array(P, float), np.array(N, float), np.array(L, float), sha)


# ---- the law ---------------------------------------------------------------------------
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


# ---- the fit ---------------------------------------------------------------------------
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
    return _objective(np.log(P), N * 1e-9, np.log(loss), delta)(theta)


def _objective(lnP: np.ndarray, N9: np.ndarray, lnloss: np.ndarray, delta: float):
    """:func:`fit_objective` with the data's logs precomputed (it runs ~20,000 times per fit)."""
    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        E, A, alpha, k = theta.tolist()
        with np.errstate(all="ignore"):
            g = k * lnP + 1.0
            u = A / (N9 * g)
            ua = u ** alpha
            pred = E + ua
            r = np.log(pred) - lnloss
            c = np.minimum(np.maximum(r, -delta), delta)  # clip(r): huber(r) = c (r - c/2)
            val = float(np.dot(c, r - 0.5 * c))
            if not math.isfinite(val):
                return _BAD_OBJECTIVE, np.zeros(4)
            w = c / pred
            wua = w * ua
            grad = np.array([w.sum(), alpha * wua.sum() / A, np.dot(wua, np.log(u)), -alpha * np.dot(wua, lnP / g)])
        if not np.isfinite(grad).all():
            grad = np.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        return val, grad
    return f


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A fitted law, its quality on the points it was fitted to, and warnings about it."""

    dataset: str
    constants: LawConstants
    r2: float
    objective: float
    N: np.ndarray
    P: np.ndarray
    observed: np.ndarray
    predicted: np.ndarray
    data_sha256: str = ""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**self.constants.to_dict(), "r2": self.r2, "objective": self.objective,
                "n_points": int(self.N.size), "data_sha256": self.data_sha256, "warnings": list(self.warnings)}


def _check_fittable(N: np.ndarray, P: np.ndarray, loss: np.ndarray, name: str) -> None:
    if not (N.shape == P.shape == loss.shape and N.ndim == 1):
        raise UserError(f"{name}: N, P and loss must be 1-d arrays of one length")
    if N.size < 4:
        raise UserError(f"dataset {name!r}: {N.size} point(s) cannot determine the 4 constants (E, A, alpha, k): give at least 4")
    for arr, what in ((N, "N"), (loss, "loss")):
        if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
            raise UserError(f"{name}: every {what} must be a positive finite number")
    if not np.all(np.isfinite(P)) or np.any(P < 1):
        raise UserError(f"{name}: every P must be >= 1")
    if np.unique(P).size < 2:
        raise UserError(f"dataset {name!r}: all points have P = {P[0]:g}, so k is not identifiable: add points with another P")
    if np.unique(N).size < 2:
        raise UserError(f"dataset {name!r}: all points have N = {N[0]:g}, so A and alpha are not identifiable: "
                        "add points with another N")
    if np.ptp(loss) == 0:
        raise UserError(f"dataset {name!r}: all {loss.size} losses equal {loss[0]:g}: nothing to fit "
                        "(the law needs losses that fall with N and P)")


def _judge(c: LawConstants, r2: float, name: str) -> tuple[str, ...]:
    """UserError for a degenerate fit; warnings for a fit that is valid but says little."""
    if c.A * 1e9 <= 1e-9 or c.alpha <= 1e-6 or not math.isfinite(r2):
        raise UserError(f"dataset {name!r}: degenerate fit (A={c.A:.3g}, alpha={c.alpha:.3g}, R^2={r2:.3g}): "
                        "the fitted loss does not fall with N; check that the losses decrease as N grows")
    out = []
    if c.k <= 1e-6:
        out.append(f"dataset {name!r}: k = {c.k:.3g}: in this data more streams give no gain beyond what N explains")
    if r2 < 0.9:
        out.append(f"dataset {name!r}: R^2 = {r2:.3f}: the law describes these points poorly")
    return tuple(out)


def fit_law(N: Any, P: Any, loss: Any, *, delta: float = HUBER_DELTA,
            grid: Mapping[str, Sequence[float]] | None = None, polish: bool = False,
            dataset: str = "data", data_sha256: str = "") -> FitResult:
    """Fit (E, A, alpha, k) >= 0 by L-BFGS-B from every start of ``grid`` (default: the spec's 300).

    Keeps the start with the lowest Huber objective; ``polish`` re-runs the winner with tight
    tolerances on a rescaled objective (same minimiser, converged to ~1e-7). BLAS runs on one
    thread: L-BFGS-B's 4x4 algebra is 20x slower when OpenBLAS wakes its thread pool per call.
    UserError for data that cannot be fitted or a degenerate result (see :func:`_judge`).
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits

    N, P, loss = (np.asarray(x, float).ravel() for x in (N, P, loss))
    _check_fittable(N, P, loss, dataset)
    grid = dict(START_GRID if grid is None else grid)
    f = _objective(np.log(P), N * 1e-9, np.log(loss), delta)
    bounds = [(0.0, None)] * 4
    best_val, best_x = math.inf, None
    with threadpool_limits(limits=1, user_api="blas"):
        for x0 in itertools.product(grid["E"], grid["A"], grid["alpha"], grid["k"]):
            res = minimize(f, np.array(x0, float), jac=True, method="L-BFGS-B", bounds=bounds)
            if math.isfinite(res.fun) and res.fun < best_val and np.all(np.isfinite(res.x)):
                best_val, best_x = float(res.fun), res.x
        if best_x is None or best_val >= _BAD_OBJECTIVE:
            raise UserError(f"{dataset}: the fit failed from every start: check that the losses decrease with N and P")
        if polish:
            scale = 1.0 / (delta * delta)
            res = minimize(lambda t: tuple(v * scale for v in f(t)), best_x, jac=True, method="L-BFGS-B",
                           bounds=bounds, options=dict(ftol=1e-15, gtol=1e-12, maxiter=10000))
            if res.fun / scale <= best_val:
                best_val, best_x = float(res.fun / scale), res.x
    c = LawConstants(*(float(v) for v in best_x))
    pred = predict_loss(c, N, P)
    r2 = r_squared(loss, pred)
    return FitResult(dataset, c, r2, best_val, N, P, loss, pred, data_sha256, _judge(c, r2, dataset))


def fit_dataset(data: LossData, name: str, **kw: Any) -> FitResult:
    """Fit one dataset of ``data``."""
    d = data.select(name)
    return fit_law(d.N, d.P, d.loss, dataset=name, data_sha256=data.sha256, **kw)


# ---- fits as constants -----------------------------------------------------------------
_FITS: dict[tuple[str, str], LawConstants] = {}


def shipped_fits() -> dict[str, dict[str, Any]]:
    """The packaged data's fits (``fit --json`` output), or {} if the file is absent or unreadable."""
    try:
        d = json.loads(FITS_PATH.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def law_for(data: LossData, name: str) -> tuple[LawConstants, str]:
    """Constants of dataset ``name``: the shipped fit when ``data`` is the file it was made from,
    else a fit (once per process and file). Returns (constants, where they came from)."""
    data.select(name)
    rec = shipped_fits().get(name)
    if isinstance(rec, dict) and data.sha256 and rec.get("data_sha256") == data.sha256:
        return LawConstants.from_mapping(rec, where=f"{FITS_PATH.name}[{name}]"), f"fit of {name} (shipped)"
    key = (data.sha256 or str(id(data)), name)
    if key not in _FITS:
        fr = fit_dataset(data, name)
        for w in fr.warnings:
            print(f"warning: {w}", file=sys.stderr)
        _FITS[key] = fr.constants
    return _FITS[key], f"fit of {name}"


def fit_table(fr: FitResult) -> str:
    """The fitted constants, the paper's when known, and every point (observed, predicted, error)."""
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
