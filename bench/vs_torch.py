"""JAX vs the PyTorch reference (and transformers Qwen2 for P=1): training step and decoding.

    .venv/bin/python bench/vs_torch.py           # tiny + small backbones, P in 1 4
    .venv/bin/python bench/vs_torch.py --quick   # smoke run (tiny, P in 1 2, 2 rounds)

The same model and inputs in each implementation: JAX params from ``model.init_params`` go to
the PyTorch reference (``torch_ref.TorchParScale``) and, for P=1, to ``transformers``
``Qwen2ForCausalLM`` (default attention implementation) through ``convert.params_to_hf``; the
forward logits are compared first (max abs difference, a sanity check). Both float32, both on
``--threads`` threads (torch.set_num_threads; XLA's CPU client uses the machine's cores, 2 here).

* Training step: JAX = the project's jit train step (``train_step.make_train_step``, AdamW from
  ``optim.make_optimizer`` with clipping off, constant lr); torch = a plain step: forward,
  cross-entropy, backward, ``torch.optim.AdamW`` (same lr, betas, eps, weight decay), zero_grad.
* Decoding: greedy, a 64-token prompt, then ``--chunk`` decode steps timed (per-token latency =
  time / chunk). JAX = ``decode.make_decode_chunk`` (one compiled lax.scan); torch reference =
  its cached forward one token at a time (as its ``generate``); transformers = ``model(...,
  past_key_values=..., use_cache=True)`` one token at a time, under ``torch.no_grad``.

Timed calls go round-robin over every (implementation, backbone, P) after a warm-up, medians
reported; ratios are torch time / JAX time (> 1: JAX faster). A jitted 2048^3 matmul (JAX and
torch) in the same round-robin gives the machine's dense float32 matmul rate, against which each
training step's model FLOP rate is reported (what bounds a step on this CPU).
The step's dense layers alone (``dense_chain``: the same matmuls, forward + backward, on the same
rows, in JAX and torch) are timed in the same round-robin: a floor under each library's step.
Writes ``bench/results/vs_torch.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import _common as B  # bench/ is the folder of the running script, so its helpers import directly

from parscale_jax import flops as F
from parscale_jax.errors import UserError, cli_entry

BACKBONES = B.BACKBONES
PROMPT = 64
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.95), 1e-8, 0.1


def jax_impl(cfg, batch, seq, decode_batch, chunk, tokens_np, prompt_np):
    import jax
    import jax.numpy as jnp

    from parscale_jax import decode as D
    from parscale_jax import model as M
    from parscale_jax import optim as O
    from parscale_jax import train_step as TS
    from parscale_jax.train_config import OptimConfig

    model = M.make_model(cfg, "float32")
    params = M.init_params(model, jax.random.PRNGKey(0))
    host_params = jax.tree.map(lambda a: jax.device_get(a).copy(), params)
    tx = O.make_optimizer(OptimConfig(lr=LR, schedule="constant", warmup_steps=0, b1=BETAS[0], b2=BETAS[1], eps=EPS,
                                      weight_decay=WD, clip_norm=0.0), 1000)
    box = {"state": TS.new_state(params, tx, False, jax.random.PRNGKey(1))}
    step = jax.jit(TS.make_train_step(model, tx), donate_argnums=(0,))
    tokens = jnp.asarray(tokens_np)

    def train():
        box["state"], m = step(box["state"], tokens)
        jax.block_until_ready(m["loss"])

    logits = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(host_params, jnp.asarray(tokens_np[:2, :-1]))

    prefill = D.make_prefill(model)
    chunk_fn = D.make_decode_chunk(model, 256, chunk)
    cache = jax.jit(lambda p: M.init_cache(model, p, decode_batch, PROMPT + chunk + 1))(host_params)
    prompt = jnp.asarray(prompt_np)
    lg, cache = prefill(host_params, cache, prompt, jnp.ones(prompt.shape, bool))
    first = jnp.argmax(lg, -1).astype(jnp.int32)
    done = jnp.zeros((decode_batch,), bool)
    sampling, key, eos = D.Sampling().astuple(), jax.random.PRNGKey(0), jnp.int32(-1)

    def decode():  # the chunk consumes (donates) its cache, token and done: it gets copies
        state = jax.tree.map(jnp.copy, (cache, first, done))
        out = chunk_fn(host_params, *state, key, jnp.int32(1), sampling, eos)
        jax.block_until_ready(out)
        return out[0]

    fwd = jax.jit(lambda p, t: model.apply({"params": p}, t)[0])

    def margins(toks):
        """top-1 minus top-2 logit of the full (uncached) forward at each greedy step's position."""
        import numpy as np

        seq = np.concatenate([prompt_np, np.asarray(first)[:, None], np.asarray(toks)[:, :-1]], axis=1)
        lg = np.asarray(fwd(host_params, jnp.asarray(seq)))[:, PROMPT:]
        top2 = np.sort(lg, axis=-1)[..., -2:]
        return top2[..., 1] - top2[..., 0]

    return host_params, train, decode, jax.device_get(logits), margins


