"""Decode attention over a stacked static KV cache: one query token per row, each row its own length.

The cache of a stage is ``[layers, rows, kv_heads, positions, head_dim]`` (keys and values alike); a decode
step of a microbatch reads layer ``layer`` of the contiguous rows ``row0 .. row0 + b``, each row only
positions ``[0, length)``.

Two implementations with one meaning:
- ``"xla"``: a static slice of the cache up to ``kv_len`` positions (a bucket the host picks at least as
  long as the longest live row), masked per row. Attention's cost follows the longest row, not the cache.
  Runs everywhere (CPU, GPU, TPU).
- ``"pallas"``: a Pallas (Triton) kernel for NVIDIA GPUs that reads only each row's own ``length``
  positions (flash decoding: the positions are split into chunks processed in parallel, partial softmax
  results combined afterwards). It takes the whole stacked cache and the layer index and computes the
  addresses itself: a ``pallas_call`` operand that is a dynamic slice of the stack would be copied first,
  which reads and writes the whole layer's cache on every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxpipe.kernels import out_struct

# Added to masked attention scores; finite so that a row with nothing to attend to stays NaN-free.
MASK_VALUE = -1e30
IMPLS = ("xla", "pallas")


def default_impl(platform: str) -> str:
    """The decode attention a platform runs by default: the Pallas kernel on NVIDIA GPUs, XLA elsewhere."""
    return "pallas" if platform == "gpu" else "xla"


def _attend(qg: jax.Array, keys: jax.Array, values: jax.Array, lengths: jax.Array) -> jax.Array:
    """qg ``[b, kv, g, d]``, keys/values ``[b, kv, T, d]``, lengths ``[b]`` -> ``[b, kv, g, d]`` (a row of
    length 0 gets an average of its values: finite, and never used)."""
    d = qg.shape[-1]
    scores = jnp.einsum("bkgd,bktd->bkgt", qg, keys.astype(qg.dtype),
                        preferred_element_type=jnp.float32) * (d ** -0.5)
    valid = jnp.arange(keys.shape[2])[None, :] < lengths[:, None]  # [b, T]
    scores = jnp.where(valid[:, None, None, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(qg.dtype)
    return jnp.einsum("bkgt,bktd->bkgd", probs, values.astype(qg.dtype))


def decode_attention(qg: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, row0, lengths: jax.Array,
                     *, kv_len: int, impl: str = "xla") -> jax.Array:
    """Attention of one new token per row over its row's cache.

    qg: ``[b, kv_heads, group, head_dim]`` queries (RoPE applied), grouped by the KV head they read.
    k_cache, v_cache: ``[layers, rows, kv_heads, positions, head_dim]``; the new token's key and value are
    already written. layer, row0: int32 scalars (traced). lengths: ``[b]`` int32, each row attends to
    positions ``[0, length)`` of cache row ``row0 + r``. kv_len: static, ``>= max(lengths)``; the XLA path
    reads that many positions of every row, the Pallas kernel only each row's own. Returns ``qg``'s shape
    and dtype.
    """
    if impl == "pallas":
        return _pallas_decode_attention(qg, k_cache, v_cache, layer, row0, lengths)
    if impl != "xla":
        raise ValueError(f"decode attention impl must be one of {IMPLS}, got {impl!r}")
    b, n_kv, _, d = qg.shape
    start = (layer, row0, 0, 0, 0)
    size = (1, b, n_kv, kv_len, d)
    keys = jax.lax.dynamic_slice(k_cache, start, size)[0]
    values = jax.lax.dynamic_slice(v_cache, start, size)[0]
    return _attend(qg, keys, values, lengths)


def decode_attention_rows(qg: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, rows: jax.Array,
                          lengths: jax.Array, *, kv_len: int) -> jax.Array:
    """``decode_attention`` for rows that are not contiguous (``rows [b]``; out-of-range rows give garbage)."""
    rows = jnp.clip(rows, 0, k_cache.shape[1] - 1)
    return _attend(qg, k_cache[layer, rows, :, :kv_len], v_cache[layer, rows, :, :kv_len], lengths)


# ---------------------------------------------------------------------------------------------------------
# Pallas (Triton) kernel

BLOCK_K = 64        # positions per inner step
SPLIT = 512         # positions per program (a split); splits of a row run in parallel
MIN_GROUP = 16      # tl.dot needs at least 16 rows: query groups are padded to this (masked)


def _pallas_decode_attention(qg, k_cache, v_cache, layer, row0, lengths, *, interpret: bool = False):
    from jax.experimental import pallas as pl

    b, n_kv, group, d = qg.shape
    positions = k_cache.shape[3]
    splits = -(-positions // SPLIT)
    g_pad = max(MIN_GROUP, 1 << (group - 1).bit_length())
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(row0, jnp.int32)])
    args = (qg, k_cache, v_cache, lengths.astype(jnp.int32), meta)
    kernel = functools.partial(_kernel, group=group, g_pad=g_pad, positions=positions, scale=d ** -0.5)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(b, n_kv, splits),
        in_specs=[
            pl.BlockSpec((None, None, g_pad, d), lambda r, h, s: (r, h, 0, 0)),   # q, padded rows masked
            pl.BlockSpec(),                                                    # whole K cache
            pl.BlockSpec(),                                                    # whole V cache
            pl.BlockSpec(),                                                    # lengths [b]
            pl.BlockSpec(),                                                    # [layer, row0]
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, g_pad, d), lambda r, h, s: (r, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, g_pad), lambda r, h, s: (r, h, s, 0)),
            pl.BlockSpec((None, None, None, g_pad), lambda r, h, s: (r, h, s, 0)),
        ],
        out_shape=[
            out_struct((b, n_kv, splits, group, d), jnp.float32, *args),
            out_struct((b, n_kv, splits, group), jnp.float32, *args),
            out_struct((b, n_kv, splits, group), jnp.float32, *args),
        ],
        interpret=interpret,
        name="jaxpipe_decode_attention",
        **params,
    )(*args)
    # Combine the splits' partial results (flash decoding): empty splits have m = -inf-ish and l = 0.
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)                                         # [b, kv, splits, g]
    den = jnp.sum(w * l, axis=2)
    num = jnp.sum(w[..., None] * o, axis=2)
    # A row of length 0 (a dead slot) has no split with data: give it zeros, not 0 / 0.
    return (num / jnp.maximum(den, 1e-30)[..., None]).astype(qg.dtype)


def _kernel(q_ref, k_ref, v_ref, len_ref, meta_ref, o_ref, m_ref, l_ref, *, group, g_pad, positions, scale):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    r, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, row0 = meta_ref[0], meta_ref[1]
    length = len_ref[r]
    row = row0 + r
    d = q_ref.shape[-1]
    g_mask = (jnp.arange(g_pad) < group)[:, None]
    q = plgpu.load(q_ref.at[pl.ds(0, g_pad), pl.ds(0, d)], mask=g_mask, other=0.0)
    lo = s * SPLIT
    hi = jnp.minimum(lo + SPLIT, length)
    n_blocks = jnp.maximum(0, (hi - lo + BLOCK_K - 1) // BLOCK_K)

    def body(j, carry):
        acc, m_i, l_i = carry
        start = lo + j * BLOCK_K
        pos = start + jnp.arange(BLOCK_K)
        inside = ((pos < hi) & (pos < positions))[:, None]
        idx = (layer, row, h, pl.ds(start, BLOCK_K), pl.ds(0, d))
        k = plgpu.load(k_ref.at[idx], mask=inside, other=0.0)
        v = plgpu.load(v_ref.at[idx], mask=inside, other=0.0)
        scores = plgpu.dot(q.astype(k.dtype), k, trans_b=True).astype(jnp.float32) * scale  # [g_pad, BLOCK_K]
        scores = jnp.where((pos < hi)[None, :], scores, MASK_VALUE)
        m_new = jnp.maximum(m_i, jnp.max(scores, axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.exp(scores - m_new[:, None])
        l_new = alpha * l_i + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
        return acc, m_new, l_new

    init = (jnp.zeros((g_pad, d), jnp.float32), jnp.full((g_pad,), MASK_VALUE, jnp.float32),
            jnp.zeros((g_pad,), jnp.float32))
    acc, m_i, l_i = jax.lax.fori_loop(0, n_blocks, body, init)
    plgpu.store(o_ref.at[pl.ds(0, g_pad), pl.ds(0, d)], acc, mask=g_mask)
    plgpu.store(m_ref.at[pl.ds(0, g_pad)], m_i, mask=g_mask[:, 0])
    plgpu.store(l_ref.at[pl.ds(0, g_pad)], l_i, mask=g_mask[:, 0])
