"""Accelerator facts, in one table: peak dense FLOP/s, HBM capacity and bandwidth.

Used by MFU (:mod:`parscale_jax.flops`), the AOT memory check (``hbm_bytes`` per TPU chip) and
the inference-cost model of :mod:`parscale_jax.scaling`. Vendor figures, dense (no sparsity).
No jax import: the scaling toolkit runs without it.
"""
from __future__ import annotations

import dataclasses

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    key: str                       # short name used on command lines (a100, h100, tpu-v5p, ...)
    name: str                      # human-readable
    bf16_flops: float              # dense bf16 matmul peak, FLOP/s
    hbm_bytes: float               # memory per chip/GPU, bytes
    hbm_bandwidth: float           # bytes/s
    fp8_flops: float | None = None  # dense fp8 peak (None: no fp8 matmul units)
    device_kinds: tuple[str, ...] = ()  # substrings of jax's ``device.device_kind``


ACCELERATORS: dict[str, Accelerator] = {a.key: a for a in (
    Accelerator("a100", "NVIDIA A100 SXM 80GB", 312e12, 80e9, 2.039e12, None, ("A100",)),
    Accelerator("a100-40gb", "NVIDIA A100 40GB", 312e12, 40e9, 1.555e12, None, ()),
    Accelerator("h100", "NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 1979e12, ("H100",)),
    Accelerator("h200", "NVIDIA H200", 989e12, 141e9, 4.8e12, 1979e12, ("H200",)),
    Accelerator("l4", "NVIDIA L4", 121e12, 24e9, 0.3e12, 242e12, ("L4",)),
    Accelerator("a10", "NVIDIA A10", 125e12, 24e9, 0.6e12, None, ("A10",)),
    Accelerator("tpu-v4", "TPU v4", 275e12, 32 * GiB, 1.2e12, None, ("TPU v4",)),
    Accelerator("tpu-v5e", "TPU v5e", 197e12, 16 * GiB, 0.819e12, None, ("TPU v5 lite", "TPU v5e")),
    Accelerator("tpu-v5p", "TPU v5p", 459e12, 95 * GiB, 2.765e12, None, ("TPU v5p", "TPU v5")),
    Accelerator("tpu-v6e", "TPU v6e (Trillium)", 918e12, 32 * GiB, 1.64e12, None, ("TPU v6 lite", "TPU v6e")),
)}


def for_device_kind(kind: str) -> Accelerator | None:
    """The table entry whose ``device_kinds`` match jax's ``device.device_kind`` (None if unknown).
    Longer patterns are tried first ("TPU v5 lite" before "TPU v5", "A100" before "A10")."""
    kind = (kind or "").lower()
    pats = sorted(((p, a) for a in ACCELERATORS.values() for p in a.device_kinds), key=lambda t: -len(t[0]))
    for p, a in pats:
        if p.lower() in kind:
            return a
    return None
