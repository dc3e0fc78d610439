/* The element-type-generic body of the CPU fused attention (attn_cpu.c includes it once per type).
 * Expects: T (float | double), SUF (f32 | f64), CF_EXP(x) (an exp that is exactly 0 for -inf),
 * and from attn_cpu.c: BQ, BK, MR, NR, CF_AI, CF_HOT, AttnRows, rows_init(), visible(),
 * rotate_pairs_SUF(). Every function below is `FN(name)` = name_SUF. */

#define FN_CAT2(a, b) a##_##b
#define FN_CAT(a, b) FN_CAT2(a, b)
#define FN(name) FN_CAT(name, SUF)

/* A 32-byte vector of T (GCC vector extension): one ymm under AVX2 and AVX-512 alike, two xmm in
 * the portable clone. 32 rather than 64 bytes because a 64-byte vector is no machine type under
 * AVX2, where gcc then keeps it in memory (far slower: benchmarks/RESULTS.md); on AVX-512 parts that double-pump 512-bit
 * FMAs (AMD Zen 4) two ymm FMAs per cycle reach the same peak. Plain loops left gcc vectorising
 * the wrong dimension and spilling, hence explicit vectors. */
#define VL ((int)(32 / sizeof(T)))
typedef T FN(vec) __attribute__((vector_size(32)));

/* The register block: rows [0, mr) of C[.][0, nv*VL) (+)= A[.][0, K) B[0, K)[0, nv*VL).
 * mr and nv are compile-time constants at every call site (the function is always inlined), so
 * the accumulators live in registers: mr * nv <= 12 of the 16 ymm (plus nv loads, 1 broadcast). */
CF_AI void FN(ukernel)(const int mr, const int nv, int64_t K, const T *restrict A, int64_t sar,
                       int64_t sac, const T *restrict B, int64_t ldb, T *restrict C, int64_t ldc,
                       int accumulate) {
  FN(vec) c[MR][4];
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) {
      if (accumulate) memcpy(&c[r][v], C + r * ldc + v * VL, sizeof(FN(vec)));
      else c[r][v] = (FN(vec)){0};
    }
  for (int64_t kk = 0; kk < K; kk++) {
    FN(vec) b[4];
    for (int v = 0; v < nv; v++) memcpy(&b[v], B + kk * ldb + v * VL, sizeof(FN(vec)));
    for (int r = 0; r < mr; r++) {
      T a = A[r * sar + kk * sac];
      for (int v = 0; v < nv; v++) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < mr; r++)
    for (int v = 0; v < nv; v++) memcpy(C + r * ldc + v * VL, &c[r][v], sizeof(FN(vec)));
}

/* Rows [0, mr) over the columns [0, Nv) (Nv a multiple of VL): blocks of `wide` vectors, then
 * single vectors. Fewer rows take more vectors at once so that enough independent FMA chains
 * hide the FMA latency (a decode step has a single query row). */
CF_AI void FN(gemm_rows)(const int mr, const int wide, int64_t Nv, int64_t K,
                         const T *restrict A, int64_t sar, int64_t sac, const T *restrict B,
                         int64_t ldb, T *restrict C, int64_t ldc, int accumulate) {
  int64_t j = 0;
  for (; j + wide * VL <= Nv; j += wide * VL)
    FN(ukernel)(mr, wide, K, A, sar, sac, B + j, ldb, C + j, ldc, accumulate);
  for (; j < Nv; j += VL) FN(ukernel)(mr, 1, K, A, sar, sac, B + j, ldb, C + j, ldc, accumulate);
}

/* C[M][N] (+)= A[M][K] B[K][N]. A(i, k) = A[i*sar + k*sac] (so A may be a transposed view);
 * rows of B and C are contiguous with strides ldb, ldc. The register block vectorises over N
 * (one broadcast of A per row, one load of B per k), which is why every operand of the
 * attention tiles is laid out so that the "N" side is contiguous. */
CF_AI void FN(gemm)(int64_t M, int64_t N, int64_t K, const T *restrict A, int64_t sar,
                    int64_t sac, const T *restrict B, int64_t ldb, T *restrict C, int64_t ldc,
                    int accumulate) {
  const int64_t Nv = N / VL * VL;
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    FN(gemm_rows)(MR, 2, Nv, K, A + i * sar, sar, sac, B, ldb, C + i * ldc, ldc, accumulate);
  const T *Ai = A + i * sar;
  T *Ci = C + i * ldc;
  switch (M - i) {  /* row remainder, each size with its own unrolled block */
    case 5: FN(gemm_rows)(5, 2, Nv, K, Ai, sar, sac, B, ldb, Ci, ldc, accumulate); break;
    case 4: FN(gemm_rows)(4, 3, Nv, K, Ai, sar, sac, B, ldb, Ci, ldc, accumulate); break;
    case 3: FN(gemm_rows)(3, 4, Nv, K, Ai, sar, sac, B, ldb, Ci, ldc, accumulate); break;
    case 2: FN(gemm_rows)(2, 4, Nv, K, Ai, sar, sac, B, ldb, Ci, ldc, accumulate); break;
    case 1: FN(gemm_rows)(1, 4, Nv, K, Ai, sar, sac, B, ldb, Ci, ldc, accumulate); break;
    default: break;
  }
  if (Nv < N) {  /* column remainder (head sizes that are not a multiple of VL) */
    const int64_t rem = N - Nv;
    for (int64_t r = 0; r < M; r++) {
      T *restrict crow = C + r * ldc + Nv;
      if (!accumulate)
        for (int64_t n = 0; n < rem; n++) crow[n] = 0;
      for (int64_t kk = 0; kk < K; kk++) {
        T a = A[r * sar + kk * sac];
        const T *restrict b = B + kk * ldb + Nv;
        for (int64_t n = 0; n < rem; n++) crow[n] += a * b[n];
      }
    }
  }
}

