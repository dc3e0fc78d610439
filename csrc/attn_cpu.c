/* Fused CMHA attention on the CPU: FlashAttention-style tiles with the Euler rotation fused into
 * the tile loads (docs/design.md, "Attention").
 *
 * Forward. Work items are (batch, query head, run of query tiles), OpenMP-scheduled. An item
 * rotates the keys its rows can see once, with its query head's delta and positions, into a
 * per-thread buffer of transposed BK-key tiles (so GQA never needs a per-query-head copy of K in
 * memory), then streams its BQ-row query tiles over the visible key tiles with an online softmax
 * (running max and sum). Key tiles wholly hidden by causality or packed-sequence boundaries are
 * never touched, which halves causal work. With a single query tile (decoding) the key rotation
 * is nearly all the work, so its head-independent parts (each key pair's modulus and angle per kv
 * head, the positional angles per batch row) are computed once per call first (KeyPolar in
 * attn_cpu_tmpl.h) and each item only applies its head's delta: same values, far fewer atan2.
 *
 * Backward (FlashAttention-2 order). Work items are (batch, query head, run of key tiles). An item
 * recomputes the rotated keys of its run once, then visits every query tile that can see them:
 * P is recomputed from the saved lse, D = rowsum(dout * out), and dk~ / dv accumulate in the
 * item's own rows of dk_rot / dv_full while the item's dq~ contribution goes to its own buffer.
 * With one run per (batch, head) - the usual case - that buffer is dq_rot itself; otherwise the
 * partial buffers are summed in a fixed order afterwards. No atomics, deterministic.
 *
 * The key-padding mask is applied element-wise inside the visited tiles; a row that sees no key
 * gets out = 0 and lse = -inf (never NaN).
 *
 * Speed: all tile products go through one register-blocked GEMM (attn_cpu_tmpl.h) whose operands
 * are laid out with the output dimension contiguous (keys are stored transposed for Q K^T). The
 * float32 rotation uses the vectorisable atan2 / sincos of fast_trig.h (libm per pair cost as much
 * as the attention arithmetic); float64 goes through rotate_math.h's cf_rot_fwd_f64 (or, in the
 * few-query forward, the same formula split in two). The per-item functions are cloned for
 * AVX-512 / AVX2 / portable targets.
 *
 * Memory (per thread, malloc'd per call and freed before returning): forward Lk * d rotated keys
 * plus tiles of 64 x max(d, dv, 64), and with a single query tile one shared buffer of
 * B * (Hkv * d + nf * d/2) * Lk elements (polar forms; positional angles, nf = 1 for shared freqs,
 * H for per-head ones; at most 256 MB, beyond which items rotate whole keys again); backward
 * (2 d + dv) * (keys of the item) plus tiles. At L = 16384, d = dv = 64, float32: 4 MB / 12 MB
 * per thread. The backward adds (splits - 1) partial dq copies of B*H*Lq*d (capped at 256 MB)
 * only when B*H < 2 * threads. Nothing is O(L^2).
 * The element-type-generic code is in attn_cpu_tmpl.h, included below for float and double. */
/* -std=c11 turns floating-point contraction off; the tile GEMMs need a*b+c fused into one FMA
 * (twice the throughput, and one rounding instead of two). */
#pragma GCC optimize("fp-contract=fast")
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include "attn.h"
#include "fast_trig.h"
#include "fast_exp.h" /* cf_exp_f32: the vectorisable float32 exp, shared with the PDL kernels */
#include "rotate_math.h"

enum {
  BQ = 64, /* query rows per tile */
  BK = 64, /* keys per tile */
  MR = 6,  /* rows of the tile GEMMs' register block (6 rows x 2 ymm: 12 accumulators) */
  NR = 16, /* lanes of the row reductions (softmax max / sum); BK is a multiple */
};
/* Largest buffer of the few-query forward's precomputed key polar forms (attn_cpu_tmpl.h). */
#define KEY_POLAR_MAX_BYTES (256.0 * 1024 * 1024)

/* The per-item functions get an AVX-512 and an AVX2 clone (picked at load time); the portable
 * default stays. They hold the whole tile loop so the dispatch cost is paid once per item. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 11
#define CF_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CF_HOT CF_CLONES
#endif

/* Helpers of the hot loops must inline into each clone: an out-of-line static helper would be
 * compiled once, for the portable default target. */
#define CF_AI static inline __attribute__((always_inline))

static void *cf_aligned_alloc(size_t bytes) {
  size_t n = (bytes + 63) / 64 * 64;
  return aligned_alloc(64, n ? n : 64);
}
static void cf_aligned_free(void *ptr) { free(ptr); }

/* The query rows of one tile and, per row, the half-open index range of keys it may see
 * (causality and packed-sequence boundaries; the key-padding mask is applied on top). */
typedef struct {
  int64_t m0, nq;
  int64_t rlo[BQ], rhi[BQ];
  int64_t lo, hi;         /* union of the non-empty rows' ranges (hi <= lo: nothing visible) */
  int64_t lo_max, hi_min; /* over all rows: a key tile inside [lo_max, hi_min) needs no mask */
  int need_mask;          /* a key-padding mask is present */
} AttnRows;

