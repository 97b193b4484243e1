"""Checkpoint conversion between this project and Hugging Face (``qwen2`` / ``qwen2_parscale``).

Command line::

    python -m parscale_jax.convert to-hf   --checkpoint CKPT --out DIR [--dtype float32|bfloat16]
                                           [--P n] [--max-shard-size 2GB]
    python -m parscale_jax.convert from-hf --hf DIR --out CKPT [--P n] [--seed 0]

``to-hf`` writes one directory; for a multi-P checkpoint (``{"backbone", "sets"}``, see
recycle.py) without ``--P`` it writes one complete Hugging Face directory per P under
``DIR/P1``, ``DIR/P2``, ... ``from-hf --P n`` on a P = 1 (qwen2) source adds freshly
initialised prefixes and gate (recycle.stage2_init): the entry point of the two-stage recipe.
Tokenizer files (tokenizer.json, tokenizer_config.json, ...) travel along both ways.

Library: :func:`load_hf` (HF directory -> (ModelConfig, params)), :func:`save_hf`
((ModelConfig, params) -> HF directory), :func:`params_to_hf` / :func:`hf_to_params` (the
name and layout map alone).

Format (spec section 3): PyTorch ``Linear.weight`` is ``[out, in]``, our kernels are
``[in, ...out]`` and stacked over layers, so every matrix is a reshape plus a transpose.
The gate's first kernel already reads its input in the authors' ``(h, p)`` order
(feature ``h * P + p``), so ``model.aggregate_layer.0.weight`` is its plain transpose.
P = 1 is written as plain ``qwen2`` that stock ``transformers`` loads. Weights are read and
written as safetensors by a small codec here (no pickles are ever read; ``.bin`` is refused),
which also handles bfloat16 without torch.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterable

import numpy as np

from parscale_jax.config import ModelConfig
from parscale_jax.errors import UserError, cli_entry

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Files of a Hugging Face tokenizer that travel with a checkpoint in either direction.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
AUTHORS_SMOOTH_DEFAULT = 0.01  # the authors' Qwen2ParScaleConfig default (spec section 2)


def _names_list(names: Iterable[str], few: int = 5) -> str:
    names = sorted(names)
    head = ", ".join(names[:few])
    return f"{len(names)}: {head}" + (f" and {len(names) - few} more" if len(names) > few else "")


# ---- safetensors codec ---------------------------------------------------------------------
def _bf16():
    import ml_dtypes  # shipped with jax

    return np.dtype(ml_dtypes.bfloat16)


_ST_TO_NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _st_dtype(code: str, where: str) -> np.dtype:
    if code == "BF16":
        return _bf16()
    if code not in _ST_TO_NP:
        raise UserError(f"{where}: unsupported safetensors dtype {code}: convert the weights to float32/bfloat16/float16")
    return np.dtype(_ST_TO_NP[code])


def _np_to_st(dt: np.dtype) -> str:
    if dt == _bf16():
        return "BF16"
    for code, t in _ST_TO_NP.items():
        if np.dtype(t) == dt:
            return code
    raise ValueError(f"no safetensors dtype for {dt}")


def read_safetensors_header(path: str) -> dict[str, Any]:
    """The JSON header of a safetensors file (``__metadata__`` removed), checked for sanity."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 1 or 8 + n > size or n > 100 * 2**20:
            raise UserError(f"{path} is not a safetensors file (bad header): re-export the weights as safetensors")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise UserError(f"{path} is not a safetensors file (header is not JSON): re-export it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (header is not a JSON object): re-export it")
    header.pop("__metadata__", None)
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            start, end = (int(x) for x in info["data_offsets"])
            info["dtype"], [int(x) for x in info["shape"]]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has a malformed header entry: the file is corrupt") from None
        if not 0 <= start <= end <= data_len:
            raise UserError(f"{path}: tensor {name} lies outside the file (truncated download?): fetch the file again")
    header["__data_start__"] = 8 + n
    return header


