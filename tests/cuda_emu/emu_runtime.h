/* A tiny host emulation of the CUDA launch model, for checking a .cu file's indexing on a machine
 * without a GPU (tests/test_cuda_emulated.py). The test rewrites `k<<<g, b, smem, s>>>(args)`
 * into `emu_launch(g, b, smem, s, [&] { k(args); })`, includes this header first, and compiles the
 * result with g++: every block and every thread then runs one after the other. Shared memory is
 * one host array (fine for kernels whose threads use disjoint slots and never __syncthreads).
 * It checks indexing, dtype handling and vector-load alignment, not concurrency or performance. */
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
namespace { float acc[1 << 16]; } /* the kernels' `extern __shared__ float acc[]` */
long emu_vec_accesses = 0;        /* vector loads/stores seen (the test requires some) */

template <typename F> void emu_launch(dim3 g, dim3 b, size_t smem, cudaStream_t, F f) {
  if (smem > sizeof(acc)) { printf("EMU: %zu bytes of shared memory requested\n", smem); abort(); }
  gridDim = g;
  blockDim = b;
  for (unsigned bz = 0; bz < g.z; bz++)
    for (unsigned by = 0; by < g.y; by++)
      for (unsigned bx = 0; bx < g.x; bx++)
        for (unsigned tz = 0; tz < b.z; tz++)
          for (unsigned ty = 0; ty < b.y; ty++)
            for (unsigned tx = 0; tx < b.x; tx++) {
              blockIdx = {bx, by, bz};
              threadIdx = {tx, ty, tz};
              f();
            }
}

static inline void emu_check_aligned(const void *p, size_t bytes) {
  emu_vec_accesses++;
  if ((uintptr_t)p % bytes) { printf("EMU: misaligned %zu-byte vector access at %p\n", bytes, p); abort(); }
}

#undef cudaGetLastError
#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(p) (*(p) = 0, cudaSuccess)
#define cudaSetDevice(d) cudaSuccess
