"""Which layout to use: memory and bandwidth estimates for every pipeline x tensor split of N devices.

Pure arithmetic on the model's shapes (nothing is loaded or compiled). Decode is memory-bound: a step
costs about the bytes it reads divided by the memory bandwidth, so that is all this module models.

Notation: ``S`` pipeline stages, ``T`` tensor shards per stage (``S * T = N`` devices), ``B`` sequences
decoded together (the ``batch`` of :func:`jaxpipe.partition.plan_memory`, i.e. all microbatches
together), ``bw`` the memory bandwidth of one device, ``ctx`` = ``max_model_len``.

Bytes one device of stage ``s`` (holding ``L_s`` layers) reads in one tick of the decode ring, for a
microbatch of ``b`` rows::

    read_s(b) = L_s * layer_weight_bytes / T                       (its shard of its layers' weights)
              + L_s * b * 2 * kv_heads(T) * ctx * head_dim * dtype_bytes   (K and V of its layers)
              + [s = S-1] * padded_vocab * hidden * dtype_bytes / T   (the last stage: its rows of the lm_head)

``kv_heads(T)`` is ``num_kv_heads / T``, or 1 when KV heads are replicated (``T > num_kv_heads``). The
first stage's embedding lookup reads ``b`` rows, which is nothing. The KV term counts ``ctx``
positions: pass the mean live context to model the attention kernels, which read only live positions.

Communication: a collective costs a latency ``alpha`` plus the bytes each device sends over the link
between devices (``link`` GB/s one way)::

    comm_s(b) = [S > 1] * (alpha + b * hidden * dtype_bytes / link)     (the ring's one ppermute: the
                                                     activation, or the sampled token, to the next stage)
              + [T > 1] * (2 * L_s + [s = 0] + SAMPLER_COLLECTIVES * [s = S-1])
                        * (alpha + 2 * (T-1)/T * b * hidden * dtype_bytes / link)   (all-reduces in the stage)

Per tick the compiled decode program holds exactly one collective-permute between stages
(tests/test_collectives.py reads it from the optimized HLO) and, with tensor parallelism, two
all-reduces per layer (attention and MLP outputs), one for the embedding on the first stage and a few
small ones of the vocabulary-parallel sampler on the last (``SAMPLER_COLLECTIVES``, its HLO count for
greedy decoding; their bytes are a few per row and counted as the activation's, an overestimate). The
logits never cross devices: the last stage samples from its own vocabulary shard.

The ring runs all stages in lock step, so a tick lasts as long as the slowest stage::

    tick(b)  = max_s (read_s(b) / bw + comm_s(b))

The ``B`` sequences are split into ``M = min(S, B)`` microbatches of ``b = ceil(B / M)`` rows (what
``LLM`` does by default). Each sequence passes all ``S`` stages for each token, one per tick, and the
ring has ``R = max(M, S) = S`` slots, so::

    token latency     = S * tick(b)          (~ the sum over stages of one stage's bytes / bw)
    throughput        = B / (S * tick(b))    tokens/s (B tokens every S ticks; with M = S full
                                             microbatches that is b tokens per tick)
    prefill bubble    = (S - 1) / (M + S - 1)  (GPipe: the fraction of stage-time spent idle)

Filling the pipeline with ``M = S`` microbatches keeps every stage busy, which recovers throughput,
but a token still passes every stage in turn, so pipelining never lowers latency; tensor parallelism
divides every stage's bytes by ``T`` and does. "max batch" is the largest ``B`` whose weights, KV
cache and workspace fit ``device_bytes`` (by :func:`jaxpipe.partition.plan_memory`, capped at
``MAX_BATCH_SEARCH``); "max tok/s" is the throughput at that batch: the layout that leaves most memory
for the KV cache (no replicated KV heads, no padded stage slots) serves the most sequences at once.

``alpha`` defaults to ``COLLECTIVE_LATENCY_US``, fitted to Llama-2-70B on 4x H200 (NVLink), 2026-11-27:
TP4 measured 14.10 ms/token against 9.34 ms of bytes over bandwidth, i.e. about 30 us per all-reduce
(164 per token); PP2 x TP2 and PP4 agree within 4% with the same value (BENCHMARKS.md). Those
programs had the tick before issue 13 (four collectives spanning every device per tick: the embedding
all-reduce, the broadcast of the last stage's hidden state, the all-gather of f32 logits, the
ppermute); this model, counting those four, reproduces them as the old one did, since at batch 1
the bytes term is nanoseconds on NVLink. What the bytes term is for: slow links. Between hosts
(``--link-gbps 25``, 200 Gb/s) the old tick's logits gather of 32 rows x 128k vocabulary (16 MB) would
cost 0.67 ms, and its activation 21 us. ``link`` defaults to the device kind's NVLink (one direction).

``bw`` and the memory of a device come from :data:`DEVICE_KINDS` (``jaxpipe plan --device``) or from
the device JAX sees; for the H200 ``bw`` is the copy bandwidth JAX reached there (3689 GB/s, not the
datasheet's 4800), and with it the three Llama-2-70B layouts measured on 4x H200 came within 3.3% of
these estimates. A GPU's memory is counted at the fraction JAX's allocator manages
(:func:`jax_gpu_memory_fraction`), and a plan may use ``gpu_memory_utilization`` of any device's memory
(0.9 by default), as ``LLM`` does.

Not modelled: compute (large batches and prefill become compute-bound), contention on the links, kernel launch
overheads and the small per-tick work, which is why short ticks come out slower than estimated
(Llama-2-7B batch 1 on one H200: 4.51 ms measured, 3.62 estimated); the estimates are for ranking
layouts, and communication cost is what favours pipeline over tensor parallelism across slow links
(PCIe, between hosts).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

from jaxpipe import partition
from jaxpipe.config import LlamaConfig
from jaxpipe.errors import LayoutError, UsageError

COLLECTIVE_LATENCY_US = 30.0  # per collective, NVLink H200, measured (see the module docstring)
# Collectives of the vocabulary-parallel sampler on the last stage per greedy tick with tensor parallelism:
# 2 all-reduces and 2 all-gathers in the optimized HLO of the decode program (PP 1 x TP 2, CPU; beside the
# layer loop's 2 all-reduces and the embedding's 1). With top-k/top-p, penalties and logprobs: 11.
SAMPLER_COLLECTIVES = 4
CPU_LINK_GBPS = 10.0
CPU_BANDWIDTH_GBPS = 100.0
UNKNOWN_BANDWIDTH_GBPS = 100.0
MAX_BATCH_SEARCH = 4096
# JAX's allocator manages this fraction of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says
# otherwise (importing jaxpipe sets it to 0.95); it is the ``bytes_limit`` a GPU reports.
JAX_GPU_MEMORY_FRACTION = 0.75
# The part of that which a plan may use: LLM's (and vLLM's) default gpu_memory_utilization.
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
_GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class DeviceKind:
    """Memory bandwidth and memory of one kind of device, for planning without that device at hand."""

    name: str                  # the value of `jaxpipe plan --device`
    label: str
    bandwidth_gbps: float
    bandwidth_source: str
    memory_bytes: int | None   # the whole card; None for a CPU (host memory, shared by its devices)
    match: tuple[str, ...]     # substrings of JAX's ``device_kind`` that identify it (all must appear)
    link_gbps: float = CPU_LINK_GBPS  # device-to-device bandwidth, one direction
    link_source: str = "a guess for devices of one host without NVLink; pass --link-gbps"


# Bandwidth. The H200's is the copy bandwidth JAX's own kernels reached on the lent H200s (a jitted
# a * k over 4 GiB: 3689 GB/s in the call that measured Llama-2-70B on 4x H200, BENCHMARKS.md), not the
# datasheet's 4800 nor PyTorch's copy (4280, NOTES.md): this is what XLA's code streams at, and with it
# (and COLLECTIVE_LATENCY_US, fitted in the same call) the estimates of the three 70B layouts came within
# 3.3% of the measured ms/token (4280 would put them 9-14% too low, 4800 17-28%). For bandwidth
# utilisation (bench's mbu), 4280 is the ceiling to divide by. The other kinds are datasheet numbers,
# not measured here: on the H200 JAX's copy reached 77% of the datasheet, so expect slower than planned.
DEVICE_KINDS: tuple[DeviceKind, ...] = (
    DeviceKind("h200", "H200", 3689.0, "JAX's copy bandwidth measured on an H200; datasheet 4800",
               143771 * 1024 ** 2, ("h200",),  # nvidia-smi on the lent H200s: 143771 MiB
               450.0, "NVLink 4: 900 GB/s both ways, datasheet"),
    DeviceKind("h100", "H100 SXM", 3350.0, "H100 SXM datasheet", 80 * _GIB, ("h100",),
               450.0, "NVLink 4: 900 GB/s both ways, datasheet"),
    DeviceKind("a100", "A100 80GB", 2039.0, "A100 80GB SXM datasheet", 80 * _GIB, ("a100", "80gb"),
               300.0, "NVLink 3: 600 GB/s both ways, datasheet"),
    DeviceKind("a100-40gb", "A100 40GB", 1555.0, "A100 40GB datasheet", 40 * _GIB, ("a100",),
               300.0, "NVLink 3: 600 GB/s both ways, datasheet"),
    DeviceKind("cpu", "CPU", CPU_BANDWIDTH_GBPS,
               "a guess for a CPU (this project's 2-core machine reads 25.6 GB/s); pass --bandwidth-gbps",
               None, ()),
)


def device_kind(name: str) -> DeviceKind:
    """The :class:`DeviceKind` called ``name`` (``h100``, ``h200``, ``a100``, ``a100-40gb``, ``cpu``)."""
    for kind in DEVICE_KINDS:
        if kind.name == name.lower():
            return kind
    raise UsageError(f"unknown device kind {name!r}; known: {', '.join(k.name for k in DEVICE_KINDS)}")


def kind_of_device(device) -> DeviceKind | None:
    """The known kind of a JAX device (by its ``device_kind`` / platform), or None."""
    if getattr(device, "platform", "") == "cpu":
        return device_kind("cpu")
    text = str(getattr(device, "device_kind", "")).lower()
    if "pcie" in text or "nvl" in text:  # other memory than the SXM parts of the table
        return None
    for kind in DEVICE_KINDS:
        if kind.match and all(m in text for m in kind.match):
            return kind
    return None


def jax_gpu_memory_fraction() -> float:
    """The fraction of a GPU's memory JAX will use: ``$XLA_PYTHON_CLIENT_MEM_FRACTION`` or 0.75."""
    raw = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "").strip()
    try:
        value = float(raw) if raw else JAX_GPU_MEMORY_FRACTION
    except ValueError:
        return JAX_GPU_MEMORY_FRACTION
    return value if value > 0 else JAX_GPU_MEMORY_FRACTION


