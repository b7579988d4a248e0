"""The CUDA 8-bit GEMV's host side: when it applies, how it is built and cached, and that CPUs never use it.

The kernels themselves run only on CUDA GPUs (`tools/check_cuda_gemv.py` checks the GEMV there, every
variant, and `tools/bench_cuda_gemm.py` the tensor-core kernel, every tiling, against float64 NumPy); here nvcc,
where the machine has it, compiles the shipped sources for sm_90.
"""

from __future__ import annotations

import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe.kernels import cuda_gemv
from jaxpipe.kernels import quant_matmul as qm


def test_tiling_rules():
    # One row, int8 and fp8, every Llama-2-7B decode matmul (the H200 sweeps' choices).
    fp8 = jnp.float8_e4m3fn
    assert cuda_gemv.tiling_for(1, 4096, 22016) == (16, 2, 8)  # gate|up
    assert cuda_gemv.tiling_for(1, 4096, 22016, fp8) == (16, 1, 8)
    assert cuda_gemv.tiling_for(1, 4096, 16512) == (8, 2, 4)  # wide, but not a multiple of 256 columns
    assert cuda_gemv.tiling_for(1, 4096, 4096) == (4, 1, 8)  # o
    assert cuda_gemv.tiling_for(1, 4096, 4096, fp8) == (4, 1, 8)
    assert cuda_gemv.tiling_for(1, 4096, 12288) == (8, 2, 4)  # qkv: int8 only (fused, it is faster)
    assert cuda_gemv.tiling_for(1, 4096, 12288, fp8) is None
    assert cuda_gemv.tiling_for(1, 11008, 4096) == (4, 2, 8)  # down: int8 only
    assert cuda_gemv.tiling_for(1, 11008, 4096, fp8) is None
    assert cuda_gemv.fuses(jnp.int8) and not cuda_gemv.fuses(fp8)
    assert cuda_gemv.tiling_for(1, 8 * 8192 + 8, 4096) is None  # a block's slice of K would not fit
    assert cuda_gemv.tiling_for(2, 4096, 4096) is None  # more rows: slower, not built
    assert cuda_gemv.tiling_for(1, 4096, 4128) is None  # columns not a multiple of 64
    assert cuda_gemv.tiling_for(1, 4096, 4096, jnp.bfloat16) is None
    for m, k, n in [(1, 4096, 22016), (1, 4096, 4096), (1, 64, 256), (1, 2048, 16384), (1, 4096, 16512),
                    (1, 4096, 12288), (1, 11008, 4096), (1, 576, 960), (1, 1536, 576)]:
        for dtype in (jnp.int8, fp8):
            tiling = cuda_gemv.tiling_for(m, k, n, dtype)
            assert tiling is None and dtype == fp8 or tiling in cuda_gemv.TILINGS and n % (16 * tiling[0]) == 0


def test_gemm_tiling_rules():
    # 2-32 rows of a gate|up-wide matmul: the tensor-core kernel, one m-tile of 16 rows up to 16 rows, two up
    # to 32 (the H200 sweep's choices); elsewhere Pallas, which measured faster.
    fp8 = jnp.float8_e4m3fn
    assert cuda_gemv.gemm_tiling_for(32, 4096, 22016) == (2, 8, 128, 4, 2)  # gate|up
    assert cuda_gemv.gemm_tiling_for(17, 4096, 22016, fp8) == (2, 8, 128, 4, 2)
    assert cuda_gemv.gemm_tiling_for(16, 4096, 22016) == (1, 8, 128, 4, 2)
    assert cuda_gemv.gemm_tiling_for(2, 8192, 57344, fp8) == (1, 8, 128, 4, 2)  # Llama-2-70B's gate|up
    for m, k, n in [(32, 4096, 4096), (32, 4096, 12288), (32, 11008, 4096), (64, 4096, 22016), (33, 4096, 22016),
                    (1, 4096, 22016), (32, 4096, 16384 + 64), (32, 4096 + 128, 22016)]:
        assert cuda_gemv.gemm_tiling_for(m, k, n) is None, (m, k, n)  # Pallas, or no fit
    assert cuda_gemv.gemm_tiling_for(32, 4096, 22016, jnp.bfloat16) is None
    for m in range(2, 33):
        for k, n in [(4096, 22016), (8192, 57344), (5120, 27648), (2048, 16384)]:
            t = cuda_gemv.gemm_tiling_for(m, k, n)
            assert t is not None and t[:4] in cuda_gemv.GEMM_TILINGS
            mt, nt, bk, _, split = t
            assert 16 * mt >= m and n % (16 * nt) == 0 and k % (split * bk) == 0 and 1 <= split <= 8


