/* Building blocks of the fused CMHA attention kernels (attn_fwd_cuda.cu, attn_bwd_cuda.cu):
 * tensor-core warp GEMMs (mma.sync m16n8k16, fp32 accumulate, operands through ldmatrix),
 * tile staging global -> shared memory with the Euler rotation fused in, and the mapping of
 * CTAs to (packed) sequence tiles.
 *
 * Shared-memory tiles are row-major [rows][D + 8]: the 16-byte pad shifts consecutive rows by
 * one 16-byte bank group, so the eight row addresses of every ldmatrix hit distinct banks.
 *
 * Register fragments (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
 *   accumulator C (16 x 8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
 *   A (16 x 16, row-major):  a0 = (g, 2t..), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
 *   B (16 x 8, "col"):       b0 = (k 2t, 2t+1; col g), b1 = (k 2t+8, 2t+9; col g)
 * so two adjacent accumulator tiles (16 x 16) are exactly one A operand: P never leaves registers. */
#ifndef CF_ATTN_CUDA_TILE_CUH
#define CF_ATTN_CUDA_TILE_CUH
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>
#include "attn.h"
#include "cuda_math.cuh"
#include "cuda_util.cuh"
#include "rotate_math.h"

/* The device pass for sm_80-class GPUs (A100, also what sm_86 / sm_89 run) allocates registers less
 * tightly than the sm_90 pass under the same 255-register cap, so the largest tiles would spill there:
 * the kernels split their streamed tiles in halves in that pass (same results, same shared memory). */
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define CF_ATTN_SM80_PASS 1
#else
#define CF_ATTN_SM80_PASS 0
#endif

namespace cfattn {

using namespace cfcuda;  // kLog2e, ex2_fast, the conversions, the PTX wrappers

constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ int64_t imin64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax64(int64_t a, int64_t b) { return a > b ? a : b; }

/* ---- element types: the mma instruction of each (conversions: cuda_math.cuh) ---- */
template <typename T> struct Ty;

template <> struct Ty<__nv_bfloat16> {
  static constexpr int BF = 1;
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<BF>(c, a, b0, b1);
  }
};

template <> struct Ty<__half> {
  static constexpr int BF = 0;
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_16816<BF>(c, a, b0, b1);
  }
};

/* Two raw 16-bit elements as one 32-bit word (element at the lower address in the low half). */
template <typename T> __device__ __forceinline__ uint32_t raw_pair(const T *p) {
  uint16_t lo, hi;
  memcpy(&lo, p, 2);
  memcpy(&hi, p + 1, 2);
  return (uint32_t)lo | ((uint32_t)hi << 16);
}

/* ---- warp GEMMs: one warp owns MB blocks of 16 rows (MB * 16 output rows) ----
 * Every B fragment loaded from shared memory feeds MB mma instructions, so shared-memory traffic per
 * tensor-core FLOP falls as 1 / MB (rows per warp): at 16 rows a warp streams its B tiles faster than
 * mma.sync consumes them on sm_80 / sm_90 and the kernel is shared-memory bound; FlashAttention-2
 * gives each warp 32 + rows for this reason. acc[m][nt] is the 16 x 8 accumulator of row block m,
 * column block nt. A operands are either re-read from shared memory per k step (_ss: few registers)
 * or held in registers (_rs: loaded once, e.g. the forward's Q tile, or P / dS computed in place). */

/* A fragments of rows [0, MB * 16) x cols [0, KT * 16) of a row-major shared tile, for the _rs GEMMs. */
template <typename T, int MB, int KT>
__device__ __forceinline__ void load_a(uint32_t (&a)[MB][KT][4], const T *sA, int lda, int lane) {
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int kk = 0; kk < KT; kk++)
      /* matrices (rows 0-7 | 8-15) x (cols kk*16 | +8) in the order a0, a1, a2, a3 */
      ldsm_x4(a[m][kk], sA + (m * 16 + (lane & 15)) * lda + kk * 16 + (lane >> 4) * 8);
}

