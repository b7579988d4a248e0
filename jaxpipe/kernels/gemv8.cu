// jaxpipe_gemv8: one layer's decode GEMV against a stack of 8-bit weights, as XLA FFI targets.
//
//   y[n] = bf16((sum_k h[k] * q[layer, k, n]) * scale[layer, n])          (one row)
//
// q[L, K, N] is int8 or float8_e4m3fn (row-major, N contiguous), scale[L, N] float32, the row and y
// bfloat16, layer an int32 in device memory (a traced fori_loop index). The meaning is layer_matmul's
// (jaxpipe/kernels/quant_matmul.py): products exact, float32 sums, one multiply by the column's scale, one
// rounding. The input row h is, by target (the model's own ops, rounded to bf16 where they round):
//   jaxpipe_gemv8          h = x                                   x[1, K]
//   jaxpipe_gemv8_norm     h = rms_norm(x, norm[layer], eps)       x[1, K], norm[L, K] bf16
//   jaxpipe_gemv8_swiglu   h = silu(x[:K]) * x[K:]                 x[1, 2K] (gate | up)
// and the *_res targets return residual + y (residual[1, N] bf16, one more rounding), so one kernel does
// what XLA launches 2-5 kernels for around each decode matmul (the norm's reduction and scaling, the
// activation, the residual add, Pallas's split-K sum). Built by jaxpipe/kernels/cuda_gemv.py with nvcc on
// first use (sm_90: thread-block clusters).
//
// Layout of the work: a block owns a strip of 16 * TPR columns and one of CS slices of K; TPR threads
// cover a row of the strip (16 bytes each, so 64-256 contiguous bytes per row), and each thread keeps U
// loads in flight. The fused targets first stage the block's slice of h in shared memory (float32; the
// norm's sum of squares is over all of x, which every block reads: 8 KB from L2 at Llama-2-7B's width);
// the plain one reads x in its loop. (Issuing the first weight loads before the staging measured slower,
// 2026-12-04: more registers.) The CS blocks of a strip form one thread-block cluster: each sums its slice (warp shuffles, then its 8 warps
// through shared memory), and the cluster adds the CS partial sums through distributed shared memory, in
// rank order. So split-K needs no float32 partials in global memory, no second kernel and no atomics, and
// the result does not depend on scheduling.

#include <cstdint>
#include <string>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

#include "cluster.cuh"

namespace cg = cooperative_groups;
namespace ffi = xla::ffi;

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Six resident blocks a multiprocessor (at most 40 registers a thread, as the 2026-12-03 kernel took): the
// GEMV is bound by the loads in flight. A first version at 56-64 registers (4 blocks; it also double-buffered
// its loads in registers) ran 1.2x slower end to end on an H200 (2026-12-04).
constexpr int kMinBlocks = 6;

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


using jaxpipe_cuda::cluster_load;

