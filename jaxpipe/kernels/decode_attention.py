"""Decode attention over a stacked static KV cache: one query token per row, each row its own length.

The cache of a stage is ``[layers, rows, kv_heads, positions, head_dim]`` (keys and values alike); a decode
step of a microbatch reads layer ``layer`` of the contiguous rows ``row0 .. row0 + b``, each row only
positions ``[0, length)``.

Two implementations:
- ``"xla"``: ``decode_attention``, a static slice of the cache up to ``kv_len`` positions (a bucket the host
  picks at least as long as the longest live row), masked per row; the model applies the rotary embedding
  and writes the new key and value first. Attention's cost follows the longest row, not the cache. Runs
  everywhere (CPU, GPU, TPU).
- ``"pallas"``: ``fused_decode_attention``, one Pallas (Triton) kernel for NVIDIA GPUs that does the whole
  step of a layer: rotary embedding of the queries and the new key, the cache write (in place), and
  attention over each row's own ``length`` positions (flash decoding: positions split into chunks
  processed in parallel, partial softmax results combined afterwards). It takes the whole stacked cache
  and the layer index and computes the addresses itself: a ``pallas_call`` operand that is a dynamic
  slice of the stack would be copied first, which reads and writes the whole layer's cache on every step.
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
                     *, kv_len: int) -> jax.Array:
    """Attention of one new token per row over its row's cache.

    qg: ``[b, kv_heads, group, head_dim]`` queries (RoPE applied), grouped by the KV head they read.
    k_cache, v_cache: ``[layers, rows, kv_heads, positions, head_dim]``; the new token's key and value are
    already written. layer, row0: int32 scalars (traced). lengths: ``[b]`` int32, each row attends to
    positions ``[0, length)`` of cache row ``row0 + r``. kv_len: static, ``>= max(lengths)``: that many
    positions of every row are read. Returns ``qg``'s shape and dtype.
    """
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
# The fused decode step: a Pallas (Triton) kernel

BLOCK_K = 64        # positions per inner step
SPLIT = 512         # positions per program (a split); the splits of a row run in parallel
MIN_GROUP = 16      # tl.dot needs at least 16 rows: query groups are padded to this (masked)


def fused_decode_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                           v_cache: jax.Array, layer, row0, positions: jax.Array, live: jax.Array, *,
                           n_heads: int, interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step's attention for one layer, in one kernel (NVIDIA GPUs; ``interpret`` elsewhere).

    The same meaning as the model's unfused step: rotary embedding (transformers' half-split convention) on
    the queries and the new key, the new key and value written into the cache at each live row's position,
    then each row's query heads attend to its positions ``[0, position]``.

    qkv: ``[b, (n_heads + 2 * kv_heads) * head_dim]``, the fused projection's output (queries, keys, values).
    cos, sin: ``[b, head_dim // 2]`` float32, each row's rotary angles. k_cache, v_cache: ``[layers, rows,
    kv_heads, positions, head_dim]``, updated in place (aliased). layer, row0: int32 scalars; batch row ``r``
    is cache row ``row0 + r``. positions: ``[b]`` int32, the new token's position. live: ``[b]`` bool; a dead
    row writes nothing and attends to nothing (its output is zeros, never used).
    Returns the attention output ``[b, n_heads * head_dim]`` in qkv's dtype and the two caches.

    Why fused: unfused, each layer's decode attention is seven small XLA kernels besides the attention
    (the two cache writes as masked scatters, the rotary concatenations, the output conversion): at one row
    they cost more than the attention itself. One program per (row, kv head, split of ``SPLIT``
    positions); several splits are combined afterwards (flash decoding), one split is normalised in place.
    """
    from jax.experimental import pallas as pl

    b = qkv.shape[0]
    n_layers, n_rows, n_kv, n_pos, d = k_cache.shape
    if n_heads % n_kv or qkv.shape[1] != (n_heads + 2 * n_kv) * d or d % 2:
        raise ValueError(f"fused_decode_attention: qkv {qkv.shape} does not hold {n_heads} query heads and "
                         f"{n_kv} key/value heads of {d} (cache {k_cache.shape})")
    group = n_heads // n_kv
    g_pad = max(MIN_GROUP, 1 << (group - 1).bit_length())
    splits = -(-n_pos // SPLIT)
    combine = splits > 1
    args = (qkv.reshape(b, n_heads + 2 * n_kv, d), cos.astype(jnp.float32), sin.astype(jnp.float32),
            positions.astype(jnp.int32), live.astype(jnp.int32),
            jnp.asarray(layer, jnp.int32).reshape(1), jnp.asarray(row0, jnp.int32).reshape(1), k_cache, v_cache)
    if combine:
        outs = [out_struct((b, n_kv, splits, group, d), jnp.float32, *args),
                out_struct((b, n_kv, splits, group), jnp.float32, *args),
                out_struct((b, n_kv, splits, group), jnp.float32, *args)]
    else:
        outs = [out_struct((b, n_heads, d), qkv.dtype, *args)]
    outs += [out_struct(k_cache.shape, k_cache.dtype, *args), out_struct(v_cache.shape, v_cache.dtype, *args)]
    kernel = functools.partial(_fused_kernel, n_heads=n_heads, group=group, g_pad=g_pad, combine=combine,
                               scale=d ** -0.5)
    params = {}
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params["compiler_params"] = plgpu.CompilerParams(num_warps=4, num_stages=2)
    *res, k_cache, v_cache = pl.pallas_call(
        kernel,
        grid=(b, n_kv, splits),
        out_shape=outs,
        input_output_aliases={7: len(outs) - 2, 8: len(outs) - 1},
        interpret=interpret,
        name="jaxpipe_decode_step",
        **params,
    )(*args)
    if not combine:
        return res[0].reshape(b, n_heads * d), k_cache, v_cache
    o, m, l = res
    # Combine the splits' partial results (flash decoding): empty splits have m = MASK_VALUE and l = 0.
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - m_all)                                         # [b, kv, splits, g]
    den = jnp.sum(w * l, axis=2)
    num = jnp.sum(w[..., None] * o, axis=2)
    # A dead row has no split with data: give it zeros, not 0 / 0.
    out = (num / jnp.maximum(den, 1e-30)[..., None]).astype(qkv.dtype)
    return out.reshape(b, n_heads * d), k_cache, v_cache