/* The B fragments (b0, b1 of n-tiles nt and nt+1, k step kk) of B^T = sB[n][k] row-major (S = Q K^T:
 * sB = K), or of B = sB[k][n] row-major loaded transposed (TRANS: O += P V, sB = V). */
template <typename T, bool TRANS>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T *sB, int ldb, int kk, int nt, int lane) {
  if (TRANS) /* matrices: (k rows kk*16 | +8) x (cols nt*8 | +8) -> b0, b1 of nt, then b0, b1 of nt+1 */
    ldsm_x4_t(b, sB + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldb + nt * 8 + (lane >> 4) * 8);
  else       /* matrices: (n-tile nt, k kk*16), (nt, +8), (nt+1, kk*16), (nt+1, +8) */
    ldsm_x4(b, sB + (nt * 8 + (lane & 7) + (lane >> 4) * 8) * ldb + kk * 16 + ((lane >> 3) & 1) * 8);
}

/* acc (MB*16 x NT*8) += A (registers, MB*16 x KT*16) . op(B), op(B) = B^T of sB[NT*8][KT*16]
 * (TRANS = false) or B = sB[KT*16][NT*8] (TRANS = true). NT even. */
template <typename T, bool TRANS, int MB, int NT, int KT>
__device__ __forceinline__ void gemm_rs(float (&acc)[MB][NT][4], const uint32_t (&a)[MB][KT][4], const T *sB, int ldb,
                                        int lane) {
  static_assert(NT % 2 == 0, "tile shape");
#pragma unroll
  for (int kk = 0; kk < KT; kk++)
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t b[4];
      load_b<T, TRANS>(b, sB, ldb, kk, nt, lane);
#pragma unroll
      for (int m = 0; m < MB; m++) {
        Ty<T>::mma(acc[m][nt], a[m][kk], b[0], b[1]);
        Ty<T>::mma(acc[m][nt + 1], a[m][kk], b[2], b[3]);
      }
    }
}

/* acc (MB*16 x NT*8) += A . B^T with A = sA[MB*16][KT*16] read from shared memory one k step at a
 * time and B = sB[NT*8][KT*16]: S = Q K^T, dP = dO V^T and their transposes. */
template <typename T, int MB, int NT, int KT>
__device__ __forceinline__ void gemm_ss(float (&acc)[MB][NT][4], const T *sA, int lda, const T *sB, int ldb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KT; kk++) {
    uint32_t a[MB][1][4];
#pragma unroll
    for (int m = 0; m < MB; m++)
      ldsm_x4(a[m][0], sA + (m * 16 + (lane & 15)) * lda + kk * 16 + (lane >> 4) * 8);
    gemm_rs<T, false, MB, NT, 1>(acc, a, sB + kk * 16, ldb, lane);
  }
}

template <int MB, int NT> __device__ __forceinline__ void zero_acc(float (&acc)[MB][NT][4]) {
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int nt = 0; nt < NT; nt++) acc[m][nt][0] = acc[m][nt][1] = acc[m][nt][2] = acc[m][nt][3] = 0.f;
}

/* Accumulator tiles (MB*16 x KT*16, fp32) -> A fragments (16-bit) for gemm_rs: two adjacent 16 x 8
 * accumulator tiles are exactly one A operand, so P and dS never leave registers. */
template <typename T, int MB, int KT>
__device__ __forceinline__ void acc_to_a(uint32_t (&pa)[MB][KT][4], const float (&s)[MB][2 * KT][4]) {
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
      pa[m][kk][0] = pack2<T>(s[m][2 * kk][0], s[m][2 * kk][1]);
      pa[m][kk][1] = pack2<T>(s[m][2 * kk][2], s[m][2 * kk][3]);
      pa[m][kk][2] = pack2<T>(s[m][2 * kk + 1][0], s[m][2 * kk + 1][1]);
      pa[m][kk][3] = pack2<T>(s[m][2 * kk + 1][2], s[m][2 * kk + 1][3]);
    }
}

