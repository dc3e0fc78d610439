/* The element-type-generic body of the CPU Euler rotation (rotate_cpu.c includes it once per
 * type). Expects T (float | double), SUF (f32 | f64), ROT_FWD / ROT_BWD (cf_rot_fwd_SUF /
 * cf_rot_bwd_SUF from rotate_math.h). Every function below is FN(name) = name_SUF.
 *
 * The pair loops are specialised (always-inline bodies with constant layout / beta flags) so
 * that they have no control flow: gcc then vectorises them, calling glibc's vector math where
 * rotate_cpu.c has declared it. */

#define FN_CAT2(a, b) a##_##b
#define FN_CAT(a, b) FN_CAT2(a, b)
#define FN(name) FN_CAT(name, SUF)

/* offset = beta + omega * p, formed in double and rounded once (float32 keeps its phase accuracy
 * at large positions). */
#define ROT_OFFSET(HAS_BETA, beta, omega, j, p) \
  ((T)(((HAS_BETA) ? (double)(beta)[j] : 0.0) + cf_pos_angle((double)(omega)[j], (p))))

static inline __attribute__((always_inline)) void FN(row_fwd_body)(
    const T *restrict x, T *restrict out, const T *restrict delta, const T *restrict beta,
    const T *restrict omega, double p, int64_t h, const int layout, const int has_beta) {
  for (int64_t j = 0; j < h; j++) {
    const int64_t ir = cf_re_index(layout, j, h), ii = cf_im_index(layout, j, h);
    T o_re, o_im;
    ROT_FWD(x[ir], x[ii], delta[j], ROT_OFFSET(has_beta, beta, omega, j, p), &o_re, &o_im);
    out[ir] = o_re;
    out[ii] = o_im;
  }
}

/* One output row (token, query head). */
CF_CLONES static void FN(row_fwd)(const T *restrict x, T *restrict out, const T *restrict delta,
                                  const T *restrict beta, const T *restrict omega, double p,
                                  int64_t h, int layout) {
  if (layout == CF_LAYOUT_HALF) {
    if (beta) FN(row_fwd_body)(x, out, delta, beta, omega, p, h, CF_LAYOUT_HALF, 1);
    else FN(row_fwd_body)(x, out, delta, beta, omega, p, h, CF_LAYOUT_HALF, 0);
  } else {
    if (beta) FN(row_fwd_body)(x, out, delta, beta, omega, p, h, CF_LAYOUT_INTERLEAVED, 1);
    else FN(row_fwd_body)(x, out, delta, beta, omega, p, h, CF_LAYOUT_INTERLEAVED, 0);
  }
}

static inline __attribute__((always_inline)) void FN(row_bwd_body)(
    const T *restrict x, const T *restrict g, T *restrict dx, const T *restrict delta,
    const T *restrict beta, const T *restrict omega, double p, int64_t h, double *restrict w_delta,
    double *restrict w_beta, double *restrict w_omega, const int layout, const int has_beta) {
  for (int64_t j = 0; j < h; j++) {
    const int64_t ir = cf_re_index(layout, j, h), ii = cf_im_index(layout, j, h);
    T d_re, d_im, theta;
    const T dphi = ROT_BWD(x[ir], x[ii], delta[j], ROT_OFFSET(has_beta, beta, omega, j, p), g[ir],
                           g[ii], &d_re, &d_im, &theta);
    dx[ir] += d_re;
    dx[ii] += d_im;
    w_delta[j] += (double)dphi * (double)theta;
    w_beta[j] += (double)dphi;
    w_omega[j] += (double)dphi * p;
  }
}

/* One (token, query head) row of the backward: adds this head's share to the kv row dx (zeroed by
 * the caller before the group's first head) and this chunk's partial parameter gradients. */
CF_CLONES static void FN(row_bwd)(const T *restrict x, const T *restrict g, T *restrict dx,
                                  const T *restrict delta, const T *restrict beta,
                                  const T *restrict omega, double p, int64_t h, int layout,
                                  double *restrict w_delta, double *restrict w_beta,
                                  double *restrict w_omega) {
  if (layout == CF_LAYOUT_HALF) {
    if (beta) FN(row_bwd_body)(x, g, dx, delta, beta, omega, p, h, w_delta, w_beta, w_omega, CF_LAYOUT_HALF, 1);
    else FN(row_bwd_body)(x, g, dx, delta, beta, omega, p, h, w_delta, w_beta, w_omega, CF_LAYOUT_HALF, 0);
  } else {
    if (beta) FN(row_bwd_body)(x, g, dx, delta, beta, omega, p, h, w_delta, w_beta, w_omega, CF_LAYOUT_INTERLEAVED, 1);
    else FN(row_bwd_body)(x, g, dx, delta, beta, omega, p, h, w_delta, w_beta, w_omega, CF_LAYOUT_INTERLEAVED, 0);
  }
}

