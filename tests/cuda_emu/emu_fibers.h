/* A host emulation of the CUDA execution model for kernels that use warp collectives (ldmatrix,
 * mma.sync, shuffles), block barriers, named barriers and cp.async: every CUDA thread of a block is
 * a fiber (a user-level thread with its own stack) and the fibers of a block switch cooperatively at
 * each synchronisation point. Blocks run one after another. Used by tests/test_cuda_emulated.py
 * for csrc/attn_*_cuda.cu; the runtime's non-template part is emu_fibers.cpp.
 *
 * Why fibers and not one pthread per CUDA thread (emu_threads.h): a warp collective needs all 32
 * lanes to reach it, i.e. 32 thread switches. With kernel threads and condition variables on 2
 * cores that costs ~130 us per warp collective (measured), which makes an attention tile take
 * seconds; a fiber switch costs ~20 ns, so a collective costs ~1 us and the tests run in minutes.
 *
 * Semantics (what the emulation checks):
 *  - __syncthreads: all live (not exited) threads of the block; named barriers (bar.sync /
 *    bar.arrive id, n) count n arrivals. A block whose threads all wait with no barrier able to
 *    complete is reported as a deadlock (with each thread's wait reason) and aborts.
 *  - warp collectives (emu_warp_op: ldmatrix, mma, shuffles, __syncwarp): every live lane of the
 *    warp must call the same collective; the last lane to arrive computes all lanes' results.
 *    Lanes in different collectives, or a lane exiting while its warp waits, abort with a message.
 *  - scheduling is deterministic and greedy: the lowest-numbered runnable thread runs until it
 *    blocks (every other block: the highest-numbered), so one warp runs as far ahead as its
 *    barriers allow. A missing __syncthreads then shows up as a warp reading shared memory that
 *    other warps have not written yet (or have already overwritten), i.e. as wrong results.
 *  - dynamic shared memory starts every block filled with 0xFF bytes (NaN as float16/bfloat16/
 *    float32: reading an element nobody wrote poisons the result); its end is followed by an
 *    inaccessible page (reads past the requested size crash); a launch asking for more than 48 KB
 *    without cudaFuncSetAttribute allowing it, or more than the device's opt-in limit, aborts.
 *  - the device (EMU_DEVICE): h100 (default) or a100, i.e. their shared-memory limits, SM counts
 *    and compute capabilities as cudaDeviceGetAttribute reports them.
 *  - cp.async: the destination turns to NaN bytes at issue and receives the data only when a
 *    cp.async.wait_group retires the copy's group (groups older than the newest N), so reading a
 *    tile before its wait, or issuing a copy into a buffer that another warp still reads, poisons
 *    the results; both addresses must be aligned and the destination inside dynamic shared memory.
 * Speed is not emulated, nor are memory-model races between threads outside the sync points. */
#ifndef EMU_FIBERS_H
#define EMU_FIBERS_H
#include <cuda_runtime.h>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __launch_bounds__
#define __launch_bounds__(...)

/* ---- CUDA built-ins ---- */
extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
extern unsigned char *emu_dyn_smem; /* `extern __shared__` arrays (the test rewrites them to this) */

[[noreturn]] void emu_fail(const char *fmt, ...);

/* ---- the runtime (emu_fibers.cpp) ---- */
constexpr int EMU_MAX_THREADS = 1024, EMU_SLOT = 64; /* bytes per lane and collective, in and out */
constexpr size_t EMU_SMEM_MAX = 227 * 1024;          /* the largest opt-in limit of the emulated devices */
constexpr size_t EMU_SMEM_DEFAULT = 48 * 1024;       /* without cudaFuncSetAttribute */

struct EmuCopy {
  void *dst;
  int bytes;
  unsigned group;
  alignas(16) unsigned char data[16];
};

struct EmuFiber {
  void *sp = nullptr; /* saved stack pointer (or ucontext, see emu_fibers.cpp) */
  void *ctx = nullptr;
  unsigned char *stack = nullptr;
  uint3 idx;
  unsigned tid = 0;
  int state = 0; /* 0 runnable, 1 blocked, 2 exited */
  const char *what = nullptr;
  std::vector<EmuCopy> copies; /* cp.async in flight, issue order */
  unsigned groups = 0;         /* cp.async groups committed so far */
};

struct EmuWarp {
  int arrived = 0, lanes = 0, live = 0;
  const char *what = nullptr;
  alignas(16) unsigned char in[32][EMU_SLOT];
  alignas(16) unsigned char out[32][EMU_SLOT];
};

