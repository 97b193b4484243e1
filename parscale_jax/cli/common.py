"""What the eval and generate command lines share: the model flags and loading the model."""
from __future__ import annotations

import argparse
import os
import sys

import jax
from absl import logging as absl_logging

from parscale_jax import data, loading
from parscale_jax import model as M
from parscale_jax.errors import UserError


def add_model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir / step dir / saved model dir, or a Hugging Face dir (qwen2, qwen2_parscale)")
    ap.add_argument("--P", type=int, default=None,
                    help="streams to run at (a multi-P checkpoint holds several; default: the checkpoint's own P, "
                         "else the largest it holds)")
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes' or a tokenizer.json (default: the checkpoint's tokenizer.json if any, else the "
                         "one its metadata or training run names, else bytes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")


def run_data(args) -> dict:
    """The data section of the training config saved with a training checkpoint ({} otherwise)."""
    if not hasattr(args, "_run_data"):
        run = loading.run_config(args.checkpoint) or {}
        args._run_data = run.get("data") if isinstance(run.get("data"), dict) else {}
    return args._run_data


def tokenizer_known(args) -> bool:
    """Whether the tokenizer is known (given, or recorded with the checkpoint or its training run)
    rather than the byte tokenizer taken as a fallback."""
    return bool(args.tokenizer or loading.tokenizer_of(args.checkpoint) or run_data(args).get("tokenizer"))


def load_model(args):
    """(model, params on the device, cfg, tokenizer, tokenizer spec) for the checkpoint at the requested P."""
    if not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist: pass --checkpoint a model directory "
                        f"(a training workdir, a step dir, a saved model or a Hugging Face directory)")
    if args.P is not None and args.P < 1:
        raise UserError(f"--P {args.P} is invalid: P is a positive number of streams")
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs harmless restore warnings through absl
    cfg, params = loading.load(args.checkpoint, args.P)
    spec = args.tokenizer or loading.tokenizer_of(args.checkpoint) or "bytes"
    tok = data.load_tokenizer(spec)
    if tok.vocab_size > cfg.vocab_size:
        raise UserError(f"tokenizer {spec} has {tok.vocab_size} ids but the model only {cfg.vocab_size}: "
                        f"pass the --tokenizer the model was trained with")
    model = M.make_model(cfg, dtype=args.dtype)
    params = jax.device_put(params)
    n = M.count_params(params)
    print(f"model: {args.checkpoint}  P={cfg.parscale_n}  {n / 1e6:.2f}M params  L={cfg.num_hidden_layers} "
          f"H={cfg.hidden_size}  tokenizer={spec}  devices={jax.device_count()}x{jax.devices()[0].platform}",
          file=sys.stderr)
    return model, params, cfg, tok, spec
