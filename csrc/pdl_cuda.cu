/* PDL on CUDA: token counting, the fused loss + gradient, and the backward's rescale.
 *
 * pdl_loss: one block per row (Liger-Kernel style). Sweep 1 reads the row once with 16-byte loads,
 * keeps an online (max, sum of exp) per thread in base 2 and copies the row into shared memory;
 * sweep 2 writes the gradient from there (only a long row's remainder comes from global memory).
 * The gradient is written with streaming stores; float32 accumulation for every dtype. No host
 * synchronisation anywhere: the mean's denominator and sum_c w_c are computed on the device by a
 * one-block prologue (fixed-order reduction, deterministic) and read from device memory.
 * Out-of-range targets make the row's loss and gradient NaN (the host cannot be told without a
 * sync; complexformer/pdl.py offers COMPLEXFORMER_SYNC_CHECKS=1 to raise instead).
 * All offsets are int64. */
#include <math_constants.h>
#include "cuda_math.cuh"
#include "cuda_util.cuh"
#include "pdl.h"

namespace {

using namespace cfcuda;  // kLog2e, ex2_fast, to_f / from_f (cuda_math.cuh)

/* 16 bytes of T as K floats and back */
template <typename T> struct Pack {
  static constexpr int K = 16 / sizeof(T);
  union {
    uint4 u;
    T v[K];
  };
  __device__ __forceinline__ void to_float(float *x) const {
#pragma unroll
    for (int i = 0; i < K; i++) x[i] = to_f(v[i]);
  }
  __device__ __forceinline__ void from_float(const float *x) {
#pragma unroll
    for (int i = 0; i < K; i++) v[i] = from_f<T>(x[i]);
  }
};

/* Elements before the first 16-byte aligned one (all of them when the row never aligns). */
template <typename T> __device__ __forceinline__ int64_t align_head(const T *p, int64_t V) {
  int64_t h = (int64_t)(((16 - ((uintptr_t)p & 15)) & 15) / sizeof(T));
  return h < V ? h : V;
}

/* (max, sum of 2^((x - max) log2e)) pairs, max in natural units; an empty side has max = -inf,
 * sum = 0. x - max is formed first (as torch does), so its rounding error scales with |x - max|,
 * not with |x|: large common offsets in the logits cost no accuracy, and the maximum itself
 * contributes exactly 1 (a one-hot row gets p = 1 exactly). A NaN sum survives (NaN * 0 = NaN). */
__device__ __forceinline__ void combine(float &m, float &s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  const float a = (m == -CUDART_INF_F) ? 0.f : ex2_fast((m - mn) * kLog2e);
  const float b = (m2 == -CUDART_INF_F) ? 0.f : ex2_fast((m2 - mn) * kLog2e);
  s = s * a + s2 * b;
  m = mn;
}

template <int BLOCK> __device__ void block_reduce(float &m, float &s, float &swz) {
  __shared__ float sm[BLOCK / 32], ss[BLOCK / 32], sw[BLOCK / 32];
  for (int o = 16; o > 0; o >>= 1) {
    float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
    swz += __shfl_xor_sync(0xffffffffu, swz, o);
    combine(m, s, m2, s2);
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // the shared arrays may still be read from the previous row
  if (lane == 0) sm[warp] = m, ss[warp] = s, sw[warp] = swz;
  __syncthreads();
  m = -CUDART_INF_F, s = 0.f, swz = 0.f;
  for (int k = 0; k < BLOCK / 32; k++) {  // fixed order: deterministic
    combine(m, s, sm[k], ss[k]);
    swz += sw[k];
  }
}

template <typename T> __device__ __forceinline__ int64_t load_target(const CfPdlArgs &a, int64_t r) {
  return a.targets_i64 ? ((const int64_t *)a.targets)[r] : (int64_t)((const int32_t *)a.targets)[r];
}

/* Write `value` over a gradient row (zeros for ignored rows, NaN for out-of-range targets). */
template <typename T, int BLOCK> __device__ void fill_row(T *g, int64_t V, float value) {
  for (int64_t c = threadIdx.x; c < V; c += BLOCK) g[c] = from_f<T>(value);
}

/* ws[0] = 1 / (mean's denominator) (1 for sum / none), ws[1] = sum_c w_c. One block, fixed order. */
template <int BLOCK>
__global__ void __launch_bounds__(BLOCK) pdl_prologue_kernel(CfPdlArgs a, const float *norm, float *ws) {
  const int64_t N = a.B * a.T;
  const float *w = (const float *)a.weights;
  /* One block runs this before the loss kernel can start, so it is latency-bound: 4 targets
   * (then their 4 weights) and 8 weights per thread are loaded before any is used. */
  constexpr int U = 4, UW = 8;
  double wsum = 0.0, W = 0.0;
  if (a.reduction == CF_PDL_MEAN && a.norm_mode == CF_PDL_NORM_BATCH)
    for (int64_t r0 = threadIdx.x; r0 < N; r0 += (int64_t)U * BLOCK) {
      int64_t y[U];
#pragma unroll
      for (int k = 0; k < U; k++) y[k] = r0 + k * BLOCK < N ? load_target<float>(a, r0 + k * BLOCK) : a.ignore_index;
      float wy[U];
#pragma unroll
      for (int k = 0; k < U; k++) wy[k] = (y[k] != a.ignore_index && y[k] >= 0 && y[k] < a.V) ? w[y[k]] : 0.f;
#pragma unroll
      for (int k = 0; k < U; k++) wsum += (double)wy[k];
    }
  if (a.eps > 0.0)
    for (int64_t c0 = threadIdx.x; c0 < a.V; c0 += (int64_t)UW * BLOCK) {
      float wc[UW];
#pragma unroll
      for (int k = 0; k < UW; k++) wc[k] = c0 + k * BLOCK < a.V ? w[c0 + k * BLOCK] : 0.f;
#pragma unroll
      for (int k = 0; k < UW; k++) W += (double)wc[k];
    }
  __shared__ double s1[BLOCK], s2[BLOCK];
  s1[threadIdx.x] = wsum, s2[threadIdx.x] = W;
  __syncthreads();
  for (int o = BLOCK / 2; o > 0; o >>= 1) {
    if ((int)threadIdx.x < o) s1[threadIdx.x] += s1[threadIdx.x + o], s2[threadIdx.x] += s2[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double inv = 1.0;
    if (a.reduction == CF_PDL_MEAN) {
      if (a.norm_mode == CF_PDL_NORM_BATCH) inv = cf_pdl_inv_norm(s1[0], 1);
      else inv = cf_pdl_inv_norm((double)*norm, a.norm_mode == CF_PDL_NORM_PRECOMPUTED);
    }
    ws[0] = (float)inv;
    ws[1] = (float)s2[0];
  }
}

/* The loss and gradient of each row. Reading a row twice from global memory costs about 3 passes
 * of traffic instead of 2: with several rows of 256 KB (V = 128256 bf16) in flight per SM the
 * working set exceeds the L2 (50-60 MB), so the second read comes from HBM. So sweep 1 also
 * copies the row's 16-byte packs into dynamic shared memory (the first `cache_packs` of them: the
 * whole row when it fits, else as much as a block may hold, ~225 KB on sm_90), and sweep 2 reads
 * the cached packs from shared memory and only the remainder (the row's end, read last in sweep 1,
 * so most likely still in L2) from global memory. Each thread reads back exactly the packs it
 * wrote, so the cache needs no barrier of its own. Sweep 1 issues UNROLL independent 16-byte
 * loads per thread before using any (memory-level parallelism with one block per SM), takes the
 * maximum over all of them and rescales the running sum once per group. */
template <typename T, int BLOCK, int MIN_BLOCKS, int UNROLL = 4>
__global__ void __launch_bounds__(BLOCK, MIN_BLOCKS) pdl_loss_kernel(CfPdlArgs a, const float *ws, int64_t cache_packs) {
  extern __shared__ uint4 row_cache[];
  constexpr int K = Pack<T>::K;
  const int64_t N = a.B * a.T, V = a.V;
  const float *w = (const float *)a.weights;
  const float inv_norm = ws[0], W = ws[1];
  const bool smooth = a.eps > 0.0;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T *z = (const T *)a.logits + (r / a.T) * a.sb + (r % a.T) * a.st;
    T *g = a.grad ? (T *)a.grad + r * V : nullptr;  // null: loss only
    float *row_loss = (float *)a.row_loss + r;
    const int64_t y = load_target<T>(a, r);
    if (y == a.ignore_index || (V == 1 && y == 0)) {  // V = 1: log softmax is identically 0
      if (g) fill_row<T, BLOCK>(g, V, 0.f);
      if (threadIdx.x == 0) *row_loss = 0.f;
      continue;
    }
    if (y < 0 || y >= V) {  // never silent: NaN loss and gradient (see the file comment)
      if (g) fill_row<T, BLOCK>(g, V, CUDART_NAN_F);
      if (threadIdx.x == 0) *row_loss = CUDART_NAN_F;
      continue;
    }
    const int64_t head = align_head(z, V);
    const int64_t npack = (V - head) / K;
    const int64_t tail = head + npack * K;
    const int64_t ncache = npack < cache_packs ? npack : cache_packs;
    const uint4 *zp = reinterpret_cast<const uint4 *>(z + head);

    /* sweep 1: online max m and sum of 2^((x - m) log2e) per thread; sum_c w_c z_c (smoothing) */
    float m = -CUDART_INF_F, s = 0.f, swz = 0.f;
    auto accumulate = [&](int64_t c, const float *x, int n) {  // n values from column c
      float lm = -CUDART_INF_F;
      for (int i = 0; i < n; i++) lm = fmaxf(lm, x[i]);
      if (lm > m) {
        s *= ex2_fast((m - lm) * kLog2e);  // 2^-inf = 0 when m is still -inf (NaN stays NaN)
        m = lm;
      }
      if (m != -CUDART_INF_F)
        for (int i = 0; i < n; i++) s += ex2_fast((x[i] - m) * kLog2e);
      else  // every value so far is -inf (p = 0), unless a NaN hides here: keep it
        for (int i = 0; i < n; i++) s += (x[i] != x[i]) ? x[i] : 0.f;
      if (smooth)
        for (int i = 0; i < n; i++) swz = fmaf(__ldg(w + c + i), x[i], swz);
    };
    for (int64_t c = threadIdx.x; c < head; c += BLOCK) {
      const float x = to_f(z[c]);
      accumulate(c, &x, 1);
    }
#pragma unroll 1
    for (int64_t i0 = threadIdx.x; i0 < npack; i0 += (int64_t)UNROLL * BLOCK) {
      uint4 u[UNROLL];
#pragma unroll
      for (int k = 0; k < UNROLL; k++) {  // all loads first: UNROLL 16-byte loads in flight
        const int64_t i = i0 + (int64_t)k * BLOCK;
        if (i < ncache) u[k] = __ldcs(zp + i);  // cached: never read from global again
        else if (i < npack) u[k] = __ldg(zp + i);
      }
#pragma unroll
      for (int k = 0; k < UNROLL; k++) {
        const int64_t i = i0 + (int64_t)k * BLOCK;
        if (i < npack) {
          if (i < ncache) row_cache[i] = u[k];
          Pack<T> p;
          p.u = u[k];
          float x[K];
          p.to_float(x);
          accumulate(head + i * K, x, K);
        }
      }
    }
    for (int64_t c = tail + threadIdx.x; c < V; c += BLOCK) {
      const float x = to_f(z[c]);
      accumulate(c, &x, 1);
    }
    block_reduce<BLOCK>(m, s, swz);
    const float ls2 = log2f(s);                     // p_c = 2^((z_c - m) log2e - ls2)
    const double lse = (double)m + log((double)s);  // log sum exp(z), for the loss (NaN / inf propagate)
    const float wy = __ldg(w + y);
    const CfPdlCoef co = cf_pdl_coef(wy, W, (double)V, a.eps, inv_norm);
    const float A = (float)co.A_times_s, Bc = (float)co.B, C = (float)co.C;
    if (threadIdx.x == 0) {
      const float zy = to_f(z[y]);
      *row_loss = (float)cf_pdl_row_loss(lse, zy, wy, W, swz, (double)V, a.eps, inv_norm);
    }
    if (!g) continue;  // loss only (block-uniform)
    /* sweep 2: dz_c = p_c A - B w_c - [c == y] C, from shared memory where cached */
    auto grad_of = [&](int64_t c, float x) {
      float d = ex2_fast(fmaf(x - m, kLog2e, -ls2)) * A;
      if (smooth) d -= Bc * __ldg(w + c);
      if (c == y) d -= C;
      return d;
    };
    for (int64_t c = threadIdx.x; c < head; c += BLOCK) g[c] = from_f<T>(grad_of(c, to_f(z[c])));
    const bool vec_store = (((uintptr_t)g ^ (uintptr_t)z) & 15) == 0;  // same head: 16-byte stores line up
#pragma unroll 2
    for (int64_t i = threadIdx.x; i < npack; i += BLOCK) {
      Pack<T> p;
      p.u = i < ncache ? row_cache[i] : __ldcs(zp + i);
      float x[K];
      p.to_float(x);
      const int64_t c = head + i * K;
#pragma unroll
      for (int k = 0; k < K; k++) x[k] = grad_of(c + k, x[k]);
      if (vec_store) {
        p.from_float(x);
        __stcs(reinterpret_cast<uint4 *>(g + c), p.u);
      } else {  // gradient rows align differently from the (strided) logits rows: scalar stores
#pragma unroll
        for (int k = 0; k < K; k++) g[c + k] = from_f<T>(x[k]);
      }
    }
    for (int64_t c = tail + threadIdx.x; c < V; c += BLOCK) g[c] = from_f<T>(grad_of(c, to_f(z[c])));
  }
}

template <typename T>
__global__ void pdl_scale_kernel(T *g, int64_t rows, int64_t V, const float *gp) {
  const float s = gp[0];
  if (s == 1.0f) return;  // the usual loss.backward(): no bytes moved
  constexpr int K = Pack<T>::K;
  const int64_t n = rows * V;
  const int64_t npack = ((uintptr_t)g & 15) ? 0 : n / K;  // 16-byte packs when aligned
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  uint4 *gv = reinterpret_cast<uint4 *>(g);
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < npack; i += stride) {
    Pack<T> p;
    p.u = gv[i];
    float x[K];
    p.to_float(x);
    for (int k = 0; k < K; k++) x[k] *= s;
    p.from_float(x);
    gv[i] = p.u;
  }
  for (int64_t i = npack * K + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    g[i] = from_f<T>(to_f(g[i]) * s);
}

template <typename T>
__global__ void pdl_scale_rows_kernel(T *g, int64_t rows, int64_t V, const float *gp) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float s = gp[r];
    T *gr = g + r * V;
    for (int64_t c = threadIdx.x; c < V; c += blockDim.x) gr[c] = from_f<T>(to_f(gr[c]) * s);
  }
}

