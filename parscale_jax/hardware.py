"""Accelerator facts, in one table: peak dense FLOP/s per dtype, HBM capacity and bandwidth, price.

Used by MFU (:mod:`parscale_jax.flops`), the AOT memory check (``hbm_bytes`` per TPU chip) and
the inference-cost and planning tools of :mod:`parscale_jax.scaling`. Vendor figures, dense (no
sparsity). The H100/H200 8-bit peak is 1978 TFLOP/s (NVIDIA's whitepaper: 1978.9; 1978e12 is the
value Sardana et al.'s planning code uses, so ``scaling plan`` reproduces it exactly). Prices are
the hourly rental defaults of that code (A100 40GB $1.10, A100 80GB $1.50, H100 $2.00); None
where no default is assumed. No jax import: the scaling toolkit runs without it.
"""
from __future__ import annotations

import dataclasses

GiB = 2 ** 30

DTYPES = ("bf16", "fp16", "fp8", "int8")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    key: str                       # short name used on command lines (a100, h100, tpu-v5p, ...)
    name: str                      # human-readable
    bf16_flops: float              # dense bf16/fp16 matmul peak, FLOP/s
    hbm_bytes: float               # memory per chip/GPU, bytes
    hbm_bandwidth: float           # bytes/s
    fp8_flops: float | None = None  # dense fp8 peak (None: no fp8 matmul units)
    device_kinds: tuple[str, ...] = ()  # substrings of jax's ``device.device_kind``
    int8_flops: float | None = None  # dense int8 peak, OP/s (None: not listed)
    price_per_hour: float | None = None  # default rental price, $/h (None: no default)

    def peak_flops(self, dtype: str) -> float | None:
        """Dense matmul peak for ``dtype`` (bf16, fp16, fp8, int8); None if the chip has none listed."""
        return {"bf16": self.bf16_flops, "fp16": self.bf16_flops, "fp8": self.fp8_flops,
                "int8": self.int8_flops}[dtype]


ACCELERATORS: dict[str, Accelerator] = {a.key: a for a in (
    Accelerator("a100", "NVIDIA A100 SXM 80GB", 312e12, 80e9, 2.039e12, None, ("A100",),
                int8_flops=624e12, price_per_hour=1.50),
    Accelerator("a100-40gb", "NVIDIA A100 40GB", 312e12, 40e9, 1.555e12, None, (),
                int8_flops=624e12, price_per_hour=1.10),
    Accelerator("h100", "NVIDIA H100 SXM", 989e12, 80e9, 3.35e12, 1978e12, ("H100",),
                int8_flops=1978e12, price_per_hour=2.00),
    Accelerator("h200", "NVIDIA H200", 989e12, 141e9, 4.8e12, 1978e12, ("H200",), int8_flops=1978e12),
    Accelerator("l4", "NVIDIA L4", 121e12, 24e9, 0.3e12, 242e12, ("L4",)),
    Accelerator("a10", "NVIDIA A10", 125e12, 24e9, 0.6e12, None, ("A10",)),
    Accelerator("tpu-v4", "TPU v4", 275e12, 32 * GiB, 1.2e12, None, ("TPU v4",)),
    Accelerator("tpu-v5e", "TPU v5e", 197e12, 16 * GiB, 0.819e12, None, ("TPU v5 lite", "TPU v5e"),
                int8_flops=394e12),
    Accelerator("tpu-v5p", "TPU v5p", 459e12, 95 * GiB, 2.765e12, None, ("TPU v5p", "TPU v5"),
                int8_flops=918e12),
    Accelerator("tpu-v6e", "TPU v6e (Trillium)", 918e12, 32 * GiB, 1.64e12, None, ("TPU v6 lite", "TPU v6e"),
                int8_flops=1836e12),
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
