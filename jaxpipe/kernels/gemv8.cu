// jaxpipe_gemv8: one layer's decode GEMV against a stack of 8-bit weights, as an XLA FFI target.
//
//   y[m, n] = bf16((sum_k x[m, k] * q[layer, k, n]) * scale[layer, n])     m < M rows (built: M = 1)
//
// q[L, K, N] is int8 or float8_e4m3fn (row-major, N contiguous), scale[L, N] float32, x[M, K] and y[M, N]
// bfloat16, layer an int32 in device memory (a traced fori_loop index). The meaning is layer_matmul's
// (jaxpipe/kernels/quant_matmul.py): products exact, float32 sums, one multiply by the column's scale, one
// rounding. Built by jaxpipe/kernels/cuda_gemv.py with nvcc on first use (sm_90: thread-block clusters).
//
// Layout of the work: a block owns a strip of 16 * TPR columns and one of CS slices of K; TPR threads
// cover a row of the strip (16 bytes each, so 64-256 contiguous bytes per row), and each thread keeps U
// loads in flight. The CS blocks of a strip form one thread-block cluster: each sums its slice (warp
// shuffles, then its 8 warps through shared memory), and the cluster adds the CS partial sums through
// distributed shared memory, in rank order. So split-K needs no float32 partials in global memory, no
// second kernel and no atomics, and the result does not depend on scheduling.

#include <cstdint>
#include <string>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

namespace cg = cooperative_groups;
namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Four int8 values packed in a word -> four floats, exactly. Each byte with its sign bit flipped is v + 128
// as an unsigned byte; placed as the low mantissa byte of 2^23 (bits 0x4B000000) it reads 2^23 + 128 + v,
// and one float subtraction leaves v: byte permutes and adds instead of the quarter-rate int -> float unit.
__device__ __forceinline__ void int8x4_to_float(uint32_t word, float out[4]) {
  const uint32_t u = word ^ 0x80808080u;
  out[0] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650)) - 8388736.0f;
  out[1] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651)) - 8388736.0f;
  out[2] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652)) - 8388736.0f;
  out[3] = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653)) - 8388736.0f;
}

// Four float8_e4m3fn values -> four floats, exactly: the hardware's e4m3x2 -> f16x2 conversion (sm_89+;
// every e4m3 value, subnormals included, is a float16 value), then f16 -> f32. (Moving the half's bits
// into a float32 with integer ops instead measured 1.5-1.9x slower on an H200.)
__device__ __forceinline__ void fp8x4_to_float(uint32_t word, float out[4]) {
  const __half2 lo(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(word & 0xFFFFu), __NV_E4M3));
  const __half2 hi(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(word >> 16), __NV_E4M3));
  const float2 a = __half22float2(lo), b = __half22float2(hi);
  out[0] = a.x;
  out[1] = a.y;
  out[2] = b.x;
  out[3] = b.y;
}

template <int M, int TPR, int U, int CS, bool FP8>
__global__ void __launch_bounds__(kThreads) gemv8_kernel(const int32_t* __restrict__ layer_index,
                                                        const __nv_bfloat16* __restrict__ x,
                                                        const uint8_t* __restrict__ w,
                                                        const float* __restrict__ scale,
                                                        __nv_bfloat16* __restrict__ y, int K, int N) {
  constexpr int kCols = 16 * TPR;  // columns of this block's strip
  constexpr int kRowsPerPass = kThreads / TPR;
  static_assert(kCols % CS == 0, "each cluster rank writes kCols / CS columns");
  const int tid = threadIdx.x;
  const int chunk = tid % TPR;  // which 16 columns of the strip this thread reads
  const int rank = blockIdx.y;  // == the block's rank in its cluster (cluster dims 1 x CS)
  const int layer = *layer_index;
  const int col0 = blockIdx.x * kCols;
  const int slice = (K + CS - 1) / CS;
  const int k_end = min(K, (rank + 1) * slice);
  const uint8_t* wp = w + size_t(layer) * size_t(K) * size_t(N) + col0 + chunk * 16;

  float acc[M][16];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int c = 0; c < 16; ++c) acc[m][c] = 0.0f;

  for (int k0 = rank * slice + tid / TPR; k0 < k_end; k0 += kRowsPerPass * U) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all U loads issued before any is used
      const int k = k0 + u * kRowsPerPass;
      v[u] = k < k_end ? __ldcs(reinterpret_cast<const uint4*>(wp + size_t(k) * N)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * kRowsPerPass;
      if (k < k_end) {
        float xv[M];
#pragma unroll
        for (int m = 0; m < M; ++m) xv[m] = __bfloat162float(x[size_t(m) * K + k]);
        const uint32_t words[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float f[4];
          if constexpr (FP8) {
            fp8x4_to_float(words[j], f);
          } else {
            int8x4_to_float(words[j], f);
          }
#pragma unroll
          for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m][4 * j + c] = fmaf(xv[m], f[c], acc[m][4 * j + c]);
        }
      }
    }
  }

  // The block's sum over its rows: the lanes of a warp that read the same columns, then the 8 warps.
