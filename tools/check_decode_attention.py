#!/usr/bin/env python3
"""The fused decode step (``jaxpipe.kernels.decode_attention.fused_decode_attention``: rotary embedding,
cache write and attention in one Pallas kernel) checked against the model's unfused XLA step and timed, as
the model runs it: a stacked ``[layers, rows, kv_heads, positions, head_dim]`` cache, one call per layer
inside a ``fori_loop`` (the layer index traced), the cache carried and donated. One JSON line per case.

    python tools/check_decode_attention.py            # on a GPU: the kernel against XLA, bf16
    python tools/check_decode_attention.py --small    # CPU: the kernel in Pallas' interpreter, float32
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def unfused_step(qkv, cos, sin, k_cache, v_cache, layer, row0, positions, live, *, n_heads, kv_len=None):
    """The model's decode step without the kernel (``Llama._layer`` at one token: rotation, the masked
    scatter of the new key and value, XLA attention over ``kv_len`` positions), with the rotation computed in
    float32 (cos and sin rounded to the dtype first) and rounded once, as the kernel documents; in float32
    that is exactly the model's ``apply_rope``. Same arguments and results as ``fused_decode_attention``."""
    import jax.numpy as jnp
    from jaxpipe.kernels import decode_attention as da
    from jaxpipe.model import apply_rope

    b, dtype = qkv.shape[0], qkv.dtype
    _, n_rows, n_kv, n_pos, d = k_cache.shape
    q, k, v = jnp.split(qkv, [n_heads * d, (n_heads + n_kv) * d], axis=-1)
    c = cos.astype(dtype).astype(jnp.float32)[:, None, :]
    s = sin.astype(dtype).astype(jnp.float32)[:, None, :]
    q = apply_rope(q.reshape(b, 1, n_heads, d).astype(jnp.float32), c, s).astype(dtype)
    k = apply_rope(k.reshape(b, 1, n_kv, d).astype(jnp.float32), c, s).astype(dtype)
    rows_w = jnp.where(live, row0 + jnp.arange(b), n_rows)[:, None]
    pos = positions[:, None]
    k_cache = k_cache.at[layer, rows_w, :, pos].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[layer, rows_w, :, pos].set(v.reshape(b, 1, n_kv, d).astype(v_cache.dtype), mode="drop")
    lengths = jnp.where(live, positions + 1, 0)
    attn = da.decode_attention(q.reshape(b, n_kv, n_heads // n_kv, d), k_cache, v_cache, layer, row0, lengths,
                               kv_len=kv_len or n_pos)
    return attn.reshape(b, -1), k_cache, v_cache


def run_case(name, *, layers, rows, kv_heads, group, head_dim, positions, live, kv_len, dtype, interpret):
    import jax
    import jax.numpy as jnp
    from jaxpipe.kernels import decode_attention as da

    rng = np.random.default_rng(0)
    n_heads = kv_heads * group
    shape = (layers, rows, kv_heads, positions, head_dim)
    k = jax.random.normal(jax.random.key(1), shape, dtype)
    v = jax.random.normal(jax.random.key(2), shape, dtype)
    qkv = jnp.asarray(rng.standard_normal((rows, (n_heads + 2 * kv_heads) * head_dim)), dtype)
    pos = jnp.asarray(rng.integers(live[0], live[1] + 1, rows) - 1, jnp.int32)
    alive = jnp.asarray(rng.random(rows) < 0.9)
    freqs = np.asarray(pos, np.float32)[:, None] / 10000.0 ** (np.arange(0, head_dim, 2) / head_dim)
    cos, sin = jnp.cos(freqs), jnp.sin(freqs)

    def make(impl):
        step = (functools.partial(da.fused_decode_attention, interpret=interpret) if impl == "pallas"
                else functools.partial(unfused_step, kv_len=kv_len))

        @functools.partial(jax.jit, donate_argnums=(1, 2))
        def stack(x, kc, vc):
            def body(i, carry):
                acc, kc, vc = carry
                out, kc, vc = step(x, cos, sin, kc, vc, i, jnp.int32(0), pos, alive, n_heads=n_heads)
                return acc + out.astype(jnp.float32), kc, vc
            return jax.lax.fori_loop(0, layers, body, (jnp.zeros((rows, n_heads * head_dim), jnp.float32), kc, vc))
        return stack

    outs, times = {}, {}
    for impl in ("xla", "pallas"):
        f = make(impl)
        t0 = time.perf_counter()
        res = f(qkv, jnp.copy(k), jnp.copy(v))
        outs[impl] = [np.asarray(a, np.float32) for a in res]
        compile_s = time.perf_counter() - t0
        kc, vc = jnp.copy(k), jnp.copy(v)
        ts = []
        for _ in range(5 if interpret else 30):
            t0 = time.perf_counter()
            _, kc, vc = f(qkv, kc, vc)
            kc.block_until_ready()
            ts.append(time.perf_counter() - t0)
        times[impl] = (float(np.median(ts)), compile_s)
    (o_ref, k_ref, v_ref), (o, kk, vv) = outs["xla"], outs["pallas"]
    rows_live = np.asarray(alive)  # a dead row's output is never used (XLA: an average; the kernel: zeros)
    err = float(np.linalg.norm(o[rows_live] - o_ref[rows_live]) / np.linalg.norm(o_ref[rows_live]))
    caches_equal = bool(np.array_equal(kk, k_ref) and np.array_equal(vv, v_ref))
    live_bytes = 2 * int(np.asarray(jnp.where(alive, pos + 1, 0)).sum()) * kv_heads * head_dim \
        * np.dtype(dtype).itemsize * layers
    rec = {"check": "decode_attention", "case": name, "device": jax.devices()[0].device_kind, "layers": layers,
           "rows": rows, "kv_heads": kv_heads, "group": group, "positions": positions, "kv_len_xla": kv_len,
           "live": list(live), "dtype": str(np.dtype(dtype)), "rel_err_pallas_vs_xla": err,
           "caches_equal": caches_equal, "live_kv_gb": live_bytes / 1e9}
    for impl, (t, c) in times.items():
        rec[f"{impl}_ms_per_layer"] = t / layers * 1e3
        rec[f"{impl}_live_tb_s"] = live_bytes / t / 1e12
        rec[f"{impl}_compile_s"] = round(c, 2)
    print(json.dumps(rec), flush=True)
    return err if caches_equal else float("inf")


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
        cases = [("mha_b1_live200_cache256", dict(layers=32, rows=1, kv_heads=32, group=1, head_dim=128,
                                                  positions=256, live=(150, 250), kv_len=256)),
                 ("mha_b32_live200_cache4096", dict(layers=8, rows=32, kv_heads=32, group=1, head_dim=128,
                                                    positions=4096, live=(150, 250), kv_len=256)),
                 ("mha_b32_live200_cache256", dict(layers=8, rows=32, kv_heads=32, group=1, head_dim=128,
                                                   positions=256, live=(150, 250), kv_len=256)),
                 ("mha_b64_live4000", dict(layers=4, rows=64, kv_heads=32, group=1, head_dim=128, positions=4096,
                                           live=(3900, 4096), kv_len=4096)),
                 ("gqa_b32_live200", dict(layers=8, rows=32, kv_heads=8, group=4, head_dim=128, positions=4096,
                                          live=(150, 250), kv_len=256))]
        dtype, interpret = jnp.bfloat16, False
    worst = max(run_case(name, dtype=dtype, interpret=interpret, **kw) for name, kw in cases)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    print(json.dumps({"check": "decode_attention_summary", "worst_rel_err": worst, "ok": worst <= tol}), flush=True)
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
