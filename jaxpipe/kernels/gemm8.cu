// jaxpipe_gemm8: one layer's decode matmul for 2-32 rows against a stack of 8-bit weights, on tensor cores.
//
//   y[m, n] = bf16((sum_k x[m, k] * q[layer, k, n]) * scale[layer, n])
//   jaxpipe_gemm8_res: residual[m, n] + y[m, n], in bf16 (the decode layer's residual adds after o and down)
//
// Operands as jaxpipe_gemv8's (gemv8.cu): q[L, K, N] int8 or float8_e4m3fn (row-major, N contiguous),
// scale[L, N] float32, x[M, K] and y[M, N] bfloat16, layer an int32 in device memory. The meaning is
// layer_matmul's: every 8-bit value is exact in bf16, so bf16 x bf16 products summed in float32 (mma.sync)
// give the float32 sums of the exact products, then one multiply by the column's scale and one rounding.
//
// Why: XLA converts the whole 8-bit weight to bf16 in memory before cuBLAS, and the Pallas (Triton) kernel
// reached ~1.5 TB/s at 32 rows on an H200 (int8 decode at batch 32 was 0.83x bf16's speed). Here the weight
// bytes go once from HBM to shared memory (cp.async, S stages in flight) and from there to registers, where
// they are converted and fed to mma.sync.m16n8k16 as its B operand. As measured (H200, BENCHMARKS.md
// 2026-12-06) that beats Pallas on gate|up-wide matmuls at 16-32 rows (1.1-1.3x) and loses elsewhere: a block
// moves only ~7-10 GB/s with 4 stages in flight, too little where a matmul has few column blocks.
//
// The layout trick: mma wants each B register to hold two consecutive k of one column, but q is N-contiguous.
// A dot product does not care about the order of k, nor the output about which column a lane computes, so
// each thread takes the k rows 4t..4t+3 of a 16-row step as the mma's logical k {2t, 2t+1, 2t+8, 2t+9}
// (t = lane % 4) and the NT contiguous bytes at column g * NT of its warp's strip as NT n-tiles' column g
// (g = lane / 4). x's A registers use the same k order (four contiguous bf16 of a row: one 8-byte load), so
// every load is a contiguous run, and a B register is two bytes of two rows, converted with byte permutes.
//
// Work: a block of 8 warps owns BN = 16 * NT columns (two warps across) and one of CS slices of K (the block's
// rank in a cluster of CS); its four warps down take the 16-row steps of each BK-row stage in turn. The four
// partial sums meet in shared memory in a fixed order, the CS blocks' sums through distributed shared memory
// in rank order (as gemv8): deterministic, no float32 partials in global memory, no second kernel.

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
constexpr int kWarpsN = 2;  // warps across a block's columns
constexpr int kWarpsK = 4;  // warps down its k rows

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int bytes = valid ? 16 : 0;  // 0: the 16 bytes are zero-filled (x's padding rows)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Byte SEL of two int8 words (sign bits already flipped: v + 128 unsigned) -> bf16x2 {lo: word a, hi: word b},
// exactly: each byte as the low mantissa byte of 2^23 minus 2^23 + 128 is v in float32, whose top half is v in
// bf16 (|v| <= 128 needs 8 significant bits).
template <int SEL>
__device__ __forceinline__ uint32_t int8_pair(uint32_t a, uint32_t b) {
  const float fa = __uint_as_float(__byte_perm(a, 0x4B000000u, 0x7650 | SEL)) - 8388736.0f;
  const float fb = __uint_as_float(__byte_perm(b, 0x4B000000u, 0x7650 | SEL)) - 8388736.0f;
  return __byte_perm(__float_as_uint(fa), __float_as_uint(fb), 0x7632);
}

// Byte SEL of two float8_e4m3fn words -> bf16x2, exactly: the hardware's e4m3x2 -> f16x2, then f16 -> f32,
// whose top halves are the bf16 values (e4m3 has 4 significant bits).
template <int SEL>
__device__ __forceinline__ uint32_t fp8_pair(uint32_t a, uint32_t b) {
  const uint32_t two = __byte_perm(a, b, SEL | ((SEL + 4) << 4));
  const __half2 h(__nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(two & 0xFFFFu), __NV_E4M3));
  const float2 f = __half22float2(h);
  return __byte_perm(__float_as_uint(f.x), __float_as_uint(f.y), 0x7632);
}

