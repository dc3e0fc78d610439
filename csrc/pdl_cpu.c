/* PDL on the CPU: token counting and the fused loss + gradient (math in pdl_math.h).
 *
 * pdl_loss does one pass per row, Liger-Kernel style: the forward writes the gradient of the
 * summed row losses, so the backward is a rescale (or nothing when grad_output == 1). A row is
 * three sweeps over V values that stay in L1/L2 (a 32000-float row is 128 KB): max; exp, sum and
 * store e_c in the gradient buffer; scale e_c in place. Each sweep is a flat loop over 16
 * independent lanes, which gcc vectorises without -ffast-math (no reassociation is needed: each
 * lane is its own accumulator, and float32 lane sums are folded into double every block of
 * 1024 elements, so float32 rows of any length sum accurately). Rows are split over OpenMP
 * threads; no N x V temporary exists beyond the gradient itself. Every offset is int64. */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "pdl.h"

#define LANES 16
#define BLOCK 1024 /* multiple of LANES */

/* ---------------- token_counts ---------------- */

#define DEFINE_COUNT(T, SUF)                                                                   \
  static void count_range_##SUF(const T *restrict ids, int64_t lo, int64_t hi, int64_t ignore, \
                                int64_t *restrict h, int64_t V, int64_t *bad_pos) {            \
    for (int64_t i = lo; i < hi; i++) {                                                        \
      int64_t id = (int64_t)ids[i];                                                            \
      if (id == ignore) continue;                                                              \
      if ((uint64_t)id >= (uint64_t)V) {                                                       \
        if (*bad_pos < 0) *bad_pos = i;                                                        \
        continue;                                                                              \
      }                                                                                        \
      h[id]++;                                                                                 \
    }                                                                                          \
  }
DEFINE_COUNT(int32_t, i32)
DEFINE_COUNT(int64_t, i64)

static void count_range(const void *ids, int i64, int64_t lo, int64_t hi, int64_t ignore,
                        int64_t *h, int64_t V, int64_t *bad_pos) {
  if (i64) count_range_i64((const int64_t *)ids, lo, hi, ignore, h, V, bad_pos);
  else count_range_i32((const int32_t *)ids, lo, hi, ignore, h, V, bad_pos);
}

int cf_pdl_token_counts_cpu(const void *ids, int ids_i64, int64_t n, int64_t ignore_index,
                            int64_t *counts, int64_t V, int nthreads, int64_t *bad_pos,
                            int64_t *bad_value) {
  /* Private histograms cost O(threads * V) to clear and merge: give each thread at least ~V/2
   * ids, else one thread counts straight into the output. */
  int64_t want = n / (V / 2 + 1);
  int nt = nthreads < 1 ? 1 : nthreads;
  if (want < nt) nt = want < 1 ? 1 : (int)want;
  int64_t first_bad = -1;
  memset(counts, 0, (size_t)V * sizeof(int64_t));
  int64_t *priv = NULL;
  if (nt > 1) {
    priv = (int64_t *)calloc((size_t)(nt - 1) * (size_t)V, sizeof(int64_t));
    if (!priv) nt = 1; /* memory is tight: count serially */
  }
  if (nt == 1) {
    count_range(ids, ids_i64, 0, n, ignore_index, counts, V, &first_bad);
  } else {
    int64_t *bad = (int64_t *)malloc((size_t)nt * sizeof(int64_t));
    if (!bad) {
      free(priv);
      priv = NULL;
      count_range(ids, ids_i64, 0, n, ignore_index, counts, V, &first_bad);
    } else {
#pragma omp parallel num_threads(nt)
      {
#ifdef _OPENMP
        int tid = omp_get_thread_num(), cnt = omp_get_num_threads();
#else
        int tid = 0, cnt = 1;
#endif
        /* thread 0 counts into the output, thread k > 0 into priv[k-1] */
        for (int k = tid; k < nt; k += cnt) {
          int64_t lo = n * k / nt, hi = n * (k + 1) / nt;
          bad[k] = -1;
          count_range(ids, ids_i64, lo, hi, ignore_index, k ? priv + (int64_t)(k - 1) * V : counts,
                      V, &bad[k]);
        }
#pragma omp barrier
        /* fixed-order merge, split over V */
#pragma omp for schedule(static)
        for (int64_t v = 0; v < V; v++) {
          int64_t s = counts[v];
          for (int k = 0; k < nt - 1; k++) s += priv[(int64_t)k * V + v];
          counts[v] = s;
        }
      }
      for (int k = 0; k < nt; k++)
        if (bad[k] >= 0) {
          first_bad = bad[k];
          break;
        }
      free(bad);
    }
    free(priv);
  }
  if (first_bad >= 0) {
    *bad_pos = first_bad;
    *bad_value = ids_i64 ? ((const int64_t *)ids)[first_bad] : ((const int32_t *)ids)[first_bad];
    return -1;
  }
  return 0;
}

