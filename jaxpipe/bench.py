"""Decode and prefill speed of jaxpipe at real Llama shapes with random weights (``jaxpipe bench``).

Prints one JSON line per measurement. Example (one GPU, Llama-2-7B shapes, batch 1 and 16):

    jaxpipe bench --preset llama-2-7b --batch 1 16 --bandwidth-gbps 3350
    python tools/bench_decode.py --preset llama-2-7b --batch 1 16 --bandwidth-gbps 3350   # the same

Pipeline: ``--pp 2 --microbatches 2`` (batch is per microbatch). Weights are generated directly on the
devices in their final sharding. Decode is timed over whole dispatches (many ticks in one on-device
loop) after a warm-up dispatch, with the pipeline already full.

Memory-bandwidth utilisation (``mbu``) per device = bytes that device must read per tick / tick time /
bandwidth, where the bytes are its stage's layer weights, its vocabulary rows of the lm_head, and the
KV cache of its layers for the microbatch it runs (the filled positions only: ``kv_bytes_min``). The
static cache makes us read all ``T`` positions; ``mbu_read`` counts those bytes instead.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import partition, planning
from jaxpipe.config import LlamaConfig
from jaxpipe.argtypes import positive_int
from jaxpipe.pipeline import Geometry, PipelineModel, greedy_sampler
from jaxpipe.presets import load_preset, preset_names

DTYPE_CHOICES = ("bfloat16", "float32", "float16")


def copy_bandwidth_gbps(device, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), median of 10."""
    x = jax.device_put(jnp.ones((nbytes // 4,), jnp.float32), device)
    f = jax.jit(lambda a: a * 1.0000001)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(times)) / 1e9


def bench(cfg: LlamaConfig, *, pp: int, tp: int, microbatches: int, batch: int, prompt_len: int,
          new_tokens: int, dtype, unroll, bandwidth_gbps: float | None, seed: int = 0) -> dict:
    """Prefill and decode timings of one layout and batch on random weights, as a JSON-able dict
    (``tick_ms``, ``token_latency_ms``, ``aggregate_tok_s``, ``prefill_ms``, ``mbu`` ...)."""
    layout = partition.make_layout(cfg, pp, tp)
    mesh = partition.make_mesh(layout)
    pm = PipelineModel(cfg, layout, mesh, dtype, unroll=unroll)
    t0 = time.perf_counter()
    params = pm.random_params(seed)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0

    M, b = microbatches, batch
    cache_len = -(-(prompt_len + new_tokens) // 128) * 128
    geo = Geometry(M, b, cache_len)
    R = pm.ring_slots(geo)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (M * b, prompt_len)), jnp.int32)
    kv_start = jnp.zeros((M * b,), jnp.int32)
    empty = jnp.zeros((M * b, 0), jnp.int32)
    sampler = greedy_sampler()

    prefill = pm.prefill_program(geo, prompt_len, sampler)
    t0 = time.perf_counter()
    cache, outs = prefill(params, pm.new_cache(geo), tokens, kv_start, {}, empty, empty)
    jax.block_until_ready(outs)
    prefill_compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        cache, outs = prefill(params, cache, tokens, kv_start, {}, empty, empty)
        jax.block_until_ready(outs)
        times.append(time.perf_counter() - t0)
    prefill_s = float(np.median(times))

    # Decode: dispatches of `per` ticks; steps per slot limited so positions stay inside the cache.
    steps_per_dispatch = 16
    ticks = steps_per_dispatch * R
    decode = pm.decode_program(geo, ticks, sampler)
    state = pm.initial_decode_state(geo, cache, np.asarray(outs[0]), empty)
    t0 = time.perf_counter()
    state, o = decode(params, state, jnp.int32(prompt_len), kv_start, {}, empty)
    jax.block_until_ready(o)
    decode_compile_s = time.perf_counter() - t0
    n_dispatch = max(1, (new_tokens - steps_per_dispatch) // steps_per_dispatch)
    times = []
    for _ in range(n_dispatch):
        t0 = time.perf_counter()
        state, o = decode(params, state, jnp.int32(prompt_len), kv_start, {}, empty)
        jax.block_until_ready(o)
        times.append(time.perf_counter() - t0)
    tick_s = float(np.median(times)) / ticks

    # Bytes per tick of the busiest device, from the same model as `jaxpipe plan`: with the KV cache at
    # the mean context (what must be read) and at the whole static cache (what attention reads).
    nbytes = np.dtype(dtype).itemsize
    weights_per_device = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, 0))
    bytes_min = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, prompt_len + new_tokens / 2))
    bytes_read = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, cache_len))
    kv_min = bytes_min - weights_per_device
    result = {
        "bench": "jaxpipe_decode", "device": jax.devices()[0].device_kind, "n_devices": layout.num_devices,
        "pp": pp, "tp": tp, "microbatches": M, "batch_per_microbatch": b, "ring_slots": R,
        "layer_counts": list(layout.layer_counts), "prompt_len": prompt_len, "cache_len": cache_len,
        "dtype": str(np.dtype(dtype)), "unroll": unroll,
        "tick_ms": tick_s * 1e3, "token_latency_ms": tick_s * R * 1e3,
        "aggregate_tok_s": M * b / (tick_s * R),
        "prefill_ms": prefill_s * 1e3, "prefill_tok_s": M * b * prompt_len / prefill_s,
        "weights_gb_per_device": weights_per_device / 1e9, "kv_bytes_min_per_device": int(kv_min),
        "compile_s": {"prefill": round(prefill_compile_s, 1), "decode": round(decode_compile_s, 1)},
        "init_s": round(init_s, 1),
    }
    if bandwidth_gbps:
        result["bandwidth_gbps"] = bandwidth_gbps
        result["mbu"] = bytes_min / tick_s / (bandwidth_gbps * 1e9)
        result["mbu_read"] = bytes_read / tick_s / (bandwidth_gbps * 1e9)
    del params, state, cache
    return result


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (shared by ``jaxpipe bench`` and ``tools/bench_decode.py``)."""
    parser.add_argument("--preset", default="llama-2-7b",
                        help=f"model shapes (random weights): {', '.join(preset_names())} (default: llama-2-7b)")
    parser.add_argument("--pp", type=positive_int, nargs="+", default=[1],
                        help="pipeline stages; several values run one after another (default: 1)")
    parser.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel shards per stage (default: 1)")
    parser.add_argument("--microbatches", type=positive_int, default=None, help="default: equal to --pp")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 16],
                        help="rows per microbatch; several values run one after another (default: 1 16)")
    parser.add_argument("--prompt-len", type=positive_int, default=128, help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="decode steps (default: 128)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="default: bfloat16")
    parser.add_argument("--unroll", default="1", help="layer-loop unroll: an int, or 'full'")
    parser.add_argument("--bandwidth-gbps", type=float, default=None,
                        help="memory bandwidth (GB/s) to compute utilisation (mbu) against")
    parser.add_argument("--measure-bandwidth", action="store_true",
                        help="measure the device-to-device copy bandwidth first and use it for mbu")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, printing one JSON line per measurement."""
    cfg = load_preset(args.preset)
    if args.unroll != "full":
        try:
            unroll = int(args.unroll)
        except ValueError:
            raise ValueError(f"--unroll must be an integer or 'full', got {args.unroll!r}") from None
    else:
        unroll = True
    bw = args.bandwidth_gbps
    if bw is not None and not bw > 0:
        raise ValueError(f"--bandwidth-gbps must be a positive number, got {bw}")
    if args.measure_bandwidth:
        bw = copy_bandwidth_gbps(jax.devices()[0])
        print(json.dumps({"bench": "copy_bandwidth", "device": jax.devices()[0].device_kind,
                          "gbps": round(bw, 1)}), flush=True)
    for pp in args.pp:
        for b in args.batch:
            r = bench(cfg, pp=pp, tp=args.tp, microbatches=args.microbatches or pp, batch=b,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=jnp.dtype(args.dtype),
                      unroll=unroll, bandwidth_gbps=bw)
            r["preset"] = args.preset
            print(json.dumps(r), flush=True)
            gc.collect()  # free this layout's weights and cache before the next one is built
    return 0
