"""The project's inference-cost protocol: a per-operator roofline of one generate call as
parscale_jax runs it, and ParScale vs the width-scaled dense model of equal predicted loss.

Memory is printed in three parts: weights (every parameter except the prefix), the KV cache (the
prefix once per stream, shared by the batch rows, plus every sequence's prompt and output tokens)
and peak activations (the residual stream plus the largest set of tensors one layer keeps alive,
or the logits). docs/scaling.md has every formula; :mod:`.paper_cost` is the paper's protocol.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from parscale_jax.errors import UserError
from parscale_jax.hardware import ACCELERATORS
from parscale_jax.scaling.law import LawConstants, equivalent_params, predict_loss
from parscale_jax.scaling.shapes import ModelShape, dense_shape_for_params, shape_from_mapping, shape_from_preset

LENGTHS = (64, 128, 256, 512)  # input = output tokens, averaged (the paper's setting)
PREFIX_MODES = ("cache", "tokens")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """Peak dense FLOP/s, HBM bandwidth (bytes/s) and HBM capacity (bytes) of one accelerator."""

    name: str
    peak_flops: float
    bandwidth: float
    memory_bytes: float


HARDWARE: dict[str, Hardware] = {k: Hardware(a.name, a.bf16_flops, a.hbm_bandwidth, a.hbm_bytes)
                                 for k, a in ACCELERATORS.items()}


@dataclasses.dataclass(frozen=True)
class _Op:
    name: str
    flops: Any  # float, or an array over decode steps
    weight_bytes: float
    act_bytes: float
    kv_bytes: Any = 0.0
    count: int = 1  # how many times it runs in the pass (layers)


def _linear(name: str, n: float, din: float, dout: float, bias: bool, wb: float, ab: float, count: int = 1) -> _Op:
    return _Op(name, 2.0 * n * din * dout, (din * dout + (dout if bias else 0.0)) * wb, n * (din + dout) * ab, 0.0, count)


def _pass_ops(s: ModelShape, P: int, batch: int, s_q: int, past: Any, wb: float, ab: float, kvb: float) -> list[_Op]:
    """Operators of one forward pass over ``s_q`` new tokens per sequence with ``past`` cached real
    tokens (a number, or an array: one pass per entry). ``s.prefix_tokens`` = T prefix entries read
    from the cache by every sequence (0 when the prefix runs as tokens)."""
    H, I, hd, V = s.hidden_size, s.intermediate_size, s.head_dim, s.vocab_size
    nH, nKV, L = s.num_heads, s.num_kv_heads, s.num_layers
    T = s.prefix_tokens if P > 1 else 0
    seqs, rows = batch * P, batch * s_q  # sequences (streams folded in); positions after aggregation
    n = seqs * s_q
    past = np.asarray(past, float)
    keys_seen = s_q * (T + past) + s_q * (s_q + 1) / 2.0  # per sequence and head
    ops = [
        _Op("embed", 0.0, rows * H * wb, n * H * ab),
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
        _Op("final_norm", 0.0, H * wb, 2.0 * n * H * ab),
    ]
    if P > 1:
        ops += [
            _linear("aggregator_in", rows, P * H, H, True, wb, ab),
            _linear("aggregator_out", rows, H, P, True, wb, ab),
            _Op("aggregate", 0.0, 0.0, rows * (P * H + P + H) * ab),
        ]
    ops.append(_linear("lm_head", rows, H, V, False, wb, ab))
    return ops


def _pass_totals(ops: Iterable[_Op], hw: Hardware, flop_eff: float, bw_eff: float,
                 steps: tuple[int, ...] = ()) -> tuple[float, float, float]:
    """(seconds, FLOPs, bytes) summed over the passes (``steps`` = their array shape; () for one):
    each operator at max(FLOP time, byte time)."""
    t = f = b = 0.0
    for op in ops:
        fl = np.broadcast_to(np.asarray(op.flops, float), steps)
        by = np.broadcast_to(op.weight_bytes + op.act_bytes + np.asarray(op.kv_bytes, float), steps)
        t += op.count * float(np.sum(np.maximum(fl / (hw.peak_flops * flop_eff), by / (hw.bandwidth * bw_eff))))
        f += op.count * float(np.sum(fl))
        b += op.count * float(np.sum(by))
    return t, f, b


def memory_parts(shape: ModelShape, P: int, batch: int, input_tokens: int, output_tokens: int, *,
                 wb: float = 2.0, ab: float = 2.0, kvb: float = 2.0, prefix_mode: str = "cache") -> dict[str, float]:
    """Weights (all parameters but the prefix), KV cache, peak activations of the prefill (bytes)."""
    H, I, hd, V = shape.hidden_size, shape.intermediate_size, shape.head_dim, shape.vocab_size
    T = shape.prefix_tokens if P > 1 else 0
    per_token = shape.num_layers * 2 * shape.num_kv_heads * hd * kvb  # K and V of one token, all layers
    own = batch * P * (input_tokens + output_tokens)
    kv = per_token * (own + P * T if prefix_mode == "cache" else own + batch * P * T)
    s_in = input_tokens + (T if prefix_mode == "tokens" else 0)
    n = batch * P * s_in
    layer = n * H + max(n * (shape.num_heads + 2 * shape.num_kv_heads) * hd, 2 * n * I)
    head = batch * s_in * (V + H)
    weights = (shape.nonembedding_params(P) - shape.prefix_values(P) + shape.embedding_params()) * wb
    acts = ab * max(layer, head)
    return dict(weights_bytes=weights, kv_cache_bytes=kv, activation_bytes=acts, memory_bytes=weights + kv + acts)


def inference_cost(shape: ModelShape, P: int, batch: int, hw: Hardware, *, input_tokens: int = 64,
                   output_tokens: int = 64, flop_eff: float = 0.7, bw_eff: float = 0.9,
                   weight_bytes: float = 2.0, act_bytes: float = 2.0, kv_bytes: float = 2.0,
                   prefix_mode: str = "cache") -> dict[str, float]:
    """Analytic memory (bytes) and latency (seconds) of one generate call: a prefill over the
    prompt (it emits the first token), then ``output_tokens - 1`` decode steps.

    ``prefix_mode``: "cache" (what parscale_jax runs: the prefix K/V are read from the cache) or
    "tokens" (the paper's analytic convention: T extra prompt tokens through every layer).
    Returns the :func:`memory_parts`, fits_in_memory (1.0 or 0.0), prefill_s, decode_s, latency_s,
    prefill/decode FLOPs and bytes, params, nonembedding_params.
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
        run_shape, s_in = dataclasses.replace(shape, prefix_tokens=0), T + input_tokens
    wab = (weight_bytes, act_bytes, kv_bytes)
    t_pre, f_pre, b_pre = _pass_totals(_pass_ops(run_shape, P, batch, s_in, 0, *wab), hw, flop_eff, bw_eff)
    past = s_in + np.arange(output_tokens - 1)
    t_dec, f_dec, b_dec = _pass_totals(_pass_ops(run_shape, P, batch, 1, past, *wab), hw, flop_eff, bw_eff,
                                       past.shape)
    mem = memory_parts(shape, P, batch, input_tokens, output_tokens, wb=weight_bytes, ab=act_bytes,
                       kvb=kv_bytes, prefix_mode=prefix_mode)
    nonemb = shape.nonembedding_params(P)
    return dict(**mem, fits_in_memory=float(mem["memory_bytes"] <= hw.memory_bytes),
                prefill_s=t_pre, decode_s=t_dec, latency_s=t_pre + t_dec, prefill_flops=f_pre,
                decode_flops=f_dec, prefill_bytes=b_pre, decode_bytes=b_dec,
                params=nonemb + shape.embedding_params(), nonembedding_params=nonemb)


def averaged(fn: Any, lengths: Sequence[int], **kw: Any) -> dict[str, float]:
    """Every field of ``fn(input_tokens=n, output_tokens=n, **kw)`` averaged over ``lengths``."""
    outs = [fn(input_tokens=n, output_tokens=n, **kw) for n in lengths]
    return {k: float(np.mean([o[k] for o in outs])) for k in outs[0]}


def increases(row: dict[str, Any], par: Mapping[str, float], den: Mapping[str, float],
              ref: Mapping[str, float]) -> dict[str, Any]:
    """Increase over the P=1 base of ParScale and of the dense model; ratio = dense / ParScale."""
    for key, out in (("memory", "memory_bytes"), ("latency", "latency_s")):
        dp, dd = par[out] - ref[out], den[out] - ref[out]
        row[f"{key}_increase_parscale"] = dp
        row[f"{key}_increase_dense"] = dd
        row[f"{key}_ratio"] = dd / dp if row["P"] > 1 and dp > 0 else float("nan")
    return row


def compare_at_equal_loss(base: ModelShape, Ps: Sequence[int], batches: Sequence[int], hw: Hardware,
                          constants: LawConstants, *, lengths: Sequence[int] = LENGTHS,
                          **cost_kw: Any) -> list[dict[str, Any]]:
    """ParScale (base shape, P streams) vs parameter scaling (the base widths scaled until the
    dense model's non-embedding count is ``N_P (k ln P + 1)``: the same predicted loss), per batch,
    memory and latency averaged over input = output length in ``lengths``."""
    rows = []
    for b in batches:
        ref = averaged(inference_cost, lengths, shape=base, P=1, batch=b, hw=hw, **cost_kw)
        for P in Ps:
            n_p = base.nonembedding_params(P)
            n_eq = float(equivalent_params(n_p, P, constants.k))
            dense = dense_shape_for_params(base, n_eq)
            par = averaged(inference_cost, lengths, shape=base, P=P, batch=b, hw=hw, **cost_kw)
            den = averaged(inference_cost, lengths, shape=dense, P=1, batch=b, hw=hw, **cost_kw)
            row = dict(P=P, batch=b, loss=float(predict_loss(constants, n_p, P)), N=n_p, N_dense=n_eq,
                       dense_hidden=dense.hidden_size, parscale=par, dense=den, base=ref)
            rows.append(increases(row, par, den, ref))
    return rows


def _int_field(rec: Mapping[str, Any], key: str, where: str, default: int | None = None) -> int:
    v = rec.get(key, default)
    if v is None:
        raise UserError(f"{where}: missing {key!r}: each record needs P, batch, latency_s and model")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < 1:
        raise UserError(f"{where}: {key} = {v!r} must be an integer >= 1")
    return int(v)


def _measurement(r: Any, where: str) -> dict[str, Any]:
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
    return dict(P=_int_field(r, "P", where), batch=_int_field(r, "batch", where), latency_s=float(lat),
                model=model if isinstance(model, str) else "custom", shape=shape,
                input_tokens=_int_field(r, "input_tokens", where, 64),
                output_tokens=_int_field(r, "output_tokens", where, 64),
                hardware=hwname.lower() if isinstance(hwname, str) else None)


def load_measurements(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a measured-latency JSON: a list of {P, batch, latency_s, model} records
    (optional input_tokens, output_tokens, hardware); docs/scaling.md has the schema."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"measurement file {str(path)!r} is a directory: pass the JSON file itself")
    if not path.is_file():
        raise UserError(f"measurement file {str(path)!r} not found: pass a JSON list of "
                        "{P, batch, latency_s, model} records")
    try:
        recs = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid JSON ({getattr(e, 'msg', e)}): fix the file") from None
    if isinstance(recs, dict) and isinstance(recs.get("records"), list):
        recs = recs["records"]
    if not isinstance(recs, list) or not recs:
        raise UserError(f"{path}: expected a non-empty JSON list of {{P, batch, latency_s, model}} records")
    return [_measurement(r, f"{path} record {i}") for i, r in enumerate(recs)]
