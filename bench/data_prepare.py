"""``prepare`` throughput: MiB/s of text with 1 and 2 workers, and a large ``.npy`` converted vs a plain copy.

    .venv/bin/python bench/data_prepare.py [--quick] [--npy-tokens N] [--repeats R] [--workdir DIR]

1. Text: the standard library's ``*.py`` files (``--input stdlib``, ~30 MiB) with the byte
   tokenizer, and a subset (~6 MiB) with a byte-level BPE ``tokenizer.json`` trained here
   (the case where worker processes pay off); 1 and 2 workers, timed round-robin, medians.
   MiB/s counts input bytes; the time includes starting the worker processes.
2. ``.npy``: a sparse uint16 array of ``--npy-tokens`` ids (default 4e9 = 8 GB on disk when
   copied) converted with ``prepare`` (default shard size and held-out fraction, so the cut shard
   is rewritten too) against ``cp --sparse=never`` of the same file, and against the copy made
   durable (``cp`` + ``sync``: prepare fsyncs every shard). Both write every byte.

Results: ``bench/results/data_prepare.{json,md}`` (``--quick``: ``data_prepare_quick.*``, 200M tokens).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.data import shards as S
from parscale_jax.data.prepare import plan, prepare
from parscale_jax.data.sources import stdlib_root


def _cpu(who=resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _timed_prepare(inputs, out, tokenizer, workers, **kw) -> tuple[float, S.Manifest, float]:
    """(wall s, manifest, CPU s of this process's threads: in-process runs only)."""
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), _cpu()
    m = prepare(inputs, out, tokenizer, workers=workers, progress=False, **kw)
    dt, cpu = time.perf_counter() - t, _cpu() - c
    shutil.rmtree(out, ignore_errors=True)
    return dt, m, cpu


