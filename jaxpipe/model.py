"""Llama in Flax NNX, written for one pipeline stage of one tensor-parallel shard.

Every function here sees *local* shapes: the decoder layers are one stacked set of parameters with a
leading layer axis (a stage's slice of the whole stack), attention and MLP weights hold this device's
heads and columns, and the end slices (embedding, lm_head) this stage's rows of the (padded) vocabulary.
Cross-device sums take their axis name as an argument (``jaxpipe.sharding.RULES.tensor`` inside the
programs, None on one device): this module names no mesh axes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpipe.config import LlamaConfig
from jaxpipe.kernels.decode_attention import (MASK_VALUE, decode_attention, decode_attention_rows,
                                              fused_decode_attention)
from jaxpipe.kernels.quant_matmul import layer_matmul
from jaxpipe.nn import rms_norm, swiglu
from jaxpipe.quantize import check_kind, random_quantized

class KVCache(NamedTuple):
    """Keys and values of one stage: ``[layers, rows, kv_heads, positions, head_dim]`` each."""

    k: jax.Array
    v: jax.Array


class StepInputs(NamedTuple):
    """Where a batch of rows' new tokens go in the cache, and what they attend to.

    rows: ``[b]`` cache row of each batch row; an out-of-range row (``>= cache rows``) is padding and writes
    nothing. row0: the first row when the rows are contiguous (``rows = row0 + arange(b)``, the decode ring's
    microbatches), else None (prefill gathers its rows). positions: ``[b, t]`` cache positions of the new
    tokens, which are also their rotary positions (each row's sequence starts at position 0). live: ``[b]``
    rows whose keys and values are written; a dead row (an empty slot, a pipeline bubble, a request that
    ended) computes but leaves the cache alone. kv_len: static number of cache positions attention reads
    (a bucket at least one past the largest position); each token attends to positions ``<=`` its own.
    """

    rows: jax.Array
    row0: jax.Array | None
    positions: jax.Array
    live: jax.Array
    kv_len: int


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Inverse frequencies of the rotary embedding, with linear or llama3 scaling (float32, as transformers)."""
    d = cfg.head_dim
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
    inv = inv.astype(np.float32)
    rs = cfg.rope_scaling
    if rs.rope_type == "linear":
        inv = inv / np.float32(rs.factor)
    elif rs.rope_type == "llama3":
        old_len = rs.original_max_position_embeddings
        low_wavelen = old_len / rs.low_freq_factor
        high_wavelen = old_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / rs.factor, inv)
        smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [b, t, heads, d]`` by the half-split convention transformers' Llama uses."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = jnp.concatenate([cos, cos], axis=-1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([sin, sin], axis=-1)[:, :, None, :].astype(x.dtype)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def _dot(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x, w)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype, std: float = 0.02) -> jax.Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


# The decoder matrices that ``quantization`` stores in 8 bits, each with its ``<name>_scale``: float32
# ``[L, out]`` per output channel (int8, fp8), float16 ``[L, in / 32, out]`` per group (q8_0). Norms, biases, the embedding and the lm_head stay in the run dtype.
QUANTIZED_PARAMS = ("wqkv", "wo", "w_gate_up", "w_down")


