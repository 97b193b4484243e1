"""Make paper_cost_reference.json: the paper's cost numbers from the authors' own tools.

Not run by the tests (they read the JSON). It runs ParScale's ``cost_analysis.py``
(github.com/QwenLM/ParScale) on llm-analysis (github.com/cli99/llm-analysis; the PyPI release 0.2.2
predates the gated-MLP option that cost_analysis.py passes) in a separate interpreter that has
``fire`` installed, and keeps the script's ``total_memory`` (bytes) and ``total_latency`` (s) at
full precision for the six paper shapes x P x batch x input = output length::

    PYTHONPATH=/path/to/llm-analysis python tests/data/paper_cost_reference.py \
        /path/to/ParScale/cost_analysis.py tests/data/paper_cost_reference.json
"""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys

SHAPES = {"0.5b": (896, 4864), "0.7b": (1024, 5504), "1.1b": (1280, 6912), "1.6b": (1536, 8320),
          "2.8b": (2048, 11008), "4.4b": (2560, 13824)}


def run(script: str, H: int, I: int, P: int, batch: int, n: int) -> tuple[float, float]:
    sys.argv = [script, "--hidden_size", str(H), "--intermediate_size", str(I), "--P", str(P),
                "--batch_size", str(batch), "--input_length", str(n), "--output_length", str(n)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        g = runpy.run_path(script, run_name="__main__")
    return float(g["total_memory"]), float(g["total_latency"])


def main(script: str, out: str) -> None:
    import logging

    logging.disable(logging.CRITICAL)
    cols = ["hidden_size", "intermediate_size", "P", "batch", "length", "memory_bytes", "latency_s"]
    recs = [[H, I, P, b, n, *run(script, H, I, P, b, n)]
            for H, I in SHAPES.values() for P in (1, 2, 4, 8) for b in (1, 2, 4, 8) for n in (64, 128, 256, 512)]
    meta = {"made_by": "tests/data/paper_cost_reference.py",
            "tools": {"ParScale": "QwenLM/ParScale@cd6acb48ba6d3b1f9715785ff0d212751210177d cost_analysis.py",
                      "llm-analysis": "cli99/llm-analysis@d841e40aec8c84b9e76ba9cfbce67418adb172bd"},
            "setting": "cost_analysis.py defaults: a100-sxm-80gb, flops efficiency 0.7, HBM efficiency 0.9, "
                       "36 layers, 16/2 heads, vocabulary 151936, 48 prefix tokens; input = output = length"}
    with open(out, "w") as f:
        f.write(json.dumps({"meta": meta, "columns": cols})[:-1] + ', "records": [\n')
        f.write(",\n".join(json.dumps(r) for r in recs) + "\n]}\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