@dataclasses.dataclass(frozen=True)
class PlanDevice:
    """What a plan assumes about each device, and where each number comes from (for printing)."""

    label: str
    memory_bytes: int | None
    memory_source: str
    bandwidth_gbps: float
    bandwidth_source: str
    notes: tuple[str, ...] = ()
    link_gbps: float = CPU_LINK_GBPS
    link_source: str = ""


def plan_device(kind: str | None, local_device, *, memory_gib: float | None = None,
                bandwidth_gbps: float | None = None, link_gbps: float | None = None,
                gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION) -> PlanDevice:
    """Memory, bandwidth and link bandwidth per device for a plan: of the named ``kind``, else of
    ``local_device`` (the first device JAX sees); ``memory_gib``, ``bandwidth_gbps`` and ``link_gbps``
    override either.

    A device's memory is ``memory_gib``, else a named GPU kind's card times
    :func:`jax_gpu_memory_fraction` (what JAX's allocator manages there), else what the device reports
    (a CPU's: this host's memory shared by its devices); the plan may use ``gpu_memory_utilization`` of
    it, as ``LLM`` does, so that the plan, ``jaxpipe bench`` and ``LLM`` agree on what fits.
    """
    named = device_kind(kind) if kind is not None else None
    local_kind = kind_of_device(local_device)
    chosen = named or local_kind
    notes: list[str] = []
    local_text = f"{getattr(local_device, 'device_kind', '?')} ({getattr(local_device, 'platform', '?')})"

    def rate(given, flag, field, unknown, fix):  # (GB/s, where it comes from): a flag, the kind, or a guess
        if given is not None:
            return float(given), flag
        if chosen is not None:
            return getattr(chosen, field + "_gbps"), getattr(chosen, field + "_source")
        return unknown, f"unknown device {local_text}: a guess; pass {fix}"

    bw, bw_src = rate(bandwidth_gbps, "--bandwidth-gbps", "bandwidth", UNKNOWN_BANDWIDTH_GBPS,
                      "--device or --bandwidth-gbps")
    link, link_src = rate(link_gbps, "--link-gbps", "link", CPU_LINK_GBPS, "--link-gbps")

    if memory_gib is not None:
        mem, mem_src = int(memory_gib * _GIB), "--device-memory-gib"
    elif named is not None and named.memory_bytes is not None:
        frac = jax_gpu_memory_fraction()
        mem = int(named.memory_bytes * frac)
        mem_src = (f"{named.label}: {named.memory_bytes / _GIB:.1f} GiB x {frac:g} that JAX manages "
                   "(XLA_PYTHON_CLIENT_MEM_FRACTION)")
    elif named is not None and local_kind is not named:  # a CPU named on another machine: this host's RAM
        import jax
        cpu = jax.local_devices(backend="cpu")[0]
        mem, mem_src = partition.device_memory_bytes(cpu), "this host's memory, shared by its CPU devices"
    else:
        mem = partition.device_memory_bytes(local_device)
        mem_src = f"reported by {local_text}"
    if mem is not None:
        mem = int(mem * gpu_memory_utilization)
        mem_src += f", x {gpu_memory_utilization:g} gpu_memory_utilization"

    if kind is None and bandwidth_gbps is None and getattr(local_device, "platform", "") == "cpu":
        notes.append("note: planning for this machine's CPU; pass --device h100, h200, a100 or a100-40gb to "
                     "plan for GPUs")
    label = chosen.label if chosen is not None else str(getattr(local_device, "device_kind", "device"))
    return PlanDevice(label=label, memory_bytes=mem, memory_source=mem_src, bandwidth_gbps=bw,
                      bandwidth_source=bw_src, notes=tuple(notes), link_gbps=link, link_source=link_src)