/* ---- staging global -> shared ---- */

/* Eight consecutive elements as floats: one 16-byte load when rows are aligned, else eight. */
template <typename T> __device__ __forceinline__ void load8(float (&x)[8], const T *g, bool vec) {
  if (vec) {
    const uint4 u = *reinterpret_cast<const uint4 *>(g);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const float2 f = unpack2<T>(w[i]);
      x[2 * i] = f.x;
      x[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; i++) x[i] = to_f(g[i]);
  }
}

__device__ __forceinline__ void store16(void *s, const uint32_t (&w)[4]) {
  *reinterpret_cast<uint4 *>(s) = make_uint4(w[0], w[1], w[2], w[3]);
}

/* The Euler rotation of one pair on the hot path. Every CTA rotates every key tile it visits (once
 * per query head) and, in the backward, every query tile, so this is the attention's main cost
 * besides the tensor-core work. Same math as cf_rot_fwd_f32 (rotate_math.h), with cheaper parts:
 * r = x * rsqrt(x) (x >= eps_r > 0), atan2 from a degree-6 minimax polynomial in (min/max)^2
 * (|error| < 1e-6 rad, checked against float64 over 2M normal pairs and the signed-zero /
 * quadrant edges), phi reduced to [-pi, pi] and sin/cos from the hardware approximations
 * (|error| ~ 4e-7). These errors sit far below the 16-bit rounding of the rotated value, and the
 * forward and the backward use this same function, so P recomputed in the backward matches the
 * forward's lse. */
__device__ __forceinline__ float fast_atan2(float y, float x) {
  const float ax = fabsf(x), ay = fabsf(y);
  const float mx = fmaxf(ax, ay), mn = fminf(ax, ay);
  const float a = mx > 0.f ? __fdividef(mn, mx) : 0.f;
  const float s = a * a;
  float p = 0.008006897754967213f;
  p = fmaf(p, s, -0.03744296729564667f);
  p = fmaf(p, s, 0.08435407280921936f);
  p = fmaf(p, s, -0.13512174785137177f);
  p = fmaf(p, s, 0.19887320697307587f);
  p = fmaf(p, s, -0.3332701325416565f);
  p = fmaf(p, s, 0.9999994039535522f);
  float r = a * p;                                   /* atan(min / max) in [0, pi/4] */
  if (ay > ax) r = 1.57079632679489662f - r;
  if (x < 0.f) r = 3.14159265358979324f - r;
  return copysignf(r, y);
}

__device__ __forceinline__ void rot_fast(float re, float im, float delta, float offset, float *o_re, float *o_im) {
  const float x = fmaf(re, re, fmaf(im, im, (float)CF_EPS_R));
  const float r = x * rsqrtf(x);
  float phi = fmaf(delta, fast_atan2(im, re), offset);
  phi = fmaf(-6.28318530717958647f, rintf(phi * 0.159154943091895336f), phi);
  float sn, cs;
  __sincosf(phi, &sn, &cs);
  *o_re = r * cs;
  *o_im = r * sn;
}

/* Per-head rotation parameters of one CTA, staged once: delta_j, beta_j (queries), omega_j (double,
 * for cf_pos_angle's exact reduction of omega * p). */
struct RotParams {
  const float *delta, *beta;
  const double *omega;
};

/* offset = beta_j (queries only) + cf_pos_angle(omega_j, p), as the contract defines it */
template <bool IS_Q>
__device__ __forceinline__ void rot_one(const RotParams &rp, int j, double p, float re, float im, float *o_re,
                                        float *o_im) {
  const float pa = (float)cf_pos_angle(rp.omega[j], p);
  rot_fast(re, im, rp.delta[j], IS_Q ? rp.beta[j] + pa : pa, o_re, o_im);
}

/* Rows [0, ROWS) of a (L, D) slice at g (row stride gs) into s[ROWS][LDS], Euler-rotated with the
 * positions pos[r * ps]; rows >= nvalid become zeros (never garbage: 0 * NaN would poison P V).
 * LDS = D + 8 for shared-memory tiles; the pre-rotation pass (attn_prerotate_kernel) writes global
 * rows (LDS = D) and must not touch rows >= nvalid (PAD = false: they belong to the next slice). */
