"""Loading checkpoint tensors straight into their final sharding.

Each parameter array is built with ``jax.make_array_from_callback``: for every device shard the callback
reads only the layers (and vocabulary rows) that shard holds, so no host or device ever holds more than
one stage's worth of one parameter, and padding slots of uneven stages are zeros that are never read.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np

from jaxpipe.config import LlamaConfig
from jaxpipe.pipeline import PipelineModel, map_paths

# Model parameters made of several checkpoint tensors: their columns are concatenated shard by shard
# (see DecoderLayers), so each tensor shard's slice holds its own q, k, v (gate, up) columns.
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"),
         "w_gate_up": ("w_gate", "w_up"), "b_gate_up": ("b_gate", "b_up")}
_KV_NAMES = ("wk", "wv", "bk", "bv")


class _LayerTensors:
    """One model layer's parameter as the stacked array holds it (fused, KV heads replicated as needed).

    Remembers the last one built: the shards of one array ask for the same layer one after another.
    """

    def __init__(self, reader: Any, cfg: LlamaConfig, tp: int, kv_sources: list[int]):
        self.reader, self.tp = reader, tp
        self.kv_cols = None if len(kv_sources) == cfg.num_kv_heads else _kv_columns(cfg, kv_sources)
        self._key, self._value = None, None

    def _part(self, name: str, layer: int) -> np.ndarray:
        w = self.reader.read(name, layer=layer)
        if self.kv_cols is not None and name in _KV_NAMES:
            w = w[..., self.kv_cols]
        return w

    def __call__(self, name: str, layer: int) -> np.ndarray:
        if self._key != (name, layer):
            if name in FUSED:
                parts = [np.split(self._part(n, layer), self.tp, axis=-1) for n in FUSED[name]]
                value = np.concatenate([p[s] for s in range(self.tp) for p in parts], axis=-1)
            else:
                value = self._part(name, layer)
            self._key, self._value = (name, layer), value
        return self._value


def _kv_columns(cfg: LlamaConfig, sources: list[int]) -> np.ndarray:
    """Column indices (into the model's KV projection) of the global, possibly replicated, KV axis."""
    d = cfg.head_dim
    return np.concatenate([np.arange(h * d, (h + 1) * d) for h in sources])


def load_params(reader: Any, model: PipelineModel, *, progress: Callable[[str], None] | None = None) -> dict:
    """Read every parameter from ``reader`` (see docs/DESIGN.md) into ``model``'s shardings."""
    cfg, layout = model.cfg, model.layout
    dtype = np.dtype(model.dtype)
    layer_reader = _LayerTensors(reader, cfg, layout.tensor_parallel, model.kv_sources)

    def build(path: str, abstract) -> jax.Array:
        shape, sharding = abstract.shape, model.param_shardings_flat[path]
        if progress:
            progress(path)
        if path.startswith("layers."):
            name = path.split(".", 1)[1]

            def cb(index):
                slots = range(*index[0].indices(shape[0]))
                rest = index[1:]
                out = np.zeros((len(slots),) + tuple(len(range(*s.indices(n))) for s, n in zip(rest, shape[1:])),
                               dtype)
                for j, slot in enumerate(slots):
                    _, layer = layout.stage_of_slot(slot)
                    if layer is None:
                        continue  # padding slot of a shorter stage: zeros, never computed
                    out[j] = layer_reader(name, layer)[rest].astype(dtype)
                return out
        elif path in ("embed", "lm_head"):
            def cb(index):
                rows = range(*index[0].indices(shape[0]))
                lo, hi = rows.start, min(rows.stop, cfg.vocab_size)
                out = np.zeros((len(rows),) + shape[1:], dtype)
                if hi > lo:
                    out[: hi - lo] = reader.read(path, rows=slice(lo, hi))[:, index[1]].astype(dtype)
                return out
        else:
            def cb(index):
                return np.asarray(reader.read(path))[index].astype(dtype)
        return jax.make_array_from_callback(shape, sharding, cb)

    return map_paths(build, model.abstract_params)

