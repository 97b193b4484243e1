"""Training configuration: typed, frozen dataclasses loaded from YAML plus dotted overrides.

    python train.py --config configs/tiny.yaml --workdir runs/x model.parscale_n=4 optim.lr=3e-4

A YAML file has the sections of :class:`TrainConfig` (``model``, ``data``, ``optim``, ``mesh``,
``checkpoint``, ``distributed``) and its top-level keys. ``model.preset`` names a preset of
:mod:`parscale_jax.config` whose fields the other ``model.*`` keys override. An unknown key or
a value of the wrong type is a :class:`UserError` naming the key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Mapping

import yaml

from parscale_jax.config import ModelConfig, PRESETS
from parscale_jax.data import DataConfig
from parscale_jax.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "save_dots")
SERVE_DTYPES = ("auto", "bfloat16", "float16", "float32")
NAN_POLICIES = ("stop", "skip")


def _bad(key: str, value: Any, why: str) -> UserError:
    return UserError(f"config key {key}={value!r} is invalid: {why}")


def _finite(obj: Any, section: str) -> None:
    """Every float field of a config section is a finite number."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise _bad(f"{section}{f.name}", v, "use a finite number")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3               # peak learning rate
    schedule: str = "cosine"       # cosine | wsd (warmup-stable-decay) | constant (after warmup)
    warmup_steps: int = 100        # linear warmup from 0
    decay_fraction: float = 0.2    # wsd: the last fraction of steps decays to min_lr_ratio * lr
    min_lr_ratio: float = 0.1      # final lr / peak lr (cosine and wsd)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1      # AdamW, not applied to norms, biases or prefixes
    clip_norm: float = 1.0         # global-norm clipping (0 = off)
    grad_accum: int = 1            # micro-batches per step: the batch is split into grad_accum parts

    def __post_init__(self):
        _finite(self, "optim.")
        if self.schedule not in SCHEDULES:
            raise _bad("optim.schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        for k in ("lr", "eps"):
            if not getattr(self, k) > 0:
                raise _bad(f"optim.{k}", getattr(self, k), "use a positive number")
        for k in ("weight_decay", "clip_norm", "warmup_steps"):
            if getattr(self, k) < 0:
                raise _bad(f"optim.{k}", getattr(self, k), "use a number >= 0")
        for k in ("decay_fraction", "min_lr_ratio"):
            if not 0 <= getattr(self, k) <= 1:
                raise _bad(f"optim.{k}", getattr(self, k), "use a number in [0, 1]")
        for k in ("b1", "b2"):
            if not 0 <= getattr(self, k) < 1:
                raise _bad(f"optim.{k}", getattr(self, k), "use a number in [0, 1) (Adam divides by 1 - beta^t)")
        if self.grad_accum < 1:
            raise _bad("optim.grad_accum", self.grad_accum, "use an integer >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; their product must equal the number of devices (-1 on one
    axis: whatever is left). The batch is split over data x fsdp, params over fsdp (ZeRO-3
    style) and tensor (heads, MLP, vocab), streams over stream."""
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    stream: int = 1

    def __post_init__(self):
        sizes = dataclasses.asdict(self)
        for k, v in sizes.items():
            if v == 0 or v < -1:
                raise _bad(f"mesh.{k}", v, "use a positive size, or -1 on one axis for the rest of the devices")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise UserError("config keys mesh.*: at most one axis may be -1 (the rest of the devices)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500               # save every N steps (and at the end, and on SIGTERM/SIGINT)
    keep: int = 3                  # keep the newest K checkpoints
    async_save: bool = True        # write in the background while training goes on

    def __post_init__(self):
        if self.every < 1:
            raise _bad("checkpoint.every", self.every, "use an integer >= 1")
        if self.keep < 1:
            raise _bad("checkpoint.keep", self.keep, "use an integer >= 1")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-host set-up for ``jax.distributed.initialize``. ``initialize``: auto (when the
    environment says so: JAX_COORDINATOR_ADDRESS or a TPU pod / SLURM cluster), true, false."""
    initialize: str | bool = "auto"     # YAML's true/false arrive as booleans: stored as "true"/"false"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: str | None = None   # e.g. "0,1,2,3"

    def __post_init__(self):
        if isinstance(self.initialize, bool):
            object.__setattr__(self, "initialize", str(self.initialize).lower())
        if self.initialize not in ("auto", "true", "false"):
            raise _bad("distributed.initialize", self.initialize, "use auto, true or false")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    steps: int = 1000              # optimizer steps
    batch_size: int = 32           # global batch in sequences (of data.seq_len tokens) per step
    dtype: str = "bfloat16"        # compute dtype; params and optimizer state stay float32
    serve_dtype: str = "auto"      # decoding: the weights cast once to this (auto = dtype)
    remat: str = "none"            # none | full (recompute each layer) | save_dots
    scan_layers: bool = True       # stack layers with lax.scan (compile time flat in depth)
    seed: int = 0                  # params init and the step RNG
    log_every: int = 10            # steps between progress lines / metric records
    eval_every: int = 200          # steps between held-out evaluations (0 = only at the end)
    eval_windows: int = 64         # held-out windows of data.seq_len tokens per evaluation (0 = all)
    eval_batch_size: int = 16
    nan_policy: str = "stop"       # stop (exit naming the step) | skip (drop the update, go on)
    init_from: str | None = None   # stage 2: a P=1 (or any) checkpoint whose backbone starts this run
    freeze_backbone: bool = False  # train only prefixes and aggregator
    add_to: str | None = None      # with freeze_backbone: add this P's set to that multi-P model checkpoint
    keep_data_position: bool = False  # with init_from: continue that run's data position
    peak_flops: float | None = None   # per-device peak FLOP/s for MFU (default: known accelerators; CPU: measured)
    allow_changed: str | None = None  # on resume: keys (or sections) whose change from the checkpoint's config is accepted

    def __post_init__(self):
        _finite(self, "")
        allowed_changes(self.allow_changed)
        if self.peak_flops is not None and not self.peak_flops > 0:
            raise _bad("peak_flops", self.peak_flops, "use a positive number of FLOP/s per device, or null to measure")
        if self.keep_data_position and not self.init_from:
            raise UserError("keep_data_position=true needs init_from (the run whose data position to continue): "
                            "set init_from or drop keep_data_position")
        if self.freeze_backbone and self.model.parscale_n == 1:
            raise UserError("freeze_backbone=true with model.parscale_n=1 leaves nothing to train: "
                            "set model.parscale_n > 1")
        if self.steps < 1:
            raise _bad("steps", self.steps, "use an integer >= 1")
        if self.batch_size < 1:
            raise _bad("batch_size", self.batch_size, "use an integer >= 1")
        if self.dtype not in DTYPES:
            raise _bad("dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        if self.serve_dtype not in SERVE_DTYPES:
            raise _bad("serve_dtype", self.serve_dtype, f"choose one of {', '.join(SERVE_DTYPES)}")
        if self.remat not in REMATS:
            raise _bad("remat", self.remat, f"choose one of {', '.join(REMATS)}")
        if self.nan_policy not in NAN_POLICIES:
            raise _bad("nan_policy", self.nan_policy, f"choose one of {', '.join(NAN_POLICIES)}")
        for k in ("log_every",):
            if getattr(self, k) < 1:
                raise _bad(k, getattr(self, k), "use an integer >= 1")
        for k in ("eval_every", "eval_windows"):
            if getattr(self, k) < 0:
                raise _bad(k, getattr(self, k), "use an integer >= 0")
        if self.eval_batch_size < 1:
            raise _bad("eval_batch_size", self.eval_batch_size, "use an integer >= 1")
        if self.batch_size % self.optim.grad_accum:
            raise UserError(f"batch_size={self.batch_size} is not divisible by optim.grad_accum="
                            f"{self.optim.grad_accum}: each micro-batch must hold batch_size/grad_accum sequences")
        if self.add_to and not self.freeze_backbone:
            raise UserError("add_to needs freeze_backbone=true: only a frozen backbone can be shared by several P")
        if self.data.seq_len > self.model.max_position_embeddings:
            raise UserError(f"data.seq_len={self.data.seq_len} exceeds model.max_position_embeddings="
                            f"{self.model.max_position_embeddings}: lower data.seq_len")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def allowed_changes(spec: str | None) -> tuple[str, ...]:
    """The keys or sections ``allow_changed`` names (comma- or space-separated); unknown names are an error."""
    names = tuple(n for n in re.split(r"[,\s]+", spec or "") if n)
    if not names:
        return names
    keys = {k for k, _, _ in all_keys()}
    sections = {k.split(".")[0] for k in keys if "." in k}
    bad = [n for n in names if n not in keys and n not in sections]
    if bad:
        raise UserError(f"allow_changed names unknown config key(s) {', '.join(bad)}: name keys such as optim.lr "
                        f"or steps, or a section such as optim (see docs/config.md)")
    return names


# ---- loading -----------------------------------------------------------------------------
_SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig,
             "checkpoint": CheckpointConfig, "distributed": DistributedConfig}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert ``value`` to the annotated type ``typ``; raise UserError naming ``key``."""
    if isinstance(typ, str):
        typ = eval(typ, {"int": int, "float": float, "str": str, "bool": bool, "None": None})  # noqa: S307
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("null", "none") and type(None) in args:
            return None
        last = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except UserError as e:
                last = e
        raise last
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _bad(key, value, "use true or false")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise _bad(key, value, "use an integer")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise _bad(key, value, "use a number") from None
            else:
                raise _bad(key, value, "use a number")
        if not math.isfinite(float(value)):
            raise _bad(key, value, "use a finite number")
        return float(value)
    if typ is str:
        if isinstance(value, bool) or value is None:
            raise _bad(key, value, "use a string")
        return str(value)
    return value


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls, d: Mapping[str, Any], prefix: str):
    known = _fields(cls)
    out = {}
    for k, v in d.items():
        if k not in known:
            where = f"{prefix}{k}"
            raise UserError(f"unknown config key {where!r}: known keys{' in ' + prefix[:-1] if prefix else ''} "
                            f"are {', '.join(sorted(known))}")
        out[k] = _coerce(prefix + k, v, known[k])
    try:
        return cls(**out)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"config section {prefix[:-1] or 'top'} is invalid: {e}") from None


def from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """A TrainConfig from a nested dict (YAML), with ``model.preset`` expanded."""
    d = dict(d or {})
    top = {}
    for name, sub in d.items():
        if name in _SECTIONS:
            if sub is None:
                sub = {}
            if not isinstance(sub, Mapping):
                raise UserError(f"config key {name!r} must be a mapping of its keys, got {sub!r}")
            sub = dict(sub)
            if name == "model":
                preset = sub.pop("preset", None)
                if preset is not None:
                    if preset not in PRESETS:
                        raise UserError(f"config key model.preset={preset!r} is unknown: choose one of "
                                        f"{', '.join(sorted(PRESETS))}")
                    sub = {**PRESETS[preset], **sub}
            top[name] = _build(_SECTIONS[name], sub, name + ".")
        else:
            top[name] = d[name]
    sections = {k: v for k, v in top.items() if k in _SECTIONS}
    rest = {k: v for k, v in top.items() if k not in _SECTIONS}
    known = _fields(TrainConfig)
    for k, v in rest.items():
        if k not in known:
            raise UserError(f"unknown config key {k!r}: known top-level keys are "
                            f"{', '.join(sorted(known))}")
        rest[k] = _coerce(k, v, known[k])
    try:
        return TrainConfig(**sections, **rest)
    except UserError:
        raise
    except (TypeError, ValueError) as e:
        raise UserError(f"config is invalid: {e}") from None


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.parscale_n=4", "optim.lr=3e-4"]`` -> nested dict with YAML-typed values."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override {item!r} is not key=value: write e.g. model.parscale_n=4")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UserError(f"override {item!r} has an empty key: write e.g. optim.lr=3e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and value.strip().lower() in ("", "none", "null"):
            value = None if value.strip() else value
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with another override of {p!r}")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            sub = dict(out[k])
            # a preset given by override replaces the file's model fields that it defines
            out[k] = _merge(sub, v)
        else:
            out[k] = v
    return out


def load(path: str | None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or the defaults when ``path`` is None) and apply dotted overrides."""
    d: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path) as f:
                d = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"config file {path} does not exist: pass --config configs/NAME.yaml "
                            f"(see configs/)") from None
        except IsADirectoryError:
            raise UserError(f"config file {path} is a directory: pass --config a YAML file, e.g. "
                            f"configs/tiny.yaml") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path} is not readable ({type(e).__name__}: {e}): pass a readable "
                            f"YAML file") from None
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "syntax error"
            raise UserError(f"config file {path} is not valid YAML ({first}): fix the file") from None
        if not isinstance(d, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {type(d).__name__}")
    return from_dict(_merge(d, parse_overrides(overrides or [])))


def all_keys() -> list[tuple[str, Any, str]]:
    """(dotted key, default, type) for every config key: the rows of docs/config.md."""
    rows = []
    for name, typ in _fields(TrainConfig).items():
        if name in _SECTIONS:
            cls = _SECTIONS[name]
            for f in dataclasses.fields(cls):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                rows.append((f"{name}.{f.name}", default, str(_fields(cls)[f.name])))
        else:
            f = {f.name: f for f in dataclasses.fields(TrainConfig)}[name]
            rows.append((name, f.default, str(typ)))
    return rows


# One line per config key: docs/config.md is generated from this
# (python -m parscale_jax.train_config > docs/config.md; tests/test_docs.py checks it is current).
KEY_DOCS: dict[str, str] = {
    "model.preset": "start from a preset of parscale_jax.config (tiny, paper-0.5b ... paper-4.4b, qwen2.5-0.5b/1.5b/3b); the other model.* keys override its fields",
    "model.vocab_size": "vocabulary size (byte tokenizer: 259 ids, tiny uses 384)",
    "model.hidden_size": "width H",
    "model.intermediate_size": "MLP width",
    "model.num_hidden_layers": "layers L",
    "model.num_attention_heads": "query heads",
    "model.num_key_value_heads": "key/value heads (GQA); must divide the query heads",
    "model.head_dim": "per-head dimension (null: hidden_size / heads)",
    "model.rope_theta": "rotary base",
    "model.rms_norm_eps": "RMSNorm epsilon",
    "model.max_position_embeddings": "longest sequence the model accepts",
    "model.tie_word_embeddings": "LM head shares the embedding matrix",
    "model.initializer_range": "std of the normal init of backbone, prefixes and gate",
    "model.parscale_n": "P, the number of parallel streams (1 = plain Qwen2)",
    "model.parscale_n_tokens": "T, prefix tokens per stream and layer",
    "model.parscale_attn_smooth": "gate smoothing eps: w(1-eps) + eps/P",
    "model.attention_impl": "auto (splash on TPU, cudnn on GPU, chunked on CPU), xla (materialised mask, the reference), chunked, splash or cudnn; runtime only, not saved as architecture",
    "data.source": "a prepared dataset directory (python -m parscale_jax.data prepare), or stdlib (this interpreter's standard library, the default corpus), a file, directory or glob (prepared into the cache once)",
    "data.format": "auto (by extension), text, jsonl, npy (pre-tokenised ids)",
    "data.text_field": "JSONL field holding the text",
    "data.tokenizer": "bytes (id = byte, PAD 256, BOS 257, EOS 258) or a local tokenizer.json",
    "data.seq_len": "training sequence length (packed, EOS between documents)",
    "data.heldout_fraction": "fraction of files held out (deterministic by path hash) for evaluation",
    "data.seed": "global shuffle seed",
    "data.worker_count": "grain worker processes (0: in-process)",
    "data.prefetch": "batches prepared ahead in a background thread",
    "data.mixture": "weighted prepared datasets, a YAML list of {source, weight} or 'A:0.7,B:0.3' (each block of 1024 records holds each source's share exactly); replaces data.source",
    "optim.lr": "peak learning rate",
    "optim.schedule": "cosine, wsd (warmup-stable-decay) or constant",
    "optim.warmup_steps": "linear warmup steps",
    "optim.decay_fraction": "wsd: fraction of the steps (at the end) that decay the rate",
    "optim.min_lr_ratio": "final rate / peak rate (cosine, wsd)",
    "optim.b1": "Adam beta1",
    "optim.b2": "Adam beta2",
    "optim.eps": "Adam epsilon",
    "optim.weight_decay": "AdamW decay (not on norms, biases, prefixes)",
    "optim.clip_norm": "global gradient-norm clip (0: off)",
    "optim.grad_accum": "micro-batches per step (the batch is split; same update)",
    "mesh.data": "data-parallel axis size (-1: the rest of the devices)",
    "mesh.fsdp": "fully-sharded data-parallel axis (params and optimizer state sharded)",
    "mesh.tensor": "tensor-parallel axis (heads, MLP, vocabulary)",
    "mesh.stream": "stream axis: the P streams split over devices (must divide P)",
    "checkpoint.every": "save every N steps (also at the end and on SIGTERM/SIGINT)",
    "checkpoint.keep": "keep the newest K checkpoints",
    "checkpoint.async_save": "write checkpoints in the background",
    "distributed.initialize": "auto (when the environment names a coordinator), true or false: call jax.distributed.initialize",
    "distributed.coordinator_address": "host:port of process 0",
    "distributed.num_processes": "number of processes (hosts)",
    "distributed.process_id": "this process's index",
    "distributed.local_device_ids": "devices this process uses, e.g. 0,1,2,3",
    "steps": "optimizer steps",
    "batch_size": "global batch in sequences per step (split over processes and data shards)",
    "dtype": "compute dtype: bfloat16 or float32 (params and optimizer state stay float32)",
    "serve_dtype": "decoding (aot --decode): the weights cast once to auto (= dtype), bfloat16, float16 or float32",
    "remat": "none, full (recompute each layer in the backward pass) or save_dots",
    "scan_layers": "stack layers with lax.scan (false: unrolled, longer compiles)",
    "seed": "params init and step RNG",
    "log_every": "steps between progress lines and metric records",
    "eval_every": "steps between held-out evaluations (0: only at the end)",
    "eval_windows": "held-out windows of data.seq_len tokens per evaluation (0: all)",
    "eval_batch_size": "windows per evaluation batch",
    "nan_policy": "stop (exit naming the step) or skip (drop that update) on a non-finite loss",
    "init_from": "stage 2: start from this checkpoint's backbone (workdir, saved model or Hugging Face dir)",
    "freeze_backbone": "train only prefixes and aggregator (no backbone gradients or optimizer state)",
    "add_to": "with freeze_backbone: add this run's P set to that multi-P model checkpoint",
    "keep_data_position": "with init_from: continue that run's data position instead of starting afresh",
    "peak_flops": "per-device peak FLOP/s for MFU (default: vendor bf16 peak, or a measured matmul rate on CPU)",
    "allow_changed": "on resume: keys or sections (comma-separated, e.g. optim.lr,steps) whose change from the checkpoint's config is accepted; `train.py --allow-changed KEY ...` sets it",
}


def reference_table() -> str:
    """Markdown table of every config key: default and meaning."""
    rows = [("model.preset", None, "")] + all_keys()
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, _ in rows:
        d = "null" if default is None else (str(default).lower() if isinstance(default, bool) else str(default))
        lines.append(f"| `{key}` | `{d}` | {KEY_DOCS[key]} |")
    return "\n".join(lines)


def reference_markdown() -> str:
    """docs/config.md: every key of a training config, its default and meaning."""
    return ("# Config reference\n\n"
            "<!-- generated by `python -m parscale_jax.train_config > docs/config.md`; do not edit -->\n\n"
            "Every key of a training config (`train.py --config FILE key=value ...`), its default and meaning. "
            "`--print-config` shows a resolved config; `model.preset` expands a preset of `parscale_jax.config`; "
            "see [training](training.md) for what they do.\n\n" + reference_table() + "\n")


if __name__ == "__main__":
    print(reference_markdown(), end="")
