/* The runtime of emu_fibers.h: fibers, the per-block scheduler, barriers, cp.async and shared
 * memory. One OS thread runs everything: blocks one after another, the fibers (CUDA threads) of a
 * block interleaved at their synchronisation points. */
#include "emu_fibers.h"
#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>
#include <cstdarg>
#include <algorithm>
#include <map>
#include <string>

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
unsigned char *emu_dyn_smem;
EmuFiber *emu_cur;
EmuWarp emu_warps[EMU_MAX_THREADS / 32];

/* the running kernel's name (the test links with -rdynamic, so dladdr finds the symbol) */
static const void *cur_kernel;
static const char *kernel_name(const void *k = cur_kernel) {
  static std::string name;
  Dl_info info;
  name = "?";
  if (k && dladdr(k, &info) && info.dli_sname) {
    int st = 0;
    char *dm = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &st);
    name = st == 0 && dm ? dm : info.dli_sname;
    free(dm);
  }
  return name.c_str();
}

void emu_fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("EMU: %s, block (%u,%u,%u) thread %u: ", kernel_name(), blockIdx.x, blockIdx.y, blockIdx.z,
         emu_cur ? emu_cur->tid : 0u);
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  fflush(stdout);
  abort();
}

/* ---- context switch ---- */
static constexpr size_t kStack = 256 * 1024, kPage = 4096;
static void *sched_sp; /* the scheduler's saved context */
static void fiber_main();

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)
/* emu_ctx_switch(save, load): push the callee-saved registers and the SSE / x87 control words,
 * store rsp in *save, switch to the stack load and pop the same frame from it. */
extern "C" void emu_ctx_switch(void **save, void *load);
asm(R"(
.text
.p2align 4
.globl emu_ctx_switch
.hidden emu_ctx_switch
.type emu_ctx_switch, @function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size emu_ctx_switch, .-emu_ctx_switch
)");
static void fiber_init(EmuFiber *f) {
  /* a frame that emu_ctx_switch pops: control words, six registers, then "returns" into fiber_main
   * with rsp = top - 8 (the ABI's alignment at a function's entry) */
  uint64_t *sp = (uint64_t *)(f->stack + kStack) - 10;
  memset(sp, 0, 10 * sizeof(uint64_t));
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  memcpy(sp, &mxcsr, 4);
  memcpy((char *)sp + 4, &fpucw, 2);
  sp[8] = (uint64_t)(uintptr_t)&fiber_main;
  f->sp = sp;
}
static inline void to_fiber(EmuFiber *f) { emu_ctx_switch(&sched_sp, f->sp); }
static inline void to_sched(EmuFiber *f) { emu_ctx_switch(&f->sp, sched_sp); }
#else
#include <ucontext.h>
static ucontext_t sched_ctx;
static void fiber_init(EmuFiber *f) {
  if (!f->ctx) f->ctx = new ucontext_t;
  ucontext_t *c = (ucontext_t *)f->ctx;
  getcontext(c);
  c->uc_stack.ss_sp = f->stack;
  c->uc_stack.ss_size = kStack;
  c->uc_link = nullptr;
  makecontext(c, fiber_main, 0);
}
static inline void to_fiber(EmuFiber *f) { swapcontext(&sched_ctx, (ucontext_t *)f->ctx); }
static inline void to_sched(EmuFiber *f) { swapcontext((ucontext_t *)f->ctx, &sched_ctx); }
#endif

/* ---- per-block state ---- */
static EmuFiber fibers[EMU_MAX_THREADS];
static unsigned nthreads, nlive, nexited;
static uint64_t runnable[EMU_MAX_THREADS / 64];
static const std::function<void()> *body;
struct Bar {
  unsigned arrived = 0;
  std::vector<EmuFiber *> waiting;
};
static Bar block_bar, named_bar[16];
static int sched_desc; /* 0: lowest runnable thread first, 1: highest first */

static inline void set_runnable(EmuFiber *f) {
  f->state = 0;
  runnable[f->tid / 64] |= 1ull << (f->tid % 64);
}

void emu_block(const char *what) {
  EmuFiber *f = emu_cur;
  f->state = 1;
  f->what = what;
  runnable[f->tid / 64] &= ~(1ull << (f->tid % 64));
  to_sched(f);
}