__device__ __forceinline__ float round_bf16(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

enum Prologue { kPlain = 0, kRmsNorm = 1, kSwiglu = 2 };

// Whether a target stages its input row in shared memory: all but the plain one (the residual one too, as
// measured: int8 end to end 2.88 against 2.97 ms at one row with all four matmuls fused, H200, 2026-12-04).
__host__ __device__ constexpr bool Staged(int pro, bool res) { return pro != kPlain || res; }

constexpr int kMaxSlice = 8192;  // floats of h staged per block: at most 32 KB of dynamic shared memory

template <int TPR, int U, int CS, bool FP8, int PRO, bool RES>
__global__ void __launch_bounds__(kThreads, kMinBlocks) gemv8_kernel(const int32_t* __restrict__ layer_index,
                                                        const __nv_bfloat16* __restrict__ x,
                                                        const __nv_bfloat16* __restrict__ norm,
                                                        const uint8_t* __restrict__ w,
                                                        const float* __restrict__ scale,
                                                        const __nv_bfloat16* __restrict__ residual,
                                                        __nv_bfloat16* __restrict__ y, int K, int N, float eps) {
  constexpr int kCols = 16 * TPR;  // columns of this block's strip
  constexpr int kRowsPerPass = kThreads / TPR;
  static_assert(kCols % CS == 0, "each cluster rank writes kCols / CS columns");
  const int tid = threadIdx.x;
  const int chunk = tid % TPR;  // which 16 columns of the strip this thread reads
  const int rank = blockIdx.y;  // == the block's rank in its cluster (cluster dims 1 x CS)
  const int layer = *layer_index;
  const int col0 = blockIdx.x * kCols;
  const int slice = (K + CS - 1) / CS;
  const int k_begin = rank * slice;
  const int k_end = min(K, k_begin + slice);

  // This block's slice of the input row, as the model computes it (see the targets above), staged in shared
  // memory, except for the plain target, which reads x in the loop as the 2026-12-03 kernel did.
  extern __shared__ float h[];  // slice floats (the launch's dynamic shared memory)
  constexpr bool kStage = Staged(PRO, RES);
  if constexpr (PRO == kRmsNorm) {
    __shared__ float red[kWarps];
    float ss = 0.0f;  // x32 * x32 summed over all of K
    for (int k = tid; k < K; k += kThreads) {
      const float f = __bfloat162float(x[k]);
      ss = fmaf(f, f, ss);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
    if (tid % 32 == 0) red[tid / 32] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarps; ++p) total += red[p];
    const float r = rsqrtf(total / float(K) + eps);
    const __nv_bfloat16* nw = norm + size_t(layer) * K;
    for (int k = k_begin + tid; k < k_end; k += kThreads) {
      // weight * (x32 * r).astype(bf16), the product rounded to bf16
      h[k - k_begin] = round_bf16(__bfloat162float(nw[k]) * round_bf16(__bfloat162float(x[k]) * r));
    }
  } else if constexpr (PRO == kSwiglu) {
    for (int k = k_begin + tid; k < k_end; k += kThreads) {
      const float g = __bfloat162float(x[k]), u = __bfloat162float(x[K + k]);
      const float sig = round_bf16(1.0f / (1.0f + expf(-g)));  // silu(g) = g * sigmoid(g), each op in bf16
      h[k - k_begin] = round_bf16(round_bf16(g * sig) * u);
    }
  } else if constexpr (kStage) {
    for (int k = k_begin + tid; k < k_end; k += kThreads) h[k - k_begin] = __bfloat162float(x[k]);
  }
  if constexpr (kStage) __syncthreads();

  const uint8_t* wp = w + size_t(layer) * size_t(K) * size_t(N) + col0 + chunk * 16;
  float acc[16];
#pragma unroll
  for (int c = 0; c < 16; ++c) acc[c] = 0.0f;

  for (int k0 = k_begin + tid / TPR; k0 < k_end; k0 += kRowsPerPass * U) {
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
        const float xv = kStage ? h[k - k_begin] : __bfloat162float(x[k]);
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
          for (int c = 0; c < 4; ++c) acc[4 * j + c] = fmaf(xv, f[c], acc[4 * j + c]);
        }
      }
    }
  }

  // The block's sum over its rows: the lanes of a warp that read the same columns, then the 8 warps.
#pragma unroll
  for (int off = TPR; off < 32; off *= 2)
#pragma unroll
    for (int c = 0; c < 16; ++c) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);

  __shared__ float warp_sums[kWarps][kCols];
  __shared__ float block_sum[kCols];
  const int lane = tid % 32, warp = tid / 32;
  if (lane < TPR) {
#pragma unroll
    for (int c = 0; c < 16; ++c) warp_sums[warp][lane * 16 + c] = acc[c];
  }
  __syncthreads();
  for (int c = tid; c < kCols; c += kThreads) {
    float s = 0.0f;
#pragma unroll
    for (int p = 0; p < kWarps; ++p) s += warp_sums[p][c];
    block_sum[c] = s;
  }

  // The cluster's sum over its CS slices of K: rank r adds up columns [r, r + 1) * kCols / CS of every
  // rank's block_sum, in rank order, and writes them.
  constexpr int kOwn = kCols / CS;
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();  // every rank's block_sum is complete
  for (int i = tid; i < kOwn; i += kThreads) {
    const int c = rank * kOwn + i;
    float s = 0.0f;
#pragma unroll
    for (int r = 0; r < CS; ++r) s += cluster_load(&block_sum[c], r);
    const int n = col0 + c;
    const float out = s * scale[size_t(layer) * N + n];
    if constexpr (RES) {
      y[n] = __float2bfloat16_rn(__bfloat162float(residual[n]) + round_bf16(out));  // residual + y, in bf16
    } else {
      y[n] = __float2bfloat16_rn(out);
    }
  }
  cluster.sync();  // no block exits while another still reads its shared memory
}

