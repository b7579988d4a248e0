"""8-bit weight GEMM benchmark: the Pallas kernel of jaxpipe.kernels.quant_matmul against the bytes floor
and cuBLAS bf16, at Llama decode shapes, every variant checked against a reference before it is timed.

    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=. python3 tools/bench_quant_gemm.py --out DIR
    python tools/bench_quant_gemm.py --tiny            # CPU: tiny shapes, Pallas interpret mode (a smoke run)

Sections, in order (each writes JSON lines to stdout and DIR/results.jsonl as it goes; ``--budget-s``
bounds the sweep so the later sections still run):
1. ``copy``: device copy bandwidth (JAX, and PyTorch when present), the peer for the floor.
2. ``gemm``: one matmul kind (qkv, o, gate_up, down) over all layers stacked ``[L, K, N]``, in a
   ``fori_loop`` over layers (the layer index traced, as jaxpipe runs them): cuBLAS bf16, XLA's
   convert-then-GEMM for 8-bit, and a sweep of kernel tilings, int8 and fp8 (and ``q8_0`` when asked:
   int8 with group-wise float16 scales ``[L, K / 32, N]``, llama.cpp's Q8_0 layout), for each row count.
   ``floor_ms`` = (8-bit weights + scales + activations in and out) / 4.28 TB/s; the scales are 4 bytes per
   column (int8, fp8) or 2 bytes per 32 weights (q8_0).
3. ``stack``: the four matmuls of each layer in one ``fori_loop`` over 32 layers with the elementwise work
   between them (residual, SiLU gate, a norm), bf16 cuBLAS against int8 and fp8 through the best tiling of
   each matmul found in section 2 and through ``layer_matmul`` as shipped; blocked per call and back to back.
4. ``prefill``: the same stack at prefill row counts through ``layer_matmul`` (XLA's path there) and bf16.

Correctness: each variant's output for one random layer (the last, where offsets are largest) is compared
elementwise with a float32 HIGHEST-precision reference on fresh random data (checked once against float64
NumPy), bound ``2**-8 |ref| + 2**-14 (|x| @ |w|)``; kernel outputs start as NaN (poisoned). For q8_0 the
reference weight is the dequantized one rounded to bf16, as ``layer_matmul`` defines it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

if "--tiny" not in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

PEAK_BW = 4.28e12  # bytes/s: device-to-device copy measured on one H200 (shared/NOTES.md)

# Llama-2-7B (MHA, H=4096, I=11008, 32 layers): (K, N) of each decode matmul, q|k|v and gate|up fused.
LAYERS_7B = 32
SHAPES_7B = {"qkv": (4096, 3 * 4096), "o": (4096, 4096), "gate_up": (4096, 2 * 11008), "down": (11008, 4096)}
KINDS = ("int8", "fp8", "q8_0")
GROUPS = {"q8_0": 32}  # input rows per scale of the group-wise kinds


def weight_bytes(kind: str, k: int, n: int) -> int:
    """Bytes of one layer's ``[k, n]`` weight and its scales."""
    if kind == "bf16":
        return 2 * k * n
    if kind in GROUPS:
        return k * n + 2 * (k // GROUPS[kind]) * n
    return k * n + 4 * n


class Out:
    def __init__(self, path):
        self.f = open(path, "a") if path else None

    def __call__(self, **rec):
        line = json.dumps(rec)
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                 if k not in ("layers", "k", "n", "floor_copy_ms", "cfgs")}
        print(" ".join(f"{k}={v}" for k, v in short.items()), flush=True)
        if self.f:
            self.f.write(line + "\n")
            self.f.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT"))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shapes, interpret mode")
    ap.add_argument("--m", type=int, nargs="+", default=[1, 16, 64], help="row counts for the sweep")
    ap.add_argument("--m-pick", type=int, nargs="*", default=[8, 32],
                    help="row counts timed with the best tiling of the nearest swept row count")
    ap.add_argument("--stack-m", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--prefill-m", type=int, nargs="*", default=[2048])
    ap.add_argument("--xla-m", type=int, nargs="*", default=[1, 64], help="row counts for XLA's 8-bit path")
    ap.add_argument("--kinds", nargs="+", default=["int8", "fp8"], choices=KINDS)
    ap.add_argument("--gemms", nargs="+", default=["gate_up", "qkv", "down", "o"])
    ap.add_argument("--sweep", default="wide", choices=["wide", "narrow", "groups", "none"],
                    help="groups: one-group K tiles and runners-up for group-wise kinds (others: as none)")
    ap.add_argument("--no-round", action="store_true",
                    help="experiment: also time group-wise kernels without rounding the dequantized weights "
                         "(not what layer_matmul computes: the cost of the rounding)")
    ap.add_argument("--budget-s", type=float, default=240.0, help="wall budget for the whole run")
    ap.add_argument("--sweep-frac", type=float, default=0.55, help="share of the budget for the sweep")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--stack-shipped", action="store_true", help="also time layer_matmul's own choice")
    ap.add_argument("--stack-xla", action="store_true", help="also time XLA's 8-bit path at m=1")
    ap.add_argument("--prefill-fold", action="store_true", help="also time the scale folded into bf16 weights")
    ap.add_argument("--cuda", action="store_true",
                    help="also time the CUDA GEMV (one row; builds it, and lets layer_matmul use it)")
    args = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    out_path = os.path.join(args.out, "results.jsonl") if args.out else None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    emit = Out(out_path)

    if not args.tiny:
        copy_torch(emit)

    import jax
    import jax.numpy as jnp

    # layer_matmul takes the CUDA GEMV where it is available (jaxpipe/kernels/cuda_gemv.py): only with --cuda.
    os.environ["JAXPIPE_CUDA_KERNELS"] = "1" if args.cuda else "0"
    qm = import_kernel()
    if args.cuda:
        from jaxpipe.kernels import cuda_gemv

    interpret = jax.default_backend() != "gpu"
    dev = jax.devices()[0]
    emit(section="env", jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
         xla_flags=os.environ.get("XLA_FLAGS", ""), interpret=interpret)
    if args.tiny:
        L, shapes = 3, {"qkv": (256, 384), "o": (256, 256), "gate_up": (256, 512), "down": (256, 256)}
        args.m, args.m_pick, args.stack_m, args.prefill_m, args.reps = [1, 16], [8], [1, 16], [32], 2
    else:
        L, shapes = LAYERS_7B, dict(SHAPES_7B)
    shapes = {g: shapes[g] for g in args.gemms}
    copy_bw = copy_jax(emit, jax, jnp, tiny=args.tiny)

    key = jax.random.PRNGKey(0)
    weights = {}  # (gemm, kind) -> (w, scale)
    for gi, (g, (k, n)) in enumerate(shapes.items()):
        kq = jax.random.fold_in(key, gi)
        bits = jax.random.randint(kq, (L, k, n), -127, 128, jnp.int32).astype(jnp.int8)
        s = jax.random.uniform(jax.random.fold_in(kq, 1), (L, n), jnp.float32, 0.5, 1.5) / (127 * math.sqrt(k))
        weights[g, "int8"] = (bits, s)
        # fp8: random bytes with exponent bit 6 cleared: finite, normal and subnormal values alike.
        f8 = jax.lax.bitcast_convert_type(bits & jnp.int8(-65), jnp.float8_e4m3fn)
        weights[g, "fp8"] = (f8, s * (127 / 1.875))  # |values| <= 1.875: the same output scale as int8
        if "q8_0" in args.kinds:  # the int8 values with float16 scales per 32 rows (normal float16 values)
            sg = jax.random.uniform(jax.random.fold_in(kq, 2), (L, k // GROUPS["q8_0"], n), jnp.float32, 0.5, 1.5)
            weights[g, "q8_0"] = (bits, (sg / (127 * 8)).astype(jnp.float16))
        # bf16 of the same magnitude (the peer)
        weights[g, "bf16"] = ((bits.astype(jnp.bfloat16) * (1 / (127 * math.sqrt(k)))).astype(jnp.bfloat16), None)
        jax.block_until_ready(weights[g, "bf16"][0])
    bytes_of = lambda a: a.size * a.dtype.itemsize  # noqa: E731

    def loop_fn(fn, w, s):
        """One matmul kind over all layers: x fixed, layer index traced."""
        def run(x, w, s):
            def body(l, y):
                return fn(x, w, s, l)
            n = w.shape[-1]
            return jax.lax.fori_loop(0, L, body, jnp.zeros(x.shape[:-1] + (n,), x.dtype))
        return jax.jit(run)

    def timed(f, *a, reps=None):
        reps = reps or args.reps
        jax.block_until_ready(f(*a))
        jax.block_until_ready(f(*a))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*a))
            ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        outs = [f(*a) for _ in range(reps)]
        jax.block_until_ready(outs)
        b2b = (time.perf_counter() - t) / reps
        return float(np.median(ts)) * 1e3, b2b * 1e3

    def check(y, x, w, s, layer):
        """Elementwise bound against a float32 HIGHEST reference; returns (ok, max error / bound)."""
        wl = w[layer].astype(jnp.float32)
        xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
        hp = jax.lax.Precision.HIGHEST
        if s.ndim == 3:  # group-wise: the dequantized weight rounded to x.dtype (eager ops: kept rounded)
            wl = (wl * jnp.repeat(s[layer].astype(jnp.float32), w.shape[1] // s.shape[1], axis=0))
            wl = wl.astype(x.dtype).astype(jnp.float32)
            s = jnp.ones(s.shape[:1] + s.shape[2:], jnp.float32)
        ref = jnp.matmul(xf, wl, precision=hp) * s[layer]
        mag = jnp.matmul(jnp.abs(xf), jnp.abs(wl), precision=hp) * s[layer]
        bound = 2.0 ** -8 * jnp.abs(ref) + 2.0 ** -14 * mag + 1e-30
        err = jnp.abs(y.reshape(ref.shape).astype(jnp.float32) - ref)
        r = float(jnp.max(jnp.where(jnp.isnan(err), jnp.inf, err / bound)))
        return r <= 1.0, r

    # float64 NumPy once, to trust the float32 reference (one shape, one row count).
    g0 = next(iter(shapes))
    w0, s0 = weights[g0, "int8"]
    x0 = jax.random.normal(jax.random.PRNGKey(7), (4, w0.shape[1]), jnp.float32).astype(jnp.bfloat16)
    y0 = qm.xla_layer_matmul(x0, w0, s0, jnp.int32(L - 1))
    ref64 = np.asarray(x0, np.float64) @ (np.asarray(w0[L - 1], np.float64) * np.asarray(s0[L - 1], np.float64))
    ok0, r0 = check(y0, x0, w0, s0, L - 1)
    emit(section="check", what="xla int8 vs f32 ref vs f64 numpy", ok=bool(ok0), ratio=r0,
         max_rel_vs_f64=float(np.max(np.abs(np.asarray(y0, np.float64) - ref64)) / np.max(np.abs(ref64))))
    if "q8_0" in args.kinds:
        import ml_dtypes

        w0, s0 = weights[g0, "q8_0"]
        y0 = qm.xla_layer_matmul(x0, w0, s0, jnp.int32(L - 1))
        wd = np.asarray(w0[L - 1], np.float32) * np.repeat(np.asarray(s0[L - 1], np.float32), GROUPS["q8_0"], 0)
        ref64 = np.asarray(x0, np.float64) @ wd.astype(ml_dtypes.bfloat16).astype(np.float64)
        ok0, r0 = check(y0, x0, w0, s0, L - 1)
        emit(section="check", what="xla q8_0 vs f32 ref vs f64 numpy", ok=bool(ok0), ratio=r0,
             max_rel_vs_f64=float(np.max(np.abs(np.asarray(y0, np.float64) - ref64)) / np.max(np.abs(ref64))))

    best: dict[tuple, tuple[float, qm.GemmConfig]] = {}
    sweep_end = time.perf_counter() + args.sweep_frac * left()
    checked_forms = set()
    for m in list(args.m) + [v for v in args.m_pick if v not in args.m]:
        for g, (k, n) in shapes.items():
            x = jax.random.normal(jax.random.PRNGKey(m), (m, k), jnp.float32).astype(jnp.bfloat16)
            floor_b = {kd: L * (weight_bytes(kd, k, n) + 2 * m * k + 2 * m * n) for kd in ("bf16",) + KINDS}
            rec = dict(section="gemm", gemm=g, m=m, k=k, n=n, layers=L)
            wb, _ = weights[g, "bf16"]
            try:
                ms, b2b = timed(loop_fn(lambda x, w, s, l: qm.xla_layer_matmul(x, w, None, l), wb, None), x, wb, None)
                emit(**rec, variant="bf16_cublas", kind="bf16", ms=ms, ms_b2b=b2b,
                     tb_s=floor_b["bf16"] / b2b / 1e9, floor_ms=floor_b["bf16"] / PEAK_BW * 1e3)
            except Exception as e:  # noqa: BLE001
                emit(**rec, variant="bf16_cublas", error=repr(e)[:400])
            for kd in args.kinds:
                w, s = weights[g, kd]
                group = GROUPS.get(kd)
                floor_ms = floor_b[kd] / PEAK_BW * 1e3
                floor_copy_ms = floor_b[kd] / (copy_bw * 1e9) * 1e3 if copy_bw else None
                if m in args.xla_m:
                    try:
                        ms, b2b = timed(loop_fn(qm.xla_layer_matmul, w, s), x, w, s, reps=3)
                        emit(**rec, variant="xla_convert", kind=kd, ms=ms, ms_b2b=b2b, floor_ms=floor_ms)
                    except Exception as e:  # noqa: BLE001
                        emit(**rec, variant="xla_convert", kind=kd, error=repr(e)[:400])
                if m not in args.m:  # not swept: the best tiling of the nearest swept row count
                    cands = [c for c in [pick(qm, best, g, m, kd, k, n)] if c is not None]
                elif args.tiny:
                    cands = [c for c in tiny_candidates(qm, m) if c.fits(m, k, n, group)]
                else:
                    cands = candidates(qm, m, k, n, kd, args.sweep, qm.needs_pairs(w))
                shipped = qm.config_for(m, k, n, w.dtype, paired=qm.needs_pairs(w), group=group)
                if shipped is not None:
                    cands = [shipped] + [c for c in cands if c != shipped]
                for cfg in cands:
                    crec = dict(rec, kind=kd, variant="kernel", cfg=cfg_str(cfg), shipped=cfg == shipped)
                    if time.perf_counter() > sweep_end and cfg != shipped:
                        emit(**crec, skipped="budget")
                        continue
                    try:
                        t0 = time.perf_counter()
                        if cfg == shipped or (g, kd, cfg.form) not in checked_forms:
                            checked_forms.add((g, kd, cfg.form))
                            y = jax.jit(lambda x, w, s, l, c=cfg: qm.quant_matmul_pallas(
                                x, w, s, l, c, interpret=interpret, poison=True))(x, w, s, jnp.int32(L - 1))
                            ok, ratio = check(y, x, w, s, L - 1)
                            if not ok:
                                emit(**crec, ok=False, poisoned=True, ratio=ratio)
                                continue
                        f = loop_fn(lambda x, w, s, l, c=cfg: qm.quant_matmul_pallas(
                            x, w, s, l, c, interpret=interpret), w, s)
                        y = f(x, w, s)  # the last layer's product
                        ok, ratio = check(y, x, w, s, L - 1)
                        if not ok:
                            emit(**crec, ok=False, ratio=ratio)
                            continue
                        ms, b2b = timed(f, x, w, s)
                        emit(**crec, ok=True, ratio=round(ratio, 3), ms=ms, ms_b2b=b2b, floor_ms=floor_ms,
                             frac_floor=floor_ms / b2b, floor_copy_ms=floor_copy_ms,
                             tb_s=floor_b[kd] / b2b / 1e9, compile_s=time.perf_counter() - t0)
                        if m in args.m and ((g, m, kd) not in best or b2b < best[g, m, kd][0]):
                            best[g, m, kd] = (b2b, cfg)
                    except Exception as e:  # noqa: BLE001
                        emit(**crec, error=repr(e)[:600])
                if args.cuda and group is None and not interpret:
                    # The CUDA GEMV (jaxpipe/kernels/gemv8.cu) at every built tiling that fits.
                    chosen = cuda_gemv.tiling_for(m, k, n, w.dtype)  # None: layer_matmul keeps Pallas here
                    usable = m <= cuda_gemv.MAX_ROWS and cuda_gemv.available()  # builds and registers it
                    if m <= cuda_gemv.MAX_ROWS and not usable:
                        emit(section="gemm", gemm=g, m=m, kind=kd, variant="cuda", error="not available")
                    for t in cuda_gemv.TILINGS if usable else ():
                        if n % (16 * t[0]):
                            continue
                        crec = dict(rec, kind=kd, variant="cuda", cfg="%dx%dx%d" % t, shipped=t == chosen)
                        if time.perf_counter() > sweep_end and t != chosen:
                            emit(**crec, skipped="budget")
                            continue
                        try:
                            fn = lambda x, w, s, l, t=t: cuda_gemv.gemv8(x, w, s, l, tiling=t)  # noqa: E731
                            ok, ratio = check(jax.jit(fn)(x, w, s, jnp.int32(L - 1)), x, w, s, L - 1)
                            if not ok:
                                emit(**crec, ok=False, ratio=ratio)
                                continue
                            ms, b2b = timed(loop_fn(fn, w, s), x, w, s)
                            emit(**crec, ok=True, ratio=round(ratio, 3), ms=ms, ms_b2b=b2b, floor_ms=floor_ms,
                                 frac_floor=floor_ms / b2b, tb_s=floor_b[kd] / b2b / 1e9)
                        except Exception as e:  # noqa: BLE001
                            emit(**crec, error=repr(e)[:600])
                if args.no_round and group and m == 1 and shipped is not None and not interpret:
                    # The one-row form without its rounding of the weights to bf16 (kernel internals,
                    # patched for this timing only): what that rounding costs.
                    keep = qm._round_to
                    qm._round_to = lambda w, dtype: w
                    try:
                        for cfg in [shipped] + [c for c in cands if c.bk == group][:1]:
                            f = loop_fn(lambda x, w, s, l, c=cfg: qm.quant_matmul_pallas(x, w, s, l, c), w, s)
                            ms, b2b = timed(f, x, w, s)
                            emit(**rec, kind=kd, variant="kernel_no_round", cfg=cfg_str(cfg), ms=ms, ms_b2b=b2b,
                                 floor_ms=floor_ms, frac_floor=floor_ms / b2b)
                    except Exception as e:  # noqa: BLE001
                        emit(**rec, kind=kd, variant="kernel_no_round", error=repr(e)[:600])
                    finally:
                        qm._round_to = keep
    for (g, m, kd), (ms, cfg) in sorted(best.items()):
        emit(section="best", gemm=g, m=m, kind=kd, ms_b2b=ms, cfg=cfg_str(cfg))

    if set(shapes) == {"qkv", "o", "gate_up", "down"}:
        stack(emit, jax, jnp, qm, weights, shapes, L, args, best, interpret, timed, left, copy_bw)
    emit(section="done", wall_s=time.perf_counter() - t_start)


def candidates(qm, m, k, n, kind, sweep, paired=False):
    """Tilings to try besides the shipped one for ``m`` rows of ``[m, k] @ [k, n]`` (most promising first:
    the sweep may be cut by the budget). "narrow": the runners-up of the 2026-12-01 sweeps."""
    if sweep == "none":
        return []
    G = qm.GemmConfig
    out = []
    cv = "native" if kind == "fp8" else "magic"
    group = GROUPS.get(kind)

    def add(form, bm, bn, bk, warps=4, stages=4, prefetch=False, evict=True, split=None, convert=cv):
        if n % bn or k % bk:
            return
        s = split or qm.split_for(m, k, n, bm, bn, bk)
        c = G(form, bm, bn, bk, s, warps, stages, convert, prefetch, evict)
        if c.fits(m, k, n, group) and c not in out:
            out.append(c)

    if sweep == "groups":  # group-wise scales: one group per K tile (no reshape) against runners-up
        if not group:
            return out
        if m == 1:
            add("gemv", 1, 256, group, 4, 1, True, split=k // group)
            add("gemv", 1, 512, group, 8, 1, True, split=k // group)
            add("gemv", 1, 256, group, 4, 1, True, split=k // 128)
            add("gemv", 1, 256, group, 4, 3, False, split=k // 128)
            add("gemv", 1, 256, 64, 4, 1, True, split=k // 64)
        else:
            bm = 16 if m <= 16 else 32 if m <= 32 else 64
            add("dot", bm, 64, group, 4, 4)
            add("dot", bm, 64, group, 4, 6)
            add("dot", bm, 128, group, 4, 4)
            add("dot", bm, 64, 128, 4, 4)
        return out
    if m == 1:
        add("gemv", 1, 256, 128, 4, 1, True, split=k // 128)
        add("gemv", 1, 256, 64, 4, 1, True)
        add("gemv", 1, 512, 64, 8, 3, False)
        if kind != "fp8":
            add("gemv", 1, 512, 128, 8, 1, True, split=k // 128, convert="native")
        if sweep == "wide":
            add("gemv", 1, 512, 64, 8, 1, True)
            add("fma", 1, 512, 16, 4, 3, False)
            add("gemv", 1, 512, 128, 8, 1, True, split=k // 128, evict=False)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        add("dot", bm, 128, 128, 4, 4)
        add("dot", bm, 64, 128, 4, 3)
        add("dot", bm, 64, 256, 4, 1, True)
        add("dot", bm, 64, 64, 4, 4)
        if sweep == "wide":
            add("dot", bm, 64, 256, 4, 4)
            add("dot", bm, 64, 128, 4, 4, convert="native")
            add("dot", bm, 64, 64, 8, 4)
    return out


def pick(qm, best, g, m, kd, k, n):
    """The swept best for this matmul at the nearest swept row count at or above m, re-tiled for m."""
    ms = sorted({mm for (gg, mm, kk) in best if gg == g and kk == kd})
    if not ms:
        return None
    if m == 1:
        if 1 not in ms:
            return None
        return best[g, 1, kd][1]
    ms = [v for v in ms if v > 1]
    if not ms:
        return None
    near = next((v for v in ms if v >= m), ms[-1])
    cfg = best[g, near, kd][1]
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    cfg = dataclasses.replace(cfg, bm=bm, split_k=qm.split_for(m, k, n, bm, cfg.bn, cfg.bk))
    return cfg if cfg.fits(m, k, n, GROUPS.get(kd)) else None


def cfg_str(c) -> str:
    return f"{c.form}/{c.bm}x{c.bn}x{c.bk}/s{c.split_k}/w{c.num_warps}/st{c.num_stages}/{c.convert}"


def tiny_candidates(qm, m):
    G = qm.GemmConfig
    if m == 1:
        return [G("fma", 1, 128, 32, 2), G("dot", 16, 128, 64, 2, convert="magic"), G("dot_t", 16, 128, 64, 1)]
    return [G("dot", 16, 128, 64, 2), G("dot_t", 16, 64, 128, 1, convert="magic")]


def stack(emit, jax, jnp, qm, weights, shapes, L, args, best, interpret, timed, left, copy_bw):
    """The four matmuls of a Llama layer, 32 layers in a fori_loop, with the elementwise work between."""
    names = ("qkv", "o", "gate_up", "down")
    H = shapes["o"][1]
    I = shapes["down"][0]

    def layer_fn(mm):
        def run(x, ws):
            def body(l, h):
                qkv = mm("qkv", h, *ws["qkv"], l)
                attn = qkv[:, :H]  # stand-in for attention: the query columns
                h = h + mm("o", attn, *ws["o"], l)
                gu = mm("gate_up", h, *ws["gate_up"], l)
                act = jax.nn.silu(gu[:, :I]) * gu[:, I:]
                h = h + mm("down", act, *ws["down"], l)
                hf = h.astype(jnp.float32)
                return (hf * jax.lax.rsqrt(jnp.mean(hf * hf, -1, keepdims=True) + 1e-5)).astype(h.dtype)
            return jax.lax.fori_loop(0, L, body, x)
        return jax.jit(run)

    def bytes_step(kd, m):
        return sum(L * (weight_bytes(kd, *shapes[g]) + 2 * m * sum(shapes[g])) for g in names)

    for m in args.stack_m:
        x = jax.random.normal(jax.random.PRNGKey(100 + m), (m, H), jnp.float32).astype(jnp.bfloat16)
        for kd in ["bf16"] + list(args.kinds):
            if left() < 20:
                emit(section="stack", m=m, kind=kd, skipped="budget")
                continue
            ws = {g: weights[g, kd] for g in names}
            variants = []
            if kd == "bf16" or args.stack_shipped:
                variants.append(("layer_matmul", lambda g, x, w, s, l: qm.layer_matmul(x, w, s, l)))
            if kd != "bf16" and not interpret:
                cfgs = {g: pick(qm, best, g, m, kd, *shapes[g]) for g in names}
                if all(c is not None for c in cfgs.values()):
                    variants.append(("best_swept", lambda g, x, w, s, l, c=cfgs: qm.quant_matmul_pallas(
                        x, w, s, l, c[g])))
            if interpret and kd != "bf16":
                variants = [("interpret", lambda g, x, w, s, l: qm.quant_matmul_pallas(
                    x, w, s, l, qm.GemmConfig("dot", 16, 64, 64, 1), interpret=True))]
            if m == 1 and kd != "bf16" and args.stack_xla:
                variants.append(("xla_convert", lambda g, x, w, s, l: qm.xla_layer_matmul(x, w, s, l)))
            ref = None
            for vname, mm in variants:
                try:
                    f = layer_fn(mm)
                    y = f(x, ws)
                    if ref is None and kd != "bf16" and m in (min(args.stack_m), max(args.stack_m)):
                        ref = layer_fn(lambda g, x, w, s, l: qm.xla_layer_matmul(x, w, s, l))(x, ws)
                    diff = None if ref is None else float(
                        jnp.max(jnp.abs(y.astype(jnp.float32) - ref.astype(jnp.float32))))
                    ms, b2b = timed(f, x, ws)
                    b = bytes_step(kd, m)
                    emit(section="stack", m=m, kind=kd, variant=vname, ms=ms, ms_b2b=b2b,
                         tok_s=m / (b2b / 1e3), floor_ms=b / PEAK_BW * 1e3, frac_floor=b / PEAK_BW * 1e3 / b2b,
                         floor_copy_ms=b / (copy_bw * 1e9) * 1e3 if copy_bw else None,
                         max_abs_diff_vs_xla=diff, cfgs=None if vname != "best_swept" else
                         {g: cfg_str(c) for g, c in mm.__defaults__[0].items()})
                except Exception as e:  # noqa: BLE001
                    emit(section="stack", m=m, kind=kd, variant=vname, error=repr(e)[:600])

    def fold_scale(g, x, w, s, l):
        """Prefill alternative: the scale folded into the bf16 weight (one rounding of q*s to bf16)."""
        if s is None:
            return qm.xla_layer_matmul(x, w, None, l)
        if s.ndim == 3:  # group-wise scales: XLA's path already does exactly this
            return qm.xla_layer_matmul(x, w, s, l)
        wl = (w[l].astype(jnp.float32) * s[l]).astype(x.dtype)
        return jnp.einsum("...k,kn->...n", x, wl)

    def quantize_rows_fp8(x):
        amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1)
        xs = jnp.where(amax > 0, amax / 448.0, 1.0)
        return (x.astype(jnp.float32) / xs[:, None]).astype(jnp.float8_e4m3fn), xs

    def w8a8(precision):
        """fp8 x fp8 through XLA (cuBLASLt's fp8 GEMM on Hopper): each row of x in e4m3 with its own scale."""
        def mm(g, x, w, s, l):
            q, xs = quantize_rows_fp8(x)
            y = jax.lax.dot_general(q, w[l], (((1,), (0,)), ((), ())), precision=precision,
                                    preferred_element_type=jnp.float32)
            return (y * xs[:, None] * s[l]).astype(x.dtype)
        return mm

    def w8a8_check(mm, x, w, s, l):
        """Max error over the bound of the tool's check, against the float32 product of the quantized rows."""
        q, xs = quantize_rows_fp8(x)
        xf = q.astype(jnp.float32) * xs[:, None]
        wl = w[l].astype(jnp.float32)
        hp = jax.lax.Precision.HIGHEST
        ref = jnp.matmul(xf, wl, precision=hp) * s[l]
        mag = jnp.matmul(jnp.abs(xf), jnp.abs(wl), precision=hp) * s[l]
        y = jax.jit(lambda x, w, s, l: mm("g", x, w, s, l))(x, w, s, l).astype(jnp.float32)
        return float(jnp.max(jnp.abs(y - ref) / (2.0 ** -8 * jnp.abs(ref) + 2.0 ** -14 * mag + 1e-30)))

    for m in args.prefill_m:
        x = jax.random.normal(jax.random.PRNGKey(200 + m), (m, H), jnp.float32).astype(jnp.bfloat16)
        for kd in ["bf16"] + list(args.kinds):
            ws = {g: weights[g, kd] for g in names}
            vs = [("layer_matmul", lambda g, x, w, s, l: qm.layer_matmul(x, w, s, l))]
            if kd != "bf16" and args.prefill_fold:
                vs.append(("fold_scale_bf16", fold_scale))
            if kd == "fp8":
                vs += [("w8a8_xla_highest", w8a8(jax.lax.Precision.HIGHEST)),
                       ("w8a8_xla_default", w8a8(None))]
                for vname, mm in vs[-2:]:  # gate|up: its K is the hidden size, as x's
                    emit(section="prefill_check", m=m, kind=kd, variant=vname, gemm="gate_up",
                         ratio=w8a8_check(mm, x, *ws["gate_up"], L - 1))
            for vname, mm in vs:
                if left() < 10:
                    emit(section="prefill", m=m, kind=kd, variant=vname, skipped="budget")
                    continue
                try:
                    f = layer_fn(mm)
                    ms, b2b = timed(f, x, ws, reps=3)
                    flops = 2 * m * sum(k * n for k, n in shapes.values()) * L
                    emit(section="prefill", m=m, kind=kd, variant=vname, ms=ms, ms_b2b=b2b,
                         tflops=flops / (ms / 1e3) / 1e12)
                except Exception as e:  # noqa: BLE001
                    emit(section="prefill", m=m, kind=kd, variant=vname, error=repr(e)[:600])


def import_kernel():
    """jaxpipe.kernels.quant_matmul; it needs only jaxpipe.quantize, so a package __init__ that fails to
    import (the rest of the tree mid-change) is bypassed rather than fatal to the benchmark."""
    try:
        from jaxpipe.kernels import quant_matmul
        return quant_matmul
    except ImportError as e:
        print(f"note: import jaxpipe failed ({e}); loading the kernel module alone", flush=True)
        import types

        for name in [n for n in sys.modules if n == "jaxpipe" or n.startswith("jaxpipe.")]:
            del sys.modules[name]
        pkg = types.ModuleType("jaxpipe")
        pkg.__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jaxpipe")]
        sys.modules["jaxpipe"] = pkg
        from jaxpipe.kernels import quant_matmul
        return quant_matmul


def copy_jax(emit, jax, jnp, tiny):
    n = (1 << 20) if tiny else (2 << 30)
    a = jnp.zeros((n,), jnp.int8) + 1
    f = jax.jit(lambda a: a + jnp.int8(1))
    jax.block_until_ready(f(a))
    ts = []
    for _ in range(10):
        t = time.perf_counter()
        jax.block_until_ready(f(a))
        ts.append(time.perf_counter() - t)
    gbs = 2 * n / float(np.median(ts)) / 1e9
    emit(section="copy", impl="jax a+1 int8", bytes_moved=2 * n, gb_s=gbs)
    del a
    return gbs


def copy_torch(emit):
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        return
    n = 2 << 30
    a = torch.empty(n, dtype=torch.int8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    ms = e0.elapsed_time(e1) / 10
    emit(section="copy", impl="torch copy_", bytes_moved=2 * n, gb_s=2 * n / (ms / 1e3) / 1e9)
    del a, b
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