template <typename T, int ROWS, int D, bool IS_Q, int LDS = D + 8, bool PAD = true>
__device__ __forceinline__ void stage_rotated(T *s, const T *g, int64_t gs, int64_t nvalid, const int64_t *pos,
                                              int64_t ps, const RotParams &rp, int layout, bool vec, int tid,
                                              int nthr) {
  constexpr int H2 = D / 2;
  if (layout == CF_LAYOUT_HALF) {
    constexpr int UPR = H2 / 8; /* units per row: 8 pairs, re at [c, c+8), im at [H2+c, H2+c+8) */
    for (int u = tid; u < ROWS * UPR; u += nthr) {
      const int r = u / UPR, c = (u % UPR) * 8;
      if (!PAD && r >= nvalid) break; /* u grows with r */
      uint32_t wre[4] = {0, 0, 0, 0}, wim[4] = {0, 0, 0, 0};
      if (r < nvalid) {
        float re[8], im[8];
        const T *row = g + r * gs;
        load8(re, row + c, vec);
        load8(im, row + H2 + c, vec);
        const double p = (double)pos[r * ps];
#pragma unroll
        for (int e = 0; e < 8; e += 2) {
          float a0, b0, a1, b1;
          rot_one<IS_Q>(rp, c + e, p, re[e], im[e], &a0, &b0);
          rot_one<IS_Q>(rp, c + e + 1, p, re[e + 1], im[e + 1], &a1, &b1);
          wre[e / 2] = pack2<T>(a0, a1);
          wim[e / 2] = pack2<T>(b0, b1);
        }
      }
      store16(s + r * LDS + c, wre);
      store16(s + r * LDS + H2 + c, wim);
    }
  } else {
    constexpr int UPR = D / 8; /* units per row: 4 interleaved pairs (re, im) at [c, c+8) */
    for (int u = tid; u < ROWS * UPR; u += nthr) {
      const int r = u / UPR, c = (u % UPR) * 8;
      if (!PAD && r >= nvalid) break;
      uint32_t w[4] = {0, 0, 0, 0};
      if (r < nvalid) {
        float x[8];
        load8(x, g + r * gs + c, vec);
        const double p = (double)pos[r * ps];
#pragma unroll
        for (int e = 0; e < 4; e++) {
          float a, b;
          rot_one<IS_Q>(rp, c / 2 + e, p, x[2 * e], x[2 * e + 1], &a, &b);
          w[e] = pack2<T>(a, b);
        }
      }
      store16(s + r * LDS + c, w);
    }
  }
}

/* Rows [0, ROWS) of a (L, D) slice into s[ROWS][D+8] unchanged (V, dO); rows >= nvalid are zeros. */
template <typename T, int ROWS, int D>
__device__ __forceinline__ void stage_plain(T *s, const T *g, int64_t gs, int64_t nvalid, bool vec, int tid,
                                            int nthr) {
  constexpr int LDS = D + 8, UPR = D / 8;
  for (int u = tid; u < ROWS * UPR; u += nthr) {
    const int r = u / UPR, c = (u % UPR) * 8;
    uint32_t w[4] = {0, 0, 0, 0};
    if (r < nvalid) {
      const T *src = g + r * gs + c;
      if (vec) {
        const uint4 v = *reinterpret_cast<const uint4 *>(src);
        w[0] = v.x, w[1] = v.y, w[2] = v.z, w[3] = v.w;
      } else {
#pragma unroll
        for (int i = 0; i < 4; i++) w[i] = raw_pair(src + 2 * i);
      }
    }
    store16(s + r * LDS + c, w);
  }
}

/* ---- asynchronous staging (cp.async, sm_80+) for tiles that need no arithmetic on the way ----
 * The pre-rotated kernels (q~, k~ from the pre-rotation pass) only copy tiles, so the copy of tile
 * i+1 runs in the background (cp.async into the second buffer) while tile i is on the tensor cores. */
