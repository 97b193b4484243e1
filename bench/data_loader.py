"""The training data loader: start-up time and resident memory against corpus size, and loader
throughput (issue 21).

* **Start-up** (10M .. 4B tokens): a fresh process per dataset, from launch (the parent's clock
  before ``Popen``) to the first global batch in hand (data only: nothing is compiled), and its
  resident memory then and after 50 batches. The large datasets are manifests over sparse
  ``.bin`` shards (the loader reads only the manifest and the pages of the records it draws; a
  sparse file costs no disk), built by this script in ``--work``.
* **Throughput**: tokens/s of training batches (seq 2048, global shuffle, one process) with 0, 1
  and 2 grain worker processes, on the prepared stdlib corpus (real bytes, in the page cache) and
  on the 4B-token sparse dataset (records spread over 8 GiB of shards).

    .venv/bin/python bench/data_loader.py [--work /tmp/parscale-data-bench] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax import data as D
from parscale_jax.data import shards as SH
from parscale_jax.errors import cli_entry
from parscale_jax.fileio import write_json

SIZES = {"10M": 10_000_000, "100M": 100_000_000, "1B": 1_000_000_000, "4B": 4_000_000_000}
SHARD = 1 << 28  # tokens per sparse shard (512 MiB of uint16)
SEQ = 2048


def sparse_dataset(folder: str, tokens: int) -> str:
    """A prepared dataset of ``tokens`` zero ids in sparse uint16 shards (manifest per the contract)."""
    if SH.is_dataset(folder):
        return folder
    os.makedirs(folder, exist_ok=True)
    shards = []
    for i, lo in enumerate(range(0, tokens, SHARD)):
        n = min(SHARD, tokens - lo)
        name = f"train-{i:05d}"
        with open(os.path.join(folder, name + ".bin"), "wb") as f:
            f.truncate(2 * n)
        with open(os.path.join(folder, name + ".idx"), "wb") as f:
            f.write(n.to_bytes(8, "little"))
        shards.append({"file": name + ".bin", "split": "train", "tokens": n, "documents": 1, "max_id": 258,
                       "bytes": 2 * n, "sha256": "0" * 64, "doc_ends": name + ".idx"})
    tok = {"spec": "bytes", "fingerprint": "bytes-v1", "vocab_size": 259, "eos_id": 258, "bos_id": 257, "pad_id": 256}
    write_json(os.path.join(folder, SH.MANIFEST), {
        "format": SH.FORMAT, "version": SH.VERSION, "tokenizer": tok, "dtype": "uint16", "heldout_fraction": 0.0,
        "split_rule": SH.SPLIT_RULE, "shards": shards,
        "splits": {"train": {"tokens": tokens, "documents": len(shards)}, "heldout": {"tokens": 0, "documents": 0}},
        "fingerprint": SH.fingerprint(tok, "uint16", shards), "inputs": ["sparse"], "created": "bench"})
    return folder


def child_startup(folder: str, batch: int) -> None:
    """In a fresh process: open the dataset, take the first batch, then 50 more; print the times and RSS."""
    import grain  # noqa: F401  (it imports jax: a cost of every training process, not of the data; timed apart)

    t_import = time.time()
    it = D.train_iterator(D.DataConfig(source=folder, seq_len=SEQ, prefetch=2), None, batch)
    next(it)
    t_first = time.time()
    rss_first = B.rss_bytes()
    for _ in range(50):
        next(it)
    rss_50 = B.rss_bytes()
    it.close()
    print(json.dumps({"t_import_done": t_import, "t_first": t_first, "rss_first": rss_first, "rss_50": rss_50}))


def startup(folder: str, batch: int) -> dict:
    env = {**os.environ, "PYTHONPATH": B.ROOT}
    t0 = time.time()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder, "--batch", str(batch)],
                         env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return {"launch_to_first_batch_s": r["t_first"] - t0, "imports_s": r["t_import_done"] - t0,
            "open_to_first_batch_s": r["t_first"] - r["t_import_done"],
            "rss_first_mb": r["rss_first"] / 2**20, "rss_50_batches_mb": r["rss_50"] / 2**20}


def throughput(folder: str, workers: int, batch: int, n: int) -> float:
    it = D.train_iterator(D.DataConfig(source=folder, seq_len=SEQ, prefetch=4, worker_count=workers), None, batch)
    try:
        for _ in range(5):  # warm-up: workers spawned, first pages mapped
            next(it)
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        return n * batch * SEQ / (time.perf_counter() - t)
    finally:
        it.close()


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    x = [r["tokens"] for r in rows]
    ax[0].plot(x, [r["launch_to_first_batch_s"] for r in rows], "o-", label="launch -> first batch")
    ax[0].plot(x, [r["open_to_first_batch_s"] for r in rows], "s-", label="open -> first batch")
    ax[0].set(xscale="log", xlabel="corpus tokens", ylabel="seconds", title="start-up (data only)")
    ax[0].legend()
    ax[1].plot(x, [r["rss_first_mb"] for r in rows], "o-", label="at the first batch")
    ax[1].plot(x, [r["rss_50_batches_mb"] for r in rows], "s-", label="after 50 batches")
    ax[1].set(xscale="log", xlabel="corpus tokens", ylabel="MiB", title="resident memory")
    ax[1].legend()
    B.save_figure(fig, path)


def run(args) -> None:
    os.makedirs(args.work, exist_ok=True)
    sizes = {k: v for k, v in SIZES.items() if not args.quick or v <= 100_000_000}
    rows = []
    for name, n in sizes.items():
        folder = sparse_dataset(os.path.join(args.work, f"sparse-{name}"), n)
        r = {"dataset": f"sparse {name}", "tokens": n, **startup(folder, args.batch)}
        B.log(r)
        rows.append(r)
    stdlib = D.prepared_dir(D.DataConfig(), D.ByteTokenizer())
    big = os.path.join(args.work, f"sparse-{list(sizes)[-1]}")
    tput = []
    for label, folder in (("stdlib (29.7M tokens, real bytes)", stdlib), (f"sparse {list(sizes)[-1]}", big)):
        for w in (0, 1, 2):
            tps = throughput(folder, w, args.batch, args.batches)
            tput.append({"dataset": label, "workers": w, "tokens_per_s": tps})
            B.log(tput[-1])
    small, large = rows[0], rows[-1]
    summary = {"startup_ratio_large_vs_small": large["launch_to_first_batch_s"] / small["launch_to_first_batch_s"],
               "open_ratio_large_vs_small": large["open_to_first_batch_s"] / small["open_to_first_batch_s"],
               "rss_delta_mb": large["rss_50_batches_mb"] - small["rss_50_batches_mb"],
               "min_tokens_per_s": min(t["tokens_per_s"] for t in tput)}
    payload = {"startup": rows, "throughput": tput, "summary": summary, "seq_len": SEQ, "batch": args.batch,
               "uptime": os.getloadavg()}
    md = ["## Start-up and resident memory (fresh process per dataset; seq 2048, global batch "
          f"{args.batch}, prefetch 2)", "",
          B.md_table(["dataset", "tokens", "launch -> first batch (s)", "of which interpreter + imports (s)",
                      "open -> first batch (s)", "RSS at first batch (MiB)", "RSS after 50 batches (MiB)"],
                     [[r["dataset"], f"{r['tokens']:,}", B.fmt(r["launch_to_first_batch_s"]), B.fmt(r["imports_s"]),
                       B.fmt(r["open_to_first_batch_s"], 3), B.fmt(r["rss_first_mb"], 0),
                       B.fmt(r["rss_50_batches_mb"], 0)] for r in rows]), "",
          f"{large['dataset']} vs {small['dataset']}: launch -> first batch {summary['startup_ratio_large_vs_small']:.2f}x, "
          f"open -> first batch {summary['open_ratio_large_vs_small']:.2f}x, RSS after 50 batches "
          f"{summary['rss_delta_mb']:+.0f} MiB. The interpreter and imports (grain imports jax: every training "
          f"process pays it, whatever the data) dominate the launch time; on this shared 2-core machine they vary "
          f"with the load.", "",
          f"## Loader throughput (one process, seq 2048, global batch {args.batch}, shuffled, "
          f"{args.batches} batches after 5 of warm-up)", "",
          B.md_table(["dataset", "grain workers", "tokens/s"],
                     [[t["dataset"], t["workers"], f"{t['tokens_per_s']:,.0f}"] for t in tput]), "",
          f"Load average during the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", "",
          "![start-up and memory](data_loader.png)"]
    B.write_results("data_loader", payload, "\n".join(md), "Data loader: start-up, memory, throughput")
    plot(rows, os.path.join(B.RESULTS, "data_loader.png"))


@cli_entry
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/parscale-data-bench", help="where the sparse datasets are built")
    ap.add_argument("--batch", type=int, default=32, help="global batch (sequences)")
    ap.add_argument("--batches", type=int, default=100, help="batches timed for throughput")
    ap.add_argument("--quick", action="store_true", help="10M and 100M only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_startup(args.child, args.batch)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
