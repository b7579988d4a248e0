"""Weight-only 8-bit quantization: symmetric, one scale per output channel or per group of 32 input rows.

A weight ``w[..., K, N]`` (``x @ w`` contracts K) becomes ``q[..., K, N]`` in int8 or float8_e4m3fn and
``scale[..., N]`` float32 with ``w ~= q * scale`` column by column. Per output channel, because the scale then
multiplies a whole output column once, after the f32 accumulation: a kernel applies it once per output tile,
and a tensor-parallel shard of N carries its own columns' scales.

- int8: ``scale = amax * float32(1/127)``, ``q = round(w / scale)`` (half to even), in [-127, 127] (-128 is
  never made, so the grid is symmetric).
- fp8 (e4m3fn): ``scale = amax * float32(1/448)``, ``q = float8(w / scale)`` (round to nearest even; 448 is e4m3fn's
  largest finite value, and it has no infinities, so the values are clipped to it first).

An all-zero column gets scale 1 (q is 0 there), so dequantization never divides by or multiplies with 0/NaN.

- q8_0 (llama.cpp's Q8_0 block layout, group-wise): ``q[..., K, N]`` int8 and ``scale[..., K // 32, N]``
  float16, one scale per 32 consecutive input rows of a column, made exactly as ggml makes them (so a GGUF
  Q8_0 tensor's blocks *are* its jaxpipe values and scales): ``d = amax / 127`` in float32 over the group,
  ``q = roundf(w / d)`` (C's roundf, half away from zero, through ``1 / d``), stored scale
  ``float16(d)``; an all-zero group has scale 0. Group-wise scales cost 2 bytes per 32 weights (6%) and
  quantize more finely than per-channel ones: on SmolLM2 they agree with the float32 model as often as
  bf16 does (tests/test_q8_0.py). A matmul against them dequantizes to the activation dtype
  (``jaxpipe.kernels.quant_matmul``).

Both NumPy arrays (quantize on the host, e.g. while loading) and JAX arrays (on device, under ``jit``) are
accepted; the two give the same bits.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

QuantKind = Literal["int8", "fp8", "q8_0"]
QUANT_KINDS: tuple[str, ...] = ("int8", "fp8", "q8_0")

# The storage dtype and the largest magnitude used for each kind.
_DTYPES = {"int8": np.dtype(np.int8), "fp8": np.dtype(ml_dtypes.float8_e4m3fn), "q8_0": np.dtype(np.int8)}
_QMAX = {"int8": 127.0, "fp8": 448.0, "q8_0": 127.0}
# Kinds with one scale per this many consecutive input rows of a column (and their scales' dtype).
_GROUPS = {"q8_0": 32}
_GROUP_SCALE_DTYPE = np.dtype(np.float16)


def check_kind(kind: str) -> str:
    """Return ``kind`` if it names a supported quantization, else raise a ValueError that lists them."""
    if kind not in _DTYPES:
        raise ValueError(f"unknown quantization {kind!r}: expected one of {', '.join(QUANT_KINDS)}")
    return kind


def quant_dtype(kind: str) -> np.dtype:
    """Storage dtype of the quantized weights of ``kind`` (int8 or float8_e4m3fn)."""
    return _DTYPES[check_kind(kind)]


def qmax(kind: str) -> float:
    """Largest magnitude a quantized value of ``kind`` takes (127 for int8, 448 for fp8 e4m3fn)."""
    return _QMAX[check_kind(kind)]


def group_size(kind: str) -> int | None:
    """Input rows per scale for a group-wise kind (32 for q8_0), None for per-channel kinds."""
    return _GROUPS.get(check_kind(kind))


def scale_dtype(kind: str) -> np.dtype:
    """dtype of ``kind``'s scales: float16 for q8_0 (as GGUF stores them), float32 for per-channel kinds."""
    return _GROUP_SCALE_DTYPE if group_size(kind) else np.dtype(np.float32)