def test_gemm_shapes_and_bad_tiling():
    x = jax.ShapeDtypeStruct((4, 8, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((3, 256, 128), jnp.int8)
    s = jax.ShapeDtypeStruct((3, 128), jnp.float32)
    y = jax.eval_shape(lambda x, w, s: cuda_gemv.gemm8(x, w, s, jnp.int32(2), tiling=(2, 8, 64, 8, 4)), x, w, s)
    assert (y.shape, y.dtype) == ((4, 8, 128), jnp.bfloat16)
    r = jax.ShapeDtypeStruct((4, 8, 128), jnp.bfloat16)  # the residual epilogue: same result shape
    y = jax.eval_shape(lambda x, w, s, r: cuda_gemv.gemm8(x, w, s, 1, tiling=(2, 8, 64, 8, 1), residual=r), x, w, s, r)
    assert (y.shape, y.dtype) == ((4, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"no kernel for tiling \(3, 8, 64, 8, 1\)"):
        jax.eval_shape(lambda x, w, s: cuda_gemv.gemm8(x, w, s, 0, tiling=(3, 8, 64, 8, 1)), x, w, s)
    with pytest.raises(ValueError, match=r"does not fit \[32, 256\] @ \[256, 128\]"):  # 32 rows, one m-tile
        jax.eval_shape(lambda x, w, s: cuda_gemv.gemm8(x, w, s, 0, tiling=(1, 8, 64, 8, 1)), x, w, s)
    with pytest.raises(ValueError, match="does not fit"):  # K = 256 is not 8 slices of 64 rows
        jax.eval_shape(lambda x, w, s: cuda_gemv.gemm8(x, w, s, 0, tiling=(2, 8, 64, 8, 8)), x, w, s)


def test_shapes_and_bad_tiling():
    x = jax.ShapeDtypeStruct((2, 1, 256), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((3, 256, 128), jnp.int8)
    s = jax.ShapeDtypeStruct((3, 128), jnp.float32)
    x1 = jax.ShapeDtypeStruct((1, 1, 256), jnp.bfloat16)
    y = jax.eval_shape(lambda x, w, s: cuda_gemv.gemv8(x, w, s, jnp.int32(2), tiling=(4, 1, 8)), x1, w, s)
    assert (y.shape, y.dtype) == ((1, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"no kernel for tiling \(3, 8, 8\)"):
        jax.eval_shape(lambda x, w, s: cuda_gemv.gemv8(x, w, s, 0, tiling=(3, 8, 8)), x1, w, s)
    with pytest.raises(ValueError, match="2 rows; the kernel is built for at most 1"):
        jax.eval_shape(lambda x, w, s: cuda_gemv.gemv8(x, w, s, 0, tiling=(4, 1, 8)), x, w, s)


def test_fused_variants_shapes_and_errors():
    # The norm / swiglu / residual variants: the row is [1, K] ([1, 2K] = gate | up for swiglu), the result [1, N].
    w = jax.ShapeDtypeStruct((3, 256, 128), jnp.float8_e4m3fn)
    s = jax.ShapeDtypeStruct((3, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((1, 1, 256), jnp.bfloat16)
    gate_up = jax.ShapeDtypeStruct((1, 1, 512), jnp.bfloat16)
    norm = jax.ShapeDtypeStruct((3, 256), jnp.bfloat16)
    res = jax.ShapeDtypeStruct((1, 1, 128), jnp.bfloat16)
    t = (4, 1, 8)
    for f, args in [(lambda x, n, w, s: cuda_gemv.gemv8(x, w, s, 1, tiling=t, norm=n, eps=1e-5), (x, norm, w, s)),
                    (lambda x, w, s, r: cuda_gemv.gemv8(x, w, s, 1, tiling=t, swiglu=True, residual=r), (gate_up, w, s, res)),
                    (lambda x, w, s, r: cuda_gemv.gemv8(x, w, s, 1, tiling=t, residual=r), (x, w, s, res))]:
        y = jax.eval_shape(f, *args)
        assert (y.shape, y.dtype) == ((1, 1, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="two different inputs"):
        jax.eval_shape(lambda x, n, w, s: cuda_gemv.gemv8(x, w, s, 0, tiling=t, norm=n, swiglu=True), x, norm, w, s)


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_layer_matmul_fused_ops_are_the_models_ops(kind):
    # layer_matmul(norm= / swiglu= / residual=) means jaxpipe.nn's ops around the matmul; on CPU it is them.
    from jaxpipe import nn
    from jaxpipe.quantize import quantize

    rng = np.random.default_rng(1)
    k, n = 64, 128
    q, s = quantize(rng.standard_normal((3, k, n)).astype(np.float32) * 0.1, kind)
    q, s = jnp.asarray(q), jnp.asarray(s)
    x = jnp.asarray(rng.standard_normal((1, 1, k)) * 2, jnp.bfloat16)
    gate_up = jnp.asarray(rng.standard_normal((1, 1, 2 * k)), jnp.bfloat16)
    norm = jnp.asarray(1 + 0.1 * rng.standard_normal((3, k)), jnp.bfloat16)
    res = jnp.asarray(rng.standard_normal((1, 1, n)), jnp.bfloat16)
    i = jnp.int32(2)
    cases = [
        (lambda: qm.layer_matmul(x, q, s, i, norm=norm, eps=1e-5),
         lambda: qm.xla_layer_matmul(nn.rms_norm(x, norm[i], 1e-5), q, s, i)),
        (lambda: qm.layer_matmul(gate_up, q, s, i, swiglu=True, residual=res),
         lambda: res + qm.xla_layer_matmul(nn.swiglu(gate_up), q, s, i)),
        (lambda: qm.layer_matmul(x, q, s, i, residual=res), lambda: res + qm.xla_layer_matmul(x, q, s, i)),
        (lambda: qm.layer_matmul(x, q[:, :, :k].astype(jnp.bfloat16), None, i, norm=norm, eps=1e-5),  # unquantized
         lambda: nn.rms_norm(x, norm[i], 1e-5) @ q[i, :, :k].astype(jnp.bfloat16)),
    ]
    for got, want in cases:
        g, w_ = np.asarray(jax.jit(got)(), np.float32), np.asarray(jax.jit(want)(), np.float32)
        assert g.shape == w_.shape
        np.testing.assert_array_equal(g, w_)
    with pytest.raises(ValueError, match="two different inputs"):
        qm.layer_matmul(x, q, s, i, norm=norm, swiglu=True)


def test_cpu_never_builds_or_uses_it(monkeypatch):
    assert jax.default_backend() == "cpu"
    assert not cuda_gemv.available()
    # layer_matmul on CPU is exactly the XLA path, also at the row counts the CUDA kernel would take.
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.integers(-127, 128, (3, 64, 128)), jnp.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, (3, 128)) / 127, jnp.float32)
    assert cuda_gemv.tiling_for(1, 64, 128) is not None  # a shape the CUDA kernel would take on a GPU
    for m in (1, 4):
        x = jnp.asarray(rng.standard_normal((m, 64)), jnp.bfloat16)
        got = jax.jit(qm.layer_matmul)(x, w, s, jnp.int32(1))
        want = jax.jit(qm.xla_layer_matmul)(x, w, s, jnp.int32(1))
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    # ... and at a shape and row count the tensor-core kernel would take on a GPU.
    w = jnp.asarray(rng.integers(-127, 128, (2, 256, 16384)), jnp.int8)
    s = jnp.asarray(rng.uniform(0.5, 1.5, (2, 16384)) / 127, jnp.float32)
    assert cuda_gemv.gemm_tiling_for(20, 256, 16384) is not None
    x = jnp.asarray(rng.standard_normal((20, 256)), jnp.bfloat16)
    got = jax.jit(qm.layer_matmul)(x, w, s, jnp.int32(1))
    want = jax.jit(qm.xla_layer_matmul)(x, w, s, jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("JAXPIPE_CUDA_KERNELS", "0")
    cuda_gemv.available.cache_clear()
    try:
        assert not cuda_gemv.available()
        monkeypatch.setenv("JAXPIPE_CUDA_KERNELS", "yes")
        cuda_gemv.available.cache_clear()
        with pytest.raises(ValueError, match="JAXPIPE_CUDA_KERNELS='yes': use auto"):
            cuda_gemv.available()
    finally:
        cuda_gemv.available.cache_clear()


@pytest.mark.skipif(cuda_gemv.find_nvcc() is None, reason="no nvcc on this machine")
def test_nvcc_builds_the_source_once(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPIPE_CACHE", str(tmp_path))
    lib = cuda_gemv.build("sm_90")
    assert lib.parent == tmp_path / "kernels" and lib.name.endswith("-sm_90.so")
    assert sorted(p.name for p in lib.parent.iterdir()) == [lib.name]  # no temporary file left behind
    handle = ctypes.cdll.LoadLibrary(str(lib))
    assert handle.JaxpipeGemv8 and handle.JaxpipeGemm8  # the FFI handlers' symbols, both sources
    mtime = os.stat(lib).st_mtime_ns
    assert cuda_gemv.build("sm_90") == lib and os.stat(lib).st_mtime_ns == mtime  # cached: not rebuilt


def test_nvcc_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPIPE_CACHE", str(tmp_path))
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc fatal : Unsupported gpu architecture' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError, match="Unsupported gpu architecture"):
        cuda_gemv.build("sm_1", nvcc=str(fake))
    assert list((tmp_path / "kernels").iterdir()) == []  # nothing half-written