#pragma unroll
  for (int off = TPR; off < 32; off *= 2)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 16; ++c) acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], off);

  __shared__ float warp_sums[kWarps][M][kCols];
  __shared__ float block_sum[M][kCols];
  const int lane = tid % 32, warp = tid / 32;
  if (lane < TPR) {
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int c = 0; c < 16; ++c) warp_sums[warp][m][lane * 16 + c] = acc[m][c];
  }
  __syncthreads();
  for (int i = tid; i < M * kCols; i += kThreads) {
    const int m = i / kCols, c = i % kCols;
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarps; ++p) s += warp_sums[p][m][c];
    block_sum[m][c] = s;
  }

  // The cluster's sum over its CS slices of K: rank r adds up columns [r, r + 1) * kCols / CS of every
  // rank's block_sum, in rank order, and writes them.
  constexpr int kOwn = kCols / CS;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every rank's block_sum is complete
  for (int i = tid; i < M * kOwn; i += kThreads) {
    const int m = i / kOwn, c = rank * kOwn + i % kOwn;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < CS; ++r) s += cluster.map_shared_rank(&block_sum[0][0], r)[m * kCols + c];
    const int n = col0 + c;
    y[size_t(m) * N + n] = __float2bfloat16_rn(s * scale[size_t(layer) * N + n]);
  }
  cluster.sync();  // no block exits while another still reads its shared memory
}

template <int M, int TPR, int U, int CS, bool FP8>
cudaError_t launch(cudaStream_t stream, const int32_t* layer, const __nv_bfloat16* x, const uint8_t* w,
                   const float* scale, __nv_bfloat16* y, int K, int N) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(N / (16 * TPR), CS, 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = CS;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, gemv8_kernel<M, TPR, U, CS, FP8>, layer, x, w, scale, y, K, N);
}

// The tilings built: (threads per row, loads in flight per thread, blocks per cluster). Keep in step with
// TILINGS in cuda_gemv.py.
#define JAXPIPE_GEMV8_TILINGS(X) \
  X(4, 1, 8)                     \
  X(4, 2, 8)                     \
  X(8, 1, 8)                     \
  X(8, 2, 4)                     \
  X(16, 1, 8)                    \
  X(16, 2, 8)

template <int M, bool FP8>
cudaError_t dispatch_tiling(int tpr, int unroll, int split, cudaStream_t s, const int32_t* l,
                            const __nv_bfloat16* x, const uint8_t* w, const float* sc, __nv_bfloat16* y, int K,
                            int N) {
#define JAXPIPE_GEMV8_CASE(T, UU, C) \
  if (tpr == T && unroll == UU && split == C) return launch<M, T, UU, C, FP8>(s, l, x, w, sc, y, K, N);
  JAXPIPE_GEMV8_TILINGS(JAXPIPE_GEMV8_CASE)
#undef JAXPIPE_GEMV8_CASE
  return cudaErrorNotSupported;
}

ffi::Error Gemv8(cudaStream_t stream, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
                 ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::BF16> y, int32_t tpr, int32_t unroll,
                 int32_t split) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: expected x[M, K], w[L, K, N], scale[L, N], y[M, N]");
  }
  const int64_t m = xd[0], k = xd[1], layers = wd[0], n = wd[2];
  if (wd[1] != k || sd[0] != layers || sd[1] != n || yd[0] != m || yd[1] != n) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: shapes of x, w, scale and y do not match");
  }
  const bool fp8 = w.element_type() == ffi::F8E4M3FN;
  if (!fp8 && w.element_type() != ffi::S8) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: w must be int8 or float8_e4m3fn");
  }
  // One row only: at 2-4 rows this kernel measured slower than the Pallas one (H200, 2026-12-03), so no
  // more are built (the template takes any M <= 4).
  if (m != 1) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: built for one row, got M=" + std::to_string(m));
  }
  if (tpr <= 0 || n % (16 * tpr) != 0 || k > INT32_MAX || n > INT32_MAX) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: N must be a multiple of 16 * tpr");
  }
  const auto* lp = layer.typed_data();
  const auto* xp = reinterpret_cast<const __nv_bfloat16*>(x.untyped_data());
  const auto* wp = reinterpret_cast<const uint8_t*>(w.untyped_data());
  const auto* sp = scale.typed_data();
  auto* yp = reinterpret_cast<__nv_bfloat16*>(y->untyped_data());
  const cudaError_t err =
      fp8 ? dispatch_tiling<1, true>(tpr, unroll, split, stream, lp, xp, wp, sp, yp, int(k), int(n))
          : dispatch_tiling<1, false>(tpr, unroll, split, stream, lp, xp, wp, sp, yp, int(k), int(n));
  if (err == cudaErrorNotSupported) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: no kernel for M=" + std::to_string(m) + ", tpr=" +
                                       std::to_string(tpr) + ", unroll=" + std::to_string(unroll) +
                                       ", split=" + std::to_string(split));
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxpipe_gemv8: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8, Gemv8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int32_t>("tpr")
                                  .Attr<int32_t>("unroll")
                                  .Attr<int32_t>("split"),
                              {ffi::Traits::kCmdBufferCompatible});