/* Rotate one token row of q (with beta, times scale) or k (beta NULL) of head `hq` into the
 * contiguous row dst. The internal layout equals the input layout, so the gradients with respect
 * to q~ and k~ come out in the caller's layout with no permutation. */
CF_AI void FN(rotate_row)(const CfAttnArgs *p, const T *restrict x, int64_t hq, int64_t pos,
                          int with_beta, T mul, T *restrict dst) {
  const int64_t h = p->d / 2;
  const T *delta = (const T *)p->delta + hq * h;
  const T *beta = (const T *)p->beta + hq * h;
  const T *omega = (const T *)p->freqs + hq * p->freqs_sh;
  T off[CF_ATTN_MAX_D / 2];
  const double pd = cf_pos_value(pos);
  for (int64_t j = 0; j < h; j++) {  /* the positional angle is reduced in double (cf_pos_angle) */
    double o = cf_pos_angle((double)omega[j], pd);
    off[j] = (T)(with_beta ? o + (double)beta[j] : o);
  }
  FN(rotate_pairs)(p->layout, h, x, delta, off, mul, dst);
}

/* Rotate keys [n0, n1) of kv head hk with query head hq's parameters into transposed tiles
 * kt[(n - n0) / BK][c][(n - n0) % BK] (n0 a multiple of BK) and, when krow != NULL, into rows
 * krow[(n - n0) * d + c]. Padding columns of the last tile are zero. */
CF_AI void FN(rotate_keys)(const CfAttnArgs *p, int64_t b, int64_t hq, int64_t n0,
                                   int64_t n1, T *restrict kt, T *restrict krow) {
  const int64_t d = p->d, hk = hq / (p->H / p->Hkv);
  const T *kb = (const T *)p->k + b * p->k_s.b + hk * p->k_s.h;
  const int64_t *kpos = p->k_pos + b * p->kpos_s.b;
  int64_t ntile = (n1 - n0 + BK - 1) / BK;
  T tmp[CF_ATTN_MAX_D];
  for (int64_t t = 0; t < ntile; t++) {
    T *tile = kt + t * d * BK;
    int64_t nk = n1 - n0 - t * BK < BK ? n1 - n0 - t * BK : BK;
    if (nk < BK)
      for (int64_t c = 0; c < d; c++)
        for (int64_t n = nk; n < BK; n++) tile[c * BK + n] = 0;
    for (int64_t n = 0; n < nk; n++) {
      int64_t key = n0 + t * BK + n;
      T *row = krow ? krow + (key - n0) * d : tmp;
      FN(rotate_row)(p, kb + key * p->k_s.l, hq, kpos[key * p->kpos_s.l], 0, (T)1, row);
      for (int64_t c = 0; c < d; c++) tile[c * BK + n] = row[c];
    }
  }
}

/* The sum of a vector's lanes, in lane order. */
CF_AI T FN(lane_sum)(FN(vec) x) {
  T sum = 0;
  for (int l = 0; l < VL; l++) sum += x[l];
  return sum;
}

/* Scores of rows [0, nq) of q (rotated, scaled; (nq, d)) against keys [n0, n0 + nk) of query head
 * hq in the rotated-key cache (p->k_cache), read as rows: s[r * BK + n] = <q_r, k~_n>. Partial sums
 * run over VL-wide chunks of the head dim (then the lanes in order, then the scalar tail), four keys
 * at a time so that four independent FMA chains hide the latency; a key row is read once and
 * straight, with no transposition into tiles (decoding reads each cached key once per step). */
CF_AI void FN(cached_scores)(const CfAttnArgs *p, int64_t b, int64_t hq, int64_t n0, int64_t nk, int64_t nq,
                             const T *restrict q, T *restrict s) {
  const int64_t d = p->d, dvec = d / VL * VL, ls = p->kc_s.l;
  const T *kc = (const T *)p->k_cache + b * p->kc_s.b + hq * p->kc_s.h + n0 * ls;
  for (int64_t r = 0; r < nq; r++) {
    const T *qr = q + r * d;
    int64_t n = 0;
    for (; n + 4 <= nk; n += 4) {
      const T *k0 = kc + n * ls, *k1 = k0 + ls, *k2 = k1 + ls, *k3 = k2 + ls;
      if (n0 + n + 20 <= p->Lk)  /* the rows 16 keys ahead, within the cache */
        for (int64_t c = 0; c < d; c += 64 / (int64_t)sizeof(T))
          for (int j = 16; j < 20; j++) __builtin_prefetch(k0 + j * ls + c);
      FN(vec) a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, x, y;
      for (int64_t c = 0; c < dvec; c += VL) {
        memcpy(&x, qr + c, sizeof(x));
        memcpy(&y, k0 + c, sizeof(y));
        a0 += x * y;
        memcpy(&y, k1 + c, sizeof(y));
        a1 += x * y;
        memcpy(&y, k2 + c, sizeof(y));
        a2 += x * y;
        memcpy(&y, k3 + c, sizeof(y));
        a3 += x * y;
      }
      T s0 = FN(lane_sum)(a0), s1 = FN(lane_sum)(a1), s2 = FN(lane_sum)(a2), s3 = FN(lane_sum)(a3);
      for (int64_t c = dvec; c < d; c++) {
        s0 += qr[c] * k0[c];
        s1 += qr[c] * k1[c];
        s2 += qr[c] * k2[c];
        s3 += qr[c] * k3[c];
      }
      s[r * BK + n] = s0, s[r * BK + n + 1] = s1, s[r * BK + n + 2] = s2, s[r * BK + n + 3] = s3;
    }
    for (; n < nk; n++) {
      const T *k0 = kc + n * ls;
      FN(vec) a0 = {0}, x, y;
      for (int64_t c = 0; c < dvec; c += VL) {
        memcpy(&x, qr + c, sizeof(x));
        memcpy(&y, k0 + c, sizeof(y));
        a0 += x * y;
      }
      T s0 = FN(lane_sum)(a0);
      for (int64_t c = dvec; c < d; c++) s0 += qr[c] * k0[c];
      s[r * BK + n] = s0;
    }
  }
}