void emu_wake_warp(int w, int except) {
  const int n = emu_warps[w].lanes;
  for (int l = 0; l < n; l++)
    if (l != except) set_runnable(&fibers[w * 32 + l]);
}

static void release(Bar &b) {
  for (EmuFiber *f : b.waiting) set_runnable(f);
  b.waiting.clear();
  b.arrived = 0;
}

void emu_syncthreads() {
  if (++block_bar.arrived == nlive) {
    release(block_bar);
    return;
  }
  block_bar.waiting.push_back(emu_cur);
  emu_block("__syncthreads");
}

static Bar &named(int id, int n, const char *what) {
  if (id < 0 || id >= 16 || n <= 0 || n % 32 || (unsigned)n > nthreads)
    emu_fail("%s(%d, %d): bad barrier id or thread count (block of %u threads)", what, id, n, nthreads);
  return named_bar[id];
}
void emu_bar_sync(int id, int n) {
  Bar &b = named(id, n, "bar.sync");
  if ((int)++b.arrived == n) {
    release(b);
    return;
  }
  b.waiting.push_back(emu_cur);
  emu_block("bar.sync");
}
void emu_bar_arrive(int id, int n) {
  Bar &b = named(id, n, "bar.arrive");
  if ((int)++b.arrived == n) release(b);
}

static void fiber_exit() {
  EmuFiber *f = emu_cur;
  EmuWarp &w = emu_warps[f->tid / 32];
  if (w.arrived) emu_fail("exits while lanes of its warp wait in %s", w.what);
  f->state = 2;
  f->copies.clear(); /* copies still in flight when a thread exits never matter to the block */
  runnable[f->tid / 64] &= ~(1ull << (f->tid % 64));
  w.live--;
  nlive--;
  nexited++;
  if (block_bar.arrived && block_bar.arrived == nlive) release(block_bar);
  to_sched(f);
  emu_fail("an exited fiber was resumed");
}

static void fiber_main() {
  (*body)();
  fiber_exit();
}

/* ---- stacks: 256 KB each with an inaccessible guard page below, allocated once, reused ---- */
static unsigned char *stacks[EMU_MAX_THREADS];
/* At exit: the deepest stack use over all fibers (pages ever touched, from mincore), so a kernel
 * that comes close to the 256 KB (a crash in the guard page) shows up before it gets there. */
static void stack_report() {
  size_t deepest = 0;
  std::vector<unsigned char> res(kStack / kPage);
  for (unsigned char *s : stacks)
    if (s && mincore(s, kStack, res.data()) == 0)
      for (size_t i = 0; i < res.size(); i++)
        if (res[i] & 1) {
          deepest = std::max(deepest, kStack - i * kPage);
          break;
        }
  if (deepest) printf("EMU: deepest fiber stack use %zu KB of %zu KB\n", deepest / 1024, kStack / 1024);
}
static unsigned char *stack_of(unsigned t) {
  if (!stacks[0] && !t) atexit(stack_report);
  if (!stacks[t]) {
    void *m = mmap(nullptr, kStack + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) emu_fail("cannot allocate a fiber stack");
    mprotect(m, kPage, PROT_NONE);
    stacks[t] = (unsigned char *)m + kPage;
  }
  return stacks[t];
}

/* ---- dynamic shared memory: its end touches an inaccessible page ---- */
static unsigned char *smem_region; /* EMU_SMEM_MAX rounded up to pages, then a guard page */
static size_t smem_region_bytes, smem_bytes;
size_t emu_smem_bytes() { return smem_bytes; }

static void smem_setup(size_t bytes) {
  if (!smem_region) {
    smem_region_bytes = (EMU_SMEM_MAX + kPage - 1) / kPage * kPage;
    void *m = mmap(nullptr, smem_region_bytes + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) emu_fail("cannot allocate shared memory");
    mprotect((unsigned char *)m + smem_region_bytes, kPage, PROT_NONE);
    smem_region = (unsigned char *)m;
  }
  smem_bytes = bytes;
  const size_t padded = (bytes + 127) / 128 * 128; /* base stays 128-byte aligned */
  emu_dyn_smem = smem_region + smem_region_bytes - padded;
}

