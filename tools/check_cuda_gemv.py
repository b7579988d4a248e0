#!/usr/bin/env python3
"""Check the CUDA GEMV (``jaxpipe/kernels/gemv8.cu``) on a GPU: every variant (plain, residual, RMSNorm,
SwiGLU, SwiGLU + residual) at Llama-2-7B and SmolLM2 shapes, int8 and fp8, against a float64 NumPy reference
of the same ops with the model's bf16 roundings. One JSON line per case; exit status 1 if any case is off
by more than one bf16 ulp of the result plus one bf16 ulp of the row in every term (``max_ratio`` > 1).

    python3 tools/check_cuda_gemv.py            # on a CUDA machine with nvcc
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from jaxpipe.kernels import cuda_gemv  # noqa: E402
from jaxpipe.quantize import quantize  # noqa: E402

# (name, K, N, variant): the decode matmuls and what the model fuses into each (down_tp: no residual, as under TP).
CASES = [("qkv", 4096, 12288, "norm"), ("o", 4096, 4096, "res"), ("gate_up", 4096, 22016, "norm"),
         ("down", 11008, 4096, "swiglu_res"), ("down_tp", 11008, 4096, "swiglu"), ("o_plain", 4096, 4096, ""),
         ("smollm2_qkv", 576, 960, "norm"), ("smollm2_o", 576, 576, "res"), ("smollm2_gate_up", 576, 3072, "norm"),
         ("smollm2_down", 1536, 576, "swiglu_res")]


def r16(a) -> np.ndarray:
    """Round to bfloat16 and back to float64."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def reference(x, normw, q, s, res, layer, k, variant, eps):
    """float64 result of the variant's ops, rounded to bf16 where the model rounds; and sum |h| |q| s."""
    xd = np.asarray(x, np.float64)
    if variant == "norm":
        r = 1 / np.sqrt(np.mean(xd ** 2) + eps)
        h = r16(np.asarray(normw[layer], np.float64) * r16(xd * r))
    elif variant.startswith("swiglu"):
        g, u = xd[:, :k], xd[:, k:]
        h = r16(r16(g * r16(1 / (1 + np.exp(-g)))) * u)
    else:
        h = xd
    qd = np.asarray(q[layer]).astype(np.float64)
    y = r16((h @ qd) * s[layer])
    if variant.endswith("res"):
        y = r16(np.asarray(res, np.float64) + y)
    return y, (np.abs(h) @ np.abs(qd)) * s[layer]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    p.add_argument("--layers", type=int, default=3)
    args = p.parse_args(argv)
    t0 = time.time()
    if not cuda_gemv.available():
        print(json.dumps({"error": "the CUDA GEMV is not available here (a CUDA GPU and nvcc are needed)"}))
        return 1
    print(json.dumps({"available": True, "build_s": round(time.time() - t0, 1)}), flush=True)
    rng = np.random.default_rng(0)
    layer, eps, worst = args.layers - 1, 1e-5, 0.0
    for kind in args.kinds:
        for name, k, n, variant in CASES:
            q, s = quantize(rng.standard_normal((args.layers, k, n)).astype(np.float32) * 0.02, kind)
            q, s = np.asarray(q), np.asarray(s, np.float32)
            width = 2 * k if variant.startswith("swiglu") else k
            x = (rng.standard_normal((1, width)) * (3.0 if variant == "norm" else 1.0)).astype(ml_dtypes.bfloat16)
            normw = (1 + 0.1 * rng.standard_normal((args.layers, k))).astype(ml_dtypes.bfloat16)
            res = rng.standard_normal((1, n)).astype(ml_dtypes.bfloat16)
            want, scale_of_terms = reference(x, normw, q, s, res, layer, k, variant, eps)
            kw = {}
            if variant == "norm":
                kw = {"norm": jnp.asarray(normw), "eps": eps}
            if variant.startswith("swiglu"):
                kw["swiglu"] = True
            if variant.endswith("res"):
                kw["residual"] = jnp.asarray(res)
            # Every variant is built for both kinds; where layer_matmul leaves a shape to Pallas (fp8 qkv, down),
            # check the kernel at int8's tiling.
            tiling = cuda_gemv.tiling_for(1, k, n, q.dtype) or cuda_gemv.tiling_for(1, k, n, jnp.int8)
            f = jax.jit(lambda x, w, sc, i: cuda_gemv.gemv8(x, w, sc, i, tiling=tiling, **kw))
            got = np.asarray(f(jnp.asarray(x), jnp.asarray(q), jnp.asarray(s), jnp.int32(layer)), np.float64)
            err = np.abs(got - want)
            ulp = np.abs(want) * 2.0 ** -7 + 1e-30
            ratio = float((err / (ulp + 2.0 ** -8 * scale_of_terms)).max())
            worst = max(worst, ratio)
            print(json.dumps({"kind": kind, "case": name, "variant": variant or "plain", "tiling": tiling,
                              "max_ratio": round(ratio, 6), "over_1ulp": int((err > ulp).sum()),
                              "exact_fraction": round(float((err == 0).mean()), 6)}), flush=True)
    print(json.dumps({"summary": True, "worst_ratio": round(worst, 6), "ok": worst <= 1.0}))
    return 0 if worst <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