def scale_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    """Shape of the scales of a weight ``shape`` ``[..., K, N]``: ``[..., N]``, or ``[..., K // 32, N]`` for
    q8_0 (``K`` must be a multiple of the group size: ``check_groups``)."""
    shape = tuple(shape)
    g = group_size(kind)
    if g is None:
        return shape[:-2] + shape[-1:]
    check_groups(shape[-2], kind)
    return shape[:-2] + (shape[-2] // g, shape[-1])


def check_groups(k: int, kind: str, what: str = "the weight") -> None:
    """Raise a ValueError unless ``k`` input rows split into whole groups of ``kind`` (no-op per channel)."""
    g = group_size(kind)
    if g is not None and k % g:
        raise ValueError(f"{kind} quantizes groups of {g} input rows, but {what} has {k} rows: use int8 or "
                         f"fp8 (per-channel scales) for this model")


def is_grouped(w, scale) -> bool:
    """Whether ``scale`` holds group-wise scales of ``w`` (``[..., K // G, N]``) rather than per-channel ones."""
    return scale is not None and len(scale.shape) == len(w.shape)


def kind_of(dtype) -> str | None:
    """The per-channel quantization kind whose values ``dtype`` holds ("int8" or "fp8"; q8_0 values are int8
    too: its scales' shape tells it apart, ``is_grouped``), or None for a plain float dtype."""
    dtype = np.dtype(dtype)
    for kind, d in _DTYPES.items():
        if dtype == d and kind not in _GROUPS:
            return kind
    return None


def is_quantized(w) -> bool:
    """True when ``w``'s dtype holds quantized values (int8 or float8_e4m3fn)."""
    return kind_of(w.dtype) is not None


def scale_from_amax(amax, kind: str):
    """The float32 scales of columns whose largest magnitudes are ``amax`` (1 for an all-zero column)."""
    xp = np if isinstance(amax, np.ndarray) else jnp
    amax = xp.asarray(amax, dtype=xp.float32)
    # amax * (1/qmax) rather than amax / qmax: XLA rewrites a division by a constant into this product,
    # and NumPy must give the same bits.
    return xp.where(amax > 0, amax * xp.float32(1.0 / _QMAX[check_kind(kind)]), xp.float32(1.0)).astype(xp.float32)


def quantize_with_scale(w, scale, kind: str):
    """``w[..., K, N]`` quantized with given per-column ``scale[..., N]`` (from ``scale_from_amax``): the
    second half of ``quantize``. Quantizing a block of rows with the whole columns' scales gives the
    rows of ``quantize(w)``, bit for bit."""
    if group_size(kind):
        raise ValueError(f"quantize_with_scale takes per-channel kinds; {kind} is group-wise: use quantize")
    xp = np if isinstance(w, np.ndarray) else jnp
    r = xp.asarray(w, dtype=xp.float32) / xp.asarray(scale, xp.float32)[..., None, :]
    if check_kind(kind) == "int8":
        return xp.clip(xp.round(r), -127, 127).astype(_DTYPES[kind])
    return xp.clip(r, -448.0, 448.0).astype(_DTYPES[kind])


def quantize(w, kind: str):
    """Quantize ``w[..., K, N]`` per output channel (over K): returns ``(q[..., K, N], scale[..., N])``.

    ``scale`` is float32. NumPy in, NumPy out; a JAX array (or tracer) in, JAX arrays out.
    """
    check_kind(kind)
    if w.ndim < 2:
        raise ValueError(f"quantize needs a weight [..., K, N], got shape {tuple(w.shape)}")
    xp = np if isinstance(w, np.ndarray) else jnp
    w = xp.asarray(w, dtype=xp.float32)
    if group_size(kind):
        return _quantize_groups(w, kind)
    scale = scale_from_amax(xp.max(xp.abs(w), axis=-2), kind)
    return quantize_with_scale(w, scale, kind), scale


def _roundf(xp, r):
    """C's ``roundf`` (half away from zero), as ggml rounds, in the form gguf's NumPy reference computes it."""
    a = xp.abs(r)
    f = xp.floor(a)
    return xp.sign(r) * (f + xp.floor(2 * (a - f)))


def _quantize_groups(w, kind: str):
    """Group-wise quantization of a float32 ``w[..., K, N]`` (see the module docstring)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    blocks, d, inv = _group_steps(w, kind)
    q = xp.clip(_roundf(xp, blocks * inv[..., None, :]), -127, 127).astype(_DTYPES[kind])
    return q.reshape(w.shape), d.astype(_GROUP_SCALE_DTYPE)


def group_scales(w: np.ndarray, kind: str) -> np.ndarray:
    """The float16 scales ``[..., K // G, N]`` that ``quantize(w, kind)`` gives a host ``w[..., K, N]`` for a
    group-wise kind, without quantizing the values (a block of rows at a time, like ``quantize_host``)."""
    g = group_size(kind)
    out = np.empty(scale_shape(w.shape, kind), _GROUP_SCALE_DTYPE)
    for a, b in _row_chunks(w, g):
        out[..., a // g:b // g, :] = _group_steps(np.asarray(w[..., a:b, :], np.float32), kind)[1]
    return out


def _group_steps(w, kind: str):
    """``w`` in groups ``[..., K // G, G, N]``, with each group's float32 step ``d`` and ``1 / d`` (0 for d 0)."""
    xp = np if isinstance(w, np.ndarray) else jnp
    g, (k, n) = group_size(kind), w.shape[-2:]
    check_groups(k, kind)
    blocks = w.reshape(w.shape[:-2] + (k // g, g, n))
    amax = xp.max(xp.abs(blocks), axis=-2)
    if xp is np:
        d = amax / np.float32(127)
        with np.errstate(divide="ignore"):
            inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    else:
        # A true division, as ggml's: XLA turns ``x / constant`` into ``x * (1 / constant)``, which differs
        # in the last bit; the barrier hides the constant from it.
        d = amax / jax.lax.optimization_barrier(jnp.full_like(amax, 127))
        inv = jnp.where(d == 0, jnp.float32(0), 1 / jnp.where(d == 0, 1, d))
    return blocks, d, inv


# Host arrays are quantized in blocks of rows of about this many float32 bytes, so that quantizing a large
# matrix never makes a float32 copy of all of it.
_CHUNK_BYTES = 16 << 20


def _row_chunks(w: np.ndarray, multiple: int = 1):
    rows = w.shape[-2]
    step = max(1, _CHUNK_BYTES // max(1, 4 * int(np.prod(w.shape[:-2] + w.shape[-1:]))))
    step = -(-step // multiple) * multiple  # whole groups of rows
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def column_amax(w: np.ndarray) -> np.ndarray:
    """float32 ``max |w|`` over K of a host matrix ``w[..., K, N]``, a block of rows at a time."""
    amax = np.zeros(w.shape[:-2] + w.shape[-1:], np.float32)
    for a, b in _row_chunks(w):
        np.maximum(amax, np.max(np.abs(np.asarray(w[..., a:b, :], np.float32)), axis=-2), out=amax)
    return amax


def quantize_into(out: np.ndarray, w: np.ndarray, scale: np.ndarray, kind: str) -> None:
    """``out[...] = quantize_with_scale(w, scale, kind)`` for host arrays, a block of rows at a time (``w``
    may be a memory-mapped or transposed view; only one block of it exists in float32 at once)."""
    if out.shape != w.shape or out.dtype != quant_dtype(kind):
        raise ValueError(f"quantize_into: out {out.dtype}{list(out.shape)} does not hold {kind} {list(w.shape)}")
    for a, b in _row_chunks(w):
        out[..., a:b, :] = quantize_with_scale(w[..., a:b, :], scale, kind)


def dequantize(q, scale, dtype=jnp.float32):
    """``q * scale`` column by column, or group by group for group-wise scales (the product in float32),
    cast to ``dtype``."""
    xp = np if isinstance(q, np.ndarray) and isinstance(scale, np.ndarray) else jnp
    return (xp.asarray(q).astype(xp.float32) * expand_scale(scale, q.shape)).astype(dtype)


def expand_scale(scale, shape: tuple[int, ...]):
    """float32 scales broadcastable against a weight ``shape`` ``[..., K, N]``: per-channel ``[..., 1, N]``,
    group-wise ``[..., K, N]`` (each group's scale repeated over its rows)."""
    xp = np if isinstance(scale, np.ndarray) else jnp
    s = xp.asarray(scale, xp.float32)
    if len(s.shape) < len(shape):
        return s[..., None, :]
    return xp.repeat(s, shape[-2] // s.shape[-2], axis=-2)


def fake_quantize(w, kind: str):
    """``dequantize(*quantize(w, kind))`` in ``w``'s dtype: what the model computes with, for accuracy studies."""
    q, scale = quantize(w, kind)
    return dequantize(q, scale, w.dtype)


def error_bound(w, scale, kind: str):
    """Elementwise bound on ``|w - dequantize(quantize(w))|`` (exact rounding; float32 slack included).

    int8: half a step, ``scale / 2``. fp8 e4m3fn: half an ulp, ``2**-4 * |w|`` in the normal range and
    ``2**-10 * scale`` (half the subnormal spacing of 2**-9) below it. q8_0: half a step of the float32
    ``d`` the values were rounded with, plus up to 127 times ``d``'s rounding to float16 (half an ulp,
    2**-11 relative, or 2**-25 for subnormal float16 scales).
    """
    xp = np if isinstance(w, np.ndarray) else jnp
    w = xp.abs(xp.asarray(w, xp.float32))
    s = expand_scale(scale, w.shape)
    slack = 4 * np.finfo(np.float32).eps * (w + s)
    if group_size(kind):
        d = s * (1 + 2.0 ** -10)  # the float32 d, at most half a float16 ulp from s
        return d / 2 + 127 * xp.maximum(d * 2.0 ** -11, 2.0 ** -25) + slack
    if check_kind(kind) == "int8":
        return s / 2 + slack
    return xp.maximum(w * 2.0 ** -4, s * 2.0 ** -10) + slack


def nbytes(shape: tuple[int, ...], kind: str | None, dtype=np.float32) -> int:
    """Bytes that a weight ``shape`` takes: quantized values plus their scales, or plain ``dtype``."""
    n = int(np.prod(shape))
    if kind is None:
        return n * np.dtype(dtype).itemsize
    return n * quant_dtype(kind).itemsize + int(np.prod(scale_shape(shape, kind))) * scale_dtype(kind).itemsize


def quantize_host(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``quantize(w, kind)`` for a host matrix (any float dtype, possibly a memory-mapped view), the same
    bits, a block of rows at a time."""
    g = group_size(kind)
    if g:
        q = np.empty(w.shape, quant_dtype(kind))
        scale = np.empty(scale_shape(w.shape, kind), scale_dtype(kind))
        for a, b in _row_chunks(w, g):
            q[..., a:b, :], scale[..., a // g:b // g, :] = _quantize_groups(
                np.asarray(w[..., a:b, :], np.float32), kind)
        return q, scale
    scale = scale_from_amax(column_amax(w), kind)
    q = np.empty(w.shape, quant_dtype(kind))
    quantize_into(q, w, scale, kind)
    return q, scale


def random_quantized(key, shape: tuple[int, ...], kind: str, std: float = 0.02):
    """Random 8-bit weights ``[..., K, N]`` and their scales whose dequantized values look like
    ``normal(0, std)`` (JAX; elementwise, so XLA never holds a float32 copy of the weights): for dummy
    weights (``load_format="dummy"``) at real shapes."""
    z = jax.random.normal(key, shape, jnp.bfloat16)
    if quant_dtype(kind) == np.int8:  # 3 sigma at the end of the grid
        q = jnp.clip(jnp.round(z.astype(jnp.float32) * (127 / 3)), -127, 127).astype(jnp.int8)
        s = std * 3 / 127
    else:
        q = z.astype(_DTYPES[kind])
        s = std
    return q, jnp.full(scale_shape(shape, kind), s, scale_dtype(kind))


# safetensors dtype codes and numpy names of the quantized storage dtypes (jaxpipe.dtypes holds the float ones).
SAFETENSORS_CODES: dict[str, np.dtype] = {"I8": _DTYPES["int8"], "F8_E4M3": _DTYPES["fp8"]}


def storage_dtype(name_or_code: str) -> np.dtype | None:
    """The quantized storage dtype named ``name_or_code`` ("int8", "float8_e4m3fn", "I8", "F8_E4M3"), or None."""
    if name_or_code in SAFETENSORS_CODES:
        return SAFETENSORS_CODES[name_or_code]
    return next((d for d in _DTYPES.values() if d.name == name_or_code), None)


def quantize_tree(params: dict, kind: str, names) -> dict:
    """Quantize the named entries of a flat ``{name: weight}`` dict: ``name`` -> q, ``name + "_scale"`` ->
    scale; other entries are returned unchanged."""
    out = {}
    for name, w in params.items():
        if name in names:
            out[name], out[name + "_scale"] = quantize(w, kind)
        else:
            out[name] = w
    return out


__all__ = ["QUANT_KINDS", "QuantKind", "SAFETENSORS_CODES", "check_groups", "check_kind", "column_amax",
           "dequantize", "error_bound", "expand_scale", "fake_quantize", "group_scales", "group_size", "is_grouped",
           "is_quantized", "kind_of", "nbytes", "qmax", "quant_dtype", "quantize", "quantize_host", "quantize_into",
           "quantize_tree", "quantize_with_scale", "random_quantized", "scale_dtype", "scale_from_amax",
           "scale_shape", "storage_dtype"]