static void rows_init(const CfAttnArgs *p, int64_t t, AttnRows *rows) {
  rows->m0 = t * BQ;
  rows->nq = p->Lq - rows->m0 < BQ ? p->Lq - rows->m0 : BQ;
  rows->lo = p->Lk;
  rows->hi = 0;
  rows->lo_max = 0;
  rows->hi_min = p->Lk;
  rows->need_mask = p->kpm != NULL;
  for (int64_t r = 0; r < rows->nq; r++) {
    int64_t m = rows->m0 + r, lo = 0, hi = p->Lk;
    if (p->cu_seqlens) {
      /* the sequence s with cu[s] <= m < cu[s + 1] (empty sequences are skipped over) */
      int64_t a = 0, z = p->nseq;
      while (z - a > 1) {
        int64_t mid = (a + z) / 2;
        if (p->cu_seqlens[mid] <= m) a = mid; else z = mid;
      }
      lo = p->cu_seqlens[a];
      hi = p->cu_seqlens[a + 1];
      if (p->causal && hi > m + 1) hi = m + 1;
    } else if (p->causal) {  /* n <= m + q_offset, with no int64 overflow for extreme offsets */
      if (p->q_offset >= p->Lk) hi = p->Lk;
      else if (p->q_offset < -p->Lq - 1) hi = 0;
      else {
        int64_t lim = m + p->q_offset + 1;
        hi = lim < 0 ? 0 : lim < p->Lk ? lim : p->Lk;
      }
    }
    rows->rlo[r] = lo;
    rows->rhi[r] = hi;
    if (lo > rows->lo_max) rows->lo_max = lo;
    if (hi < rows->hi_min) rows->hi_min = hi;
    if (hi > lo) {
      if (lo < rows->lo) rows->lo = lo;
      if (hi > rows->hi) rows->hi = hi;
    }
  }
}

static inline int visible(const CfAttnArgs *p, int64_t b, const AttnRows *rows, int64_t r,
                          int64_t n) {
  return n >= rows->rlo[r] && n < rows->rhi[r] &&
         (!p->kpm || p->kpm[b * p->kpm_s.b + n * p->kpm_s.l]);
}

/* Rotate the h pairs of one token row: dst = mul * rot(x) with phase offsets off[j]
 * (positional angle, plus beta for queries). float64 is the reference-accuracy path through
 * rotate_math.h; float32 evaluates the same formula with the vectorisable atan2 / sincos of
 * fast_trig.h, because scalar libm calls here cost as much as the attention arithmetic. */
CF_AI void rotate_pairs_f64(int layout, int64_t h, const double *restrict x,
                            const double *restrict delta, const double *restrict off, double mul,
                            double *restrict dst) {
  for (int64_t j = 0; j < h; j++) {
    int64_t ire = cf_re_index(layout, j, h), iim = cf_im_index(layout, j, h);
    double re, im;
    cf_rot_fwd_f64(x[ire], x[iim], delta[j], off[j], &re, &im);
    dst[ire] = mul * re;
    dst[iim] = mul * im;
  }
}

/* A pair's rotation in two halves: its polar form (r, theta), which does not depend on the head,
 * and the head's part (phi = delta * theta + off; mul * r (cos phi, sin phi)). rotate_pair_f32 is
 * the two in a row; the few-query forward (attn_cpu_tmpl.h, KeyPolar) computes the first once per
 * kv head and the second per query head, so both paths evaluate the same operations. */
CF_AI void pair_polar_f32(float re, float im, float *r, float *theta) {
  *r = sqrtf(re * re + im * im + (float)CF_EPS_R);
  *theta = cf_fast_atan2f(im, re);
}

CF_AI void pair_from_polar_f32(float r, float theta, float delta, float off, float mul, float *out_re,
                               float *out_im) {
  float s, c;
  cf_fast_sincosf(delta * theta + off, &s, &c);
  *out_re = mul * r * c;
  *out_im = mul * r * s;
}

CF_AI void rotate_pair_f32(float re, float im, float delta, float off, float mul, float *out_re,
                           float *out_im) {
  float r, theta;
  pair_polar_f32(re, im, &r, &theta);
  pair_from_polar_f32(r, theta, delta, off, mul, out_re, out_im);
}

/* float64: rotate_math.h's own split of cf_rot_fwd_f64 (libm atan2 / sin / cos), times mul as in
 * rotate_pairs_f64. */
CF_AI void pair_polar_f64(double re, double im, double *r, double *theta) {
  cf_rot_polar_f64(re, im, r, theta);
}

CF_AI void pair_from_polar_f64(double r, double theta, double delta, double off, double mul,
                               double *out_re, double *out_im) {
  double re, im;
  cf_rot_from_polar_f64(r, theta, delta, off, &re, &im);
  *out_re = mul * re;
  *out_im = mul * im;
}

CF_AI void rotate_pairs_f32(int layout, int64_t h, const float *restrict x,
                            const float *restrict delta, const float *restrict off, float mul,
                            float *restrict dst) {
  if (layout == CF_LAYOUT_HALF) { /* separate loops so each has unit-stride (or stride-2) access */
    for (int64_t j = 0; j < h; j++)
      rotate_pair_f32(x[j], x[j + h], delta[j], off[j], mul, &dst[j], &dst[j + h]);
  } else {
    for (int64_t j = 0; j < h; j++)
      rotate_pair_f32(x[2 * j], x[2 * j + 1], delta[j], off[j], mul, &dst[2 * j], &dst[2 * j + 1]);
  }
}

#define T float
#define SUF f32
#define CF_EXP(x) cf_exp_f32(x)
#include "attn_cpu_tmpl.h"
#undef T
#undef SUF
#undef CF_EXP

#define T double
#define SUF f64
#define CF_EXP(x) exp(x)
#include "attn_cpu_tmpl.h"
#undef T
#undef SUF
#undef CF_EXP

int cf_attn_fwd_cpu(const CfAttnArgs *p) {
  return p->dtype == CF_F64 ? attn_fwd_f64(p) : attn_fwd_f32(p);
}

int cf_attn_bwd_cpu(const CfAttnArgs *p) {
  return p->dtype == CF_F64 ? attn_bwd_f64(p) : attn_bwd_f32(p);
}
