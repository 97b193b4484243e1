"""Tests of the inference-cost protocols of parscale_jax.scaling: the paper's against the authors'
own tool (cost_analysis.py on llm-analysis, numbers in tests/data/paper_cost_reference.json), the
project's against hand calculations, and the released-model presets against the hub's names."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from parscale_jax import scaling as sc

DATA = Path(__file__).resolve().parent / "data"
GiB = 2 ** 30


# ---------------------------------------------------------------------------- the paper's protocol
@pytest.fixture(scope="module")
def authors() -> dict[tuple, tuple[float, float]]:
    """(hidden, P, batch, length) -> (memory bytes, latency s) from the authors' cost_analysis.py."""
    d = json.loads((DATA / "paper_cost_reference.json").read_text())
    assert d["columns"] == ["hidden_size", "intermediate_size", "P", "batch", "length", "memory_bytes", "latency_s"]
    return {(H, P, b, n): (m, t) for H, I, P, b, n, m, t in d["records"]}


def test_paper_engine_equals_the_authors_tool(authors):
    hw = sc.HARDWARE["a100"]
    widths = {896: 4864, 1024: 5504, 1280: 6912, 1536: 8320, 2048: 11008, 2560: 13824}
    assert len(authors) == 6 * 4 * 4 * 4
    for (H, P, b, n), (m, t) in authors.items():
        shape = sc.ModelShape(H, widths[H], 36, 16, 2, H / 16, 151936, 48, True)
        out = sc.llm_analysis_cost(shape, P, b, hw, input_tokens=n, output_tokens=n)
        assert out["memory_bytes"] == pytest.approx(m, rel=1e-9), (H, P, b, n)
        assert out["latency_s"] == pytest.approx(t, rel=1e-9), (H, P, b, n)


def _authors_ratios(authors, batch: int) -> dict[int, tuple[float, float]]:
    """The paper's comparison worked out here from the authors' numbers: metrics averaged over the
    four lengths, dense curve through the real 1.6B/2.8B/4.4B models at their observed losses."""
    avg = {(H, P): np.mean([authors[(H, P, batch, n)] for n in (64, 128, 256, 512)], axis=0)
           for H in (1536, 2048, 2560) for P in (1, 2, 4, 8)}
    dense_loss = [1.0213, 1.0451, 1.0817]  # Stack-V2-Python, P=1: 4.4B, 2.8B, 1.6B (increasing)
    dense = [avg[(2560, 1)], avg[(2048, 1)], avg[(1536, 1)]]
    out = {}
    for P, loss in ((2, 1.0623), (4, 1.049), (8, 1.0383)):  # 1.6B at P streams, observed
        d = [np.interp(loss, dense_loss, [x[i] for x in dense]) for i in (0, 1)]
        out[P] = tuple((d[i] - avg[(1536, 1)][i]) / (avg[(1536, P)][i] - avg[(1536, 1)][i]) for i in (0, 1))
    return out


def test_paper_protocol_reproduces_the_headline_and_figure_4(authors, tmp_path, capsys):
    ref = _authors_ratios(authors, batch=1)
    assert ref[8][0] == pytest.approx(22.0, rel=0.10) and ref[8][1] == pytest.approx(6.0, rel=0.10)
    base = np.mean([authors[(1536, 1, 1, n)] for n in (64, 128, 256, 512)], axis=0)
    assert base[0] / GiB == pytest.approx(3.44, rel=0.10) and base[1] == pytest.approx(0.48, rel=0.10)
    out = tmp_path / "cost.json"
    assert sc.main(["cost", "--protocol", "paper", "--P", "2", "4", "8", "--batch", "1", "2", "--json", str(out)]) == 0
    capsys.readouterr()
    res = json.loads(out.read_text())
    assert (res["P"], res["batch"]) == (8, 1)
    assert res["memory_ratio"] == pytest.approx(22.0, rel=0.10) and res["latency_ratio"] == pytest.approx(6.0, rel=0.10)
    for b in (1, 2):
        want = _authors_ratios(authors, batch=b)
        for r in (r for r in res["rows"] if r["batch"] == b and r["P"] > 1):
            assert (r["memory_ratio"], r["latency_ratio"]) == pytest.approx(want[r["P"]], rel=1e-9)
    r1 = next(r for r in res["rows"] if (r["batch"], r["P"]) == (1, 2))
    assert r1["base"]["memory_bytes"] == pytest.approx(base[0], rel=1e-9)
    assert r1["base"]["latency_s"] == pytest.approx(base[1], rel=1e-9)