def default_bandwidth_gbps(device) -> tuple[float, str]:
    """A device's memory bandwidth in GB/s and where the number comes from (for printing)."""
    d = plan_device(None, device)
    return d.bandwidth_gbps, d.bandwidth_source


def layout_candidates(cfg: LlamaConfig, devices: int) -> list[partition.Layout]:
    """Every layout ``S x T`` with ``S * T == devices`` that the model allows (``S`` at most the number
    of layers, ``T`` dividing the heads), pipeline-heaviest first, with the default layer split."""
    out = []
    for S in range(devices, 0, -1):
        if devices % S:
            continue
        try:
            out.append(partition.make_layout(cfg, S, devices // S))
        except LayoutError:
            continue
    return out


def read_bytes_per_tick(cfg: LlamaConfig, layout: partition.Layout, nbytes: int, rows: int,
                        max_model_len: float, quantization: str | None = None) -> list[float]:
    """Bytes one device of each stage reads per tick for a microbatch of ``rows`` rows whose KV cache
    holds ``max_model_len`` positions (a mean context length works too); ``quantization``: 8-bit decoder
    matrices with their scales (``partition.layer_bytes_per_shard``)."""
    T = layout.tensor_parallel
    layer_w = partition.layer_bytes_per_shard(cfg, T, nbytes, quantization)
    layer_kv = 2 * rows * partition.kv_heads_per_shard(cfg, T) * max_model_len * cfg.head_dim * nbytes
    head = layout.padded_vocab(cfg.vocab_size) * cfg.hidden_size * nbytes // T  # the last stage's lm_head rows
    S = layout.stages
    return [n * (layer_w + layer_kv) + (head if s == S - 1 else 0) for s, n in enumerate(layout.layer_counts)]


def collectives_per_tick(layout: partition.Layout) -> list[tuple[int, int]]:
    """Per stage, (collective-permutes between stages, all-reduces inside the stage) one device waits for
    in a decode tick (see the module docstring)."""
    S, T = layout.stages, layout.tensor_parallel
    out = []
    for s, n in enumerate(layout.layer_counts):
        reduces = 2 * n + (s == 0) + SAMPLER_COLLECTIVES * (s == S - 1) if T > 1 else 0
        out.append((int(S > 1), reduces))
    return out


def comm_seconds_per_tick(cfg: LlamaConfig, layout: partition.Layout, nbytes: int, rows: int, *,
                          link_gbps: float, collective_us: float = COLLECTIVE_LATENCY_US) -> list[float]:
    """Seconds one device of each stage spends in collectives per tick: a latency each plus its bytes over
    the link (ring all-reduce: each device sends ``2 (T-1) / T`` of the message)."""
    T = layout.tensor_parallel
    act = rows * cfg.hidden_size * nbytes
    link = link_gbps * 1e9
    return [p * (collective_us * 1e-6 + act / link) + r * (collective_us * 1e-6 + 2 * (T - 1) / T * act / link)
            for p, r in collectives_per_tick(layout)]


def estimate(cfg: LlamaConfig, layout: partition.Layout, *, dtype, batch: int, max_model_len: int,
             bandwidth_gbps: float, collective_us: float = COLLECTIVE_LATENCY_US,
             link_gbps: float = CPU_LINK_GBPS, quantization: str | None = None) -> dict[str, float]:
    """Decode estimates of one layout at ``batch`` sequences (formulas in the module docstring)."""
    S = layout.stages
    M = min(S, batch)
    b = -(-batch // M)
    bw = bandwidth_gbps * 1e9
    nbytes = partition.dtype_bytes(dtype)
    reads = read_bytes_per_tick(cfg, layout, nbytes, b, max_model_len, quantization)
    comms = comm_seconds_per_tick(cfg, layout, nbytes, b, link_gbps=link_gbps, collective_us=collective_us)
    tick = max(r / bw + c for r, c in zip(reads, comms))
    latency = S * tick
    return {"microbatches": M, "rows_per_microbatch": b, "tick_ms": tick * 1e3,
            "token_latency_ms": latency * 1e3, "throughput_tok_s": batch / latency,
            "prefill_bubble": (S - 1) / (M + S - 1)}


def max_batch(cfg: LlamaConfig, layout: partition.Layout, *, dtype, max_model_len: int,
              device_bytes: int | None, limit: int = MAX_BATCH_SEARCH, quantization: str | None = None) -> int:
    """The largest batch (up to ``limit``) whose memory plan fits ``device_bytes``; 0 if none does."""
    def fits(b: int) -> bool:
        return partition.plan_memory(cfg, layout, dtype=dtype, max_model_len=max_model_len, batch=b,
                                     device_bytes=device_bytes, quantization=quantization).fits
    if device_bytes is None:
        return limit
    if not fits(1):
        return 0
    lo, hi = 1, limit
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi); memory grows with the batch
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def compare_layouts(cfg: LlamaConfig, devices: int, *, dtype, batch: int, max_model_len: int,
                    device_bytes: int | None, bandwidth_gbps: float,
                    collective_us: float = COLLECTIVE_LATENCY_US, link_gbps: float = CPU_LINK_GBPS,
                    quantization: str | None = None) -> list[dict[str, Any]]:
    """Memory and decode estimates for every layout of ``devices`` devices the model allows
    (``quantization``: "int8" / "fp8" decoder matrices, see ``partition.plan_memory``).

    One dict per layout (pipeline-heaviest first) with keys ``layout`` (a ``partition.Layout``),
    ``pipeline``, ``tensor``, ``layer_counts``, ``plan`` (the ``MemoryPlan`` at ``batch``),
    ``peak_bytes``, ``fits``, ``microbatches``, ``rows_per_microbatch``, ``tick_ms``,
    ``token_latency_ms``, ``throughput_tok_s``, ``prefill_bubble``, ``max_batch`` and
    ``max_throughput_tok_s`` (at ``max_batch``; 0 when nothing fits). Formulas: the module docstring.
    """
    if not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if not isinstance(max_model_len, int) or max_model_len < 1:
        raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}")
    if not bandwidth_gbps or bandwidth_gbps <= 0 or not math.isfinite(bandwidth_gbps):
        raise ValueError(f"bandwidth_gbps must be a positive number, got {bandwidth_gbps!r}")
    rows = []
    for layout in layout_candidates(cfg, devices):
        plan = partition.plan_memory(cfg, layout, dtype=dtype, max_model_len=max_model_len, batch=batch,
                                     device_bytes=device_bytes, quantization=quantization)
        row: dict[str, Any] = {"layout": layout, "pipeline": layout.stages, "tensor": layout.tensor_parallel,
                               "layer_counts": list(layout.layer_counts), "plan": plan,
                               "peak_bytes": plan.peak_bytes, "fits": plan.fits}
        row.update(estimate(cfg, layout, dtype=dtype, batch=batch, max_model_len=max_model_len,
                            bandwidth_gbps=bandwidth_gbps, collective_us=collective_us, link_gbps=link_gbps,
                            quantization=quantization))
        mb = max_batch(cfg, layout, dtype=dtype, max_model_len=max_model_len, device_bytes=device_bytes,
                       quantization=quantization)
        row["max_batch"] = mb
        row["max_throughput_tok_s"] = (0.0 if mb == 0 else estimate(
            cfg, layout, dtype=dtype, batch=mb, max_model_len=max_model_len, bandwidth_gbps=bandwidth_gbps,
            collective_us=collective_us, link_gbps=link_gbps, quantization=quantization)["throughput_tok_s"])
        rows.append(row)
    return rows


def recommend(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any] | None]:
    """``{"lowest_latency": row, "highest_throughput": row}`` among the rows of :func:`compare_layouts`.

    Lowest latency: the smallest token latency at the requested batch among the layouts that fit it.
    Highest throughput: the largest throughput at each layout's own max batch. Ties go to fewer
    pipeline stages (fewer hops, smaller prefill bubble). ``None`` where nothing fits.
    """
    fitting = [r for r in rows if r["fits"]]
    lat = min(fitting, key=lambda r: (round(r["token_latency_ms"], 9), r["pipeline"]), default=None)
    usable = [r for r in rows if r["max_batch"] > 0]
    thr = min(usable, key=lambda r: (-round(r["max_throughput_tok_s"], 6), r["pipeline"]), default=None)
    return {"lowest_latency": lat, "highest_throughput": thr}