template <bool FP8, int SEL>
__device__ __forceinline__ uint32_t pair(uint32_t a, uint32_t b) {
  if constexpr (FP8) {
    return fp8_pair<SEL>(a, b);
  } else {
    return int8_pair<SEL>(a, b);
  }
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

using jaxpipe_cuda::cluster_load;

// Shared memory of a block: S stages of [BK, BN] weight bytes and [16 MT, BK] bf16 rows of x, reused at the
// end for the kWarpsK partial sums (float32, in fragment order).
template <int MT, int NT, int BK, int S>
struct Tile {
  static constexpr int kBN = kWarpsN * 8 * NT;
  static constexpr int kRows = 16 * MT;
  static constexpr int kWBytes = BK * kBN;
  static constexpr int kXBytes = kRows * BK * 2;
  static constexpr int kStage = kWBytes + kXBytes;
  static constexpr int kSums = kRows * kBN;  // floats of one block's sums
  static constexpr int kSmem = kStage * S > kWarpsK * kSums * 4 ? kStage * S : kWarpsK * kSums * 4;
};

// 16-byte chunks are stored XOR-swizzled so that the fragment loads below hit distinct banks: a weight row's
// chunk c at c ^ 2 ((row / 4) % 4) (the four rows a warp's lanes read at once are 4 apart), an x row's at
// c ^ 2 (row % 4).
__device__ __forceinline__ int w_swizzle(int row, int chunk) { return chunk ^ (((row >> 2) & 3) << 1); }
__device__ __forceinline__ int x_swizzle(int row, int chunk) { return chunk ^ ((row & 3) << 1); }

template <int MT, int NT, int BK, int S, bool FP8, bool RES>
__global__ void __launch_bounds__(kThreads, MT <= 2 ? 2 : 1)
    gemm8_kernel(const int32_t* __restrict__ layer_index, const __nv_bfloat16* __restrict__ x,
                 const uint8_t* __restrict__ w, const float* __restrict__ scale,
                 const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y, int M, int K, int N,
                 int CS, int rotate_k) {
  using T = Tile<MT, NT, BK, S>;
  constexpr int kStages = S;
  constexpr int BN = T::kBN;
  constexpr int kSteps = BK / (16 * kWarpsK);  // 16-row steps of a warp in one stage
  // NT 8 or 16: a row's NT bytes are half or all of a 16-byte chunk, and the swizzle stays inside a row.
  static_assert(BK % (16 * kWarpsK) == 0 && (NT == 8 || NT == 16), "tiling");
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wn = warp % kWarpsN, wk = warp / kWarpsN;
  const int g = lane / 4, t = lane % 4;
  const int rank = blockIdx.y;  // == the block's rank in its cluster (cluster dims 1 x CS)
  const int layer = *layer_index;
  const int n0 = blockIdx.x * BN;
  const int k_begin = rank * (K / CS);
  const int iters = K / CS / BK;
  // rotate_k: blocks start their walk down K at different stages (in a fixed order per block: the sum stays
  // deterministic), so that the blocks of a launch do not all read the same rows of x from L2 at once.
  const int rotate = rotate_k ? blockIdx.x % iters : 0;
  const uint8_t* wl = w + size_t(layer) * size_t(K) * size_t(N) + n0;

  auto load_stage = [&](int buf, int it) {
    unsigned char* sw = smem + buf * T::kStage;
    unsigned char* sx = sw + T::kWBytes;
    const int k0 = k_begin + (it + rotate) % iters * BK;
    constexpr int kWChunks = BN / 16;
#pragma unroll
    for (int c = tid; c < BK * kWChunks; c += kThreads) {
      const int row = c / kWChunks, ch = c % kWChunks;
      cp_async16(sw + row * BN + w_swizzle(row, ch) * 16, wl + size_t(k0 + row) * N + ch * 16, true);
    }
    constexpr int kXChunks = BK * 2 / 16;
#pragma unroll
    for (int c = tid; c < T::kRows * kXChunks; c += kThreads) {
      const int row = c / kXChunks, ch = c % kXChunks;
      const bool valid = row < M;
      cp_async16(sx + row * BK * 2 + x_swizzle(row, ch) * 16, x + size_t(valid ? row : 0) * K + k0 + ch * 8, valid);
    }
  };

  float acc[MT][NT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][j][c] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, s);
    cp_async_commit();
  }

  const int w_byte = wn * 8 * NT + g * NT;  // this lane's NT columns within the block's strip
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage it is in shared memory, and every warp is done with stage it - 1
    if (it + kStages - 1 < iters) load_stage((it + kStages - 1) % kStages, it + kStages - 1);
    cp_async_commit();
    const unsigned char* sw = smem + (it % kStages) * T::kStage;
    const unsigned char* sx = sw + T::kWBytes;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int kk = (ks * kWarpsK + wk) * 16;  // first row of this warp's 16-row step
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // rows g and g + 8 of the m-tile
          const int row = 16 * mt + g + 8 * h;
          const int byte = (kk + 4 * t) * 2;
          const uint2 v = *reinterpret_cast<const uint2*>(sx + row * BK * 2 + x_swizzle(row, byte / 16) * 16 +
                                                          byte % 16);
          a[mt][h] = v.x;      // logical k 2t, 2t + 1   (rows kk + 4t, + 1)
          a[mt][2 + h] = v.y;  // logical k 2t + 8, + 9  (rows kk + 4t + 2, + 3)
        }
      }
      uint32_t q[4][NT / 4];  // rows kk + 4t + i, NT bytes each
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = kk + 4 * t + i;
        const unsigned char* p = sw + row * BN + w_swizzle(row, w_byte / 16) * 16 + w_byte % 16;
        if constexpr (NT == 16) {
          const uint4 v = *reinterpret_cast<const uint4*>(p);
          q[i][0] = v.x, q[i][1] = v.y, q[i][2] = v.z, q[i][3] = v.w;
        } else {
          const uint2 v = *reinterpret_cast<const uint2*>(p);
          q[i][0] = v.x, q[i][1] = v.y;
        }
        if constexpr (!FP8) {
#pragma unroll
          for (int e = 0; e < NT / 4; ++e) q[i][e] ^= 0x80808080u;
        }
      }
