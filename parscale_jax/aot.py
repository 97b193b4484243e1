"""Compile the training (or decode) step for a TPU or GPU topology on this host and report its memory.

    python -m parscale_jax.aot --config configs/paper-0.5b.yaml --topology v5p:2x2x2 \\
        model.parscale_n=8 data.seq_len=2048 batch_size=8 mesh.fsdp=8 mesh.data=1
    python -m parscale_jax.aot --config configs/paper-0.5b.yaml --topology h100:8 \\
        model.parscale_n=8 data.seq_len=2048 batch_size=8 mesh.fsdp=8 mesh.data=1 dtype=bfloat16

The same config and ``key=value`` overrides as train.py. The mesh is built from the topology's
(compile-only) devices and the step is exactly the one train.py runs (:func:`train_step.build`),
lowered with abstract, sharded arguments: nothing is allocated. XLA's ``memory_analysis()`` of
the compiled program gives the bytes per chip; the HBM per chip comes from
:mod:`parscale_jax.hardware`. Printed and (``--json``) written: topology, chips, hbm_bytes,
per_chip_bytes {arguments, outputs, aliased, temporaries, generated_code, total}, fits,
attention_impl, model_flops_per_step, analytic_bytes (this module's own estimate, by part) and,
with ``--max-batch``, the largest sequences per chip that fit.

``--decode --batch B --max-len N`` compiles one KV-cached decode step instead (params and a
cache for N tokens, batch B). The TPU compiler is libtpu: ``make setup`` installs it into
``.venv/libtpu`` (outside site-packages, so plain CPU/GPU runs never start a TPU backend).

GPU topologies (``h100``, ``h100:8``, ``a100:8``, ``h100:8x2`` = GPUs per host x hosts) are
compile-only CUDA devices described by a ``GpuTargetConfigProto`` shipped in
``parscale_jax/assets/gpu_*.txtpb`` (pinned to jaxlib 0.10.2). The CUDA compile-only packages
(the ``aot-gpu`` extra) live in ``.venv/cuda``, off the import path: for a GPU topology this
command re-runs itself in a child process with that folder on ``PYTHONPATH`` and
``JAX_PLATFORMS=cpu``, so nothing else ever loads a CUDA plugin. A GPU does not fail to compile
a program larger than its memory: ``fits`` compares the total with ``budget_bytes``, the part
of the memory JAX can use (its default preallocation, 75%, or ``XLA_PYTHON_CLIENT_MEM_FRACTION``).
Every report also counts the compiled program's custom calls (``custom_calls``, e.g.
``__cudnn$fmhaSoftmax``) and collectives (``collectives``, by kind); ``--hlo PATH`` writes its text.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding

from parscale_jax import attention as A
from parscale_jax import decode, hardware, train_config
from parscale_jax import flops as F
from parscale_jax import model as M
from parscale_jax import sharding as S
from parscale_jax import train_step as TS
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.loss import CHUNK

GiB = 2 ** 30
_TOPOLOGY = re.compile(r"^(v4|v5e|v5litepod|v5p|v6e):(\d+(?:x\d+){1,2})$")
_GENERATION = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5litepod": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e"}
_GPU_TOPOLOGY = re.compile(r"^([a-z0-9-]+?)(?::(\d+)(?:x(\d+))?)?$")
GPU_SPECS = {"h100": "gpu_h100.txtpb", "a100": "gpu_a100.txtpb"}  # hardware.ACCELERATORS key -> target spec
ASSETS = Path(__file__).resolve().parent / "assets"
GPU_MEM_FRACTION = 0.75  # JAX preallocates 75% of a GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION)
_GPU_CHILD = "PARSCALE_AOT_GPU_CHILD"


# ---- topology -------------------------------------------------------------------------------
def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:2x2x2' -> ('tpu-v5p', (2, 2, 2)); 'h100:8x2' -> ('h100', (8, 2)) (GPUs per host, hosts;
    'h100' is one GPU); a name this tool does not know is a UserError."""
    m = _TOPOLOGY.match(name or "")
    if m:
        return _GENERATION[m.group(1)], tuple(int(x) for x in m.group(2).split("x"))
    g = _GPU_TOPOLOGY.match(name or "")
    if g and g.group(1) in GPU_SPECS:
        dims = (int(g.group(2) or 1), int(g.group(3) or 1))
        if min(dims) >= 1:
            return g.group(1), dims
    raise UserError(f"--topology {name!r} is not a topology this tool knows: use GEN:AxB or GEN:AxBxC with GEN "
                    f"one of v4, v5e, v5p, v6e (e.g. v5e:2x2, v5p:2x2x2), or GPU[:N[xH]] with GPU one of "
                    f"{', '.join(GPU_SPECS)} (N GPUs per host, H hosts; e.g. h100, h100:8, a100:8, h100:8x2)")