/* ---------------- pdl_loss ---------------- */

static inline int64_t target_at(const CfPdlArgs *a, int64_t r) {
  return a->targets_i64 ? ((const int64_t *)a->targets)[r] : (int64_t)((const int32_t *)a->targets)[r];
}

/* The row kernel, written once for float and double. EXP is cf_exp_f32 (vectorisable) for
 * float and libm exp for double. Returns the row's loss in double. */
#define DEFINE_ROW(T, SUF, EXP)                                                                  \
  CF_CLONES static double row_##SUF(const T *restrict z, T *restrict g, const T *restrict w,      \
                                    int64_t V, int64_t y, double W, double eps, double inv_norm) { \
    /* sweep 1: max */                                                                          \
    T mx[LANES];                                                                                \
    for (int l = 0; l < LANES; l++) mx[l] = -INFINITY;                                          \
    int64_t c = 0;                                                                              \
    for (; c + LANES <= V; c += LANES)                                                          \
      for (int l = 0; l < LANES; l++) mx[l] = z[c + l] > mx[l] ? z[c + l] : mx[l];              \
    T m = -INFINITY;                                                                            \
    for (int l = 0; l < LANES; l++) m = mx[l] > m ? mx[l] : m;                                  \
    for (; c < V; c++) m = z[c] > m ? z[c] : m;                                                 \
    /* all -inf (or NaN only): shift by 0, the sums below give the right -inf / NaN */          \
    if (!(m > -INFINITY)) m = 0;                                                                \
    /* sweep 2: e_c = exp(z_c - m) into g, s = sum e_c, swz = sum w_c z_c (smoothing only) */   \
    double s = 0.0, swz = 0.0;                                                                  \
    for (int64_t b0 = 0; b0 < V; b0 += BLOCK) {                                                 \
      int64_t b1 = b0 + BLOCK < V ? b0 + BLOCK : V;                                             \
      T sl[LANES], wl[LANES];                                                                   \
      for (int l = 0; l < LANES; l++) sl[l] = 0, wl[l] = 0;                                     \
      int64_t k = b0;                                                                           \
      if (g) {                                                                                  \
        for (; k + LANES <= b1; k += LANES)                                                     \
          for (int l = 0; l < LANES; l++) {                                                     \
            T e = EXP(z[k + l] - m);                                                            \
            g[k + l] = e;                                                                       \
            sl[l] += e;                                                                         \
          }                                                                                     \
      } else { /* loss only (no gradient wanted) */                                             \
        for (; k + LANES <= b1; k += LANES)                                                     \
          for (int l = 0; l < LANES; l++) sl[l] += EXP(z[k + l] - m);                           \
      }                                                                                         \
      for (; k < b1; k++) {                                                                     \
        T e = EXP(z[k] - m);                                                                    \
        if (g) g[k] = e;                                                                        \
        sl[0] += e;                                                                             \
      }                                                                                         \
      if (eps > 0.0) {                                                                          \
        k = b0;                                                                                 \
        for (; k + LANES <= b1; k += LANES)                                                     \
          for (int l = 0; l < LANES; l++) wl[l] += w[k + l] * z[k + l];                         \
        for (; k < b1; k++) wl[0] += w[k] * z[k];                                               \
      }                                                                                         \
      for (int l = 0; l < LANES; l++) s += (double)sl[l], swz += (double)wl[l];                 \
    }                                                                                           \
    double wy = (double)w[y];                                                                   \
    double lse = (double)m + log(s);                                                            \
    double loss = cf_pdl_row_loss(lse, (double)z[y], wy, W, swz, (double)V, eps, inv_norm);     \
    if (!g) return loss;                                                                        \
    /* sweep 3: dz_c = e_c A - B w_c - [c == y] C */                                             \
    CfPdlCoef co = cf_pdl_coef(wy, W, (double)V, eps, inv_norm);                                \
    const T A = (T)(co.A_times_s / s), Bc = (T)co.B;                                            \
    if (eps > 0.0)                                                                              \
      for (int64_t k = 0; k < V; k++) g[k] = g[k] * A - Bc * w[k];                              \
    else                                                                                        \
      for (int64_t k = 0; k < V; k++) g[k] = g[k] * A;                                          \
    g[y] -= (T)co.C;                                                                            \
    return loss;                                                                                \
  }