class DecoderLayers(nnx.Module):
    """All decoder layers of a stage, each parameter stacked along a leading layer axis."""

    def __init__(self, cfg: LlamaConfig, num_layers: int, *, dtype=jnp.float32, rngs: nnx.Rngs,
                 tensor_parallel: int = 1, kv_size: int | None = None, quantization: str | None = None) -> None:
        """``kv_size``: width of the (possibly replicated) KV projection over all tensor shards.
        ``quantization``: None, or "int8" / "fp8" / "q8_0" for 8-bit ``QUANTIZED_PARAMS`` with their scales."""
        self.cfg = cfg
        self.tensor_parallel = tensor_parallel
        self.quantization = None if quantization is None else check_kind(quantization)
        h, n = cfg.hidden_size, num_layers
        q = cfg.q_size
        kv = kv_size or cfg.kv_size
        i = cfg.intermediate_size
        # q|k|v and gate|up are each one matrix, laid out shard by shard ([q_0 k_0 v_0 | q_1 k_1 v_1 ...]),
        # so that each tensor shard's columns are contiguous. One matmul instead of three (two) per layer,
        # and no weight concatenation at run time: XLA's dot merger would otherwise copy wk|wv every step.
        self.attn_norm = nnx.Param(jnp.ones((n, h), dtype))
        self._matrix("wqkv", (n, h, q + 2 * kv), dtype, rngs)
        self._matrix("wo", (n, q, h), dtype, rngs)
        self.mlp_norm = nnx.Param(jnp.ones((n, h), dtype))
        self._matrix("w_gate_up", (n, h, 2 * i), dtype, rngs)
        self._matrix("w_down", (n, i, h), dtype, rngs)
        if cfg.attention_bias:
            self.bqkv = nnx.Param(jnp.zeros((n, q + 2 * kv), dtype))
            self.bo = nnx.Param(jnp.zeros((n, h), dtype))
        if cfg.mlp_bias:
            self.b_gate_up = nnx.Param(jnp.zeros((n, 2 * i), dtype))
            self.b_down = nnx.Param(jnp.zeros((n, h), dtype))

    def _matrix(self, name: str, shape: tuple[int, ...], dtype, rngs: nnx.Rngs) -> None:
        """A stacked matrix ``[L, in, out]``: normal(0, 0.02) in ``dtype``, or random 8-bit values with
        their ``<name>_scale`` when quantized (real values come from loading)."""
        if self.quantization is None:
            setattr(self, name, nnx.Param(_normal(rngs, shape, dtype)))
        else:
            w, scale = random_quantized(rngs.params(), shape, self.quantization)
            setattr(self, name, nnx.Param(w))
            setattr(self, name + "_scale", nnx.Param(scale))

    def _param(self, name: str, i):
        """Layer ``i``'s slice of a stacked parameter."""
        return getattr(self, name)[...][i]

    def _matmul(self, h, name: str, i, **fused):
        # The whole stack and the layer index go to layer_matmul: its kernel reads w[i] (8-bit) in place.
        # ``fused``: the norm before / activation before / residual after, which its CUDA GEMV does in-kernel.
        scale = getattr(self, name + "_scale")[...] if self.quantization else None
        return layer_matmul(h, getattr(self, name)[...], scale, i, **fused)

    def _layer(self, i, x, cache: KVCache, step: StepInputs, cos, sin, tensor_axis, attention: str):
        cfg = self.cfg
        d = cfg.head_dim
        b, t, _ = x.shape
        qkv = self._matmul(x, "wqkv", i, norm=self.attn_norm[...], eps=cfg.rms_norm_eps)
        if cfg.attention_bias:
            qkv = qkv + self._param("bqkv", i)
        q_width = cfg.q_size // self.tensor_parallel  # this shard's query columns
        kv_width = (qkv.shape[-1] - q_width) // 2
        n_kv = kv_width // d
        group = q_width // d // n_kv
        if t == 1 and step.row0 is not None and attention == "pallas":
            # The decode ring's contiguous rows: rotary embedding, cache write and attention in one kernel.
            attn, k_cache, v_cache = fused_decode_attention(
                qkv.reshape(b, -1), cos.reshape(b, -1), sin.reshape(b, -1), cache.k, cache.v, i, step.row0,
                step.positions[:, 0], step.live, n_heads=n_kv * group)
            return self._mlp_block(i, x, attn.reshape(b, 1, -1), tensor_axis), KVCache(k_cache, v_cache)
        q, k, v = qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
        q = apply_rope(q.reshape(b, t, n_kv * group, d), cos, sin)
        k = apply_rope(k.reshape(b, t, n_kv, d), cos, sin)
        v = v.reshape(b, t, n_kv, d)

        # Write the new keys/values at each row's own positions; dead and padding rows write nothing
        # (their row index is pushed out of range and the scatter drops it).
        n_rows = cache.k.shape[1]
        rows_w = jnp.where(step.live, step.rows, n_rows)[:, None]
        cache = KVCache(cache.k.at[i, rows_w, :, step.positions].set(k.astype(cache.k.dtype), mode="drop"),
                        cache.v.at[i, rows_w, :, step.positions].set(v.astype(cache.v.dtype), mode="drop"))

        if t == 1:
            # A dead row (free slot, bubble) attends to nothing: its stale cache is never read.
            lengths = jnp.where(step.live, step.positions[:, 0] + 1, 0)
            qg = q.reshape(b, n_kv, group, d)
            if step.row0 is not None:
                attn = decode_attention(qg, cache.k, cache.v, i, step.row0, lengths, kv_len=step.kv_len)
            else:
                attn = decode_attention_rows(qg, cache.k, cache.v, i, step.rows, lengths, kv_len=step.kv_len)
            attn = attn.reshape(b, 1, -1)
        else:
            attn = _prefill_attention(q.reshape(b, t, n_kv, group, d), cache, i, step)
        return self._mlp_block(i, x, attn, tensor_axis), cache

    def _mlp_block(self, i, x, attn, tensor_axis):
        """The rest of layer ``i`` after attention: the output projection, the residual, the MLP."""
        cfg = self.cfg
        if tensor_axis is None and not cfg.attention_bias:  # the residual add goes with the matmul
            x = self._matmul(attn, "wo", i, residual=x)
        else:
            out = self._matmul(attn, "wo", i)
            out = jax.lax.psum(out, tensor_axis) if tensor_axis else out
            if cfg.attention_bias:
                out = out + self._param("bo", i)
            x = x + out

        gate_up = self._matmul(x, "w_gate_up", i, norm=self.mlp_norm[...], eps=cfg.rms_norm_eps)
        if cfg.mlp_bias:
            gate_up = gate_up + self._param("b_gate_up", i)
            out = self._matmul(swiglu(gate_up), "w_down", i)
        elif tensor_axis is None:
            return self._matmul(gate_up, "w_down", i, swiglu=True, residual=x)
        else:
            out = self._matmul(gate_up, "w_down", i, swiglu=True)
        out = jax.lax.psum(out, tensor_axis) if tensor_axis else out
        if cfg.mlp_bias:
            out = out + self._param("b_down", i)
        return x + out

    def __call__(self, x: jax.Array, cache: KVCache, step: StepInputs, *, num_layers,
                 tensor_axis: str | None = None, unroll: int | bool = 1,
                 attention: str = "xla") -> tuple[jax.Array, KVCache]:
        """Run the first ``num_layers`` stacked layers (an int, or a traced count for uneven stages) on
        ``x [b, t, H]``, tokens at ``step.positions``. ``attention`` picks the decode attention kernel
        (see ``jaxpipe.kernels.decode_attention``). Padded layer slots past ``num_layers`` are skipped."""
        inv_freq = jnp.asarray(rope_inv_freq(self.cfg))
        freqs = step.positions.astype(jnp.float32)[..., None] * inv_freq
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)

        def body(i, carry):
            return self._layer(i, *carry, step, cos, sin, tensor_axis, attention)

        if isinstance(num_layers, int):
            return jax.lax.fori_loop(0, num_layers, body, (x, cache), unroll=unroll)
        return jax.lax.fori_loop(0, num_layers, body, (x, cache))


