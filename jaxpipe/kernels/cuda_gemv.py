"""The CUDA decode GEMV for 8-bit weights (``gemv8.cu``), compiled with nvcc on first use.

``gemv8(x, w, scale, layer)`` is ``layer_matmul``'s meaning for per-channel int8 / float8_e4m3fn stacks
at one bf16 row: ``y = bf16((x @ q[layer]) * scale[layer])``, float32 sums. It is an XLA FFI
custom call (command-buffer compatible), so it runs inside jit, ``fori_loop`` and ``shard_map`` like any
op, with the traced layer index read on the device.

Building: the first CUDA lowering that wants it runs ``nvcc`` (``$CUDA_HOME/bin/nvcc`` or the PATH) on
the shipped source for the GPU's own architecture and caches the library under
``$JAXPIPE_CACHE/kernels`` (default ``~/.cache/jaxpipe``), keyed by the source, the flags and the FFI
headers, written to a temporary name and renamed into place (a concurrent build never leaves a
half-written file); about 10-20 s, once per source version and GPU architecture.

On by default where it can be (``JAXPIPE_CUDA_KERNELS`` unset or ``auto``): a CUDA GPU and an nvcc. Off
with ``JAXPIPE_CUDA_KERNELS=0``; ``=1`` also warns when there is no nvcc. On an H200 it beats the Pallas
kernel at one row on gate|up- and o-shaped matrices (``tiling_for``; BENCHMARKS.md, 2026-12-03); elsewhere,
and wherever it is unavailable or its build fails (one warning), ``layer_matmul`` runs its Pallas kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe import paths
from jaxpipe.kernels import out_struct

SOURCE = Path(__file__).with_name("gemv8.cu")
TARGET = "jaxpipe_gemv8"
MAX_ROWS = 1  # rows built: at 2-4 the kernel measured slower than the Pallas one (H200, 2026-12-03)
# (tpr, unroll, split) built in gemv8.cu (JAXPIPE_GEMV8_TILINGS): threads per weight row (16 columns
# each), 16-byte loads in flight per thread, blocks per cluster (slices of K).
TILINGS = ((4, 1, 8), (4, 2, 8), (8, 1, 8), (8, 2, 4), (16, 1, 8), (16, 2, 8))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-diag-suppress", "940,2473")


def find_nvcc() -> str | None:
    """nvcc from ``$CUDA_HOME`` / ``$CUDA_PATH``, else the PATH, else the usual install location."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None


def cache_dir() -> Path:
    """Where built kernels are kept: ``kernels/`` under jaxpipe's cache root (``jaxpipe.paths``)."""
    return Path(paths.cache_dir()) / "kernels"


