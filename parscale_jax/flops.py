"""Model FLOPs per token (forward and training step), counting all P streams.

Matmul FLOPs are 2 * m * n * k. Per token and per stream, each layer does
    projections   2 * H * (nH*hd + 2*nKV*hd) + 2 * nH*hd * H
    MLP           2 * 3 * H * I
    attention     2 * 2 * nH * hd * (T + (S + 1) / 2)      (QK^T and AV; the T prefix keys
                  are seen by every query, real keys causally: (S + 1) / 2 on average)
once per token (after the streams are mixed):
    aggregator    2 * (P*H * H + H * P)                     (only for P > 1)
    LM head       2 * H * V
A training step is 3x the forward (backward = 2x forward); rematerialisation is not counted
(these are *model* FLOPs, the numerator of the MFU the training loop logs). Norms, rotary,
softmax and the gate's elementwise work are ignored (< 1% at useful sizes).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from parscale_jax import hardware
from parscale_jax.config import ModelConfig


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hd
    nH, nKV, L, P, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers, cfg.parscale_n, cfg.prefix_len
    proj = 2 * H * (nH * hd + 2 * nKV * hd) + 2 * nH * hd * H
    mlp = 2 * 3 * H * I
    attn = 2 * 2 * nH * hd * (T + (seq_len + 1) / 2)
    per_stream = L * (proj + mlp + attn)
    agg = 2 * (P * H * H + H * P) if P > 1 else 0
    head = 2 * H * cfg.vocab_size
    return P * per_stream + agg + head


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    return 3.0 * forward_flops_per_token(cfg, seq_len)


def measured_matmul_peak(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of a jit-compiled n x n matmul on the default device (best of ``repeats``): the
    CPU "peak" for MFU, which has no published figure."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak_flops(device=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    acc = hardware.for_device_kind(kind)
    if acc is not None:
        return acc.bf16_flops, f"{kind} bf16 dense peak"
    if device.platform == "cpu":
        return measured_matmul_peak("float32"), "measured float32 matmul rate of one CPU device"
    return measured_matmul_peak("bfloat16"), f"measured bf16 matmul rate ({kind})"