/* Rotate keys [p->kc_n, Lk) of every (b, query head) into the rotated-key cache (rotate_row: the
 * values rotate_keys computes). */
CF_HOT static void FN(fill_key_cache)(const CfAttnArgs *p) {
  const int64_t n0 = p->kc_n, nk = p->Lk - p->kc_n, G = p->H / p->Hkv;
  const int64_t total = p->B * p->H * nk;
#pragma omp parallel for num_threads(p->nthreads) schedule(static) if (total * p->d >= 16384)
  for (int64_t i = 0; i < total; i++) {
    const int64_t b = i / (p->H * nk), hq = i / nk % p->H, key = n0 + i % nk;
    const T *kb = (const T *)p->k + b * p->k_s.b + hq / G * p->k_s.h;
    T *dst = (T *)p->k_cache + b * p->kc_s.b + hq * p->kc_s.h + key * p->kc_s.l;
    FN(rotate_row)(p, kb + key * p->k_s.l, hq, p->k_pos[b * p->kpos_s.b + key * p->kpos_s.l], 0, (T)1, dst);
  }
}

/* Few-query forward (one query tile: decoding, short chunks). There nearly all the work is the
 * key rotation, which every (b, query head) item repeats over all its keys. The parts that do not
 * depend on the query head are computed once per call instead: each key pair's polar form
 * (r, theta) per kv head, and its positional angle omega_j * p_n per batch row (per head only when
 * freqs are per head). They are stored pair-major (keys contiguous), so the per-head part
 * (pair_from_polar: delta * theta + off, sincos, times r) runs over keys with unit stride straight
 * into the transposed key tiles. Same operations on the same operands as rotate_row: same values. */
typedef struct {
  int64_t ld, nf; /* keys per buffer row (Lk rounded up to BK); heads of the positional angles */
  T *r, *th;      /* (B, Hkv, d/2, ld) */
  T *off;         /* (B, nf, d/2, ld): nf = 1 when freqs are shared by the heads, else H */
} FN(KeyPolar);

/* Keys [n0, n1) of (b, kv head hk) into kp->r / kp->th (unit == 0), or their positional angles for
 * the frequencies of head f into kp->off (unit == 1). */
CF_HOT static void FN(key_polar_chunk)(const CfAttnArgs *p, const FN(KeyPolar) *kp, int unit, int64_t b,
                                       int64_t hk, int64_t n0, int64_t n1) {
  const int64_t h = p->d / 2, ld = kp->ld;
  if (unit == 0) {
    const T *kb = (const T *)p->k + b * p->k_s.b + hk * p->k_s.h;
    T *r = kp->r + (b * p->Hkv + hk) * h * ld, *th = kp->th + (b * p->Hkv + hk) * h * ld;
    T rr[CF_ATTN_MAX_D / 2], tt[CF_ATTN_MAX_D / 2];
    for (int64_t n = n0; n < n1; n++) {
      const T *x = kb + n * p->k_s.l;
      if (p->layout == CF_LAYOUT_HALF)
        for (int64_t j = 0; j < h; j++) FN(pair_polar)(x[j], x[j + h], &rr[j], &tt[j]);
      else
        for (int64_t j = 0; j < h; j++) FN(pair_polar)(x[2 * j], x[2 * j + 1], &rr[j], &tt[j]);
      for (int64_t j = 0; j < h; j++) r[j * ld + n] = rr[j], th[j * ld + n] = tt[j];
    }
  } else {
    const T *omega = (const T *)p->freqs + hk * p->freqs_sh;
    const int64_t *kpos = p->k_pos + b * p->kpos_s.b;
    T *off = kp->off + (b * kp->nf + hk) * h * ld;
    double pd[BK];
    for (int64_t n = n0; n < n1; n++) pd[n - n0] = cf_pos_value(kpos[n * p->kpos_s.l]);
    for (int64_t j = 0; j < h; j++)
      for (int64_t n = n0; n < n1; n++) off[j * ld + n] = (T)cf_pos_angle((double)omega[j], pd[n - n0]);
  }
}