def build(arch: str, nvcc: str | None = None) -> Path:
    """Compile ``gemv8.cu`` for ``arch`` (e.g. "sm_90") unless the cache has it; returns the library's path.
    Raises RuntimeError with nvcc's message when compilation fails."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME, or put nvcc on the PATH)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join(_FLAGS + (arch,)).encode())
    key.update(Path(include, "xla", "ffi", "api", "ffi.h").read_bytes())
    out = cache_dir() / f"gemv8-{key.hexdigest()[:16]}-{arch}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [nvcc, *_FLAGS, f"-arch={arch}", f"-I{include}", str(SOURCE), "-o", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _gpu_arch() -> str | None:
    for d in jax.devices():
        cc = getattr(d, "compute_capability", None)
        if d.platform == "gpu" and cc:
            major, minor = str(cc).split(".")[:2]
            return f"sm_{major}{minor}"
    return None


@functools.cache
def available() -> bool:
    """Whether the kernel is built and registered for this process's CUDA GPUs (builds it on first call):
    ``JAXPIPE_CUDA_KERNELS`` ``auto`` (the default) where nvcc is found, ``1`` always (warning without
    nvcc), ``0`` never."""
    mode = os.environ.get("JAXPIPE_CUDA_KERNELS", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"JAXPIPE_CUDA_KERNELS={mode!r}: use auto (the default), 0 (off) or 1 (on)")
    arch = _gpu_arch()
    if mode == "0" or arch is None:
        return False
    nvcc = find_nvcc()
    if nvcc is None:
        if mode == "1":
            warnings.warn("jaxpipe: JAXPIPE_CUDA_KERNELS=1 but nvcc was not found (set CUDA_HOME); using the "
                          "Pallas kernel", stacklevel=2)
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(arch, nvcc)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxpipeGemv8), platform="CUDA")
    except Exception as e:  # noqa: BLE001 - any failure means: use the Pallas kernel
        warnings.warn(f"jaxpipe: the CUDA GEMV kernel is not available ({e}); using the Pallas kernel "
                      "(JAXPIPE_CUDA_KERNELS=0 turns it off)", stacklevel=2)
        return False
    return True


def tiling_for(m: int, k: int, n: int, dtype=jnp.int8) -> tuple[int, int, int] | None:
    """``(tpr, unroll, split)`` for ``m`` rows of ``[m, k] @ [k, n]`` with ``dtype`` weights, or None where the
    Pallas kernel measured as fast or faster (a block reads a strip of ``16 * tpr`` columns over ``k / split``
    rows, ``unroll`` loads in flight per thread; the ``split`` blocks of a strip add their sums up as one
    cluster). From the H200 sweep of 2026-12-03 (BENCHMARKS.md, eighth session), one row, Llama-2-7B shapes,
    ms per 32 layers, CUDA against Pallas: gate|up (n = 22016) int8 0.93 at (16, 2, 8) against 1.25, fp8
    0.85 at (16, 1, 8) against 1.10; o (4096 x 4096) int8 0.51 / fp8 0.45 at (4, 1, 8) against 0.67 / 0.95.
    qkv and down were ties (within 3%), so they keep the Pallas kernel; 2-4 rows were slower.
    """
    kind = jnp.dtype(dtype)
    if m != 1 or kind not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)):
        return None
    if n >= 16384 and n % 256 == 0:  # wide (gate|up): long strips, 8 slices of K
        return (16, 2, 8) if kind == jnp.int8 else (16, 1, 8)
    if n >= 16384 and n % 128 == 0:
        return (8, 2, 4)
    if n < 8192 and k <= 4096 and n % 64 == 0:  # small and square (o): narrow strips, many blocks
        return (4, 1, 8)
    return None


def gemv8(x: jax.Array, w: jax.Array, scale: jax.Array, layer, *, tiling: tuple[int, int, int]) -> jax.Array:
    """``x[..., K]`` bf16 (1..4 rows) ``@ q[layer]`` (``w[L, K, N]`` int8 / float8_e4m3fn) ``* scale[layer]``
    (``scale[L, N]`` float32) -> ``[..., N]`` bf16. ``tiling``: one of ``TILINGS`` with
    ``N % (16 * tpr) == 0`` (``tiling_for`` picks one). CUDA only: call it where ``available()`` is True."""
    if tuple(tiling) not in TILINGS:
        raise ValueError(f"gemv8: no kernel for tiling {tiling}; built: {TILINGS}")
    tpr, unroll, split = tiling
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[-1]
    if math.prod(lead) > MAX_ROWS:
        raise ValueError(f"gemv8: {math.prod(lead)} rows; the kernel is built for at most {MAX_ROWS}")
    x2 = x.reshape(math.prod(lead), k)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    out = out_struct((x2.shape[0], n), jnp.bfloat16, x2, w, scale, layer)
    y = jax.ffi.ffi_call(TARGET, out)(layer, x2, w, scale, tpr=np.int32(tpr), unroll=np.int32(unroll),
                                     split=np.int32(split))
    return y.reshape(*lead, n)


__all__ = ["MAX_ROWS", "TILINGS", "available", "build", "cache_dir", "find_nvcc", "gemv8", "tiling_for"]
