"""Make beyond_chinchilla_reference.json: inference-aware optima from Sardana et al.'s official code.

Not run by the tests (they read the JSON). It imports the official code of "Beyond
Chinchilla-Optimal" (github.com/nikhilsardana/beyond-chinchilla; numpy and scipy suffice) and
records, for Chinchilla-optimal 7B/13B/30B/70B quality x lifetime requests (70 in + 215 out
tokens each), the lifetime-FLOP optimum (compute_optimal.py) and the lifetime-dollar optimum
(cost_optimal.py) with fp8 and bf16 inference on H100s at their default prices, for their
default utilisations and for one where decoding out-runs prefill::

    PYTHONPATH=/path/to/beyond-chinchilla python tests/data/beyond_chinchilla_reference.py \
        tests/data/beyond_chinchilla_reference.json
"""
from __future__ import annotations

import contextlib
import io
import json
import sys

QUALITY = (7e9, 13e9, 30e9, 70e9)
REQUESTS = (0.0, 1e8, 1e9, 1e10, 1e11)
MFUS = ((0.5, 0.5, 0.01), (0.4, 0.3, 0.6))  # (train, prefill, decode)
IN_TOK, OUT_TOK = 70, 215


def main(out: str) -> None:
    from compute_optimal import calculate_compute_optimal_model
    from cost_calculator import CostModel, cost_per_flop, total_cost
    from cost_optimal import calculate_cost_optimal_model
    from model_calculator import Model, total_flops
    from utils import ChinchillaConstants

    cc = ChinchillaConstants()
    recs = []
    quiet = contextlib.redirect_stdout(io.StringIO())
    with quiet:
        for n in QUALITY:
            loss = Model(True, cc, parameters=n).loss
            for req in REQUESTS:
                t_in, t_out = req * IN_TOK, req * OUT_TOK
                m = calculate_compute_optimal_model(Model(True, cc, loss=loss), t_in + t_out)
                recs.append(dict(quality=n, requests=req, objective="flops", loss=loss, params=m.params,
                                 tokens=m.train_tokens, total=total_flops(m.params, m.train_tokens, t_in + t_out)))
                for dtype in ("fp8", "bf16"):
                    for u_tr, u_in, u_out in MFUS:
                        base = CostModel(cost_per_flop("H100", "bf16"), cost_per_flop("H100", dtype), u_tr, u_in, u_out,
                                         chinchilla_style=True, constants=cc, loss=loss)
                        m = calculate_cost_optimal_model(base, t_in, t_out)
                        recs.append(dict(quality=n, requests=req, objective="dollars", infer_dtype=dtype,
                                         mfu=[u_tr, u_in, u_out], loss=loss, params=m.params, tokens=m.train_tokens,
                                         total=total_cost(m, t_in, t_out)))
    meta = {"made_by": "tests/data/beyond_chinchilla_reference.py",
            "tool": "nikhilsardana/beyond-chinchilla@190f70e365dc75037a2b3178609d00243f24b4b9",
            "setting": "Hoffmann et al. constants; H100 at $2/h; bf16 training; 70 in + 215 out tokens per request"}
    with open(out, "w") as f:
        f.write(json.dumps({"meta": meta})[:-1] + ', "records": [\n')
        f.write(",\n".join(json.dumps(r) for r in recs) + "\n]}\n")


if __name__ == "__main__":
    main(sys.argv[1])
