"""Model shapes for the cost models: a Qwen2/ParScale shape from a preset or a Hugging Face mapping,
its parameter counts, and the width-scaled dense model with a given parameter count."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from parscale_jax.config import PRESETS, ModelConfig
from parscale_jax.errors import UserError

DEFAULT_BASE = "parscale-1.8b"  # the paper's 1.6B backbone (non-embedding) as released (tied embeddings)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Qwen2/ParScale shape; widths may be fractional (analytic dense equivalents)."""

    hidden_size: float
    intermediate_size: float
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: float
    vocab_size: int
    prefix_tokens: int = 48
    tie_embeddings: bool = False

    def prefix_values(self, P: int) -> float:
        """Prefix K/V values of P streams: ``2 * L * nKV * T * hd * P`` (0 for P = 1)."""
        return float(2 * self.num_layers * self.num_kv_heads * self.prefix_tokens * self.head_dim * P) if P > 1 else 0.0

    def aggregator_params(self, P: int) -> float:
        """``P * (H*H + H + 1) + H`` for P > 1 (the gate's two layers), else 0."""
        H = self.hidden_size
        return float(P * (H * H + H + 1) + H) if P > 1 else 0.0

    def nonembedding_params(self, P: int = 1) -> float:
        """The paper's count. Per layer ``H*nH*hd + nH*hd + 2*(H*nKV*hd + nKV*hd) + nH*hd*H + 3*H*I + 2H``,
        plus the final norm H; for P > 1 plus the prefix values and the aggregator."""
        H, I, hd = self.hidden_size, self.intermediate_size, self.head_dim
        nH, nKV, L = self.num_heads, self.num_kv_heads, self.num_layers
        layer = H * nH * hd + nH * hd + 2 * (H * nKV * hd + nKV * hd) + nH * hd * H + 3 * H * I + 2 * H
        return float(L * layer + H) + self.prefix_values(P) + self.aggregator_params(P)

    def embedding_params(self) -> float:
        """``V*H``, twice when the LM head is untied."""
        return float(self.vocab_size * self.hidden_size * (1 if self.tie_embeddings else 2))

    def scaled(self, s: float) -> "ModelShape":
        """Hidden, MLP and head widths multiplied by ``s`` (layers, heads, vocabulary kept)."""
        return dataclasses.replace(self, hidden_size=self.hidden_size * s,
                                   intermediate_size=self.intermediate_size * s, head_dim=self.head_dim * s)

    def describe(self) -> str:
        return (f"H={self.hidden_size:.0f} I={self.intermediate_size:.0f} L={self.num_layers} "
                f"heads={self.num_heads}/{self.num_kv_heads} hd={self.head_dim:.1f} V={self.vocab_size}"
                f"{' tied' if self.tie_embeddings else ' untied'}")


def shape_from_mapping(d: Mapping[str, Any], where: str = "model") -> ModelShape:
    """A shape from Hugging Face / :class:`ModelConfig` names (``hidden_size``, ``num_hidden_layers`` ...)."""
    need = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size")
    missing = [n for n in need if n not in d]
    if missing:
        raise UserError(f"{where}: missing {missing}: give a preset name or all of {list(need)}")
    vals = {}
    for n in need:
        v = d[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise UserError(f"{where}: {n} = {v!r} must be a positive number")
        vals[n] = v
    hd = d.get("head_dim") or vals["hidden_size"] / vals["num_attention_heads"]
    return ModelShape(hidden_size=float(vals["hidden_size"]), intermediate_size=float(vals["intermediate_size"]),
                      num_layers=int(vals["num_hidden_layers"]), num_heads=int(vals["num_attention_heads"]),
                      num_kv_heads=int(vals["num_key_value_heads"]), head_dim=float(hd),
                      vocab_size=int(vals["vocab_size"]), prefix_tokens=int(d.get("parscale_n_tokens", 48)),
                      tie_embeddings=bool(d.get("tie_word_embeddings", False)))


def shape_from_preset(name: str) -> ModelShape:
    """A shape from ``parscale_jax.config.PRESETS`` (e.g. ``parscale-1.8b``, ``paper-1.6b``)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}: choose a preset of {sorted(PRESETS)} or give a shape mapping")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return shape_from_mapping({**defaults, **PRESETS[name]}, where=f"preset {name}")


def dense_shape_for_params(base: ModelShape, n_target: float) -> ModelShape:
    """The base shape with widths scaled by the s > 0 that makes its (P=1) non-embedding count ``n_target``."""
    from scipy.optimize import brentq

    if not n_target > 0:
        raise UserError("target parameter count must be positive")
    n0 = base.nonembedding_params(1)
    f = lambda s: math.log(base.scaled(s).nonembedding_params(1) / n_target)  # noqa: E731
    lo, hi = 1e-3, 1e3
    if f(lo) > 0 or f(hi) < 0:
        raise UserError(f"cannot scale a {n0:.3g}-parameter base to {n_target:.3g} parameters: pick a closer base")
    return base.scaled(brentq(f, lo, hi, xtol=1e-14, rtol=1e-14))
