"""The ``qwen2_parscale`` configuration for ``transformers`` (needs transformers, a dev dependency).

``convert to-hf`` copies this file, unchanged, into every P > 1 export as
``configuration_qwen2_parscale.py`` (``auto_map.AutoConfig`` in its config.json), beside
``modeling_qwen2_parscale.py`` and ``torch_ref.py``, so that
``AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)`` needs nothing else. The
class and key names are the authors' (``Qwen2ParScaleConfig``, ``parscale_n``,
``parscale_n_tokens``, ``parscale_attn_smooth``): their own module reads the same directory.
"""
from __future__ import annotations

from transformers import Qwen2Config


class Qwen2ParScaleConfig(Qwen2Config):
    """Qwen2's keys plus the three ParScale ones (spec section 3). ``parscale_attn_smooth``
    defaults to the authors' class default 0.01; exports of this project always write it."""

    model_type = "qwen2_parscale"
    parscale_n: int = 1
    parscale_n_tokens: int = 48
    parscale_attn_smooth: float = 0.01
