#!/usr/bin/env python3
"""Decode attention kernels (jaxpipe.kernels.decode_attention) checked against each other and timed, as the
model runs them: a stacked ``[layers, rows, kv_heads, positions, head_dim]`` cache read layer by layer inside
a ``fori_loop`` (the layer index traced). One JSON line per case.

    python tools/check_decode_attention.py            # on a GPU: pallas vs xla, bf16
    python tools/check_decode_attention.py --small    # CPU: xla vs pallas in interpret mode
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_case(name, *, layers, rows, kv_heads, group, head_dim, positions, live, kv_len, dtype, interpret):
    import jax
    import jax.numpy as jnp
    from jaxpipe.kernels import decode_attention as da

    rng = np.random.default_rng(0)
    shape = (layers, rows, kv_heads, positions, head_dim)
    k = jax.random.normal(jax.random.key(1), shape, dtype)
    v = jax.random.normal(jax.random.key(2), shape, dtype)
    q = jnp.asarray(rng.standard_normal((rows, kv_heads, group, head_dim)), dtype)
    lengths = jnp.asarray(rng.integers(live[0], live[1] + 1, rows), jnp.int32)

    def make(impl):
        def one(qq, kk, vv, layer, ln):
            if impl == "xla":
                return da.decode_attention(qq, kk, vv, layer, 0, ln, kv_len=kv_len, impl="xla")
            return da._pallas_decode_attention(qq, kk, vv, layer, jnp.int32(0), ln, interpret=interpret)

        @jax.jit
        def stack(qq, kk, vv, ln):
            def body(i, acc):
                return acc + one(qq, kk, vv, i, ln).astype(jnp.float32)
            return jax.lax.fori_loop(0, layers, body, jnp.zeros(qq.shape, jnp.float32))
        return stack

    outs, times = {}, {}
    for impl in ("xla", "pallas"):
        f = make(impl)
        t0 = time.perf_counter()
        outs[impl] = np.asarray(f(q, k, v, lengths))
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(5 if interpret else 30):
            t0 = time.perf_counter()
            f(q, k, v, lengths).block_until_ready()
            ts.append(time.perf_counter() - t0)
        times[impl] = (float(np.median(ts)), compile_s)
    ref = outs["xla"]
    err = float(np.linalg.norm(outs["pallas"] - ref) / np.linalg.norm(ref))
    live_bytes = 2 * int(np.asarray(lengths).sum()) * kv_heads * head_dim * np.dtype(dtype).itemsize * layers
    rec = {"check": "decode_attention", "case": name, "device": jax.devices()[0].device_kind, "layers": layers,
           "rows": rows, "kv_heads": kv_heads, "group": group, "positions": positions, "kv_len_xla": kv_len,
           "live": list(live), "dtype": str(np.dtype(dtype)), "rel_err_pallas_vs_xla": err,
           "live_kv_gb": live_bytes / 1e9}
    for impl, (t, c) in times.items():
        rec[f"{impl}_ms_per_layer"] = t / layers * 1e3
        rec[f"{impl}_live_tb_s"] = live_bytes / t / 1e12
        rec[f"{impl}_compile_s"] = round(c, 2)
    print(json.dumps(rec), flush=True)
    return err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes, Pallas in interpret mode (CPU)")
    args = ap.parse_args(argv)
    import jax.numpy as jnp

    if args.small:
        cases = [("small_mha", dict(layers=2, rows=3, kv_heads=2, group=1, head_dim=32, positions=1100,
                                    live=(1, 1100), kv_len=1100)),
                 ("small_gqa", dict(layers=2, rows=2, kv_heads=1, group=3, head_dim=64, positions=256,
                                    live=(5, 200), kv_len=256))]
        dtype, interpret = jnp.float32, True
    else:
        cases = [("mha_b32_live200_cache4096", dict(layers=8, rows=32, kv_heads=32, group=1, head_dim=128,
                                                    positions=4096, live=(150, 250), kv_len=256)),
                 ("mha_b32_live200_cache256", dict(layers=8, rows=32, kv_heads=32, group=1, head_dim=128,
                                                   positions=256, live=(150, 250), kv_len=256)),
                 ("mha_b64_live4000", dict(layers=4, rows=64, kv_heads=32, group=1, head_dim=128, positions=4096,
                                           live=(3900, 4096), kv_len=4096)),
                 ("mha_b128_mixed_live", dict(layers=4, rows=128, kv_heads=32, group=1, head_dim=128,
                                              positions=1536, live=(48, 1536), kv_len=1536)),
                 ("gqa_b32_live200", dict(layers=8, rows=32, kv_heads=8, group=4, head_dim=128, positions=4096,
                                          live=(150, 250), kv_len=256))]
        dtype, interpret = jnp.bfloat16, False
    worst = max(run_case(name, dtype=dtype, interpret=interpret, **kw) for name, kw in cases)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    print(json.dumps({"check": "decode_attention_summary", "worst_rel_err": worst, "ok": worst <= tol}), flush=True)
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
