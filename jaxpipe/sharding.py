"""Sharding rules by logical axis: the one place that maps what an array axis *means* to a mesh axis.

The mesh has two axes: ``stage`` (pipeline stages) and ``tensor`` (tensor parallelism inside a stage).
Model and program code name logical axes (or take the mesh axis names from ``RULES``); only this module
knows which mesh axis each logical axis lives on:

| logical axis | meaning | mesh axis |
|---|---|---|
| ``layers`` | the stacked decoder layers (each stage holds a contiguous block) | stage |
| ``ends`` | the end slices: the embedding on the first stage, the lm_head on the last | stage |
| ``per_stage`` | one copy per stage of per-slot tables, in-flight activations, outputs | stage |
| ``heads`` | attention heads, MLP columns: the columns of column-split matrices, rows of row-split ones | tensor |
| ``kv_heads`` | KV heads of the cache (replicated when fewer than tensor shards) | tensor |
| ``vocab`` | vocabulary rows of the embedding and lm_head (inside a stage) | tensor |
| anything else (hidden, positions, rows of a batch, head_dim) | | replicated |
"""

from __future__ import annotations

import dataclasses

from jax.sharding import PartitionSpec as P

STAGE = "stage"
TENSOR = "tensor"
MESH_AXES = (STAGE, TENSOR)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (None = replicated)."""

    rules: tuple[tuple[str, str | None], ...] = (
        ("layers", STAGE), ("ends", STAGE), ("per_stage", STAGE),
        ("heads", TENSOR), ("kv_heads", TENSOR), ("vocab", TENSOR))

    @property
    def stage(self) -> str:
        """The mesh axis the pipeline ring runs over."""
        return dict(self.rules)["layers"]

    @property
    def tensor(self) -> str:
        """The mesh axis of tensor parallelism (collectives inside a stage)."""
        return dict(self.rules)["heads"]

    def spec(self, *logical: str | None) -> P:
        """The PartitionSpec of an array whose axes mean ``logical`` (None: not sharded)."""
        table = dict(self.rules)
        return P(*(None if name is None else table.get(name) for name in logical))


RULES = ShardingRules()

# Every model parameter's axes (names as in docs/DESIGN.md). Fused q|k|v and gate|up have their columns
# grouped shard by shard, so splitting the last axis over `heads` hands each tensor shard its own columns.
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "ends": ("ends", "vocab", None),
    "final_norm": (None,),
    "layers.attn_norm": ("layers", None),
    "layers.mlp_norm": ("layers", None),
    "layers.wqkv": ("layers", None, "heads"),
    "layers.bqkv": ("layers", "heads"),
    "layers.wo": ("layers", "heads", None),
    "layers.bo": ("layers", None),
    "layers.w_gate_up": ("layers", None, "heads"),
    "layers.b_gate_up": ("layers", "heads"),
    "layers.w_down": ("layers", "heads", None),
    "layers.b_down": ("layers", None),
    # Per-output-channel scales of 8-bit weights (``quantization``): column-split weights' scales go with
    # their columns; row-split ones (o, down) need every shard's copy.
    "layers.wqkv_scale": ("layers", "heads"),
    "layers.wo_scale": ("layers", None),
    "layers.w_gate_up_scale": ("layers", "heads"),
    "layers.w_down_scale": ("layers", None),
}
# The KV cache of a stage: [layers, slots, kv_heads, positions, head_dim].
CACHE_AXES = ("layers", None, "kv_heads", None, None)
