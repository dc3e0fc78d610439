/* CUDA Euler rotation: float32 / float16 / bfloat16 storage, float32 math (rotate_math.h), the
 * offset beta + omega * p formed in double as on the CPU. See rotate.h for the jobs.
 *
 * Forward: one thread per NP consecutive pairs of one output row; q and k share one launch (the
 * grid covers q's units, then k's). NP = 4 with vector loads when pointers, strides and h allow it
 * (16-byte loads for float32, 8 or 16 for the 16-bit types), else NP = 1.
 *
 * Backward: one thread per (kv head, pair) column and fixed chunk of tokens. For each token it
 * loops over the G query heads of its kv head, so dx sums the group in registers in a fixed
 * order, and it accumulates that chunk's d delta, d beta, d omega per query head in its own
 * shared-memory slots. Chunk partials go to ws[p][3][H][h]; a second kernel adds them in chunk
 * order in double. No atomics: bitwise reproducible. */
#include "cuda_math.cuh"
#include "cuda_util.cuh"
#include "rotate.h"
#include "rotate_math.h"

namespace {

using namespace cfcuda;  // to_f / from_f (cuda_math.cuh)

/* N contiguous elements; WIDE: through the widest loads their byte count allows (p must be
 * aligned to that width, which the launcher checks), else element by element. */
template <typename T, int N, bool WIDE> struct Vec {
  static constexpr int BYTES = N * (int)sizeof(T);
  static constexpr int W = !WIDE ? (int)sizeof(T)
                           : BYTES % 16 == 0 ? 16 : BYTES % 8 == 0 ? 8 : BYTES % 4 == 0 ? 4 : (int)sizeof(T);
  alignas(W) T v[N];
  template <typename U> __device__ __forceinline__ void copy_in(const T *p) {
#pragma unroll
    for (int i = 0; i < BYTES / (int)sizeof(U); i++) reinterpret_cast<U *>(v)[i] = reinterpret_cast<const U *>(p)[i];
  }
  template <typename U> __device__ __forceinline__ void copy_out(T *p) const {
#pragma unroll
    for (int i = 0; i < BYTES / (int)sizeof(U); i++) reinterpret_cast<U *>(p)[i] = reinterpret_cast<const U *>(v)[i];
  }
  __device__ __forceinline__ void load(const T *p) {
    if constexpr (W == 16) copy_in<uint4>(p);
    else if constexpr (W == 8) copy_in<uint2>(p);
    else if constexpr (W == 4) copy_in<unsigned>(p);
    else {
#pragma unroll
      for (int i = 0; i < N; i++) v[i] = p[i];
    }
  }
  __device__ __forceinline__ void store(T *p) const {
    if constexpr (W == 16) copy_out<uint4>(p);
    else if constexpr (W == 8) copy_out<uint2>(p);
    else if constexpr (W == 4) copy_out<unsigned>(p);
    else {
#pragma unroll
      for (int i = 0; i < N; i++) p[i] = v[i];
    }
  }
};

__device__ __forceinline__ float pair_offset(const CfRotJob &jb, int64_t i, int64_t j, double p) {
  const float *beta = (const float *)jb.beta;
  const float omega = ((const float *)jb.freqs)[i * jb.freqs_sh + j];
  return (float)((beta ? (double)beta[i * jb.h + j] : 0.0) + cf_pos_angle((double)omega, p));
}

/* Unit u of a job: NP pairs starting at pair j0 of output row (b, i, l). */
template <typename T, int NP>
__device__ __forceinline__ void fwd_unit(const CfRotJob &jb, T *out, int64_t u) {
  const int64_t h = jb.h, upr = h / NP;
  const int64_t row = u / upr, j0 = (u - row * upr) * NP;
  const int64_t l = row % jb.L, i = (row / jb.L) % jb.H, b = row / (jb.L * jb.H);
  const T *xr = (const T *)jb.x + b * jb.x_s.b + (i / (jb.H / jb.Hx)) * jb.x_s.h + l * jb.x_s.l;
  T *orow = out + row * 2 * h;
  const double p = (double)jb.pos[b * jb.pos_s.b + l * jb.pos_s.l];
  const float *delta = (const float *)jb.delta + i * h;
  float re[NP], im[NP];
  if (jb.layout == CF_LAYOUT_HALF) {
    Vec<T, NP, (NP > 1)> a, c;
    a.load(xr + j0);
    c.load(xr + h + j0);
#pragma unroll
    for (int k = 0; k < NP; k++) { re[k] = to_f(a.v[k]); im[k] = to_f(c.v[k]); }
  } else {
    Vec<T, 2 * NP, (NP > 1)> a;
    a.load(xr + 2 * j0);
#pragma unroll
    for (int k = 0; k < NP; k++) { re[k] = to_f(a.v[2 * k]); im[k] = to_f(a.v[2 * k + 1]); }
  }
#pragma unroll
  for (int k = 0; k < NP; k++)
    cf_rot_fwd_f32(re[k], im[k], delta[j0 + k], pair_offset(jb, i, j0 + k, p), &re[k], &im[k]);
  if (jb.layout == CF_LAYOUT_HALF) {
    Vec<T, NP, (NP > 1)> a, c;
#pragma unroll
    for (int k = 0; k < NP; k++) { a.v[k] = from_f<T>(re[k]); c.v[k] = from_f<T>(im[k]); }
    a.store(orow + j0);
    c.store(orow + h + j0);
  } else {
    Vec<T, 2 * NP, (NP > 1)> a;
#pragma unroll
    for (int k = 0; k < NP; k++) { a.v[2 * k] = from_f<T>(re[k]); a.v[2 * k + 1] = from_f<T>(im[k]); }
    a.store(orow + 2 * j0);
  }
}

template <typename T, int NP>
__global__ void rot_fwd_kernel(CfRotJob q, T *q_out, int64_t q_units, CfRotJob k, T *k_out,
                               int64_t k_units) {
  const int64_t total = q_units + k_units, step = (int64_t)gridDim.x * blockDim.x;
  for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < total; u += step) {
    if (u < q_units) fwd_unit<T, NP>(q, q_out, u);
    else fwd_unit<T, NP>(k, k_out, u - q_units);
  }
}

