"""Evaluate or sample a ParScale checkpoint (this project's orbax checkpoints or Hugging Face dirs).

  held-out loss   python eval.py --checkpoint PATH [--data PATH] [--seq-len L] [--batch-size B] [--P n]
                                 [--output results.json]
  choice tasks    python eval.py --checkpoint PATH --tasks tasks/nextline.jsonl [--P n]
  generation      python eval.py generate --checkpoint PATH --prompt TEXT [--prompt-file F]
                                 [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p p] [--seed S]

Loss: the token stream (by default the training pipeline's held-out split of --data) is cut
into consecutive windows of L tokens, each scored on its L-1 next-token targets
(``evaluate.heldout_loss``, the same function the training loop calls). Errors are one line
(``error: ...``) with exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parscale_jax.errors import UserError, cli_entry


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir / step dir / saved model dir, or a Hugging Face dir (qwen2, qwen2_parscale)")
    ap.add_argument("--P", type=int, default=None, help="streams to run at (a multi-P checkpoint holds several)")
    ap.add_argument("--tokenizer", default=None,
                    help="'bytes' or a tokenizer.json (default: the checkpoint's tokenizer.json if any, else the "
                         "training run's data.tokenizer, else bytes)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")


def _loss_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py", description="Held-out loss and choice-task accuracy.",
                                 epilog="Generation: eval.py generate --help")
    _common(ap)
    ap.add_argument("--data", default=None,
                    help="'stdlib', or a text file / dir / glob, JSONL, .npy token ids (default: the training "
                         "run's data.source for a training checkpoint, else stdlib, the default corpus)")
    ap.add_argument("--split", default="heldout", choices=["heldout", "all"],
                    help="heldout (default): the training pipeline's held-out split of --data, what the "
                         "training loop evaluates; all: every file of --data")
    ap.add_argument("--heldout-fraction", type=float, default=None,
                    help="data.heldout_fraction of the split (default: the training run's, else 0.05)")
    ap.add_argument("--format", default=None, choices=["auto", "text", "jsonl", "npy"],
                    help="data format (default: the training run's when --data is not given, else auto)")
    ap.add_argument("--text-field", default=None, help="JSONL text field (default: the run's, else 'text')")
    ap.add_argument("--seq-len", type=int, default=None,
                    help="window length L, L-1 targets per window (default: the run's data.seq_len, else 256)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    ap.add_argument("--tasks", nargs="+", default=None, help="choice-task JSONL file(s): context, choices, answer")
    ap.add_argument("--output", default=None, help="write the results as JSON here")
    return ap


def _generate_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eval.py generate", description="Sample from a checkpoint (KV-cached).")
    _common(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    ap.add_argument("--prompt-file", default=None, help="one prompt per line, generated as one batch")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling; 1 = off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=16, help="decode steps per compiled chunk (printed as they come)")
    ap.add_argument("--no-stop", action="store_true", help="do not stop at EOS")
    ap.add_argument("--output", default=None, help="write the generations as JSON here")
    return ap


# ---- shared loading ------------------------------------------------------------------------
def _run_data(args) -> dict:
    """The data section of the training config saved with a training checkpoint ({} otherwise)."""
    if not hasattr(args, "_run_data"):
        from parscale_jax.evaluate import run_config

        run = run_config(args.checkpoint) or {}
        args._run_data = run.get("data") if isinstance(run.get("data"), dict) else {}
    return args._run_data


def _load(args):
    """(model, params, cfg, tokenizer) for the checkpoint at the requested P."""
    if not os.path.exists(args.checkpoint):
        raise UserError(f"checkpoint {args.checkpoint} does not exist: pass --checkpoint a model directory "
                        f"(a training workdir, a step dir, a saved model or a Hugging Face directory)")
    if args.P is not None and args.P < 1:
        raise UserError(f"--P {args.P} is invalid: P is a positive number of streams")
    import jax

    from parscale_jax import data
    from parscale_jax import model as M
    from parscale_jax.evaluate import load_checkpoint

    try:  # orbax logs harmless restore warnings through absl; keep the terminal to our lines
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    cfg, params = load_checkpoint(args.checkpoint, args.P)
    spec = args.tokenizer
    if spec is None:
        hf_tok = os.path.join(args.checkpoint, "tokenizer.json")
        spec = hf_tok if os.path.isfile(hf_tok) else _run_data(args).get("tokenizer", "bytes")
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


class _Progress:
    """"name: i/n sequences, seq/s, ETA" on stderr: redrawn in place on a terminal, else a line
    every 10 seconds."""

    def __init__(self, name: str):
        self.name, self.t0, self.last, self.tty = name, time.perf_counter(), 0.0, sys.stderr.isatty()
        self.drawn = False

    def __call__(self, i: int, n: int) -> None:
        now = time.perf_counter()
        if i < n and now - self.last < (0.2 if self.tty else 10.0):
            return
        self.last = now
        el = now - self.t0
        msg = (f"{self.name}: {i}/{n} sequences  {i / max(el, 1e-9):.1f} seq/s  "
               f"ETA {el / max(i, 1) * (n - i):.0f}s")
        print(("\r" + msg) if self.tty else msg, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        self.drawn = True

    def close(self) -> None:
        if self.tty and self.drawn:
            print(file=sys.stderr)


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---- loss and tasks ------------------------------------------------------------------------
def _eval_tokens(args, source: str, spec: str, tok):
    """The token stream to score: the training pipeline's held-out split of ``source`` (what the
    training loop evaluates) or, with --split all, every file of it."""
    from parscale_jax import data

    dcfg = data.DataConfig(source=source, format=args.format, text_field=args.text_field, tokenizer=spec,
                           heldout_fraction=args.heldout_fraction)
    if args.split == "heldout":
        return data.heldout_tokens(dcfg, tok)[0]
    return data.all_tokens(dcfg, tok)[0]  # every unit, in the pipeline's order (each document + EOS)


def _data_defaults(args) -> list[str]:
    """Fill the unset data flags from the training run's config (a training checkpoint), else the
    pipeline's defaults; return the names of the flags taken from the run."""
    run = _run_data(args)
    taken = []

    def pick(name, run_key, default, when=True):
        if getattr(args, name) is None:
            if when and run.get(run_key) is not None:
                setattr(args, name, run[run_key])
                taken.append(f"{run_key}={run[run_key]}")
            else:
                setattr(args, name, default)

    same_source = args.data is None or args.data == run.get("source")
    pick("data", "source", None)
    pick("format", "format", "auto", same_source)
    pick("text_field", "text_field", "text", same_source)
    from parscale_jax.data import DataConfig

    pick("heldout_fraction", "heldout_fraction", DataConfig.heldout_fraction)
    pick("seq_len", "seq_len", 256)
    return taken


