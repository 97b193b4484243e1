"""``eval.py harness``: lm-evaluation-harness tasks on any checkpoint, run by the JAX model.

    python eval.py harness --checkpoint CKPT --tasks T1,T2 [--include-path DIR] [--num-fewshot K]
                           [--limit N] [--batch-size B] [--max-length L] [--P n] [--output OUT.json]

Tasks are lm-eval task names: the standard ones (their datasets are downloaded by ``datasets`` when
the network allows) or local ones from ``--include-path`` (YAML task directories, e.g. the one
``python -m parscale_jax.tasks build`` writes beside its JSONL; set HF_DATASETS_OFFLINE=1 to run
without a network). With several JAX processes (``jax.distributed``), process 0 runs the
harness and prints; the others serve its batches.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

from parscale_jax import harness
from parscale_jax.cli.common import add_model_args
from parscale_jax.errors import UserError
from parscale_jax.fileio import write_json
from parscale_jax.runner import maybe_initialize_distributed
from parscale_jax.train_config import DistributedConfig


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py harness", description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--tasks", required=True, help="comma-separated lm-eval task (or group) names")
    ap.add_argument("--include-path", default=None, help="a directory of lm-eval task YAML files (local tasks)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    ap.add_argument("--limit", type=float, default=None,
                    help="documents per task: N, or a fraction when below 1 (for quick checks)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: the model's positions)")
    ap.add_argument("--max-gen-toks", type=int, default=256, help="generation limit when a task sets none")
    ap.add_argument("--log-samples", action="store_true", help="keep every request and response in --output")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    d = ap.add_argument_group("several processes (jax.distributed; default: from the environment, else one)")
    d.add_argument("--coordinator-address", default=None, help="host:port of process 0")
    d.add_argument("--num-processes", type=int, default=None)
    d.add_argument("--process-id", type=int, default=None)
    return ap


def _check(args):
    """(task names, TaskManager) after the flags are checked."""
    from lm_eval.tasks import TaskManager  # lm-eval's task index walks its YAML tree: only when needed

    for flag in ("batch_size", "max_gen_toks"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)} is invalid: use a positive integer")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot {args.num_fewshot} is invalid: use 0 or more")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit} is invalid: use a positive number of documents (or a fraction < 1)")
    if args.include_path and not os.path.isdir(args.include_path):
        raise UserError(f"--include-path {args.include_path} is not a directory: pass a directory of lm-eval "
                        f"task YAML files")
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tm = TaskManager(include_path=args.include_path, include_defaults=False) if args.include_path else None
    if tm is None or not set(names) <= set(tm.all_tasks):  # indexing lm-eval's own ~15k tasks takes ~10 s
        tm = TaskManager(include_path=args.include_path)
    known = set(tm.all_tasks)
    unknown = [t for t in names if t not in known]
    if unknown or not names:
        where = f" in {args.include_path} or" if args.include_path else ""
        raise UserError(f"unknown lm-eval task {', '.join(unknown) or '(none given)'}: name tasks defined{where} in "
                        f"lm-eval (pass --include-path DIR for local task YAML files)")
    return names, tm


def run(args) -> int:
    maybe_initialize_distributed(DistributedConfig(coordinator_address=args.coordinator_address,
                                                   num_processes=args.num_processes, process_id=args.process_id))
    names, tm = _check(args)
    if args.checkpoint and not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist: pass --checkpoint a model directory")
    if args.P is not None and args.P < 1:
        raise UserError(f"--P {args.P} is invalid: P is a positive number of streams")
    lm = harness.JaxLM(checkpoint=args.checkpoint, P=args.P, batch_size=args.batch_size, max_length=args.max_length,
                       tokenizer=args.tokenizer, dtype=args.dtype, max_gen_toks=args.max_gen_toks)
    if jax.process_index() != 0:
        lm.serve()
        return 0
    import lm_eval
    from lm_eval.utils import make_table

    cfg = lm.model.cfg
    print(f"harness: {args.checkpoint}  P={cfg.parscale_n}  tasks={','.join(names)}  batch={lm.batch_size}  "
          f"max_length={lm.max_length}  buckets={list(lm.buckets)}  processes={jax.process_count()}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=args.num_fewshot, limit=args.limit,
                                      task_manager=tm, log_samples=args.log_samples)
    finally:
        lm.close()
    print(make_table(res))
    if args.output:
        out = {"checkpoint": os.path.abspath(args.checkpoint), "P": cfg.parscale_n, "seconds": time.perf_counter() - t0,
               **{k: res[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
                  if k in res}}
        if args.log_samples:
            out["samples"] = res.get("samples")
        write_json(args.output, json.loads(json.dumps(out, default=str)))
        print(f"wrote {args.output}", file=sys.stderr)
    return 0
