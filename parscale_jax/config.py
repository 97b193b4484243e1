"""Model configuration: a frozen dataclass with the Hugging Face Qwen2 names plus ParScale's.

Architecture (what a checkpoint must agree on), plus one runtime knob that belongs to the model
section of a training config: ``attention_impl`` (see :mod:`parscale_jax.attention`). It is left
out of :meth:`ModelConfig.to_dict` (checkpoint metadata, Hugging Face exports, architecture
comparisons). Other runtime knobs (compute dtype, remat, layer scanning) are arguments of
:func:`parscale_jax.model.make_model`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from parscale_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """An invalid configuration value; the message names the field and the fix."""


RUNTIME_FIELDS = ("attention_impl",)
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 160
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    parscale_n: int = 1  # P, the number of parallel streams
    parscale_n_tokens: int = 48  # T, prefix tokens per stream and layer
    parscale_attn_smooth: float = 0.1  # eps of the gate's smoothing (the paper's value)
    # runtime, not architecture: auto | xla | chunked | splash | cudnn (parscale_jax.attention)
    attention_impl: str = "auto"

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def hd(self) -> int:
        """Per-head dimension."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def P(self) -> int:
        return self.parscale_n

    @property
    def prefix_len(self) -> int:
        """Prefix entries per stream and layer actually used (0 for P=1)."""
        return self.parscale_n_tokens if self.parscale_n > 1 else 0

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The architecture fields (runtime knobs such as ``attention_impl`` left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_FIELDS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config key(s) {unknown}; valid keys: {sorted(names)}")
        return cls(**dict(d))


def diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """``"model.KEY a -> b"`` for every field where the two configs differ."""
    da, db = a.to_dict(), b.to_dict()
    return [f"model.{k} {da[k]} -> {db[k]}" for k in da if da[k] != db.get(k)]


def _positive_int(cfg: ModelConfig, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"model.{name}={v!r} is invalid: set it to a positive integer")


def validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the field and the fix for an invalid combination."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
        _positive_int(cfg, name)
    if isinstance(cfg.parscale_n, bool) or not isinstance(cfg.parscale_n, int) or cfg.parscale_n < 1:
        raise ConfigError(f"model.parscale_n={cfg.parscale_n!r} is invalid: P must be an integer >= 1 (1 = plain Qwen2)")
    if cfg.parscale_n > 1:
        _positive_int(cfg, "parscale_n_tokens")
    if cfg.head_dim is None:
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(
                f"model.num_attention_heads={cfg.num_attention_heads} does not divide "
                f"model.hidden_size={cfg.hidden_size}: choose a divisor or set model.head_dim")
    else:
        _positive_int(cfg, "head_dim")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"model.num_key_value_heads={cfg.num_key_value_heads} does not divide "
            f"model.num_attention_heads={cfg.num_attention_heads}: choose a divisor")
    if cfg.hd % 2:
        raise ConfigError(f"head dimension {cfg.hd} is odd: rotary embeddings need an even model.head_dim")
    if not 0.0 <= float(cfg.parscale_attn_smooth) < 1.0:
        raise ConfigError(
            f"model.parscale_attn_smooth={cfg.parscale_attn_smooth} is invalid: it must lie in [0, 1) (paper: 0.1)")
    if cfg.attention_impl not in ATTENTION_IMPLS + ("splash_interpret", "cudnn_xla"):  # the last two: tests
        raise ConfigError(f"model.attention_impl={cfg.attention_impl!r} is unknown: choose one of "
                          f"{', '.join(ATTENTION_IMPLS)}")
    for name in ("rope_theta", "rms_norm_eps", "initializer_range"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ConfigError(f"model.{name}={v!r} is invalid: set it to a positive number")


# ---- presets -------------------------------------------------------------------------
_PAPER = dict(num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
              vocab_size=151936, parscale_n_tokens=48, tie_word_embeddings=False,
              rope_theta=10000.0, max_position_embeddings=2048)
_QWEN25 = dict(vocab_size=151936, rope_theta=1000000.0, rms_norm_eps=1e-6,
               max_position_embeddings=32768, tie_word_embeddings=True)

PRESETS: dict[str, dict[str, Any]] = {
    # A few-hundred-thousand-parameter model for tests and the CPU demo (byte vocabulary).
    "tiny": dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, parscale_n_tokens=16,
                 max_position_embeddings=1024, tie_word_embeddings=True),
    # The paper's six pretraining backbones (spec section 4a).
    "paper-0.5b": dict(_PAPER, hidden_size=896, intermediate_size=4864),
    "paper-0.7b": dict(_PAPER, hidden_size=1024, intermediate_size=5504),
    "paper-1.1b": dict(_PAPER, hidden_size=1280, intermediate_size=6912),
    "paper-1.6b": dict(_PAPER, hidden_size=1536, intermediate_size=8320),
    "paper-2.8b": dict(_PAPER, hidden_size=2048, intermediate_size=11008),
    "paper-4.4b": dict(_PAPER, hidden_size=2560, intermediate_size=13824),
    # The same six shapes as released on the Hugging Face hub (ParScale-{size}-P{1,2,4,8}-{Python,Pile};
    # ParScale-1.8B-P{n}[-Inst] is the 1.6B backbone trained on 1T tokens), named by their total size:
    # the released checkpoints tie the input and output embeddings (0.67B + 0.14B untied would not be
    # "0.7B"). Separate names keep the untied paper-* presets (and checkpoints trained from them) valid.
    # ParScale-Qwen-3B-* and ParScale-QwenInit-3B-* are the qwen2.5-3b preset.
    "parscale-0.7b": dict(_PAPER, hidden_size=896, intermediate_size=4864, tie_word_embeddings=True),
    "parscale-0.9b": dict(_PAPER, hidden_size=1024, intermediate_size=5504, tie_word_embeddings=True),
    "parscale-1.3b": dict(_PAPER, hidden_size=1280, intermediate_size=6912, tie_word_embeddings=True),
    "parscale-1.8b": dict(_PAPER, hidden_size=1536, intermediate_size=8320, tie_word_embeddings=True),
    "parscale-3b": dict(_PAPER, hidden_size=2048, intermediate_size=11008, tie_word_embeddings=True),
    "parscale-4.7b": dict(_PAPER, hidden_size=2560, intermediate_size=13824, tie_word_embeddings=True),
    # Qwen2.5 shapes (for recycling public checkpoints into ParScale).
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen2.5-3b": dict(_QWEN25, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named preset, optionally with fields overridden (e.g. ``preset("tiny", parscale_n=4)``)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}: choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], **overrides})