/* Fill kp for all keys (parallel over BK-key chunks). */
static void FN(key_polar)(const CfAttnArgs *p, const FN(KeyPolar) *kp) {
  const int64_t ktiles = kp->ld / BK, np = p->B * p->Hkv * ktiles, nitems = np + p->B * kp->nf * ktiles;
#pragma omp parallel for num_threads(p->nthreads) schedule(static)
  for (int64_t it = 0; it < nitems; it++) {
    const int unit = it >= np;
    const int64_t i = unit ? it - np : it, heads = unit ? kp->nf : p->Hkv;
    const int64_t t = i % ktiles, n1 = (t + 1) * BK < p->Lk ? (t + 1) * BK : p->Lk;
    FN(key_polar_chunk)(p, kp, unit, i / ktiles / heads, i / ktiles % heads, t * BK, n1);
  }
}

/* rotate_keys from the precomputed polar forms: keys [n0, n1) (n0 a multiple of BK) of query head
 * hq into transposed tiles kt[(n - n0) / BK][c][(n - n0) % BK], padding columns zero. */
CF_AI void FN(rotate_keys_polar)(const CfAttnArgs *p, const FN(KeyPolar) *kp, int64_t b, int64_t hq,
                                 int64_t n0, int64_t n1, T *restrict kt) {
  const int64_t d = p->d, h = d / 2, ld = kp->ld, hk = hq / (p->H / p->Hkv);
  const T *r = kp->r + (b * p->Hkv + hk) * h * ld, *th = kp->th + (b * p->Hkv + hk) * h * ld;
  const T *off = kp->off + (b * kp->nf + (kp->nf > 1 ? hq : 0)) * h * ld;
  const T *delta = (const T *)p->delta + hq * h;
  for (int64_t t = 0; t * BK < n1 - n0; t++) {
    T *tile = kt + t * d * BK;
    const int64_t base = n0 + t * BK, nk = n1 - base < BK ? n1 - base : BK;
    for (int64_t j = 0; j < h; j++) {
      T *restrict tre = tile + cf_re_index(p->layout, j, h) * BK;
      T *restrict tim = tile + cf_im_index(p->layout, j, h) * BK;
      const T dj = delta[j], *rj = r + j * ld + base, *tj = th + j * ld + base, *oj = off + j * ld + base;
      for (int64_t n = 0; n < nk; n++) FN(pair_from_polar)(rj[n], tj[n], dj, oj[n], (T)1, &tre[n], &tim[n]);
      for (int64_t n = nk; n < BK; n++) tre[n] = 0, tim[n] = 0;
    }
  }
}

/* Rotate the query rows of a tile (times scale) into q[r * d + c]; rows >= rows->nq are zero. */
CF_AI void FN(rotate_queries)(const CfAttnArgs *p, int64_t b, int64_t hq,
                                      const AttnRows *rows, T *restrict q) {
  const int64_t d = p->d;
  const T *qb = (const T *)p->q + b * p->q_s.b + hq * p->q_s.h;
  const int64_t *qpos = p->q_pos + b * p->qpos_s.b;
  for (int64_t r = 0; r < rows->nq; r++) {
    int64_t m = rows->m0 + r;
    FN(rotate_row)(p, qb + m * p->q_s.l, hq, qpos[m * p->qpos_s.l], 1, (T)p->scale, q + r * d);
  }
  for (int64_t r = rows->nq; r < BQ; r++)
    for (int64_t c = 0; c < d; c++) q[r * d + c] = 0;
}

/* Set s[r][n] = -inf where key n0 + n is hidden from query row r (only called for tiles that
 * touch a mask boundary or when a key-padding mask is present). */
CF_AI void FN(mask_tile)(const CfAttnArgs *p, int64_t b, const AttnRows *rows,
                                 int64_t n0, int64_t nk, T *restrict s) {
  for (int64_t r = 0; r < rows->nq; r++)
    for (int64_t n = 0; n < nk; n++)
      if (!visible(p, b, rows, r, n0 + n)) s[r * BK + n] = (T)-INFINITY;
}

/* Row reductions over a BK-wide score row, written lane-wise (NR independent partial results)
 * so gcc vectorises them without reassociating a single accumulator. */
CF_AI T FN(row_max)(const T *restrict x) {
  T m[NR];
  for (int l = 0; l < NR; l++) m[l] = x[l];
  for (int64_t n = NR; n < BK; n += NR)
    for (int l = 0; l < NR; l++) m[l] = x[n + l] > m[l] ? x[n + l] : m[l];
  T r = m[0];
  for (int l = 1; l < NR; l++) r = m[l] > r ? m[l] : r;
  return r;
}

/* x = exp(x - sub) in place, its NR-lane partial sums added to lanes[]. The running softmax
 * denominator stays lane-wise for a whole query tile, so the horizontal sum happens once per row
 * and tile instead of once per row and key tile. */
CF_AI void FN(row_exp_sum)(T *restrict x, T sub, T *restrict lanes) {
  T acc[NR];
  for (int l = 0; l < NR; l++) acc[l] = lanes[l];
  for (int64_t n = 0; n < BK; n += NR)
    for (int l = 0; l < NR; l++) {
      T e = CF_EXP(x[n + l] - sub);
      x[n + l] = e;
      acc[l] += e;
    }
  for (int l = 0; l < NR; l++) lanes[l] = acc[l];
}

/* ------------------------------------------------------------------------------------------ */
/* Forward: one work item = (b, query head, a run of query tiles). */