/* Backward stage 1. grid.x = chunk, grid.y = block of COLS (kv head, pair) columns. */
template <typename T, typename TG>
__global__ void rot_bwd_kernel(CfRotBwdJob jb, int cols) {
  extern __shared__ float acc[]; /* [3][G][cols]: this thread's slots only, so no syncs needed */
  const CfRotJob &f = jb.f;
  const int64_t h = f.h, d = 2 * h, G = f.H / f.Hx, Hh = f.H * h;
  const int64_t c = (int64_t)blockIdx.y * cols + threadIdx.x;
  if (c >= f.Hx * h) return;
  const int64_t hx = c / h, j = c - hx * h;
  const int64_t ir = cf_re_index(f.layout, j, h), ii = cf_im_index(f.layout, j, h);
  float *a_delta = acc + threadIdx.x, *a_beta = a_delta + G * cols, *a_omega = a_beta + G * cols;
  for (int64_t g = 0; g < G; g++) a_delta[g * cols] = a_beta[g * cols] = a_omega[g * cols] = 0.f;
  const float *delta = (const float *)f.delta;
  const int64_t ntok = f.B * f.L, t0 = (int64_t)blockIdx.x * jb.chunk;
  const int64_t t1 = t0 + jb.chunk < ntok ? t0 + jb.chunk : ntok;
  for (int64_t t = t0; t < t1; t++) {
    const int64_t b = t / f.L, l = t - b * f.L;
    const double p = (double)f.pos[b * f.pos_s.b + l * f.pos_s.l];
    const T *xr = (const T *)f.x + b * f.x_s.b + hx * f.x_s.h + l * f.x_s.l;
    const float re = to_f(xr[ir]), im = to_f(xr[ii]);
    float dre = 0.f, dim = 0.f;
    for (int64_t g = 0; g < G; g++) {
      const int64_t i = hx * G + g;
      const TG *gr = (const TG *)jb.grad + b * jb.grad_s.b + i * jb.grad_s.h + l * jb.grad_s.l;
      float d_re, d_im, theta;
      const float dphi = cf_rot_bwd_f32(re, im, delta[i * h + j], pair_offset(f, i, j, p), to_f(gr[ir]),
                                        to_f(gr[ii]), &d_re, &d_im, &theta);
      dre += d_re;
      dim += d_im;
      a_delta[g * cols] += dphi * theta;
      a_beta[g * cols] += dphi;
      a_omega[g * cols] += dphi * (float)p;
    }
    T *dxr = (T *)jb.dx + ((b * f.Hx + hx) * f.L + l) * d;
    dxr[ir] = from_f<T>(dre);
    dxr[ii] = from_f<T>(dim);
  }
  float *w = (float *)jb.ws + (int64_t)blockIdx.x * 3 * Hh;
  for (int64_t g = 0; g < G; g++) {
    const int64_t k = (hx * G + g) * h + j;
    w[k] = a_delta[g * cols];
    w[Hh + k] = a_beta[g * cols];
    w[2 * Hh + k] = a_omega[g * cols];
  }
}

/* Backward stage 2: thread k < H*h adds chunk partials in chunk order; threads H*h + j add the
 * shared-freqs gradient over heads, then chunks. */
__global__ void rot_bwd_reduce_kernel(CfRotBwdJob jb, int64_t P) {
  const int64_t Hh = jb.f.H * jb.f.h, k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const float *ws = (const float *)jb.ws;
  const int shared = jb.f.freqs_sh == 0;
  if (k < Hh) {
    double sd = 0.0, sb = 0.0, so = 0.0;
    for (int64_t c = 0; c < P; c++) {
      const float *w = ws + c * 3 * Hh;
      sd += w[k];
      sb += w[Hh + k];
      so += w[2 * Hh + k];
    }
    ((float *)jb.ddelta)[k] = (float)sd;
    if (jb.dbeta) ((float *)jb.dbeta)[k] = (float)sb;
    if (jb.dfreqs && !shared) ((float *)jb.dfreqs)[k] = (float)so;
  } else if (k < Hh + jb.f.h && jb.dfreqs && shared) {
    const int64_t j = k - Hh;
    double so = 0.0;
    for (int64_t i = 0; i < jb.f.H; i++)
      for (int64_t c = 0; c < P; c++) so += ws[c * 3 * Hh + 2 * Hh + i * jb.f.h + j];
    ((float *)jb.dfreqs)[j] = (float)so;
  }
}

