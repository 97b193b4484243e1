"""An independent PyTorch implementation of the ``qwen2_parscale`` forward (and plain Qwen2).

Written from the format/maths spec (parscale-spec.md, sections 1-3), not from the JAX model
(it imports nothing of it), so the tests can use it as a second opinion; it also lets users
run an exported ParScale checkpoint in PyTorch without ``trust_remote_code``::

    import torch
    from parscale_jax.torch_ref import TorchParScale
    model = TorchParScale.from_pretrained("export_dir")      # config.json + *.safetensors (sharded or not)
    logits = model(torch.tensor([[1, 2, 3]]))                 # [B, S, V]
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)   # greedy, KV-cached

or from the command line (greedy continuation of token ids or of a text)::

    python -m parscale_jax.torch_ref export_dir --ids 1 2 3 --max-new-tokens 8
    python -m parscale_jax.torch_ref export_dir --prompt "def f(" --max-new-tokens 32

Layout follows the authors: the P streams are folded into the batch stream-major (row
``p * B + b``), each attention layer owns ``prefix_k``/``prefix_v`` ``[P, nKV, T, hd]`` that are
put (unrotated) before the rotated keys of the real tokens, and the gate reads the P normed
states concatenated in ``(h, p)`` order (feature ``h * P + p``). Batches may be left-padded
(``attention_mask``): positions count real tokens only and padding is never attended to.
The KV cache holds per layer a ``(k, v)`` pair ``[P*B, nKV, T + n, hd]`` whose first T
entries are the prefix. Needs only torch and safetensors (no pickles are read); the module
itself imports without torch (torch is a dev dependency).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import tokenizers

try:  # torch is a dev dependency: without it this module still imports (RefConfig, the command line's
    import torch  # parsing and errors); building the model then says what to install
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    torch = F = None

    class _NeedsTorch:
        def __init__(self, *args, **kwargs):
            raise ImportError("parscale_jax.torch_ref needs PyTorch: pip install -e '.[dev]' (torch==2.13.0)")

    class nn:  # noqa: N801  (a stand-in namespace, so that the classes below can be defined)
        Module = _NeedsTorch


class RefConfig:
    """The config.json fields the forward needs (Qwen2 names); unsupported features raise ValueError."""

    def __init__(self, d: dict[str, Any]):
        mt = d.get("model_type", "qwen2")
        if mt not in ("qwen2", "qwen2_parscale"):
            raise ValueError(f"model_type {mt!r} is not supported (only qwen2 / qwen2_parscale)")
        if d.get("use_sliding_window"):
            raise ValueError("use_sliding_window=true is not supported (full attention only)")
        rs = d.get("rope_scaling")
        rp = d.get("rope_parameters") or {}
        if (rs not in (None, {}) and (not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "default")) \
                or rp.get("rope_type", "default") != "default":
            raise ValueError(f"rope scaling ({rs or rp}) is not supported (plain RoPE only)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d.get('hidden_act')!r} is not supported (silu only)")
        self.vocab_size = int(d["vocab_size"])
        self.hidden_size = int(d["hidden_size"])
        self.intermediate_size = int(d["intermediate_size"])
        self.num_hidden_layers = int(d["num_hidden_layers"])
        self.num_attention_heads = int(d["num_attention_heads"])
        self.num_key_value_heads = int(d.get("num_key_value_heads") or d["num_attention_heads"])
        self.head_dim = int(d.get("head_dim") or self.hidden_size // self.num_attention_heads)
        self.rope_theta = float(d.get("rope_theta", rp.get("rope_theta", 10000.0)))
        self.rms_norm_eps = float(d.get("rms_norm_eps", 1e-6))
        self.tie_word_embeddings = bool(d.get("tie_word_embeddings", False))
        self.parscale_n = int(d.get("parscale_n", 1)) if mt == "qwen2_parscale" else 1
        self.parscale_n_tokens = int(d.get("parscale_n_tokens", 48))
        # The authors' config class default is 0.01; exports of this project always write it.
        self.parscale_attn_smooth = float(d.get("parscale_attn_smooth", 0.01))


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions, dim: int, theta: float):
    """cos/sin [..., dim] for integer positions [...] ("rotate half": the two halves are paired)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.c = c
        H, nH, nKV, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(H, nH * hd, bias=True)
        self.k_proj = nn.Linear(H, nKV * hd, bias=True)
        self.v_proj = nn.Linear(H, nKV * hd, bias=True)
        self.o_proj = nn.Linear(nH * hd, H, bias=False)
        if c.parscale_n > 1:
            shape = (c.parscale_n, nKV, c.parscale_n_tokens, hd)
            self.prefix_k = nn.Parameter(torch.zeros(shape))
            self.prefix_v = nn.Parameter(torch.zeros(shape))

    def prefix_cache(self, batch: int):
        """The layer's initial cache: prefix k/v repeated over the batch, stream-major rows p*B+b."""
        return (self.prefix_k.repeat_interleave(batch, dim=0), self.prefix_v.repeat_interleave(batch, dim=0))

    def forward(self, x, cos, sin, allowed, past):
        """x [N, S, H] (N = P*B); cos/sin [N, 1, S, hd]; allowed [N, 1, S, Tk] bool; past (k, v) or None,
        or a function (k, v) of the new entries -> (k, v) of every entry (prefix, earlier tokens, new)."""
        c = self.c
        N, S, _ = x.shape
        nH, nKV, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q = self.q_proj(x).view(N, S, nH, hd).transpose(1, 2)
        k = self.k_proj(x).view(N, S, nKV, hd).transpose(1, 2)
        v = self.v_proj(x).view(N, S, nKV, hd).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if callable(past):  # a cache that stores the new entries itself (the transformers export's)
            k, v = past(k, v)
        elif past is not None:  # prefix entries (not rotated) and earlier tokens come first
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        rep = nH // nKV
        kk = k.repeat_interleave(rep, dim=1)
        vv = v.repeat_interleave(rep, dim=1)
        scores = (q.float() @ kk.float().transpose(-1, -2)) * hd ** -0.5  # [N, nH, S, Tk]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = (probs @ vv).transpose(1, 2).reshape(N, S, nH * hd)
        return self.o_proj(out), (k, v)