static void FN(rot_fwd)(const CfRotJob *jb, T *out, int nthreads) {
  const int64_t B = jb->B, H = jb->H, L = jb->L, h = jb->h, d = 2 * h, G = H / jb->Hx;
  const T *x = (const T *)jb->x, *delta = (const T *)jb->delta;
  const T *beta = (const T *)jb->beta, *freqs = (const T *)jb->freqs;
  const int64_t rows = B * H * L;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t row = 0; row < rows; row++) {
    const int64_t l = row % L, i = (row / L) % H, b = row / (L * H);
    const T *xr = x + b * jb->x_s.b + (i / G) * jb->x_s.h + l * jb->x_s.l;
    const double p = cf_pos_value(jb->pos[b * jb->pos_s.b + l * jb->pos_s.l]);
    FN(row_fwd)(xr, out + row * d, delta + i * h, beta ? beta + i * h : NULL,
                freqs + i * jb->freqs_sh, p, h, jb->layout);
  }
}

static void FN(rot_bwd)(const CfRotBwdJob *jb, int nthreads) {
  const CfRotJob *f = &jb->f;
  const int64_t B = f->B, H = f->H, Hx = f->Hx, L = f->L, h = f->h, d = 2 * h, G = H / Hx;
  const int64_t ntok = B * L, P = cf_rot_chunks(jb), Hh = H * h;
  const T *x = (const T *)f->x, *gr = (const T *)jb->grad, *delta = (const T *)f->delta;
  const T *beta = (const T *)f->beta, *freqs = (const T *)f->freqs;
  T *dx = (T *)jb->dx;
  double *ws = (double *)jb->ws;
  /* stage 1: chunk c owns ws[c] and the dx rows of its tokens */
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
  for (int64_t c = 0; c < P; c++) {
    double *w = ws + c * 3 * Hh;
    for (int64_t k = 0; k < 3 * Hh; k++) w[k] = 0.0;
    const int64_t t1 = (c + 1) * jb->chunk < ntok ? (c + 1) * jb->chunk : ntok;
    for (int64_t t = c * jb->chunk; t < t1; t++) {
      const int64_t b = t / L, l = t % L;
      const double p = cf_pos_value(f->pos[b * f->pos_s.b + l * f->pos_s.l]);
      for (int64_t hx = 0; hx < Hx; hx++) {
        const T *xr = x + b * f->x_s.b + hx * f->x_s.h + l * f->x_s.l;
        T *dxr = dx + ((b * Hx + hx) * L + l) * d;
        for (int64_t k = 0; k < d; k++) dxr[k] = 0;
        for (int64_t g = 0; g < G; g++) { /* the group's heads in order: deterministic dx */
          const int64_t i = hx * G + g;
          FN(row_bwd)(xr, gr + b * jb->grad_s.b + i * jb->grad_s.h + l * jb->grad_s.l, dxr, delta + i * h,
                      beta ? beta + i * h : NULL, freqs + i * f->freqs_sh, p, h, f->layout,
                      w + i * h, w + Hh + i * h, w + 2 * Hh + i * h);
        }
      }
    }
  }
  /* stage 2: add the P partials in chunk order (and the heads in order for shared freqs) */
  T *dd = (T *)jb->ddelta, *db = (T *)jb->dbeta, *df = (T *)jb->dfreqs;
  const int shared = f->freqs_sh == 0;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t k = 0; k < Hh; k++) {
    double sd = 0.0, sb = 0.0, so = 0.0;
    for (int64_t c = 0; c < P; c++) {
      const double *w = ws + c * 3 * Hh;
      sd += w[k];
      sb += w[Hh + k];
      so += w[2 * Hh + k];
    }
    dd[k] = (T)sd;
    if (db) db[k] = (T)sb;
    if (df && !shared) df[k] = (T)so;
  }
  if (df && shared) {
    for (int64_t j = 0; j < h; j++) {
      double so = 0.0;
      for (int64_t i = 0; i < H; i++)
        for (int64_t c = 0; c < P; c++) so += ws[c * 3 * Hh + 2 * Hh + i * h + j];
      df[j] = (T)so;
    }
  }
}

#undef ROT_OFFSET
#undef FN
#undef FN_CAT
#undef FN_CAT2
