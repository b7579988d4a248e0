"""The CUDA decode kernels for 8-bit weights (``gemv8.cu``, ``gemm8.cu``), compiled with nvcc on first use.

``gemv8(x, w, scale, layer)`` is ``layer_matmul``'s meaning for per-channel int8 / float8_e4m3fn stacks
at one bf16 row: ``y = bf16((x @ q[layer]) * scale[layer])``, float32 sums. It is an XLA FFI
custom call (command-buffer compatible), so it runs inside jit, ``fori_loop`` and ``shard_map`` like any
op, with the traced layer index read on the device. It also takes the decode layer's neighbouring ops into
the same kernel (``norm=``: the RMSNorm before the matmul; ``swiglu=True``: silu(gate) * up before it;
``residual=``: the residual add after it), so that a Llama layer's decode step at one row is its four GEMVs
and its attention kernel, not ~14 launches (BENCHMARKS.md, 2026-12-04).

``gemm8(x, w, scale, layer)`` is the same meaning at 2-32 rows on tensor cores (``mma.sync`` with the 8-bit
weights converted to bf16 in registers after a cp.async pipeline through shared memory); ``layer_matmul``
takes it where ``gemm_tiling_for`` says it measured faster than the Pallas kernel (BENCHMARKS.md, 2026-12-06).

Building: the first CUDA lowering that wants it runs ``nvcc`` (``$CUDA_HOME/bin/nvcc`` or the PATH) on
the shipped sources (one library) for the GPU's own architecture and caches the library under
``$JAXPIPE_CACHE/kernels`` (default ``~/.cache/jaxpipe``), keyed by the sources, the flags and the FFI
headers, written to a temporary name and renamed into place (a concurrent build never leaves a
half-written file); 17 s on a 16-core host (30 s on 2 cores), once per source version and GPU architecture.

On by default where it can be (``JAXPIPE_CUDA_KERNELS`` unset or ``auto``): a CUDA GPU and an nvcc. Off
with ``JAXPIPE_CUDA_KERNELS=0``; ``=1`` also warns when there is no nvcc. At one row it takes the
Llama decode matmuls ``tiling_for`` names (BENCHMARKS.md, 2026-12-03 and -04), with their neighbouring ops
where ``fuses`` says so; at 2-32 rows the gate|up-wide matmuls ``gemm_tiling_for`` names; elsewhere, and
wherever the kernels are unavailable or their build fails (one warning), ``layer_matmul`` runs its Pallas
kernel.
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
GEMM_SOURCE = Path(__file__).with_name("gemm8.cu")  # the tensor-core kernel for 2-32 rows, same library
HEADERS = (Path(__file__).with_name("cluster.cuh"),)  # included by both sources
TARGET = "jaxpipe_gemv8"
GEMM_TARGET = "jaxpipe_gemm8"
# FFI target name -> the library's handler symbol, one per (input, residual) variant (gemv8.cu's header).
_TARGETS = {"jaxpipe_gemv8": "JaxpipeGemv8", "jaxpipe_gemv8_res": "JaxpipeGemv8Res",
            "jaxpipe_gemv8_norm": "JaxpipeGemv8Norm", "jaxpipe_gemv8_swiglu": "JaxpipeGemv8Swiglu",
            "jaxpipe_gemv8_swiglu_res": "JaxpipeGemv8SwigluRes", GEMM_TARGET: "JaxpipeGemm8",
            GEMM_TARGET + "_res": "JaxpipeGemm8Res"}
MAX_ROWS = 1  # rows built: at 2-4 the kernel measured slower than the Pallas one (H200, 2026-12-03)
MAX_SLICE = 8192  # rows of K one block stages in shared memory (gemv8.cu's kMaxSlice)
# (tpr, unroll, split) built in gemv8.cu (JAXPIPE_GEMV8_TILINGS): threads per weight row (16 columns
# each), 16-byte loads in flight per thread, blocks per cluster (slices of K).
TILINGS = ((4, 1, 8), (4, 2, 8), (8, 2, 4), (16, 1, 8), (16, 2, 8))
# (mt, nt, bk, stages) built in gemm8.cu (JAXPIPE_GEMM8_TILINGS): m-tiles of 16 rows, n-tiles of 8 columns a
# warp (a block owns 16 * nt columns), weight rows a pipeline stage, stages in flight. The split of K (blocks
# a cluster, 1-8) is a launch parameter. The first two are gemm_tiling_for's; the deeper pipelines are built
# for tools/bench_cuda_gemm.py and not measured yet. (Four m-tiles, for 33-64 rows, measured slower than
# Pallas at every shape: not built.)
GEMM_TILINGS = ((1, 8, 128, 4), (2, 8, 128, 4), (1, 8, 64, 8), (2, 8, 64, 8), (2, 8, 128, 6))
GEMM_MAX_ROWS = 32
# "-t 0": nvcc compiles the two sources in parallel.
_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-diag-suppress", "940,2473", "-t", "0")


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
    for source in (SOURCE, GEMM_SOURCE, *HEADERS):
        key.update(source.read_bytes())
    key.update(" ".join(_FLAGS + (arch,)).encode())
    key.update(Path(include, "xla", "ffi", "api", "ffi.h").read_bytes())
    out = cache_dir() / f"gemv8-{key.hexdigest()[:16]}-{arch}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [nvcc, *_FLAGS, f"-arch={arch}", f"-I{include}", str(SOURCE), str(GEMM_SOURCE), "-o", tmp]
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
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="CUDA")
    except Exception as e:  # noqa: BLE001 - any failure means: use the Pallas kernel
        warnings.warn(f"jaxpipe: the CUDA GEMV kernel is not available ({e}); using the Pallas kernel "
                      "(JAXPIPE_CUDA_KERNELS=0 turns it off)", stacklevel=2)
        return False
    return True


def tiling_for(m: int, k: int, n: int, dtype=jnp.int8) -> tuple[int, int, int] | None:
    """``(tpr, unroll, split)`` for ``m`` rows of ``[m, k] @ [k, n]`` with ``dtype`` weights, or None where the
    Pallas kernel runs instead (a block reads a strip of ``16 * tpr`` columns over ``k / split`` rows,
    ``unroll`` loads in flight per thread; the ``split`` blocks of a strip add their sums up as one cluster).

    From the H200 sweeps (BENCHMARKS.md, 2026-12-03 and -04), one row, Llama-2-7B shapes, ms per 32 layers,
    CUDA against Pallas: gate|up (n = 22016) int8 0.93 at (16, 2, 8) against 1.25, fp8 0.85 at (16, 1, 8)
    against 1.10; o (4096 x 4096) int8 0.51 / fp8 0.45 at (4, 1, 8) against 0.67 / 0.95. int8 also takes qkv
    (n = 12288, (8, 2, 4)) and down (k = 11008, (4, 2, 8)), ties alone, because with ``fuses`` the kernel
    also does the norm, activation, residual and split-K sum around them: 2.88 against 2.97 ms a decode
    step end to end. fp8 does not (its fused steps measured 2.95-3.04 against 2.83), so there qkv and down
    stay with Pallas. 2-4 rows were slower than Pallas: not built.
    """
    kind = jnp.dtype(dtype)
    if m != 1 or kind not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)):
        return None
    fp8 = kind == jnp.float8_e4m3fn
    if n >= 16384 and n % 256 == 0:  # gate|up: long strips
        tiling = (16, 1, 8) if fp8 else (16, 2, 8)
    elif n >= 16384 and n % 128 == 0:
        tiling = (8, 2, 4)
    elif n < 8192 and k <= 4096 and n % 64 == 0:  # o: narrow strips, many blocks
        tiling = (4, 1, 8)
    elif fp8:
        return None
    elif n >= 8192 and n % 128 == 0:  # int8 qkv
        tiling = (8, 2, 4)
    elif n % 64 == 0:  # int8 down
        tiling = (4, 2, 8)
    else:
        return None
    return tiling if -(-k // tiling[2]) <= MAX_SLICE else None


def fuses(dtype) -> bool:
    """Whether ``layer_matmul`` hands the norm / activation / residual around a matmul to the kernel with
    ``dtype`` weights (else XLA runs them and the kernel does the plain matmul). int8: yes, 2.88 against
    2.97 ms a Llama-2-7B decode step at one row; fp8: no, 2.95-3.04 against 2.83 (H200, 2026-12-04)."""
    return jnp.dtype(dtype) == jnp.dtype(jnp.int8)


def gemv8(x: jax.Array, w: jax.Array, scale: jax.Array, layer, *, tiling: tuple[int, int, int],
          norm: jax.Array | None = None, eps: float = 0.0, swiglu: bool = False,
          residual: jax.Array | None = None) -> jax.Array:
    """``h @ q[layer] * scale[layer]`` -> ``[..., N]`` bf16 for one bf16 row (``w[L, K, N]`` int8 /
    float8_e4m3fn, ``scale[L, N]`` float32), where the row ``h`` is ``x[..., K]``, or with ``norm`` (a
    ``[L, K]`` bf16 stack) ``rms_norm(x, norm[layer], eps)``, or with ``swiglu`` ``silu(gate) * up`` of
    ``x[..., 2K] = gate | up``; with ``residual[..., N]`` (bf16) the result is ``residual + y``. These are
    ``jaxpipe.nn``'s ops, rounded where they round. ``tiling``: one of ``TILINGS`` with
    ``N % (16 * tpr) == 0`` (``tiling_for`` picks one). CUDA only: call it where ``available()`` is True."""
    if tuple(tiling) not in TILINGS:
        raise ValueError(f"gemv8: no kernel for tiling {tiling}; built: {TILINGS}")
    if norm is not None and swiglu:
        raise ValueError("gemv8: norm= and swiglu=True are two different inputs; give one")
    tpr, unroll, split = tiling
    lead, n = x.shape[:-1], w.shape[-1]
    if math.prod(lead) > MAX_ROWS:
        raise ValueError(f"gemv8: {math.prod(lead)} rows; the kernel is built for at most {MAX_ROWS}")
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    kind = "norm" if norm is not None else "swiglu" if swiglu else ""
    target = "_".join(filter(None, (TARGET, kind, "res" if residual is not None else "")))
    operands = [layer, x2] + ([norm] if norm is not None else []) + [w, scale]
    if residual is not None:
        operands.append(residual.reshape(x2.shape[0], n))
    attrs = dict(tpr=np.int32(tpr), unroll=np.int32(unroll), split=np.int32(split))
    if norm is not None:
        attrs["eps"] = np.float32(eps)
    out = out_struct((x2.shape[0], n), jnp.bfloat16, *operands)
    y = jax.ffi.ffi_call(target, out)(*operands, **attrs)
    return y.reshape(*lead, n)


def gemm_tiling_for(m: int, k: int, n: int, dtype=jnp.int8) -> tuple[int, int, int, int, int] | None:
    """``(mt, nt, bk, stages, split)`` of the tensor-core kernel for ``m`` rows of ``[m, k] @ [k, n]`` with
    ``dtype`` weights, or None where ``layer_matmul`` keeps the Pallas kernel. A block owns ``16 * nt``
    columns and ``k / split`` rows (``split`` blocks a cluster), ``bk`` rows a pipeline stage, ``stages`` of
    them in flight.

    Only where it measured faster (H200, BENCHMARKS.md 2026-12-06, ms per 32 layers): gate|up-wide matmuls
    (``n >= 16384``) at 2-32 rows, (mt, 8, 128, 4) split 2: 16 rows int8 1.57 against Pallas's 1.96, fp8 1.40
    against 1.79; 32 rows int8 2.06 against 2.25, fp8 1.96 against 2.17. At qkv, o and down shapes, and at
    64 rows, it was slower than Pallas (o and down 1.2-1.8x: their 32 column blocks of 128 leave each block
    too few bytes in flight), so those stay with Pallas.
    """
    kind = jnp.dtype(dtype)
    if not 2 <= m <= GEMM_MAX_ROWS or kind not in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)) or n < 16384:
        return None
    tiling = (1 if m <= 16 else 2, 8, 128, 4, 2)
    return tiling if n % 128 == 0 and k % 256 == 0 else None


def gemm8(x: jax.Array, w: jax.Array, scale: jax.Array, layer, *, tiling: tuple[int, int, int, int, int],
          residual: jax.Array | None = None, rotate: bool = False) -> jax.Array:
    """``x @ q[layer] * scale[layer]`` -> ``[..., N]`` bf16 for 1-32 bf16 rows on tensor cores (``w[L, K, N]``
    int8 / float8_e4m3fn, ``scale[L, N]`` float32): ``layer_matmul``'s meaning, float32 sums; with
    ``residual[..., N]`` (bf16) ``residual + y``, rounded as the two ops round. ``tiling``: ``(mt, nt, bk,
    stages, split)`` with ``(mt, nt, bk, stages)`` one of ``GEMM_TILINGS`` (``gemm_tiling_for`` picks one).
    ``rotate``: each block walks its rows of K from a different stage on (its column block's index), so that
    the blocks do not all read the same rows of x at once. CUDA only: call it where ``available()`` is True."""
    mt, nt, bk, stages, split = tiling
    if (mt, nt, bk, stages) not in GEMM_TILINGS or not 1 <= split <= 8:
        raise ValueError(f"gemm8: no kernel for tiling {tiling}; built: {GEMM_TILINGS}, split 1-8")
    lead, k, n = x.shape[:-1], w.shape[1], w.shape[-1]
    m = math.prod(lead)
    if not 1 <= m <= 16 * mt or n % (16 * nt) or k % (split * bk):
        raise ValueError(f"gemm8: tiling {tiling} does not fit [{m}, {k}] @ [{k}, {n}]")
    x2 = x.reshape(m, k)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    operands = [layer, x2, w, scale] + ([residual.reshape(m, n)] if residual is not None else [])
    out = out_struct((m, n), jnp.bfloat16, *operands)
    attrs = dict(mt=np.int32(mt), nt=np.int32(nt), bk=np.int32(bk), stages=np.int32(stages),
                 split=np.int32(split), rotate=np.int32(rotate))
    target = GEMM_TARGET + ("_res" if residual is not None else "")
    y = jax.ffi.ffi_call(target, out)(*operands, **attrs)
    return y.reshape(*lead, n)


__all__ = ["GEMM_MAX_ROWS", "GEMM_TILINGS", "MAX_ROWS", "MAX_SLICE", "TILINGS", "available", "build", "cache_dir",
           "find_nvcc", "fuses", "gemm8", "gemm_tiling_for", "gemv8", "tiling_for"]