struct Args {
  const int32_t* layer;
  const __nv_bfloat16* x;
  const __nv_bfloat16* norm;
  const uint8_t* w;
  const float* scale;
  const __nv_bfloat16* residual;
  __nv_bfloat16* y;
  int K, N;
  float eps;
};

template <int TPR, int U, int CS, bool FP8, int PRO, bool RES>
cudaError_t launch(cudaStream_t stream, const Args& a) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(a.N / (16 * TPR), CS, 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = Staged(PRO, RES) ? sizeof(float) * ((a.K + CS - 1) / CS) : 0;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = CS;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, gemv8_kernel<TPR, U, CS, FP8, PRO, RES>, a.layer, a.x, a.norm, a.w, a.scale,
                            a.residual, a.y, a.K, a.N, a.eps);
}

// The tilings built: (threads per row, loads in flight per thread, blocks per cluster). Keep in step with
// TILINGS in cuda_gemv.py.
#define JAXPIPE_GEMV8_TILINGS(X) \
  X(4, 1, 8)                     \
  X(4, 2, 8)                     \
  X(8, 2, 4)                     \
  X(16, 1, 8)                    \
  X(16, 2, 8)

template <bool FP8, int PRO, bool RES>
cudaError_t dispatch_tiling(int tpr, int unroll, int split, cudaStream_t s, const Args& a) {
#define JAXPIPE_GEMV8_CASE(T, UU, C) \
  if (tpr == T && unroll == UU && split == C) return launch<T, UU, C, FP8, PRO, RES>(s, a);
  JAXPIPE_GEMV8_TILINGS(JAXPIPE_GEMV8_CASE)
#undef JAXPIPE_GEMV8_CASE
  return cudaErrorNotSupported;
}

