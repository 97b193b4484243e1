"""bench/gpu_check.py --dry-run: the one-GPU check's code end to end on the CPU (tiny model, the
cuDNN attention path around JAX's XLA implementation), so it cannot rot before a GPU is lent."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check_quick.json").read_text())["rows"]
    assert [(r["model"], r["P"]) for r in rows] == [("tiny", 1), ("tiny", 8)]
    for r in rows:
        assert r["attention_impl"] == "cudnn_xla" and r["tokens_per_s"] > 0 and 0 < r["mfu"]
        # a fresh model's loss is about ln(vocab) (the tiny preset: 384 tokens)
        assert abs(r["loss"] - math.log(384)) < 0.5, r["loss"]
        # the cuDNN path and chunked attention agree in bf16 (loss per token, relative)
        assert r["attention"]["max_rel_diff"] < 1e-2 and r["attention"]["loss_chunked"] > 0
        assert r["decode_ms_per_token"] > 0 and r["predicted_bytes"] > 0
    assert "| tiny | 8 | cudnn_xla |" in (tmp_path / "gpu_check_quick.md").read_text()


def test_gpu_check_refuses_a_cpu_without_dry_run():
    p = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: no GPU here"), p.stderr
