"""The CUDA decode GEMV for 8-bit weights (``gemv8.cu``), compiled with nvcc on first use.

``gemv8(x, w, scale, layer)`` is ``layer_matmul``'s meaning for per-channel int8 / float8_e4m3fn stacks
at one to four bf16 rows: ``y = bf16((x @ q[layer]) * scale[layer])``, float32 sums. It is an XLA FFI
custom call (command-buffer compatible), so it runs inside jit, ``fori_loop`` and ``shard_map`` like any
op, with the traced layer index read on the device.

Building: the first CUDA lowering that wants it runs ``nvcc`` (``$CUDA_HOME/bin/nvcc`` or the PATH) on
the shipped source for the GPU's own architecture and caches the library under
``$JAXPIPE_CACHE/kernels`` (default ``~/.cache/jaxpipe``), keyed by the source, the flags and the FFI
headers, written to a temporary name and renamed into place (a concurrent build never leaves a
half-written file). Opt-in (``JAXPIPE_CUDA_KERNELS=1``): on an H200 it beats the Pallas kernel only
for int8 at one row on gate|up- and o-shaped matrices (``tiling_for``; BENCHMARKS.md, 2026-12-03), and it
needs nvcc on the serving machine. Unset, or where there is no nvcc or the build fails, ``available()`` is
False and ``layer_matmul`` uses its Pallas kernel (after one warning on failure).
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
MAX_ROWS = 4  # instantiated row counts: 1..4 (the FMA work grows with rows; tensor cores take over above)
# (tpr, unroll, split) built in gemv8.cu (JAXPIPE_GEMV8_TILINGS): threads per weight row (16 columns
# each), 16-byte loads in flight per thread, blocks per cluster (slices of K).
TILINGS = ((4, 2, 4), (4, 4, 4), (8, 2, 8), (8, 4, 4), (8, 4, 8), (4, 8, 4), (8, 8, 8), (16, 8, 8))
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
    """Whether the kernel is built and registered for this process's CUDA GPUs (builds it on first call)."""
    if os.environ.get("JAXPIPE_CUDA_KERNELS", "0") != "1":
        return False
    arch = _gpu_arch()
    if arch is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(build(arch)))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxpipeGemv8), platform="CUDA")
    except Exception as e:  # noqa: BLE001 - any failure means: use the Pallas kernel
        warnings.warn(f"jaxpipe: the CUDA GEMV kernel is not available ({e}); using the Pallas kernel",
                      stacklevel=2)
        return False
    return True


def tiling_for(m: int, k: int, n: int, dtype=jnp.int8) -> tuple[int, int, int] | None:
    """``(tpr, unroll, split)`` for ``m`` rows of ``[m, k] @ [k, n]`` with ``dtype`` weights, or None where the
    Pallas kernel measured faster (a block reads a strip of ``16 * tpr`` columns over ``k / split`` rows,
    ``unroll`` loads in flight per thread; the ``split`` blocks of a strip add their sums up as one cluster).
    From the H200 sweeps of 2026-12-03 (BENCHMARKS.md), one row, Llama-2-7B shapes, ms per 32 layers: int8
    gate|up (n = 22016) 0.99 at (8, 2, 8) against Pallas 1.25, o (4096 x 4096) 0.39 against 0.43; qkv
    tied, down, fp8 and 2-4 rows slower (the e4m3 conversion costs more ALU work than Pallas's native
    one). Few loads in flight per thread (more resident blocks) beat deep unrolling.
    """
    if m != 1 or jnp.dtype(dtype) != jnp.int8 or n % 128:
        return None
    if n >= 16384 or (n < 8192 and k <= 4096):
        return (8, 2, 8)
    return None


def gemv8(x: jax.Array, w: jax.Array, scale: jax.Array, layer, *, tiling: tuple[int, int, int]) -> jax.Array:
    """``x[..., K]`` bf16 (1..4 rows) ``@ q[layer]`` (``w[L, K, N]`` int8 / float8_e4m3fn) ``* scale[layer]``
    (``scale[L, N]`` float32) -> ``[..., N]`` bf16. ``tiling``: one of ``TILINGS`` with
    ``N % (16 * tpr) == 0`` (``tiling_for`` picks one). CUDA only: call it where ``available()`` is True."""
    if tuple(tiling) not in TILINGS:
        raise ValueError(f"gemv8: no kernel for tiling {tiling}; built: {TILINGS}")
    tpr, unroll, split = tiling
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[-1]
    x2 = x.reshape(math.prod(lead), k)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    out = out_struct((x2.shape[0], n), jnp.bfloat16, x2, w, scale, layer)
    y = jax.ffi.ffi_call(TARGET, out)(layer, x2, w, scale, tpr=np.int32(tpr), unroll=np.int32(unroll),
                                     split=np.int32(split))
    return y.reshape(*lead, n)


__all__ = ["MAX_ROWS", "TILINGS", "available", "build", "cache_dir", "find_nvcc", "gemv8", "tiling_for"]
