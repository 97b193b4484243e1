"""Two-stage training, frozen-backbone PEFT and dynamic P (issue 6), on a tiny corpus.

One module-scoped set of runs (each compiles once): stage 1 at P=1, then stage 2 with a
frozen backbone at P=2 and at P=4, both adding their set to one multi-P checkpoint.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import numpy as np
import pytest

from parscale_jax import checkpoint as C
from parscale_jax import evaluate as E
from parscale_jax import loading
from parscale_jax import model as M
from parscale_jax import recycle as R
from parscale_jax import runner, train_config
from parscale_jax.cli import eval as eval_cli
from parscale_jax.errors import UserError
from parscale_jax.params import available_P, trees_equal

pytestmark = pytest.mark.slow  # three training runs in the module fixture

COMMON = ["model.preset=tiny", "data.seq_len=32", "batch_size=8", "steps=4", "log_every=2",
          "eval_every=0", "eval_windows=4", "dtype=float32", "checkpoint.every=4", "optim.warmup_steps=1",
          "optim.lr=1e-2"]


def _corpus(root) -> str:
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y", "(", ")", ":"]
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words, size=8)) for _ in range(60))
        (root / f"f{i:02d}.py").write_text(text + "\n")
    return str(root / "*.py")


def _train(workdir, *over):
    cfg = train_config.load(None, [*COMMON, *over])
    return runner.train(cfg, str(workdir), verbose=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recycle")
    src = _corpus(tmp_path_factory.mktemp("corpus"))
    data = [f"data.source={src}", "data.heldout_fraction=0.2"]
    out = {"root": root, "data": data, "stage1": root / "stage1", "multi": root / "multi"}
    _train(out["stage1"], *data, "model.parscale_n=1")
    for P in (2, 4):  # no held-out split: no final evaluation to compile (only stage 1's is compared)
        out[f"frozen{P}"] = root / f"frozen{P}"
        _train(out[f"frozen{P}"], *data, "data.heldout_fraction=0", f"model.parscale_n={P}",
               f"init_from={out['stage1']}", "freeze_backbone=true", f"add_to={out['multi']}")
    return out


def _leaves(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_stage2_init_keeps_backbone_and_shapes():
    cfg1 = train_config.load(None, COMMON).model
    backbone = jax.jit(functools.partial(M.init_params, M.make_model(cfg1)))(jax.random.PRNGKey(3))["backbone"]
    cfg4 = cfg1.replace(parscale_n=4)
    params = jax.jit(R.stage2_init, static_argnums=1)(jax.tree.map(np.asarray, backbone), cfg4, jax.random.PRNGKey(5))
    assert trees_equal(params["backbone"], backbone)
    L, nKV, T, hd, H = cfg4.num_hidden_layers, cfg4.num_key_value_heads, cfg4.parscale_n_tokens, cfg4.hd, cfg4.hidden_size
    assert params["prefix"]["k"].shape == (L, 4, nKV, T, hd) == params["prefix"]["v"].shape
    assert params["aggregator"]["gate_in"]["kernel"].shape == (4 * H, H)
    assert params["aggregator"]["gate_out"]["kernel"].shape == (H, 4)
    for name, leaf in _leaves({g: params[g] for g in ("prefix", "aggregator")}).items():
        assert np.all(np.isfinite(leaf)), name
    assert np.std(params["prefix"]["k"]) > 0  # explicitly initialised, not zeros
    with pytest.raises(UserError, match="backbone"):
        jax.jit(R.stage2_init, static_argnums=1)(backbone, cfg4.replace(hidden_size=32, intermediate_size=64),
                                                 jax.random.PRNGKey(0))


def test_frozen_backbone_is_bitwise_unchanged_and_has_no_optimizer_state(runs):
    _, stage1 = loading.load(str(runs["stage1"]))
    for P in (2, 4):
        wd = runs[f"frozen{P}"]
        cfg, trained = loading.load(str(wd))
        assert cfg.parscale_n == P
        assert trees_equal(trained["backbone"], stage1["backbone"]), f"P={P}: backbone changed"
        # prefixes and aggregator moved away from their stage-2 initialisation
        fresh = jax.jit(R.stage2_init, static_argnums=1)(stage1["backbone"], cfg,
                                                         jax.random.fold_in(jax.random.PRNGKey(0), 1))
        for g in ("prefix", "aggregator"):
            for name, leaf in _leaves(trained[g]).items():
                assert not np.array_equal(leaf, _leaves(fresh[g])[name]), f"P={P}: {g}/{name} did not train"
        # the saved optimizer state covers prefix and aggregator only
        steps = C.complete_steps(os.path.join(wd, C.CKPT_DIR))
        state = C.restore_numpy(os.path.join(wd, C.CKPT_DIR, str(steps[-1]), "state"))
        opt_paths = list(_leaves(state["opt_state"]))
        assert opt_paths and not any("backbone" in p for p in opt_paths)
        n_trainable = len(jax.tree.leaves({g: trained[g] for g in ("prefix", "aggregator")}))
        moments = [p for p in opt_paths if "/mu/" in p or "/nu/" in p]
        assert len(moments) == 2 * n_trainable
        assert "backbone" in state["frozen"] and "backbone" not in state["params"]


def test_dynamic_P_selects_the_set_asked_for(runs):
    multi = str(runs["multi"])
    raw = loading.read(multi).params
    assert available_P(raw) == [1, 2, 4]
    held = np.random.default_rng(1).integers(0, 256, size=32 * 6).astype(np.int32)

    def loss(path, P):
        cfg, params = loading.load(path, P)
        return E.window_loss(M.make_model(cfg), params, held, 32, 3)["loss"]

    by_P = {P: loss(multi, P) for P in (1, 2, 4)}
    assert len({round(v, 6) for v in by_P.values()}) == 3, by_P
    assert by_P[2] == loss(str(runs["frozen2"]), None)
    assert by_P[4] == loss(str(runs["frozen4"]), None)
    assert by_P[1] == loss(str(runs["stage1"]), None)
    with pytest.raises(UserError, match=r"available P = \[1, 2, 4\]"):
        loading.load(multi, 3)


def test_add_to_rejects_another_backbone(runs, tmp_path):
    cfg, params = loading.load(str(runs["frozen4"]))
    params = {**params, "backbone": jax.tree.map(lambda a: a + 1e-3, params["backbone"])}  # another backbone
    with pytest.raises(UserError, match="backbone"):
        R.add_set_to(str(runs["multi"]), cfg, params)
    raw = loading.read(str(runs["multi"])).params
    assert available_P(raw) == [1, 2, 4]  # the checkpoint is untouched


def test_eval_py_loss_equals_training_heldout_loss(runs, tmp_path):
    """The loss eval.py reports for a workdir equals the training loop's final held-out loss."""
    with open(runs["stage1"] / "metrics.jsonl") as f:
        end = [json.loads(x) for x in f if '"eval_loss"' in x][-1]
    src = [d.split("=", 1)[1] for d in runs["data"] if d.startswith("data.source=")][0]
    out = tmp_path / "r.json"
    rc = eval_cli.main(["--checkpoint", str(runs["stage1"]), "--data", src, "--heldout-fraction", "0.2",
                        "--seq-len", "32", "--max-windows", "4", "--batch-size", "3", "--output", str(out)])
    assert rc == 0
    got = json.loads(out.read_text())
    assert got["P"] == 1 and got["tokens"] == end["eval_tokens"]
    assert abs(got["loss"] - end["eval_loss"]) <= 1e-6 * end["eval_loss"]