def _rotate(x1, x2, c, s, dtype):
    """The two halves of ``x`` rotated (``x * cos + rotate_half(x) * sin``), float32 math on the operands in
    ``dtype`` (cos and sin rounded to it first, as the unfused model does), rounded once to ``dtype``."""
    c = c.astype(dtype).astype(jnp.float32)
    s = s.astype(dtype).astype(jnp.float32)
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return (x1 * c - x2 * s).astype(dtype), (x2 * c + x1 * s).astype(dtype)


def _fused_kernel(qkv_ref, cos_ref, sin_ref, pos_ref, live_ref, layer_ref, row0_ref, k_in, v_in, *out_refs,
                  n_heads, group, g_pad, combine, scale):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if combine:
        o_ref, m_ref, l_ref, k_ref, v_ref = out_refs
    else:
        o_ref, k_ref, v_ref = out_refs
    del k_in, v_in  # aliased with k_ref / v_ref: read and written through those
    r, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_kv, n_pos, d = k_ref.shape[2], k_ref.shape[3], k_ref.shape[4]
    half = d // 2
    dtype = qkv_ref.dtype
    layer, row = layer_ref[0], row0_ref[0] + r
    pos = pos_ref[r]
    live = live_ref[r] != 0
    lo = s * SPLIT

    # This KV head's queries (rows of the group, padded) and the new key and value, rotated.
    g_mask = (jnp.arange(g_pad) < group)[:, None]
    c, sn = cos_ref[r, pl.ds(0, half)], sin_ref[r, pl.ds(0, half)]
    q_rows = pl.ds(h * group, g_pad)
    q1 = plgpu.load(qkv_ref.at[r, q_rows, pl.ds(0, half)], mask=g_mask, other=0.0)
    q2 = plgpu.load(qkv_ref.at[r, q_rows, pl.ds(half, half)], mask=g_mask, other=0.0)
    q1, q2 = _rotate(q1, q2, c[None, :], sn[None, :], dtype)
    k1, k2 = _rotate(qkv_ref[r, n_heads + h, pl.ds(0, half)], qkv_ref[r, n_heads + h, pl.ds(half, half)],
                     c, sn, dtype)
    vn = qkv_ref[r, n_heads + n_kv + h, pl.ds(0, d)]
    k1, k2, vn = k1.astype(k_ref.dtype), k2.astype(k_ref.dtype), vn.astype(v_ref.dtype)

    # The split holding the new position writes it (no program reads that position from memory: the
    # loop below reads the positions before it, and the new key and value join from registers after it).
    has_new = live & (pos >= lo) & (pos < lo + SPLIT) & (pos < n_pos) & (row < k_ref.shape[1])
    at = (layer, row, h, jnp.minimum(pos, n_pos - 1))
    plgpu.store(k_ref.at[(*at, pl.ds(0, half))], k1, mask=jnp.full((half,), has_new))
    plgpu.store(k_ref.at[(*at, pl.ds(half, half))], k2, mask=jnp.full((half,), has_new))
    plgpu.store(v_ref.at[(*at, pl.ds(0, d))], vn, mask=jnp.full((d,), has_new))

    hi = jnp.minimum(jnp.minimum(lo + SPLIT, jnp.where(live, pos, 0)), n_pos)  # positions before the new one
    n_blocks = jnp.maximum(0, (hi - lo + BLOCK_K - 1) // BLOCK_K)

    def body(j, carry):
        acc, m_i, l_i = carry
        start = lo + j * BLOCK_K
        inside = start + jnp.arange(BLOCK_K) < hi
        idx = (layer, row, h, pl.ds(start, BLOCK_K))
        kb1 = plgpu.load(k_ref.at[(*idx, pl.ds(0, half))], mask=inside[:, None], other=0.0)
        kb2 = plgpu.load(k_ref.at[(*idx, pl.ds(half, half))], mask=inside[:, None], other=0.0)
        vb = plgpu.load(v_ref.at[(*idx, pl.ds(0, d))], mask=inside[:, None], other=0.0)
        scores = (plgpu.dot(q1.astype(kb1.dtype), kb1, trans_b=True).astype(jnp.float32)
                  + plgpu.dot(q2.astype(kb2.dtype), kb2, trans_b=True).astype(jnp.float32)) * scale
        scores = jnp.where(inside[None, :], scores, MASK_VALUE)   # [g_pad, BLOCK_K]
        m_new = jnp.maximum(m_i, jnp.max(scores, axis=1))
        alpha = jnp.exp(m_i - m_new)
        pr = jnp.exp(scores - m_new[:, None])
        l_new = alpha * l_i + jnp.sum(pr, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(pr.astype(vb.dtype), vb).astype(jnp.float32)
        return acc, m_new, l_new

    init = (jnp.zeros((g_pad, d), jnp.float32), jnp.full((g_pad,), MASK_VALUE, jnp.float32),
            jnp.zeros((g_pad,), jnp.float32))
    acc, m_i, l_i = jax.lax.fori_loop(0, n_blocks, body, init)

    # The new token, in the split that holds it: its score as the dots compute one (products of the
    # rounded operands summed in float32), its probability rounded as the loop rounds them.
    f32 = jnp.float32
    s_new = (jnp.sum(q1.astype(f32) * k1.astype(f32)[None, :], axis=1)
             + jnp.sum(q2.astype(f32) * k2.astype(f32)[None, :], axis=1)) * scale
    s_new = jnp.where(has_new, s_new, MASK_VALUE)
    m_new = jnp.maximum(m_i, s_new)
    alpha = jnp.exp(m_i - m_new)
    p_new = jnp.where(has_new, jnp.exp(s_new - m_new), 0.0)
    l_i = alpha * l_i + p_new
    acc = acc * alpha[:, None] + p_new.astype(vn.dtype).astype(f32)[:, None] * vn.astype(f32)[None, :]
    m_i = m_new
    if combine:
        plgpu.store(o_ref.at[r, h, s, pl.ds(0, g_pad), pl.ds(0, d)], acc, mask=g_mask)
        plgpu.store(m_ref.at[r, h, s, pl.ds(0, g_pad)], m_i, mask=g_mask[:, 0])
        plgpu.store(l_ref.at[r, h, s, pl.ds(0, g_pad)], l_i, mask=g_mask[:, 0])
    else:
        out = (acc / jnp.maximum(l_i, 1e-30)[:, None]).astype(o_ref.dtype)
        plgpu.store(o_ref.at[r, q_rows, pl.ds(0, d)], out, mask=g_mask)