template <typename I, bool SHARED>
__global__ void token_counts_kernel(const I *ids, int64_t n, int64_t ignore, unsigned long long *counts,
                                    int64_t V, long long *bad) {
  extern __shared__ unsigned int hist[];
  if (SHARED) {
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) hist[v] = 0;
    __syncthreads();
  }
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t id = (int64_t)ids[i];
    if (id == ignore) continue;
    if (id < 0 || id >= V) {
      atomicAdd((unsigned long long *)bad, 1ull);
      atomicExch((unsigned long long *)bad + 1, (unsigned long long)id);
      continue;
    }
    if (SHARED) atomicAdd(hist + id, 1u);
    else atomicAdd(counts + id, 1ull);
  }
  if (SHARED) {
    __syncthreads();
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x)
      if (hist[v]) atomicAdd(counts + v, (unsigned long long)hist[v]);
  }
}

int sm_count(int device) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) n = 80;
  return n;
}

/* The shared memory a block may opt in to (227 KB on sm_90, 163 KB on sm_80), queried once per
 * device (a launcher runs once per loss call; the query is cheap but not free). 0 on failure. */
int max_smem_per_block(int device) {
  static int cache[64];  // 0: not asked yet (a benign race: every thread stores the same value)
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || n < 0) n = 0;
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

