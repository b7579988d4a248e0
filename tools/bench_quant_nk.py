"""8-bit GEMMs with the weight stack stored ``[L, N, K]`` (K contiguous): the Pallas kernel's ``layout="nk"``
tilings, XLA's paths, and fp8 x fp8 (W8A8) products, against cuBLAS bf16 and the bytes floor, at Llama-2-7B's
decode and prefill shapes, every variant checked against a float32 reference before it is timed.

    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=. python3 tools/bench_quant_nk.py --out DIR
    python tools/bench_quant_nk.py --tiny                 # CPU: tiny shapes, Pallas interpret mode (smoke run)

Sections (JSON lines on stdout and DIR/results.jsonl as they come; ``--budget-s`` bounds the whole run):
1. ``gemm``: one matmul kind (qkv, o, gate_up, down) over 32 stacked layers in a ``fori_loop`` (layer index
   traced, as jaxpipe runs them) for each row count: cuBLAS bf16 (``[L, K, N]``, jaxpipe's bf16 layout),
   a few kernel tilings for int8 and fp8 weights (activations bf16), fp8 x fp8 tilings (rows quantized to
   e4m3 with one scale each, ``act="fp8"``), and XLA's convert-then-GEMM and fp8 x fp8 ``dot_general``
   (``cublas_f8`` says whether XLA called cuBLASLt's fp8 GEMM). ``floor_ms``: bytes / 4.28 TB/s.
2. ``stack``: the four matmuls of each layer, 32 layers, with the elementwise work between, through the best
   variant of each matmul found in section 1 (per row count, per kind).
3. ``prefill``: the same stack at ``--prefill-m`` rows: bf16 cuBLAS, int8 / fp8 through XLA's convert, a
   large-tile kernel, and fp8 x fp8 through XLA and the kernel.

Correctness: the last layer's product (largest offsets) against a float32 HIGHEST reference, elementwise bound
``2**-8 |ref| + 2**-14 (|x| @ |w|)`` (the fp8 x fp8 variants against the reference of their quantized rows);
kernel outputs start as NaN (poisoned).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

if "--tiny" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

PEAK_BW = 4.28e12  # bytes/s: PyTorch's device-to-device copy on one H200 (BENCHMARKS.md)
SHAPES_7B = {"qkv": (4096, 3 * 4096), "o": (4096, 4096), "gate_up": (4096, 2 * 11008), "down": (11008, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 128])
    ap.add_argument("--stack-m", type=int, nargs="+", default=[1, 16, 32, 64, 128])
    ap.add_argument("--prefill-m", type=int, nargs="*", default=[2048])
    ap.add_argument("--gemms", nargs="+", default=["gate_up", "qkv", "down", "o"])
    ap.add_argument("--budget-s", type=float, default=400.0)
    ap.add_argument("--sweep-frac", type=float, default=0.6)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    out_f = None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        out_f = open(os.path.join(args.out, "results.jsonl"), "a")

    def emit(**rec):
        print(" ".join(f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in rec.items()), flush=True)
        if out_f:
            out_f.write(json.dumps(rec) + "\n")
            out_f.flush()

    import jax
    import jax.numpy as jnp

    from jaxpipe.kernels import quant_matmul as qm

    G = qm.GemmConfig
    interpret = jax.default_backend() != "gpu"
    emit(section="env", jax=jax.__version__, device=jax.devices()[0].device_kind,
         xla_flags=os.environ.get("XLA_FLAGS", ""), interpret=interpret)
    if args.tiny:
        L, shapes = 2, {"qkv": (256, 384), "o": (256, 256), "gate_up": (256, 1024), "down": (512, 256)}
        args.m, args.stack_m, args.prefill_m, args.reps = [1, 16], [1, 16], [64], 1
    else:
        L, shapes = 32, dict(SHAPES_7B)
    shapes = {g: shapes[g] for g in args.gemms}

    key = jax.random.PRNGKey(0)
    W = {}  # (gemm, kind) -> (w, scale); bf16: [L, K, N], 8-bit: [L, N, K]
    for gi, (g, (k, n)) in enumerate(shapes.items()):
        kq = jax.random.fold_in(key, gi)
        bits = jax.random.randint(kq, (L, n, k), -127, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(jax.random.fold_in(kq, 1), (L, n), jnp.float32, 0.5, 1.5) / (127 * math.sqrt(k))
        W[g, "int8"] = (bits, s)
        W[g, "fp8"] = (jax.lax.bitcast_convert_type(bits & jnp.int8(-65), jnp.float8_e4m3fn), s * (127 / 1.875))
        W[g, "bf16"] = (jax.random.normal(jax.random.fold_in(kq, 2), (L, k, n), jnp.bfloat16)
                        * jnp.bfloat16(1 / math.sqrt(k)), None)
        jax.block_until_ready(W[g, "bf16"][0])

    def loop_fn(fn):
        def run(x, w, s):
            n = w.shape[-1] if s is None else w.shape[1]
            return jax.lax.fori_loop(0, L, lambda l, y: fn(x, w, s, l), jnp.zeros((x.shape[0], n), x.dtype))
        return jax.jit(run)

    def timed(f, *a, reps=None):
        reps = reps or args.reps
        jax.block_until_ready(f(*a))
        t = time.perf_counter()
        outs = [f(*a) for _ in range(reps)]
        jax.block_until_ready(outs)
        return (time.perf_counter() - t) / reps * 1e3

    def check(y, x, w, s, layer, act=None):
        hp = jax.lax.Precision.HIGHEST
        xf = x.astype(jnp.float32)
        if act == "fp8":
            q, xs = qm.quantize_rows_fp8(x)
            xf = q.astype(jnp.float32) * xs[:, None]
        wl = w[layer].astype(jnp.float32).T
        ref = jnp.matmul(xf, wl, precision=hp) * s[layer]
        mag = jnp.matmul(jnp.abs(xf), jnp.abs(wl), precision=hp) * s[layer]
        bound = 2.0 ** -8 * jnp.abs(ref) + 2.0 ** -14 * mag + 1e-30
        err = jnp.abs(y.astype(jnp.float32) - ref)
        r = float(jnp.max(jnp.where(jnp.isnan(err), jnp.inf, err / bound)))
        return r <= 1.0, r

    def xla_convert(x, w, s, l):
        y = jnp.einsum("mk,nk->mn", x, w[l].astype(x.dtype), preferred_element_type=jnp.float32)
        return (y * s[l]).astype(x.dtype)

    def xla_w8a8(x, w, s, l):
        q, xs = qm.quantize_rows_fp8(x)
        y = jax.lax.dot_general(q, w[l], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return (y * xs[:, None] * s[l]).astype(x.dtype)

    def bf16_mm(x, w, s, l):
        return x @ w[l]

    def kernel_fn(cfg):
        return lambda x, w, s, l: qm.quant_matmul_pallas(x, w, s, l, cfg, interpret=interpret)

    def cands(m, k, n, kind):
        """Tilings to try, most promising first (the sweep may be cut by the budget)."""
        out = []

        def add(form, bm, bn, bk, warps=4, stages=3, prefetch=False, split=None, act="same", m_major=False):
            if n % bn or k % bk:
                return
            cv = "magic" if kind == "int8" else "native"
            s = split or qm.split_for(m, k, n, bm, bn, bk)
            while k % (s * bk):
                s -= 1
            c = G(form, bm, bn, bk, s, warps, stages, cv, prefetch, True, "nk", act, m_major)
            if c.fits(m, k, n) and c not in out:
                out.append(c)

        if args.tiny:
            if m == 1:
                add("gemv", 1, 128, 64, split=k // 64)
            add("dot_t", 16, 64, 64)
            if kind == "fp8":
                add("dot_t", 16, 64, 64, act="fp8")
            return out
        if m == 1:
            add("gemv", 1, 128, 256, 4, 1, True, split=k // 256)
            add("gemv", 1, 64, 512, 4, 1, True, split=k // 512)
            add("gemv", 1, 256, 128, 4, 1, True, split=k // 128)
            add("gemv", 1, 128, 512, 8, 1, True, split=k // 512)
            add("dot_t", 16, 64, 256, 4, 3)
        else:
            bm = 16 if m <= 16 else 32 if m <= 32 else 64
            add("dot_t", bm, 64, 128, 4, 4)
            add("dot_t", bm, 128, 128, 4, 3)
            add("dot_t", bm, 64, 256, 4, 3)
            add("dot", bm, 64, 128, 4, 4)
            if m >= 128:
                add("dot_t", 128, 128, 64, 8, 3, m_major=True)
        if kind == "fp8":  # weights only: the int8 runners-up (the conversion is the only difference)
            out = out[:3 if m == 1 else 2]
        if kind == "fp8" and m > 1:
            bm = 16 if m <= 16 else 32 if m <= 32 else 64
            add("dot_t", bm, 64, 128, 4, 4, act="fp8")
            add("dot_t", bm, 128, 128, 4, 3, act="fp8")
            add("dot", bm, 64, 128, 4, 4, act="fp8")
        return out

    best: dict = {}  # (gemm, m, variant) -> (ms, fn, label); variant: int8 / fp8 (weights only) / fp8a (W8A8)

    def keep(g, m, variant, ms, fn, label):
        if (g, m, variant) not in best or ms < best[g, m, variant][0]:
            best[g, m, variant] = (ms, fn, label)

    sweep_end = time.perf_counter() + args.sweep_frac * left()
    for m in args.m:
        for g, (k, n) in shapes.items():
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            rec = dict(section="gemm", gemm=g, m=m, k=k, n=n)
            floor = {kd: L * (k * n * (2 if kd == "bf16" else 1) + (0 if kd == "bf16" else 4 * n) + 2 * m * (k + n))
                     / PEAK_BW * 1e3 for kd in ("bf16", "int8", "fp8")}
            try:
                ms = timed(loop_fn(bf16_mm), x, *W[g, "bf16"])
                emit(**rec, variant="bf16_cublas", ms=ms, floor_ms=floor["bf16"], frac_floor=floor["bf16"] / ms)
                keep(g, m, "bf16", ms, bf16_mm, "cublas")
            except Exception as e:  # noqa: BLE001
                emit(**rec, variant="bf16_cublas", error=repr(e)[:300])
            for kd in ("int8", "fp8"):
                w, s = W[g, kd]
                xla = [("xla_convert", xla_convert, None)] if m in (1, 64, 128) else []
                if kd == "fp8":
                    xla.append(("xla_w8a8", xla_w8a8, "fp8"))
                for name, fn, act in xla:
                    try:
                        f = loop_fn(fn)
                        ok, ratio = check(jax.jit(fn)(x, w, s, jnp.int32(L - 1)), x, w, s, L - 1, act)
                        hlo = f.lower(x, w, s).compile().as_text() if not interpret else ""
                        ms = timed(f, x, w, s, reps=3)
                        emit(**rec, kind=kd, variant=name, ok=ok, ratio=round(ratio, 3), ms=ms, floor_ms=floor[kd],
                             frac_floor=floor[kd] / ms, cublas_f8="f8" in hlo and "cublas" in hlo)
                        if ok:
                            keep(g, m, "fp8a" if act else kd, ms, fn, name)
                    except Exception as e:  # noqa: BLE001
                        emit(**rec, kind=kd, variant=name, error=repr(e)[:300])
                for cfg in cands(m, k, n, kd):
                    label = f"{cfg.form}/{cfg.bm}x{cfg.bn}x{cfg.bk}/s{cfg.split_k}/w{cfg.num_warps}/st{cfg.num_stages}" \
                            f"{'/pf' if cfg.prefetch else ''}{'/a8' if cfg.act == 'fp8' else ''}{'/mm' if cfg.m_major else ''}"
                    crec = dict(rec, kind=kd, variant="kernel", cfg=label)
                    if time.perf_counter() > sweep_end:
                        emit(**crec, skipped="budget")
                        continue
                    try:
                        t0 = time.perf_counter()
                        act = "fp8" if cfg.act == "fp8" else None
                        y = jax.jit(lambda x, w, s, l, c=cfg: qm.quant_matmul_pallas(
                            x, w, s, l, c, interpret=interpret, poison=True))(x, w, s, jnp.int32(L - 1))
                        ok, ratio = check(y, x, w, s, L - 1, act)
                        if not ok:
                            emit(**crec, ok=False, ratio=ratio)
                            continue
                        ms = timed(loop_fn(kernel_fn(cfg)), x, w, s)
                        emit(**crec, ok=True, ratio=round(ratio, 3), ms=ms, floor_ms=floor[kd],
                             frac_floor=floor[kd] / ms, compile_s=round(time.perf_counter() - t0, 1))
                        keep(g, m, "fp8a" if act else kd, ms, kernel_fn(cfg), label)
                    except Exception as e:  # noqa: BLE001
                        emit(**crec, error=repr(e)[:500])
    for (g, m, v), (ms, _, label) in sorted(best.items()):
        emit(section="best", gemm=g, m=m, variant=v, ms=ms, cfg=label)

    if set(shapes) != set(SHAPES_7B) and not args.tiny:
        return
    H, I = shapes["o"][1], shapes["down"][0]

    def layer_fn(pick):
        def run(x, ws):
            def body(l, h):
                qkv = pick("qkv")(h, *ws["qkv"], l)
                h = h + pick("o")(qkv[:, :H], *ws["o"], l)
                gu = pick("gate_up")(h, *ws["gate_up"], l)
                h = h + pick("down")(jax.nn.silu(gu[:, :I]) * gu[:, I:], *ws["down"], l)
                hf = h.astype(jnp.float32)
                return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-5)).astype(h.dtype)
            return jax.lax.fori_loop(0, L, body, x)
        return jax.jit(run)

    def step_bytes(kd, m):
        return sum(L * (k * n * (2 if kd == "bf16" else 1) + (0 if kd == "bf16" else 4 * n) + 2 * m * (k + n))
                   for k, n in shapes.values())

    for m in args.stack_m:
        near = min((v for v in args.m if v >= m), default=max(args.m))
        x = jax.random.normal(jax.random.PRNGKey(100 + m), (m, H), jnp.float32).astype(jnp.bfloat16)
        bf16_ms = None
        for v in ("bf16", "int8", "fp8", "fp8a"):
            kd = "fp8" if v == "fp8a" else v
            if left() < 15 or not all((g, near, v) in best for g in shapes):
                emit(section="stack", m=m, variant=v, skipped="budget or no variant")
                continue
            picks = {g: best[g, near, v] for g in shapes}
            # a kernel tiling swept at more rows is re-tiled for m only through its row block; re-check
            try:
                ws = {g: W[g, kd] for g in shapes}
                f = layer_fn(lambda g: picks[g][1])
                ms = timed(f, x, ws)
                bf16_ms = ms if v == "bf16" else bf16_ms
                fl = step_bytes(kd, m) / PEAK_BW * 1e3
                emit(section="stack", m=m, variant=v, ms=ms, tok_s=m / ms * 1e3, floor_ms=fl, frac_floor=fl / ms,
                     vs_bf16_tok_s=None if bf16_ms is None else bf16_ms / ms,
                     cfgs={g: picks[g][2] for g in shapes}, swept_at_m=near)
            except Exception as e:  # noqa: BLE001
                emit(section="stack", m=m, variant=v, error=repr(e)[:500])

    for m in args.prefill_m:
        x = jax.random.normal(jax.random.PRNGKey(200 + m), (m, H), jnp.float32).astype(jnp.bfloat16)
        big = lambda kd, act="same": (lambda g: kernel_fn(G("dot_t", 128, 128, 64, 1, 8, 3,  # noqa: E731
                                                            "magic" if kd == "int8" else "native", False, False,
                                                            "nk", act, True)))
        variants = [("bf16", "cublas", lambda g: bf16_mm), ("int8", "xla_convert", lambda g: xla_convert),
                    ("int8", "kernel_128x128x64", big("int8")), ("fp8", "xla_convert", lambda g: xla_convert),
                    ("fp8", "xla_w8a8", lambda g: xla_w8a8), ("fp8", "kernel_128x128x64_a8", big("fp8", "fp8")),
                    ("fp8", "kernel_128x128x64", big("fp8"))]
        if args.tiny:
            variants = [v for v in variants if "kernel" not in v[1]]
        base = None
        for kd, name, pick in variants:
            if left() < 10:
                emit(section="prefill", m=m, kind=kd, variant=name, skipped="budget")
                continue
            try:
                ws = {g: W[g, kd] for g in shapes}
                ms = timed(layer_fn(pick), x, ws, reps=3)
                base = ms if kd == "bf16" else base
                flops = 2 * m * sum(k * n for k, n in shapes.values()) * L
                emit(section="prefill", m=m, kind=kd, variant=name, ms=ms, tflops=flops / (ms / 1e3) / 1e12,
                     vs_bf16=None if base is None else ms / base)
            except Exception as e:  # noqa: BLE001
                emit(section="prefill", m=m, kind=kd, variant=name, error=repr(e)[:500])
    emit(section="done", wall_s=time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