# ---------------------------------------------------------------------------- the project's protocol
TINY = sc.ModelShape(hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                     head_dim=4, vocab_size=10, prefix_tokens=2, tie_embeddings=False)

# Hand calculation, P=2, batch 1, 2 prompt tokens, 2 output tokens (prefill + 1 decode step), bf16,
# prefix read from the cache. (FLOPs, bytes) per operator, each worked out from the shapes:
# prefill: 2 sequences (streams) x 2 tokens = 4 rows, no past tokens; 2 positions after the gate.
PREFILL = [
    (0, 1 * 2 * 8 * 2 + 4 * 8 * 2),                    # embed: gather 2 rows, write 4 copies
    (2 * 4 * 8 * 8, (64 + 8) * 2 + 4 * (8 + 8) * 2),   # q_proj 8->8 + bias
    (2 * 4 * 8 * 4, (32 + 4) * 2 + 4 * (8 + 4) * 2),   # k_proj 8->4 + bias
    (2 * 4 * 8 * 4, (32 + 4) * 2 + 4 * (8 + 4) * 2),   # v_proj
    # attention: query i sees 2 prefix + (i+1) keys: 3 + 4 = 7 keys per sequence and head;
    # 4 FLOPs per (key, dim): 4*2 seqs*2 heads*4 dims*7; bytes: q in + o out (4 rows x 8) and the
    # cache of 2 sequences x 4 positions x (K, V) x 1 head x 4 dims.
    (4 * 2 * 2 * 4 * 7, 2 * 4 * 8 * 2 + 2 * 4 * 2 * 1 * 4 * 2),
    (2 * 4 * 8 * 8, 64 * 2 + 4 * 16 * 2),              # o_proj 8->8
    (2 * 4 * 8 * 16, 128 * 2 + 4 * 24 * 2),            # gate_proj 8->16
    (2 * 4 * 8 * 16, 128 * 2 + 4 * 24 * 2),            # up_proj
    (2 * 4 * 16 * 8, 128 * 2 + 4 * 24 * 2),            # down_proj 16->8
    (0, 2 * 4 * 8 * 2 + 8 * 2), (0, 2 * 4 * 8 * 2 + 8 * 2),  # 2 rmsnorms
    (0, 3 * 4 * 8 * 2), (0, 3 * 4 * 8 * 2),            # 2 residual adds
    (0, 3 * 4 * 16 * 2),                               # silu * up
    (0, 2 * 4 * 8 * 2 + 8 * 2),                        # final norm, every position of 2 streams
    (2 * 2 * 16 * 8, (128 + 8) * 2 + 2 * (16 + 8) * 2),  # aggregator 16->8 + bias (2 positions)
    (2 * 2 * 8 * 2, (16 + 2) * 2 + 2 * (8 + 2) * 2),   # aggregator 8->2 + bias
    (0, 2 * (16 + 2 + 8) * 2),                         # weighted sum of the 2 streams
    (2 * 2 * 8 * 10, 80 * 2 + 2 * (8 + 10) * 2),       # lm_head 8->10 (2 positions)
]
# decode: 2 sequences x 1 token = 2 rows, 2 real tokens cached; query sees 2 + 2 + 1 = 5 keys.
DECODE = [
    (0, 1 * 1 * 8 * 2 + 2 * 8 * 2),
    (2 * 2 * 8 * 8, (64 + 8) * 2 + 2 * 16 * 2),
    (2 * 2 * 8 * 4, (32 + 4) * 2 + 2 * 12 * 2),
    (2 * 2 * 8 * 4, (32 + 4) * 2 + 2 * 12 * 2),
    (4 * 2 * 2 * 4 * 5, 2 * 2 * 8 * 2 + 2 * 5 * 2 * 1 * 4 * 2),
    (2 * 2 * 8 * 8, 64 * 2 + 2 * 16 * 2),
    (2 * 2 * 8 * 16, 128 * 2 + 2 * 24 * 2),
    (2 * 2 * 8 * 16, 128 * 2 + 2 * 24 * 2),
    (2 * 2 * 16 * 8, 128 * 2 + 2 * 24 * 2),
    (0, 2 * 2 * 8 * 2 + 16), (0, 2 * 2 * 8 * 2 + 16),
    (0, 3 * 2 * 8 * 2), (0, 3 * 2 * 8 * 2),
    (0, 3 * 2 * 16 * 2),
    (0, 2 * 2 * 8 * 2 + 16),
    (2 * 16 * 8, (128 + 8) * 2 + (16 + 8) * 2),
    (2 * 8 * 2, (16 + 2) * 2 + (8 + 2) * 2),
    (0, (16 + 2 + 8) * 2),
    (2 * 8 * 10, 80 * 2 + (8 + 10) * 2),
]