typedef struct {
  T *kt;             /* rotated key tiles of the item's key range, (ntile, d, BK) */
  T *q, *s, *o;      /* (BQ, d), (BQ, BK), (BQ, dv) */
  T *mrow;           /* running max, (BQ,) */
  T *lsum;           /* running sum as NR lane-wise partial sums, (BQ, NR) */
} FN(FwdWs);

CF_HOT static void FN(fwd_item)(const CfAttnArgs *p, FN(FwdWs) *ws, const FN(KeyPolar) *kp, int64_t b,
                                int64_t hq, int64_t t0, int64_t t1) {
  const int64_t d = p->d, dv = p->dv, hk = hq / (p->H / p->Hkv);
  const T *vb = (const T *)p->v + b * p->v_s.b + hk * p->v_s.h;
  const int64_t vs = p->v_s.l;
  T *out = (T *)p->out + (b * p->H + hq) * p->Lq * dv;
  T *lse = (T *)p->lse + (b * p->H + hq) * p->Lq;

  /* The item's visible key range, rotated once for all its query tiles. */
  int64_t nlo = p->Lk, nhi = 0;
  for (int64_t t = t0; t < t1; t++) {
    AttnRows rows;
    rows_init(p, t, &rows);
    if (rows.lo < nlo) nlo = rows.lo;
    if (rows.hi > nhi) nhi = rows.hi;
  }
  int64_t k0 = 0;
  if (nhi > nlo && !p->k_cache) {  /* (a rotated-key cache is read in place by cached_scores) */
    k0 = nlo / BK * BK;
    if (kp) FN(rotate_keys_polar)(p, kp, b, hq, k0, nhi, ws->kt);
    else FN(rotate_keys)(p, b, hq, k0, nhi, ws->kt, NULL);
  }

  for (int64_t t = t0; t < t1; t++) {
    AttnRows rows;
    rows_init(p, t, &rows);
    const int64_t nq = rows.nq;
    /* bad[r]: bit 0, row r met a visible key scored -inf (an infinite q or k): if nothing else
     * is visible, softmax is 0/0, NaN in torch; bit 1, it met a NaN score: the row is NaN. A
     * NaN score mixed with others makes the running sum NaN by itself; only tiles whose max
     * comes out -inf (all masked, -inf or NaN: the NaN-blind max) need the scan that sets these. */
    unsigned char bad[BQ];
    for (int64_t r = 0; r < nq; r++) ws->mrow[r] = (T)-INFINITY, bad[r] = 0;
    for (int64_t x = 0; x < nq * NR; x++) ws->lsum[x] = 0;
    for (int64_t x = 0; x < nq * dv; x++) ws->o[x] = 0;
    if (rows.hi > rows.lo) {
      FN(rotate_queries)(p, b, hq, &rows, ws->q);
      for (int64_t n0 = rows.lo / BK * BK; n0 < rows.hi; n0 += BK) {
        const int64_t nk = p->Lk - n0 < BK ? p->Lk - n0 : BK;
        T *s = ws->s;
        if (p->k_cache) {
          /* the tile's value rows are read after the scores: start loading them now (decoding
           * streams every cached key and value once per step; the loads overlap the scoring) */
          for (int64_t n = 0; n < nk; n++)
            for (int64_t c = 0; c < dv; c += 64 / (int64_t)sizeof(T)) __builtin_prefetch(vb + (n0 + n) * vs + c);
          FN(cached_scores)(p, b, hq, n0, nk, nq, ws->q, s);
        } else {
          FN(gemm)(nq, BK, d, ws->q, d, 1, ws->kt + (n0 - k0) * d, BK, s, BK, 0);
        }
        if (rows.need_mask || rows.lo_max > n0 || rows.hi_min < n0 + nk)
          FN(mask_tile)(p, b, &rows, n0, nk, s);
        if (nk < BK)  /* padding keys of the last tile take no part in the row statistics */
          for (int64_t r = 0; r < nq; r++)
            for (int64_t n = nk; n < BK; n++) s[r * BK + n] = (T)-INFINITY;
        /* online softmax: s becomes P = exp(s - m_new); o and l are rescaled by exp(m_old - m_new) */
        for (int64_t r = 0; r < nq; r++) {
          T *sr = s + r * BK;
          T mold = ws->mrow[r], mx = FN(row_max)(sr);
          T mnew = mx > mold ? mx : mold;
          if (!(mnew > (T)-INFINITY)) {  /* nothing (finite) visible yet in this row: rare, scan it */
            for (int64_t n = 0; n < nk; n++)
              if (visible(p, b, &rows, r, n0 + n)) bad[r] |= sr[n] != sr[n] ? 2 : 1;
            for (int64_t n = 0; n < BK; n++) sr[n] = 0;
            continue;
          }
          T *lanes = ws->lsum + r * NR;
          if (mnew != mold) {
            T alpha = CF_EXP(mold - mnew);
            T *orow = ws->o + r * dv;
            for (int64_t c = 0; c < dv; c++) orow[c] *= alpha;
            for (int l = 0; l < NR; l++) lanes[l] *= alpha;
            ws->mrow[r] = mnew;
          }
          FN(row_exp_sum)(sr, mnew, lanes);
        }
        FN(gemm)(nq, dv, nk, s, BK, 1, vb + n0 * vs, vs, ws->o, dv, 1);
      }
    }
    for (int64_t r = 0; r < nq; r++) {
      T l = 0;
      for (int c = 0; c < NR; c++) l += ws->lsum[r * NR + c];
      /* l == 0: no visible key (output 0), unless only -inf scores were visible; l NaN: NaN */
      const int empty = l == 0 && !bad[r], nan = (bad[r] & 2) || l != l || (l == 0 && bad[r]);
      T inv = nan ? (T)NAN : l > 0 ? (T)1 / l : (T)0;
      T *orow = out + (rows.m0 + r) * dv;
      for (int64_t c = 0; c < dv; c++) orow[c] = ws->o[r * dv + c] * inv;
      lse[rows.m0 + r] = nan ? (T)NAN : empty ? (T)-INFINITY : ws->mrow[r] + (T)log((double)l);
    }
  }
}

