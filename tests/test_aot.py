"""python -m parscale_jax.aot: the tiny model's train step compiled for a TPU v5e:2x2 topology on
this CPU host (libtpu from make setup), checked against byte counts computed here; the decode
step; one-line errors for a bad topology, a mismatched mesh and a missing libtpu.

The compiles run in subprocesses (started together at the first test), so this pytest process
never loads libtpu."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parscale_jax import aot
from parscale_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "model.parscale_n=2", "mesh.data=1", "mesh.fsdp=4"]
TRAIN = [*TINY, "data.seq_len=128", "batch_size=8"]
REPLICATED = [*TRAIN, "mesh.fsdp=1", "mesh.data=4"]  # the same step with the state on every chip
DECODE = [*TINY, "--decode", "--batch", "4", "--max-len", "64"]
# the default mesh (data=-1): decoding replaces it by one that shards the weights
SERVED = ["--config", "configs/tiny.yaml", "--topology", "v5e:2x2", "model.parscale_n=2", "--decode", "--batch", "2",
          "--max-len", "64", "--serve-dtype", "bfloat16"]


def _start(args, out: Path):
    return subprocess.Popen([sys.executable, "-m", "parscale_jax.aot", *args, "--json", str(out)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("aot")
    jobs = {"train": _start(TRAIN, root / "train.json"), "replicated": _start(REPLICATED, root / "replicated.json"),
            "decode": _start(DECODE, root / "decode.json"), "served": _start(SERVED, root / "served.json"),
            "mesh": _start([*TINY, "mesh.fsdp=2"], root / "mesh.json")}
    out = {}
    for name, job in jobs.items():
        stdout, stderr = job.communicate(timeout=600)
        path = root / f"{name}.json"
        out[name] = (job.returncode, stdout, stderr, json.loads(path.read_text()) if path.exists() else None)
    return out


def test_train_step_compiles_for_v5e_and_counts_the_sharded_state(reports):
    rc, stdout, stderr, r = reports["train"]
    assert rc == 0, stderr[-2000:]
    assert r["topology"] == "v5e:2x2" and r["chips"] == 4 and r["mode"] == "train"
    assert r["hbm_bytes"] == 16 * 2 ** 30  # TPU v5e: 16 GiB per chip
    assert r["mesh"] == {"data": 1, "fsdp": 4, "stream": 1, "tensor": 1}
    assert r["attention_impl"] == "splash" and r["sequences_per_chip"] == 2
    pc = r["per_chip_bytes"]
    assert pc["total"] == pc["arguments"] + pc["outputs"] - pc["aliased"] + pc["temporaries"] + pc["generated_code"]
    assert r["fits"] is True and 0 < pc["total"] < r["hbm_bytes"]
    # Arguments = the train state (params + Adam's two moments, float32) plus 2 token windows of
    # 129 int32 per chip: sharded 4 ways over fsdp it is at least a quarter of the state and
    # well below the same step's arguments with the state replicated (data=4), which hold at
    # least the whole state (TPU tiles pad small minor dims, so no exact equality)
    from parscale_jax import model as M
    from parscale_jax.config import preset

    cfg = preset("tiny", parscale_n=2)
    n = M.count_params(M.abstract_params(M.make_model(cfg)))
    rc_rep, _, err_rep, rep = reports["replicated"]
    assert rc_rep == 0, err_rep[-2000:]
    assert rep["mesh"] == {"data": 4, "fsdp": 1, "stream": 1, "tensor": 1}
    assert rep["per_chip_bytes"]["arguments"] >= 3 * 4 * n + 2 * 129 * 4
    assert 3 * 4 * n / 4 <= pc["arguments"] <= 0.6 * rep["per_chip_bytes"]["arguments"], (pc, rep["per_chip_bytes"])
    assert pc["aliased"] >= 3 * 4 * n / 4  # the donated state is updated in place
    # model FLOPs: at least 6 x (non-embedding params) per token, for 8 x 128 tokens
    assert r["model_flops_per_step"] > 6 * M.count_params(M.abstract_params(M.make_model(cfg)),
                                                          non_embedding=True) * 8 * 128
    assert set(r["analytic_bytes"]) == {"params", "optimizer", "gradients", "saved_activations",
                                        "layer_working_set", "loss", "head_gradient", "total"}
    assert r["analytic_bytes"]["head_gradient"] == 0  # a TPU topology: the GPU-only part is not counted
    assert "fits" in stdout and "per chip (compiled)" in stdout


def test_decode_step_compiles(reports):
    rc, stdout, stderr, r = reports["decode"]
    assert rc == 0, stderr[-2000:]
    assert r["mode"] == "decode" and r["batch"] == 4 and r["max_len"] == 64
    # the cache of 2 streams x 2 layers x 4 rows x (16 prefix + 64) slots x 2 KV heads x 16, float32,
    # for k and v, sharded over the 4 rows: one row per chip
    cache_per_chip = 2 * (2 * 2 * 1 * (16 + 64) * 2 * 16 * 4)
    assert r["per_chip_bytes"]["arguments"] > cache_per_chip
    assert r["fits"] is True
    # the cache is donated: the compiled program aliases (updates in place) at least all of it
    # (with the cache's `valid` flags, one row of 80 per chip, and its int32 `index`)
    assert r["cache_bytes"] == cache_per_chip + 80 + 4 and r["per_chip_bytes"]["aliased"] >= r["cache_bytes"]
    assert r["cache_aliased"] is True and "aliased (updated in place)" in stdout


def test_decode_default_mesh_shards_weights_served_in_bfloat16(reports):
    rc, stdout, stderr, r = reports["served"]
    assert rc == 0, stderr[-2000:]
    # 4 heads and an MLP of 160 divide by 4: tensor=4 (not data=4, which would replicate the weights)
    assert r["mesh"] == {"data": 1, "fsdp": 1, "stream": 1, "tensor": 4} and r["serve_dtype"] == "bfloat16"
    # 2 KV heads on tensor=4: each stored twice, the 4 split one per chip (compute dtype float32):
    # k and v, 2 streams x 2 layers x 2 rows x (16 prefix + 64) slots x 1 head x 16
    assert r["cache_kv_repeat"] == 2 and "'tensor'" in r["cache_spec"]["k"] and "stored 2x" in stdout
    cache = 2 * (2 * 2 * 2 * (16 + 64) * 1 * 16 * 4)
    assert r["cache_bytes"] == cache + 2 * 80 + 4 and r["per_chip_bytes"]["aliased"] >= r["cache_bytes"]
    from parscale_jax import model as M
    from parscale_jax.config import preset

    n = M.count_params(M.abstract_params(M.make_model(preset("tiny", parscale_n=2))))
    # bfloat16 weights, most of them split 4 ways: well under the float32 weights on one chip
    assert r["analytic_bytes"]["params"] < 2 * n * 0.5


def test_mismatched_mesh_is_one_line(reports):
    rc, _, stderr, r = reports["mesh"]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert rc == 2 and r is None and len(lines) == 1, stderr
    assert lines[0].startswith("error: mesh") and "4" in lines[0]


def test_bad_topology_name_is_one_line(capsys):
    assert aot.main(["--topology", "v5x:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--topology 'v5x:2x2'" in err[0] and "v5p:2x2x2" in err[0]


def test_missing_libtpu_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.delenv("TPU_LIBRARY_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="libtpu is not installed"):
        aot._libtpu_path()


def test_topology_names_and_hbm_table():
    assert aot.parse_topology("v5p:2x2x2") == ("tpu-v5p", (2, 2, 2))
    assert aot.parse_topology("v6e:4x4") == ("tpu-v6e", (4, 4))
    assert aot.hbm_bytes("v4:2x2x1") == 32 * 2 ** 30 and aot.hbm_bytes("v5e:2x2") == 16 * 2 ** 30
    with pytest.raises(UserError):
        aot.parse_topology("v5p-64")
    assert np.isclose(aot.hbm_bytes("v5p:4x4x2"), 95 * 2 ** 30)
    assert os.path.isfile(aot._libtpu_path())  # make setup installed the TPU compiler