def is_gpu(topology: str) -> bool:
    return parse_topology(topology)[0] in GPU_SPECS


def gpu_spec(topology: str) -> str:
    """The GpuTargetConfigProto text shipped for the topology's GPU."""
    return (ASSETS / GPU_SPECS[parse_topology(topology)[0]]).read_text()


def gpu_capability(topology: str) -> tuple[int, int]:
    """(major, minor) compute capability of the topology's GPU, from its target spec."""
    block = re.search(r"cuda_compute_capability\s*{([^}]*)}", gpu_spec(topology)).group(1)
    field = lambda k: int((re.search(rf"\b{k}:\s*(\d+)", block) or [0, 0])[1])  # noqa: E731
    return field("major"), field("minor")


def _cuda_path() -> str | None:
    """make setup's CUDA compile-only packages (.venv/cuda), or None when a CUDA plugin is importable."""
    import importlib.util

    try:
        if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
            return None
    except ModuleNotFoundError:  # no jax_plugins package at all
        pass
    for root in (os.environ.get("PARSCALE_CUDA_PATH"), os.path.join(sys.prefix, "cuda"),
                 os.path.join(os.getcwd(), ".venv", "cuda")):
        if root and os.path.isdir(os.path.join(root, "jax_plugins", "xla_cuda12")):
            return root
    raise UserError("the CUDA compile-only packages are not installed, so nothing can be compiled for a GPU: "
                    "run `make setup` (installs the aot-gpu extra into .venv/cuda)")


def run_for_gpu(argv: list[str]) -> int | None:
    """Re-run this command in a child with the CUDA packages on its path and JAX on the CPU (None:
    already the child, or a CUDA plugin is importable here). CUDA's start-up log lines about the
    missing driver are dropped from the child's stderr; everything else is passed through."""
    root = None if os.environ.get(_GPU_CHILD) else _cuda_path()
    if root is None:
        return None
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_GPU_CHILD: "1"})
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    p = subprocess.Popen([sys.executable, "-m", "parscale_jax.aot", *argv], env=env, stderr=subprocess.PIPE,
                         text=True)
    noise = re.compile(r"cudart_stub\.cc|^WARNING: All log messages before absl::InitializeLog")
    for line in p.stderr:
        if not noise.search(line):
            sys.stderr.write(line)
    return p.wait()


def gpu_devices(name: str) -> list:
    """Compile-only CUDA devices: ``N`` GPUs on each of ``H`` hosts (one slice)."""
    per_host, hosts = parse_topology(name)[1]
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                            target_config=gpu_spec(name))
    except Exception as e:  # noqa: BLE001 (the plugin raises plain RuntimeErrors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology {name}: the CUDA plugin cannot build it ({first[:160]}): "
                        f"reinstall the aot-gpu extra with `make setup`") from None
    return list(topo.devices)


def budget_bytes(topology: str) -> tuple[float, str]:
    """(bytes a program may use per chip, how that is set): a TPU's HBM, or the part of a GPU's
    memory JAX preallocates."""
    if not is_gpu(topology):
        return hbm_bytes(topology), "HBM per chip"
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEM_FRACTION))
    return frac * hbm_bytes(topology), (f"{frac:.0%} of the GPU's memory, what JAX preallocates "
                                        f"(XLA_PYTHON_CLIENT_MEM_FRACTION)")