def torch_impls(cfg, host_params, batch, seq, decode_batch, chunk, tokens_np, prompt_np, with_hf: bool):
    import numpy as np
    import torch
    import torch.nn.functional as Fn

    from parscale_jax import hf as CV
    from parscale_jax.torch_ref import TorchParScale

    sd = {k: torch.from_numpy(np.array(v)) for k, v in CV.params_to_hf(cfg, host_params).items()}
    hfd = CV.hf_config_dict(cfg)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    models = {}
    ref = TorchParScale(hfd)
    ref.load_state_dict(sd, strict=True)
    models["torch_ref"] = ref
    if with_hf:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        hcfg = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                           intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                           num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                           rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
                           max_position_embeddings=cfg.max_position_embeddings,
                           tie_word_embeddings=cfg.tie_word_embeddings)
        hf = Qwen2ForCausalLM(hcfg).float()
        missing, unexpected = hf.load_state_dict(sd, strict=False)
        missing = [m for m in missing if "rotary" not in m]
        if missing or unexpected:
            raise RuntimeError(f"transformers state dict mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
        models["transformers"] = hf
    x = torch.from_numpy(np.asarray(tokens_np[:, :-1], np.int64))
    y = torch.from_numpy(np.asarray(tokens_np[:, 1:], np.int64))
    prompt = torch.from_numpy(np.asarray(prompt_np, np.int64))
    out = {}
    for name, m in models.items():
        is_hf = name == "transformers"
        fwd = (lambda mm: (lambda t: mm(input_ids=t).logits)) (m) if is_hf else m
        m.eval()
        with torch.no_grad():
            logits = fwd(x[:2]).numpy()
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

        def train(m=m, opt=opt, fwd=fwd):
            lg = fwd(x)
            loss = Fn.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss.detach().item()

        if is_hf:
            def decode(m=m):
                with torch.no_grad():
                    o = m(input_ids=prompt, use_cache=True)
                    cache, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
                    t0 = time.perf_counter()
                    toks = []
                    for _ in range(chunk):
                        o = m(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
                        cache, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
                        toks.append(tok)
                    return time.perf_counter() - t0, torch.stack(toks, 1).numpy()
        else:
            def decode(m=m):
                with torch.no_grad():
                    lg, cache = m(prompt, cache=None, return_cache=True)
                    tok = lg[:, -1].argmax(-1)
                    t0 = time.perf_counter()
                    toks = []
                    for _ in range(chunk):
                        lg, cache = m(tok[:, None], cache=cache, return_cache=True)
                        tok = lg[:, -1].argmax(-1)
                        toks.append(tok)
                    return time.perf_counter() - t0, torch.stack(toks, 1).numpy()
        out[name] = dict(train=train, decode=decode, logits=logits, model=m)
    return out


def mlp_component(cfg, batch, seq, repeats):
    """One MLP block forward + backward on [batch*seq, H] in JAX (jit grad) and torch: the GEMMs alone."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n, H, I = batch * seq, cfg.hidden_size, cfg.intermediate_size
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, H)).astype(np.float32)
    ws = [(rng.standard_normal(s) * 0.02).astype(np.float32) for s in [(H, I), (H, I), (I, H)]]

    def f(w, x):
        return jnp.sum(jnp.dot(jax.nn.silu(x @ w[0]) * (x @ w[1]), w[2]))

    g = jax.jit(jax.grad(f))
    jw, jx = [jnp.asarray(w) for w in ws], jnp.asarray(x)
    tw = [torch.tensor(w, requires_grad=True) for w in ws]
    tx = torch.tensor(x)

    jx3 = jx.reshape(batch, seq, H)  # the model's layout: [B, S, H] activations into the dense layers
    g3 = jax.jit(jax.grad(f, argnums=(0, 1)))
    g2 = jax.jit(jax.grad(f, argnums=(0, 1)))

    def jrun():
        jax.block_until_ready(g(jw, jx))

    def jrun2():  # weights and input grads, [B*S, H]
        jax.block_until_ready(g2(jw, jx))

    def jrun3():  # weights and input grads, [B, S, H]: weight grads contract over two dims
        jax.block_until_ready(g3(jw, jx3))

    def trun():
        for w in tw:
            w.grad = None
        ((torch.nn.functional.silu(tx @ tw[0]) * (tx @ tw[1])) @ tw[2]).sum().backward()

    out = {"jax": [], "torch": [], "jax_2d_dx": [], "jax_3d_dx": []}
    runs = (("jax", jrun), ("torch", trun), ("jax_2d_dx", jrun2), ("jax_3d_dx", jrun3))
    for _, fn in runs + runs:  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in runs:
            time.sleep(0.1)
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
    flops = 3 * 2 * 3 * n * H * I
    return {k: {"s": float(np.median(v)), "gflops": flops / float(np.median(v)) / 1e9} for k, v in out.items()}


def dense_chain(cfg, rows: int) -> dict:
    """The training step's dense layers alone, forward + backward (weight grads), in JAX and torch.

    Per layer on ``[rows, H]`` activations: q/k/v/o projections (k + v tiled back to H, so every
    projection's gradient is computed) and the SwiGLU MLP, each with its residual add; then the
    LM head and a fixed random linear loss. No attention, norms, rotary, embedding, softmax loss
    or optimizer: what a step costs if those cost nothing, i.e. a floor for each library's step.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    shapes = [(H, H), (H, kv), (H, kv), (H, H), (H, I), (H, I), (I, H)]
    rng = np.random.default_rng(0)
    ws = [(rng.standard_normal(s) * 0.02).astype(np.float32) for _ in range(L) for s in shapes]
    ws.append((rng.standard_normal((H, V)) * 0.02).astype(np.float32))
    x = rng.standard_normal((rows, H)).astype(np.float32)
    r = rng.standard_normal((rows, V)).astype(np.float32)

    def forward(w, x, r, silu, tile):
        for i in range(L):
            wq, wk, wv, wo, wg, wu, wd = w[7 * i:7 * i + 7]
            x = x + (x @ wq + tile(x @ wk + x @ wv, H // kv)) @ wo
            x = x + (silu(x @ wg) * (x @ wu)) @ wd
        return ((x @ w[-1]) * r).sum()

    g = jax.jit(jax.grad(lambda w, x, r: forward(w, x, r, jax.nn.silu, lambda a, n: jnp.tile(a, (1, n)))))
    jw, jx, jr = [jnp.asarray(w) for w in ws], jnp.asarray(x), jnp.asarray(r)
    tw = [torch.tensor(w, requires_grad=True) for w in ws]
    tx, tr = torch.tensor(x), torch.tensor(r)

    def trun():
        for w in tw:
            w.grad = None
        forward(tw, tx, tr, torch.nn.functional.silu, lambda a, n: a.repeat(1, n)).backward()

    fns = {"jax": lambda: jax.block_until_ready(g(jw, jx, jr)), "torch": trun}
    for fn in fns.values():
        fn()
        fn()
    flops = 3 * 2 * rows * (sum(a * b for a, b in shapes) * L + H * V)
    return {"fns": fns, "flops": flops, "rows": rows}


PEAK_N = 2048


def matmul_peaks() -> dict:
    """The machine's dense float32 matmul rate, measured in the same round-robin: one jitted
    2048^3 matmul in JAX and the same in torch (its thread setting), warmed up."""
    import jax
    import jax.numpy as jnp
    import torch

    a, t = jnp.ones((PEAK_N, PEAK_N), jnp.float32), torch.ones(PEAK_N, PEAK_N)
    mm = jax.jit(lambda x: x @ x)
    fns = {"jax": lambda: jax.block_until_ready(mm(a)), "torch": lambda: t @ t}
    for fn in fns.values():
        fn()
        fn()
    return fns


def plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{r['backbone']}\nP={r['P']}" for r in rows]
    x = np.arange(len(rows))
    for ax, key, title in zip(axes, ["train", "decode"], ["training step", "decode (per token, batch 1)"]):
        ax.bar(x - 0.2, [r[f"{key}_speedup_vs_torch_ref"] for r in rows], 0.4, label="torch reference / JAX")
        hf = [r.get(f"{key}_speedup_vs_transformers") or 0 for r in rows]
        ax.bar(x + 0.2, hf, 0.4, label="transformers Qwen2 / JAX (P=1)")
        ax.axhline(1, color="gray", lw=0.8)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_ylabel("time ratio (> 1: JAX faster)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    B.save_figure(fig, path)


@cli_entry
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny, P in 1 2, 2 rounds")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    ap.add_argument("--P", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (median)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps per implementation first")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=16, help="decode steps timed per call")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=B.RESULTS)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.backbones, args.P, args.repeats, args.chunk, args.warmup = ["tiny"], [1, 2], 2, 4, 1
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    name = args.name or ("vs_torch_quick" if args.quick else "vs_torch")

    import numpy as np
    import torch

    from parscale_jax.config import preset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env0 = B.environment(("torch", "transformers"))
    confs = []
    for bb in args.backbones:
        over, batch, seq = BACKBONES[bb]
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, (batch, seq + 1)).astype(np.int32)
        prompt = rng.integers(0, 256, (args.decode_batch, PROMPT)).astype(np.int32)
        for P in sorted(args.P):
            cfg = preset("tiny", parscale_n=P, **over)
            host_params, jtrain, jdecode, jlogits, jmargins = jax_impl(cfg, batch, seq, args.decode_batch, args.chunk,
                                                             tokens, prompt)
            timps = torch_impls(cfg, host_params, batch, seq, args.decode_batch, args.chunk, tokens, prompt,
                                with_hf=P == 1)
            c = dict(backbone=bb, P=P, cfg=cfg, batch=batch, seq_len=seq, impls={"jax": dict(train=jtrain)},
                     logits_maxdiff={k: float(np.max(np.abs(v["logits"] - jlogits))) for k, v in timps.items()})

            def jdec(f=jdecode):
                t0 = time.perf_counter()
                toks = f()
                return time.perf_counter() - t0, np.asarray(toks)

            c["impls"]["jax"]["decode"] = jdec
            c["chain"], c["chain_t"] = dense_chain(cfg, P * batch * seq), {"jax": [], "torch": []}
            for k, v in timps.items():
                c["impls"][k] = dict(train=v["train"], decode=v["decode"])
            # warm-up (compiles JAX; first torch calls) and greedy agreement of the decoded tokens
            ref_toks = None
            c["decode_tokens_agree"], c["decode_divergence"] = {}, {}
            for k, impl in c["impls"].items():
                _, toks = impl["decode"]()  # before any training step: the same params as JAX's
                if k == "jax":
                    ref_toks = toks
                    marg = jmargins(toks)
                else:
                    c["decode_tokens_agree"][k] = float(np.mean(toks == ref_toks))
                    diff = np.argwhere(toks != ref_toks)
                    if len(diff):  # the first step where the greedy paths part, and JAX's top-2 logit gap there
                        row, step = (int(v) for v in diff[np.argmin(diff[:, 1])])
                        c["decode_divergence"][k] = {"step": step, "jax_top2_margin": float(marg[row, step])}
                for _ in range(args.warmup):
                    impl["train"]()
                impl["train_t"], impl["decode_t"] = [], []
            B.log(f"ready {bb} P={P}: logits max |diff| vs JAX {c['logits_maxdiff']}, greedy tokens agree "
                  f"{c['decode_tokens_agree']}, first divergence {c['decode_divergence']}")
            confs.append(c)
    peak_fns, peak_t = matmul_peaks(), {"jax": [], "torch": []}
    for i in range(args.repeats):  # round-robin over everything
        for k, fn in peak_fns.items():
            time.sleep(0.1)
            t = time.perf_counter()
            fn()
            peak_t[k].append(time.perf_counter() - t)
        for c in confs:
            for k, impl in c["impls"].items():
                time.sleep(0.1)  # let the other library's spinning worker threads go idle
                t = time.perf_counter()
                impl["train"]()
                impl["train_t"].append(time.perf_counter() - t)
                time.sleep(0.1)
                dt, _ = impl["decode"]()
                impl["decode_t"].append(dt / args.chunk)
            for k, fn in c["chain"]["fns"].items():
                time.sleep(0.1)
                t = time.perf_counter()
                fn()
                c["chain_t"][k].append(time.perf_counter() - t)
        B.log(f"round {i + 1}/{args.repeats}")

    components = {}
    for bb in args.backbones:
        over, batch, seq = BACKBONES[bb]
        components[bb] = mlp_component(preset("tiny", **over), batch, seq, args.repeats)
        B.log(f"MLP block {bb}: {components[bb]}")

    rows = []
    for c in confs:
        med = {k: (float(np.median(v["train_t"])), float(np.median(v["decode_t"]))) for k, v in c["impls"].items()}
        r = dict(backbone=c["backbone"], P=c["P"], hidden_size=c["cfg"].hidden_size, layers=c["cfg"].num_hidden_layers,
                 batch=c["batch"], seq_len=c["seq_len"], decode_batch=args.decode_batch,
                 logits_maxdiff=c["logits_maxdiff"], decode_tokens_agree=c["decode_tokens_agree"],
                 decode_divergence=c["decode_divergence"],
                 times={k: {"train_s": v[0], "decode_token_s": v[1], "train_all": c["impls"][k]["train_t"],
                            "decode_all": c["impls"][k]["decode_t"]} for k, v in med.items()})
        r["train_flops"] = F.train_flops_per_token(c["cfg"], c["seq_len"]) * c["batch"] * c["seq_len"]
        r["dense_chain"] = {"rows": c["chain"]["rows"], "flops": c["chain"]["flops"],
                            **{f"{k}_s": float(np.median(v)) for k, v in c["chain_t"].items()},
                            **{f"{k}_all": v for k, v in c["chain_t"].items()}}
        for k in ("torch_ref", "transformers"):
            if k in med:
                r[f"train_speedup_vs_{k}"] = med[k][0] / med["jax"][0]
                r[f"decode_speedup_vs_{k}"] = med[k][1] / med["jax"][1]
        rows.append(r)

    header = ["backbone", "P", "JAX step ms", "torch ref step ms", "ref/JAX", "transformers step ms", "HF/JAX",
              "JAX ms/token", "torch ref ms/token", "ref/JAX", "transformers ms/token", "HF/JAX", "logits max abs diff"]
    table = []
    for r in rows:
        t = r["times"]
        hf = t.get("transformers")
        table.append([r["backbone"], r["P"], f"{t['jax']['train_s'] * 1e3:.1f}", f"{t['torch_ref']['train_s'] * 1e3:.1f}",
                      f"**{r['train_speedup_vs_torch_ref']:.2f}**", f"{hf['train_s'] * 1e3:.1f}" if hf else "—",
                      f"{r['train_speedup_vs_transformers']:.2f}" if hf else "—",
                      f"{t['jax']['decode_token_s'] * 1e3:.2f}", f"{t['torch_ref']['decode_token_s'] * 1e3:.2f}",
                      f"**{r['decode_speedup_vs_torch_ref']:.2f}**", f"{hf['decode_token_s'] * 1e3:.2f}" if hf else "—",
                      f"{r['decode_speedup_vs_transformers']:.2f}" if hf else "—",
                      ", ".join(f"{k} {v:.1e}" for k, v in r["logits_maxdiff"].items())])
    peak = {k: 2 * PEAK_N ** 3 / float(np.median(v)) for k, v in peak_t.items()}
    best = max(peak.values())
    rate_rows = []
    for r in rows:
        t, fl = r["times"], r["train_flops"]
        rates = {k: fl / v["train_s"] / 1e9 for k, v in t.items()}
        r["train_gflops"] = rates
        rate_rows.append([r["backbone"], r["P"], f"{fl / 1e9:.1f}"] + [
            f"{rates[k]:.0f} ({rates[k] * 1e9 / best:.0%})" if k in rates else "—"
            for k in ("jax", "torch_ref", "transformers")] + [f"{fl / best * 1e3:.1f}"])
    goals = []
    for r in rows:
        for k, want, what in (("transformers", 1.5, "transformers' Qwen2ForCausalLM"), ("torch_ref", 1.5, "the PyTorch reference")):
            if (r["backbone"], r["P"], k) not in (("small", 1, "transformers"), ("small", 4, "torch_ref")):
                continue
            got = r[f"train_speedup_vs_{k}"]
            need_s = r["times"][k]["train_s"] / want
            chain = r["dense_chain"]["jax_s"]
            goals.append(f"Goal: the training step at small, P={r['P']}, at least {want}x faster than {what}: "
                         f"**{'met' if got >= want else 'NOT met'}** ({got:.2f}x). It needs a JAX step of "
                         f"{need_s * 1e3:.0f} ms = {r['train_flops'] / need_s / 1e9:.0f} GFLOP/s, "
                         f"{r['train_flops'] / need_s / best:.0%} of the measured matmul peak. JAX's dense-layer "
                         f"chain alone (no attention, norms, rotary, loss or optimizer) took {chain * 1e3:.0f} ms, "
                         f"{chain / need_s:.2f}x that budget.")
    shapes = "; ".join(f"{bb}: H={preset('tiny', **BACKBONES[bb][0]).hidden_size}, "
                       f"I={preset('tiny', **BACKBONES[bb][0]).intermediate_size}, "
                       f"L={preset('tiny', **BACKBONES[bb][0]).num_hidden_layers}, "
                       f"heads {preset('tiny', **BACKBONES[bb][0]).num_attention_heads}/"
                       f"{preset('tiny', **BACKBONES[bb][0]).num_key_value_heads}, "
                       f"T={preset('tiny', **BACKBONES[bb][0]).parscale_n_tokens}, train batch "
                       f"{BACKBONES[bb][1]} x {BACKBONES[bb][2]}" for bb in args.backbones)
    md = [f"Shapes: {shapes}; vocabulary 384, float32, {args.threads} threads (torch.set_num_threads; XLA CPU on "
          f"{os.cpu_count()} cores). Decoding: batch {args.decode_batch}, {PROMPT}-token prompt, {args.chunk} greedy "
          f"steps timed. Median of {args.repeats} rounds after {args.warmup} warm-up training steps (and one decode) per "
          f"implementation, round-robin over all implementations and models; the decode check runs before any "
          f"training step.",
          B.md_table(header, table),
          "Component: one MLP block (gate/up/down matmuls + SiLU) forward + backward on the training batch's "
          "[batch*seq, H] activations, JAX jit grad vs torch autograd (the GEMMs without the rest of the model; "
          "weight grads only), and in JAX with the input grad too, on 2-D [B*S, H] and on the model's 3-D [B, S, H] "
          "layout:\n\n"
          + B.md_table(["backbone", "shape", "JAX ms", "JAX GFLOP/s", "torch ms", "torch GFLOP/s", "torch/JAX",
                        "JAX incl. input grad: [B*S, H] ms", "[B, S, H] ms"],
                       [[bb, f"[{BACKBONES[bb][1] * BACKBONES[bb][2]}, {preset('tiny', **BACKBONES[bb][0]).hidden_size}] x "
                             f"[{preset('tiny', **BACKBONES[bb][0]).hidden_size}, "
                             f"{preset('tiny', **BACKBONES[bb][0]).intermediate_size}]",
                         f"{v['jax']['s'] * 1e3:.1f}", f"{v['jax']['gflops']:.0f}", f"{v['torch']['s'] * 1e3:.1f}",
                         f"{v['torch']['gflops']:.0f}", f"{v['jax']['s'] and v['torch']['s'] / v['jax']['s']:.2f}",
                         f"{v['jax_2d_dx']['s'] * 1e3:.1f}", f"{v['jax_3d_dx']['s'] * 1e3:.1f}"]
                        for bb, v in components.items()]),
          "Floor: the step's dense layers alone (`dense_chain`: per layer q/k/v/o and the SwiGLU MLP with their "
          "residual adds, then the LM head; forward + backward with weight grads, on the step's [P*B*S, H] rows; no "
          "attention, norms, rotary, embedding, softmax loss or optimizer), JAX jit grad vs torch autograd, in the "
          "same round-robin as the steps:\n\n"
          + B.md_table(["backbone", "P", "rows", "GFLOP", "JAX ms", "JAX GFLOP/s", "torch ms", "torch GFLOP/s",
                        "torch/JAX", "JAX step / JAX chain"],
                       [[r["backbone"], r["P"], r["dense_chain"]["rows"], f"{r['dense_chain']['flops'] / 1e9:.1f}",
                         f"{r['dense_chain']['jax_s'] * 1e3:.1f}",
                         f"{r['dense_chain']['flops'] / r['dense_chain']['jax_s'] / 1e9:.0f}",
                         f"{r['dense_chain']['torch_s'] * 1e3:.1f}",
                         f"{r['dense_chain']['flops'] / r['dense_chain']['torch_s'] / 1e9:.0f}",
                         f"{r['dense_chain']['torch_s'] / r['dense_chain']['jax_s']:.2f}",
                         f"{r['times']['jax']['train_s'] / r['dense_chain']['jax_s']:.2f}"] for r in rows]),
          f"Training-step FLOP rate: model FLOPs per step (`flops.train_flops_per_token` x tokens: 3 x the forward's "
          f"matmuls and attention) / step time, and its fraction of the machine's dense float32 matmul rate measured "
          f"in the same round-robin ({PEAK_N}^3: JAX {peak['jax'] / 1e9:.0f} GFLOP/s, torch {peak['torch'] / 1e9:.0f} "
          f"GFLOP/s; the fraction is of the larger):\n\n"
          + B.md_table(["backbone", "P", "GFLOP/step", "JAX GFLOP/s", "torch ref GFLOP/s", "transformers GFLOP/s",
                        "step at the peak (ms)"], rate_rows),
          "\n".join(f"- {g}" for g in goals),
          "Sanity: greedy decoded tokens agreeing with JAX's (fraction; where the paths part, the step and JAX's "
          "top-1 minus top-2 logit there: a near-tie of the random-init model, where float32 rounding decides): "
          + "; ".join(f"{r['backbone']} P={r['P']}: " + ", ".join(
              f"{k} {v:.2f}" + (f" (parts at step {r['decode_divergence'][k]['step']}, margin "
                                f"{r['decode_divergence'][k]['jax_top2_margin']:.1e})" if k in r["decode_divergence"] else "")
              for k, v in r["decode_tokens_agree"].items()) for r in rows) + ".",
          f"![vs torch]({name}.png)"]
    os.makedirs(args.out, exist_ok=True)
    plot(rows, os.path.join(args.out, f"{name}.png"))
    env = B.environment(("torch", "transformers"))
    env["load_average_at_start"] = env0["load_average_1_5_15"]
    B.write_results(name, {"rows": rows, "mlp_component": components, "matmul_peak_flops": peak, "settings": {"backbones": {b: BACKBONES[b] for b in args.backbones},
                                                      "P": args.P, "repeats": args.repeats, "threads": args.threads,
                                                      "decode_batch": args.decode_batch, "chunk": args.chunk,
                                                      "optimizer": {"lr": LR, "betas": BETAS, "eps": EPS,
                                                                    "weight_decay": WD}},
                           "env": env},
                    "\n\n".join(md), "JAX vs PyTorch (CPU)", args.out)
    print("\n\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
