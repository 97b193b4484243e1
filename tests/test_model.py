"""The core model against independent computations: a float64 NumPy forward (a loop over
streams and layers), the spec's aggregation formula, `transformers` Qwen2 and the paper's
published parameter counts."""
from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import flops
from parscale_jax import model as M
from parscale_jax.config import ConfigError, ModelConfig, preset

SHARED_CSV = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "parscale_paper_losses.csv")
PACKAGED_CSV = os.path.join(os.path.dirname(M.__file__), "assets", "parscale_paper_losses.csv")

CFG4 = preset("tiny", parscale_n=4, parscale_n_tokens=5, vocab_size=97)


def _bigger(params, scale=25.0):
    """Scale the gate params up so the mixing weights are far from uniform (order matters)."""
    if "aggregator" not in params:
        return params
    out = dict(params)
    out["aggregator"] = jax.tree.map(lambda a: a * scale, params["aggregator"])
    return out


@pytest.fixture(scope="module")
def setup4():
    model = M.make_model(CFG4)
    params = _bigger(M.init_params(model, jax.random.PRNGKey(0)))
    # Make the prefixes large enough to matter.
    params["prefix"] = jax.tree.map(lambda a: a * 30.0, params["prefix"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, CFG4.vocab_size)
    return model, params, tokens


# ---- float64 NumPy reference -------------------------------------------------------------
def _np(x):
    return np.asarray(x, dtype=np.float64)


def np_rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, :, None, :]
    rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * np.cos(ang) + rot * np.sin(ang)


def np_stream_states(params, cfg: ModelConfig, tokens):
    """Loop over streams and layers in float64; returns [P, B, S, H] normed final states."""
    bb = jax.tree.map(_np, params["backbone"])
    lay = bb["decoder"]["layers"]
    tokens = np.asarray(tokens)
    B, S = tokens.shape
    nH, nKV, hd, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hd, cfg.prefix_len
    pos = np.broadcast_to(np.arange(S, dtype=np.float64), (B, S))
    x0 = bb["embed"]["embedding"][tokens]
    states = []
    for p in range(cfg.parscale_n):
        h = x0.copy()
        for i in range(cfg.num_hidden_layers):
            a = np_rmsnorm(h, lay["input_norm"]["scale"][i], cfg.rms_norm_eps)
            at = lay["attn"]
            q = np.einsum("bsh,hnd->bsnd", a, at["q"]["kernel"][i]) + at["q"]["bias"][i]
            k = np.einsum("bsh,hnd->bsnd", a, at["k"]["kernel"][i]) + at["k"]["bias"][i]
            v = np.einsum("bsh,hnd->bsnd", a, at["v"]["kernel"][i]) + at["v"]["bias"][i]
            q, k = np_rope(q, pos, cfg.rope_theta), np_rope(k, pos, cfg.rope_theta)
            if T:
                pk = _np(params["prefix"]["k"])[i, p].transpose(1, 0, 2)  # [T, nKV, hd]
                pv = _np(params["prefix"]["v"])[i, p].transpose(1, 0, 2)
                k = np.concatenate([np.broadcast_to(pk, (B,) + pk.shape), k], 1)
                v = np.concatenate([np.broadcast_to(pv, (B,) + pv.shape), v], 1)
            rep = nH // nKV
            k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
            sc = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(hd)
            allowed = np.concatenate([np.ones((S, T), bool), np.tril(np.ones((S, S), bool))], 1)
            sc = np.where(allowed, sc, -np.inf)
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            o = np.einsum("bnqk,bknd->bqnd", sc, v)
            h = h + np.einsum("bqnd,ndh->bqh", o, at["o"]["kernel"][i])
            m = lay["mlp"]
            a = np_rmsnorm(h, lay["post_attn_norm"]["scale"][i], cfg.rms_norm_eps)
            g = a @ m["gate"]["kernel"][i]
            h = h + ((g / (1 + np.exp(-g))) * (a @ m["up"]["kernel"][i])) @ m["down"]["kernel"][i]
        states.append(np_rmsnorm(h, bb["final_norm"]["scale"], cfg.rms_norm_eps))
    return np.stack(states)