def _libtpu_path() -> str:
    """libtpu.so: $TPU_LIBRARY_PATH, an importable libtpu (a TPU VM), or make setup's .venv/libtpu."""
    if os.environ.get("TPU_LIBRARY_PATH") and os.path.isfile(os.environ["TPU_LIBRARY_PATH"]):
        return os.environ["TPU_LIBRARY_PATH"]
    try:
        import libtpu  # noqa: F401

        return libtpu.get_library_path()
    except ImportError:
        pass
    for root in (os.path.join(sys.prefix, "libtpu"), os.path.join(os.getcwd(), ".venv", "libtpu")):
        path = os.path.join(root, "libtpu", "libtpu.so")
        if os.path.isfile(path):
            return path
    raise UserError("libtpu is not installed, so nothing can be compiled for a TPU: run `make setup` "
                    "(installs it into .venv/libtpu) or `pip install 'libtpu==0.0.42.*'`")


def topology_devices(name: str) -> list:
    """Compile-only devices of a topology such as 'v5p:2x2x2' (one TPU slice) or 'h100:8'."""
    if is_gpu(name):
        return gpu_devices(name)
    gen, dims = parse_topology(name)
    os.environ["TPU_LIBRARY_PATH"] = _libtpu_path()
    # a CPU host has no TPU metadata server: say so, or libtpu logs warnings while loading; and
    # compiling touches no chip, so several compiling processes may load libtpu at once
    chips = math.prod(dims)
    for k, v in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                 ("TPU_ACCELERATOR_TYPE", f"{gen[4:]}-{chips}"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "true")):
        os.environ.setdefault(k, v)

    host = tuple(min(d, 2) for d in dims[:2]) + (1,)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=name, chips_per_host_bounds=host,
                                            num_slices=1)
    except Exception as e:  # noqa: BLE001 (libtpu raises plain RuntimeErrors)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--topology {name}: libtpu cannot build it ({first[:160]}): use a valid slice shape "
                        f"of that generation, e.g. v5e:2x2, v5p:2x2x2, v5p:4x4x2") from None
    return list(topo.devices)


def hbm_bytes(topology: str) -> float:
    """Memory per chip: the TPU generation's HBM (parscale_jax.hardware), or the GPU's device
    memory as its target spec gives it (what the driver reports)."""
    if is_gpu(topology):
        return float(re.search(r"device_memory_size:\s*(\d+)", gpu_spec(topology)).group(1))
    return hardware.ACCELERATORS[parse_topology(topology)[0]].hbm_bytes


# ---- compiling ------------------------------------------------------------------------------
def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes), "temporaries": int(m.temp_size_in_bytes),
           "generated_code": int(m.generated_code_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["generated_code"]
    return out


_COLLECTIVE = re.compile(r"\b(all-gather|all-reduce|reduce-scatter|all-to-all|ragged-all-to-all|collective-permute|"
                         r"collective-broadcast)(?:-start)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def program_counts(hlo: str) -> dict[str, dict[str, int]]:
    """Custom calls (target -> count) and collectives (kind -> count; an async pair counts once)
    in a compiled program's HLO text."""
    return {"custom_calls": dict(sorted(Counter(_CUSTOM_CALL.findall(hlo)).items())),
            "collectives": dict(sorted(Counter(_COLLECTIVE.findall(hlo)).items()))}


def _platform(devices) -> str:
    """'gpu' for CUDA devices, else 'tpu' (what resolves attention_impl=auto)."""
    return "gpu" if devices[0].platform.lower() in ("gpu", "cuda") else "tpu"


def compile_train(cfg, devices) -> tuple[Any, dict]:
    """Compile train.py's step for ``devices``; (compiled, program facts)."""
    mesh = S.make_mesh(cfg.mesh, devices)
    micro = cfg.batch_size // cfg.optim.grad_accum
    if micro % S.batch_shards(mesh):
        raise UserError(f"batch_size={cfg.batch_size} (micro-batch {micro}) is not divisible by the "
                        f"{S.batch_shards(mesh)} data shards (mesh.data*mesh.fsdp): use a multiple of them")
    program = TS.build(cfg, mesh, platform=_platform(devices))
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.data.seq_len + 1), jnp.int32, sharding=program.batch_sharding)
    with S.activate(mesh):
        compiled = program.step.lower(program.abstract_state, tokens).compile()
    facts = {"mesh": dict(mesh.shape), "attention_impl": program.model.cfg.attention_impl,
             "batch_shards": S.batch_shards(mesh)}
    return compiled, facts


