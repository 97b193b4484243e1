"""The parallel scaling law toolkit: fit, predict, inference cost and inference-aware planning.

numpy / scipy / matplotlib only (no jax), so it runs anywhere. ``python -m parscale_jax.scaling
{fit,predict,cost,plan}``; docs/scaling.md is the reference. Modules: :mod:`.law` (data, law, fit),
:mod:`.shapes` (model shapes), :mod:`.cost` (the project's inference-cost protocol),
:mod:`.paper_cost` (the paper's), :mod:`.plan` (inference-aware planning), :mod:`.plots`,
:mod:`.cli` / :mod:`.report` (the command line).
"""
from parscale_jax.errors import UserError
from parscale_jax.scaling.cli import main
from parscale_jax.scaling.cost import (HARDWARE, LENGTHS, PREFIX_MODES, Hardware, compare_at_equal_loss,
                                       inference_cost, load_measurements, memory_parts)
from parscale_jax.scaling.law import (DATA_PATH, START_GRID, FitResult, LawConstants, LossData, equivalent_params,
                                      fit_dataset, fit_law, fit_objective, huber, law_for, load_losses,
                                      params_for_loss, predict_loss, r_squared, shipped_fits)
from parscale_jax.scaling.paper_cost import REAL_MODELS, llm_analysis_cost, paper_comparison
from parscale_jax.scaling.plan import (HOFFMANN, ChinchillaLaw, PlanCosts, chinchilla_compute_for_params,
                                       chinchilla_optimum, chinchilla_optimum_for_loss, plan_optimum, solve_tokens)
from parscale_jax.scaling.shapes import ModelShape, dense_shape_for_params, shape_from_mapping, shape_from_preset

__all__ = [
    "UserError", "main",
    "HARDWARE", "LENGTHS", "PREFIX_MODES", "Hardware", "compare_at_equal_loss", "inference_cost",
    "load_measurements", "memory_parts",
    "DATA_PATH", "START_GRID", "FitResult", "LawConstants", "LossData", "equivalent_params", "fit_dataset",
    "fit_law", "fit_objective", "huber", "law_for", "load_losses", "params_for_loss", "predict_loss",
    "r_squared", "shipped_fits",
    "REAL_MODELS", "llm_analysis_cost", "paper_comparison",
    "HOFFMANN", "ChinchillaLaw", "PlanCosts", "chinchilla_compute_for_params", "chinchilla_optimum",
    "chinchilla_optimum_for_loss", "plan_optimum", "solve_tokens",
    "ModelShape", "dense_shape_for_params", "shape_from_mapping", "shape_from_preset",
]
