"""``layer_matmul``: one layer's matmul against a stacked, possibly 8-bit, weight; a Pallas kernel on GPU.

``layer_matmul(x, w, scale, layer)`` computes ``x @ dequantize(w[layer], scale[layer])`` with float32
accumulation for a stack ``w[L, K, N]`` of int8 or float8_e4m3fn weights (see ``jaxpipe.quantize``), or plain
``x @ w[layer]`` when ``scale`` is None. The scales' shape says which of two meanings applies:

- per output channel, ``scale[L, N]`` float32 (int8, fp8): ``y = ((x @ q) * scale).astype(x.dtype)``, the
  products of the activations with the 8-bit values exact (8-bit values are exact in bf16 / f16 / f32),
  summed in float32, one multiply by the column's scale, one rounding to ``x.dtype``.
- per group of ``G`` input rows, ``scale[L, K // G, N]`` float16 or float32 (q8_0, llama.cpp's Q8_0 layout,
  ``G = 32``; ``G`` comes from the shapes): ``y = (x @ W).astype(x.dtype)`` with
  ``W = (q.astype(f32) * scale.astype(f32) repeated over each group's G rows).astype(x.dtype)``:
  dequantized in float32 (exact for 8-bit values times float16 scales), rounded once to the activation dtype, float32
  accumulation. In float32 the weights are exactly the dequantized ones; in bf16 the layer computes as a
  bf16 model of the dequantized checkpoint would, up to summation order.

Why a kernel: XLA converts the whole 8-bit weight to bf16 in memory before its GEMM (reading 1 byte, writing
2 and reading 2 again per weight), which makes weight-only quantization slower than bf16 in decode. The Pallas
(Triton) kernel here reads the 8-bit weight once from HBM, converts it in registers, accumulates in float32 and
applies per-channel scales once per output tile (group-wise scales: a ``[bk / G, bn]`` tile of them multiplies
each converted weight tile in registers, before the dot). It takes the whole stack and the (traced) layer index
and indexes inside the kernel, so XLA never copies ``w[layer]`` out of the stack before the call.

Where it is used: CUDA only (``lax.platform_dependent``: chosen when lowering, never by a traced value), for
decode-sized row counts (``config_for`` decides from static shapes); everywhere else, plain XLA. Both compute
the same thing, with the meaning above.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxpipe import nn
from jaxpipe.kernels import cuda_gemv, out_struct
from jaxpipe.quantize import kind_of

try:  # the Triton backend's own API (present in jax 0.10 and 0.11)
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # pragma: no cover
    plgpu = None


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Static tiling of the kernel; part of the compile key.

    ``form``: "dot" accumulates ``acc[bm, bn] += x[bm, bk] @ w[bk, bn]`` on tensor cores; "dot_t" the same
    transposed (``acc[bn, bm] += w.T @ x.T``: the converted weight is the left operand, which Hopper's wgmma
    takes from registers); "fma" (one row only) multiplies and adds elementwise in float32 into
    ``acc[bk, bn]`` and reduces over k once at the end; "gemv" (one row) reduces over k every step into
    ``acc[bn]`` (larger tiles for the same registers). ``split_k`` programs share each column tile, each
    over ``K / split_k`` rows of the weight, and their float32 partial sums are added by XLA after the call.
    ``convert``: "native" (the compiler's int->float conversion) or "magic" (int8 only:
    ``float32(bits(v + 0x4B000080)) - 2**23 - 128``, integer and float adds instead of the slow int->float
    conversion unit). ``prefetch``: load the next weight tile into registers before the
    math on this one (register double buffering; for ``num_stages=1``). ``evict``: weight loads marked
    evict-first in L2.
    """

    form: str = "dot"
    bm: int = 16
    bn: int = 128
    bk: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    convert: str = "native"
    prefetch: bool = False
    evict: bool = False

    def fits(self, m: int, k: int, n: int, group: int | None = None) -> bool:
        """Whether this tiling covers a ``[m, k] @ [k, n]`` problem exactly (rows are padded to ``bm``);
        ``group``: the scales' group size (None: per channel), whose groups must tile ``bk`` (a power of two
        of them: Triton's tensor shapes)."""
        if self.form in ("fma", "gemv") and (m != 1 or self.bm != 1):
            return False
        if group is not None and (self.bk % group or not _pow2(self.bk // group)):
            return False
        return n % self.bn == 0 and k % (self.split_k * self.bk) == 0


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# Rows above which XLA's convert-then-cuBLAS is used: prefill-sized matmuls are compute bound and cuBLAS runs
# them at tensor-core speed. Measured on an H200 (BENCHMARKS.md, 2026-12-01/02), Llama-2-7B's 4-matmul stack
# over 32 layers: 128 rows, kernel 9.4 ms (int8) against XLA's 12.9 ms; 256 rows, kernel 17.8 ms against 14.3.
MAX_KERNEL_ROWS = 128

_MAGIC_I32 = 0x4B000080  # bits of 2**23 + 128 in float32
_MAGIC_F32 = float(2 ** 23 + 128)


def _num_sms() -> int:
    return 132  # one H200 / H100 SXM; only used to size split-K


def split_for(m: int, k: int, n: int, bm: int, bn: int, bk: int, target: int = 4 * 132) -> int:
    """Split-K factor: the smallest divisor of ``k / bk`` that gives ``target`` programs, capped so that the
    float32 partial sums (``split * m * n * 4`` bytes, written then read back, mostly from L2) stay within
    1/8 of the weight's bytes."""
    steps = k // bk
    tiles = (n // bn) * -(-m // bm)
    cap = max(1, k // (32 * m))
    best = 1
    for s in range(1, min(steps, cap) + 1):
        if steps % s == 0:
            best = s
            if tiles * s >= target:
                break
    return best


def _first_dividing(options, size):
    return next((o for o in options if size % o == 0), None)


def config_for(m: int, k: int, n: int, w_dtype, *, paired: bool = False,
               group: int | None = None) -> GemmConfig | None:
    """The kernel tiling for ``m`` rows of ``[m, k] @ [k, n]`` with 8-bit weights, or None where plain
    XLA is as fast (large ``m``) or the shape does not tile. Chosen from static shapes only; ``paired``:
    the stack is read through its int16 view (``needs_pairs``); ``group``: the scales' group size
    (``group_size_of``; None per channel).

    From the H200 sweeps (BENCHMARKS.md, 2026-12-01): one row is fastest as a split-K GEMV in which every
    program reduces one [128, 256..512] tile (all its loads in flight at once, no loop; 256 wide through
    the int16 view, and for fp8 there 8 [64, 256] tiles with register prefetch); more rows use tensor
    cores on [64, 64] weight tiles with a 4-stage pipeline, except through the int16 view, where a
    register-prefetched single stage wins end to end (pipelined [128, 128] tiles measured 1.1-1.4x faster
    alone but made int8 decode 8-36% slower at batch 16-64 in the model, H200, 2026-12-02).

    Group-wise scales (H200 sweep, BENCHMARKS.md 2026-12-02 "q8_0"): K tiles of one group each, so the
    scales multiply as a plain [1, bn] broadcast (tiles of several groups reshape in registers: 1.3-2x
    slower at one row), one tile per program at one row; through the int16 view with more rows, [128, 128]
    tiles in a 4-stage pipeline.
    """
    kind = kind_of(w_dtype)
    if m > MAX_KERNEL_ROWS or kind is None:
        return None
    convert = "magic" if kind == "int8" else "native"

    def k_tiles(options):  # K tiles that hold whole groups of scales
        return tuple(o for o in options if group is None or (o % group == 0 and _pow2(o // group)))

    one_group = (group,) if group is not None and group <= 128 and _pow2(group) else ()  # a one-group tile
    if m == 1:
        bk = _first_dividing(k_tiles(one_group + ((64, 32, 16) if paired and kind == "fp8" else (128, 64, 32, 16))), k)
        bn = _first_dividing((256, 128, 64) if paired else (512, 256, 128, 64), n)
        if bk is None or bn is None:
            return None
        # One tile per program (split-K by K / bk), except fp8 through the int16 view: 8 tiles, prefetched.
        split = k // bk
        if paired and kind == "fp8":
            split //= _first_dividing((8, 4, 2, 1), split)
        if bn == 512 and (n // bn) * split < 4 * _num_sms() and n % 256 == 0:
            bn = 256
        cfg = GemmConfig("gemv", 1, bn, bk, split, 8 if bn >= 512 else 4, 1, convert, True, True)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        if paired and group is None:  # a single register-prefetched stage of [256, 64] tiles
            bn, bk = _first_dividing((64,), n), _first_dividing((256, 128, 64), k)
        elif paired:  # group-wise scales: [128, 128] tiles of the int16 view in a 4-stage pipeline
            bn, bk = _first_dividing((128, 64), n), _first_dividing(k_tiles((128, 64, 256)), k)
        else:
            bn = _first_dividing((64,), n)
            bk = _first_dividing(k_tiles(one_group + (64, 128, 256)), k)
        if bn is None or bk is None:
            return None
        stages, prefetch = (1, True) if paired and group is None else (4, False)
        cfg = GemmConfig("dot", bm, bn, bk, split_for(m, k, n, bm, bn, bk), 4, stages, convert, prefetch, True)
    return cfg if cfg.fits(m, k, n, group) else None


# -- the kernel ----------------------------------------------------------------------------------------


def _convert(v, dtype, how: str):
    """8-bit values (int8 or float8_e4m3fn) -> ``dtype``, exactly."""
    if how == "magic" and v.dtype in (jnp.int8, jnp.int32):  # int32: already sign-extended int8 values
        f = jax.lax.bitcast_convert_type(v.astype(jnp.int32) + _MAGIC_I32, jnp.float32) - _MAGIC_F32
        return f.astype(dtype)
    if v.dtype != jnp.int8 and v.dtype.itemsize == 1 and dtype != jnp.float32:
        return v.astype(jnp.float32).astype(dtype)  # fp8 -> bf16 goes through f32 in Triton anyway
    return v.astype(dtype)


def _scale_groups(w, s, group: int):
    """``w[bk, bn]`` float32 times its group-wise scales ``s[bk // group, bn]``, each row of ``s`` over
    ``group`` consecutive rows of ``w`` (exact for 8-bit values times float16 scales)."""
    bk, bn = w.shape
    if bk == group:  # one group per tile: a plain broadcast, no reshape in registers
        return w * s.astype(jnp.float32)
    return (w.reshape(bk // group, group, bn) * s.astype(jnp.float32)[:, None, :]).reshape(bk, bn)


def _round_to(w, dtype):
    """float32 ``w`` rounded to ``dtype`` and kept in float32 (the one-row forms multiply-add in float32).
    bf16 is widened back through its bits: XLA (interpret mode on CPU) drops a plain f32 -> bf16 -> f32 pair
    as excess precision, and on GPU this is what the conversion costs anyway."""
    if dtype == jnp.float32:
        return w
    r = w.astype(dtype)
    if dtype != jnp.bfloat16:
        return r.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(r, jnp.int16).astype(jnp.int32)
    return jax.lax.bitcast_convert_type(jax.lax.shift_left(bits, 16), jnp.float32)


def _load_weight_tile(w_ref, layer, k0, n0, bk: int, bn: int, paired: bool, evict: bool):
    """``w[layer, k0:k0+bk, n0:n0+bn]``, raw (int16 pairs when ``paired``). Weights are read once per step:
    ``evict`` marks them first out of L2, leaving it to activations and partial sums."""
    cols = pl.ds(n0 // 2, bn // 2) if paired else pl.ds(n0, bn)
    ref = w_ref.at[layer, pl.ds(k0, bk), cols]
    if evict and plgpu is not None:
        return plgpu.load(ref, eviction_policy="evict_first")
    return ref[...]


def _unpack(v, bk: int, bn: int, paired: bool, wdtype, widen: bool = False):
    """Raw tile -> 8-bit values in column order. ``paired``: ``v`` comes from the int16 view of the 8-bit
    stack (two columns per element), used where the stack's int32 element offsets would overflow; the bytes
    are split and interleaved back in registers."""
    if not paired:
        return v
    if wdtype == jnp.int8 and widen:  # straight to sign-extended int32 (what the magic conversion wants)
        w = v.astype(jnp.int32)
        lo = jax.lax.shift_right_arithmetic(jax.lax.shift_left(w, 24), 24)
        hi = jax.lax.shift_right_arithmetic(w, 8)
        return jnp.stack([lo, hi], axis=-1).reshape(bk, bn)
    lo = v.astype(jnp.int8)
    hi = jax.lax.shift_right_arithmetic(v, jnp.int16(8)).astype(jnp.int8)
    v = jnp.stack([lo, hi], axis=-1).reshape(bk, bn)
    if wdtype != jnp.int8:
        v = jax.lax.bitcast_convert_type(v, wdtype)
    return v


def _kernel(layer_ref, x_ref, w_ref, s_ref, o_ref, *, cfg: GemmConfig, m: int, k: int, paired: bool, wdtype,
            cdtype, split_out: bool, group: int | None):
    bm, bn, bk = cfg.bm, cfg.bn, cfg.bk
    jn, js, jm = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    n0 = pl.multiple_of(jn * bn, bn)
    m0 = pl.multiple_of(jm * bm, bm)
    steps = k // cfg.split_k // bk
    kbase = js * (k // cfg.split_k)
    vector = cfg.form in ("fma", "gemv")  # one row, float32 multiply-adds, no tensor cores

    def k_at(t):
        return pl.multiple_of(kbase + t * bk, bk)

    def load(t):
        """The raw weight tile of step t and, for group-wise scales, its ``[bk / group, bn]`` scales."""
        raw = _load_weight_tile(w_ref, layer, k_at(t), n0, bk, bn, paired, cfg.evict)
        if group is None:
            return raw, None
        g0 = pl.multiple_of(js * (k // cfg.split_k // group) + t * (bk // group), bk // group)
        return raw, s_ref[layer, pl.ds(g0, bk // group), pl.ds(n0, bn)]

    def step(t, loaded, acc):
        """acc += x[:, k-tile t] @ w[k-tile t], with the raw weight tile (and its scales) already loaded."""
        raw, scales = loaded
        w = _unpack(raw, bk, bn, paired, wdtype, widen=cfg.convert == "magic")
        if group is None:
            w = _convert(w, jnp.float32 if vector else cdtype, cfg.convert)
        else:
            # Dequantized in float32, rounded once to the activation dtype (the documented meaning); the
            # one-row forms keep it in float32 for their multiply-adds.
            w = _scale_groups(_convert(w, jnp.float32, cfg.convert), scales, group)
            w = _round_to(w, cdtype) if vector else w.astype(cdtype)
        k0 = k_at(t)
        if vector:
            xk = x_ref[0, pl.ds(k0, bk)].astype(jnp.float32)
            prod = xk[:, None] * w
            return acc + (jnp.sum(prod, axis=0) if cfg.form == "gemv" else prod)
        xt = x_ref[pl.ds(m0, bm), pl.ds(k0, bk)].astype(cdtype)
        if cfg.form == "dot_t":
            return acc + jax.lax.dot_general(w, xt, (((0,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return acc + jax.lax.dot_general(xt, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    shape = {"fma": (bk, bn), "gemv": (bn,), "dot_t": (bn, bm), "dot": (bm, bn)}[cfg.form]
    acc = jnp.zeros(shape, jnp.float32)
    if cfg.prefetch and steps > 1:
        # Register double buffering: the next tile's loads are issued before this tile's math.
        def body(t, carry):
            acc, raw = carry
            return step(t, raw, acc), load(t + 1)

        acc, raw = jax.lax.fori_loop(0, steps - 1, body, (acc, load(0)))
        acc = step(steps - 1, raw, acc)
    else:
        acc = jax.lax.fori_loop(0, steps, lambda t, acc: step(t, load(t), acc), acc)
    out = {"fma": lambda a: jnp.sum(a, axis=0)[None, :], "gemv": lambda a: a[None, :],
           "dot_t": lambda a: a.T, "dot": lambda a: a}[cfg.form](acc)
    if group is None:
        out = out * s_ref[layer, pl.ds(n0, bn)][None, :]
    out = out.astype(o_ref.dtype)
    block = (pl.ds(m0, bm), pl.ds(n0, bn))
    dst = o_ref.at[(js, *block) if split_out else block]
    if m % bm:  # rows past m are padding: not written (and never read)
        rows = m0 + jax.lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
        plgpu.store(dst, out, mask=rows < m)
    else:
        dst[...] = out


def _poisoned(kernel, layer_ref, x_ref, w_ref, s_ref, init_ref, o_ref):
    del init_ref  # aliased with o_ref: what the kernel does not write stays NaN
    kernel(layer_ref, x_ref, w_ref, s_ref, o_ref)


def group_size_of(w, scale) -> int | None:
    """The group size of ``scale`` for the stack ``w[L, K, N]``: None for per-channel scales ``[L, N]``,
    ``G = K // scale.shape[1]`` for group-wise scales ``[L, K // G, N]`` (static: from shapes only). A
    ValueError names the shapes when ``scale`` is neither, or its groups do not split K evenly."""
    if len(w.shape) != 3:
        raise ValueError(f"layer_matmul: w must be a stack [L, K, N], got shape {tuple(w.shape)}")
    num_layers, k, n = w.shape
    if tuple(scale.shape) == (num_layers, n):
        return None
    if len(scale.shape) != 3 or (scale.shape[0], scale.shape[2]) != (num_layers, n):
        raise ValueError(f"layer_matmul: scale {tuple(scale.shape)} fits neither per-channel scales "
                         f"[L, N] = {(num_layers, n)} nor group-wise scales [L, K // G, N] of w {tuple(w.shape)}")
    groups = scale.shape[1]
    if groups == 0 or k % groups:
        raise ValueError(f"layer_matmul: scale {tuple(scale.shape)} has {groups} groups over w's K = {k} rows "
                         f"({tuple(w.shape)}): the group size K // groups must be a whole number")
    if jnp.dtype(scale.dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        raise ValueError(f"layer_matmul: group-wise scales must be float16 (as GGUF stores Q8_0), bfloat16 or "
                         f"float32, got {scale.dtype}")
    return k // groups


def needs_pairs(w) -> bool:
    """Whether the kernel reads this 8-bit stack through its int16 view (see below)."""
    # Pallas Triton indexes with int32 element offsets unless the operand exceeds 2**32 bytes: an 8-bit
    # stack of 2**31..2**32 elements (Llama-2-7B's 32 gate|up layers) would overflow them.
    size, itemsize = math.prod(w.shape), jnp.dtype(w.dtype).itemsize
    return itemsize == 1 and 2 ** 31 <= size <= 2 ** 32


def quant_matmul_pallas(x: jax.Array, w: jax.Array, scale: jax.Array, layer, cfg: GemmConfig, *,
                        interpret: bool = False, paired: bool | None = None,
                        poison: bool = False) -> jax.Array:
    """The Pallas kernel: ``x[..., K] @ dequantize(w[layer], scale[layer])`` -> ``[..., N]`` in x.dtype.

    ``w[L, K, N]`` int8 or float8_e4m3fn, ``scale[L, N]`` float32 or group-wise ``[L, K // G, N]`` (see the
    module docstring), ``layer`` an int32 scalar (may be traced). ``cfg`` must fit the shapes (``cfg.fits``,
    with the scales' group size). ``interpret`` runs it through Pallas' interpreter (any backend; for
    tests). ``paired`` forces (True) or forbids (False) reading the 8-bit stack through its int16 view; None
    decides by size (only where int32 offsets would overflow). ``poison`` starts the output buffer as NaN
    (checks that every element is written).
    """
    lead, k = x.shape[:-1], x.shape[-1]
    group = group_size_of(w, scale)
    num_layers, kw, n = w.shape
    if kw != k:
        raise ValueError(f"layer_matmul: x {x.shape}, w {w.shape} and scale {scale.shape} do not match")
    m = math.prod(lead)
    if not cfg.fits(m, k, n, group):
        what = "" if group is None else f" with scale groups of {group} rows"
        raise ValueError(f"{cfg} does not tile [{m}, {k}] @ [{k}, {n}]{what}")
    x2 = x.reshape(m, k)
    mp = -(-m // cfg.bm) * cfg.bm
    if mp != m:
        x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    paired = needs_pairs(w) if paired is None else paired
    wv = w
    if paired:
        wv = jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(w, jnp.int8).reshape(num_layers, k, n // 2, 2), jnp.int16)
    cdtype = x.dtype if x.dtype in (jnp.bfloat16, jnp.float16) else jnp.float32
    split_out = cfg.split_k > 1
    out_shape = (cfg.split_k, mp, n) if split_out else (mp, n)
    out_dtype = jnp.float32 if split_out else x.dtype
    kernel = functools.partial(_kernel, cfg=cfg, m=m, k=k, paired=paired, wdtype=w.dtype, cdtype=cdtype,
                               split_out=split_out, group=group)
    params = None if interpret else plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = [jnp.asarray(layer, jnp.int32).reshape(1), x2, wv, scale]
    aliases = {}
    if poison:
        kernel = functools.partial(_poisoned, kernel)
        args.append(jnp.full(out_shape, jnp.nan, out_dtype))
        aliases = {4: 0}
    out = pl.pallas_call(
        kernel,
        out_shape=out_struct(out_shape, out_dtype, *args),
        grid=(n // cfg.bn, cfg.split_k, mp // cfg.bm),
        compiler_params=params,
        interpret=interpret,
        input_output_aliases=aliases,
        name=f"quant_matmul_{cfg.form}",
    )(*args)
    out = out[:, :m].sum(axis=0) if split_out else out[:m]
    return out.astype(x.dtype).reshape(*lead, n)


# -- the XLA path ------------------------------------------------------------------------------------------


def dequantize_groups(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """One layer's group-wise dequantized weight: ``q[K, N]`` times ``scale[K // G, N]`` (each scale row
    over G consecutive rows of q) in float32, rounded once to ``dtype``."""
    k, n = q.shape
    groups = scale.shape[0]
    w = q.astype(jnp.float32).reshape(groups, k // groups, n) * scale.astype(jnp.float32)[:, None, :]
    return w.reshape(k, n).astype(dtype)


def xla_layer_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None, layer) -> jax.Array:
    """Plain XLA: ``(x @ w[layer].astype(x.dtype)) * scale[layer]`` with float32 accumulation, or for
    group-wise scales ``x @ dequantize_groups(w[layer], scale[layer], x.dtype)`` (one layer dequantized).

    The 8-bit values are exact in bf16 / f16 / f32, so the product before the per-channel scale is exact and
    the result is the dequantized matmul's up to float32 summation order.
    """
    wl = w[layer]
    if scale is None:
        return jnp.einsum("...k,kn->...n", x, wl)
    if group_size_of(w, scale) is not None:
        wd = dequantize_groups(wl, scale[layer], x.dtype)
        return jnp.einsum("...k,kn->...n", x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.einsum("...k,kn->...n", x, wl.astype(x.dtype), preferred_element_type=jnp.float32)
    return (y * scale[layer]).astype(x.dtype)


def layer_matmul(x: jax.Array, w: jax.Array, scale: jax.Array | None, layer, *, norm: jax.Array | None = None,
                 eps: float = 0.0, swiglu: bool = False, residual: jax.Array | None = None) -> jax.Array:
    """``h[..., K] @ dequantize(w[layer])`` -> ``[..., N]`` in ``x.dtype``, float32 accumulation.

    ``w[L, K, N]``: int8 or float8_e4m3fn with ``scale[L, N]`` float32 (per output channel) or
    ``scale[L, K // G, N]`` float16 / float32 (per group of G input rows, e.g. Q8_0's 32; the module
    docstring gives both meanings), or the activation dtype with ``scale=None`` (then exactly
    ``h @ w[layer]``). ``layer``: int32 scalar, may be traced (a ``fori_loop`` index). Works on local shards
    inside ``shard_map``: N split (scales split with their columns) or K split (per-channel scales
    replicated; group-wise ones split on their group axis, so every shard keeps the group size G).

    The input row ``h`` is ``x``; or, with ``norm`` (a ``[L, K]`` stack of RMSNorm weights),
    ``jaxpipe.nn.rms_norm(x, norm[layer], eps)``; or, with ``swiglu``, ``jaxpipe.nn.swiglu(x)`` of
    ``x[..., 2K] = gate | up``. With ``residual[..., N]`` the result is ``residual + (h @ W)``. Where the
    CUDA GEMV runs and ``cuda_gemv.fuses`` the weights' kind, these ops are done inside its kernel;
    everywhere else they are those same jnp ops around the matmul.

    On CUDA, decode-sized rows run the Pallas kernel, or ``cuda_gemv``'s CUDA kernels where they are
    ``available()`` and measured faster: the GEMV at one row (``tiling_for``), the tensor-core kernel at 2-32
    rows (``gemm_tiling_for``); everything else runs plain XLA.
    """
    if norm is not None and swiglu:
        raise ValueError("layer_matmul: norm= and swiglu=True are two different inputs; give one")

    def composed(x, w, scale, layer, norm, residual, matmul):
        h = nn.rms_norm(x, norm[layer], eps) if norm is not None else nn.swiglu(x) if swiglu else x
        y = matmul(h, w, scale, layer)
        return y if residual is None else residual + y

    if scale is None:
        return composed(x, w, None, layer, norm, residual, xla_layer_matmul)
    if kind_of(w.dtype) is None:
        raise ValueError(f"layer_matmul: a scale was given but w is {w.dtype}, not int8 or float8_e4m3fn")
    group = group_size_of(w, scale)
    m, k, n = math.prod(x.shape[:-1]), w.shape[1], w.shape[-1]
    cfg = config_for(m, k, n, w.dtype, paired=needs_pairs(w), group=group) if plgpu is not None else None
    cuda_ok = group is None and x.dtype == jnp.bfloat16  # the CUDA kernels: per-channel scales, bf16 rows
    tiling = cuda_gemv.tiling_for(m, k, n, w.dtype) if cuda_ok else None
    gemm = cuda_gemv.gemm_tiling_for(m, k, n, w.dtype) if cuda_ok and tiling is None else None
    if cfg is None and tiling is None and gemm is None:
        return composed(x, w, scale, layer, norm, residual, xla_layer_matmul)
    # The CUDA kernel does the ops around the matmul too where that measured faster (cuda_gemv.fuses); its
    # norm weights and residual are bf16.
    residual_fits = residual is not None and residual.dtype == jnp.bfloat16 and residual.shape == (*x.shape[:-1], n)
    fused = cuda_gemv.fuses(w.dtype) and (norm is None or norm.dtype == jnp.bfloat16)
    if residual is not None:
        fused = fused and residual_fits

    def on_cuda(x, w, scale, layer, norm, residual):
        # Traced as platform_dependent's CUDA branch only; available() builds the CUDA kernel on first use
        # (False without nvcc, or with JAXPIPE_CUDA_KERNELS=0).
        if tiling is not None and cuda_gemv.available():
            if fused:
                return cuda_gemv.gemv8(x, w, scale, layer, tiling=tiling, norm=norm, eps=eps, swiglu=swiglu,
                                       residual=residual)
            matmul = functools.partial(cuda_gemv.gemv8, tiling=tiling)
        elif gemm is not None and cuda_gemv.available():
            # The residual add in the kernel's epilogue; a norm or activation before it stays XLA's.
            matmul = functools.partial(cuda_gemv.gemm8, tiling=gemm, residual=residual if residual_fits else None)
            return composed(x, w, scale, layer, norm, None if residual_fits else residual, matmul)
        elif cfg is not None:
            matmul = functools.partial(quant_matmul_pallas, cfg=cfg)
        else:
            matmul = xla_layer_matmul
        return composed(x, w, scale, layer, norm, residual, matmul)

    default = functools.partial(composed, matmul=xla_layer_matmul)
    return jax.lax.platform_dependent(x, w, scale, layer, norm, residual, cuda=on_cuda, default=default)


__all__ = ["GemmConfig", "MAX_KERNEL_ROWS", "config_for", "dequantize_groups", "group_size_of", "layer_matmul",
           "needs_pairs", "quant_matmul_pallas", "split_for", "xla_layer_matmul"]