def test_project_cost_matches_hand_calculation():
    hw = sc.Hardware("toy", peak_flops=1000.0, bandwidth=1000.0, memory_bytes=1e9)
    out = sc.inference_cost(TINY, 2, 1, hw, input_tokens=2, output_tokens=2, prefix_mode="cache")
    assert out["prefill_flops"] == sum(f for f, _ in PREFILL) == 5952
    assert out["prefill_bytes"] == sum(b for _, b in PREFILL)
    assert out["decode_flops"] == sum(f for f, _ in DECODE)
    assert out["decode_bytes"] == sum(b for _, b in DECODE)
    # roofline: each operator at max(FLOPs / (peak * 0.7), bytes / (bandwidth * 0.9))
    t = lambda ops: sum(max(f / 700.0, b / 900.0) for f, b in ops)  # noqa: E731
    assert out["prefill_s"] == pytest.approx(t(PREFILL), rel=1e-12)
    assert out["latency_s"] == pytest.approx(t(PREFILL) + t(DECODE), rel=1e-12)
    # parameters: layer (q 72 + k 36 + v 36 + o 64 + mlp 384 + norms 16) + final norm 8
    #   + prefix 2*1 layer*1 head*2 tokens*4 dims*2 streams + aggregator 2*(64+8+1)+8 + untied emb 2*80
    assert out["params"] == 608 + 8 + 32 + 154 + 160
    # weights: every parameter but the prefix (it is counted once, in the cache)
    assert out["weights_bytes"] == 2 * (608 + 8 + 154 + 160)
    # cache: 1 layer x (K, V) x 1 head x 4 dims x 2 bytes = 16 per token; 2 streams x (2 in + 2 out),
    # plus the 2 prefix entries of each stream once
    assert out["kv_cache_bytes"] == 16 * (2 * 4 + 2 * 2)
    # activations: residual [4 x 8] + the MLP's gate and up [4 x 16] each, in bf16
    assert out["activation_bytes"] == 2 * (4 * 8 + 2 * 4 * 16)
    assert out["memory_bytes"] == 2 * 930 + 192 + 320
    assert out["fits_in_memory"] == 1.0
    small = sc.Hardware("toy", 1000.0, 1000.0, memory_bytes=2 * 930 + 192 + 319)
    assert sc.inference_cost(TINY, 2, 1, small, input_tokens=2, output_tokens=2)["fits_in_memory"] == 0.0
    # batch 3: every row adds its own tokens, the prefix stays once per stream
    three = sc.inference_cost(TINY, 2, 3, hw, input_tokens=2, output_tokens=2)
    assert three["kv_cache_bytes"] == 16 * (3 * 2 * 4 + 2 * 2)


def test_project_cost_prefix_as_tokens_runs_prefix_through_the_layers():
    """2 prefix + 2 prompt tokens = 4 tokens per stream, 8 rows; each stream caches its own prefix."""
    hw = sc.Hardware("toy", 1000.0, 1000.0, 1e9)
    out = sc.inference_cost(TINY, 2, 1, hw, input_tokens=2, output_tokens=2, prefix_mode="tokens")
    linear = 2 * 8 * (8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16)  # 8 rows through every projection
    attention = 4 * 2 * 2 * 4 * (1 + 2 + 3 + 4)  # causal over 4 tokens
    head = 4 * (2 * 16 * 8 + 2 * 8 * 2 + 2 * 8 * 10)  # aggregator + lm_head on the 4 positions
    assert out["prefill_flops"] == linear + attention + head
    assert out["kv_cache_bytes"] == 16 * 2 * (2 + 2 + 2)
    # P = 1 has no prefix in either convention
    a = sc.inference_cost(TINY, 1, 3, hw, input_tokens=5, output_tokens=4, prefix_mode="tokens")
    b = sc.inference_cost(TINY, 1, 3, hw, input_tokens=5, output_tokens=4, prefix_mode="cache")
    assert a == b


