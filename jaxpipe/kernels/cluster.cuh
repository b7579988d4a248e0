// Device helpers shared by gemv8.cu and gemm8.cu (jaxpipe's CUDA kernels; built by cuda_gemv.py).
#pragma once

#include <cstdint>

namespace jaxpipe_cuda {

// Another cluster rank's float at the same shared-memory offset as p. Volatile asm, so that nvcc does not hoist
// the ranks' addresses (mapa) above a kernel's main loop, where 8 live 64-bit addresses cost 16-24 registers.
__device__ __forceinline__ float cluster_load(const float* p, int rank) {
  const uint32_t local = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  uint32_t remote;
  float v;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote) : "memory");
  return v;
}

}  // namespace jaxpipe_cuda