def compile_decode(cfg, devices, batch: int, max_len: int, serve_dtype: str | None = None) -> tuple[Any, dict]:
    """Compile the generator's decode program (:func:`decode.make_decode_chunk`, one step per
    call: feed a token per row, sample the next, update the donated cache in place) for
    ``devices``, on the decode mesh (:func:`sharding.decode_mesh_shape`), with the weights in
    the serving dtype (``serve_dtype``, default the config's ``serve_dtype``)."""
    m = cfg.model
    sizes = S.decode_mesh_shape(cfg.mesh, len(devices), m.num_attention_heads, m.intermediate_size, m.parscale_n)
    mesh = S.make_mesh(cfg.mesh, devices, sizes)
    if m.parscale_n % mesh.shape["stream"]:
        raise UserError(f"mesh.stream={mesh.shape['stream']} does not divide model.parscale_n={m.parscale_n}: "
                        f"use a divisor of P")
    model = M.make_model(m, cfg.dtype, platform=_platform(devices),
                         stream_mesh_axis="stream" if mesh.shape["stream"] > 1 else None)
    served = decode.serve_dtype_of(serve_dtype or cfg.serve_dtype, model.dtype)
    params = M.abstract_params(model)
    params = decode.serving_params(jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), params,
        S.tree_shardings(M.logical_axes(model), params, mesh)), served)
    kv_repeat = S.cache_kv_repeat(m.num_key_value_heads, mesh.shape["tensor"])
    cache = jax.eval_shape(lambda p: M.init_cache(model, p, batch, max_len, kv_repeat=kv_repeat), params)
    names = {"k": ("activation_stream", None, "activation_batch", None, "activation_kv_heads", None),
             "valid": ("activation_batch", None), "index": ()}
    names["v"] = names["k"]
    cache = {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
        mesh, S.logical_to_spec(names[k], a.shape, mesh))) for k, a in cache.items()}
    row = NamedSharding(mesh, S.logical_to_spec(("activation_batch",), (batch,), mesh))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=row)
    done = jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=row)
    rep = NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(shape, dt, sharding=rep)  # noqa: E731
    key, step0, eos = scalar(jnp.uint32, (2,)), scalar(jnp.int32), scalar(jnp.int32)
    sampling = (scalar(jnp.float32), scalar(jnp.int32), scalar(jnp.float32))
    with S.activate(mesh):
        compiled = decode.make_decode_chunk(model, pad_id=0, chunk=1).lower(
            params, cache, token, done, key, step0, sampling, eos).compile()
    return compiled, {"mesh": dict(mesh.shape), "attention_impl": model.cfg.attention_impl, "params": params,
                      "cache": cache, "serve_dtype": served, "cache_kv_repeat": kv_repeat,
                      "cache_spec": {k: str(a.sharding.spec) for k, a in cache.items()}}