void emu_check_smem(const void *p, size_t bytes, const char *what) {
  const unsigned char *c = (const unsigned char *)p;
  if (c < emu_dyn_smem || c + bytes > emu_dyn_smem + smem_bytes)
    emu_fail("%s: address %p (%zu bytes) is outside the launch's dynamic shared memory [%p, +%zu) (static "
             "__shared__ arrays are not emulated for this instruction)",
             what, p, bytes, (void *)emu_dyn_smem, smem_bytes);
}

size_t emu_cvta_shared(const void *p) {
  emu_check_smem(p, 1, "__cvta_generic_to_shared");
  return (size_t)((const unsigned char *)p - emu_dyn_smem);
}

/* ---- cp.async ---- */
void emu_cp_async(void *dst, const void *src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) emu_fail("cp.async of %d bytes", bytes);
  if ((uintptr_t)dst % bytes || (uintptr_t)src % bytes)
    emu_fail("cp.async: misaligned %d-byte copy %p -> %p", bytes, src, dst);
  emu_check_smem(dst, bytes, "cp.async");
  EmuCopy c;
  c.dst = dst;
  c.bytes = bytes;
  c.group = emu_cur->groups;
  memset(c.data, 0, sizeof c.data); /* src_bytes < bytes: the rest is zero-filled */
  memcpy(c.data, src, src_bytes < bytes ? src_bytes : bytes);
  /* until the copy is retired the destination holds garbage (NaN here): reading it before the
   * wait, or issuing it into a buffer that another warp still reads, poisons the results */
  memset(dst, 0xff, bytes);
  emu_cur->copies.push_back(c);
}
void emu_cp_async_commit() { emu_cur->groups++; }
void emu_cp_async_wait(int n) {
  EmuFiber *f = emu_cur;
  const long limit = (long)f->groups - n; /* groups < limit are retired */
  size_t keep = 0;
  for (size_t i = 0; i < f->copies.size(); i++) {
    EmuCopy &c = f->copies[i];
    if ((long)c.group < limit)
      memcpy(c.dst, c.data, c.bytes);
    else
      f->copies[keep++] = c;
  }
  f->copies.resize(keep);
}

/* ---- the device ---- */
struct EmuDevice {
  const char *name;
  int major, minor, sms, optin, per_sm;
};
static const EmuDevice &device() {
  static const EmuDevice h100 = {"h100", 9, 0, 132, 227 * 1024, 228 * 1024};
  static const EmuDevice a100 = {"a100", 8, 0, 108, 163 * 1024, 164 * 1024};
  const char *e = getenv("EMU_DEVICE");
  if (e && *e && strcmp(e, "h100") && strcmp(e, "a100")) emu_fail("EMU_DEVICE=%s: expected h100 or a100", e);
  return e && !strcmp(e, "a100") ? a100 : h100;
}
int emu_attr(cudaDeviceAttr a) {
  const EmuDevice &d = device();
  switch (a) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: return d.optin;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: return d.per_sm;
    case cudaDevAttrMaxSharedMemoryPerBlock: return (int)EMU_SMEM_DEFAULT;
    case cudaDevAttrMultiProcessorCount: return d.sms;
    case cudaDevAttrComputeCapabilityMajor: return d.major;
    case cudaDevAttrComputeCapabilityMinor: return d.minor;
    case cudaDevAttrMaxThreadsPerBlock: return 1024;
    case cudaDevAttrWarpSize: return 32;
    case cudaDevAttrMaxRegistersPerBlock: return 65536;
    default: emu_fail("cudaDeviceGetAttribute(%d) is not emulated (add it to emu_attr)", (int)a);
  }
}

/* ---- launches ---- */
static std::map<const void *, int> max_dyn_smem; /* cudaFuncAttributeMaxDynamicSharedMemorySize */
void emu_func_set_attr(const void *kernel, int attr, int value) {
  if (attr == (int)cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > device().optin)
      emu_fail("cudaFuncSetAttribute: %d bytes of dynamic shared memory (the %s allows %d)", value, device().name,
               device().optin);
    max_dyn_smem[kernel] = value;
  }
}