def read_safetensors(path: str, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Tensors of one safetensors file as numpy arrays (a subset with ``names``)."""
    header = read_safetensors_header(path)
    base = header.pop("__data_start__")
    wanted = header.keys() if names is None else [n for n in names if n in header]
    out = {}
    with open(path, "rb") as f:
        for name in wanted:
            info = header[name]
            dt = _st_dtype(info["dtype"], f"{path}: {name}")
            start, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            if end - start != math.prod(shape) * dt.itemsize:
                raise UserError(f"{path}: tensor {name} has {end - start} bytes, not {shape} x {dt}: the file is corrupt")
            f.seek(base + start)
            out[name] = np.frombuffer(f.read(end - start), dtype=dt).reshape(shape)
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name in sorted(tensors):
        a = tensors[name]
        header[name] = {"dtype": _np_to_st(a.dtype), "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())


def parse_size(s: str | int) -> int:
    """'2GB', '500MB', '64KB', '100' (bytes) -> bytes (decimal units as transformers; GiB/MiB binary)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(s), re.IGNORECASE)
    if not m:
        raise UserError(f"--max-shard-size {s!r} is not a size: write e.g. 2GB, 500MB or a number of bytes")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
            "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}.get(unit)
    if mult is None:
        raise UserError(f"--max-shard-size {s!r}: unknown unit {m.group(2)}: use B, KB, MB, GB or KiB, MiB, GiB")
    n = int(float(m.group(1)) * mult)
    if n < 1:
        raise UserError(f"--max-shard-size {s!r} must be positive")
    return n


# ---- config ----------------------------------------------------------------------------------
def hf_config_dict(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
    """config.json for ``cfg``: qwen2_parscale for P > 1, plain qwen2 for P = 1."""
    parscale = cfg.parscale_n > 1
    d: dict[str, Any] = {
        "architectures": ["Qwen2ParScaleForCausalLM" if parscale else "Qwen2ForCausalLM"],
        "model_type": "qwen2_parscale" if parscale else "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Classic key (transformers 4.x, the authors' code) and the 5.x form.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": cfg.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": cfg.initializer_range,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
        "parscale_n": cfg.parscale_n,
        "parscale_n_tokens": cfg.parscale_n_tokens,
        "parscale_attn_smooth": cfg.parscale_attn_smooth,
    }
    if cfg.head_dim is not None:
        d["head_dim"] = cfg.head_dim
    return d


def config_from_hf(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """ModelConfig from a qwen2 / qwen2_parscale config.json; unsupported features are errors."""
    mt = d.get("model_type")
    if mt not in ("qwen2", "qwen2_parscale"):
        raise UserError(f"{where}: model_type {mt!r} is not supported: only 'qwen2' and 'qwen2_parscale' convert")
    bad = []
    if d.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={d.get('hidden_act')!r} (only 'silu')")
    if d.get("use_sliding_window"):
        bad.append("use_sliding_window=true (only full attention)")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        bad.append(f"layer_types has {sorted(set(layer_types) - {'full_attention'})} (only full_attention)")
    rs = d.get("rope_scaling")
    if rs not in (None, {}) and (not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "default"):
        bad.append(f"rope_scaling={rs} (only plain RoPE)")
    rp = d.get("rope_parameters") or {}
    if not isinstance(rp, dict) or rp.get("rope_type", "default") != "default" or set(rp) - {"rope_type", "rope_theta"}:
        bad.append(f"rope_parameters={rp} (only plain RoPE)")
        rp = {}
    if "rope_theta" in d and "rope_theta" in rp and float(d["rope_theta"]) != float(rp["rope_theta"]):
        bad.append(f"rope_theta={d['rope_theta']} disagrees with rope_parameters.rope_theta={rp['rope_theta']}")
    if d.get("attention_bias") is False:
        bad.append("attention_bias=false (Qwen2 attention has q/k/v biases)")
    if bad:
        raise UserError(f"{where}: unsupported config: " + "; ".join(bad) + ": only plain Qwen2/ParScale models convert")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in d]
    if missing:
        raise UserError(f"{where} lacks {missing}: it is not a complete Qwen2 config")
    theta = d.get("rope_theta", rp.get("rope_theta", 10000.0))
    P = int(d.get("parscale_n", 1)) if mt == "qwen2_parscale" else 1
    kw: dict[str, Any] = dict(
        vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
        num_attention_heads=int(d["num_attention_heads"]),
        num_key_value_heads=int(d.get("num_key_value_heads") or d["num_attention_heads"]),
        rope_theta=float(theta), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)), parscale_n=P)
    hd = d.get("head_dim")
    if hd is not None and int(hd) != kw["hidden_size"] // kw["num_attention_heads"]:
        kw["head_dim"] = int(hd)
    if "parscale_n_tokens" in d:
        kw["parscale_n_tokens"] = int(d["parscale_n_tokens"])
    if "parscale_attn_smooth" in d:
        kw["parscale_attn_smooth"] = float(d["parscale_attn_smooth"])
    elif mt == "qwen2_parscale":
        kw["parscale_attn_smooth"] = AUTHORS_SMOOTH_DEFAULT
    try:
        return ModelConfig(**kw)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