def run_eval(args) -> int:
    want_loss = args.data is not None or not args.tasks  # --tasks alone: no loss pass
    taken = _data_defaults(args)
    if args.seq_len < 2:
        raise UserError(f"--seq-len {args.seq_len} is invalid: a window needs at least 2 tokens")
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size} is invalid: use a positive integer")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"--max-windows {args.max_windows} is invalid: use a positive integer (omit it for all)")
    for t in args.tasks or []:
        if not os.path.isfile(t):
            raise UserError(f"task file {t} does not exist: pass --tasks a JSONL of context/choices/answer records")
    from parscale_jax import evaluate as E

    task_records = {}
    for t in args.tasks or []:
        name = os.path.splitext(os.path.basename(t))[0]
        while name in task_records:
            name += "_"
        task_records[name] = E.load_tasks(t)
    model, params, cfg, tok, spec = _load(args)
    results: dict = {"checkpoint": os.path.abspath(args.checkpoint), "P": cfg.parscale_n}
    rows = [("checkpoint", args.checkpoint), ("P", str(cfg.parscale_n))]

    if want_loss:
        if args.seq_len - 1 > cfg.max_position_embeddings:
            raise UserError(f"--seq-len {args.seq_len} needs {args.seq_len - 1} positions but the model has "
                            f"{cfg.max_position_embeddings}: use --seq-len <= {cfg.max_position_embeddings + 1}")
        source = args.data or "stdlib"
        if taken:
            print(f"data: from the training run's config: {', '.join(taken)}", file=sys.stderr)
        tokens = _eval_tokens(args, source, spec, tok)
        if len(tokens) < args.seq_len:
            raise UserError(f"the {args.split} data of {source} has {len(tokens)} tokens, fewer than one window "
                            f"of --seq-len {args.seq_len}: give more data or a smaller --seq-len")
        n_win = len(tokens) // args.seq_len
        if args.max_windows:
            n_win = min(n_win, args.max_windows)
        print(f"loss: {n_win} windows of {args.seq_len} tokens, batch {args.batch_size}", file=sys.stderr)
        t0 = time.perf_counter()
        res = E.heldout_loss(model, params, tokens, args.seq_len, args.batch_size, args.max_windows, tokenizer=tok)
        dt = time.perf_counter() - t0
        bpb = res["bits_per_byte"]
        results.update(loss=res["loss"], perplexity=res["perplexity"], bits_per_byte=bpb, tokens=res["tokens"],
                       windows=res["windows"], bytes=res["bytes"], seq_len=args.seq_len, data=source,
                       split=args.split, seconds=dt)
        rows += [("loss (nats/token)", f"{res['loss']:.4f}"), ("perplexity", f"{res['perplexity']:.3f}"),
                 ("bits per byte", "n/a" if bpb is None else f"{bpb:.4f}"),
                 ("tokens scored", f"{res['tokens']} ({res['windows']} windows of {args.seq_len})"),
                 ("tokens/s", f"{res['tokens'] / max(dt, 1e-9):.0f} (incl. compile)")]

    if task_records:
        results["tasks"] = {}
        for name, recs in task_records.items():
            progress = _Progress(name)
            r = E.choice_accuracy(model, params, recs, tok, args.batch_size, progress=progress)
            progress.close()
            r.pop("loglik")
            r["seconds"] = time.perf_counter() - progress.t0
            results["tasks"][name] = r
            rows += [(f"{name} acc", f"{r['acc']:.4f} +- {r['acc_stderr']:.4f} (n={r['n']})"),
                     (f"{name} acc_norm", f"{r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}")]

    print(_table(rows))
    if args.output:
        _write_json(args.output, results)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ---- generation ----------------------------------------------------------------------------