class MLP(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, c: RefConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, allowed, past):
        a, present = self.self_attn(self.input_layernorm(x), cos, sin, allowed, past)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class Body(nn.Module):
    """``model.*`` in the checkpoint: embedding, layers, final norm, aggregate_layer."""

    def __init__(self, c: RefConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([Layer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if c.parscale_n > 1:
            P, H = c.parscale_n, c.hidden_size
            self.aggregate_layer = nn.Sequential(nn.Linear(P * H, H), nn.SiLU(), nn.Linear(H, P))


class TorchParScale(nn.Module):
    """Qwen2 / qwen2_parscale causal LM.

    ``forward(input_ids, attention_mask=None, cache=None, return_cache=False)`` returns the
    logits ``[B, S, V]`` (and the new cache with ``return_cache``). The cache is a dict
    ``{"kv": [(k, v)] per layer, "valid": [B, n] bool (real-token slots), "seen": [B]}``.
    """

    def __init__(self, config: dict[str, Any] | RefConfig):
        super().__init__()
        c = config if isinstance(config, RefConfig) else RefConfig(config)
        self.c = c
        self.model = Body(c)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_cache(self, batch: int) -> dict:
        """An empty cache; for P > 1 each layer starts with the T prefix entries of each stream."""
        return init_cache(self, batch)

    def forward(self, input_ids, attention_mask=None, cache=None, return_cache: bool = False):
        return causal_lm(self, input_ids, attention_mask, cache, return_cache)

    def generate(self, input_ids, max_new_tokens: int, attention_mask=None, eos_token_id: int | None = None):
        """Greedy decoding with the KV cache: prefill once, then one token per step.

        Prompts of different lengths go left-padded with an ``attention_mask``. Returns
        ``[B, S + max_new_tokens]``; a row that produced ``eos_token_id`` repeats it from then on.
        """
        with torch.no_grad():
            return self._greedy(input_ids, max_new_tokens, attention_mask, eos_token_id)

    def _greedy(self, input_ids, max_new_tokens, attention_mask, eos_token_id):
        logits, cache = self.forward(input_ids, attention_mask, return_cache=True)
        out = [input_ids]
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            out.append(nxt[:, None])
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            logits, cache = self.forward(nxt[:, None], cache=cache, return_cache=True)
        res = torch.cat(out, dim=1)
        if res.shape[1] < input_ids.shape[1] + max_new_tokens:  # every row ended early
            fill = torch.full((res.shape[0], input_ids.shape[1] + max_new_tokens - res.shape[1]), eos_token_id,
                              dtype=res.dtype, device=res.device)
            res = torch.cat([res, fill], dim=1)
        return res

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> "TorchParScale":
        """Load a directory with config.json and model.safetensors (or a sharded index); float32 by default."""
        from safetensors.torch import load_file  # needs torch, like everything from here on

        with open(os.path.join(path, "config.json")) as f:
            model = cls(json.load(f))
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        state = {}
        for fn in files:
            state.update(load_file(os.path.join(path, fn)))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if model.c.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        want = set(model.state_dict())
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        if missing or extra:
            raise ValueError(f"{path}: weights do not match config.json: missing {missing[:5]}, unexpected {extra[:5]}")
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        return model.to(dtype or torch.float32).eval()


# The forward as functions of ``net``: a TorchParScale, or any module with its ``c`` (RefConfig), ``model``
# (Body) and ``lm_head``, such as the transformers class that exports carry (modeling_qwen2_parscale).
def init_cache(net, batch: int) -> dict:
    """An empty cache; for P > 1 each layer starts with the T prefix entries of each stream."""
    dev = net.model.embed_tokens.weight.device
    kv = ([None] * net.c.num_hidden_layers if net.c.parscale_n == 1
          else [layer.self_attn.prefix_cache(batch) for layer in net.model.layers])
    return {"kv": kv, "valid": torch.zeros(batch, 0, dtype=torch.bool, device=dev),
            "seen": torch.zeros(batch, dtype=torch.long, device=dev)}


def causal_lm(net, input_ids, attention_mask=None, cache=None, return_cache: bool = False):
    """Logits ``[B, S, V]`` of ``net`` (and the new cache with ``return_cache``); see TorchParScale."""
    c = net.c
    P = c.parscale_n
    T = c.parscale_n_tokens if P > 1 else 0
    B, S = input_ids.shape
    dev = input_ids.device
    mask = (torch.ones(B, S, dtype=torch.bool, device=dev) if attention_mask is None
            else attention_mask.to(device=dev, dtype=torch.bool))
    if cache is None:
        cache = init_cache(net, B)
    n = cache["valid"].shape[1]  # token slots already in the cache
    # Real tokens keep positions 0, 1, ... counting real tokens only; the prefix does not shift them.
    positions = cache["seen"][:, None] + (mask.long().cumsum(1) - 1).clamp(min=0)  # [B, S]
    valid = torch.cat([cache["valid"], mask], dim=1)  # [B, n + S]
    q_slot = n + torch.arange(S, device=dev)
    k_slot = torch.arange(n + S, device=dev)
    tok = (k_slot[None, None, :] <= q_slot[None, :, None]) & valid[:, None, :]
    tok = tok | (k_slot[None, None, :] == q_slot[None, :, None])  # a padded query sees itself
    allowed = torch.cat([torch.ones(B, S, T, dtype=torch.bool, device=dev), tok], dim=-1)  # prefix: all
    allowed = allowed[:, None].repeat(P, 1, 1, 1)  # rows p*B+b
    x = net.model.embed_tokens(input_ids).repeat(P, 1, 1)  # [P*B, S, H], stream-major
    cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)  # [B, S, hd]
    cos = cos[:, None].repeat(P, 1, 1, 1).to(x.dtype)
    sin = sin[:, None].repeat(P, 1, 1, 1).to(x.dtype)
    kv = []
    for layer, past in zip(net.model.layers, cache["kv"]):
        x, present = layer(x, cos, sin, allowed, past)
        kv.append(present)
    x = net.model.norm(x)  # the final norm, on each stream
    if P > 1:
        H = c.hidden_size
        xs = x.view(P, B, S, H)
        cat = xs.permute(1, 2, 3, 0).reshape(B, S, H * P)  # feature h*P + p
        w = torch.softmax(net.model.aggregate_layer(cat).float(), dim=-1)  # [B, S, P]
        eps = c.parscale_attn_smooth
        w = w * (1 - eps) + eps / P
        x = (xs.float() * w.permute(2, 0, 1)[..., None]).sum(0).to(x.dtype)
    logits = net.lm_head(x)
    if not return_cache:
        return logits
    return logits, {"kv": kv, "valid": valid, "seen": cache["seen"] + mask.long().sum(1)}


# ---- command line --------------------------------------------------------------------------
def _tokenizer(path: str):
    """(encode, decode) from a tokenizer.json in ``path`` (``tokenizers`` package), else bytes."""
    tj = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tj):
        tok = tokenizers.Tokenizer.from_file(tj)
        return (lambda s: tok.encode(s).ids), (lambda ids: tok.decode(ids))
    # This project's byte tokenizer: id = byte value; ids >= 256 are special (PAD, BOS, EOS).
    return (lambda s: list(s.encode("utf-8"))), (lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", "replace"))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.torch_ref",
                                 description="Greedy continuation with the PyTorch reference of qwen2 / qwen2_parscale.")
    ap.add_argument("model", help="a Hugging Face directory written by `convert to-hf` (config.json + safetensors)")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--ids", type=int, nargs="+", help="prompt token ids")
    g.add_argument("--prompt", help="prompt text (tokenizer.json in the model directory, else bytes)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--eos", type=int, default=None, help="stop at this id (default: generation_config.json's)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise ValueError(f"{args.model} is not a model directory (no config.json)")
        model = TorchParScale.from_pretrained(args.model, getattr(torch, args.dtype))
        try:
            encode, decode = _tokenizer(args.model)
        except Exception as e:  # tokenizers raises plain Exceptions
            if args.prompt is not None:
                raise ValueError(f"{args.model}/tokenizer.json cannot be read ({e}): pass --ids instead") from None
            encode, decode = None, lambda ids: None
        ids = args.ids if args.ids is not None else encode(args.prompt)
        if not ids or min(ids) < 0 or max(ids) >= model.c.vocab_size:
            raise ValueError(f"prompt ids must be non-empty and lie in [0, {model.c.vocab_size})")
        eos = args.eos
        gp = os.path.join(args.model, "generation_config.json")
        if eos is None and os.path.isfile(gp):
            with open(gp) as f:
                e = json.load(f).get("eos_token_id")
            eos = e[0] if isinstance(e, list) and e else e if isinstance(e, int) else None
    except Exception as e:  # noqa: BLE001  (bad directory, weights or flags: one line, exit code 2)
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    out = model.generate(torch.tensor([ids]), args.max_new_tokens, eos_token_id=eos)[0, len(ids):].tolist()
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    print(json.dumps({"ids": out, "text": decode(out)}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