extern EmuFiber *emu_cur;
extern EmuWarp emu_warps[EMU_MAX_THREADS / 32];

void emu_block(const char *what);     /* the current fiber waits; returns once woken */
void emu_wake_warp(int w, int except); /* wake the lanes of warp w (all blocked in its collective) */
void emu_syncthreads();
void emu_bar_sync(int id, int n);
void emu_bar_arrive(int id, int n);
void emu_run_grid(dim3 g, dim3 b, size_t smem, const void *kernel, const std::function<void()> &body);
void emu_func_set_attr(const void *kernel, int attr, int value);
size_t emu_smem_bytes(); /* dynamic shared memory of the running launch */

static inline void __syncthreads() { emu_syncthreads(); }
static inline void __threadfence_block() {}
static inline void __threadfence() {}

/* A warp collective: each lane passes `in`; when the last live lane of the warp arrives,
 * fn(const In *ins, Out *outs) computes every lane's result (ins/outs indexed by lane). */
template <typename Out, typename In, typename F> static inline Out emu_warp_op(const char *what, const In &in, F fn) {
  static_assert(sizeof(In) <= EMU_SLOT && sizeof(Out) <= EMU_SLOT, "collective operand too large");
  const int w = (int)(emu_cur->tid / 32), lane = (int)(emu_cur->tid % 32);
  EmuWarp &wp = emu_warps[w];
  if (wp.live != wp.lanes) emu_fail("%s: warp %d has exited lanes (partial warps are not emulated)", what, w);
  if (wp.arrived == 0)
    wp.what = what;
  else if (wp.what != what && strcmp(wp.what, what))
    emu_fail("warp %d: lane %d calls %s while other lanes wait in %s (divergent warp collective)", w, lane, what,
             wp.what);
  memcpy(wp.in[lane], &in, sizeof(In));
  if (++wp.arrived == wp.lanes) {
    In ins[32];
    Out outs[32];
    for (int l = 0; l < wp.lanes; l++) memcpy(&ins[l], wp.in[l], sizeof(In));
    fn((const In *)ins, outs);
    for (int l = 0; l < wp.lanes; l++) memcpy(wp.out[l], &outs[l], sizeof(Out));
    wp.arrived = 0;
    emu_wake_warp(w, lane);
  } else {
    emu_block(what);
  }
  Out r;
  memcpy(&r, wp.out[lane], sizeof(Out));
  return r;
}

static inline void emu_full_mask(unsigned mask, const char *what) {
  if (mask != 0xffffffffu) emu_fail("%s: mask 0x%x (only full-warp masks are emulated)", what, mask);
}
template <typename T> struct EmuShfl {
  T v;
  int arg;
};
/* mode 0: xor, 1: index, 2: down, 3: up; width as in CUDA (lanes grouped in segments of width) */
template <typename T> static inline T emu_shfl(int mode, unsigned mask, T v, int arg, int width, const char *what) {
  emu_full_mask(mask, what);
  return emu_warp_op<T>(what, EmuShfl<T>{v, arg}, [mode, width](const EmuShfl<T> *in, T *out) {
    for (int l = 0; l < 32; l++) {
      const int seg = l & ~(width - 1), a = in[l].arg;
      int src = mode == 0 ? l ^ a : mode == 1 ? seg + (a & (width - 1)) : mode == 2 ? l + a : l - a;
      if (src < seg || src >= seg + width) src = l;
      out[l] = in[src].v;
    }
  });
}
#define __shfl_xor_sync(mask, v, o, ...) emu_shfl(0, (mask), (v), (o), emu_width(__VA_ARGS__ + 0), "__shfl_xor_sync")
#define __shfl_sync(mask, v, s, ...) emu_shfl(1, (mask), (v), (s), emu_width(__VA_ARGS__ + 0), "__shfl_sync")
#define __shfl_down_sync(mask, v, d, ...) emu_shfl(2, (mask), (v), (d), emu_width(__VA_ARGS__ + 0), "__shfl_down_sync")
#define __shfl_up_sync(mask, v, d, ...) emu_shfl(3, (mask), (v), (d), emu_width(__VA_ARGS__ + 0), "__shfl_up_sync")
static inline int emu_width(int w) { return w ? w : 32; }

