"""Checkpoint conversion between this project and Hugging Face (``qwen2`` / ``qwen2_parscale``).

Command line (also ``parscale-convert``)::

    python -m parscale_jax.convert to-hf   --checkpoint CKPT --out DIR [--dtype float32|bfloat16]
                                           [--P n] [--max-shard-size 2GB]
    python -m parscale_jax.convert from-hf --hf DIR --out CKPT [--P n] [--seed 0]

``to-hf`` reads any checkpoint of this project (:mod:`parscale_jax.loading`) and writes one
directory; for a multi-P checkpoint without ``--P`` it writes one complete Hugging Face
directory per P under ``DIR/P1``, ``DIR/P2``, ... (with ``--P``, or for a single-P checkpoint,
the P is chosen by the loader's rule). ``from-hf --P n`` on a P = 1 (qwen2) source adds freshly
initialised prefixes and gate (``recycle.stage2_init``): the entry point of the two-stage recipe.
Tokenizer files (tokenizer.json, tokenizer_config.json, ...) travel along both ways. The format
itself (names, layouts, safetensors) is :mod:`parscale_jax.hf`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np

from parscale_jax import hf, loading
from parscale_jax.checkpoint import MODEL_CONFIG, write_params
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import atomic_dir
from parscale_jax.recycle import stage2_init


def _generation_config(checkpoint: str) -> dict | None:
    gp = os.path.join(checkpoint, "generation_config.json")
    if not os.path.isfile(gp):
        return None
    try:
        with open(gp) as f:
            return json.load(f)
    except ValueError as e:
        raise UserError(f"{gp} is not valid JSON ({e}): fix or remove it") from None


def to_hf(checkpoint: str, out: str, dtype: str = "float32", P: int | None = None,
          max_shard_size: str | int = "2GB") -> list[str]:
    """Export a checkpoint of this project; returns the directories written.

    A single-P checkpoint (or ``P`` given) is written to ``out``. A multi-P checkpoint
    (``{"backbone", "sets"}``) without ``P`` gives one directory per P: ``out/P1``, ``out/P2``,
    ... (each a complete Hugging Face model over the shared backbone).
    """
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype {dtype!r} is not supported: choose float32 or bfloat16")
    hf.parse_size(max_shard_size)  # fail on a bad size before reading anything
    checkpoint, out = os.path.abspath(checkpoint), os.path.abspath(out)
    if os.path.exists(out):
        raise UserError(f"{out} already exists: choose a new output directory or remove it")
    if loading.kind_of(checkpoint) == "hf":
        raise UserError(f"{checkpoint} is a Hugging Face directory already: to-hf exports checkpoints of this "
                        f"project (a training workdir, or a saved model with {MODEL_CONFIG})")
    ckpt = loading.read(checkpoint)
    gen = _generation_config(checkpoint)
    tok = loading.tokenizer_of(checkpoint) or "bytes"
    if tok != "bytes" and not os.path.isfile(tok):
        print(f"note: the checkpoint's tokenizer {tok} is not there: the export has no tokenizer files",
              file=sys.stderr)
        tok = None
    targets = [(p, os.path.join(out, f"P{p}")) for p in ckpt.available_P] if P is None and ckpt.is_multi \
        else [(P, out)]
    written = []
    try:
        for p, dst in targets:
            cfg_p, single = ckpt.at(p)
            written.append(hf.save_hf(dst, cfg_p, single, dtype=dtype, max_shard_size=max_shard_size,
                                      tokenizer=tok, generation_config=gen))
    except BaseException:
        if len(targets) > 1:  # all P or none
            shutil.rmtree(out, ignore_errors=True)
        raise
    return written


def from_hf(hf_dir: str, out: str, P: int | None = None, seed: int = 0) -> str:
    """HF directory -> project checkpoint. ``P`` > 1 on a P = 1 source adds a fresh prefix and gate."""
    hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
    cfg, params = hf.load_hf(hf_dir)
    if P is not None and int(P) != cfg.parscale_n:
        if cfg.parscale_n != 1:
            raise UserError(f"{hf_dir} is a P={cfg.parscale_n} ParScale model: --P {P} can only add streams "
                            f"to a P=1 (qwen2) source; leave --P out")
        if int(P) < 1:
            raise UserError(f"--P {P} is invalid: P must be >= 1")
        cfg = cfg.replace(parscale_n=int(P))
        # Jitted: one compile instead of op-by-op init, and the unused fresh backbone is never built.
        init = jax.jit(stage2_init, static_argnums=1)
        params = jax.tree.map(np.asarray, init(params["backbone"], cfg, jax.random.PRNGKey(seed)))
    extra: dict[str, Any] = {"source": {"format": "huggingface", "path": hf_dir}}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        extra["tokenizer"] = "tokenizer.json"
    with atomic_dir(out) as staging:
        write_params(staging, cfg, params, extra=extra)
        hf.copy_tokenizer(hf_dir, staging)
        gp = os.path.join(hf_dir, "generation_config.json")
        if os.path.isfile(gp):
            shutil.copy2(gp, os.path.join(staging, "generation_config.json"))
    return out


# ---- command line ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.convert",
                                 description="Convert checkpoints to and from Hugging Face (qwen2 / qwen2_parscale).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="project checkpoint -> Hugging Face directory")
    a.add_argument("--checkpoint", required=True, help="a training workdir, one of its step dirs, or a saved model (multi-P included)")
    a.add_argument("--out", required=True, help="new output directory")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a.add_argument("--P", type=int, default=None, help="export only this P (default: every P of a multi-P checkpoint; else its own P)")
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
