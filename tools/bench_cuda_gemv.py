"""The CUDA 8-bit GEMV (jaxpipe/kernels/gemv8.cu) against the Pallas kernel, cuBLAS bf16 and the bytes floor.

    PYTHONPATH=. python3 tools/bench_cuda_gemv.py --out DIR          # a CUDA GPU; nvcc on the machine

Sections (JSON lines to stdout and DIR/results.jsonl as they come):
1. ``gemm``: each Llama-2-7B decode matmul (qkv, o, gate_up, down) over its 32 stacked layers ``[L, K, N]``
   in a ``fori_loop`` (layer index traced, as jaxpipe runs them), 1, 2 and 4 rows: cuBLAS bf16, the
   Pallas kernel as ``config_for`` tiles it, and the CUDA kernel at every built tiling. Every kernel
   output is first checked elementwise against a float32 HIGHEST reference for the last layer (bound
   ``2^-8 |ref| + 2^-14 (|x| @ |w|) * scale``). Times: per call of the loop, dispatched back to back.
2. ``stack``: the four matmuls of each layer with the elementwise work between them, 32 layers, through
   ``layer_matmul`` (the CUDA kernel at its chosen tiling) and through the Pallas kernel, and bf16.
floor = bytes (8-bit weights, float32 scales, bf16 activations in and out) / ``--peak-gbps``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
os.environ.setdefault("JAXPIPE_CUDA_KERNELS", "1")  # the kernel is opt-in
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxpipe.kernels import cuda_gemv  # noqa: E402
from jaxpipe.kernels import quant_matmul as qm  # noqa: E402

L = 32
SHAPES = {"qkv": (4096, 3 * 4096), "o": (4096, 4096), "gate_up": (4096, 2 * 11008), "down": (11008, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--kinds", nargs="+", default=["int8", "fp8"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--peak-gbps", type=float, default=3430.0)
    args = ap.parse_args()
    path = os.path.join(args.out, "cuda_gemv.jsonl") if args.out else None
    f = open(path, "a") if path else None

    def emit(**rec):
        print(json.dumps(rec), flush=True)
        if f:
            f.write(json.dumps(rec) + "\n")
            f.flush()

    t0 = time.perf_counter()
    ok = cuda_gemv.available()
    emit(section="env", device=jax.devices()[0].device_kind, jax=jax.__version__, cuda_kernel=ok,
         build_s=time.perf_counter() - t0, nvcc=cuda_gemv.find_nvcc())
    if not ok:
        return

    weights = {}
    key = jax.random.PRNGKey(0)
    for i, (g, (k, n)) in enumerate(SHAPES.items()):
        kq = jax.random.fold_in(key, i)
        bits = jax.random.randint(kq, (L, k, n), -127, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(jax.random.fold_in(kq, 1), (L, n), jnp.float32, 0.5, 1.5) / (127 * math.sqrt(k))
        weights[g, "int8"] = (bits, s)
        # fp8: random bytes with exponent bit 6 cleared (finite; normal and subnormal values alike)
        weights[g, "fp8"] = (jax.lax.bitcast_convert_type(bits & jnp.int8(-65), jnp.float8_e4m3fn), s * (127 / 1.875))
        weights[g, "bf16"] = ((bits.astype(jnp.float32) / (127 * math.sqrt(k))).astype(jnp.bfloat16), None)
        jax.block_until_ready(weights[g, "bf16"][0])

    def loop(fn):
        def run(x, w, s):
            n = w.shape[-1]
            return jax.lax.fori_loop(0, L, lambda l, y: fn(x, w, s, l), jnp.zeros(x.shape[:-1] + (n,), x.dtype))
        return jax.jit(run)

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        jax.block_until_ready(fn(*a))
        t = time.perf_counter()
        outs = [fn(*a) for _ in range(args.reps)]
        jax.block_until_ready(outs)
        return (time.perf_counter() - t) / args.reps * 1e3

    def check(y, x, w, s):
        hp = jax.lax.Precision.HIGHEST
        wl = w[L - 1].astype(jnp.float32)
        xf = x.astype(jnp.float32)
        ref = jnp.matmul(xf, wl, precision=hp) * s[L - 1]
        mag = jnp.matmul(jnp.abs(xf), jnp.abs(wl), precision=hp) * s[L - 1]
        err = jnp.abs(y.astype(jnp.float32) - ref)
        r = float(jnp.max(jnp.where(jnp.isnan(err), jnp.inf, err / (2.0 ** -8 * jnp.abs(ref) + 2.0 ** -14 * mag + 1e-30))))
        return r <= 1.0, r

    def nbytes(kd, m, k, n):
        wb = 2 * k * n if kd == "bf16" else k * n + 4 * n
        return L * (wb + 2 * m * (k + n))

    for m in args.m:
        for g, (k, n) in SHAPES.items():
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            rec = dict(section="gemm", gemm=g, m=m)
            wb, _ = weights[g, "bf16"]
            ms = timed(loop(lambda x, w, s, l: qm.xla_layer_matmul(x, w, None, l)), x, wb, None)
            emit(**rec, kind="bf16", variant="cublas", ms=ms, tb_s=nbytes("bf16", m, k, n) / ms / 1e9)
            for kd in args.kinds:
                w, s = weights[g, kd]
                floor = nbytes(kd, m, k, n) / (args.peak_gbps * 1e9) * 1e3
                cfg = qm.config_for(m, k, n, w.dtype, paired=qm.needs_pairs(w))
                variants = []
                if cfg is not None:
                    variants.append(("pallas", None, lambda x, w, s, l, c=cfg: qm.quant_matmul_pallas(x, w, s, l, c)))
                for t in cuda_gemv.TILINGS:
                    if n % (16 * t[0]) == 0:
                        variants.append(("cuda/%dx%dx%d" % t, t, lambda x, w, s, l, t=t: cuda_gemv.gemv8(x, w, s, l, tiling=t)))
                chosen = cuda_gemv.tiling_for(m, k, n)
                for name, tiling, fn in variants:
                    r = dict(rec, kind=kd, variant=name, chosen=tiling == chosen)
                    try:
                        y = jax.jit(fn)(x, w, s, jnp.int32(L - 1))
                        good, ratio = check(y, x, w, s)
                        if not good:
                            emit(**r, ok=False, ratio=ratio)
                            continue
                        ms = timed(loop(fn), x, w, s)
                        emit(**r, ok=True, ratio=round(ratio, 3), ms=ms, floor_ms=floor, frac_floor=floor / ms,
                             tb_s=nbytes(kd, m, k, n) / ms / 1e9)
                    except Exception as e:  # noqa: BLE001
                        emit(**r, error=repr(e)[:800])

    H, I = SHAPES["o"][1], SHAPES["down"][0]

    def stack_fn(mm):
        def run(x, ws):
            def body(l, h):
                qkv = mm("qkv", h, *ws["qkv"], l)
                h = h + mm("o", qkv[:, :H], *ws["o"], l)
                gu = mm("gate_up", h, *ws["gate_up"], l)
                h = h + mm("down", jax.nn.silu(gu[:, :I]) * gu[:, I:], *ws["down"], l)
                hf = h.astype(jnp.float32)
                return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-5)).astype(h.dtype)
            return jax.lax.fori_loop(0, L, body, x)
        return jax.jit(run)

    def pallas_mm(g, x, w, s, l):
        cfg = qm.config_for(x.shape[0], x.shape[1], w.shape[-1], w.dtype, paired=qm.needs_pairs(w))
        return qm.quant_matmul_pallas(x, w, s, l, cfg)

    for m in args.m:
        x = jax.random.normal(jax.random.PRNGKey(100 + m), (m, H), jnp.float32).astype(jnp.bfloat16)
        for kd in ["bf16"] + args.kinds:
            ws = {g: weights[g, kd] for g in SHAPES}
            b = sum(nbytes(kd, m, *SHAPES[g]) for g in SHAPES)
            variants = [("layer_matmul", lambda g, x, w, s, l: qm.layer_matmul(x, w, s, l))]
            if kd != "bf16":
                variants.append(("pallas", pallas_mm))
            ref = None
            for name, mm in variants:
                try:
                    fn = stack_fn(mm)
                    y = fn(x, ws)
                    if kd != "bf16" and ref is None:
                        ref = stack_fn(lambda g, x, w, s, l: qm.xla_layer_matmul(x, w, s, l))(x, ws)
                    diff = None if ref is None else float(jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
                    ms = timed(fn, x, ws)
                    emit(section="stack", m=m, kind=kd, variant=name, ms=ms, floor_ms=b / (args.peak_gbps * 1e9) * 1e3,
                         frac_floor=b / (args.peak_gbps * 1e9) * 1e3 / ms, max_abs_diff_vs_xla=diff,
                         finite=bool(np.isfinite(np.asarray(y, np.float32)).all()))
                except Exception as e:  # noqa: BLE001
                    emit(section="stack", m=m, kind=kd, variant=name, error=repr(e)[:800])
    emit(section="done", wall_s=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