/* Launch the loss kernel with `smem` bytes of dynamic shared memory; above 48 KB a kernel must
 * opt in once per device (remembered per instantiation, for the largest size asked so far). */
template <typename T, int BLOCK, int MIN_BLOCKS>
const char *launch_rows(const CfPdlArgs *a, const float *ws, unsigned grid, size_t smem, int device,
                          cudaStream_t st) {
  static int opted_in[64];
  if (smem > 48 * 1024 && !(device >= 0 && device < 64 && opted_in[device] >= (int)smem)) {
    CF_CUDA_TRY(cudaFuncSetAttribute(pdl_loss_kernel<T, BLOCK, MIN_BLOCKS>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)smem));
    if (device >= 0 && device < 64) opted_in[device] = (int)smem;
  }
  pdl_loss_kernel<T, BLOCK, MIN_BLOCKS><<<grid, BLOCK, smem, st>>>(*a, ws, (int64_t)(smem / 16));
  CF_LAUNCH_CHECK();
  return NULL;
}

template <typename T>
const char *launch_loss(const CfPdlArgs *a, const float *norm, float *ws, int device, cudaStream_t st) {
  const int64_t N = a->B * a->T;
  pdl_prologue_kernel<1024><<<1, 1024, 0, st>>>(*a, norm, ws);
  CF_LAUNCH_CHECK();
  const unsigned grid = (unsigned)(N < 0x7fffffff ? N : 0x7fffffff);
  /* Shared memory per block: the whole row's packs when they fit in half of what a block may hold,
   * else that half (~112 KB on sm_90). Two blocks share an SM, so one block's loads overlap the
   * other's gradient writes; the uncached remainder of a long row (its end, read last in sweep 1)
   * then comes from L2. Short rows fit several blocks per SM. 2 KB per block stay free for the
   * runtime's reservation (1 KB) and block_reduce's static arrays. The loss-only path reads each
   * row once: no cache. */
  const int64_t row_bytes = a->V * (int64_t)sizeof(T) / 16 * 16;  // >= the packs of any row
  const int64_t room = ((int64_t)max_smem_per_block(device) / 2 - 2048) / 16 * 16;
  const int64_t smem = !a->grad || room <= 0 ? 0 : (row_bytes < room ? row_bytes : room);
  /* Threads: 512 for long rows, two blocks per SM; 256 for short rows, four per SM. MIN_BLOCKS caps
   * the registers at 64 per thread, which this kernel needs without spilling (at 40, for three
   * 512-thread blocks, it spills), so an SM holds 1024 threads; UNROLL = 4 loads each keep 64 KB
   * per SM in flight. The choice depends on V alone, so the loss-only path reduces in the same
   * order (same loss bits). */
  if (a->V >= 8192) return launch_rows<T, 512, 2>(a, ws, grid, (size_t)smem, device, st);
  return launch_rows<T, 256, 4>(a, ws, grid, (size_t)smem, device, st);
}

