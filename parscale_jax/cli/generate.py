"""``eval.py generate``: KV-cached sampling from a checkpoint, printed as it comes."""
from __future__ import annotations

import argparse
import sys
import time

from parscale_jax import decode as D
from parscale_jax.cli.common import add_model_args, load_model
from parscale_jax.errors import UserError
from parscale_jax.fileio import write_json
from parscale_jax.metrics import Progress


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py generate", description="Sample from a checkpoint (KV-cached).")
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", default=None, help="one prompt per line, generated as one batch")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16, help="decode steps per compiled chunk (printed as they come)")
    ap.add_argument("--serve-dtype", default="auto", choices=("auto", *D.SERVE_DTYPES),
                    help="the weights' dtype as served, cast once when loaded (auto: the compute --dtype; "
                         "float32 with --dtype bfloat16 casts every weight at every step)")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
    ap.add_argument("--output", default=None, help="write the generations as JSON here")
    return ap


class Streamer:
    """Print one row's text as chunks arrive (holding back an incomplete UTF-8 character)."""

    def __init__(self, tok, eos_id):
        self.tok, self.eos_id, self.ids, self.shown, self.stopped = tok, eos_id, [], "", False

    def __call__(self, toks):
        for t in toks[0].tolist():
            if self.stopped:
                return
            if t == self.eos_id:
                self.stopped = True
                break
            self.ids.append(t)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd") and not self.stopped:
            text = text[:-1]
        if text.startswith(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8", errors="replace") as f:
                prompts += [ln.rstrip("\n").replace("\\n", "\n") for ln in f if ln.strip()]
        except OSError as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file} ({e.strerror}): check the path") from None
    if not prompts:
        raise UserError("no prompt: pass --prompt TEXT or --prompt-file FILE (one prompt per line)")
    if args.chunk < 1:
        raise UserError(f"--chunk {args.chunk} is invalid: use a positive integer")
    return prompts


def _print(prompts, texts, stream) -> None:
    if stream:
        rest = texts[0][len(stream.shown):] if texts[0].startswith(stream.shown) else ""
        sys.stdout.write(rest + "\n")
    else:
        for i, (p, t) in enumerate(zip(prompts, texts)):
            print(f"=== {i} ===\n{p}{t}")


def run(args) -> int:
    prompts = _prompts(args)
    sampling = D.Sampling(args.temperature, args.top_k, args.top_p)
    model, params, cfg, tok, _ = load_model(args)
    ids = [[int(t) for t in tok.encode(p)] for p in prompts]
    eos = None if args.no_stop else tok.eos_id
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else (tok.eos_id or 0)
    gen = D.Generator(model, params, eos_id=eos, pad_id=pad, chunk=args.chunk, serve_dtype=args.serve_dtype)
    del params  # the generator holds the weights as served
    n_new = gen.check_lengths(ids, args.max_new_tokens)
    if n_new < args.max_new_tokens:
        print(f"note: generating at most {n_new} tokens (the model has {cfg.max_position_embeddings} positions)",
              file=sys.stderr)
    stream = Streamer(tok, eos) if len(prompts) == 1 else None
    if stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()
    progress = Progress(n_new * len(prompts), unit="tok", desc="generating", enabled=stream is None,
                        min_interval=10.0)
    done = 0
    t0 = time.perf_counter()
    progress.begin()

    def on_chunk(toks):
        nonlocal done
        if stream:
            stream(toks)
        done += toks.size
        progress.update(done)

    out = gen.generate(ids, args.max_new_tokens, sampling, seed=args.seed, on_chunk=on_chunk)
    progress.end()
    texts = [tok.decode([t for t in row.tolist() if t != eos]) for row in out]
    _print(prompts, texts, stream)
    n, dt = sum(len(r) for r in out), time.perf_counter() - t0
    print(f"{n} new tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s incl. compile)", file=sys.stderr)
    if args.output:
        write_json(args.output, {"P": cfg.parscale_n, "temperature": args.temperature, "top_k": args.top_k,
                                 "top_p": args.top_p, "seed": args.seed,
                                 "generations": [{"prompt": p, "text": t, "tokens": r.tolist()}
                                                 for p, t, r in zip(prompts, texts, out)]})
    return 0
