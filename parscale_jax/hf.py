"""The Hugging Face format of ``qwen2`` / ``qwen2_parscale`` checkpoints: config, tensor names and
layouts, and reading / writing a model directory (safetensors, via ``safetensors.numpy``).

Format (spec section 3): PyTorch ``Linear.weight`` is ``[out, in]``, our kernels are
``[in, ...out]`` and stacked over layers, so every matrix is a reshape plus a transpose.
The gate's first kernel already reads its input in the authors' ``(h, p)`` order
(feature ``h * P + p``), so ``model.aggregate_layer.0.weight`` is its plain transpose.
P = 1 is written as plain ``qwen2`` that stock ``transformers`` loads. Only safetensors are
read (no pickle is ever unpickled; ``.bin`` is refused); bfloat16 is ``ml_dtypes.bfloat16``.

* :func:`load_hf` (directory -> (ModelConfig, float32 params)), :func:`save_hf` ((ModelConfig,
  single-P params) -> directory, atomically), :func:`params_to_hf` / :func:`hf_to_params` (the
  name and layout map alone). The command line is :mod:`parscale_jax.convert`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Any, Iterable

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from parscale_jax.config import ModelConfig
from parscale_jax.data.tokenizer import ByteTokenizer, HFTokenizer, byte_tokenizer_hf_files, is_byte_tokenizer_json
from parscale_jax.errors import UserError
from parscale_jax.fileio import atomic_dir, write_json
from parscale_jax.params import check_finite

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# Files of a Hugging Face tokenizer that travel with a checkpoint in either direction.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model")
# The transformers code that every P > 1 export carries: verbatim copies of these modules of the
# package (modeling_qwen2_parscale runs torch_ref's forward), named by auto_map in config.json, so that
# AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True) needs nothing else.
REMOTE_CODE = ("configuration_qwen2_parscale.py", "modeling_qwen2_parscale.py", "torch_ref.py")
AUTO_MAP = {"AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
            "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM"}
AUTHORS_SMOOTH_DEFAULT = 0.01  # the authors' Qwen2ParScaleConfig default (spec section 2)
HF_MODEL_TYPES = ("qwen2", "qwen2_parscale")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # weights of other dtypes are refused


def _names_list(names: Iterable[str], few: int = 5) -> str:
    names = sorted(names)
    head = ", ".join(names[:few])
    return f"{len(names)}: {head}" + (f" and {len(names) - few} more" if len(names) > few else "")



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
    if parscale:
        d["auto_map"] = dict(AUTO_MAP)
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
def _open(path: str):
    try:
        return safe_open(path, framework="np")
    except (SafetensorError, OSError) as e:
        msg = " ".join(str(e).split())[:160]
        raise UserError(f"{path} is not a readable safetensors file ({msg}): re-export the weights as "
                        f"safetensors (or fetch the file again if it was cut off)") from None


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype, shape)} of one file, without reading the data."""
    with _open(path) as f:
        return {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()}


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
    names: dict[str, str] = {}
    for fp in files:
        for n in read_header(fp):
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


def _read_tensors(hf_dir: str, by_file: dict[str, list[str]]) -> dict[str, np.ndarray]:
    out = {}
    for fn, names in by_file.items():
        path = os.path.join(hf_dir, fn)
        with _open(path) as f:
            for n in names:
                try:
                    out[n] = f.get_tensor(n)
                except SafetensorError as e:
                    raise UserError(f"{path}: tensor {n} cannot be read ({e}): the file is corrupt; fetch it again") \
                        from None
    return out


def load_hf(hf_dir: str) -> tuple[ModelConfig, dict]:
    """Read a qwen2 / qwen2_parscale directory (safetensors only) -> (ModelConfig, float32 params)."""
    hf_dir = os.path.abspath(hf_dir)
    cfg = config_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    files = _weight_files(hf_dir)
    headers = {fn: read_header(os.path.join(hf_dir, fn)) for fn in set(files.values())}
    for name, fn in files.items():
        if name not in headers[fn]:
            raise UserError(f"{hf_dir}: {SAFE_INDEX} says {name} is in {fn} but it is not: re-export the model")
    check_tensors(cfg, {n: headers[fn][n][1] for n, fn in files.items()}, hf_dir)
    want = set(hf_shapes(cfg)) | {"lm_head.weight"}
    by_file: dict[str, list[str]] = {}
    for name, fn in files.items():
        if name in want:
            dtype = headers[fn][name][0]
            if dtype not in FLOAT_DTYPES:
                raise UserError(f"{hf_dir}: tensor {name} has dtype {dtype}: weights must be floating point "
                                f"({', '.join(FLOAT_DTYPES)}); re-export the model")
            by_file.setdefault(fn, []).append(name)
    tensors = _read_tensors(hf_dir, by_file)
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"]):
            raise UserError(f"{hf_dir}: config.json says tie_word_embeddings=true but lm_head.weight differs from "
                            f"model.embed_tokens.weight: set tie_word_embeddings=false in config.json")
    params = hf_to_params(cfg, tensors)
    check_finite(params)
    return cfg, params


