"""Tests of parscale_jax.scaling's law, fit and command line, each against an independent computation.
(The cost models are in test_scaling_cost.py, planning in test_scaling_plan.py.)"""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parscale_jax import scaling as sc

REPO = Path(__file__).resolve().parents[1]
PACKAGED_CSV = REPO / "parscale_jax" / "assets" / "parscale_paper_losses.csv"

# The paper's published constants (spec section 4): the reference the fit must reproduce.
PAPER = {
    "stack-v2-python": dict(E=0.6913, A=0.01131, alpha=0.1894, k=0.3934, r2=0.9978),
    "pile": dict(E=1.2889, A=0.1973, alpha=0.1964, k=0.3344, r2=0.9987),
}


def law(E: float, A: float, alpha: float, k: float, N: np.ndarray, P: np.ndarray) -> np.ndarray:
    """The parallel scaling law written out again, independently of the module."""
    return E + (A * 1e9 / (N * (k * np.log(P) + 1.0))) ** alpha


def huber_objective(E, A, alpha, k, N, P, y, delta=1e-3) -> float:
    r = np.log(law(E, A, alpha, k, N, P)) - np.log(y)
    return float(np.sum(np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def paper_points(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [r for r in read_csv(PACKAGED_CSV) if r["dataset"] == dataset]
    assert len(rows) == 24
    return tuple(np.array([float(r[c]) for r in rows]) for c in ("non_embedding_params", "P", "loss"))


# ---------------------------------------------------------------------------- fit
def _synthetic(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    N = np.repeat(np.geomspace(5e8, 5e9, 6), 4)
    P = np.tile([1.0, 2.0, 4.0, 8.0], 6)
    y = law(1.0, 0.05, 0.25, 0.5, N, P)
    return N, P, y * np.exp(np.random.default_rng(seed).normal(0.0, noise, N.size))


def test_fit_recovers_noisy_synthetic_constants():
    N, P, y = _synthetic(2e-4, seed=1)
    fr = sc.fit_law(N, P, y)
    c = fr.constants
    assert abs(c.E / 1.0 - 1) < 0.02
    assert abs(c.A / 0.05 - 1) < 0.03
    assert abs(c.alpha / 0.25 - 1) < 0.04
    assert abs(c.k / 0.5 - 1) < 0.03
    # the reported R^2 and objective are the ones computed here from the constants
    pred = law(c.E, c.A, c.alpha, c.k, N, P)
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert fr.r2 == pytest.approx(r2, abs=1e-12)
    assert fr.objective == pytest.approx(huber_objective(c.E, c.A, c.alpha, c.k, N, P, y), rel=1e-9)
    assert fr.warnings == ()


@pytest.fixture(scope="module")
def fresh_fits() -> dict[str, sc.FitResult]:
    """The packaged paper data fitted now (not the shipped constants)."""
    data = sc.load_losses()
    return {name: sc.fit_dataset(data, name) for name in PAPER}


@pytest.mark.parametrize("dataset", list(PAPER))
def test_paper_points_reproduce_published_constants(dataset, fresh_fits):
    N, P, y = paper_points(dataset)
    c = fresh_fits[dataset].constants
    ref = PAPER[dataset]
    assert c.k == pytest.approx(ref["k"], rel=0.01)
    pred = law(c.E, c.A, c.alpha, c.k, N, P)
    r2 = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert abs(r2 - ref["r2"]) < 1e-3
    # the flat valley moves only the fourth digit of the other constants
    assert c.E == pytest.approx(ref["E"], rel=2e-3)
    assert c.A == pytest.approx(ref["A"], rel=1e-2)
    assert c.alpha == pytest.approx(ref["alpha"], rel=5e-3)


@pytest.mark.parametrize("dataset", list(PAPER))
def test_shipped_constants_are_the_fit_of_the_packaged_data(dataset, fresh_fits):
    """`plan`/`predict`/`cost` read shipped constants instead of refitting: they must be a minimum as
    good as a fit made now, of the very CSV that ships (its SHA-256)."""
    import hashlib

    rec = json.loads((REPO / "parscale_jax" / "assets" / "parscale_paper_fits.json").read_text())[dataset]
    assert rec["data_sha256"] == hashlib.sha256(PACKAGED_CSV.read_bytes()).hexdigest()
    N, P, y = paper_points(dataset)
    shipped = huber_objective(rec["E"], rec["A"], rec["alpha"], rec["k"], N, P, y)
    assert shipped == pytest.approx(fresh_fits[dataset].objective, rel=1e-6)
    assert rec["k"] == pytest.approx(fresh_fits[dataset].constants.k, rel=1e-3)
    c, src = sc.law_for(sc.load_losses(), dataset)
    assert "shipped" in src and c.k == rec["k"]


def test_packaged_csv_parameter_counts_match_the_paper_shapes():
    """Every N in the data is the parameter count of its spec-4a shape at its P."""
    widths = {896: 4864, 1024: 5504, 1280: 6912, 1536: 8320, 2048: 11008, 2560: 13824}
    counts = set()
    for H, I in widths.items():
        s = sc.ModelShape(H, I, 36, 16, 2, H / 16, 151936, 48)
        counts |= {(P, round(s.nonembedding_params(P))) for P in (1, 2, 4, 8)}
    rows = read_csv(PACKAGED_CSV)
    assert len(rows) == 48
    assert {(int(r["P"]), int(r["non_embedding_params"])) for r in rows} == counts


def test_degenerate_fits_are_errors_and_weak_ones_warn():
    N, P, y = _synthetic(0.0)
    for bad in (y[::-1].copy(), 3.0 - y):  # losses that grow with N
        with pytest.raises(sc.UserError, match="degenerate fit"):
            sc.fit_law(N, P, bad)
    with pytest.raises(sc.UserError, match="losses equal"):
        sc.fit_law(N, P, np.full_like(y, 1.5))
    no_gain = law(1.0, 0.05, 0.25, 0.0, N, P)  # P does not matter
    fr = sc.fit_law(N, P, no_gain)
    assert fr.constants.k < 1e-6 and any("no gain" in w for w in fr.warnings)


def test_a_csv_with_a_byte_order_mark_reads_like_the_packaged_one(tmp_path):
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + PACKAGED_CSV.read_bytes())
    a, b = sc.load_losses(tmp_path / "bom.csv"), sc.load_losses()
    assert a.datasets() == b.datasets() == list(PAPER)
    for f in ("P", "N", "loss"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


# ---------------------------------------------------------------------------- CLI
def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    head = "dataset,P,non_embedding_params,loss\n"
    (tmp / "latin1.csv").write_bytes((head + "caf\xe9,1,5e8,2.0\n").encode("latin-1"))
    (tmp / "a_dir").mkdir()
    (tmp / "empty_name.csv").write_text(head + "x,1,5e8,2.0\n,2,5e8,1.9\n")
    pts = "".join(f"x,{p},{n},{1.0 + 0.01 * i}\n" for i, (n, p) in enumerate((n, p) for n in (5e8, 1e9, 2e9)
                                                                           for p in (1, 2)))
    (tmp / "rising.csv").write_text(head + pts)
    (tmp / "flat.csv").write_text(head + "".join(f"x,{p},{n},1.5\n" for n in (5e8, 1e9) for p in (1, 2, 4)))
    (tmp / "cols.csv").write_text("dataset,P,loss\nx,1,2.0\n")
    (tmp / "neg.csv").write_text(head + "x,1,-5e8,2.0\n")
    (tmp / "few.csv").write_text(head + "x,1,5e8,2.0\nx,2,5e8,1.9\nx,1,1e9,1.8\n")
    (tmp / "meas.json").write_text(json.dumps([{"P": 2, "batch": 1, "model": "parscale-1.8b"}]))
    return [
        # the six of issue 14
        (["fit", "--data", str(tmp / "latin1.csv")], "not UTF-8"),
        (["fit", "--data", str(tmp / "a_dir")], "is a directory"),
        (["predict", "--N", "-1.6B"], "must be a positive"),
        (["fit", "--data", str(tmp / "empty_name.csv")], "empty dataset name"),
        (["fit", "--data", str(tmp / "rising.csv")], "degenerate fit"),
        (["fit", "--data", str(tmp / "flat.csv")], "losses equal"),
        # and the rest
        (["fit", "--data", str(tmp / "cols.csv")], "non_embedding_params"),
        (["fit", "--data", str(tmp / "neg.csv")], "positive"),
        (["fit", "--data", str(tmp / "few.csv")], "at least 4"),
        (["fit", "--dataset", "wikitext"], "unknown dataset"),
        (["predict", "--N", "lots"], "not a number"),
        (["predict", "--N", "1e9", "--constants", '{"E": 1}'], "missing"),
        (["cost", "--hardware", "abacus"], "unknown hardware"),
        (["cost", "--measured", str(tmp / "meas.json")], "latency_s"),
        (["cost", "--protocol", "paper", "--base", "qwen2.5-0.5b"], "observed"),
        (["cost", "--json", str(tmp / "a_dir")], "is a directory"),
        (["plan", "--target-loss", "1.5"], "must exceed"),
        (["plan", "--infer-gpu", "a100"], "no fp8 peak"),
        (["plan", "--train-gpu", "tpu-v5p", "--P", "1"], "price"),
        ([], "choose a command"),
    ]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    for args, needle in _bad_inputs(tmp_path):
        rc = sc.main(args)
        err = capsys.readouterr().err
        assert rc == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert needle in lines[0], (args, lines[0])


@pytest.mark.slow
def test_cli_error_exit_code_in_a_real_process(tmp_path):
    """The one subprocess: `python -m parscale_jax.scaling` exits 2 with one line, no traceback."""
    (tmp_path / "latin1.csv").write_bytes(b"dataset,P,non_embedding_params,loss\ncaf\xe9,1,5e8,2.0\n")
    p = subprocess.run([sys.executable, "-m", "parscale_jax.scaling", "fit", "--data", str(tmp_path / "latin1.csv")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("error: ") and "UTF-8" in p.stderr


def test_cli_fit_recovers_exact_synthetic_constants_and_predict_uses_given_ones(tmp_path, capsys):
    const = json.dumps(dict(E=0.69, A=0.0113, alpha=0.189, k=0.393))
    assert sc.main(["predict", "--N", "1.6B", "--P", "1", "8", "--constants", const]) == 0
    out = capsys.readouterr().out
    loss8 = float(law(0.69, 0.0113, 0.189, 0.393, np.array(1.6e9), np.array(8.0)))
    assert f"{loss8:.4f}" in out and f"{1.6e9 * (0.393 * math.log(8) + 1):,.0f}" in out
    N, P, y = _synthetic(0.0)
    (tmp_path / "syn.csv").write_text("dataset,P,non_embedding_params,loss\n" +
                                      "".join(f"syn,{p:g},{n:.0f},{float(v)!r}\n" for n, p, v in zip(N, P, y)))
    assert sc.main(["fit", "--data", str(tmp_path / "syn.csv"), "--json", str(tmp_path / "fit.json")]) == 0
    rec = json.loads((tmp_path / "fit.json").read_text())["syn"]
    np.testing.assert_allclose([rec[k] for k in ("E", "A", "alpha", "k")], [1.0, 0.05, 0.25, 0.5], rtol=1e-3)