/* At exit: every kernel instantiation launched, with its launch and block counts (what a run covered). */
static std::map<std::string, std::pair<long, long>> launched;
static void launch_report() {
  printf("EMU: kernels run (launches, blocks):\n");
  for (auto &k : launched) printf("  %6ld %8ld  %s\n", k.second.first, k.second.second, k.first.c_str());
}
static void count_launch(const void *kernel, long blocks) {
  if (launched.empty()) atexit(launch_report);
  auto &e = launched[kernel_name(kernel)];
  e.first++, e.second += blocks;
}

static void deadlock() {
  printf("EMU: deadlock in %s, block (%u,%u,%u): %u of %u threads exited, none can run:\n", kernel_name(),
         blockIdx.x, blockIdx.y, blockIdx.z, nexited, nthreads);
  for (unsigned t = 0; t < nthreads;) {
    unsigned e = t + 1;
    while (e < nthreads && fibers[e].state == fibers[t].state && fibers[e].what == fibers[t].what) e++;
    printf("  threads %u-%u: %s\n", t, e - 1, fibers[t].state == 2 ? "exited" : fibers[t].what);
    t = e;
  }
  fflush(stdout);
  abort();
}

static EmuFiber *pick() {
  const int nw = (int)((nthreads + 63) / 64);
  if (!sched_desc) {
    for (int i = 0; i < nw; i++)
      if (runnable[i]) return &fibers[i * 64 + __builtin_ctzll(runnable[i])];
  } else {
    for (int i = nw - 1; i >= 0; i--)
      if (runnable[i]) return &fibers[i * 64 + 63 - __builtin_clzll(runnable[i])];
  }
  return nullptr;
}

void emu_run_grid(dim3 g, dim3 b, size_t smem, const void *kernel, const std::function<void()> &fn) {
  cur_kernel = kernel;
  const unsigned n = b.x * b.y * b.z;
  if (n == 0 || n > EMU_MAX_THREADS) emu_fail("launch with %u threads per block", n);
  if (smem > (size_t)device().optin) emu_fail("launch with %zu bytes of dynamic shared memory", smem);
  if (smem > EMU_SMEM_DEFAULT) {
    auto it = max_dyn_smem.find(kernel);
    if (it == max_dyn_smem.end() || (size_t)it->second < smem)
      emu_fail("launch with %zu bytes of dynamic shared memory without cudaFuncSetAttribute("
               "MaxDynamicSharedMemorySize) allowing it",
               smem);
  }
  smem_setup(smem);
  count_launch(kernel, (long)g.x * g.y * g.z);
  cur_kernel = kernel;
  gridDim = g;
  blockDim = b;
  body = &fn;
  nthreads = n;
  static const char *mode = getenv("EMU_SCHED"); /* asc, desc; default: alternate per block */
  unsigned long blockno = 0;
  for (unsigned bz = 0; bz < g.z; bz++)
    for (unsigned by = 0; by < g.y; by++)
      for (unsigned bx = 0; bx < g.x; bx++, blockno++) {
        blockIdx = {bx, by, bz};
        sched_desc = mode && !strcmp(mode, "asc") ? 0 : mode && !strcmp(mode, "desc") ? 1 : (int)(blockno & 1);
        memset(emu_dyn_smem, 0xff, smem);
        memset(runnable, 0, sizeof runnable);
        nlive = n;
        nexited = 0;
        block_bar = Bar();
        for (auto &nb : named_bar) nb = Bar();
        for (unsigned w = 0; w < (n + 31) / 32; w++) {
          emu_warps[w].arrived = 0;
          emu_warps[w].lanes = emu_warps[w].live = (int)(n - w * 32 < 32 ? n - w * 32 : 32);
        }
        for (unsigned t = 0; t < n; t++) {
          EmuFiber &f = fibers[t];
          f.tid = t;
          f.idx = {t % b.x, t / b.x % b.y, t / (b.x * b.y)};
          f.what = nullptr;
          f.copies.clear();
          f.groups = 0;
          f.stack = stack_of(t);
          fiber_init(&f);
          set_runnable(&f);
        }
        while (nexited < n) {
          EmuFiber *f = pick();
          if (!f) deadlock();
          emu_cur = f;
          threadIdx = f->idx;
          to_fiber(f);
        }
        emu_cur = nullptr;
      }
}