#pragma unroll
      for (int e = 0; e < NT / 4; ++e) {
        uint32_t b[4][2];  // n-tiles 4e .. 4e + 3: {rows 0 | 1, rows 2 | 3}
        b[0][0] = pair<FP8, 0>(q[0][e], q[1][e]);
        b[0][1] = pair<FP8, 0>(q[2][e], q[3][e]);
        b[1][0] = pair<FP8, 1>(q[0][e], q[1][e]);
        b[1][1] = pair<FP8, 1>(q[2][e], q[3][e]);
        b[2][0] = pair<FP8, 2>(q[0][e], q[1][e]);
        b[2][1] = pair<FP8, 2>(q[2][e], q[3][e]);
        b[3][0] = pair<FP8, 3>(q[0][e], q[1][e]);
        b[3][1] = pair<FP8, 3>(q[2][e], q[3][e]);
#pragma unroll
        for (int s = 0; s < 4; ++s)
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) mma_bf16(acc[mt][4 * e + s], a[mt], b[s][0], b[s][1]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the stages' memory becomes the partial sums

  // The kWarpsK partial sums in fragment order (lane-contiguous float4s: no bank conflicts), then their sum
  // in warp order into the first.
  float4* part = reinterpret_cast<float4*>(smem);
  constexpr int kFrag = kWarpsN * MT * NT * 32;  // float4s of one warp row's sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT; ++j)
      part[wk * kFrag + ((wn * MT + mt) * NT + j) * 32 + lane] =
          make_float4(acc[mt][j][0], acc[mt][j][1], acc[mt][j][2], acc[mt][j][3]);
  __syncthreads();
  for (int e = tid; e < kFrag; e += kThreads) {
    float4 s = part[e];
#pragma unroll
    for (int r = 1; r < kWarpsK; ++r) {
      const float4 v = part[r * kFrag + e];
      s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
    }
    part[e] = s;
  }

  // The cluster's sum over its CS slices of K: rank r adds up columns [r, r + 1) * BN / CS of every rank's sums,
  // in rank order, and writes those columns of the rows < M (consecutive threads, consecutive columns).
  cg::cluster_group cluster = cg::this_cluster();
  cluster.sync();
  const float* sums = reinterpret_cast<const float*>(smem);
  const int own = BN / CS;
  for (int e = tid; e < M * own; e += kThreads) {
    const int m = e / own, c = rank * own + e % own;
    // (m, c) -> its fragment slot: m-tile, lane (g, t), register; column c = wn 8 NT + (2t + reg % 2) NT + j.
    const int mt = m / 16, gg = m % 8, hi = (m % 16) / 8;
    const int cw = c / (8 * NT), l = (c % (8 * NT)) / NT, j = c % NT;
    const int slot = (((cw * MT + mt) * NT + j) * 32 + gg * 4 + l / 2) * 4 + hi * 2 + l % 2;
    float s = 0.0f;
    for (int r = 0; r < CS; ++r) s += cluster_load(&sums[slot], r);
    const size_t at = size_t(m) * N + n0 + c;
    const float out = s * scale[size_t(layer) * N + n0 + c];
    if constexpr (RES) {  // residual + bf16(y), rounded again: the model's two ops
      y[at] = __float2bfloat16_rn(__bfloat162float(residual[at]) + __bfloat162float(__float2bfloat16_rn(out)));
    } else {
      y[at] = __float2bfloat16_rn(out);
    }
  }
  cluster.sync();  // no block exits while another still reads its shared memory
}