# ---- the analytic estimate ----------------------------------------------------------------------
def shard_bytes(tree) -> int:
    """Bytes per chip of a pytree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    total = 0
    for a in jax.tree.leaves(tree):
        shape = a.sharding.shard_shape(a.shape) if getattr(a, "sharding", None) is not None else a.shape
        total += math.prod(shape) * np.dtype(a.dtype).itemsize
    return int(total)


def state_bytes(cfg, mesh_shape: dict[str, int]) -> dict[str, int]:
    """Per-chip float32 bytes of all params and of the trainable ones, sharded by the logical
    rules on a mesh of ``mesh_shape`` (computed from shapes alone, no devices)."""



    model = M.make_model(cfg.model, cfg.dtype, platform="tpu")
    shapes, names = M.abstract_params(model), M.logical_axes(model)
    mesh = types.SimpleNamespace(shape=dict(mesh_shape))
    out = {"params": 0, "trainable": 0}
    for (path, a), spec in zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(
            names, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        split = 1
        for axes in S.logical_to_spec(spec, a.shape, mesh):
            for ax in (axes if isinstance(axes, tuple) else (axes,) if axes else ()):
                split *= mesh_shape[ax]
        n = math.prod(a.shape) // split * 4
        out["params"] += n
        if not (cfg.freeze_backbone and getattr(path[0], "key", None) == "backbone"):
            out["trainable"] += n
    return out


def analytic_train_bytes(cfg, mesh_shape: dict[str, int], platform: str = "tpu") -> dict[str, int]:
    """This project's estimate of a training step's bytes per chip, by part (remat=full).

    params: float32, sharded (fsdp, tensor, stream). optimizer: Adam's two moments of the
    trainable params. gradients: one float32 copy of them. saved_activations: the scanned
    layers keep each layer's input, [P, b, S, H] in the compute dtype (b = sequences per chip,
    P over mesh.stream). layer_working_set: the layer being recomputed and differentiated: its
    weights gathered in the compute dtype plus their float32 gradients, and n [P, b, S,
    max(H, I)]-sized compute-dtype intermediates (q/k/v/o, norms, gate/up/down and their
    gradients): n = 14 on TPU; attention (splash, chunked) adds only blocks. loss: one chunk's
    float32 logits per sequence (XLA fuses the softmax and its gradient into that buffer), the
    LM head gathered in the compute dtype, and the per-stream final states (float32 in the gate)
    with their gradients. head_gradient: on GPU (``platform`` "gpu"/"cuda") XLA keeps the LM
    head's float32 gradient as a per-chip partial sum over the loss chunks (H x V x 4 bytes /
    tensor), and with cuDNN's fused attention and XLA:GPU's fusions only n = 2 of the layer's
    intermediates are live at the peak. On TPU the head's partial sum appears on some meshes
    only (519 MiB at H=896 on v5p:2x2x2) and is not counted.
    Calibrated against the compiled paper backbones (bench/aot_memory.py): within 1.3x on TPU,
    1.00-1.09x on h100 / h100:8 (37 programs, seq 2048 and 4096, P = 1-8).
    """
    m = cfg.model
    item = 2 if cfg.dtype == "bfloat16" else 4
    shards = mesh_shape["data"] * mesh_shape["fsdp"]
    b = cfg.batch_size // cfg.optim.grad_accum // shards
    S, H, I, V, L = cfg.data.seq_len, m.hidden_size, m.intermediate_size, m.vocab_size, m.num_hidden_layers
    P = m.parscale_n // mesh_shape["stream"]
    t = mesh_shape["tensor"]
    nH, nKV, hd = m.num_attention_heads, m.num_key_value_heads, m.hd
    layer_params = H * (nH + 2 * nKV) * hd + nH * hd * H + 3 * H * I
    gpu = platform.lower() in ("gpu", "cuda")
    n = 2 if gpu else 14

    c = min(CHUNK, S)
    st = state_bytes(cfg, mesh_shape)
    out = {
        "params": st["params"],
        "optimizer": 2 * st["trainable"],
        "gradients": st["trainable"],
        "saved_activations": L * P * b * S * H * item,
        "layer_working_set": layer_params // t * (item + 4) + n * P * b * S * max(H, I // t) * item,
        "loss": b * c * V // t * 4 + H * V // t * item + P * b * S * H * (4 + 4 + item),
        "head_gradient": H * V * 4 // t if gpu else 0,
    }
    out["total"] = sum(out.values())
    return out


# ---- one report -----------------------------------------------------------------------------------
def resolve_config(config: str | None, overrides: list[str]):
    """train.py's config; ``model.max_position_embeddings`` is raised to ``data.seq_len`` when
    shorter (rotary positions have no parameters: the step's memory does not depend on it)."""
    try:
        return train_config.load(config, overrides)
    except UserError as e:
        if "exceeds model.max_position_embeddings" not in str(e):
            raise
        seq = train_config.load(config, [*overrides, "model.max_position_embeddings=1000000000"]).data.seq_len
        return train_config.load(config, [*overrides, f"model.max_position_embeddings={seq}"])


def train_report(cfg, topology: str, devices: list) -> dict[str, Any]:

    compiled, facts = compile_train(cfg, devices)
    per_chip = _memory(compiled)
    seq = cfg.data.seq_len
    return {"topology": topology, "chips": len(devices), **_fit(topology, per_chip), "mode": "train",
            "mesh": facts["mesh"], "batch_size": cfg.batch_size, "seq_len": seq,
            "sequences_per_chip": cfg.batch_size / facts["batch_shards"],
            "per_chip_bytes": per_chip, **program_counts(_hlo(compiled)),
            "attention_impl": facts["attention_impl"],
            "model_flops_per_step": F.train_flops_per_token(cfg.model, seq) * cfg.batch_size * seq,
            "analytic_bytes": analytic_train_bytes(cfg, facts["mesh"], _platform(devices))}


def decode_report(cfg, topology: str, devices: list, batch: int, max_len: int,
                  serve_dtype: str | None = None) -> dict[str, Any]:

    compiled, facts = compile_decode(cfg, devices, batch, max_len, serve_dtype)
    per_chip = _memory(compiled)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    weights, cache = shard_bytes(facts["params"]), shard_bytes(facts["cache"])
    # the cache is donated: updated in place, one copy lives (the compiled program aliases it)
    analytic = {"params": weights, "kv_cache": cache}
    analytic["total"] = sum(analytic.values())
    return {"topology": topology, "chips": len(devices), **_fit(topology, per_chip), "mode": "decode",
            "mesh": facts["mesh"], "batch": batch, "max_len": max_len, "serve_dtype": facts["serve_dtype"],
            "cache_bytes": cache, "cache_spec": facts["cache_spec"], "cache_kv_repeat": facts["cache_kv_repeat"],
            "cache_aliased": per_chip["aliased"] >= cache,
            # XLA's cost analysis of the compiled step, per chip: it counts a loop body once, so
            # with scanned layers it covers about one layer's share (not the step's traffic)
            "step_cost": {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0))},
            "per_chip_bytes": per_chip, **program_counts(_hlo(compiled)),
            "attention_impl": "xla" if facts["attention_impl"] == "xla" else "chunked (the KV-cache path)",
            "model_flops_per_step": F.forward_flops_per_token(cfg.model, max_len) * batch,
            "analytic_bytes": analytic}