/* stage_plain through cp.async when rows are 16-byte aligned (completion: cp_async_wait, then a
 * barrier), else synchronously; rows >= nvalid are zeroed with ordinary stores. */
template <typename T, int ROWS, int D>
__device__ __forceinline__ void stage_async(T *s, const T *g, int64_t gs, int64_t nvalid, bool vec, int tid,
                                            int nthr) {
  if (!vec) {
    stage_plain<T, ROWS, D>(s, g, gs, nvalid, false, tid, nthr);
    return;
  }
  constexpr int LDS = D + 8, UPR = D / 8;
  for (int u = tid; u < ROWS * UPR; u += nthr) {
    const int r = u / UPR, c = (u % UPR) * 8;
    if (r < nvalid)
      cp_async16(s + r * LDS + c, g + r * gs + c);
    else
      *reinterpret_cast<uint4 *>(s + r * LDS + c) = make_uint4(0, 0, 0, 0);
  }
}

/* One 16-byte chunk: a vector load when rows are aligned, else eight 2-byte loads; zeros if !ok. */
template <typename T> __device__ __forceinline__ uint4 load_chunk(const T *g, bool ok, bool vec) {
  if (!ok) return make_uint4(0, 0, 0, 0);
  if (vec) return __ldg(reinterpret_cast<const uint4 *>(g));
  return make_uint4(raw_pair(g), raw_pair(g + 2), raw_pair(g + 4), raw_pair(g + 6));
}

/* Rotate the four packed pairs of a chunk for the "half" layout: re chunk wr, im chunk wi hold
 * pairs j0 .. j0+7; the results are packed back in place. */
template <typename T, bool IS_Q>
__device__ __forceinline__ void rotate_half_chunks(uint4 &wr, uint4 &wi, const RotParams &rp, int j0, double p) {
  uint32_t r4[4] = {wr.x, wr.y, wr.z, wr.w}, i4[4] = {wi.x, wi.y, wi.z, wi.w};
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const float2 re = unpack2<T>(r4[e]), im = unpack2<T>(i4[e]);
    float a0, b0, a1, b1;
    rot_one<IS_Q>(rp, j0 + 2 * e, p, re.x, im.x, &a0, &b0);
    rot_one<IS_Q>(rp, j0 + 2 * e + 1, p, re.y, im.y, &a1, &b1);
    r4[e] = pack2<T>(a0, a1);
    i4[e] = pack2<T>(b0, b1);
  }
  wr = make_uint4(r4[0], r4[1], r4[2], r4[3]);
  wi = make_uint4(i4[0], i4[1], i4[2], i4[3]);
}

/* The same for an "interleaved" chunk: four (re, im) pairs j0 .. j0+3. */
template <typename T, bool IS_Q>
__device__ __forceinline__ void rotate_inter_chunk(uint4 &w, const RotParams &rp, int j0, double p) {
  uint32_t x4[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; e++) {
    const float2 x = unpack2<T>(x4[e]);
    float a, b;
    rot_one<IS_Q>(rp, j0 + e, p, x.x, x.y, &a, &b);
    x4[e] = pack2<T>(a, b);
  }
  w = make_uint4(x4[0], x4[1], x4[2], x4[3]);
}

/* A key tile (rotated when staged) and its value tile, held raw in registers between the global
 * loads and the staging into shared memory. The forward issues the loads of tile i+1 right after
 * staging tile i, so their latency hides behind tile i's tensor-core work (one CTA per SM leaves
 * no other CTA to cover it). Thread tid owns units u = tid + i * NTHR:
 *   K, half layout:        unit = (row u / (H2/8), cols c and H2 + c), c = (u % (H2/8)) * 8
 *   K, interleaved layout: unit = (row u / (D/8), cols c .. c+7),    c = (u % (D/8)) * 8
 *   V:                     chunk = (row u / (D/8), cols c .. c+7)
 * Both K mappings use NCH chunks per thread; key tid's validity is held by thread tid. */