DEFINE_ROW(float, f32, cf_exp_f32)
DEFINE_ROW(double, f64, exp)

int cf_pdl_loss_cpu(const CfPdlArgs *a, int is_f64, double norm, int nthreads, int64_t *bad_pos,
                    int64_t *bad_value) {
  const int64_t N = a->B * a->T, V = a->V;
  /* serial prologue: validate targets, sum the target weights (the mean's denominator) and the
   * class weights (smoothing), in double and in a fixed order */
  double wsum = 0.0, W = 0.0;
  for (int64_t r = 0; r < N; r++) {
    int64_t y = target_at(a, r);
    if (y == a->ignore_index) continue;
    if ((uint64_t)y >= (uint64_t)V) {
      *bad_pos = r;
      *bad_value = y;
      return -1;
    }
    wsum += is_f64 ? ((const double *)a->weights)[y] : (double)((const float *)a->weights)[y];
  }
  if (a->eps > 0.0)
    for (int64_t c = 0; c < V; c++)
      W += is_f64 ? ((const double *)a->weights)[c] : (double)((const float *)a->weights)[c];
  double inv_norm = 1.0;
  if (a->reduction == CF_PDL_MEAN) {
    if (a->norm_mode == CF_PDL_NORM_BATCH) inv_norm = cf_pdl_inv_norm(wsum, 1);
    else inv_norm = cf_pdl_inv_norm(norm, a->norm_mode == CF_PDL_NORM_PRECOMPUTED);
  }

#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads < 1 ? 1 : nthreads)
  for (int64_t r = 0; r < N; r++) {
    const int64_t b = r / a->T, t = r % a->T;
    const int64_t zoff = b * a->sb + t * a->st;
    const int64_t y = target_at(a, r);
    double loss = 0.0;
    /* ignored rows, and V = 1 (log softmax is identically 0): loss 0, gradient 0 */
    const int zero_row = y == a->ignore_index || V == 1;
    if (is_f64) {
      double *g = a->grad ? (double *)a->grad + r * V : NULL;
      if (zero_row) {
        if (g) memset(g, 0, (size_t)V * sizeof(double));
      } else loss = row_f64((const double *)a->logits + zoff, g, (const double *)a->weights, V, y, W,
                          a->eps, inv_norm);
      ((double *)a->row_loss)[r] = loss;
    } else {
      float *g = a->grad ? (float *)a->grad + r * V : NULL;
      if (zero_row) {
        if (g) memset(g, 0, (size_t)V * sizeof(float));
      } else loss = row_f32((const float *)a->logits + zoff, g, (const float *)a->weights, V, y, W,
                          a->eps, inv_norm);
      ((float *)a->row_loss)[r] = (float)loss;
    }
  }
  return 0;
}
