#!/usr/bin/env python3
"""Check and time the tensor-core CUDA kernel for 8-bit weights at 2-32 rows (``jaxpipe/kernels/gemm8.cu``).

Per Llama-2-7B decode matmul (32 stacked layers in a ``fori_loop``, the layer index traced, as the model
runs them), per row count and weight kind: cuBLAS bf16 (the peer), the Pallas kernel ``layer_matmul`` ran
before, and the CUDA kernel at every built tiling and split of K. Every CUDA variant is first checked
against float64 NumPy (bound: one bf16 ulp of the result plus 2^-14 of sum |x| |w| s) and is not timed
when it fails. One JSON line per measurement, to stdout and ``$OUT/gemm.jsonl``.

    python3 tools/bench_cuda_gemm.py --m 32 16 --kinds int8 fp8
    python3 tools/bench_cuda_gemm.py --m 32 --tilings 2,8,64,8 --split-of o=4 gate_up=1,2 --rotate 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpipe.kernels import cuda_gemv, quant_matmul as qm  # noqa: E402

SHAPES = {"qkv": (4096, 12288), "o": (4096, 4096), "gate_up": (4096, 22016), "down": (11008, 4096)}
LAYERS = 32


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, nargs="+", default=[32, 16])
    p.add_argument("--kinds", nargs="+", default=["int8", "fp8"], choices=["int8", "fp8"])
    p.add_argument("--gemms", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--split-of", nargs="*", default=[], metavar="GEMM=S[,S]",
                   help="splits to try for one matmul instead of --splits, e.g. o=4 gate_up=1,2")
    p.add_argument("--rotate", type=int, nargs="+", default=[0], choices=[0, 1])
    p.add_argument("--tilings", nargs="*", default=[], metavar="MT,NT,BK,STAGES",
                   help="built tilings to try (default: all of GEMM_TILINGS)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=400.0)
    p.add_argument("--bandwidth-gbps", type=float, default=3430.0, help="for the fraction of the bytes floor")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    sink = open(os.path.join(args.out, "gemm.jsonl"), "a") if args.out else None

    def emit(**rec):
        line = json.dumps(rec)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    if not cuda_gemv.available():
        emit(error="the CUDA kernels are not available here (a CUDA GPU and nvcc are needed)")
        return 1
    emit(section="env", device=jax.devices()[0].device_kind, build_s=round(time.perf_counter() - t0, 1))

    def loop(fn):
        def run(x, w, s):
            return jax.lax.fori_loop(0, LAYERS, lambda l, y: fn(x, w, s, l),
                                     jnp.zeros(x.shape[:-1] + (w.shape[-1],), x.dtype))
        return jax.jit(run)

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        jax.block_until_ready(f(*a))
        t = time.perf_counter()
        outs = [f(*a) for _ in range(args.reps)]
        jax.block_until_ready(outs)
        return (time.perf_counter() - t) / args.reps * 1e3

    def check(fn, x, w, s):
        """fn's result at the last layer against float64 NumPy; returns max error / bound."""
        layer = w.shape[0] - 1
        y = np.asarray(jax.jit(fn)(x, w, s, jnp.int32(layer)).astype(jnp.float32), np.float64)
        xd = np.asarray(x.astype(jnp.float32), np.float64)
        wd = np.asarray(w[layer].astype(jnp.float32), np.float64)
        sd = np.asarray(s[layer], np.float64)
        ref, mag = (xd @ wd) * sd, (np.abs(xd) @ np.abs(wd)) * sd
        bound = 2.0 ** -8 * np.abs(ref) + 2.0 ** -14 * mag + 1e-30
        return float(np.max(np.where(np.isfinite(y), np.abs(y - ref) / bound, np.inf)))

    split_of = {kv.split("=")[0]: [int(v) for v in kv.split("=")[1].split(",")] for kv in args.split_of}
    rng = jax.random.PRNGKey(0)
    for gi, g in enumerate(args.gemms):
        k, n = SHAPES[g]
        kq = jax.random.fold_in(rng, gi)
        bits = jax.random.randint(kq, (LAYERS, k, n), -127, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(jax.random.fold_in(kq, 1), (LAYERS, n), jnp.float32, 0.5, 1.5) / (127 * math.sqrt(k))
        wb = (bits.astype(jnp.bfloat16) * (1 / (127 * math.sqrt(k)))).astype(jnp.bfloat16)
        for m in args.m:
            x = jax.random.normal(jax.random.fold_in(kq, 2 + m), (m, k), jnp.float32).astype(jnp.bfloat16)
            ms = timed(loop(lambda x, w, s, l: x @ w[l]), x, wb, None)
            floor = LAYERS * k * n * 2 / (args.bandwidth_gbps * 1e6)
            emit(gemm=g, m=m, kind="bf16", impl="cublas", ms=round(ms, 4), floor_frac=round(floor / ms, 3))
            for kind in args.kinds:
                w = bits if kind == "int8" else jax.lax.bitcast_convert_type(bits & jnp.int8(-65), jnp.float8_e4m3fn)
                ws = s if kind == "int8" else s * (127 / 1.875)
                floor = LAYERS * k * n / (args.bandwidth_gbps * 1e6)
                cfg = qm.config_for(m, k, n, w.dtype, paired=qm.needs_pairs(w))
                if cfg is not None:
                    fn = lambda x, w, s, l, cfg=cfg: qm.quant_matmul_pallas(x, w, s, l, cfg)  # noqa: E731
                    ms = timed(loop(fn), x, w, ws)
                    emit(gemm=g, m=m, kind=kind, impl="pallas", cfg=str(cfg), ms=round(ms, 4),
                         floor_frac=round(floor / ms, 3))
                shipped = cuda_gemv.gemm_tiling_for(m, k, n, w.dtype)
                need = -(-m // 16)  # the m-tiles (of 16 rows) that cover m
                only = {tuple(int(v) for v in t.split(",")) for t in args.tilings}
                for mt, nt, bk, st in cuda_gemv.GEMM_TILINGS:
                    if mt != need or only and (mt, nt, bk, st) not in only:
                        continue
                    for split, rot in [(sp, ro) for sp in split_of.get(g, args.splits) for ro in args.rotate]:
                        if n % (16 * nt) or k % (split * bk):
                            continue
                        if time.perf_counter() - t0 > args.budget_s:
                            emit(error="budget spent", at=[g, m, kind])
                            return 0
                        tiling = (mt, nt, bk, st, split)
                        kw = dict(tiling=tiling, rotate=bool(rot))
                        fn = lambda x, w, s, l, kw=kw: cuda_gemv.gemm8(x, w, s, l, **kw)  # noqa: E731
                        ratio = check(fn, x, w, ws)
                        rec = dict(gemm=g, m=m, kind=kind, impl="cuda", tiling=tiling, rotate=rot,
                                   shipped=tiling == shipped and not rot, check_ratio=round(ratio, 3))
                        if ratio > 1.0:
                            emit(**rec, ok=False)
                            continue
                        # The residual epilogue: exactly bf16(residual + y).
                        res = jax.random.normal(kq, (m, n), jnp.float32).astype(jnp.bfloat16)
                        f_res = jax.jit(lambda x, w, s, r, kw=kw: cuda_gemv.gemm8(x, w, s, 1, residual=r, **kw))
                        want = res.astype(jnp.float32) + jax.jit(fn)(x, w, ws, 1).astype(jnp.float32)
                        rec["residual_exact"] = bool(jnp.all(f_res(x, w, ws, res) == want.astype(jnp.bfloat16)))
                        ms = timed(loop(fn), x, w, ws)
                        emit(**rec, ms=round(ms, 4), floor_frac=round(floor / ms, 3),
                             tb_s=round(LAYERS * k * n / ms / 1e9, 3))
        del bits, wb
    emit(section="done", wall_s=round(time.perf_counter() - t0, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