template <typename T>
const char *launch_scale(void *grad, int64_t rows, int64_t V, const float *g, int per_row, int device,
                         cudaStream_t st) {
  if (per_row) {
    const unsigned grid = (unsigned)(rows < 65535 * 16 ? rows : 65535 * 16);
    pdl_scale_rows_kernel<T><<<grid, 256, 0, st>>>((T *)grad, rows, V, g);
  } else {
    /* enough blocks to fill the GPU; each returns at once when g == 1 */
    const int64_t packs = rows * V / Pack<T>::K + 1;
    int64_t want = (packs + 255) / 256, cap = (int64_t)sm_count(device) * 8;
    pdl_scale_kernel<T><<<(unsigned)(want < cap ? want : cap), 256, 0, st>>>((T *)grad, rows, V, g);
  }
  CF_LAUNCH_CHECK();
  return NULL;
}

}  // namespace

extern "C" const char *cf_pdl_loss_cuda(const CfPdlArgs *a, int dtype, const float *norm, float *ws,
                                        int device, void *stream) {
  CfDeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (a->B * a->T == 0) return NULL;
  switch (dtype) {
    case CF_F32: return launch_loss<float>(a, norm, ws, device, st);
    case CF_F16: return launch_loss<__half>(a, norm, ws, device, st);
    case CF_BF16: return launch_loss<__nv_bfloat16>(a, norm, ws, device, st);
    default: return "pdl_loss: unsupported logits dtype on CUDA";
  }
}