/* Work item `it` of the forward: (b, query head) it / split, its chunk of `per` query tiles, the
 * last chunks first (under causal masking they carry the most keys). */
CF_AI void FN(fwd_chunk)(const CfAttnArgs *p, FN(FwdWs) *ws, const FN(KeyPolar) *kp, int64_t it, int64_t split,
                         int64_t per, int64_t nqt) {
  const int64_t c = split - 1 - it % split, bh = it / split;
  const int64_t t0 = c * per, t1 = t0 + per < nqt ? t0 + per : nqt;
  FN(fwd_item)(p, ws, kp, bh / p->H, bh % p->H, t0, t1);
}

static int FN(attn_fwd)(const CfAttnArgs *p) {
  const int64_t nqt = (p->Lq + BQ - 1) / BQ;
  const int64_t BH = p->B * p->H;
  if (BH == 0 || p->Lq == 0) return CF_ATTN_OK;
  /* Split each (b, head) into query chunks only when B*H alone cannot feed the threads: each
   * chunk re-rotates the keys it needs, so fewer, longer chunks do less transcendental work. */
  int64_t split = 1;
  if (BH < 2 * (int64_t)p->nthreads) split = (2 * p->nthreads + BH - 1) / BH;
  if (split > nqt) split = nqt;
  const int64_t per = (nqt + split - 1) / split;
  split = (nqt + per - 1) / per;
  const int64_t nitems = BH * split;
  const int64_t ktiles = (p->Lk + BK - 1) / BK;
  const int64_t kt_elems = p->k_cache ? 0 : ktiles * p->d * BK;  /* cached keys are read in place */
  const size_t ws_elems = (size_t)(kt_elems + BQ * p->d + BQ * BK + BQ * p->dv + BQ + BQ * NR);
  /* One query tile (decoding): the key rotation's head-independent parts once (KeyPolar), when
   * their buffers (the size of K, plus the positional angles) stay under KEY_POLAR_MAX_BYTES;
   * otherwise, or if they cannot be allocated, every item rotates its keys whole. */
  FN(KeyPolar) kpolar, *kp = NULL;
  void *kp_buf = NULL;
  if (p->k_cache) FN(fill_key_cache)(p);  /* then every item reads its keys from the cache */
  else if (nqt == 1 && ktiles > 0) {
    kpolar.ld = ktiles * BK;
    kpolar.nf = p->freqs_sh ? p->H : 1;
    const double rows = (double)p->B * (double)(2 * p->Hkv + kpolar.nf) * (double)(p->d / 2);
    if (rows * (double)kpolar.ld * sizeof(T) <= KEY_POLAR_MAX_BYTES &&
        (kp_buf = cf_aligned_alloc((size_t)rows * (size_t)kpolar.ld * sizeof(T))) != NULL) {
      const size_t plane = (size_t)(p->B * p->Hkv * (p->d / 2) * kpolar.ld);
      kpolar.r = (T *)kp_buf;
      kpolar.th = kpolar.r + plane;
      kpolar.off = kpolar.th + plane;
      kp = &kpolar;
      FN(key_polar)(p, kp);
    }
  }
  int failed = 0;
#pragma omp parallel num_threads(p->nthreads)
  {
    T *buf = (T *)cf_aligned_alloc(ws_elems * sizeof(T));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
    FN(FwdWs) ws;
    if (buf) {
      ws.kt = buf;
      ws.q = ws.kt + kt_elems;
      ws.s = ws.q + BQ * p->d;
      ws.o = ws.s + BQ * BK;
      ws.mrow = ws.o + BQ * p->dv;
      ws.lsum = ws.mrow + BQ;
    }
    if (p->k_cache) {
      /* rotated-key cache (decoding): equal items, and consecutive query heads share their kv head,
       * so contiguous blocks let a thread find a value head still in its cache for the next head */
#pragma omp for schedule(static)
      for (int64_t it = 0; it < nitems; it++)
        if (buf) FN(fwd_chunk)(p, &ws, kp, it, split, per, nqt);
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t it = 0; it < nitems; it++)
        if (buf) FN(fwd_chunk)(p, &ws, kp, it, split, per, nqt);
    }
    cf_aligned_free(buf);
  }
  cf_aligned_free(kp_buf);
  return failed ? CF_ATTN_ENOMEM : CF_ATTN_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Backward (FlashAttention-2 order): one work item = (b, query head, a run of key tiles). It owns
 * dk_rot / dv_full for its keys outright and writes its dq contribution to its own buffer, so no
 * two threads ever add into the same memory and the result is deterministic. */