def layout_name(row_or_layout) -> str:
    layout = row_or_layout["layout"] if isinstance(row_or_layout, dict) else row_or_layout
    return f"PP{layout.stages} x TP{layout.tensor_parallel}"


def format_comparison(rows: list[dict[str, Any]], *, batch: int, max_model_len: int, dtype,
                      bandwidth_gbps: float, devices: int, quantization: str | None = None) -> str:
    """The comparison table and the recommendation, as ``jaxpipe plan`` prints them."""
    gib = 1024 ** 3
    if not rows:
        return f"no layout of {devices} devices suits this model (check its layer and head counts)"
    split_w = max(len("layers/stage"), *(len(",".join(map(str, r["layer_counts"]))) for r in rows))
    head = (f"{'layout':<12} {'layers/stage':<{split_w}} {'GiB/device':>10} {'fits':>4} {'ms/token':>9} "
            f"{'tok/s':>9} {'max batch':>9} {'max tok/s':>10} {'prefill bubble':>14}")
    lines = [f"layouts of {devices} devices (batch {batch}, max_model_len {max_model_len}, "
             f"{np.dtype(dtype).name}{f', {quantization} decoder weights' if quantization else ''}, "
             f"{bandwidth_gbps:g} GB/s per device):", head]
    for r in rows:
        split = ",".join(map(str, r["layer_counts"]))
        mb = r["max_batch"]
        mb_s = f">={mb}" if mb >= MAX_BATCH_SEARCH else str(mb)
        lines.append(
            f"{layout_name(r):<12} {split:<{split_w}} {r['peak_bytes'] / gib:>10.2f} "
            f"{'yes' if r['fits'] else 'NO':>4} {r['token_latency_ms']:>9.2f} {r['throughput_tok_s']:>9.1f} "
            f"{mb_s:>9} {r['max_throughput_tok_s']:>10.1f} {r['prefill_bubble']:>14.0%}")
    rec = recommend(rows)
    lat, thr = rec["lowest_latency"], rec["highest_throughput"]
    if lat is None:
        lines.append(f"recommendation: none of these layouts fits batch {batch}; use more devices, a smaller "
                     "batch, a shorter max_model_len or a smaller dtype")
    else:
        lines.append(f"recommendation: {layout_name(lat)} (lowest latency that fits: "
                     f"{lat['token_latency_ms']:.2f} ms/token, {lat['throughput_tok_s']:.1f} tok/s at batch {batch})")
    if thr is not None:
        same = lat is not None and thr["layout"] == lat["layout"]
        lines.append(f"highest throughput: {layout_name(thr)}{' (the same)' if same else ''}: "
                     f"{thr['max_throughput_tok_s']:.1f} tok/s at batch {thr['max_batch']}")
    lines.append(f"estimates: bytes read per decode step / memory bandwidth + per collective {COLLECTIVE_LATENCY_US:g} "
                 "us and its bytes / link bandwidth (compute ignored); formulas in jaxpipe/planning.py")
    return "\n".join(lines)