def np_aggregate(agg, z, eps):
    """The spec's gate: concat in (h, p) order, Linear-SiLU-Linear, softmax, smoothing, mix."""
    agg = jax.tree.map(_np, agg)
    P, B, S, H = z.shape
    cat = np.empty((B, S, H * P))
    for h in range(H):
        for p in range(P):
            cat[..., h * P + p] = z[p, :, :, h]
    g = cat @ agg["gate_in"]["kernel"] + agg["gate_in"]["bias"]
    g = g / (1 + np.exp(-g))
    g = g @ agg["gate_out"]["kernel"] + agg["gate_out"]["bias"]
    w = np.exp(g - g.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    w = w * (1 - eps) + eps / P
    return np.einsum("pbsh,bsp->bsh", z, w), w


# ---- tests -------------------------------------------------------------------------------
@pytest.mark.slow
def test_vmapped_streams_equal_loop_over_streams(setup4):
    model, params, tokens = setup4
    z, _ = model.apply({"params": params}, tokens, method=M.ParScaleLM.stream_states)
    ref = np_stream_states(params, CFG4, tokens)
    assert z.shape == ref.shape == (4, 2, 9, CFG4.hidden_size)
    np.testing.assert_allclose(np.asarray(z), ref, atol=2e-5, rtol=2e-5)
    # The streams really differ (prefixes matter), so the loop comparison is not vacuous.
    assert np.abs(ref[0] - ref[1]).max() > 1e-2


@pytest.mark.slow
def test_aggregation_matches_float64_formula_in_hp_order(setup4):
    model, params, tokens = setup4
    z = np.asarray(model.apply({"params": params}, tokens, method=M.ParScaleLM.stream_states)[0])
    mixed, w = model.apply({"params": params}, jnp.asarray(z), method=M.ParScaleLM.aggregate)
    ref_mixed, ref_w = np_aggregate(params["aggregator"], z.astype(np.float64), CFG4.parscale_attn_smooth)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mixed), ref_mixed, atol=1e-5)
    # The (p, h) order gives a different answer: the test can tell the two apart.
    P, B, S, H = z.shape
    wrong = np.transpose(z, (1, 2, 0, 3)).reshape(B, S, P * H)
    g = wrong @ np.asarray(params["aggregator"]["gate_in"]["kernel"]) + np.asarray(params["aggregator"]["gate_in"]["bias"])
    g = (g / (1 + np.exp(-g))) @ np.asarray(params["aggregator"]["gate_out"]["kernel"])
    assert np.abs(g + np.asarray(params["aggregator"]["gate_out"]["bias"]) - np.log(ref_w)).max() > 1e-3
    # Full logits = LM head (tied) of the mixed state.
    logits, _ = model.apply({"params": params}, tokens)
    ref_logits = ref_mixed @ _np(params["backbone"]["embed"]["embedding"]).T
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_first_gate_is_near_uniform():
    model = M.make_model(CFG4)
    params = M.init_params(model, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 7), 0, CFG4.vocab_size)
    z, _ = model.apply({"params": params}, tokens, method=M.ParScaleLM.stream_states)
    _, w = model.apply({"params": params}, z, method=M.ParScaleLM.aggregate)
    # near uniform: every weight within 20% of 1/P (a collapsed or one-hot gate would be far off)
    assert np.abs(np.asarray(w) - 0.25).max() < 0.2 * 0.25
    for leaf in jax.tree.leaves(params["prefix"]):  # explicitly initialised, never empty
        assert np.isfinite(leaf).all() and 0.01 < float(np.std(leaf)) < 0.03


@pytest.mark.slow
def test_causality(setup4):
    model, params, tokens = setup4
    t = 5
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG4.vocab_size)
    a, _ = model.apply({"params": params}, tokens)
    b, _ = model.apply({"params": params}, changed)
    assert np.array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert np.abs(np.asarray(a[:, t:]) - np.asarray(b[:, t:])).max() > 1e-4