def _bpe(workdir: str, sample: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train(sample, trainer=trainer)
    path = os.path.join(workdir, "bpe4096", "tokenizer.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tk.save(path)
    return path


def bench_text(workdir: str, repeats: int, quick: bool) -> list[dict]:
    files = sorted(glob.glob(os.path.join(stdlib_root(), "*.py")))
    subset, size = [], 0
    for f in files:
        if size > (1 << 20 if quick else 6 << 20):
            break
        subset.append(f)
        size += os.path.getsize(f)
    cases = [("stdlib", "bytes", ["stdlib"])]
    cases.append((f"{len(subset)} stdlib files", _bpe(workdir, subset[:40]), subset))
    rows = []
    for name, tok, inputs in cases:
        nbytes = sum(it.nbytes for it in plan(inputs))
        times: dict[int, list[float]] = {1: [], 2: []}
        for r in range(repeats):
            for w in (1, 2):
                dt, m, _ = _timed_prepare(inputs, os.path.join(workdir, "text-out"), tok, w)
                times[w].append(dt)
                B.log(f"{name} {os.path.basename(os.path.dirname(tok)) if tok != 'bytes' else tok} workers={w}: "
                      f"{dt:.2f} s")
        tokens = sum(int(s["tokens"]) for s in m.shards)
        for w in (1, 2):
            med = statistics.median(times[w])
            rows.append({"input": name, "tokenizer": "bytes" if tok == "bytes" else "BPE 4096 (tokenizer.json)",
                         "workers": w, "input_MiB": nbytes / 2**20, "tokens": tokens, "seconds": times[w],
                         "median_s": med, "MiB_per_s": nbytes / 2**20 / med, "tokens_per_s": tokens / med})
    return rows


def _cp(src: str, dst: str, durable: bool) -> tuple[float, float]:
    """(wall s, CPU s of cp [+ sync])."""
    if os.path.exists(dst):
        os.remove(dst)
    t, c = time.perf_counter(), _cpu(resource.RUSAGE_CHILDREN)
    subprocess.run(["cp", "--sparse=never", src, dst], check=True)
    if durable:
        subprocess.run(["sync", dst], check=True)
    dt, cpu = time.perf_counter() - t, _cpu(resource.RUSAGE_CHILDREN) - c
    os.remove(dst)
    return dt, cpu


def bench_npy(workdir: str, n_tokens: int, repeats: int) -> dict:
    src = os.path.join(workdir, f"ids-{n_tokens}.npy")
    if not os.path.exists(src):  # sparse: the header, then a hole up to the last byte
        a = np.lib.format.open_memmap(src, mode="w+", dtype=np.uint16, shape=(n_tokens,))
        a[-1] = 7
        a.flush()
        del a
    need = 2 * os.path.getsize(src) + (1 << 30)
    if shutil.disk_usage(workdir).free < need:
        raise SystemExit(f"not enough disk in {workdir} for {n_tokens} tokens: pass a smaller --npy-tokens")
    runs: dict[str, list[float]] = {"cp": [], "cp + sync": [], "prepare": []}
    cpu: dict[str, list[float]] = {"cp": [], "cp + sync": [], "prepare": []}
    out = os.path.join(workdir, "npy-out")
    for r in range(repeats):
        subprocess.run(["sync"], check=True)
        for name, durable in (("cp", False), ("cp + sync", True)):
            dt, c = _cp(src, os.path.join(workdir, "copy.npy"), durable=durable)
            runs[name].append(dt)
            cpu[name].append(c)
            subprocess.run(["sync"], check=True)
        dt, m, c = _timed_prepare([src], out, "bytes", 1)
        runs["prepare"].append(dt)
        cpu["prepare"].append(c)
        B.log(f"npy {n_tokens:,} tokens, repeat {r}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in runs.items()))
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"tokens": n_tokens, "file_GiB": os.path.getsize(src) / 2**30, "sparse_source": True,
            "shards": len(m.shards), "seconds": runs, "median_s": med, "cpu_seconds": cpu,
            "ratio_vs_cp": med["prepare"] / med["cp"], "ratio_vs_cp_sync": med["prepare"] / med["cp + sync"],
            "pair_ratios_vs_cp": [p / c for p, c in zip(runs["prepare"], runs["cp"])]}


def _part(load_start: list) -> dict:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git_commit": B._git_commit(),
            "load_average_start": load_start, "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "niceness": os.nice(0)}


def _previous(name: str) -> dict:
    try:
        with open(os.path.join(B.RESULTS, name + ".json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (results go to data_prepare_quick.*)")
    ap.add_argument("--npy-tokens", type=float, default=None, help="ids in the .npy (default 4e9; 2e8 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="round-robin repeats (default 3 for text, 2 for .npy)")
    ap.add_argument("--workdir", default=None, help="scratch folder (default bench/.data_prepare; needs 2x the .npy)")
    ap.add_argument("--skip", choices=["text", "npy"], default=None, help="leave one part out")
    args = ap.parse_args()
    workdir = os.path.abspath(args.workdir or os.path.join(B.ROOT, "bench", ".data_prepare"))
    os.makedirs(workdir, exist_ok=True)
    n_tokens = int(args.npy_tokens or (2e8 if args.quick else 4e9))
    name = "data_prepare_quick" if args.quick else "data_prepare"
    old = _previous(name) if args.skip else {}   # a part left out keeps its previous results
    parts = dict(old.get("parts") or {k: {"date": old["env"]["date"], "git_commit": old["env"]["git_commit"],
                                          "load_average_start": old.get("load_average_start"),
                                          "load_average_end": old["env"]["load_average_1_5_15"]}
                                      for k in ("text", "npy") if old.get(k)})
    text, npy = old.get("text", []), old.get("npy")
    if args.skip != "text":
        load0 = [round(x, 2) for x in os.getloadavg()]
        text = bench_text(workdir, args.repeats or (1 if args.quick else 3), args.quick)
        parts["text"] = _part(load0)
    if args.skip != "npy":
        load0 = [round(x, 2) for x in os.getloadavg()]
        npy = bench_npy(workdir, n_tokens, args.repeats or (1 if args.quick else 2))
        parts["npy"] = _part(load0)
    body = ["## Text (input MiB/s, median of round-robin runs)\n", B.md_table(
        ["input", "tokenizer", "workers", "input MiB", "tokens", "median s", "MiB/s", "tokens/s"],
        [[r["input"], r["tokenizer"], r["workers"], f"{r['input_MiB']:.1f}", f"{r['tokens']:,}",
          f"{r['median_s']:.2f}", f"{r['MiB_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}"] for r in text], "llrrrrrr")]
    if npy:
        body += [f"\n## .npy conversion: {npy['tokens']:,} uint16 ids ({npy['file_GiB']:.2f} GiB, sparse source) "
                 f"into {npy['shards']} shards\n",
                 B.md_table(["", "median s", "runs (s)", "CPU s (user + sys)"],
                            [[k, f"{v:.1f}", ", ".join(f"{x:.1f}" for x in npy["seconds"][k]),
                              ", ".join(f"{x:.1f}" for x in npy.get("cpu_seconds", {}).get(k, []))]
                             for k, v in npy["median_s"].items()], "lrll"),
                 f"\nprepare / cp = **{npy['ratio_vs_cp']:.2f}x**; prepare / (cp + sync) = "
                 f"**{npy['ratio_vs_cp_sync']:.2f}x** (prepare fsyncs every shard; cp alone leaves dirty pages). "
                 f"Each round's prepare / cp: "
                 f"{', '.join(f'{r:.2f}x' for r in npy.get('pair_ratios_vs_cp', []))}.\n"]
    body.append("\nEach part's run (shared 2-core machine; compare ratios within one part): " + "; ".join(
        f"{k}: {v['date']}, commit {v['git_commit']}, load average {v['load_average_start']} -> "
        f"{v['load_average_end']}, niceness {v.get('niceness', 10)}" for k, v in parts.items()))
    paths = B.write_results(name, {"text": text, "npy": npy, "parts": parts}, "\n".join(body),
                            "prepare throughput (python -m parscale_jax.data prepare)")
    B.log("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