static inline unsigned __ballot_sync(unsigned mask, int pred) {
  emu_full_mask(mask, "__ballot_sync");
  return emu_warp_op<unsigned>("__ballot_sync", pred != 0, [](const bool *in, unsigned *out) {
    unsigned b = 0;
    for (int l = 0; l < 32; l++) b |= (unsigned)in[l] << l;
    for (int l = 0; l < 32; l++) out[l] = b;
  });
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
static inline void __syncwarp(unsigned mask = 0xffffffffu) {
  emu_full_mask(mask, "__syncwarp");
  emu_warp_op<char>("__syncwarp", (char)0, [](const char *, char *out) { memset(out, 0, 32); });
}

/* ---- shared-memory addresses: 32-bit offsets into the launch's dynamic shared memory ---- */
static inline unsigned char *emu_smem_at(uint32_t a) { return emu_dyn_smem + a; }
size_t emu_cvta_shared(const void *p);
#define __cvta_generic_to_shared(p) emu_cvta_shared(p)

/* ---- cp.async (the attention's emulated PTX header maps its wrappers onto these) ---- */
void emu_cp_async(void *dst, const void *src, int bytes, int src_bytes);
void emu_cp_async_commit();
void emu_cp_async_wait(int n); /* retire the committed groups older than the newest n */
void emu_check_smem(const void *p, size_t bytes, const char *what);

/* ---- device math without a host version in the CUDA headers ---- */
static inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
static inline float __fdividef(float a, float b) { return a / b; }
/* glibc's math.h declares __sincosf / __expf / __logf but does not export them: renamed */
static inline void emu_sincosf(float x, float *s, float *c) { *s = sinf(x), *c = cosf(x); }
static inline float emu_expf(float x) { return expf(x); }
static inline float emu_logf(float x) { return logf(x); }
#define __sincosf emu_sincosf
#define __expf emu_expf
#define __logf emu_logf
static inline float __frcp_rn(float x) { return 1.f / x; }
static inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
static inline int __float_as_int(float f) { int x; memcpy(&x, &f, 4); return x; }
static inline unsigned __float_as_uint(float f) { unsigned x; memcpy(&x, &f, 4); return x; }
static inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
template <typename T> static inline T __ldg(const T *p) { return *p; }
template <typename T> static inline T __ldcs(const T *p) { return *p; }
template <typename T> static inline void __stcs(T *p, T v) { *p = v; }

/* ---- launches: the test rewrites `k<<<cfg>>>(args)` to emu_launch_k((const void *)(k), cfg, [&] { k(args); }) */
template <typename F> void emu_launch_k(const void *k, dim3 g, dim3 b, size_t smem, cudaStream_t, F f) {
  emu_run_grid(g, b, smem, k, std::function<void()>(f));
}
template <typename F> void emu_launch_k(const void *k, dim3 g, dim3 b, size_t smem, F f) {
  emu_run_grid(g, b, smem, k, std::function<void()>(f));
}
template <typename F> void emu_launch_k(const void *k, dim3 g, dim3 b, F f) {
  emu_run_grid(g, b, 0, k, std::function<void()>(f));
}

/* ---- the runtime API the launchers use ---- */
#undef cudaGetLastError
#define cudaGetLastError() cudaSuccess
#define cudaPeekAtLastError() cudaSuccess
#define cudaGetErrorString(e) "emulated CUDA error"
#define cudaGetDevice(p) (*(p) = 0, cudaSuccess)
#define cudaSetDevice(d) cudaSuccess
#define cudaMemsetAsync(p, v, n, s) (memset((p), (v), (n)), cudaSuccess)
/* the emulated device's attributes: EMU_DEVICE=h100 (default: sm_90, 227 KB opt-in shared memory per
 * block, 228 KB per SM) or a100 (sm_80, 163 / 164 KB); unknown attributes abort */
int emu_attr(cudaDeviceAttr a);
#define cudaDeviceGetAttribute(p, attr, dev) (*(p) = emu_attr(attr), cudaSuccess)
#define cudaFuncSetAttribute(k, attr, v) (emu_func_set_attr((const void *)(k), (int)(attr), (int)(v)), cudaSuccess)
#define cudaOccupancyMaxActiveBlocksPerMultiprocessor(p, k, threads, smem) (*(p) = 1, cudaSuccess)
#define cudaStreamSynchronize(s) cudaSuccess
#define cudaDeviceSynchronize() cudaSuccess
#define cudaMemcpyAsync(dst, src, n, kind, s) (memcpy((dst), (src), (n)), cudaSuccess)
#endif
