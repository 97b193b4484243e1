"""The paper's inference-cost protocol, as the authors' ``cost_analysis.py`` computes it with
llm-analysis (github.com/cli99/llm-analysis, the version with gated-MLP support), written out here
so nothing is downloaded or imported at run time.

Setting: an A100 SXM 80GB at 70% of its fp16 peak and 90% of its HBM bandwidth, fp16 weights,
activations and cache; the P streams as P batch rows; for P > 1 the 48 prefix tokens as extra
context tokens and the aggregator's ``(H+1) H P`` parameters added; memory and latency averaged over
input = output length in {64, 128, 256, 512}. Parameter scaling is the curve through the real
P = 1 models at their observed losses, read (linearly) at the ParScale model's observed loss.
docs/scaling.md lists every term; tests/data/paper_cost_reference.json holds the authors' numbers.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.scaling.cost import LENGTHS, Hardware, averaged, increases
from parscale_jax.scaling.law import LossData
from parscale_jax.scaling.shapes import ModelShape, shape_from_preset

# The released models whose P = 1 losses draw the parameter-scaling curve (spec section 4a shapes).
REAL_MODELS = ("parscale-0.7b", "parscale-0.9b", "parscale-1.3b", "parscale-1.8b", "parscale-3b", "parscale-4.7b")
FP16 = 2.0


def _fwd_parts(s: ModelShape, rows: float, q: float, peak: float, bw: float) -> tuple[float, float]:
    """(all layers, one MLP) seconds of a forward pass over ``q`` tokens of ``rows`` sequences."""
    H, I, nH, L = s.hidden_size, s.intermediate_size, s.num_heads, s.num_layers
    kvw = H * s.num_kv_heads / nH  # K/V width (llm-analysis: head_dim = H / nH)
    x = rows * q * H  # elements of one activation
    attn_flops = 4 * x * H + 4 * x * kvw + 4 * rows * q * q * H  # q/o, k/v projections, attention
    attn_act = FP16 * max(3 * x, 2 * x + 4 * nH * rows * q)  # flash attention: no score matrix
    attn = max(attn_flops / peak, (FP16 * (2 * H * H + 2 * H * kvw) + attn_act) / bw)
    mlp = max(6 * x * I / peak, (FP16 * 3 * H * I + FP16 * max(1.0, I / H) * x) / bw)
    norm = max(5 * x / peak, 4 * x / bw)  # fp32 norm traffic
    return L * (attn + mlp + 2 * norm), mlp


def llm_analysis_cost(shape: ModelShape, P: int, batch: int, hw: Hardware, *, input_tokens: int,
                      output_tokens: int, flop_eff: float = 0.7, bw_eff: float = 0.9) -> dict[str, float]:
    """Memory (bytes) and latency (s) of one generate call by cost_analysis.py's method: llm-analysis'
    ``inference(batch * P, input + T, output)`` plus the aggregator, minus the embedding work that
    llm-analysis charges P times."""
    H, I, V, L = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_layers
    peak, bw = hw.peak_flops * flop_eff, hw.bandwidth * bw_eff
    T = shape.prefix_tokens if P > 1 else 0
    rows, s, n_out = batch * P, input_tokens + T, output_tokens
    kvw = H * shape.num_kv_heads / shape.num_heads
    params = L * (2 * H * H + 2 * H * kvw + 3 * H * I + 2 * H) + V * H + H  # embeddings counted once
    kv = FP16 * L * 2 * rows * (s + n_out) * kvw
    emb_read = FP16 * V * H / bw  # llm-analysis reads the whole embedding table per pass

    def fwd(r: float, q: float) -> float:
        return _fwd_parts(shape, r, q, peak, bw)[0] + emb_read + 2 * r * q * V * H / peak

    prefill = fwd(rows, s)
    decode = n_out * (fwd(rows, 1) + 2 * kv / bw)
    agg_params = (H + 1) * H * P if P > 1 else 0.0
    agg_s = agg_params / (3 * H * I) * _fwd_parts(shape, batch, input_tokens + n_out, peak, bw)[1]
    emb_fix = -2 * (input_tokens + n_out) * (rows - batch) * V * H / peak
    act_layer = FP16 * max(3 * rows * s * H, 2 * rows * s * H + 4 * shape.num_heads * rows * s,
                           max(1.0, I / H) * rows * s * H, rows * s * H)
    acts = max(act_layer, FP16 * V * batch * s)
    weights = FP16 * (params + agg_params)
    return dict(weights_bytes=weights, kv_cache_bytes=kv, activation_bytes=acts, memory_bytes=weights + kv + acts,
                prefill_s=prefill, decode_s=decode, aggregator_s=agg_s, embedding_fix_s=emb_fix,
                latency_s=prefill + decode + agg_s + emb_fix)


def _curve_at(curve: Sequence[tuple[float, dict[str, float]]], loss: float, key: str) -> tuple[float, bool]:
    """``key`` of the real models' curve, linear in loss at ``loss`` (the end segment beyond its
    range); returns (value, extrapolated)."""
    xs = np.array([c[0] for c in curve])
    ys = np.array([c[1][key] for c in curve])
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    j = int(np.clip(np.searchsorted(xs, loss), 1, len(xs) - 1))
    x0, x1, y0, y1 = xs[j - 1], xs[j], ys[j - 1], ys[j]
    return float(y0 + (y1 - y0) * (loss - x0) / (x1 - x0)), not (xs[0] <= loss <= xs[-1])


def _observed(data: LossData, dataset: str, shape: ModelShape, P: int, name: str) -> float:
    loss = data.observed(dataset, shape.nonembedding_params(P), P)
    if loss is None:
        raise UserError(f"the paper protocol needs the observed {dataset} loss of {name} at P={P}, and the data "
                        f"has none: choose --base among {list(REAL_MODELS)} and P in 1, 2, 4, 8 (or --protocol project)")
    return loss


def paper_comparison(base: str, Ps: Sequence[int], batches: Sequence[int], hw: Hardware, data: LossData,
                     dataset: str = "stack-v2-python", lengths: Sequence[int] = LENGTHS,
                     **eff: Any) -> list[dict[str, Any]]:
    """Rows of ParScale (``base`` at P streams, observed loss) vs the real P=1 models' curve at that loss."""
    data.select(dataset)
    shape = shape_from_preset(base)
    real = [(m, shape_from_preset(m)) for m in REAL_MODELS]
    rows = []
    for b in batches:
        def cost(s: ModelShape, P: int) -> dict[str, float]:
            return averaged(llm_analysis_cost, lengths, shape=s, P=P, batch=b, hw=hw, **eff)

        curve = [(_observed(data, dataset, s, 1, m), cost(s, 1)) for m, s in real]
        ref = cost(shape, 1)
        for P in Ps:
            loss = _observed(data, dataset, shape, P, base)
            par = cost(shape, P)
            (mem, xm), (lat, xl) = _curve_at(curve, loss, "memory_bytes"), _curve_at(curve, loss, "latency_s")
            den = dict(memory_bytes=mem, latency_s=lat)
            row = dict(P=P, batch=b, loss=loss, N=shape.nonembedding_params(P), parscale=par, dense=den, base=ref,
                       extrapolated=bool(xm or xl))
            rows.append(increases(row, par, den, ref))
    return rows