@pytest.mark.slow
def test_prefix_visibility(setup4):
    model, params, tokens = setup4
    p = 2
    bumped = dict(params)
    bumped["prefix"] = {n: a.at[:, p].add(0.5) for n, a in params["prefix"].items()}
    z0 = np.asarray(model.apply({"params": params}, tokens, method=M.ParScaleLM.stream_states)[0])
    z1 = np.asarray(model.apply({"params": bumped}, tokens, method=M.ParScaleLM.stream_states)[0])
    for q in range(CFG4.parscale_n):
        if q == p:
            assert np.abs(z1[q] - z0[q]).max() > 1e-3
        else:
            assert np.array_equal(z1[q], z0[q])


@pytest.mark.slow
def test_left_padding_matches_unpadded(setup4):
    model, params, tokens = setup4
    pad = 3
    padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), tokens], 1)
    mask = jnp.concatenate([jnp.zeros((2, pad), bool), jnp.ones(tokens.shape, bool)], 1)
    a, _ = model.apply({"params": params}, tokens)
    b, _ = model.apply({"params": params}, padded, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(b[:, pad:]), np.asarray(a), atol=2e-5)
    assert np.isfinite(np.asarray(b)).all()


@pytest.mark.slow
def test_gradients_reach_all_groups(setup4):
    model, params, tokens = setup4
    from parscale_jax.loss import token_nll

    def loss(p):
        logits, _ = model.apply({"params": p}, tokens[:, :-1])
        return token_nll(logits, tokens[:, 1:]).mean()

    grads = jax.grad(loss)(M.init_params(model, jax.random.PRNGKey(5)))
    assert set(grads) == {"backbone", "prefix", "aggregator"}
    for group, g in grads.items():
        for kp, leaf in jax.tree_util.tree_leaves_with_path(g):
            assert np.isfinite(leaf).all(), (group, kp)
            assert np.abs(leaf).max() > 0, (group, kp)


@pytest.mark.slow
def test_bfloat16_compute_close_to_float32(setup4):
    _, params, tokens = setup4
    f32, _ = M.make_model(CFG4, dtype="float32").apply({"params": params}, tokens)
    bf16, _ = M.make_model(CFG4, dtype="bfloat16").apply({"params": params}, tokens)
    assert bf16.dtype == jnp.bfloat16
    f32, bf16 = np.asarray(f32), np.asarray(bf16, dtype=np.float32)
    # bfloat16 keeps 8 mantissa bits (rel. 2^-8 = 0.4%); through 2 layers and the gate we allow
    # 5% of the logits' scale, and the top-1 prediction must agree almost everywhere.
    assert np.abs(bf16 - f32).max() < 0.05 * np.abs(f32).max()
    assert (bf16.argmax(-1) == f32.argmax(-1)).mean() > 0.9


@pytest.mark.slow
def test_remat_and_unrolled_layers_give_the_same_logits(setup4):
    _, params, tokens = setup4
    ref, _ = M.make_model(CFG4).apply({"params": params}, tokens)
    for kw in (dict(remat="full"), dict(scan_layers=False)):
        out, _ = M.make_model(CFG4, **kw).apply({"params": params}, tokens)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6)


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.parametrize("tied", [True, False])
def test_p1_matches_transformers_qwen2(tied):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=tied, parscale_n=1)
    model = M.make_model(cfg)
    params = M.init_params(model, jax.random.PRNGKey(7))
    # Non-trivial norms and biases so that a mix-up would show.
    params = jax.tree_util.tree_map_with_path(
        lambda kp, a: a + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(kp))), a.shape)
        if any(getattr(k, "key", None) in ("scale", "bias") for k in kp) else a, params)
    hf_cfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                         num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                         rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                         tie_word_embeddings=tied, attn_implementation="eager")
    hf = Qwen2ForCausalLM(hf_cfg).float().eval()
    H, hd, nH, nKV = cfg.hidden_size, cfg.hd, cfg.num_attention_heads, cfg.num_key_value_heads
    bb = jax.tree.map(np.asarray, params["backbone"])
    lay = bb["decoder"]["layers"]
    t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float32)  # noqa: E731
    sd = {"model.embed_tokens.weight": t(bb["embed"]["embedding"]), "model.norm.weight": t(bb["final_norm"]["scale"])}
    if not tied:
        sd["lm_head.weight"] = t(bb["lm_head"]["kernel"].T)
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        at = lay["attn"]
        sd[pre + "input_layernorm.weight"] = t(lay["input_norm"]["scale"][i])
        sd[pre + "post_attention_layernorm.weight"] = t(lay["post_attn_norm"]["scale"][i])
        sd[pre + "self_attn.q_proj.weight"] = t(at["q"]["kernel"][i].reshape(H, nH * hd).T)
        sd[pre + "self_attn.q_proj.bias"] = t(at["q"]["bias"][i].reshape(-1))
        for n in ("k", "v"):
            sd[pre + f"self_attn.{n}_proj.weight"] = t(at[n]["kernel"][i].reshape(H, nKV * hd).T)
            sd[pre + f"self_attn.{n}_proj.bias"] = t(at[n]["bias"][i].reshape(-1))
        sd[pre + "self_attn.o_proj.weight"] = t(at["o"]["kernel"][i].reshape(nH * hd, H).T)
        for n in ("gate", "up", "down"):
            sd[pre + f"mlp.{n}_proj.weight"] = t(lay["mlp"][n]["kernel"][i].T)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    ours, _ = model.apply({"params": params}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)


