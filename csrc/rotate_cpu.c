/* CPU Euler rotation, float32 and float64 (see rotate.h for the job layout, rotate_math.h for the
 * per-pair math). OpenMP threads take rows (forward) or fixed token chunks (backward); the inner
 * loops over the h pairs of a head are flat so gcc can vectorise whatever the libm calls allow. */
#include "rotate.h"
#include "rotate_math.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* Threads worth waking for `pairs` pair evaluations: a parallel region costs microseconds (far
 * more on a loaded machine), one pair tens of nanoseconds, so small calls stay on one thread. */
static int rot_threads(int64_t pairs, int nthreads) {
  const int64_t useful = pairs / 16384 + 1;
  return (int)(useful < nthreads ? useful : nthreads);
}

/* Row-level loops, one instance per dtype. offset = beta + omega * p is formed in double and
 * rounded once, so float32 keeps its phase accuracy at large positions. */
#define CF_DEFINE_ROT_CPU(T, SUF)                                                                 \
  CF_CLONES static void rot_row_fwd_##SUF(const T *restrict x, T *restrict out,                    \
                                          const T *restrict delta, const T *restrict beta,        \
                                          const T *restrict omega, double p, int64_t h,           \
                                          int layout) {                                           \
    for (int64_t j = 0; j < h; j++) {                                                             \
      const int64_t ir = cf_re_index(layout, j, h), ii = cf_im_index(layout, j, h);               \
      const T off = (T)((beta ? (double)beta[j] : 0.0) + cf_pos_angle((double)omega[j], p));      \
      T o_re, o_im;                                                                               \
      cf_rot_fwd_##SUF(x[ir], x[ii], delta[j], off, &o_re, &o_im);                                \
      out[ir] = o_re;                                                                             \
      out[ii] = o_im;                                                                             \
    }                                                                                             \
  }                                                                                               \
  /* One (token, query head) row of the backward: dx is assigned (first head of the group) or    \
   * accumulated (the others); w_* collect this chunk's partial parameter gradients. */          \
  CF_CLONES static void rot_row_bwd_##SUF(const T *restrict x, const T *restrict g,                \
                                          T *restrict dx, int accumulate,                         \
                                          const T *restrict delta, const T *restrict beta,        \
                                          const T *restrict omega, double p, int64_t h,           \
                                          int layout, double *restrict w_delta,                   \
                                          double *restrict w_beta, double *restrict w_omega) {    \
    for (int64_t j = 0; j < h; j++) {                                                             \
      const int64_t ir = cf_re_index(layout, j, h), ii = cf_im_index(layout, j, h);               \
      const T off = (T)((beta ? (double)beta[j] : 0.0) + cf_pos_angle((double)omega[j], p));      \
      T d_re, d_im, theta;                                                                        \
      const T dphi = cf_rot_bwd_##SUF(x[ir], x[ii], delta[j], off, g[ir], g[ii], &d_re, &d_im,    \
                                      &theta);                                                    \
      dx[ir] = accumulate ? dx[ir] + d_re : d_re;                                                 \
      dx[ii] = accumulate ? dx[ii] + d_im : d_im;                                                 \
      w_delta[j] += (double)dphi * (double)theta;                                                 \
      w_beta[j] += (double)dphi;                                                                  \
      w_omega[j] += (double)dphi * p;                                                             \
    }                                                                                             \
  }                                                                                               \
  static void rot_fwd_##SUF(const CfRotJob *jb, T *out, int nthreads) {                            \
    const int64_t B = jb->B, H = jb->H, L = jb->L, h = jb->h, d = 2 * h, G = H / jb->Hx;          \
    const T *x = (const T *)jb->x, *delta = (const T *)jb->delta;                                 \
    const T *beta = (const T *)jb->beta, *freqs = (const T *)jb->freqs;                           \
    const int64_t rows = B * H * L;                                                               \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                           \
    for (int64_t row = 0; row < rows; row++) {                                                    \
      const int64_t l = row % L, i = (row / L) % H, b = row / (L * H);                            \
      const T *xr = x + b * jb->sxb + (i / G) * jb->sxh + l * jb->sxl;                            \
      const double p = (double)jb->pos[b * jb->spb + l * jb->spl];                                \
      rot_row_fwd_##SUF(xr, out + row * d, delta + i * h, beta ? beta + i * h : NULL,             \
                        freqs + i * jb->freqs_hs, p, h, jb->layout);                              \
    }                                                                                             \
  }                                                                                               \
  static void rot_bwd_##SUF(const CfRotBwdJob *jb, int nthreads) {                                 \
    const CfRotJob *f = &jb->f;                                                                   \
    const int64_t B = f->B, H = f->H, Hx = f->Hx, L = f->L, h = f->h, d = 2 * h, G = H / Hx;      \
    const int64_t ntok = B * L, P = cf_rot_chunks(jb), Hh = H * h;                                \
    const T *x = (const T *)f->x, *gr = (const T *)jb->grad, *delta = (const T *)f->delta;        \
    const T *beta = (const T *)f->beta, *freqs = (const T *)f->freqs;                             \
    T *dx = (T *)jb->dx;                                                                          \
    double *ws = (double *)jb->ws;                                                                \
    /* stage 1: chunk c owns ws[c] and the dx rows of its tokens */                              \
    _Pragma("omp parallel for num_threads(nthreads) schedule(dynamic, 1)")                       \
    for (int64_t c = 0; c < P; c++) {                                                             \
      double *w = ws + c * 3 * Hh;                                                                \
      for (int64_t k = 0; k < 3 * Hh; k++) w[k] = 0.0;                                            \
      const int64_t t1 = (c + 1) * jb->chunk < ntok ? (c + 1) * jb->chunk : ntok;                 \
      for (int64_t t = c * jb->chunk; t < t1; t++) {                                              \
        const int64_t b = t / L, l = t % L;                                                       \
        const double p = (double)f->pos[b * f->spb + l * f->spl];                                 \
        for (int64_t hx = 0; hx < Hx; hx++) {                                                     \
          const T *xr = x + b * f->sxb + hx * f->sxh + l * f->sxl;                                \
          T *dxr = dx + ((b * Hx + hx) * L + l) * d;                                              \
          for (int64_t g = 0; g < G; g++) {                                                       \
            const int64_t i = hx * G + g;                                                         \
            rot_row_bwd_##SUF(xr, gr + b * jb->sgb + i * jb->sgh + l * jb->sgl, dxr, g > 0,       \
                              delta + i * h, beta ? beta + i * h : NULL,                          \
                              freqs + i * f->freqs_hs, p, h, f->layout, w + i * h,                \
                              w + Hh + i * h, w + 2 * Hh + i * h);                                \
          }                                                                                       \
        }                                                                                         \
      }                                                                                           \
    }                                                                                             \
    /* stage 2: add the P partials in chunk order (and the heads in order for shared freqs) */   \
    T *dd = (T *)jb->ddelta, *db = (T *)jb->dbeta, *df = (T *)jb->dfreqs;                         \
    const int shared = f->freqs_hs == 0;                                                          \
    _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                           \
    for (int64_t k = 0; k < Hh; k++) {                                                            \
      double sd = 0.0, sb = 0.0, so = 0.0;                                                        \
      for (int64_t c = 0; c < P; c++) {                                                           \
        const double *w = ws + c * 3 * Hh;                                                        \
        sd += w[k];                                                                               \
        sb += w[Hh + k];                                                                          \
        so += w[2 * Hh + k];                                                                      \
      }                                                                                           \
      dd[k] = (T)sd;                                                                              \
      if (db) db[k] = (T)sb;                                                                      \
      if (df && !shared) df[k] = (T)so;                                                           \
    }                                                                                             \
    if (df && shared) {                                                                           \
      _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                         \
      for (int64_t j = 0; j < h; j++) {                                                           \
        double so = 0.0;                                                                          \
        for (int64_t i = 0; i < H; i++)                                                           \
          for (int64_t c = 0; c < P; c++) so += ws[c * 3 * Hh + 2 * Hh + i * h + j];              \
        df[j] = (T)so;                                                                            \
      }                                                                                           \
    }                                                                                             \
  }

CF_DEFINE_ROT_CPU(float, f32)
CF_DEFINE_ROT_CPU(double, f64)

void cf_rotate_fwd_cpu(const CfRotJob *job, void *out, int nthreads) {
  nthreads = rot_threads(job->B * job->H * job->L * job->h, nthreads < 1 ? 1 : nthreads);
  if (job->x_dtype == CF_F64) rot_fwd_f64(job, (double *)out, nthreads);
  else rot_fwd_f32(job, (float *)out, nthreads);
}

void cf_rotate_bwd_cpu(const CfRotBwdJob *job, int nthreads) {
  nthreads = rot_threads(job->f.B * job->f.H * job->f.L * job->f.h, nthreads < 1 ? 1 : nthreads);
  if (job->f.x_dtype == CF_F64) rot_bwd_f64(job, nthreads);
  else rot_bwd_f32(job, nthreads);
}