_HLO = {"path": None}  # --hlo: where train_report / decode_report write the compiled program's text


def _hlo(compiled) -> str:
    text = compiled.as_text()
    if _HLO["path"]:
        with open(_HLO["path"] + ".tmp", "w") as f:
            f.write(text)
        os.replace(_HLO["path"] + ".tmp", _HLO["path"])
    return text


def _fit(topology: str, per_chip: dict) -> dict[str, Any]:
    """hbm_bytes, budget_bytes (what a program may use per chip, and how it is set), fits."""
    budget, how = budget_bytes(topology)
    return {"hbm_bytes": int(hbm_bytes(topology)), "budget_bytes": int(budget), "budget": how,
            "fits": per_chip["total"] <= budget}


def max_batch(cfg, topology: str, devices: list, first: dict) -> dict[str, Any]:
    """The largest sequences per chip (a multiple of the per-chip micro-batch step) whose step fits:
    memory is affine in the batch, so two compiles give the line, a third checks its answer
    (and the search steps down while it does not fit)."""
    shards = first["batch_size"] / first["sequences_per_chip"]
    accum = cfg.optim.grad_accum
    b1 = int(first["sequences_per_chip"])
    hbm = first["budget_bytes"]
    at = {b1: first["per_chip_bytes"]["total"]}

    def total(b):
        if b not in at:
            c = dataclasses.replace(cfg, batch_size=int(b * shards))
            at[b] = train_report(c, topology, devices)["per_chip_bytes"]["total"]
        return at[b]

    slope = max(total(2 * b1) - total(b1), 1) / b1
    guess = max(int((hbm - total(b1)) / slope) + b1, 0) // accum * accum
    while guess >= accum and total(guess) > hbm:
        guess -= accum
    best = guess if guess >= accum and total(guess) <= hbm else 0
    return {"max_sequences_per_chip": best, "bytes_at_max": at.get(best), "bytes_per_sequence": int(slope),
            "compiled_batches": {str(k): v for k, v in sorted(at.items())}}


