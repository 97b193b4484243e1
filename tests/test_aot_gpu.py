"""python -m parscale_jax.aot for NVIDIA GPU topologies: the tiny model's train step compiled for
h100:2, for h100:8 (data=2 fsdp=2 tensor=2) and for two hosts of 8 (h100:8x2, every mesh axis),
on this CPU host with the CUDA compile-only packages of
make setup (.venv/cuda, loaded only by aot's child process). Checked in the compiled programs:
each GPU's cuDNN fused attention holds only its own rows and no activation is all-gathered
along the batch (the stream vmap used to fold [P, B] so that XLA gathered q/k/v over B first).
The test process itself never sees a CUDA plugin."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from parscale_jax import aot
from parscale_jax.errors import UserError

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.yaml", "dtype=bfloat16", "data.seq_len=96", "model.parscale_n=2"]
T, SEQ = 16, 96  # the tiny preset's prefix tokens; a sequence length no weight has
JOBS = {  # name: (args, P per GPU, sequences per GPU, global batch)
    "h100:2": ([*TINY, "--topology", "h100:2", "mesh.data=1", "mesh.fsdp=2", "batch_size=4"], 2, 2, 4),
    "mesh": ([*TINY, "--topology", "h100:8", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "batch_size=12"], 2, 3, 12),
    "hosts": ([*TINY, "--topology", "h100:8x2", "model.parscale_n=4", "mesh.data=2", "mesh.fsdp=2", "mesh.stream=2",
               "mesh.tensor=2", "batch_size=12"], 2, 3, 12),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot_gpu")
    procs = {n: subprocess.Popen([sys.executable, "-m", "parscale_jax.aot", *a, "--json", str(root / f"{n}.json"),
                                  "--hlo", str(root / f"{n}.hlo")], cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n, (a, *_) in JOBS.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:]
        out[name] = (json.loads((root / f"{name}.json").read_text()), (root / f"{name}.hlo").read_text(), stdout, stderr)
    return out


def _fmha_rows(hlo: str) -> set[int]:
    """The leading (rows) dimension of every cuDNN fused-attention call's operands."""
    ops = re.findall(r'custom_call_target="__cudnn\$fmha[^"]*", operand_layout_constraints=\{([^}]*)\}', hlo)
    assert ops, "no cuDNN fused attention in the program"
    return {int(m) for o in ops for m in re.findall(r"\w+\[(\d+),", o)}


def _batch_gathers(hlo: str, batch: int) -> list[str]:
    """All-gathers of floating-point arrays with a sequence dimension whose result has the global batch."""
    bad = []
    for line in hlo.splitlines():
        if re.search(r"all-gather(-start)?\(", line):
            shapes = [[int(d) for d in dims.split(",")] for dims in re.findall(r"(?:bf16|f16|f32)\[([\d,]+)\]", line)]
            if any(set(s) & {SEQ, SEQ + T} and batch in s for s in shapes):
                bad.append(line[:300])
    return bad


@pytest.mark.parametrize("name", ["h100:2", "mesh", "hosts"])
def test_cudnn_attention_holds_only_its_own_rows(reports, name):
    r, hlo, stdout, stderr = reports[name]
    _, p_local, b_local, batch = JOBS[name]
    assert r["attention_impl"] == "cudnn" and r["fits"] is True
    assert r["custom_calls"].get("__cudnn$fmhaSoftmax", 0) >= 1
    assert r["custom_calls"].get("__cudnn$fmhaSoftmaxBackward", 0) >= 1
    assert _fmha_rows(hlo) == {p_local * b_local}  # [P_local * B_local, T + S, heads, hd]
    assert _batch_gathers(hlo, batch) == []
    counted = sum(len(re.findall(rf"\b{k}(?:-start)?\(", hlo)) for k in r["collectives"])
    assert counted == sum(r["collectives"].values()) > 0
    assert "cudart_stub" not in stderr and "custom calls: __cudnn$fmhaSoftmax" in stdout


def test_gpu_report_and_budget(reports):
    r = reports["h100:2"][0]
    assert r["topology"] == "h100:2" and r["chips"] == 2 and r["mode"] == "train"
    assert r["hbm_bytes"] == 84942979072 and r["budget_bytes"] == int(0.75 * 84942979072)
    assert "75%" in r["budget"] and r["mesh"] == {"data": 1, "fsdp": 2, "stream": 1, "tensor": 1}
    pc = r["per_chip_bytes"]
    assert pc["total"] == pc["arguments"] + pc["outputs"] - pc["aliased"] + pc["temporaries"] + pc["generated_code"]
    assert reports["hosts"][0]["chips"] == 16
    # the estimate is the GPU one: it counts the LM head's float32 gradient partial sum (H x V x 4)
    from parscale_jax.config import preset

    tiny = preset("tiny")
    assert r["analytic_bytes"]["head_gradient"] == tiny.hidden_size * tiny.vocab_size * 4


def test_gpu_topology_names_and_specs():
    assert aot.parse_topology("h100") == ("h100", (1, 1))
    assert aot.parse_topology("a100:8") == ("a100", (8, 1))
    assert aot.parse_topology("h100:8x2") == ("h100", (8, 2))
    assert aot.gpu_capability("h100:8") == (9, 0) and aot.gpu_capability("a100") == (8, 0)
    assert aot.is_gpu("a100:8") and not aot.is_gpu("v5p:2x2x2")
    for bad in ("h100:0", "h100:8x", "b200:8", "h100:x2"):
        with pytest.raises(UserError, match="h100:8x2"):
            aot.parse_topology(bad)


def test_counts_of_custom_calls_and_collectives():
    hlo = "\n".join([
        '  %a = f32[4]{0} all-gather(f32[2]{0} %p), dimensions={0}',
        '  %b = (f32[2]{0}, f32[4]{0}) all-gather-start(f32[2]{0} %p), dimensions={0}',
        '  %c = f32[4]{0} all-gather-done((f32[2]{0}, f32[4]{0}) %b)',
        '  %all-reduce.3 = f32[4]{0} all-reduce(f32[4]{0} %c), to_apply=%add',
        '  %d = (bf16[8]{0}, u8[0]{0}) custom-call(bf16[8]{0} %x), custom_call_target="__cudnn$fmhaSoftmax"',
        '  %e = (bf16[8]{0}, u8[0]{0}) custom-call(bf16[8]{0} %x), custom_call_target="__cudnn$fmhaSoftmax"'])
    assert aot.program_counts(hlo) == {"custom_calls": {"__cudnn$fmhaSoftmax": 2},
                                       "collectives": {"all-gather": 2, "all-reduce": 1}}


def test_this_process_never_sees_a_cuda_plugin():
    import jax

    assert importlib.util.find_spec("jax_plugins") is None
    assert jax.default_backend() == "cpu"


def test_missing_cuda_packages_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("PARSCALE_CUDA_PATH", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="make setup"):
        aot._cuda_path()
    assert aot.main(["--topology", "h100:9x", "--config", "configs/tiny.yaml"]) == 2  # a bad name: one line