template <typename T, int ROWS, int D, int NTHR>
struct KVPrefetch {
  static constexpr int H2 = D / 2, NCH = ROWS * D / 8 / NTHR, LDS = D + 8;
  static_assert((ROWS * D / 8) % (2 * NTHR) == 0 && ROWS <= NTHR, "tile must split evenly over the threads");
  uint4 kc[NCH], vc[NCH];
  int64_t kpos[NCH];
  bool kvalid;

  __device__ __forceinline__ void load(const CfAttnArgs &a, const T *kg, const T *vg, const int64_t *kp, int64_t b,
                                       int64_t n0, int64_t nv, bool vec, int tid) {
    if (a.layout == CF_LAYOUT_HALF) {
#pragma unroll
      for (int i = 0; i < NCH / 2; i++) {
        const int u = tid + i * NTHR, r = u / (H2 / 8), c = (u % (H2 / 8)) * 8;
        const T *row = kg + (n0 + r) * a.k_s.l;
        kc[2 * i] = load_chunk(row + c, r < nv, vec);
        kc[2 * i + 1] = load_chunk(row + H2 + c, r < nv, vec);
        kpos[i] = r < nv ? kp[(n0 + r) * a.kpos_s.l] : 0;
      }
    } else {
#pragma unroll
      for (int i = 0; i < NCH; i++) {
        const int u = tid + i * NTHR, r = u / (D / 8), c = (u % (D / 8)) * 8;
        kc[i] = load_chunk(kg + (n0 + r) * a.k_s.l + c, r < nv, vec);
        kpos[i] = r < nv ? kp[(n0 + r) * a.kpos_s.l] : 0;
      }
    }
#pragma unroll
    for (int i = 0; i < NCH; i++) {
      const int u = tid + i * NTHR, r = u / (D / 8), c = (u % (D / 8)) * 8;
      vc[i] = load_chunk(vg + (n0 + r) * a.v_s.l + c, r < nv, vec);
    }
    kvalid = tid < nv && (!a.kpm || a.kpm[b * a.kpm_s.b + (n0 + tid) * a.kpm_s.l]);
  }

  /* Rotate K into sK, copy V into sV, key validity into s_kvalid. Rows >= nv become zeros. */
  __device__ __forceinline__ void store(T *sK, T *sV, float *s_kvalid, const RotParams &rp, int layout, int64_t nv,
                                        int tid) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    if (layout == CF_LAYOUT_HALF) {
#pragma unroll
      for (int i = 0; i < NCH / 2; i++) {
        const int u = tid + i * NTHR, r = u / (H2 / 8), c = (u % (H2 / 8)) * 8;
        uint4 wr = zero, wi = zero;
        if (r < nv) {
          wr = kc[2 * i], wi = kc[2 * i + 1];
          rotate_half_chunks<T, false>(wr, wi, rp, c, (double)kpos[i]);
        }
        *reinterpret_cast<uint4 *>(sK + r * LDS + c) = wr;
        *reinterpret_cast<uint4 *>(sK + r * LDS + H2 + c) = wi;
      }
    } else {
#pragma unroll
      for (int i = 0; i < NCH; i++) {
        const int u = tid + i * NTHR, r = u / (D / 8), c = (u % (D / 8)) * 8;
        uint4 w = zero;
        if (r < nv) {
          w = kc[i];
          rotate_inter_chunk<T, false>(w, rp, c / 2, (double)kpos[i]);
        }
        *reinterpret_cast<uint4 *>(sK + r * LDS + c) = w;
      }
    }
#pragma unroll
    for (int i = 0; i < NCH; i++) {
      const int u = tid + i * NTHR, r = u / (D / 8), c = (u % (D / 8)) * 8;
      *reinterpret_cast<uint4 *>(sV + r * LDS + c) = vc[i];
    }
    if (tid < ROWS) s_kvalid[tid] = kvalid ? 1.f : 0.f;
  }
};