def test_decode_steps_sum_one_pass_per_token():
    """The vectorised decode equals one prefill-free pass per generated token, added up here."""
    hw = sc.HARDWARE["a100"]
    shape = sc.shape_from_preset("parscale-1.8b")
    full = sc.inference_cost(shape, 4, 2, hw, input_tokens=16, output_tokens=9)
    first = sc.inference_cost(shape, 4, 2, hw, input_tokens=16, output_tokens=1)
    steps = 0.0
    for j in range(8):  # decode step j: one token per sequence after 16 + j cached ones
        ops = sc.cost._pass_ops(shape, 4, 2, 1, 16 + j, 2.0, 2.0, 2.0)
        steps += sc.cost._pass_totals(ops, hw, 0.7, 0.9)[0]
    assert full["decode_s"] == pytest.approx(steps, rel=1e-12)
    assert full["prefill_s"] == first["prefill_s"] and first["decode_s"] == 0.0


def test_dense_equivalent_shape_has_the_target_parameter_count():
    base = sc.shape_from_preset("parscale-1.8b")
    assert base.nonembedding_params() == 1_571_472_384
    dense = sc.dense_shape_for_params(base, 2.9e9)
    assert dense.nonembedding_params() == pytest.approx(2.9e9, rel=1e-10)
    assert dense.hidden_size / base.hidden_size == pytest.approx(dense.intermediate_size / base.intermediate_size)


def test_project_protocol_parscale_is_cheaper_to_grow_at_batch_one():
    """Small batches are memory-bound: P streams cost much less extra than the same-loss dense model."""
    c = sc.LawConstants(0.69, 0.0113, 0.189, 0.393)
    rows = sc.compare_at_equal_loss(sc.shape_from_preset("parscale-1.8b"), [1, 8], [1], sc.HARDWARE["a100"], c)
    r8 = next(r for r in rows if r["P"] == 8)
    loss = 0.69 + (0.0113e9 / r8["N_dense"]) ** 0.189
    assert r8["loss"] == pytest.approx(loss, rel=1e-12)
    assert r8["memory_ratio"] > 5 and r8["latency_ratio"] > 2


def test_cost_cli_prints_both_protocols_and_measured(tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps([{"P": 8, "batch": 1, "latency_s": 0.2, "model": "parscale-1.8b"}]))
    out = tmp_path / "both.json"
    assert sc.main(["cost", "--P", "8", "--batch", "1", "--lengths", "64", "--measured", str(tmp_path / "m.json"),
                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "paper protocol" in text and "project protocol" in text and "measured vs" in text
    res = json.loads(out.read_text())
    for proto in ("paper", "project"):
        r = res[proto]
        row = next(x for x in r["rows"] if x["P"] == 8)
        assert r["memory_ratio"] == row["memory_increase_dense"] / row["memory_increase_parscale"]
        for part in ("weights_bytes", "kv_cache_bytes", "activation_bytes"):
            assert part in row["parscale"]


# ---------------------------------------------------------------------------- released presets
def test_released_presets_tie_embeddings_as_the_hub_names_say():
    """ParScale-{0.7B,...,4.7B} are named by total size: with one embedding matrix the count is
    nearer the name than with two, for every family; the backbones are the paper's shapes."""
    from parscale_jax import model as M
    from parscale_jax.config import preset

    names = {"0.7b": "0.5b", "0.9b": "0.7b", "1.3b": "1.1b", "1.8b": "1.6b", "3b": "2.8b", "4.7b": "4.4b"}
    for released, paper in names.items():
        cfg = preset(f"parscale-{released}")
        params = M.abstract_params(M.make_model(cfg))
        tied, nonemb = M.count_params(params), M.count_params(params, non_embedding=True)
        untied = tied + cfg.vocab_size * cfg.hidden_size  # a separate LM head
        size = float(released[:-1]) * 1e9
        assert abs(tied - size) < abs(untied - size), released
        assert nonemb == sc.shape_from_preset(f"paper-{paper}").nonembedding_params()
        assert {k: v for k, v in cfg.to_dict().items() if k != "tie_word_embeddings"} == \
            {k: v for k, v in preset(f"paper-{paper}").to_dict().items() if k != "tie_word_embeddings"}
