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
import dataclasses
import gc
import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxpipe import partition, planning
from jaxpipe.config import LlamaConfig
from jaxpipe.argtypes import positive_float, positive_int, unit_fraction
from jaxpipe.errors import LayoutError, MemoryPlanError
from jaxpipe.engine import Engine
from jaxpipe.kernels import cuda_gemv
from jaxpipe.kernels.decode_attention import default_impl
from jaxpipe.pipeline import (DecodeSpec, EngineShape, PipelineModel, PrefillBatch, PrefillSpec,
                              flatten_paths)
from jaxpipe.quantize import QUANT_KINDS
from jaxpipe.sampling import SamplerSpec, SamplingTable, SamplingTensors
from jaxpipe.presets import load_preset, preset_names

DTYPE_CHOICES = ("bfloat16", "float32", "float16")
STEPS_PER_DISPATCH = 16  # decode steps per timed dispatch (many ticks in one on-device loop)


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


def bench_cache_len(prompt_len: int, new_tokens: int) -> int:
    """The benchmark's KV cache positions: prompt + new tokens, rounded up to 128."""
    return -(-(prompt_len + new_tokens) // 128) * 128


def check_memory(cfg: LlamaConfig, layout: partition.Layout, *, dtype, batch: int, cache_len: int,
                 device_bytes: int | None = None, preset: str | None = None,
                 gpu_memory_utilization: float = planning.DEFAULT_GPU_MEMORY_UTILIZATION,
                 quantization: str | None = None) -> partition.MemoryPlan:
    """The memory plan of one benchmark run (all ``batch`` rows, a ``cache_len``-position cache), by the
    same :func:`jaxpipe.partition.plan_memory` against the same budget (``gpu_memory_utilization`` of the
    device's memory) as ``LLM`` and ``jaxpipe plan``; raises :class:`MemoryPlanError` (one line) when it
    does not fit, before anything is allocated. ``device_bytes`` defaults to what the first device
    reports (``partition.device_memory_bytes``); ``preset`` names the model in the message's
    ``jaxpipe plan`` command."""
    device = jax.devices()[0]
    if device_bytes is None:
        device_bytes = partition.device_memory_bytes(device)
    budget = None if device_bytes is None else int(device_bytes * gpu_memory_utilization)
    plan = partition.plan_memory(cfg, layout, dtype=dtype, max_model_len=cache_len, batch=batch,
                                 device_bytes=budget, quantization=quantization)
    if not plan.fits:
        gib = 1024 ** 3
        name = np.dtype(dtype).name
        plan_cmd = (f"jaxpipe plan {preset or 'MODEL'} -pp {layout.stages} -tp {layout.tensor_parallel} "
                    f"--batch {batch} --max-model-len {cache_len} --dtype {name}"
                    + (f" --quantization {quantization}" if quantization else ""))
        raise MemoryPlanError(
            f"PP{layout.stages} x TP{layout.tensor_parallel} with {batch} rows x {cache_len} positions in {name} "
            f"needs {plan.peak_bytes / gib:.2f} GiB per device, but {gpu_memory_utilization:g} "
            f"(--gpu-memory-utilization) of each {device.device_kind} device's {device_bytes / gib:.2f} GiB is "
            f"{budget / gib:.2f} GiB: use more --pp or --tp, a smaller --batch or --new-tokens, or a smaller "
            f"--preset (`{plan_cmd}` shows the same plan)")
    return plan


def _init_kind(path: str) -> str:
    """How the model initialises a parameter: norms are ones, biases zeros, the rest normal(0, 0.02)."""
    name = path.rsplit(".", 1)[-1]
    if name.endswith("norm"):
        return "ones"
    if name.startswith("b"):  # bqkv, bo, b_gate_up, b_down
        return "zeros"
    return "normal"


def random_params(pm: PipelineModel, seed: int = 0, block_bytes: int = 4 << 20) -> dict:
    """Random weights at ``pm``'s shapes in their final sharding, allocating little beyond the weights.

    ``PipelineModel.random_params`` builds every weight in one jitted program, and XLA:CPU gives such a
    program one temporary buffer holding the float32 draws of all weights at once (68.5 GB for
    Llama-2-7B's 13.5 GB of bf16 weights), and drawing 6.7e9 normals takes a 2-core CPU many minutes.
    Here each parameter is its own small program in which every device draws one block of about
    ``block_bytes`` of its shard and writes it over and over into the output. Norm weights are ones,
    biases zeros, the rest normal with std 0.02 (the model's init). The values only need to look like
    weights for timing: memory and caches see distinct addresses whatever the contents.
    """
    out = {}
    for index, (path, abstract) in enumerate(sorted(flatten_paths(pm.abstract_params).items())):
        sharding = pm.param_shardings_flat[path]
        program = random_array_program(sharding, abstract.shape, jnp.dtype(abstract.dtype), _init_kind(path),
                                       block_bytes)
        out[path] = program(jax.random.fold_in(jax.random.key(seed), index))
    nested: dict = {}
    for path, value in out.items():
        *parents, leaf = path.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def random_array_program(sharding: NamedSharding, shape: tuple[int, ...], dtype, kind: str,
                         block_bytes: int = 4 << 20):
    """The jitted program ``key -> array`` that :func:`random_params` runs for one parameter (``kind``:
    "ones", "zeros" or "normal")."""
    if kind != "normal":
        fill = jnp.ones if kind == "ones" else jnp.zeros
        return jax.jit(lambda key: fill(shape, dtype), out_shardings=sharding)
    spec, mesh = sharding.spec, sharding.mesh
    local = tuple(sharding.shard_shape(shape))
    # The mesh axes this array is split over: a shard folds in its position along them (and only them,
    # so copies along the other axes are equal, as the out_specs' replication claims).
    axes = [a for entry in spec if entry is not None for a in (entry if isinstance(entry, tuple) else (entry,))]
    # The shard as a [rows, last axis] matrix (row indices fit in int32): one random block of rows, repeated.
    cols = local[-1]
    rows = math.prod(local[:-1])
    step = max(1, min(rows, block_bytes // (cols * dtype.itemsize)))
    n_blocks = -(-rows // step)

    def draw(key):
        for a in axes:
            key = jax.random.fold_in(key, jax.lax.axis_index(a))
        if jnp.issubdtype(dtype, jnp.integer):  # quantized weights
            block = jax.random.randint(key, (step, cols), -127, 128, dtype)
        else:
            block = jax.random.normal(key, (step, cols), dtype) * jnp.asarray(0.02, dtype)
        # One fused pass writes the output: broadcast, reshape and slice are free views for XLA.
        tiled = jnp.broadcast_to(block[None], (n_blocks, step, cols)).reshape(n_blocks * step, cols)
        return tiled[:rows].reshape(local)

    return jax.jit(jax.shard_map(draw, mesh=mesh, in_specs=jax.sharding.PartitionSpec(), out_specs=spec,
                                 check_vma=False), out_shardings=sharding)


@dataclasses.dataclass
class BenchRun:
    """One benchmark layout and batch, built and ready to run: the model, its random weights, the engine,
    and the arguments of its prefill (every slot, one chunk) and decode (``steps`` per dispatch) programs."""

    pm: PipelineModel
    params: dict
    engine: Engine
    plan: partition.MemoryPlan
    prefill_spec: PrefillSpec
    prefill_batch: PrefillBatch
    decode_spec: DecodeSpec
    sampling: SamplingTensors
    release: np.ndarray
    dispatches: int
    init_s: float

    @property
    def ticks(self) -> int:
        """Ring ticks of one decode dispatch."""
        return self.engine.ring.ticks_for_steps(self.decode_spec.steps)

    def prefill(self):
        return self.engine.prefill(self.prefill_spec, self.sampling, self.prefill_batch)

    def decode(self):
        """One decode dispatch (``decode_spec.steps`` steps of every row), not waited for."""
        return self.engine.decode(self.decode_spec, self.sampling, self.release)


def build(cfg: LlamaConfig, *, pp: int, tp: int, microbatches: int, batch: int, prompt_len: int,
          new_tokens: int, dtype, unroll, seed: int = 0, attention: str | None = None,
          quantization: str | None = None, steps_per_dispatch: int = STEPS_PER_DISPATCH,
          gpu_memory_utilization: float = planning.DEFAULT_GPU_MEMORY_UTILIZATION) -> BenchRun:
    """Check the memory plan, then build what :func:`bench` times (also used by ``tools/profile_decode.py``)."""
    layout = partition.make_layout(cfg, pp, tp)
    M, b = microbatches, batch
    cache_len = bench_cache_len(prompt_len, new_tokens)
    plan = check_memory(cfg, layout, dtype=dtype, batch=M * b, cache_len=cache_len,  # before allocating
                        gpu_memory_utilization=gpu_memory_utilization, quantization=quantization)
    mesh = partition.make_mesh(layout)
    pm = PipelineModel(cfg, layout, mesh, dtype, unroll=unroll, quantization=quantization)
    t0 = time.perf_counter()
    params = random_params(pm, seed)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0

    # The engine's own programs: every slot prefilled with one chunk, then decode dispatches of 16 steps.
    shape = EngineShape(microbatches=M, rows=b, cache_len=cache_len)
    engine = Engine(pm, params, shape)
    rng = np.random.default_rng(seed)
    C = partition.next_power_of_two(prompt_len)
    tokens = np.zeros((M * b, C), np.int32)
    tokens[:, :prompt_len] = rng.integers(0, cfg.vocab_size, (M * b, prompt_len))
    n_dispatch = max(1, (new_tokens - steps_per_dispatch) // steps_per_dispatch)
    slots = np.arange(M * b, dtype=np.int32)
    pbatch = PrefillBatch(tokens, slots, np.zeros_like(slots), np.full_like(slots, prompt_len),
                          np.ones((M * b,), bool), np.full_like(slots, steps_per_dispatch * (n_dispatch + 2)))
    greedy = SamplerSpec()
    samp = engine.sampling_tensors(SamplingTable(M * b), 0, greedy.stop_width)
    prefill_spec = PrefillSpec(shape=shape, microbatches=M, rows=b, chunk=C, kv_len=min(cache_len, C),
                               sampler=greedy)
    decode_spec = DecodeSpec(shape=shape, steps=steps_per_dispatch, kv_len=cache_len, sampler=greedy,
                             attention=attention or default_impl(jax.devices()[0].platform))
    return BenchRun(pm, params, engine, plan, prefill_spec, pbatch, decode_spec, samp, np.zeros((M * b,), bool),
                    n_dispatch, init_s)


def bench(cfg: LlamaConfig, *, pp: int, tp: int, microbatches: int, batch: int, prompt_len: int,
          new_tokens: int, dtype, unroll, bandwidth_gbps: float | None, seed: int = 0,
          attention: str | None = None, quantization: str | None = None,
          gpu_memory_utilization: float = planning.DEFAULT_GPU_MEMORY_UTILIZATION) -> dict:
    """Prefill and decode timings of one layout and batch on random weights, as a JSON-able dict
    (``tick_ms``, ``token_latency_ms``, ``aggregate_tok_s``, ``prefill_ms``, ``mbu`` ...).
    ``quantization`` ("int8", "fp8", "q8_0"): random 8-bit decoder matrices with scales; ``mbu`` counts their
    bytes."""
    run = build(cfg, pp=pp, tp=tp, microbatches=microbatches, batch=batch, prompt_len=prompt_len,
                new_tokens=new_tokens, dtype=dtype, unroll=unroll, seed=seed, attention=attention,
                quantization=quantization, gpu_memory_utilization=gpu_memory_utilization)
    layout, pm, plan, engine = run.pm.layout, run.pm, run.plan, run.engine
    M, b, R = microbatches, batch, engine.ring.slots
    cache_len, ticks, n_dispatch = run.decode_spec.kv_len, run.ticks, run.dispatches
    t0 = time.perf_counter()
    jax.block_until_ready(run.prefill())
    prefill_compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(run.prefill())
        times.append(time.perf_counter() - t0)
    prefill_s = float(np.median(times))

    t0 = time.perf_counter()
    jax.block_until_ready(run.decode())
    decode_compile_s = time.perf_counter() - t0
    times = []
    for _ in range(n_dispatch):
        t0 = time.perf_counter()
        jax.block_until_ready(run.decode())
        times.append(time.perf_counter() - t0)
    tick_s = float(np.median(times)) / ticks

    # Bytes per tick of the busiest device, from the same model as `jaxpipe plan`: with the KV cache at
    # the mean context (what must be read) and at the whole static cache (what attention reads).
    nbytes = np.dtype(dtype).itemsize
    weights_per_device = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, 0, quantization))
    bytes_min = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, prompt_len + new_tokens / 2,
                                                 quantization))
    bytes_read = max(planning.read_bytes_per_tick(cfg, layout, nbytes, b, cache_len, quantization))
    kv_min = bytes_min - weights_per_device
    result = {
        "bench": "jaxpipe_decode", "device": jax.devices()[0].device_kind, "n_devices": layout.num_devices,
        "pp": pp, "tp": tp, "microbatches": M, "batch_per_microbatch": b, "ring_slots": R,
        "layer_counts": list(layout.layer_counts), "prompt_len": prompt_len, "cache_len": cache_len,
        "dtype": str(np.dtype(dtype)), "quantization": quantization, "unroll": pm.unroll,
        "tick_ms": tick_s * 1e3, "token_latency_ms": tick_s * R * 1e3,
        "aggregate_tok_s": M * b / (tick_s * R),
        "prefill_ms": prefill_s * 1e3, "prefill_tok_s": M * b * prompt_len / prefill_s,
        "weights_gb_per_device": weights_per_device / 1e9, "kv_bytes_min_per_device": int(kv_min),
        "plan_peak_gib_per_device": round(plan.peak_bytes / 1024 ** 3, 3),
        "compile_s": {"prefill": round(prefill_compile_s, 1), "decode": round(decode_compile_s, 1)},
        "init_s": round(run.init_s, 1),
    }
    if bandwidth_gbps:
        result["bandwidth_gbps"] = bandwidth_gbps
        result["mbu"] = bytes_min / tick_s / (bandwidth_gbps * 1e9)
        result["mbu_read"] = bytes_read / tick_s / (bandwidth_gbps * 1e9)
    result["attention"] = run.decode_spec.attention
    if quantization:  # whether layer_matmul could take the CUDA GEMV (where its tiling_for picks it)
        result["cuda_gemv"] = cuda_gemv.available()
    del run, pm, engine
    return result


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The benchmark's flags (shared by ``jaxpipe bench`` and ``tools/bench_decode.py``)."""
    parser.add_argument("--preset", default="llama-2-7b", choices=preset_names(), metavar="NAME",
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
    parser.add_argument("--quantization", default=None, choices=QUANT_KINDS,
                        help="8-bit decoder weights with their scales, as LLM(quantization=...) (default: none)")
    parser.add_argument("--unroll", default=None, type=_unroll,
                        help="layer-loop unroll: an int, or 'full' (default: as LLM, 4 on GPUs and 1 elsewhere)")
    parser.add_argument("--bandwidth-gbps", type=positive_float, default=None,
                        help="memory bandwidth (GB/s) to compute utilisation (mbu) against")
    parser.add_argument("--attention", default=None, choices=("xla", "pallas"),
                        help="decode attention kernel (default: pallas on GPUs, xla elsewhere)")
    parser.add_argument("--measure-bandwidth", action="store_true",
                        help="measure the device-to-device copy bandwidth first and use it for mbu")
    parser.add_argument("--gpu-memory-utilization", metavar="F", type=unit_fraction,
                        default=planning.DEFAULT_GPU_MEMORY_UTILIZATION,
                        help="fraction of each device's memory a run may use, as in LLM and `jaxpipe plan` "
                             f"(default: {planning.DEFAULT_GPU_MEMORY_UTILIZATION})")
    return parser


def _unroll(text: str) -> int | bool:
    if text == "full":
        return True
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'full', got {value}")
    return value


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments, printing one JSON line per measurement.

    Every layout and batch is checked first (heads, devices, memory), so a run that cannot fit fails in
    a second, before any weight is generated."""
    cfg = load_preset(args.preset)
    unroll = _unroll(args.unroll) if isinstance(args.unroll, str) else args.unroll
    dtype = jnp.dtype(args.dtype)
    cache_len = bench_cache_len(args.prompt_len, args.new_tokens)
    devices = jax.devices()
    for pp in args.pp:
        layout = partition.make_layout(cfg, pp, args.tp)
        if layout.num_devices > len(devices):
            hint = (f"; on a CPU, give JAX more devices before it starts: "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={layout.num_devices}"
                    if devices[0].platform == "cpu" else "")
            raise LayoutError(f"--pp {pp} x --tp {args.tp} needs {layout.num_devices} devices, but JAX sees "
                              f"{len(devices)} {devices[0].platform} device(s){hint}")
        for b in args.batch:
            check_memory(cfg, layout, dtype=dtype, batch=(args.microbatches or pp) * b, cache_len=cache_len,
                         preset=args.preset, gpu_memory_utilization=args.gpu_memory_utilization,
                         quantization=args.quantization)
    weight_gb = cfg.param_count() * dtype.itemsize / 1e9
    if devices[0].platform == "cpu" and weight_gb > 4:
        print(f"jaxpipe bench: note: {args.preset} is {weight_gb:.1f} GB of {dtype.name} weights; on a CPU each "
              "measurement takes many minutes (--preset smollm2-135m --dtype float32 is a CPU-sized run)",
              file=sys.stderr, flush=True)
    bw = args.bandwidth_gbps
    if args.measure_bandwidth:
        bw = copy_bandwidth_gbps(devices[0])
        print(json.dumps({"bench": "copy_bandwidth", "device": devices[0].device_kind,
                          "gbps": round(bw, 1)}), flush=True)
    for pp in args.pp:
        for b in args.batch:
            r = bench(cfg, pp=pp, tp=args.tp, microbatches=args.microbatches or pp, batch=b,
                      prompt_len=args.prompt_len, new_tokens=args.new_tokens, dtype=dtype,
                      unroll=unroll, bandwidth_gbps=bw, attention=args.attention,
                      quantization=args.quantization, gpu_memory_utilization=args.gpu_memory_utilization)
            r["preset"] = args.preset
            print(json.dumps(r), flush=True)
            gc.collect()  # free this layout's weights and cache before the next one is built
    return 0