extern "C" const char *cf_pdl_scale_cuda(void *grad, int dtype, int64_t n_rows, int64_t V, const float *g,
                                         int per_row, int device, void *stream) {
  CfDeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (n_rows * V == 0) return NULL;
  switch (dtype) {
    case CF_F32: return launch_scale<float>(grad, n_rows, V, g, per_row, device, st);
    case CF_F16: return launch_scale<__half>(grad, n_rows, V, g, per_row, device, st);
    case CF_BF16: return launch_scale<__nv_bfloat16>(grad, n_rows, V, g, per_row, device, st);
    default: return "pdl_loss backward: unsupported gradient dtype on CUDA";
  }
}

extern "C" const char *cf_pdl_token_counts_cuda(const void *ids, int ids_i64, int64_t n, int64_t ignore_index,
                                                int64_t *counts, int64_t V, int64_t *bad, int device,
                                                void *stream) {
  CfDeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  CF_CUDA_TRY(cudaMemsetAsync(counts, 0, (size_t)V * sizeof(int64_t), st));
  if (n == 0) return NULL;
  const int64_t want = (n + 255) / 256, cap = (int64_t)sm_count(device) * 8;
  const unsigned grid = (unsigned)(want < cap ? want : cap);
  const bool shared = V <= 12288;  // 48 KB of uint32 bins per block
  const size_t smem = shared ? (size_t)V * sizeof(unsigned int) : 0;
  unsigned long long *cnt = (unsigned long long *)counts;
  long long *b = (long long *)bad;
  if (ids_i64) {
    if (shared) token_counts_kernel<int64_t, true><<<grid, 256, smem, st>>>((const int64_t *)ids, n, ignore_index, cnt, V, b);
    else token_counts_kernel<int64_t, false><<<grid, 256, 0, st>>>((const int64_t *)ids, n, ignore_index, cnt, V, b);
  } else {
    if (shared) token_counts_kernel<int32_t, true><<<grid, 256, smem, st>>>((const int32_t *)ids, n, ignore_index, cnt, V, b);
    else token_counts_kernel<int32_t, false><<<grid, 256, 0, st>>>((const int32_t *)ids, n, ignore_index, cnt, V, b);
  }
  CF_LAUNCH_CHECK();
  return NULL;
}