def _prefill_attention(qg: jax.Array, cache: KVCache, layer, step: StepInputs) -> jax.Array:
    """Chunk attention: queries ``[b, t, kv, g, d]`` at ``step.positions`` over their rows' cache (the chunk's
    own keys were just written there, earlier chunks before them), causally, up to ``step.kv_len``."""
    b, t, n_kv, group, d = qg.shape
    rows = jnp.clip(step.rows, 0, cache.k.shape[1] - 1)
    keys = cache.k[layer, rows, :, : step.kv_len]     # [b, kv, T, d]
    values = cache.v[layer, rows, :, : step.kv_len]
    k_pos = jnp.arange(step.kv_len)[None, None, :]
    valid = k_pos <= step.positions[:, :, None]        # [b, tq, tk]
    scores = jnp.einsum("bqkgd,bktd->bkgqt", qg, keys.astype(qg.dtype),
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    scores = jnp.where(valid[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    return jnp.einsum("bkgqt,bktd->bqkgd", probs, values.astype(qg.dtype)).reshape(b, t, -1)


class Llama(nnx.Module):
    """The end slices, stacked decoder layers and the final norm.

    ``ends [end_slices, vocab_rows, H]``: the embedding and the lm_head (HF's ``[V, H]`` orientation), one
    slice each per pipeline stage that needs it (see ``end_slices``). Inside ``shard_map`` a stage holds
    its own slices and the rows of its tensor shard: the first local slice is the embedding (used on the
    first stage), the last local slice the lm_head (used on the last stage); with one stage and tied
    weights they are one slice.
    """

    def __init__(self, cfg: LlamaConfig, *, num_layers: int, vocab_rows: int, end_slices: int, dtype=jnp.float32,
                 rngs: nnx.Rngs, tensor_parallel: int = 1, kv_size: int | None = None,
                 quantization: str | None = None) -> None:
        self.cfg = cfg
        self.ends = nnx.Param(_normal(rngs, (end_slices, vocab_rows, cfg.hidden_size), dtype))
        self.layers = DecoderLayers(cfg, num_layers, dtype=dtype, rngs=rngs, tensor_parallel=tensor_parallel,
                                    kv_size=kv_size, quantization=quantization)
        self.final_norm = nnx.Param(jnp.ones((cfg.hidden_size,), dtype))

    def embed_tokens(self, ids: jax.Array, *, tensor_axis: str | None = None) -> jax.Array:
        """Look token ids up in this shard's vocabulary rows of the embedding; sum over the tensor shards."""
        table = self.ends[...][0]
        rows = table.shape[0]
        local = ids - (jax.lax.axis_index(tensor_axis) * rows if tensor_axis else 0)
        mine = (local >= 0) & (local < rows)
        x = jnp.where(mine[..., None], jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0), 0)
        return jax.lax.psum(x, tensor_axis) if tensor_axis else x

    def logits(self, h: jax.Array) -> jax.Array:
        """float32 logits of this shard's vocabulary rows from final hidden states ``h [..., H]`` (no gather:
        the sampler works on the pieces, ``jaxpipe.sampler``)."""
        head = self.ends[...][-1]
        h = rms_norm(h, self.final_norm[...], self.cfg.rms_norm_eps)
        rows = h.reshape(-1, h.shape[-1])
        n = rows.shape[0]
        if n == 1:
            # XLA:GPU computes a one-row dot with float32 output in float32, converting the whole head to
            # float32 first on every step (Llama-2-7B's head on an H200: 329 us, against 77 us with two rows).
            rows = jnp.pad(rows, ((0, 1), (0, 0)))
        out = jnp.einsum("rh,vh->rv", rows, head, preferred_element_type=jnp.float32)
        return out[:n].reshape(*h.shape[:-1], head.shape[0])