/* Per-head parameters into shared memory (h = D/2 entries each). */
__device__ __forceinline__ void stage_params(const CfAttnArgs &a, int64_t head, int h2, float *s_delta,
                                             float *s_beta, double *s_omega, int tid, int nthr) {
  for (int j = tid; j < h2; j += nthr) {
    s_delta[j] = ((const float *)a.delta)[head * (a.d / 2) + j];
    s_beta[j] = ((const float *)a.beta)[head * (a.d / 2) + j];
    s_omega[j] = (double)((const float *)a.freqs)[head * a.freqs_sh + j];
  }
}

/* Key validity of keys [n0, n0 + rows) (1 = may attend): inside the sequence and not padded. */
__device__ __forceinline__ void stage_key_valid(const CfAttnArgs &a, int64_t b, int64_t n0, int64_t nvalid, int rows,
                                                float *s_valid, int tid, int nthr) {
  for (int i = tid; i < rows; i += nthr)
    s_valid[i] = (i < nvalid && (!a.kpm || a.kpm[b * a.kpm_s.b + (n0 + i) * a.kpm_s.l])) ? 1.f : 0.f;
}

/* ---- pre-rotation pass ----
 * dst (B, H, L, D) contiguous = the Euler-rotated q (IS_Q, with beta) or k (per QUERY head: row block
 * of head hq is rotated with head hq's delta from kv head hq / (H / Hkv)), in the input's layout.
 * The same rot_fast as the GQA forward's tile loader, so a kernel reading dst sees bit-identical
 * tiles. Grid (ceil(L / kPrerotRows), H, B), 256 threads. The glue allocates dst (torch), only where
 * the memory rule allows it (docs/design.md, "Memory": the forward when H == Hkv, the backward
 * always, whose outputs are (B, H, Lk, d) anyway). */
constexpr int kPrerotRows = 128; /* rows per CTA of the pre-rotation pass (256 threads) */

template <typename T, int D, bool IS_Q>
__global__ void __launch_bounds__(256) attn_prerotate_kernel(const CfAttnArgs a, T *dst) {
  constexpr int ROWS = kPrerotRows, H2 = D / 2;
  __shared__ double s_omega[H2];
  __shared__ float s_delta[H2], s_beta[H2];
  const int64_t hq = blockIdx.y, b = blockIdx.z, L = IS_Q ? a.Lq : a.Lk, r0 = (int64_t)blockIdx.x * ROWS;
  const int64_t hs = IS_Q ? hq : hq / (a.H / a.Hkv);
  stage_params(a, hq, H2, s_delta, s_beta, s_omega, threadIdx.x, 256);
  __syncthreads();
  const RotParams rp = {s_delta, s_beta, s_omega};
  const T *src = IS_Q ? (const T *)a.q + b * a.q_s.b + hs * a.q_s.h + r0 * a.q_s.l
                      : (const T *)a.k + b * a.k_s.b + hs * a.k_s.h + r0 * a.k_s.l;
  const int64_t *pos = IS_Q ? a.q_pos + b * a.qpos_s.b + r0 * a.qpos_s.l : a.k_pos + b * a.kpos_s.b + r0 * a.kpos_s.l;
  stage_rotated<T, ROWS, D, IS_Q, D, false>(dst + ((b * a.H + hq) * L + r0) * D, src, IS_Q ? a.q_s.l : a.k_s.l,
                                            imin64(ROWS, L - r0), pos, IS_Q ? a.qpos_s.l : a.kpos_s.l, rp, a.layout,
                                            a.vec != 0, threadIdx.x, 256);
}

