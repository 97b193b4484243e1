"""``qwen2_parscale`` as a ``transformers`` causal LM: ``PreTrainedModel`` + ``GenerationMixin``.

``convert to-hf`` copies this file, unchanged, into every P > 1 export as
``modeling_qwen2_parscale.py`` (``auto_map.AutoModelForCausalLM``), with
``configuration_qwen2_parscale.py`` and ``torch_ref.py`` beside it; the relative imports below
resolve inside the package and inside an export alike. So an export loads by itself::

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("export/p4", trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained("export/p4")
    out = model.generate(**tok(["def f("], return_tensors="pt"), max_new_tokens=16, do_sample=False)

and lm-eval's ``hf`` backend runs it (``--model hf --model_args pretrained=export/p4,trust_remote_code=True``).

There is no second model here: the forward is :func:`torch_ref.causal_lm` over
:class:`torch_ref.Body` (the project's independent PyTorch implementation, written from the
spec), so the parameter names are the authors' (``model.layers.{i}.self_attn.prefix_k``, ...).
This module only adapts the ``transformers`` conventions: config class, weight init and tying,
loss, and the KV cache.

**KV cache.** A standard :class:`transformers.DynamicCache` holding the real tokens only, each
layer's keys/values ``[B, P * nKV, n, hd]`` (the P streams of a sequence side by side in the head
axis, batch first), so that everything ``generate`` does to a cache (beam reordering, expansion
for several return sequences, cropping) moves the P streams of a sequence together. Each step puts
the layer's T prefix entries (not rotated) in front. Positions count real tokens (the
``attention_mask``; left padding allowed), as in training.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_qwen2_parscale import Qwen2ParScaleConfig
from .torch_ref import Attention, Body, RefConfig, causal_lm


def _batch_major(x, P: int):
    """[P*B, nKV, S, hd] (stream-major rows p*B+b) -> [B, P*nKV, S, hd]."""
    N, nKV, S, hd = x.shape
    return x.view(P, N // P, nKV, S, hd).transpose(0, 1).reshape(N // P, P * nKV, S, hd)


def _stream_major(x, P: int):
    """[B, P*nKV, S, hd] -> [P*B, nKV, S, hd] (the inverse of _batch_major)."""
    B, PK, S, hd = x.shape
    return x.view(B, P, PK // P, S, hd).transpose(0, 1).reshape(P * B, PK // P, S, hd)


class Qwen2ParScaleForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = Qwen2ParScaleConfig
    base_model_prefix = "model"
    _no_split_modules = ["Layer"]
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: Qwen2ParScaleConfig):
        super().__init__(config)
        self.c = RefConfig(config.to_dict())
        self.model = Body(self.c)
        self.lm_head = nn.Linear(self.c.hidden_size, self.c.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        """transformers' defaults (normal linears and embedding, zero biases, unit norms) and the
        prefixes normal with the initializer range (the authors' module left them uninitialised)."""
        super()._init_weights(module)
        if isinstance(module, Attention) and hasattr(module, "prefix_k"):
            for p in (module.prefix_k, module.prefix_v):
                nn.init.normal_(p, mean=0.0, std=self.config.initializer_range)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _extend(self, past_key_values: DynamicCache, i: int, k, v):
        """torch_ref's per-layer cache hook: store the new entries, return prefix + all of them."""
        P = self.c.parscale_n
        keys, values = past_key_values.update(_batch_major(k, P), _batch_major(v, P), i)
        keys, values = _stream_major(keys, P), _stream_major(values, P)
        if P == 1:
            return keys, values
        pk, pv = self.model.layers[i].self_attn.prefix_cache(keys.shape[0] // P)
        return torch.cat([pk.to(keys.dtype), keys], dim=2), torch.cat([pv.to(values.dtype), values], dim=2)

    def _cache(self, past_key_values, attention_mask, B: int, S: int):
        """(torch_ref cache over ``past_key_values``, the mask of the S new tokens)."""
        if not isinstance(past_key_values, DynamicCache):
            raise ValueError(f"{type(past_key_values).__name__} is not supported: qwen2_parscale runs with a "
                             f"DynamicCache (generate's default; leave cache_implementation unset)")
        n = past_key_values.get_seq_length()
        if attention_mask is None:
            attention_mask = torch.ones(B, n + S, dtype=torch.long, device=self.lm_head.weight.device)
        if attention_mask.dim() != 2 or attention_mask.shape != (B, n + S):
            raise ValueError(f"attention_mask must be [batch, cached + new tokens] = [{B}, {n + S}], "
                             f"got {list(attention_mask.shape)}")
        valid = attention_mask[:, :n].bool()
        kv = [functools.partial(self._extend, past_key_values, i) for i in range(self.c.num_hidden_layers)]
        return {"kv": kv, "valid": valid, "seen": valid.long().sum(1)}, attention_mask[:, n:]

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, labels=None,
                inputs_embeds=None, return_dict=None, **kwargs):
        """Logits ``[B, S, V]`` of ``input_ids`` (``attention_mask`` over cached + new tokens)."""
        if input_ids is None or inputs_embeds is not None:
            raise ValueError("qwen2_parscale takes input_ids (inputs_embeds is not supported)")
        if kwargs.get("position_ids") is not None:
            raise ValueError("position_ids are not supported: positions count the real tokens of attention_mask")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("output_attentions / output_hidden_states are not supported by qwen2_parscale")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        B, S = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cache = None
        if past_key_values is not None:
            cache, attention_mask = self._cache(past_key_values, attention_mask, B, S)
        logits = causal_lm(self, input_ids, attention_mask, cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1).to(logits.device), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None)
        return out if return_dict is not False else out.to_tuple()
