"""The partition plan: how layers, heads, vocabulary rows and the KV cache are spread over the mesh.

The mesh has two axes: ``stage`` (pipeline stages, each a contiguous block of decoder layers) and
``tensor`` (tensor parallelism inside a stage). Every parameter and cache array gets its
``PartitionSpec`` from its logical axes (``jaxpipe.sharding``: ``PARAM_AXES``, ``CACHE_AXES``, ``RULES``);
loading, random initialisation and the jitted programs all use them.

Where the pieces live:
- decoder layers: stacked ``[stages * slots_per_stage, ...]``, sharded over ``stage``; a stage with fewer
  layers than the longest one leaves its last slot empty (zeros, never computed);
- attention heads and MLP columns: sharded over ``tensor`` (q/k/v/gate/up by output columns, o/down by
  input rows); when there are fewer KV heads than ``tensor`` shards, KV heads are replicated;
- embedding on the first stage, lm_head on the last (``ends``, one slice per stage, split by vocabulary
  rows over ``tensor``): only activations and sampled tokens cross between stages. In SPMD every stage
  allocates its slice (middle stages' stay unused), so the end stages are heavier only in the bytes they
  read per tick: the last stage reads its lm_head rows every tick, and ``split_layers`` gives it fewer
  layers when that lowers the slowest stage's bytes.
- KV cache ``[slots_per_stage, rows, kv_heads, positions, head_dim]`` per stage: ``stage`` on layers,
  ``tensor`` on KV heads.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpipe.config import LlamaConfig
from jaxpipe.errors import LayoutError, MemoryPlanError
from jaxpipe.quantize import group_size, quant_dtype
from jaxpipe.sharding import CACHE_AXES, MESH_AXES, PARAM_AXES, RULES

# One PartitionSpec per parameter (names as in docs/DESIGN.md) and for the KV cache, from their logical axes.
PARAM_SPECS: dict[str, P] = {path: RULES.spec(*axes) for path, axes in PARAM_AXES.items()}
CACHE_SPEC = RULES.spec(*CACHE_AXES)
REPLICATED = P()


def param_spec(path: str, ndim: int | None = None) -> P:
    """The PartitionSpec of a parameter, by its dotted path (``layers.wq``, ``embed``...). ``ndim``: the
    parameter's rank, which tells group-wise scales (q8_0: ``[layers, in / 32, out]``, split exactly like
    their matrix, groups with its rows) from per-channel ones (``[layers, out]``)."""
    try:
        if path.endswith("_scale") and ndim == 3:
            return PARAM_SPECS[path[:-len("_scale")]]
        return PARAM_SPECS[path]
    except KeyError:
        raise KeyError(f"no PartitionSpec for parameter {path!r}; add it to PARAM_SPECS") from None


def split_layers(num_layers: int, stages: int, head_layers: float = 0.0) -> tuple[int, ...]:
    """Layers per stage. vLLM's split is ``L // S`` each, the remainder added one by one from the
    second-to-last stage backwards, never to the last stage.

    ``head_layers``: what the last stage reads per tick for its lm_head, in layers' worth of bytes. The
    ring runs in lock step, so a tick lasts as long as the stage that reads the most; when moving layers
    off the last stage (to the others, from the second-to-last backwards) lowers that maximum, they move.
    With ``head_layers=0`` this is vLLM's split.
    """
    if stages < 1:
        raise LayoutError(f"pipeline_parallel_size must be at least 1, got {stages}")
    if stages > num_layers:
        raise LayoutError(
            f"pipeline_parallel_size={stages} is more than the model's {num_layers} layers; "
            f"use at most {num_layers} stages")
    counts = [num_layers // stages] * stages
    remainder = num_layers % stages
    if remainder:
        for i in range(2, remainder + 2):
            counts[-i] += 1

    def cost(c):
        return max(n + (head_layers if s == stages - 1 else 0.0) for s, n in enumerate(c))

    while stages > 1 and counts[-1] > 1:
        moved = list(counts)
        moved[-1] -= 1
        others = list(range(stages - 1))
        target = min(others, key=lambda s: (moved[s], -s))  # the lightest, nearest the end
        moved[target] += 1
        if cost(moved) < cost(counts):
            counts = moved
        else:
            break
    return tuple(counts)


def end_slices(cfg: LlamaConfig, stages: int) -> int:
    """Slices of ``ends`` per stage: one (the embedding on the first stage, the lm_head on the last), or two
    on a single stage whose lm_head is not the embedding."""
    return 2 if stages == 1 and not cfg.tie_word_embeddings else 1


def head_layers(cfg: LlamaConfig, tp: int, nbytes: int = 2) -> float:
    """The lm_head's rows a last-stage device reads per tick, in decoder layers' worth of bytes."""
    vocab = -(-cfg.vocab_size // tp) * tp
    return vocab // tp * cfg.hidden_size * nbytes / layer_bytes_per_shard(cfg, tp, nbytes)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A parallel layout: pipeline stages x tensor shards, and the layers each stage holds."""

    layer_counts: tuple[int, ...]
    tensor_parallel: int = 1

    @property
    def stages(self) -> int:
        return len(self.layer_counts)

    @property
    def num_devices(self) -> int:
        return self.stages * self.tensor_parallel

    @property
    def slots_per_stage(self) -> int:
        """Length of each stage's layer stack (the longest stage's count)."""
        return max(self.layer_counts)

    @property
    def even(self) -> bool:
        return len(set(self.layer_counts)) == 1

    @property
    def layer_offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.layer_counts[:-1]))

    def stage_of_slot(self, slot: int) -> tuple[int, int | None]:
        """Global stacked slot -> (stage, model layer index or None for an empty padding slot)."""
        stage, j = divmod(slot, self.slots_per_stage)
        if j >= self.layer_counts[stage]:
            return stage, None
        return stage, self.layer_offsets[stage] + j

    def padded_vocab(self, vocab_size: int) -> int:
        """Vocabulary rounded up so every tensor shard holds the same number of rows."""
        n = self.tensor_parallel
        return -(-vocab_size // n) * n


def make_layout(cfg: LlamaConfig, pipeline_parallel_size: int = 1, tensor_parallel_size: int = 1,
                layer_partition: Sequence[int] | None = None) -> Layout:
    """Check a requested layout against the model and build it; errors say what would work."""
    S, T = int(pipeline_parallel_size), int(tensor_parallel_size)
    if T < 1:
        raise LayoutError(f"tensor_parallel_size must be at least 1, got {T}")
    if layer_partition is not None:
        counts = tuple(int(c) for c in layer_partition)
        if len(counts) != S:
            raise LayoutError(
                f"layer_partition has {len(counts)} entries but pipeline_parallel_size is {S}; "
                "give one layer count per stage")
        if any(c < 1 for c in counts):
            raise LayoutError(f"layer_partition {list(counts)}: every stage needs at least one layer")
        if sum(counts) != cfg.num_layers:
            raise LayoutError(
                f"layer_partition {list(counts)} sums to {sum(counts)}, but the model has "
                f"{cfg.num_layers} layers")
    else:
        check_tensor_parallel(cfg, T)
        counts = split_layers(cfg.num_layers, S, head_layers(cfg, T))
    check_tensor_parallel(cfg, T)
    return Layout(layer_counts=counts, tensor_parallel=T)


def check_tensor_parallel(cfg: LlamaConfig, tp: int) -> None:
    """Heads must split evenly; KV heads either split or are replicated whole."""
    ok = [t for t in range(1, cfg.num_heads + 1) if _tp_ok(cfg, t)]
    if not _tp_ok(cfg, tp):
        raise LayoutError(
            f"tensor_parallel_size={tp} does not divide the model's heads ({cfg.num_heads} attention, "
            f"{cfg.num_kv_heads} KV heads, intermediate {cfg.intermediate_size}); sizes that work: {ok}")


def _tp_ok(cfg: LlamaConfig, tp: int) -> bool:
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        return False
    if cfg.num_kv_heads % tp == 0:
        return True
    # Replicated KV heads: each shard's query heads must all read one KV head.
    group = cfg.num_heads // cfg.num_kv_heads
    return tp % cfg.num_kv_heads == 0 and group % (cfg.num_heads // tp) == 0


def kv_heads_per_shard(cfg: LlamaConfig, tp: int) -> int:
    return max(1, cfg.num_kv_heads // tp)


def kv_head_sources(cfg: LlamaConfig, tp: int) -> list[int]:
    """For the global (possibly replicated) KV head axis: which model KV head each position holds."""
    if cfg.num_kv_heads % tp == 0:
        return list(range(cfg.num_kv_heads))
    q_per_shard = cfg.num_heads // tp
    group = cfg.num_heads // cfg.num_kv_heads
    return [(shard * q_per_shard) // group for shard in range(tp)]


def make_mesh(layout: Layout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``stage`` x ``tensor`` mesh over the first ``layout.num_devices`` devices.

    Tensor shards of a stage sit on neighbouring devices (fast links inside a host); stages follow.
    """
    devices = list(jax.devices() if devices is None else devices)
    need = layout.num_devices
    if len(devices) < need:
        raise LayoutError(
            f"the layout needs {need} devices (pipeline {layout.stages} x tensor {layout.tensor_parallel}) "
            f"but only {len(devices)} {devices[0].platform if devices else ''} device(s) are visible; "
            "use smaller pipeline_parallel_size / tensor_parallel_size")
    grid = np.array(devices[:need], dtype=object).reshape(layout.stages, layout.tensor_parallel)
    return Mesh(grid, MESH_AXES)


def sharding(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)


# ---------------------------------------------------------------------------------------------------
# Memory plan

@dataclasses.dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: int
    first_layer: int
    weight_bytes: int      # per device
    kv_cache_bytes: int    # per device
    workspace_bytes: int   # per device: activations, logits, sampling buffers (estimate)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes + self.workspace_bytes


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    layout: Layout
    stages: tuple[StagePlan, ...]
    device_bytes: int | None
    max_model_len: int
    batch: int

    @property
    def peak_bytes(self) -> int:
        return max(s.total_bytes for s in self.stages)

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.peak_bytes <= self.device_bytes

    def table(self) -> str:
        """A human-readable table: one row per stage, then the verdict."""
        gib = 1024 ** 3
        lines = [f"{'stage':>5} {'layers':>9} {'weights GiB':>12} {'KV cache GiB':>13} "
                 f"{'workspace GiB':>14} {'total GiB':>10}"]
        for s in self.stages:
            span = f"{s.first_layer}-{s.first_layer + s.layers - 1}"
            lines.append(f"{s.stage:>5} {span:>9} {s.weight_bytes / gib:>12.3f} {s.kv_cache_bytes / gib:>13.3f} "
                         f"{s.workspace_bytes / gib:>14.3f} {s.total_bytes / gib:>10.3f}")
        per = ("per device" if self.layout.tensor_parallel == 1
               else f"per device (each stage is {self.layout.tensor_parallel} tensor shards)")
        lines.append(f"memory {per}; batch {self.batch}, max_model_len {self.max_model_len}")
        if self.device_bytes is None:
            lines.append("device memory unknown: not checked")
        elif self.fits:
            lines.append(f"fits: peak {self.peak_bytes / gib:.2f} GiB of {self.device_bytes / gib:.2f} GiB per device")
        else:
            lines.append(f"DOES NOT FIT: peak {self.peak_bytes / gib:.2f} GiB > {self.device_bytes / gib:.2f} GiB "
                         "per device; use more stages, a smaller batch or a shorter max_model_len")
        return "\n".join(lines)


def dtype_bytes(dtype) -> int:
    return np.dtype(dtype).itemsize


def plan_memory(cfg: LlamaConfig, layout: Layout, *, dtype, max_model_len: int, batch: int,
                device_bytes: int | None, quantization: str | None = None) -> MemoryPlan:
    """Bytes per device for weights, KV cache and workspace, per stage. Pure arithmetic: nothing loads.

    ``quantization`` ("int8", "fp8", "q8_0"): the decoder matrices take 1 byte per weight plus their scales
    (4 bytes per column; q8_0 2 bytes per 32 weights);
    the embedding, lm_head, norms and the KV cache stay in ``dtype``."""
    nbytes = dtype_bytes(dtype)
    tp = layout.tensor_parallel
    vocab = layout.padded_vocab(cfg.vocab_size)
    # Every stage holds its slices of `ends` (the first and last stages use theirs) and the final norm.
    ends = (end_slices(cfg, layout.stages) * vocab // tp * cfg.hidden_size + cfg.hidden_size) * nbytes
    kv_heads = kv_heads_per_shard(cfg, tp)
    kv_per_layer = 2 * batch * kv_heads * max_model_len * cfg.head_dim * nbytes
    layer_bytes = layer_bytes_per_shard(cfg, tp, nbytes, quantization)
    # Workspace: this shard's float32 logits and sampling copies of them, the per-slot output-token counts
    # and prompt masks (penalties), plus a few activations.
    workspace = (4 * batch * vocab // tp * 4 + batch * vocab // tp * 5
                 + 8 * batch * max(cfg.intermediate_size // tp, cfg.hidden_size) * nbytes)
    slots = layout.slots_per_stage
    stages = tuple(
        StagePlan(stage=s, layers=n, first_layer=layout.layer_offsets[s],
                  weight_bytes=slots * layer_bytes + ends, kv_cache_bytes=slots * kv_per_layer,
                  workspace_bytes=workspace)
        for s, n in enumerate(layout.layer_counts))
    return MemoryPlan(layout=layout, stages=stages, device_bytes=device_bytes,
                      max_model_len=max_model_len, batch=batch)


def check_quantization(cfg: LlamaConfig, layout: Layout, quantization: str | None) -> None:
    """Refuse (LayoutError) a group-wise quantization whose groups of input rows would straddle a matrix's
    tensor shards: every shard's rows of q|k|v, o, gate|up and down must be whole groups."""
    g = None if quantization is None else group_size(quantization)
    if g is None:
        return
    tp = layout.tensor_parallel
    rows = {"hidden_size": cfg.hidden_size, f"q heads x head_dim / tp ({tp})": cfg.q_size // tp,
            f"intermediate_size / tp ({tp})": cfg.intermediate_size // tp}
    for what, k in rows.items():
        if k % g:
            raise LayoutError(f"quantization={quantization!r} scales groups of {g} input rows, but {what} is {k}: "
                              f"use a tensor_parallel_size that leaves whole groups, or int8 (per-channel scales)")


def layer_bytes_per_shard(cfg: LlamaConfig, tp: int, nbytes: int, quantization: str | None = None) -> int:
    """Bytes of one decoder layer on one tensor shard: matrices (1 byte per weight when quantized, with a
    float32 scale per output column: column-split q|k|v and gate|up carry their own columns' scales, o and
    down every column's; q8_0: a float16 scale per 32 weights, split with them) plus norms and biases in
    ``nbytes``."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = kv_heads_per_shard(cfg, tp) * cfg.head_dim
    q = cfg.q_size // tp
    matrices = h * (q + 2 * kv) + q * h + 3 * h * (i // tp)
    n = 2 * h
    if cfg.attention_bias:
        n += q + 2 * kv + h
    if cfg.mlp_bias:
        n += 2 * (i // tp) + h
    if quantization is None:
        return (matrices + n) * nbytes
    if group_size(quantization):
        return matrices * quant_dtype(quantization).itemsize + matrices // group_size(quantization) * 2 + n * nbytes
    scale_columns = (q + 2 * kv) + h + 2 * (i // tp) + h
    return matrices * quant_dtype(quantization).itemsize + scale_columns * 4 + n * nbytes


def device_memory_bytes(device: jax.Device) -> int | None:
    """Usable memory of one device: the allocator's limit on GPU/TPU, host RAM shared by CPU devices."""
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices do not report memory stats on every JAX version.
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            import os
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return int(total // max(1, len(jax.local_devices(backend="cpu"))))  # this host's devices share it
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(plan: MemoryPlan) -> None:
    if not plan.fits:
        raise MemoryPlanError("the model does not fit the devices' memory:\n" + plan.table())


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))