# ---- tensor names and layouts ------------------------------------------------------------------
def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the HF checkpoint of ``cfg`` and its shape."""
    V, H, I = cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size
    nH, nKV, hd, P, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd, cfg.parscale_n, cfg.parscale_n_tokens
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                  p + "self_attn.q_proj.weight": (nH * hd, H), p + "self_attn.q_proj.bias": (nH * hd,),
                  p + "self_attn.k_proj.weight": (nKV * hd, H), p + "self_attn.k_proj.bias": (nKV * hd,),
                  p + "self_attn.v_proj.weight": (nKV * hd, H), p + "self_attn.v_proj.bias": (nKV * hd,),
                  p + "self_attn.o_proj.weight": (H, nH * hd),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                  p + "mlp.down_proj.weight": (H, I)})
        if P > 1:
            s[p + "self_attn.prefix_k"] = (P, nKV, T, hd)
            s[p + "self_attn.prefix_v"] = (P, nKV, T, hd)
    if P > 1:
        s.update({"model.aggregate_layer.0.weight": (H, P * H), "model.aggregate_layer.0.bias": (H,),
                  "model.aggregate_layer.2.weight": (P, H), "model.aggregate_layer.2.bias": (P,)})
    return s


def params_to_hf(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our single-P params -> {HF name: float32 array} (transposes, layer split, (h,p) gate)."""
    H, nH, nKV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd
    c = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    bb = params["backbone"]
    lay = bb["decoder"]["layers"]
    at, mlp = lay["attn"], lay["mlp"]
    out = {"model.embed_tokens.weight": c(bb["embed"]["embedding"]), "model.norm.weight": c(bb["final_norm"]["scale"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = c(np.asarray(bb["lm_head"]["kernel"]).T)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = c(lay["input_norm"]["scale"][i])
        out[p + "post_attention_layernorm.weight"] = c(lay["post_attn_norm"]["scale"][i])
        out[p + "self_attn.q_proj.weight"] = c(np.asarray(at["q"]["kernel"][i]).reshape(H, nH * hd).T)
        out[p + "self_attn.q_proj.bias"] = c(np.asarray(at["q"]["bias"][i]).reshape(nH * hd))
        for n in ("k", "v"):
            out[p + f"self_attn.{n}_proj.weight"] = c(np.asarray(at[n]["kernel"][i]).reshape(H, nKV * hd).T)
            out[p + f"self_attn.{n}_proj.bias"] = c(np.asarray(at[n]["bias"][i]).reshape(nKV * hd))
        out[p + "self_attn.o_proj.weight"] = c(np.asarray(at["o"]["kernel"][i]).reshape(nH * hd, H).T)
        for n in ("gate", "up", "down"):
            out[p + f"mlp.{n}_proj.weight"] = c(np.asarray(mlp[n]["kernel"][i]).T)
        if cfg.parscale_n > 1:
            out[p + "self_attn.prefix_k"] = c(params["prefix"]["k"][i])
            out[p + "self_attn.prefix_v"] = c(params["prefix"]["v"][i])
    if cfg.parscale_n > 1:
        ag = params["aggregator"]
        out["model.aggregate_layer.0.weight"] = c(np.asarray(ag["gate_in"]["kernel"]).T)  # [H, H*P], (h,p) order
        out["model.aggregate_layer.0.bias"] = c(ag["gate_in"]["bias"])
        out["model.aggregate_layer.2.weight"] = c(np.asarray(ag["gate_out"]["kernel"]).T)
        out["model.aggregate_layer.2.bias"] = c(ag["gate_out"]["bias"])
    return out


def hf_to_params(cfg: ModelConfig, t: dict[str, np.ndarray]) -> dict:
    """{HF name: array} (names and shapes already checked) -> our float32 params."""
    H, nH, nKV, hd, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd, cfg.num_hidden_layers
    f = lambda a: np.asarray(a, dtype=np.float32)  # noqa: E731

    def stack(fmt: str, fn=lambda a: a) -> np.ndarray:
        return np.ascontiguousarray(np.stack([fn(f(t[fmt.format(i)])) for i in range(L)]))

    pre = "model.layers.{}."
    lay = {
        "input_norm": {"scale": stack(pre + "input_layernorm.weight")},
        "post_attn_norm": {"scale": stack(pre + "post_attention_layernorm.weight")},
        "attn": {
            "q": {"kernel": stack(pre + "self_attn.q_proj.weight", lambda a: a.T.reshape(H, nH, hd)),
                  "bias": stack(pre + "self_attn.q_proj.bias", lambda a: a.reshape(nH, hd))},
            **{n: {"kernel": stack(pre + f"self_attn.{n}_proj.weight", lambda a: a.T.reshape(H, nKV, hd)),
                   "bias": stack(pre + f"self_attn.{n}_proj.bias", lambda a: a.reshape(nKV, hd))} for n in ("k", "v")},
            "o": {"kernel": stack(pre + "self_attn.o_proj.weight", lambda a: a.T.reshape(nH, hd, H))},
        },
        "mlp": {n: {"kernel": stack(pre + f"mlp.{n}_proj.weight", lambda a: a.T)} for n in ("gate", "up", "down")},
    }
    bb: dict[str, Any] = {"embed": {"embedding": np.ascontiguousarray(f(t["model.embed_tokens.weight"]))},
                          "decoder": {"layers": lay},
                          "final_norm": {"scale": np.ascontiguousarray(f(t["model.norm.weight"]))}}
    if not cfg.tie_word_embeddings:
        bb["lm_head"] = {"kernel": np.ascontiguousarray(f(t["lm_head.weight"]).T)}
    params: dict[str, Any] = {"backbone": bb}
    if cfg.parscale_n > 1:
        params["prefix"] = {"k": stack(pre + "self_attn.prefix_k"), "v": stack(pre + "self_attn.prefix_v")}
        c = lambda a: np.ascontiguousarray(f(a))  # noqa: E731
        params["aggregator"] = {
            "gate_in": {"kernel": c(f(t["model.aggregate_layer.0.weight"]).T), "bias": c(t["model.aggregate_layer.0.bias"])},
            "gate_out": {"kernel": c(f(t["model.aggregate_layer.2.weight"]).T), "bias": c(t["model.aggregate_layer.2.bias"])},
        }
    return params


# ---- Hugging Face directory: read ------------------------------------------------------------
def _weight_files(hf_dir: str) -> dict[str, str]:
    """{tensor name: file} from the index, or from a single model.safetensors."""
    idx = os.path.join(hf_dir, SAFE_INDEX)
    if os.path.isfile(idx):
        with open(idx) as f:
            try:
                wm = json.load(f)["weight_map"]
                if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{idx} is not a safetensors index (no weight_map): re-export the model") from None
        absent = sorted({fn for fn in wm.values() if not os.path.isfile(os.path.join(hf_dir, fn))})
        if absent:
            raise UserError(f"{hf_dir}: shard file(s) named in {SAFE_INDEX} are missing: {absent}: "
                            f"copy the whole model directory")
        return dict(wm)
    single = os.path.join(hf_dir, SAFE_SINGLE)
    files = [single] if os.path.isfile(single) else sorted(
        os.path.join(hf_dir, fn) for fn in os.listdir(hf_dir) if fn.endswith(".safetensors"))
    if not files:
        bins = sorted(fn for fn in os.listdir(hf_dir) if fn.endswith((".bin", ".pt", ".pth", ".ckpt")))
        if bins:
            raise UserError(f"{hf_dir} holds only PyTorch pickle weights ({', '.join(bins[:3])}), which are never "
                            f"unpickled here: re-save the model as safetensors "
                            f"(model.save_pretrained(dir, safe_serialization=True))")
        raise UserError(f"{hf_dir} has no *.safetensors weights: pass a Hugging Face model directory")
    names = {}
    for fp in files:
        hdr = read_safetensors_header(fp)
        hdr.pop("__data_start__")
        for n in hdr:
            if n in names:
                raise UserError(f"{hf_dir}: tensor {n} is in both {names[n]} and {os.path.basename(fp)} and there "
                                f"is no {SAFE_INDEX}: keep only one copy of the weights in the directory")
            names[n] = os.path.basename(fp)
    return names


def read_hf_config(hf_dir: str) -> dict[str, Any]:
    if not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir} is not a directory: pass a Hugging Face model directory")
    cf = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cf) and os.path.isfile(os.path.join(hf_dir, "model_config.json")):
        raise UserError(f"{hf_dir} is a checkpoint of this project, not a Hugging Face model directory: "
                        f"from-hf reads Hugging Face directories (to export this one use to-hf --checkpoint)")
    if not os.path.isfile(cf):
        raise UserError(f"{hf_dir} is not a model directory (no config.json): pass a Hugging Face model directory")
    try:
        with open(cf) as f:
            d = json.load(f)
    except ValueError as e:
        raise UserError(f"{cf} is not valid JSON ({e}): fix or re-export the config") from None
    if not isinstance(d, dict):
        raise UserError(f"{cf} is not a model config (not a JSON object): pass a Hugging Face model directory")
    return d


def check_tensors(cfg: ModelConfig, found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise one UserError listing missing/extra tensors and shape mismatches."""
    want = hf_shapes(cfg)
    missing = set(want) - set(found)
    extra = set(found) - set(want)
    if cfg.tie_word_embeddings:
        extra.discard("lm_head.weight")  # tied checkpoints sometimes store the (equal) head too
    extra = {n for n in extra if not n.endswith("rotary_emb.inv_freq")}  # a buffer some exports carry
    problems = []
    if missing:
        problems.append(f"missing tensors ({_names_list(missing)})")
    if extra:
        problems.append(f"unexpected tensors ({_names_list(extra)})")
    bad = [f"{n} expected {list(want[n])} got {list(found[n])}"
           for n in sorted(set(want) & set(found)) if tuple(found[n]) != want[n]]
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:5]) +
                        (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    if problems:
        raise UserError(f"{where} does not match its config.json (P={cfg.parscale_n}, "
                        f"tied={cfg.tie_word_embeddings}): " + "; ".join(problems) +
                        ": use the config that was saved with these weights")


def load_hf(hf_dir: str) -> tuple[ModelConfig, dict]:
    """Read a qwen2 / qwen2_parscale directory (safetensors only) -> (ModelConfig, float32 params)."""
    hf_dir = os.path.abspath(hf_dir)
    cfg = config_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    files = _weight_files(hf_dir)
    shapes = {}
    by_file: dict[str, list[str]] = {}
    for name, fn in files.items():
        by_file.setdefault(fn, []).append(name)
    headers = {}
    for fn in by_file:
        headers[fn] = read_safetensors_header(os.path.join(hf_dir, fn))
    for name, fn in files.items():
        if name not in headers[fn]:
            raise UserError(f"{hf_dir}: {SAFE_INDEX} says {name} is in {fn} but it is not: re-export the model")
        shapes[name] = tuple(headers[fn][name]["shape"])
    check_tensors(cfg, shapes, hf_dir)
    want = hf_shapes(cfg)
    tensors: dict[str, np.ndarray] = {}
    for fn, names in by_file.items():
        tensors.update(read_safetensors(os.path.join(hf_dir, fn), [n for n in names if n in want or n == "lm_head.weight"]))
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"]):
            raise UserError(f"{hf_dir}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                            f"model.embed_tokens.weight: set tie_word_embeddings=false in config.json")
    params = hf_to_params(cfg, tensors)
    from parscale_jax.checkpoint import check_finite  # orbax import: only once the files are sound

    check_finite(params)
    return cfg, params


# ---- Hugging Face directory: write -------------------------------------------------------------
def _shard(tensors: dict[str, np.ndarray], limit: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nb = tensors[name].nbytes
        if shards[-1] and size + nb > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nb
    return shards


def _atomic_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise UserError(f"{out_dir} already exists: choose a new output directory or remove it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir) + "-", dir=parent)


def save_hf(out_dir: str, cfg: ModelConfig, params: dict, dtype: str = "float32",
            max_shard_size: str | int = "2GB", tokenizer_dir: str | None = None,
            generation_config: dict | None = None) -> str:
    """Write ``params`` (single-P, matching ``cfg``) as a Hugging Face directory, atomically.

    ``dtype``: float32 or bfloat16 for the weights. Above ``max_shard_size`` the weights are
    sharded with a ``model.safetensors.index.json``. Tokenizer files found in
    ``tokenizer_dir`` are copied along.
    """
    from parscale_jax.checkpoint import check_finite

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r} is not supported: choose float32 or bfloat16")
    check_finite(params)
    tensors = params_to_hf(cfg, params)
    want = hf_shapes(cfg)
    check_tensors(cfg, {n: a.shape for n, a in tensors.items()}, "params")
    assert set(tensors) == set(want)
    if dtype == "bfloat16":
        tensors = {n: a.astype(_bf16()) for n, a in tensors.items()}
    limit = parse_size(max_shard_size)
    tmp = _atomic_dir(out_dir)
    try:
        shards = _shard(tensors, limit)
        if len(shards) == 1:
            write_safetensors(os.path.join(tmp, SAFE_SINGLE), shards[0])
        else:
            n = len(shards)
            weight_map = {}
            for k, sh in enumerate(shards, 1):
                fn = f"model-{k:05d}-of-{n:05d}.safetensors"
                write_safetensors(os.path.join(tmp, fn), sh)
                print(f"wrote shard {k}/{n} ({sum(a.nbytes for a in sh.values()) / 1e6:.1f} MB)", file=sys.stderr)
                weight_map.update({name: fn for name in sh})
            total = sum(a.nbytes for a in tensors.values())
            with open(os.path.join(tmp, SAFE_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config_dict(cfg, dtype), f, indent=2)
        gen = {"_from_model_config": True, "use_cache": True, **(generation_config or {})}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, tmp)
        os.replace(tmp, os.path.abspath(out_dir))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(out_dir)


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for fn in TOKENIZER_FILES:
        sp = os.path.join(src_dir, fn)
        if os.path.isfile(sp):
            shutil.copy2(sp, os.path.join(dst_dir, fn))
            copied.append(fn)
    return copied


# ---- project checkpoints ----------------------------------------------------------------------
def params_for_P(cfg: ModelConfig, params: dict, P: int | None = None) -> tuple[ModelConfig, dict]:
    """The single-P (config, params) for ``P`` (default: the config's P) of a maybe multi-P tree."""
    from parscale_jax import recycle

    if P is None:
        P = cfg.parscale_n if cfg.parscale_n in recycle.available_P(params) else None
        if P is None:
            raise UserError(f"this checkpoint holds P = {recycle.available_P(params)}: pick one with --P")
    single = recycle.select_P(params, P)
    return cfg.replace(parscale_n=int(P)), single


def _checkpoint_meta(ckpt: str) -> dict[str, Any]:
    from parscale_jax.checkpoint import MODEL_CONFIG

    try:
        with open(os.path.join(ckpt, MODEL_CONFIG)) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    # a training workdir: its resolved config names the tokenizer (data.tokenizer)
    try:
        import yaml

        with open(os.path.join(ckpt, "config.yaml")) as f:
            tok = (yaml.safe_load(f) or {}).get("data", {}).get("tokenizer")
        return {"tokenizer": tok} if isinstance(tok, str) and tok != "bytes" else {}
    except (OSError, ValueError, AttributeError):
        return {}


def tokenizer_dir_of(ckpt: str) -> str | None:
    """Where the checkpoint's tokenizer lives: files next to it, or a path in its metadata."""
    if any(os.path.isfile(os.path.join(ckpt, fn)) for fn in TOKENIZER_FILES):
        return ckpt
    tok = _checkpoint_meta(ckpt).get("tokenizer")
    if isinstance(tok, dict):
        tok = tok.get("path")
    if isinstance(tok, str):
        p = tok if os.path.isabs(tok) else os.path.join(ckpt, tok)
        if os.path.isfile(p) and os.path.basename(p) in TOKENIZER_FILES:
            return os.path.dirname(p)
        if os.path.isdir(p) and any(os.path.isfile(os.path.join(p, fn)) for fn in TOKENIZER_FILES):
            return p
    return None


def to_hf(checkpoint: str, out: str, dtype: str = "float32", P: int | None = None,
          max_shard_size: str | int = "2GB") -> list[str]:
    """Export a project checkpoint; returns the directories written.

    A single-P checkpoint (or ``P`` given) is written to ``out``. A multi-P checkpoint
    (recycle.py's ``{"backbone", "sets"}``) without ``P`` gives one directory per P:
    ``out/P1``, ``out/P2``, ... (each a complete Hugging Face model over the shared backbone).
    """
    from parscale_jax import recycle
    from parscale_jax.checkpoint import load_params

    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r} is not supported: choose float32 or bfloat16")
    parse_size(max_shard_size)  # fail on a bad size before reading anything
    checkpoint = os.path.abspath(checkpoint)
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise UserError(f"{out} already exists: choose a new output directory or remove it")
    cfg, params = load_params(checkpoint)
    gen = None
    gp = os.path.join(checkpoint, "generation_config.json")
    if os.path.isfile(gp):
        try:
            with open(gp) as f:
                gen = json.load(f)
        except ValueError as e:
            raise UserError(f"{gp} is not valid JSON ({e}): fix or remove it") from None
    tok = tokenizer_dir_of(checkpoint)
    if P is None and recycle.is_multi(params):
        targets = [(p, os.path.join(out, f"P{p}")) for p in recycle.available_P(params)]
    else:
        targets = [(P, out)]
    written = []
    try:
        for p, dst in targets:
            cfg_p, single = params_for_P(cfg, params, p)
            written.append(save_hf(dst, cfg_p, single, dtype=dtype, max_shard_size=max_shard_size,
                                   tokenizer_dir=tok, generation_config=gen))
    except BaseException:
        if len(targets) > 1:  # all P or none
            shutil.rmtree(out, ignore_errors=True)
        raise
    return written


def from_hf(hf_dir: str, out: str, P: int | None = None, seed: int = 0) -> str:
    """HF directory -> project checkpoint. ``P`` > 1 on a P = 1 source adds a fresh prefix and gate."""
    hf_dir = os.path.abspath(hf_dir)
    cfg, params = load_hf(hf_dir)
    if P is not None and int(P) != cfg.parscale_n:
        if cfg.parscale_n != 1:
            raise UserError(f"{hf_dir} is a P={cfg.parscale_n} ParScale model: --P {P} can only add streams "
                            f"to a P=1 (qwen2) source; leave --P out")
        if int(P) < 1:
            raise UserError(f"--P {P} is invalid: P must be >= 1")
        import jax

        from parscale_jax import recycle

        cfg = cfg.replace(parscale_n=int(P))
        # Jitted: one compile instead of op-by-op init, and the unused fresh backbone is never built.
        init = jax.jit(recycle.stage2_init, static_argnums=1)
        params = init(params["backbone"], cfg, jax.random.PRNGKey(seed))
        params = jax.tree.map(np.asarray, params)
    from parscale_jax.checkpoint import save_params

    out = os.path.abspath(out)
    if os.path.exists(out):
        raise UserError(f"{out} already exists: choose a new output directory or remove it")
    staging = os.path.join(os.path.dirname(out), f".tmp-{os.path.basename(out)}-{os.getpid()}")
    if os.path.exists(staging):
        shutil.rmtree(staging)
    extra: dict[str, Any] = {"source": {"format": "huggingface", "path": hf_dir}}
    try:
        save_params(staging, cfg, params, extra=extra)
        copied = copy_tokenizer(hf_dir, staging)
        gp = os.path.join(hf_dir, "generation_config.json")
        if os.path.isfile(gp):
            shutil.copy2(gp, os.path.join(staging, "generation_config.json"))
        if "tokenizer.json" in copied:
            from parscale_jax.checkpoint import MODEL_CONFIG

            mp = os.path.join(staging, MODEL_CONFIG)
            with open(mp) as f:
                meta = json.load(f)
            meta["tokenizer"] = "tokenizer.json"
            with open(mp, "w") as f:
                json.dump(meta, f, indent=2)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.convert",
                                 description="Convert checkpoints to and from Hugging Face (qwen2 / qwen2_parscale).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="project checkpoint -> Hugging Face directory")
    a.add_argument("--checkpoint", required=True, help="a model checkpoint directory (model_config.json + params/)")
    a.add_argument("--out", required=True, help="new output directory")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--P", type=int, default=None, help="which P of a multi-P checkpoint (default: its config's)")
    a.add_argument("--max-shard-size", default="2GB", help="shard the weights above this size (e.g. 2GB, 500MB)")
    b = sub.add_parser("from-hf", help="Hugging Face directory -> project checkpoint")
    b.add_argument("--hf", required=True, help="directory with config.json and *.safetensors")
    b.add_argument("--out", required=True, help="new checkpoint directory")
    b.add_argument("--P", type=int, default=None, help="on a P=1 source: add fresh prefixes and gate for P streams")
    b.add_argument("--seed", type=int, default=0, help="seed of the fresh prefixes/gate with --P")
    return ap


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.P is not None and args.P < 1:
        raise UserError(f"--P {args.P} is invalid: P must be >= 1")
    if args.cmd == "to-hf":
        for out in to_hf(args.checkpoint, args.out, dtype=args.dtype, P=args.P, max_shard_size=args.max_shard_size):
            print(f"wrote {out}", file=sys.stderr)
    else:
        out = from_hf(args.hf, args.out, P=args.P, seed=args.seed)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