// Checks the operands' shapes against the target's meaning and launches. x is [1, K] ([1, 2K] for swiglu),
// w [L, K, N], scale [L, N], norm [L, K], residual and y [1, N].
template <int PRO, bool RES>
ffi::Error Run(cudaStream_t stream, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::BF16> x,
               const ffi::Buffer<ffi::BF16>* norm, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
               const ffi::Buffer<ffi::BF16>* residual, ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t tpr,
               int32_t unroll, int32_t split, float eps) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: expected x[M, K], w[L, K, N], scale[L, N], y[M, N]");
  }
  const int64_t m = xd[0], layers = wd[0], k = wd[1], n = wd[2];
  const int64_t x_width = PRO == kSwiglu ? 2 * k : k;
  if (xd[1] != x_width || sd[0] != layers || sd[1] != n || yd[0] != m || yd[1] != n) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: shapes of x, w, scale and y do not match");
  }
  if (norm != nullptr) {
    const auto nd = norm->dimensions();
    if (nd.size() != 2 || nd[0] != layers || nd[1] != k) {
      return ffi::Error::InvalidArgument("jaxpipe_gemv8: norm must be [L, K]");
    }
  }
  if (residual != nullptr) {
    const auto rd = residual->dimensions();
    if (rd.size() != 2 || rd[0] != m || rd[1] != n) {
      return ffi::Error::InvalidArgument("jaxpipe_gemv8: residual must be [M, N]");
    }
  }
  const bool fp8 = w.element_type() == ffi::F8E4M3FN;
  if (!fp8 && w.element_type() != ffi::S8) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: w must be int8 or float8_e4m3fn");
  }
  // One row only: at 2-4 rows this kernel measured slower than the Pallas one (H200, 2026-12-03).
  if (m != 1) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: built for one row, got M=" + std::to_string(m));
  }
  if (tpr <= 0 || split <= 0 || n % (16 * tpr) != 0 || k > INT32_MAX || n > INT32_MAX ||
      (k + split - 1) / split > kMaxSlice) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: N must be a multiple of 16 * tpr and K / split at most " +
                                       std::to_string(kMaxSlice));
  }
  Args a;
  a.layer = layer.typed_data();
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.untyped_data());
  a.norm = norm ? reinterpret_cast<const __nv_bfloat16*>(norm->untyped_data()) : nullptr;
  a.w = reinterpret_cast<const uint8_t*>(w.untyped_data());
  a.scale = scale.typed_data();
  a.residual = residual ? reinterpret_cast<const __nv_bfloat16*>(residual->untyped_data()) : nullptr;
  a.y = reinterpret_cast<__nv_bfloat16*>(y->untyped_data());
  a.K = int(k);
  a.N = int(n);
  a.eps = eps;
  const cudaError_t err = fp8 ? dispatch_tiling<true, PRO, RES>(tpr, unroll, split, stream, a)
                              : dispatch_tiling<false, PRO, RES>(tpr, unroll, split, stream, a);
  if (err == cudaErrorNotSupported) {
    return ffi::Error::InvalidArgument("jaxpipe_gemv8: no kernel for tpr=" + std::to_string(tpr) + ", unroll=" +
                                       std::to_string(unroll) + ", split=" + std::to_string(split));
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxpipe_gemv8: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

// The targets' entry points: the input row's prologue PRO, without or with a residual.
template <int PRO>
ffi::Error NoResidual(cudaStream_t s, ffi::Buffer<ffi::S32> l, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::F32> sc, ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t t, int32_t u,
                      int32_t c) {
  return Run<PRO, false>(s, l, x, nullptr, w, sc, nullptr, y, t, u, c, 0.0f);
}
template <int PRO>
ffi::Error WithResidual(cudaStream_t s, ffi::Buffer<ffi::S32> l, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
                        ffi::Buffer<ffi::F32> sc, ffi::Buffer<ffi::BF16> r, ffi::Result<ffi::Buffer<ffi::BF16>> y,
                        int32_t t, int32_t u, int32_t c) {
  return Run<PRO, true>(s, l, x, nullptr, w, sc, &r, y, t, u, c, 0.0f);
}
ffi::Error Norm(cudaStream_t s, ffi::Buffer<ffi::S32> l, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> nw,
                ffi::AnyBuffer w, ffi::Buffer<ffi::F32> sc, ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t t,
                int32_t u, int32_t c, float eps) {
  return Run<kRmsNorm, false>(s, l, x, &nw, w, sc, nullptr, y, t, u, c, eps);
}

}  // namespace

// The bindings' pieces: stream, layer and row first; then [norm,] w, scale; [residual]; then y and the tiling.
#define JAXPIPE_GEMV8_HEAD                                                                       \
  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::BF16>>()
#define JAXPIPE_GEMV8_WEIGHTS .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
#define JAXPIPE_GEMV8_RESIDUAL .Arg<ffi::Buffer<ffi::BF16>>()
#define JAXPIPE_GEMV8_TAIL \
  .Ret<ffi::Buffer<ffi::BF16>>().Attr<int32_t>("tpr").Attr<int32_t>("unroll").Attr<int32_t>("split")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8, NoResidual<kPlain>, JAXPIPE_GEMV8_HEAD JAXPIPE_GEMV8_WEIGHTS JAXPIPE_GEMV8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8Res, WithResidual<kPlain>,
                              JAXPIPE_GEMV8_HEAD JAXPIPE_GEMV8_WEIGHTS JAXPIPE_GEMV8_RESIDUAL JAXPIPE_GEMV8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8Norm, Norm,
                              JAXPIPE_GEMV8_HEAD.Arg<ffi::Buffer<ffi::BF16>>() JAXPIPE_GEMV8_WEIGHTS
                                  JAXPIPE_GEMV8_TAIL.Attr<float>("eps"),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8Swiglu, NoResidual<kSwiglu>,
                              JAXPIPE_GEMV8_HEAD JAXPIPE_GEMV8_WEIGHTS JAXPIPE_GEMV8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemv8SwigluRes, WithResidual<kSwiglu>,
                              JAXPIPE_GEMV8_HEAD JAXPIPE_GEMV8_WEIGHTS JAXPIPE_GEMV8_RESIDUAL JAXPIPE_GEMV8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