struct Args {
  const int32_t* layer;
  const __nv_bfloat16* x;
  const uint8_t* w;
  const float* scale;
  const __nv_bfloat16* residual;
  __nv_bfloat16* y;
  int M, K, N, CS, rotate;
};

template <int MT, int NT, int BK, int S, bool FP8, bool RES>
cudaError_t launch(cudaStream_t stream, const Args& a) {
  using T = Tile<MT, NT, BK, S>;
  auto kernel = gemm8_kernel<MT, NT, BK, S, FP8, RES>;
  // Above 48 KB, dynamic shared memory must be asked for (once per kernel; cheap to repeat).
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmem);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(a.N / T::kBN, a.CS, 1);
  config.blockDim = dim3(kThreads, 1, 1);
  config.dynamicSmemBytes = T::kSmem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = a.CS;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, a.layer, a.x, a.w, a.scale, a.residual, a.y, a.M, a.K, a.N, a.CS,
                            a.rotate);
}

// The tilings built: (m-tiles of 16 rows, n-tiles of 8 columns a warp, rows a stage, stages). Keep in step
// with GEMM_TILINGS in cuda_gemv.py. The first two are the ones layer_matmul uses (gemm_tiling_for); the deeper
// pipelines after them are built for tools/bench_cuda_gemm.py and not measured yet.
#define JAXPIPE_GEMM8_TILINGS(X) \
  X(1, 8, 128, 4)                \
  X(2, 8, 128, 4)                \
  X(1, 8, 64, 8)                 \
  X(2, 8, 64, 8)                 \
  X(2, 8, 128, 6)

template <bool FP8, bool RES>
cudaError_t dispatch(int mt, int nt, int bk, int stages, cudaStream_t s, const Args& a) {
#define JAXPIPE_GEMM8_CASE(A, B, C, D) \
  if (mt == A && nt == B && bk == C && stages == D) return launch<A, B, C, D, FP8, RES>(s, a);
  JAXPIPE_GEMM8_TILINGS(JAXPIPE_GEMM8_CASE)
#undef JAXPIPE_GEMM8_CASE
  return cudaErrorNotSupported;
}