def format_report(r: dict[str, Any]) -> str:
    pc, an = r["per_chip_bytes"], r["analytic_bytes"]
    g = lambda x: f"{x / GiB:.2f} GiB" if x >= GiB / 10 else f"{x / 2 ** 20:.2f} MiB"  # noqa: E731
    lines = [f"topology {r['topology']} ({r['chips']} chips, {g(r['hbm_bytes'])} HBM each), mesh "
             + " ".join(f"{k}={v}" for k, v in r["mesh"].items()) + f", attention {r['attention_impl']}"]
    if r["mode"] == "train":
        lines.append(f"train step: batch {r['batch_size']} x {r['seq_len']} tokens "
                     f"({r['sequences_per_chip']:g} sequences/chip), {r['model_flops_per_step']:.3e} model FLOPs/step")
    else:
        lines.append(f"decode step: batch {r['batch']}, cache {r['max_len']} tokens, weights {r['serve_dtype']}, "
                     f"{r['model_flops_per_step']:.3e} model FLOPs/step; cache {g(r['cache_bytes'])} per chip "
                     f"(k/v {r['cache_spec']['k']}" + (f", each KV head stored {r['cache_kv_repeat']}x to split "
                                                        f"over tensor" if r.get("cache_kv_repeat", 1) > 1 else "")
                     + "), " + ("aliased (updated in place)" if r["cache_aliased"]
                                                          else "NOT aliased"))
    lines.append("per chip (compiled): " + ", ".join(f"{k} {g(v)}" for k, v in pc.items()))
    lines.append("per chip (analytic): " + ", ".join(f"{k} {g(v)}" for k, v in an.items())
                 + f"; compiled/analytic {pc['total'] / max(an['total'], 1):.2f}")
    lines.append(("fits" if r["fits"] else "does NOT fit") + f": {g(pc['total'])} of {g(r['budget_bytes'])}"
                 + ("" if r["budget_bytes"] == r["hbm_bytes"] else f" ({r['budget']})"))
    lines.append("custom calls: " + (", ".join(f"{k} x{v}" for k, v in r["custom_calls"].items()) or "none")
                 + "; collectives: " + (", ".join(f"{k} x{v}" for k, v in r["collectives"].items()) or "none"))
    if "max_batch" in r:
        mb = r["max_batch"]
        lines.append(f"largest sequences/chip that fit: {mb['max_sequences_per_chip']} "
                     f"({g(mb['bytes_per_sequence'])} per extra sequence)")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.aot", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="YAML config, as for train.py (defaults when omitted)")
    ap.add_argument("--topology", required=True, help="TPU slice (v5e:2x2, v5p:2x2x2, v5p:4x4x2) or GPUs "
                    "per host x hosts (h100, h100:8, a100:8, h100:8x2)")
    ap.add_argument("--json", help="also write the report here")
    ap.add_argument("--hlo", help="also write the compiled program's HLO text here")
    ap.add_argument("--max-batch", action="store_true", help="also find the largest sequences/chip that fit")
    ap.add_argument("--decode", action="store_true", help="compile one KV-cached decode step instead")
    ap.add_argument("--batch", type=int, default=1, help="--decode: sequences decoded together")
    ap.add_argument("--max-len", type=int, default=2048, help="--decode: tokens the cache holds")
    ap.add_argument("--serve-dtype", default=None, choices=decode.SERVE_DTYPES,
                    help="--decode: the weights' dtype as served (default: the config's serve_dtype; auto = dtype)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for train.py")
    return ap.parse_intermixed_args(argv)


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    parse_topology(args.topology)  # a bad name fails before anything is loaded
    cfg = resolve_config(args.config, args.overrides)
    if args.decode and (args.batch < 1 or args.max_len < 1):
        raise UserError("--batch and --max-len must be positive integers")
    if is_gpu(args.topology):
        rc = run_for_gpu(sys.argv[1:] if argv is None else list(argv))
        if rc is not None:
            return rc
    _HLO["path"] = args.hlo
    devices = topology_devices(args.topology)
    with A.gpu_target(gpu_capability(args.topology)) if is_gpu(args.topology) else contextlib.nullcontext():
        if args.decode:
            report = decode_report(cfg, args.topology, devices, args.batch, args.max_len, args.serve_dtype)
        else:
            report = train_report(cfg, args.topology, devices)
            if args.max_batch:
                report["max_batch"] = max_batch(cfg, args.topology, devices, report)
    print(format_report(report))
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(report, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
