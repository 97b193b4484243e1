"""lm-eval loglikelihood requests/s: the JAX adapter (``parscale-jax``) vs lm-eval's ``hf`` backend on
the self-contained Hugging Face export of the same model, on this CPU, in one run.

    .venv/bin/python bench/harness.py            # small backbone, P in 1 2 4, 32 nextline records
    .venv/bin/python bench/harness.py --quick    # tiny backbone, P in 1 4, 16 records, 2 rounds

Requests: the first ``--records`` records of ``tasks/nextline.jsonl`` x 4 choices (lm-eval
``Instance`` objects, context + choice as the task directory of the builder asks them), scored by
``lm.loglikelihood`` of each backend at batch ``--batch-size`` (8), float32, ``max_length``
``--max-length`` (contexts longer are cut from the left by both). Models: random init of the
backbone (speed does not depend on the weights), saved with ``checkpoint.save_params`` and
exported with ``convert.to_hf`` (``auto_map`` + the project's modeling files for P > 1; P = 1 is
plain ``qwen2``). Both backends are warmed up (the JAX adapter compiles one program per length
bucket), then timed round-robin, ``--rounds`` times each; medians reported. The largest
|difference| of the log-likelihoods between the two backends is reported as a sanity check (the
parity test is tests/test_export_hf.py). Writes ``bench/results/harness.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax.errors import cli_entry


def requests(path: str, n_records: int):
    from lm_eval.api.instance import Instance

    out = []
    with open(path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()][:n_records]
    for i, r in enumerate(recs):
        for j, c in enumerate(r["choices"]):
            out.append(Instance(request_type="loglikelihood", doc=r, arguments=(r["context"], c), idx=j,
                                metadata=("nextline", i, 1)))
    return out


def build(backbone: str, P: int, max_length: int, root: str):
    """(checkpoint dir, export dir) of a random model of ``backbone`` at ``P``."""
    import jax

    from parscale_jax import checkpoint, convert
    from parscale_jax import model as M
    from parscale_jax.config import preset

    over, _, _ = B.BACKBONES[backbone]
    cfg = preset("tiny", **over, parscale_n=P, max_position_embeddings=max_length)
    params = M.init_params(M.make_model(cfg), jax.random.PRNGKey(P))
    ckpt, export = os.path.join(root, f"{backbone}-P{P}"), os.path.join(root, f"{backbone}-P{P}-hf")
    checkpoint.save_params(ckpt, cfg, jax.device_get(params))
    convert.to_hf(ckpt, export)
    return ckpt, export


def timed(lm, reqs) -> tuple[float, list]:
    t = time.perf_counter()
    out = lm.loglikelihood(reqs, disable_tqdm=True)
    return time.perf_counter() - t, out


def run(args) -> dict:
    import logging

    import torch
    from lm_eval.models.huggingface import HFLM

    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)  # one truncation warning per request

    from parscale_jax.harness import JaxLM

    torch.set_num_threads(args.threads)
    reqs = requests(args.tasks, args.records)
    root = tempfile.mkdtemp(prefix="bench-harness-")
    lms = {}
    for P in args.P:
        ckpt, export = build(args.backbone, P, args.max_length, root)
        lms[(P, "jax")] = JaxLM(checkpoint=ckpt, batch_size=args.batch_size, max_length=args.max_length)
        lms[(P, "hf")] = HFLM(pretrained=export, trust_remote_code=True, batch_size=args.batch_size, device="cpu",
                              dtype="float32", max_length=args.max_length)
    times = {k: [] for k in lms}
    outs = {}
    for k, lm in lms.items():  # warm-up: compiles, caches
        B.log(f"warm-up {k}")
        t, outs[k] = timed(lm, reqs)
        B.log(f"  {t:.1f} s")
    for r in range(args.rounds):
        for k, lm in lms.items():
            t, _ = timed(lm, reqs)
            times[k].append(t)
            B.log(f"round {r} {k}: {len(reqs) / t:.1f} requests/s")
    rows = []
    for P in args.P:
        med = {b: statistics.median(times[(P, b)]) for b in ("jax", "hf")}
        diff = max(abs(a[0] - b[0]) for a, b in zip(outs[(P, "jax")], outs[(P, "hf")]))
        greedy_same = sum(a[1] == b[1] for a, b in zip(outs[(P, "jax")], outs[(P, "hf")]))
        rows.append({"P": P, "requests": len(reqs), "jax_s": med["jax"], "hf_s": med["hf"],
                     "jax_req_per_s": len(reqs) / med["jax"], "hf_req_per_s": len(reqs) / med["hf"],
                     "jax_over_hf": med["hf"] / med["jax"], "max_abs_diff_loglik": diff,
                     "greedy_flags_equal": f"{greedy_same}/{len(reqs)}", "times": {b: times[(P, b)] for b in med}})
    return {"settings": {k: v for k, v in vars(args).items()}, "rows": rows}


def main_body(args) -> int:
    res = run(args)
    res["env"] = B.environment(["torch", "transformers", "lm_eval"])
    name = "harness_quick" if args.quick else "harness"
    body = B.md_table(["P", "requests", "parscale-jax req/s", "hf req/s", "jax / hf", "max |Δ loglik|",
                       "greedy flags equal"],
                      [[r["P"], r["requests"], B.fmt(r["jax_req_per_s"], 1), B.fmt(r["hf_req_per_s"], 1),
                        f"{r['jax_over_hf']:.2f}x", f"{r['max_abs_diff_loglik']:.1e}", r["greedy_flags_equal"]]
                       for r in res["rows"]])
    s = res["settings"]
    body = (f"Backbone `{s['backbone']}`, batch {s['batch_size']}, max_length {s['max_length']}, "
            f"{s['records']} nextline records x 4 choices, float32, torch threads {s['threads']}; medians of "
            f"{s['rounds']} round-robin rounds after a warm-up.\n\n" + body)
    for p in B.write_results(name, res, body, "lm-eval loglikelihood: parscale-jax vs the hf backend"):
        print(f"wrote {p}")
    print(body)
    return 0


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="small", choices=sorted(B.BACKBONES))
    ap.add_argument("--P", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--records", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--tasks", default=os.path.join(B.ROOT, "tasks", "nextline.jsonl"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.backbone, args.P, args.records, args.rounds = "tiny", [1, 4], 16, 2
    return main_body(args)


if __name__ == "__main__":
    sys.exit(main())
