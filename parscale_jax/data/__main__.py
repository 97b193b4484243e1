"""``python -m parscale_jax.data`` (console script ``parscale-data``): ``prepare`` a dataset, ``inspect`` one.

    python -m parscale_jax.data prepare --input SRC [SRC ...] --out DIR --tokenizer bytes|PATH
    python -m parscale_jax.data inspect DIR [--json OUT] [--verify]
    python -m parscale_jax.data inspect --config CFG [key=value ...] [--batches N] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from parscale_jax.data import shards as S
from parscale_jax.data.prepare import DEFAULT_SHARD_TOKENS, prepare
from parscale_jax.data.preview import preview_config, print_preview
from parscale_jax.errors import UserError, cli_entry
from parscale_jax.fileio import write_json


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m parscale_jax.data",
                                 description="Prepare token shards once, offline; inspect a prepared dataset.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="sources -> token shards + manifest.json (resumes a killed run)")
    p.add_argument("--input", nargs="+", required=True, metavar="SRC",
                   help="files, directories, globs (quoted), 'stdlib'; text, .jsonl, .parquet, a `datasets` folder "
                        "saved with save_to_disk, .npy token ids")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or a killed run's to resume)")
    p.add_argument("--tokenizer", default="bytes", help="'bytes' or the path of a local tokenizer.json")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes (output is the same for any number)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--text-field", default="text", help="the text field of JSONL records / Parquet and Arrow rows")
    p.add_argument("--heldout-fraction", type=float, default=0.05,
                   help="held-out share of the units (hash of the unit key; tokens when a side would be empty)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    i = sub.add_parser("inspect", help="tokens, documents, shards and split sizes of a prepared dataset")
    i.add_argument("dir", metavar="DIR", nargs="?", help="a prepared dataset (a folder holding manifest.json)")
    i.add_argument("overrides", nargs="*", metavar="key=value", help="with --config: config overrides, as train.py")
    i.add_argument("--config", default=None, metavar="CFG",
                   help="a training config instead of DIR: each source's share of the first batches, a sample row")
    i.add_argument("--batches", type=int, default=8, help="with --config: global training batches to read")
    i.add_argument("--json", metavar="OUT", default=None, help="also write the figures as JSON here")
    i.add_argument("--verify", action="store_true", help="check every shard's size and sha256 (reads all of them)")
    return ap


def _print_summary(info: dict) -> None:
    print(f"{info['dir']}: {info['format']}, tokenizer {info['tokenizer']} (vocab {info['vocab_size']:,}, "
          f"largest id {info['max_id']:,}), {info['dtype']}")
    print(f"  {info['tokens']:,} tokens, {info['documents']:,} documents, {info['shards']} shards, "
          f"{info['bytes'] / 2**20:,.1f} MiB; fingerprint {info['fingerprint'][:16]}")
    for split, d in info["splits"].items():
        print(f"  {split:8s} {d['tokens']:>15,} tokens {d['documents']:>12,} documents {d['shards']:>5} shards")
    if "verified" in info:
        print(f"  verified: every shard's size and sha256 match the manifest")


def inspect_dir(args) -> dict:
    m = S.read_manifest(args.dir)
    info = S.summary(m)
    for split in S.SPLITS:  # the size check of every shard (cheap); --verify adds the sha256
        for s in m.shards_of(split):
            S.check_shard_file(f"{m.dir}/{s['file']}", int(s["bytes"]))
    if args.verify:
        S.verify(m)
        info["verified"] = True
    return info


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "prepare":
        t0 = time.perf_counter()
        m = prepare(args.input, args.out, args.tokenizer, workers=args.workers, shard_tokens=args.shard_tokens,
                    text_field=args.text_field, heldout_fraction=args.heldout_fraction, progress=not args.no_progress)
        info = S.summary(m)
        print(f"wrote {m.dir} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        _print_summary(info)
        return 0
    if args.config is not None or args.dir is None or "=" in args.dir:
        overrides = ([args.dir] if args.dir else []) + list(args.overrides)
        info = preview_config(args.config, overrides, args.batches)
        print_preview(info)
        if args.json:
            write_json(args.json, info)
        return 0
    if args.overrides:
        raise UserError(f"inspect DIR takes no overrides ({' '.join(args.overrides)}): pass them with --config CFG")
    info = inspect_dir(args)
    _print_summary(info)
    if args.json:
        write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
