"""Tests of parscale_jax.scaling's inference-aware planning: against the official code of Sardana et
al. (numbers in tests/data/beyond_chinchilla_reference.json), closed forms and brute-force minima."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import brentq, minimize_scalar

from parscale_jax import scaling as sc

DATA = Path(__file__).resolve().parent / "data"
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.336, 0.283  # Hoffmann et al.
H100_BF16, H100_FP8 = 989e12, 1978e12  # FLOP/s, as in the official code


def _chinchilla_closed_form(target):
    """Compute-optimal N, D (C = 6ND) whose loss is `target`: N = G (C/6)^(b/(a+b)), G = (aA/(bB))^(1/(a+b))."""
    G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))

    def nd(logc):
        n = G * (math.exp(logc) / 6) ** (BETA / (ALPHA + BETA))
        return n, math.exp(logc) / 6 / n

    def gap(logc):
        n, d = nd(logc)
        return E + A / n ** ALPHA + B / d ** BETA - target

    return nd(brentq(gap, math.log(1e15), math.log(1e30), xtol=1e-13))


@pytest.mark.parametrize("target", [2.0, 2.3])
def test_plan_without_inference_is_chinchilla_optimal(target):
    n_ref, d_ref = _chinchilla_closed_form(target)
    r = sc.plan_optimum(sc.ChinchillaLaw(), target, P=1)
    assert r["N"] == pytest.approx(n_ref, rel=1e-6)
    assert r["D"] == pytest.approx(d_ref, rel=1e-6)
    # with P streams the same optimum holds for the effective size N (k ln P + 1)
    k = 0.3
    r4 = sc.plan_optimum(sc.ChinchillaLaw(), target, P=4, k=k)
    assert r4["N"] * (k * math.log(4) + 1) == pytest.approx(n_ref, rel=1e-6)
    assert r4["D"] == pytest.approx(d_ref, rel=1e-6)


def _brute_force(target: float, P: int, k: float, cost) -> tuple[float, float, float]:
    """Minimise cost(N(D), D) along L(N, D, P) = target over ln D by bounded Brent search (no derivative)."""
    def n_for(D):
        return (A / (target - E - B / D ** BETA)) ** (1 / ALPHA) / (k * math.log(P) + 1)

    lo = math.log((B / (target - E)) ** (1 / BETA)) + 1e-9
    res = minimize_scalar(lambda x: math.log(cost(n_for(math.exp(x)), math.exp(x))), bounds=(lo, lo + 30),
                          method="bounded", options=dict(xatol=1e-12))
    D = math.exp(res.x)
    return n_for(D), D, cost(n_for(D), D)


@pytest.mark.parametrize("objective,P,sharing", [("flops", 1, False), ("dollars", 1, False), ("dollars", 4, False),
                                                 ("dollars", 4, True), ("dollars", 8, True)])
def test_plan_is_the_brute_force_minimum(objective, P, sharing):
    target, req, k = 2.1, 1e9, 0.33
    d_in, d_out = 70 * req, 215 * req
    costs = sc.PlanCosts(objective=objective, decode_sharing=sharing)
    r = sc.plan_optimum(sc.ChinchillaLaw(), target, P=P, k=k, inference_in=d_in, inference_out=d_out, costs=costs)
    if objective == "flops":
        cost = lambda N, D: 6 * P * N * D + 2 * P * N * (d_in + d_out)  # noqa: E731
    else:
        u_dec = min(P * 0.01, 0.5) if sharing else 0.01
        tr, inf = 2.0 / 3600 / H100_BF16, 2.0 / 3600 / H100_FP8
        cost = lambda N, D: P * (tr * 6 * N * D / 0.5 + inf * 2 * N * (d_in / 0.5 + d_out / u_dec))  # noqa: E731
    n, d, c = _brute_force(target, P, k, cost)
    assert r["N"] == pytest.approx(n, rel=1e-6) and r["D"] == pytest.approx(d, rel=1e-6)
    assert r["total_cost"] == pytest.approx(c, rel=1e-9)
    assert r["train_cost"] + r["inference_cost"] == pytest.approx(r["total_cost"], rel=1e-12)
    assert r["loss"] == pytest.approx(target, rel=1e-9)
    # the headline: heavy inference favours a smaller model trained on more tokens
    assert r["N"] < r["chinchilla_N"] and r["D"] > r["chinchilla_D"]


def test_solver_newton_and_brentq_agree():
    law = sc.ChinchillaLaw()
    d_newton, method = sc.solve_tokens(law, 2.05, 6.0, 1e12)
    assert method == "newton"
    d_brent, _ = sc.solve_tokens(law, 2.05, 6.0, 1e12, max_iter=0)  # forces the fallback
    assert d_newton == pytest.approx(d_brent, rel=1e-9)


def _official() -> list[dict]:
    return json.loads((DATA / "beyond_chinchilla_reference.json").read_text())["records"]


def test_p1_plans_equal_the_official_code():
    """7B/13B/30B/70B quality x {0, 1e8, ..., 1e11} requests: lifetime FLOPs, and dollars with fp8 and
    bf16 inference at the default utilisations and at one where decoding out-runs prefill."""
    law = sc.ChinchillaLaw()
    recs = _official()
    assert len(recs) == 4 * 5 * (1 + 2 * 2)
    for r in recs:
        target = float(law.loss(*sc.chinchilla_optimum(law, sc.chinchilla_compute_for_params(law, r["quality"]))))
        assert target == pytest.approx(r["loss"], rel=1e-12)
        if r["objective"] == "flops":
            costs = sc.PlanCosts("flops")
        else:
            u_tr, u_in, u_out = r["mfu"]
            peak = {"fp8": H100_FP8, "bf16": H100_BF16}[r["infer_dtype"]]
            costs = sc.PlanCosts("dollars", infer_peak=peak, train_mfu=u_tr, prefill_mfu=u_in, decode_mfu=u_out)
        for sharing in (False, True):  # P = 1: decode sharing changes nothing
            c = sc.PlanCosts(**{**costs.__dict__, "decode_sharing": sharing})
            res = sc.plan_optimum(law, target, P=1, inference_in=70 * r["requests"],
                                  inference_out=215 * r["requests"], costs=c)
            for ours, key in ((res["N"], "params"), (res["D"], "tokens"), (res["total_cost"], "total")):
                assert ours == pytest.approx(r[key], rel=1e-6), (r, key)


def test_plan_cli_default_is_the_official_default(tmp_path, capsys):
    """No flag but the quality, demand and P: fp8 inference and bf16 training on H100s at $2/h."""
    out = tmp_path / "plan.json"
    assert sc.main(["plan", "--chinchilla-params", "7e9", "--requests", "1e9", "--P", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2.373B" in text and "1408.5B" in text
    ref = next(r for r in _official() if r["quality"] == 7e9 and r["requests"] == 1e9 and r["objective"] == "dollars"
               and r["infer_dtype"] == "fp8" and r["mfu"] == [0.5, 0.5, 0.01])
    res = json.loads(out.read_text())
    row = res["dollars"]["rows"][0]
    assert set(row) >= {"P", "params", "tokens", "train", "inference", "total"}
    assert (row["params"], row["tokens"], row["total"]) == pytest.approx((ref["params"], ref["tokens"], ref["total"]),
                                                                         rel=1e-6)
    f = res["flops"]["rows"][0]
    assert f["train"] == pytest.approx(6 * f["params"] * f["tokens"], rel=1e-12)
    assert f["inference"] == pytest.approx(2 * f["params"] * 285e9, rel=1e-12)


def test_plan_cli_shows_the_decode_sharing_effect(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert sc.main(["plan", "--k", "0.3344", "--requests", "1e11", "--P", "1", "8", "--json", str(out)]) == 0
    assert "decode sharing" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["dollars"]["decode_sharing"] is False
    eff = {e["P"]: e for e in res["dollars"]["decode_sharing_effect"]}
    assert eff[1]["on"]["total"] == eff[1]["off"]["total"]
    assert eff[8]["off"]["decode_mfu"] == 0.01 and eff[8]["on"]["decode_mfu"] == pytest.approx(0.08)
    assert eff[8]["on"]["total"] < eff[8]["off"]["total"]
    assert res["dollars"]["rows"][1]["total"] == eff[8]["off"]["total"]
    for sec in ("flops", "dollars"):
        assert [r["P"] for r in res[sec]["rows"]] == [1, 8]
    assert np.isfinite([r["total"] for r in res["dollars"]["rows"]]).all()