class _Streamer:
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


def run_generate(args) -> int:
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
    from parscale_jax import decode as D

    sampling = D.Sampling(args.temperature, args.top_k, args.top_p)
    model, params, cfg, tok, _ = _load(args)
    ids = [[int(t) for t in tok.encode(p)] for p in prompts]
    eos = None if args.no_stop else tok.eos_id
    pad = tok.pad_id if getattr(tok, "pad_id", None) is not None else (tok.eos_id or 0)
    gen = D.Generator(model, params, eos_id=eos, pad_id=pad, chunk=args.chunk)
    n_new = gen.check_lengths(ids, args.max_new_tokens)
    if n_new < args.max_new_tokens:
        print(f"note: generating at most {n_new} tokens (the model has {cfg.max_position_embeddings} positions)",
              file=sys.stderr)
    prog = D.Progress()
    stream = _Streamer(tok, eos) if len(prompts) == 1 else None
    if stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def on_chunk(toks):
        if stream:
            stream(toks)
        line = prog.update(toks)
        if not stream and sys.stderr.isatty():
            print(f"\rgenerating: {line}", end="", file=sys.stderr, flush=True)

    out = gen.generate(ids, args.max_new_tokens, sampling, seed=args.seed, on_chunk=on_chunk)
    texts = [tok.decode([t for t in row.tolist() if t != eos]) for row in out]
    if stream:
        rest = texts[0][len(stream.shown):] if texts[0].startswith(stream.shown) else ""
        sys.stdout.write(rest + "\n")
    else:
        if sys.stderr.isatty():
            print(file=sys.stderr)
        for i, (p, t) in enumerate(zip(prompts, texts)):
            print(f"=== {i} ===\n{p}{t}")
    n = sum(len(r) for r in out)
    dt = time.perf_counter() - prog.t0
    print(f"{n} new tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tok/s incl. compile)", file=sys.stderr)
    if args.output:
        _write_json(args.output, {"P": cfg.parscale_n, "temperature": args.temperature, "top_k": args.top_k,
                                  "top_p": args.top_p, "seed": args.seed,
                                  "generations": [{"prompt": p, "text": t, "tokens": r.tolist()}
                                                  for p, t, r in zip(prompts, texts, out)]})
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "generate":
        return run_generate(_generate_parser().parse_args(argv[1:]))
    if argv and argv[0] in ("loss", "tasks"):
        argv = argv[1:]
    return run_eval(_loss_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
