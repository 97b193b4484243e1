"""The cuDNN attention path on the CPU: its wrapper (prefix as dummy queries, left padding rolled
and passed as lengths, shard_map) around JAX's XLA implementation of the same cuDNN call
(``cudnn_xla``), against the float64 reference of tests/test_attention.py; and the head_dim /
dtype / compute-capability checks of ``attention.resolve``."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parscale_jax import attention as A
from parscale_jax.errors import UserError

from test_attention import B, HD, PADS, T, inputs, np_attention  # noqa: F401 (inputs: a fixture)


@pytest.mark.parametrize("with_prefix", [False, True], ids=["P1-no-prefix", "P4-prefix"])
def test_cudnn_path_matches_float64_on_real_rows(inputs, with_prefix):  # noqa: F811
    x = inputs
    seg = jnp.asarray(x["valid"].astype(np.int32))
    real = x["valid"][:, :, None, None]
    dout = np.where(real, x["dout"], 0.0).astype(np.float32)  # padded rows' outputs are not used

    def f(q, k, v, pk, pv):
        return A.self_attention(q, k, v, (pk, pv) if with_prefix else None, seg, A.CUDNN_XLA)

    args = [jnp.asarray(x[n]) for n in ("q", "k", "v", "pk", "pv")]
    out, vjp = jax.vjp(f, *args)
    grads = vjp(jnp.asarray(dout))
    ref, backward = np_attention(x["q"], x["k"], x["v"], (x["pk"], x["pv"]) if with_prefix else None, x["valid"])
    ref_grads = backward(dout.astype(np.float64))
    out = np.asarray(out)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5, rtol=1e-5)
    # the documented difference: a padded query's output is zero (the rule: attention over the padding)
    assert np.all(out[1, :PADS[1]] == 0) and np.abs(ref[1, :PADS[1]]).max() > 1e-2
    names = ["dq", "dk", "dv"] + (["dpk", "dpv"] if with_prefix else [])
    for name, g, r in zip(names, grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-5, rtol=1e-5, err_msg=name)
    if with_prefix:
        assert np.abs(ref_grads[3]).max() > 1e-2


def test_resolve_checks_head_dim_dtype_and_capability(capsys):
    assert A.resolve("auto", "gpu", jnp.bfloat16, 128, (8, 0)) == "cudnn"
    assert A.resolve("auto", "gpu", jnp.bfloat16, 160, (9, 0)) == "cudnn"  # Hopper: up to 256
    assert capsys.readouterr().err == ""
    assert A.resolve("auto", "gpu", jnp.bfloat16, 160, (8, 0)) == "chunked"  # Ampere: up to 128
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chunked" in err[0] and "head_dim 160" in err[0] and "8.0" in err[0]
    assert A.resolve("auto", "gpu", jnp.bfloat16, 100, (9, 0)) == "chunked"  # not a multiple of 8
    assert A.resolve("auto", "gpu", jnp.bfloat16, 64, (7, 5)) == "chunked"  # pre-Ampere
    capsys.readouterr()
    for args, match in (((jnp.bfloat16, 160, (8, 0)), "head_dim 160"), ((jnp.float32, 64, (9, 0)), "16-bit"),
                        ((jnp.float16, 264, (9, 0)), "head_dim 264"), ((jnp.bfloat16, 64, (7, 0)), "capability 8.0")):
        with pytest.raises(UserError, match=match) as e:
            A.resolve("cudnn", "gpu", *args)
        assert "\n" not in str(e.value) and "use auto or chunked" in str(e.value)
    # the target of a deviceless compile: resolve and JAX's own cuDNN check both see it
    from jax._src.cudnn import fused_attention_stablehlo as fa

    with A.gpu_target((8, 0)):
        assert A.resolve("auto", "gpu", jnp.bfloat16, 160) == "chunked"
        assert not fa.check_compute_capability("9.0")
    with A.gpu_target((9, 0)):
        assert A.resolve("cudnn", "gpu", jnp.bfloat16, 160) == "cudnn"
        assert fa.check_compute_capability("9.0") and not fa.check_compute_capability("10.0")
    assert not fa.check_compute_capability("9.0")  # restored: the CPU backend has none
