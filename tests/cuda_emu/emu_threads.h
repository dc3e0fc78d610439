/* A host emulation of the CUDA launch model with real concurrency inside a block, for checking
 * csrc/pdl_cuda.cu on a machine without a GPU (tests/test_cuda_emulated.py). Unlike
 * emu_runtime.h (sequential threads), every CUDA thread of a block is a host thread, so
 * __syncthreads (a block barrier), warp shuffles (a barrier-synchronised exchange) and block-wide
 * __shared__ arrays (the test rewrites `__shared__` to `static`: one block runs at a time) behave
 * as on the device. Blocks run one after another. The test rewrites `k<<<g, b, smem, s>>>(args)` to
 * `emu_launch(g, b, smem, s, [&] { k(args); })` and includes this header first.
 * It checks indexing, reductions, synchronisation and dtype handling, not speed. */
#include <cuda_runtime.h>
#include <pthread.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>

#undef __launch_bounds__
#define __launch_bounds__(...)
static inline float __int_as_float(unsigned x) { float f; memcpy(&f, &x, sizeof f); return f; }

static inline float __fmul_rn(float a, float b) { return a * b; }  /* the test compiles with -ffp-contract=off */

thread_local uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
alignas(16) static unsigned char emu_dyn_smem[64 * 1024]; /* `extern __shared__` arrays */
long emu_vec_accesses = 0;

/* a reusable barrier for the threads of the running block */
struct EmuBarrier {
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
  unsigned count = 0, waiting = 0, phase = 0;
  void wait() {
    pthread_mutex_lock(&mu);
    unsigned ph = phase;
    if (++waiting == count) {
      waiting = 0;
      phase++;
      pthread_cond_broadcast(&cv);
    } else {
      while (ph == phase) pthread_cond_wait(&cv, &mu);
    }
    pthread_mutex_unlock(&mu);
  }
};
static EmuBarrier emu_bar;

static inline void __syncthreads() { emu_bar.wait(); }

/* Shuffles: every thread of the block takes part (pdl_cuda.cu only shuffles in block-uniform code),
 * so a block barrier around a shared exchange slot gives warp-shuffle semantics. */
template <typename T> static T emu_shfl_xor(T v, int o) {
  static T slot[1024];
  const unsigned t = threadIdx.x;
  slot[t] = v;
  emu_bar.wait();
  const unsigned src = (t & ~31u) | ((t & 31u) ^ (unsigned)o);
  T r = slot[src < blockDim.x ? src : t];
  emu_bar.wait();
  return r;
}
#define __shfl_xor_sync(mask, v, o) emu_shfl_xor((v), (o))

template <typename T> static inline T __ldg(const T *p) { return *p; }
static inline uint4 __ldcs(const uint4 *p) {
  emu_vec_accesses++;
  if ((uintptr_t)p % 16) { printf("EMU: misaligned 16-byte load at %p\n", (const void *)p); abort(); }
  return *p;
}
static inline void __stcs(uint4 *p, uint4 v) {
  emu_vec_accesses++;
  if ((uintptr_t)p % 16) { printf("EMU: misaligned 16-byte store at %p\n", (void *)p); abort(); }
  *p = v;
}

static inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline unsigned long long atomicExch(unsigned long long *p, unsigned long long v) {
  return __atomic_exchange_n(p, v, __ATOMIC_RELAXED);
}

struct EmuThreadArg {
  const std::function<void()> *f;
  unsigned tx;
  uint3 b;
};
static void *emu_thread(void *a) {
  EmuThreadArg *t = (EmuThreadArg *)a;
  threadIdx = {t->tx, 0, 0};
  blockIdx = t->b;
  (*t->f)();
  return nullptr;
}

template <typename F> void emu_launch(dim3 g, dim3 b, size_t smem, cudaStream_t, F f) {
  if (smem > sizeof(emu_dyn_smem)) { printf("EMU: %zu bytes of shared memory requested\n", smem); abort(); }
  if (b.y != 1 || b.z != 1 || g.y != 1 || g.z != 1 || b.x > 1024) { printf("EMU: unsupported launch shape\n"); abort(); }
  gridDim = g;
  blockDim = b;
  std::function<void()> fn = f;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  static pthread_t th[1024];
  static EmuThreadArg args[1024];
  for (unsigned bx = 0; bx < g.x; bx++) {
    emu_bar.count = b.x;
    for (unsigned t = 0; t < b.x; t++) {
      args[t] = {&fn, t, {bx, 0, 0}};
      if (pthread_create(&th[t], &attr, emu_thread, &args[t])) { printf("EMU: pthread_create failed\n"); abort(); }
    }
    for (unsigned t = 0; t < b.x; t++) pthread_join(th[t], nullptr);
  }
  pthread_attr_destroy(&attr);
}

#undef cudaGetLastError
#define cudaGetLastError() cudaSuccess
#define cudaGetDevice(p) (*(p) = 0, cudaSuccess)
#define cudaSetDevice(d) cudaSuccess
#define cudaMemsetAsync(p, v, n, s) (memset((p), (v), (n)), cudaSuccess)
/* A small device: 2 SMs (few blocks) and 10 KB of shared memory per block, so the PDL loss kernel
 * (half of that, less 2 KB, per block) keeps short rows whole (V = 1031 at 2 bytes), long rows in
 * part (1031 x 4 bytes, 8197) and re-reads the rest. */
static inline int emu_attr(cudaDeviceAttr a) {
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return 10 * 1024;
    default: return 2;
  }
}
#define cudaDeviceGetAttribute(p, attr, dev) (*(p) = emu_attr(attr), cudaSuccess)
#define cudaFuncSetAttribute(...) cudaSuccess