/* Launch the pre-rotation of q into a.q_rot and of k into a.k_rot (each when set). */
template <typename T, int D> static inline const char *launch_prerotate(const CfAttnArgs &a, cudaStream_t st) {
  if (a.q_rot && a.Lq > 0) {
    attn_prerotate_kernel<T, D, true><<<dim3(cf_ceil_div_u(a.Lq, kPrerotRows), (unsigned)a.H, (unsigned)a.B), 256, 0, st>>>(
        a, (T *)a.q_rot);
    CF_LAUNCH_CHECK();
  }
  if (a.k_rot && a.Lk > 0) {
    attn_prerotate_kernel<T, D, false><<<dim3(cf_ceil_div_u(a.Lk, kPrerotRows), (unsigned)a.H, (unsigned)a.B), 256, 0, st>>>(
        a, (T *)a.k_rot);
    CF_LAUNCH_CHECK();
  }
  return NULL;
}

/* ---- CTA -> tile ---- */
struct Span {
  int64_t lo, hi;          /* rows of this tile */
  int64_t seq_lo, seq_hi;  /* the sequence it lies in (packed batches), else [0, L) */
};

/* Tile t of R rows along a dimension of length L. Packed batches (cu_seqlens): tiles never straddle
 * two sequences; the grid has ceil(L / R) + nseq CTAs (an upper bound), the surplus returns false.
 * cu_seqlens is clamped to [0, L] so a malformed table cannot send a CTA out of bounds. */
__device__ __forceinline__ bool map_tile(const CfAttnArgs &a, int64_t t, int R, int64_t L, Span &s) {
  if (!a.cu_seqlens) {
    s.lo = t * R;
    s.hi = imin64(s.lo + R, L);
    s.seq_lo = 0;
    s.seq_hi = L;
    return s.lo < L;
  }
  int64_t acc = 0;
  for (int64_t i = 0; i < a.nseq; i++) {
    const int64_t b0 = imin64(imax64(a.cu_seqlens[i], 0), L);
    const int64_t e0 = imin64(imax64(a.cu_seqlens[i + 1], b0), L);
    const int64_t n = (e0 - b0 + R - 1) / R;
    if (t < acc + n) {
      s.lo = b0 + (t - acc) * R;
      s.hi = imin64(s.lo + R, e0);
      s.seq_lo = b0;
      s.seq_hi = e0;
      return true;
    }
    acc += n;
  }
  return false;
}

static inline unsigned num_tiles(const CfAttnArgs &a, int R, int64_t L) {
  return (unsigned)((L + R - 1) / R + (a.cu_seqlens ? a.nseq : 0));
}

/* Do two CTAs with `bytes` of dynamic shared memory each fit on one SM of the current device? */
static inline bool two_ctas_fit(size_t bytes) {
  int dev = 0, per_sm = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    return false;
  return (size_t)per_sm >= 2 * (bytes + 1024); /* the driver reserves 1 KB per CTA */
}

/* Raise the dynamic shared-memory limit of a kernel (needed above 48 KB); NULL or an error message.
 * The largest configuration (backward dq, d = 128) needs 106 KB: fine on sm_80 / sm_90 data-center
 * GPUs (163 / 227 KB), too much for sm_86 / sm_89 (99 KB), which get a clear error instead. */
template <typename K> static inline const char *allow_smem(K kernel, size_t bytes) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return "cannot query the device's shared-memory limit";
  if ((size_t)optin < bytes)
    return "this GPU allows too little shared memory per block for the fused attention kernel (it needs up to "
           "106 KB at d = 128); use backend='sdpa'";
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
  return e == cudaSuccess ? NULL : cudaGetErrorString(e);
}

/* Launch kern over grid (tiles of `rows` along L, H, B) with `nthr` threads and `smem` bytes of
 * dynamic shared memory on stream st; NULL or an error message. */
template <typename K>
static inline const char *launch_tiles(K kern, size_t smem, int nthr, int rows, int64_t L, const CfAttnArgs &a,
                                       cudaStream_t st) {
  if (const char *err = allow_smem(kern, smem)) return err;
  const dim3 grid(num_tiles(a, rows, L), (unsigned)a.H, (unsigned)a.B);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return NULL;
  kern<<<grid, nthr, smem, st>>>(a);
  CF_LAUNCH_CHECK();
  return NULL;
}

}  // namespace cfattn
#endif