typedef struct {
  T *krow, *kt, *vt;  /* rotated keys as rows (nk, d) and tiles (ntile, d, BK); values (ntile, dv, BK) */
  T *q, *s, *dp, *dq; /* (BQ, d), (BQ, BK), (BQ, BK), (BQ, d) */
  T *drow, *lrow;     /* D = rowsum(dout * out) - dlse and lse of the tile, (BQ,) */
} FN(BwdWs);

CF_HOT static void FN(bwd_item)(const CfAttnArgs *p, FN(BwdWs) *ws, int64_t b, int64_t hq,
                                int64_t kt0, int64_t kt1, T *dq_dst) {
  const int64_t d = p->d, dv = p->dv, H = p->H, hk = hq / (p->H / p->Hkv);
  const int64_t n0c = kt0 * BK, n1c = kt1 * BK < p->Lk ? kt1 * BK : p->Lk;
  const T *vb = (const T *)p->v + b * p->v_s.b + hk * p->v_s.h;
  const T *dob = (const T *)p->dout + b * p->dout_s.b + hq * p->dout_s.h;
  const int64_t dos = p->dout_s.l;
  const T *ob = (const T *)p->out + b * p->out_s.b + hq * p->out_s.h;
  const T *lseb = (const T *)p->lse + (b * H + hq) * p->Lq;
  const T *dlseb = p->dlse ? (const T *)p->dlse + (b * H + hq) * p->Lq : NULL;
  T *dk = (T *)p->dk_rot + (b * H + hq) * p->Lk * d;
  T *dvf = (T *)p->dv_full + (b * H + hq) * p->Lk * dv;

  for (int64_t x = n0c * d; x < n1c * d; x++) dk[x] = 0;
  for (int64_t x = n0c * dv; x < n1c * dv; x++) dvf[x] = 0;
  for (int64_t x = 0; x < p->Lq * d; x++) dq_dst[x] = 0;
  if (n1c <= n0c) return;

  FN(rotate_keys)(p, b, hq, n0c, n1c, ws->kt, ws->krow);
  for (int64_t n = n0c; n < n1c; n++) {  /* V^T tiles, zero padded, for dP = dO V^T */
    T *tile = ws->vt + ((n - n0c) / BK) * dv * BK + (n - n0c) % BK;
    for (int64_t c = 0; c < dv; c++) tile[c * BK] = vb[n * p->v_s.l + c];
  }
  for (int64_t n = n1c; n < n0c + (kt1 - kt0) * BK; n++) {
    T *tile = ws->vt + ((n - n0c) / BK) * dv * BK + (n - n0c) % BK;
    for (int64_t c = 0; c < dv; c++) tile[c * BK] = 0;
  }

  const int64_t nqt = (p->Lq + BQ - 1) / BQ;
  for (int64_t t = 0; t < nqt; t++) {
    AttnRows rows;
    rows_init(p, t, &rows);
    if (rows.hi <= rows.lo || rows.hi <= n0c || rows.lo >= n1c) continue;
    const int64_t nq = rows.nq;
    FN(rotate_queries)(p, b, hq, &rows, ws->q);
    const T *dot = dob + rows.m0 * dos;
    for (int64_t r = 0; r < nq; r++) {
      const T *dor = dot + r * dos, *orow = ob + (rows.m0 + r) * p->out_s.l;
      T acc = 0;
      for (int64_t c = 0; c < dv; c++) acc += dor[c] * orow[c];
      ws->drow[r] = dlseb ? acc - dlseb[rows.m0 + r] : acc;
      ws->lrow[r] = lseb[rows.m0 + r];
    }
    for (int64_t x = 0; x < nq * d; x++) ws->dq[x] = 0;
    int64_t nbeg = rows.lo > n0c ? rows.lo / BK * BK : n0c;
    int64_t nend = rows.hi < n1c ? rows.hi : n1c;
    for (int64_t n0 = nbeg; n0 < nend; n0 += BK) {
      const int64_t nk = n1c - n0 < BK ? n1c - n0 : BK;
      const T *kt = ws->kt + (n0 - n0c) * d, *krow = ws->krow + (n0 - n0c) * d;
      T *s = ws->s, *dp = ws->dp;
      FN(gemm)(nq, BK, d, ws->q, d, 1, kt, BK, s, BK, 0);
      if (rows.need_mask || rows.lo_max > n0 || rows.hi_min < n0 + nk)
        FN(mask_tile)(p, b, &rows, n0, nk, s);
      for (int64_t r = 0; r < nq; r++) {  /* P = exp(S - lse), 0 where masked */
        T *sr = s + r * BK;
        T l = ws->lrow[r];
        if (l == (T)-INFINITY) {
          for (int64_t n = 0; n < BK; n++) sr[n] = 0;
          continue;
        }
        for (int64_t n = nk; n < BK; n++) sr[n] = (T)-INFINITY;
        if (l != l) {  /* a NaN row (NaN input): NaN on its visible keys only, as torch's softmax */
          for (int64_t n = 0; n < BK; n++) sr[n] = sr[n] == (T)-INFINITY ? (T)0 : (T)NAN;
          continue;
        }
        for (int64_t n = 0; n < BK; n++) sr[n] = CF_EXP(sr[n] - l);
      }
      FN(gemm)(nq, BK, dv, dot, dos, 1, ws->vt + (n0 - n0c) * dv, BK, dp, BK, 0);
      /* dV += P^T dO, before s is overwritten by dS */
      FN(gemm)(nk, dv, nq, s, 1, BK, dot, dos, dvf + n0 * dv, dv, 1);
      for (int64_t r = 0; r < nq; r++) {  /* dS = P (dP - D) */
        if (ws->lrow[r] != ws->lrow[r]) continue;  /* NaN row: dS = P (NaN where visible, 0 masked) */
        T *sr = s + r * BK;
        const T *dpr = dp + r * BK;
        T D = ws->drow[r], chk[NR];
        for (int l = 0; l < NR; l++) chk[l] = 0;
        for (int64_t n = 0; n < BK; n += NR)
          for (int l = 0; l < NR; l++) {
            T x = sr[n + l] * (dpr[n + l] - D);
            sr[n + l] = x;
            chk[l] += x;
          }
        T c = 0;
        for (int l = 0; l < NR; l++) c += chk[l];
        /* A NaN in dP (a NaN value) or D (a NaN output) gives 0 * NaN on the masked keys, where
         * torch's masked softmax has an exact 0 gradient: rare, so only then scan for them. */
        if (c != c)
          for (int64_t n = 0; n < nk; n++)
            if (!visible(p, b, &rows, r, n0 + n)) sr[n] = 0;
      }
      FN(gemm)(nk, d, nq, s, 1, BK, ws->q, d, dk + n0 * d, d, 1);  /* dk~ += dS^T (scale q~) */
      FN(gemm)(nq, d, nk, s, BK, 1, krow, d, ws->dq, d, 1);          /* dq~ += dS k~ (times scale below) */
    }
    T sc = (T)p->scale;
    for (int64_t x = 0; x < nq * d; x++) dq_dst[rows.m0 * d + x] = sc * ws->dq[x];
  }
}