def model_type(path: str) -> str | None:
    """The ``model_type`` of a Hugging Face directory's config.json (None when there is none)."""
    cf = os.path.join(path, "config.json")
    if not os.path.isfile(cf):
        return None
    try:
        with open(cf) as f:
            d = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{cf} is not valid JSON ({e}): repair or re-export the checkpoint") from None
    mt = d.get("model_type") if isinstance(d, dict) else None
    return mt if isinstance(mt, str) else None


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


def _write_weights(folder: str, tensors: dict[str, np.ndarray], limit: int) -> None:
    """One model.safetensors, or shards above ``limit`` bytes with a model.safetensors.index.json."""
    shards = _shard(tensors, limit)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, SAFE_SINGLE), metadata={"format": "pt"})
        return
    n, weight_map = len(shards), {}
    for k, sh in enumerate(shards, 1):
        fn = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(sh, os.path.join(folder, fn), metadata={"format": "pt"})
        print(f"wrote shard {k}/{n} ({sum(a.nbytes for a in sh.values()) / 1e6:.1f} MB)", file=sys.stderr)
        weight_map.update({name: fn for name in sh})
    total = sum(a.nbytes for a in tensors.values())
    write_json(os.path.join(folder, SAFE_INDEX), {"metadata": {"total_size": total},
                                                  "weight_map": dict(sorted(weight_map.items()))})


def save_hf(out_dir: str, cfg: ModelConfig, params: dict, dtype: str = "float32",
            max_shard_size: str | int = "2GB", tokenizer: str | None = "bytes",
            generation_config: dict | None = None) -> str:
    """Write ``params`` (single-P, matching ``cfg``) as a Hugging Face directory, atomically.

    ``dtype``: float32 or bfloat16 for the weights. Above ``max_shard_size`` the weights are
    sharded with a ``model.safetensors.index.json``. P > 1 adds the transformers code
    (:data:`REMOTE_CODE`). ``tokenizer``: ``"bytes"`` (the byte tokenizer's Hugging Face files), a
    tokenizer.json (copied with the tokenizer files beside it), or None (no tokenizer files).
    """
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r} is not supported: choose float32 or bfloat16")
    check_finite(params)
    tensors = params_to_hf(cfg, params)
    check_tensors(cfg, {n: a.shape for n, a in tensors.items()}, "params")
    if dtype == "bfloat16":
        tensors = {n: a.astype(ml_dtypes.bfloat16) for n, a in tensors.items()}
    limit = parse_size(max_shard_size)
    with atomic_dir(out_dir) as tmp:
        _write_weights(tmp, tensors, limit)
        write_json(os.path.join(tmp, "config.json"), hf_config_dict(cfg, dtype))
        if cfg.parscale_n > 1:
            here = os.path.dirname(os.path.abspath(__file__))
            for fn in REMOTE_CODE:
                shutil.copyfile(os.path.join(here, fn), os.path.join(tmp, fn))
        ids = write_tokenizer(tmp, tokenizer, cfg.max_position_embeddings) if tokenizer else {}
        write_json(os.path.join(tmp, "generation_config.json"),
                   {"_from_model_config": True, "use_cache": True, **ids, **(generation_config or {})})
    return os.path.abspath(out_dir)


def write_tokenizer(folder: str, tokenizer: str, model_max_length: int) -> dict[str, int]:
    """Tokenizer files for AutoTokenizer into ``folder`` (see :func:`save_hf`); returns the EOS and
    PAD ids for generation_config.json. A copied tokenizer.json without a tokenizer_config.json gets
    one naming its EOS and PAD (:meth:`HFTokenizer.hf_tokenizer_config`)."""
    if tokenizer == "bytes" or is_byte_tokenizer_json(tokenizer):
        tok: Any = ByteTokenizer()
        files = byte_tokenizer_hf_files(model_max_length)
    else:
        src = tokenizer if os.path.isfile(tokenizer) else os.path.join(tokenizer, "tokenizer.json")
        copy_tokenizer(os.path.dirname(src), folder)
        shutil.copy2(src, os.path.join(folder, "tokenizer.json"))
        try:
            tok = HFTokenizer(src)
        except UserError as e:  # copied as it is; transformers finds no EOS either
            print(f"note: {e}", file=sys.stderr)
            return {}
        has_config = os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
        files = {} if has_config else {"tokenizer_config.json": json.dumps(tok.hf_tokenizer_config(model_max_length),
                                                                             indent=2)}
    for fn, text in files.items():
        with open(os.path.join(folder, fn), "w", encoding="utf-8") as f:
            f.write(text)
    return {"eos_token_id": int(tok.eos_id), "pad_token_id": int(tok.pad_id)}


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
    copied = []
    for fn in TOKENIZER_FILES:
        sp = os.path.join(src_dir, fn)
        if os.path.isfile(sp):
            shutil.copy2(sp, os.path.join(dst_dir, fn))
            copied.append(fn)
    return copied