/* Can job read and write NP pairs per thread with aligned vector loads? */
template <typename T>
bool vec_ok(const CfRotJob *jb, const void *out, int NP) {
  const int64_t elems = jb->layout == CF_LAYOUT_HALF ? NP : 2 * NP;
  int64_t bytes = elems * (int64_t)sizeof(T);
  if (bytes > 16) bytes = 16;
  const int64_t a = bytes / (int64_t)sizeof(T); /* alignment in elements */
  return jb->h % NP == 0 && (uintptr_t)jb->x % bytes == 0 && (uintptr_t)out % bytes == 0 &&
         jb->x_s.b % a == 0 && jb->x_s.h % a == 0 && jb->x_s.l % a == 0 && jb->h % a == 0;
}

template <typename T>
const char *launch_fwd(const CfRotJob *q, void *q_out, const CfRotJob *k, void *k_out, cudaStream_t s) {
  const bool vec = vec_ok<T>(q, q_out, 4) && (!k || vec_ok<T>(k, k_out, 4));
  const int NP = vec ? 4 : 1;
  const int64_t qu = q->B * q->H * q->L * (q->h / NP);
  const int64_t ku = k ? k->B * k->H * k->L * (k->h / NP) : 0;
  if (qu + ku == 0) return NULL;
  CfRotJob kk = k ? *k : *q;
  const int threads = 256;
  int64_t blocks = (qu + ku + threads - 1) / threads;
  if (blocks > (int64_t)1 << 20) blocks = (int64_t)1 << 20; /* grid-stride beyond */
  if (vec)
    rot_fwd_kernel<T, 4><<<(unsigned)blocks, threads, 0, s>>>(*q, (T *)q_out, qu, kk, (T *)k_out, ku);
  else
    rot_fwd_kernel<T, 1><<<(unsigned)blocks, threads, 0, s>>>(*q, (T *)q_out, qu, kk, (T *)k_out, ku);
  CF_LAUNCH_CHECK();
  return NULL;
}

template <typename T, typename TG>
const char *launch_bwd(const CfRotBwdJob *jb, cudaStream_t s) {
  const CfRotJob *f = &jb->f;
  const int64_t G = f->H / f->Hx, P = cf_rot_chunks(jb);
  const int cols = G <= 64 ? 64 : 32;
  const size_t smem = (size_t)3 * G * cols * sizeof(float);
  if (G > CF_ROT_CUDA_MAX_GROUP || smem > 48 * 1024) return "group size H / Hx too large for the CUDA backward";
  const int64_t col_blocks = (f->Hx * f->h + cols - 1) / cols;
  if (col_blocks > 65535) return "too many heads x pairs for the CUDA backward grid";
  if (P > 0) {
    if (P > 0x7fffffffLL) return "too many token chunks for the CUDA backward grid";
    rot_bwd_kernel<T, TG><<<dim3((unsigned)P, (unsigned)col_blocks), cols, smem, s>>>(*jb, cols);
    CF_LAUNCH_CHECK();
  }
  const int64_t n = f->H * f->h + f->h;
  rot_bwd_reduce_kernel<<<cf_ceil_div_u(n, 256), 256, 0, s>>>(*jb, P);
  CF_LAUNCH_CHECK();
  return NULL;
}

}  // namespace

extern "C" const char *cf_rotate_fwd_cuda(const CfRotJob *q, void *q_out, const CfRotJob *k,
                                          void *k_out, int device, void *stream) {
  CfDeviceGuard guard(device);
  cudaStream_t s = (cudaStream_t)stream;
  switch (q->x_dtype) {
    case CF_F32: return launch_fwd<float>(q, q_out, k, k_out, s);
    case CF_F16: return launch_fwd<__half>(q, q_out, k, k_out, s);
    case CF_BF16: return launch_fwd<__nv_bfloat16>(q, q_out, k, k_out, s);
    default: return "unsupported dtype (float32, float16, bfloat16 expected)";
  }
}

extern "C" const char *cf_rotate_bwd_cuda(const CfRotBwdJob *jb, int device, void *stream) {
  CfDeviceGuard guard(device);
  cudaStream_t s = (cudaStream_t)stream;
  const bool g32 = jb->grad_dtype == CF_F32;
  switch (jb->f.x_dtype) {
    case CF_F32: return launch_bwd<float, float>(jb, s);
    case CF_F16: return g32 ? launch_bwd<__half, float>(jb, s) : launch_bwd<__half, __half>(jb, s);
    case CF_BF16:
      return g32 ? launch_bwd<__nv_bfloat16, float>(jb, s) : launch_bwd<__nv_bfloat16, __nv_bfloat16>(jb, s);
    default: return "unsupported dtype (float32, float16, bfloat16 expected)";
  }
}