// Checks the operands' shapes and the tiling, and launches: x [M, K], w [L, K, N], scale [L, N], residual and
// y [M, N].
template <bool RES>
ffi::Error Run(cudaStream_t stream, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
               ffi::Buffer<ffi::F32> scale, const ffi::Buffer<ffi::BF16>* residual,
               ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t mt, int32_t nt, int32_t bk, int32_t stages,
               int32_t split, int32_t rotate) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || sd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("jaxpipe_gemm8: expected x[M, K], w[L, K, N], scale[L, N], y[M, N]");
  }
  const int64_t m = xd[0], layers = wd[0], k = wd[1], n = wd[2];
  if (xd[1] != k || sd[0] != layers || sd[1] != n || yd[0] != m || yd[1] != n) {
    return ffi::Error::InvalidArgument("jaxpipe_gemm8: shapes of x, w, scale and y do not match");
  }
  if (residual != nullptr) {
    const auto rd = residual->dimensions();
    if (rd.size() != 2 || rd[0] != m || rd[1] != n) {
      return ffi::Error::InvalidArgument("jaxpipe_gemm8: residual must be [M, N]");
    }
  }
  const bool fp8 = w.element_type() == ffi::F8E4M3FN;
  if (!fp8 && w.element_type() != ffi::S8) {
    return ffi::Error::InvalidArgument("jaxpipe_gemm8: w must be int8 or float8_e4m3fn");
  }
  const int64_t bn = kWarpsN * 8 * nt;
  if (m < 1 || m > 16 * mt || split < 1 || split > 8 || n % bn != 0 || k % (int64_t(split) * bk) != 0 ||
      k > INT32_MAX || n > INT32_MAX || bn % split != 0) {
    return ffi::Error::InvalidArgument("jaxpipe_gemm8: M=" + std::to_string(m) + ", K=" + std::to_string(k) +
                                       ", N=" + std::to_string(n) + " do not fit the tiling mt=" +
                                       std::to_string(mt) + ", nt=" + std::to_string(nt) + ", bk=" +
                                       std::to_string(bk) + ", split=" + std::to_string(split));
  }
  Args a;
  a.layer = layer.typed_data();
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.untyped_data());
  a.w = reinterpret_cast<const uint8_t*>(w.untyped_data());
  a.scale = scale.typed_data();
  a.residual = residual ? reinterpret_cast<const __nv_bfloat16*>(residual->untyped_data()) : nullptr;
  a.y = reinterpret_cast<__nv_bfloat16*>(y->untyped_data());
  a.M = int(m), a.K = int(k), a.N = int(n), a.CS = split, a.rotate = rotate;
  const cudaError_t err = fp8 ? dispatch<true, RES>(mt, nt, bk, stages, stream, a)
                              : dispatch<false, RES>(mt, nt, bk, stages, stream, a);
  if (err == cudaErrorNotSupported) {
    return ffi::Error::InvalidArgument("jaxpipe_gemm8: no kernel for mt=" + std::to_string(mt) + ", nt=" +
                                       std::to_string(nt) + ", bk=" + std::to_string(bk) + ", stages=" +
                                       std::to_string(stages));
  }
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jaxpipe_gemm8: ") + cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

ffi::Error Plain(cudaStream_t s, ffi::Buffer<ffi::S32> l, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
                 ffi::Buffer<ffi::F32> sc, ffi::Result<ffi::Buffer<ffi::BF16>> y, int32_t mt, int32_t nt, int32_t bk,
                 int32_t st, int32_t split, int32_t rot) {
  return Run<false>(s, l, x, w, sc, nullptr, y, mt, nt, bk, st, split, rot);
}
ffi::Error Residual(cudaStream_t s, ffi::Buffer<ffi::S32> l, ffi::Buffer<ffi::BF16> x, ffi::AnyBuffer w,
                    ffi::Buffer<ffi::F32> sc, ffi::Buffer<ffi::BF16> r, ffi::Result<ffi::Buffer<ffi::BF16>> y,
                    int32_t mt, int32_t nt, int32_t bk, int32_t st, int32_t split, int32_t rot) {
  return Run<true>(s, l, x, w, sc, &r, y, mt, nt, bk, st, split, rot);
}

}  // namespace

// The bindings: stream, layer, x, w, scale, [residual], then y and the tiling.
#define JAXPIPE_GEMM8_HEAD                                                                                        \
  ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>().Arg<ffi::Buffer<ffi::S32>>().Arg<ffi::Buffer<ffi::BF16>>() \
      .Arg<ffi::AnyBuffer>().Arg<ffi::Buffer<ffi::F32>>()
#define JAXPIPE_GEMM8_TAIL \
  .Ret<ffi::Buffer<ffi::BF16>>().Attr<int32_t>("mt").Attr<int32_t>("nt").Attr<int32_t>("bk").Attr<int32_t>("stages") \
      .Attr<int32_t>("split").Attr<int32_t>("rotate")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemm8, Plain, JAXPIPE_GEMM8_HEAD JAXPIPE_GEMM8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxpipeGemm8Res, Residual,
                              JAXPIPE_GEMM8_HEAD.Arg<ffi::Buffer<ffi::BF16>>() JAXPIPE_GEMM8_TAIL,
                              {ffi::Traits::kCmdBufferCompatible});