def _paper_rows():
    path = SHARED_CSV if os.path.exists(SHARED_CSV) else PACKAGED_CSV
    with open(path) as f:
        return [r for r in csv.DictReader(f) if r["dataset"] == "stack-v2-python"]


def test_paper_preset_parameter_counts_match_published():
    by_params = {}
    for name in ("paper-0.5b", "paper-0.7b", "paper-1.1b", "paper-1.6b", "paper-2.8b", "paper-4.4b"):
        for P in (1, 2, 4, 8):
            shapes = M.abstract_params(M.make_model(preset(name, parscale_n=P)))
            by_params[(P, M.count_params(shapes, non_embedding=True))] = name
    rows = _paper_rows()
    assert len(rows) == 24
    for r in rows:
        assert (int(r["P"]), int(r["non_embedding_params"])) in by_params, r


@pytest.mark.parametrize("name,total_b,non_emb_b", [
    ("qwen2.5-0.5b", 0.49, 0.36), ("qwen2.5-1.5b", 1.54, 1.31), ("qwen2.5-3b", 3.09, 2.77)])
def test_qwen25_presets_match_published_totals(name, total_b, non_emb_b):
    # Published in the Qwen2.5 model cards (two decimals, in billions).
    shapes = M.abstract_params(M.make_model(preset(name)))
    assert round(M.count_params(shapes) / 1e9, 2) == total_b
    assert round(M.count_params(shapes, non_embedding=True) / 1e9, 2) == non_emb_b


@pytest.mark.parametrize("bad,field", [
    (dict(hidden_size=65), "num_attention_heads"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(parscale_n=0), "parscale_n"),
    (dict(parscale_attn_smooth=1.5), "parscale_attn_smooth"),
    (dict(vocab_size=-1), "vocab_size"),
])
def test_invalid_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        preset("tiny", **bad)


def test_flops_counter_matches_xla_cost_analysis():
    # XLA's own count of the compiled forward is an independent figure. Our counter uses the
    # causal half of the attention matrix, XLA computes all of it: compare with that variant.
    cfg = ModelConfig(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, parscale_n=4, parscale_n_tokens=8)
    model = M.make_model(cfg, scan_layers=False)  # cost analysis counts a loop body once
    params = M.abstract_params(model)
    B, S = 2, 32
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    compiled = jax.jit(lambda p, t: model.apply({"params": p}, t)[0]).lower(params, tokens).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla = ca["flops"] / (B * S)
    ours = flops.forward_flops_per_token(cfg, S)
    full_attn_extra = cfg.P * cfg.num_hidden_layers * 4 * cfg.num_attention_heads * cfg.hd * (S - (S + 1) / 2)
    assert abs((ours + full_attn_extra) - xla) / xla < 0.05, (ours, xla)
    assert flops.train_flops_per_token(cfg, S) == 3 * ours