static int FN(attn_bwd)(const CfAttnArgs *p) {
  const int64_t BH = p->B * p->H, ktiles = (p->Lk + BK - 1) / BK;
  const int64_t d = p->d, dv = p->dv;
  if (BH == 0) return CF_ATTN_OK;
  if (p->Lq == 0 || ktiles == 0) {  /* nothing to attend: every gradient is zero */
    memset(p->dq_rot, 0, (size_t)(BH * p->Lq * d) * sizeof(T));
    memset(p->dk_rot, 0, (size_t)(BH * p->Lk * d) * sizeof(T));
    memset(p->dv_full, 0, (size_t)(BH * p->Lk * dv) * sizeof(T));
    return CF_ATTN_OK;
  }
  /* Split the keys of a (b, head) only when B*H cannot feed the threads; every extra split costs
   * one partial dq (B*H*Lq*d) that is summed afterwards in a fixed order. */
  int64_t split = 1;
  if (BH < 2 * (int64_t)p->nthreads) split = (2 * p->nthreads + BH - 1) / BH;
  if (split > ktiles) split = ktiles;
  const size_t dq_bytes = (size_t)(BH * p->Lq * d) * sizeof(T);
  while (split > 1 && (size_t)(split - 1) * dq_bytes > ((size_t)256 << 20)) split--;
  const int64_t per = (ktiles + split - 1) / split;
  split = (ktiles + per - 1) / per;
  T *partial = NULL;
  if (split > 1) {
    partial = (T *)cf_aligned_alloc((size_t)(split - 1) * dq_bytes);
    if (!partial) return CF_ATTN_ENOMEM;
  }
  const int64_t nitems = BH * split;
  const size_t ws_elems = (size_t)(2 * per * BK * d + per * BK * dv + 2 * BQ * d + 2 * BQ * BK + 2 * BQ);
  int failed = 0;
#pragma omp parallel num_threads(p->nthreads)
  {
    T *buf = (T *)cf_aligned_alloc(ws_elems * sizeof(T));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
    FN(BwdWs) ws;
    if (buf) {
      ws.krow = buf;
      ws.kt = ws.krow + per * BK * d;
      ws.vt = ws.kt + per * BK * d;
      ws.q = ws.vt + per * BK * dv;
      ws.dq = ws.q + BQ * d;
      ws.s = ws.dq + BQ * d;
      ws.dp = ws.s + BQ * BK;
      ws.drow = ws.dp + BQ * BK;
      ws.lrow = ws.drow + BQ;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < nitems; it++) {
      if (!buf) continue;
      /* first key chunks first: under causal masking they meet the most queries */
      int64_t c = it % split, bh = it / split;
      int64_t kt0 = c * per, kt1 = kt0 + per < ktiles ? kt0 + per : ktiles;
      T *dst = c == 0 ? (T *)p->dq_rot + bh * p->Lq * d
                      : partial + ((c - 1) * BH + bh) * p->Lq * d;
      FN(bwd_item)(p, &ws, bh / p->H, bh % p->H, kt0, kt1, dst);
    }
    cf_aligned_free(buf);
    if (split > 1 && !failed) {
      /* dq_rot += partials, in split order (deterministic) */
      const int64_t total = BH * p->Lq * d;
      T *dq = (T *)p->dq_rot;
#pragma omp for schedule(static)
      for (int64_t x = 0; x < total; x++) {
        T acc = dq[x];
        for (int64_t c = 1; c < split; c++) acc += partial[(c - 1) * total + x];
        dq[x] = acc;
      }
    }
  }
  cf_aligned_free(partial);
  return failed ? CF_ATTN_ENOMEM : CF_ATTN_OK;
}

#undef VL
#undef FN
#undef FN_CAT
#undef FN_CAT2
