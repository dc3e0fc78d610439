/* Fused CMHA attention backward on CUDA: FlashAttention-2 structure, deterministic (no atomics).
 * Outputs are gradients with respect to the ROTATED q~ and k~ (scale applied) and v, per query head
 * (contract: docs/design.md, "Attention"); the glue sums over GQA groups and back-rotates.
 *
 * Four launches on the caller's stream:
 *  0. the pre-rotation pass (attn_cuda_tile.cuh, launch_prerotate) writes q~ and k~ (per query head)
 *     into the workspaces q_rot, k_rot, so the kernels below copy plain tiles;
 *  1. dot:  D_m = sum_c dO_mc O_mc - dlse_m (dlse: the gradient w.r.t. lse, 0 when absent), one
 *     warp per row. D is parked in dq_rot[b, h, m, 0]: dq_rot is not written before launch 3,
 *     and there every CTA reads D of its own rows (then a barrier) before it overwrites them, so no
 *     extra workspace crosses the C boundary.
 *  2. dkdv: a CTA per (key tile, query head, batch). It keeps dK~ and dV of its keys in registers
 *     while query tiles stream by; computing the transposed products
 *     S^T = K~ Q~^T and dP^T = V dO^T makes P^T and dS^T land directly in A-operand layout for
 *     dV += P^T dO and dK~ += dS^T Q~.
 *  3. dq: a CTA per (query tile, query head, batch) streams key tiles and recomputes S, P and
 *     dP: dQ~ += dS K~ (instead of atomics from launch 2).
 * P = exp(scale * S - lse) from the forward's lse; a row with lse = -inf (no visible key) has P = 0. */
#include "attn_cuda_tile.cuh"

namespace cfattn {

/* D_m = sum_c dO_mc O_mc - dlse_m. G = D / 8 lanes per row, each with 8 elements (one 16-byte load
 * of O and of dO when rows are aligned), so a 256-thread block covers 256 / G rows (32 at d = 64). */
template <typename T, int D>
__global__ void __launch_bounds__(256) attn_bwd_dot_kernel(const CfAttnArgs a) {
  constexpr int G = D / 8, RPB = 256 / G;
  static_assert(32 % G == 0, "a row's lanes must sit in one warp");
  const int sub = threadIdx.x % G;
  const int64_t row = (int64_t)blockIdx.x * RPB + threadIdx.x / G, hq = blockIdx.y, b = blockIdx.z;
  float acc = 0.f;
  if (row < a.Lq) {
    float x[8], y[8];
    load8(x, (const T *)a.out + b * a.out_s.b + hq * a.out_s.h + row * a.out_s.l + sub * 8, a.vec != 0);
    load8(y, (const T *)a.dout + b * a.dout_s.b + hq * a.dout_s.h + row * a.dout_s.l + sub * 8, a.vec != 0);
#pragma unroll
    for (int i = 0; i < 8; i++) acc = fmaf(x[i], y[i], acc);
  }
#pragma unroll
  for (int w = G / 2; w > 0; w >>= 1) acc += __shfl_xor_sync(kFull, acc, w); /* within the row's G lanes */
  if (row < a.Lq && sub == 0) {
    const int64_t m = (b * a.H + hq) * a.Lq + row;
    ((float *)a.dq_rot)[m * a.d] = a.dlse ? acc - ((const float *)a.dlse)[m] : acc;
  }
}

/* Per-row softmax statistics of query rows [m0, m0 + rows): lse * log2(e) (+inf where the row is
 * outside the range or saw no key, so exp2(x - lse2) = 0 there) and D (0 outside). */
__device__ __forceinline__ void stage_row_stats(const CfAttnArgs &a, int64_t b, int64_t hq, int64_t m0, int64_t nvalid,
                                                int rows, float *s_lse2, float *s_D, int tid, int nthr) {
  const int64_t base = (b * a.H + hq) * a.Lq + m0;
  for (int i = tid; i < rows; i += nthr) {
    float l2 = INFINITY, dd = 0.f;
    if (i < nvalid) {
      const float l = ((const float *)a.lse)[base + i];
      l2 = l == -INFINITY ? INFINITY : l * kLog2e;
      /* a NaN row (NaN lse, from a NaN input): D = 0, so dS = P (dP - D) is NaN on the keys the row
       * sees (P NaN) and 0 on the masked ones (P = 0), as torch's softmax backward gives */
      dd = l == l ? ((float *)a.dq_rot)[(base + i) * a.d] : 0.f;
    }
    s_lse2[i] = l2;
    s_D[i] = dd;
  }
}

/* One streamed query tile of the dkdv kernel for one warp (MB * 16 keys, local kw0 ..): recompute S^T
 * and P^T, then dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK~ += dS^T Q~. sKw, sVw: the
 * warp's keys. need_mask (warp-uniform, bwd_need_mask): a key padding mask or a tile on the causal
 * diagonal; elsewhere every P^T entry is live. Query rows past the range need no mask (lse2 = +inf gives P = 0, D = 0 gives dS = 0), nor
 * do key rows past the range (their dK~ / dV rows are never stored). */
template <typename T, int D, int BQ, int MB>
__device__ __forceinline__ void dkdv_step(float (&dk)[MB][D / 8][4], float (&dv)[MB][D / 8][4], const CfAttnArgs &a,
                                          const T *sKw, const T *sVw, const T *sQ, const T *sdO,
                                          const float *s_kvalid, const float *s_lse2, const float *s_D, int64_t k0,
                                          int64_t m0, int64_t qoff, int kw0, bool need_mask, float sl2, int lane) {
  constexpr int LDS = D + 8, NTQ = BQ / 8;
  float st[MB][NTQ][4]; /* S^T: MB * 16 keys x BQ queries */
  zero_acc(st);
  gemm_ss<T, MB, NTQ, D / 16>(st, sKw, LDS, sQ, LDS, lane);
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int nt = 0; nt < NTQ; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int cq = nt * 8 + 2 * (lane & 3) + (e & 1);
        float p = ex2_fast(fmaf(st[m][nt][e], sl2, -s_lse2[cq]));
        if (need_mask) {
          const int kl = kw0 + m * 16 + (lane >> 2) + (e >> 1) * 8;
          if (s_kvalid[kl] == 0.f || (a.causal && k0 + kl > m0 + cq + qoff)) p = 0.f;
        }
        st[m][nt][e] = p;
      }
  uint32_t pa[MB][NTQ / 2][4];
  acc_to_a<T>(pa, st);
  gemm_rs<T, true>(dv, pa, sdO, LDS, lane);

  float dpt[MB][NTQ][4]; /* dP^T = V dO^T */
  zero_acc(dpt);
  gemm_ss<T, MB, NTQ, D / 16>(dpt, sVw, LDS, sdO, LDS, lane);
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int nt = 0; nt < NTQ; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int cq = nt * 8 + 2 * (lane & 3) + (e & 1);
        dpt[m][nt][e] = st[m][nt][e] * (dpt[m][nt][e] - s_D[cq]); /* dS^T */
      }
  acc_to_a<T>(pa, dpt);
  gemm_rs<T, true>(dk, pa, sQ, LDS, lane);
}

/* Is every key of the warp's [kw_lo, kw_lo + nk) visible to every query of [m0, m0 + nq)? If not (or
 * with a key padding mask) the step masks element by element. */
__device__ __forceinline__ bool bwd_need_mask(const CfAttnArgs &a, int64_t kw_lo, int nk, int64_t m0, int64_t qoff) {
  return a.kpm != nullptr || (a.causal && kw_lo + nk - 1 > m0 + qoff);
}

/* dK~ (scaled) and dV of the warp's keys k0 + kl0 + m * 16 (+ 8) into dk_rot, dv_full (float32, per query head). */
template <int D, int MB>
__device__ __forceinline__ void dkdv_store(const float (&dk)[MB][D / 8][4], const float (&dv)[MB][D / 8][4],
                                           const CfAttnArgs &a, int64_t b, int64_t hq, int64_t k0, int64_t k_hi,
                                           int kl0, int lane) {
  constexpr int NTD = D / 8;
  const float scale = (float)a.scale;
  float *dkg = (float *)a.dk_rot + (b * a.H + hq) * a.Lk * a.d;
  float *dvg = (float *)a.dv_full + (b * a.H + hq) * a.Lk * a.dv;
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int64_t n = k0 + kl0 + m * 16 + i * 8;
      if (n < k_hi) {
#pragma unroll
        for (int nt = 0; nt < NTD; nt++) {
          const int c = nt * 8 + 2 * (lane & 3);
          *reinterpret_cast<float2 *>(dkg + n * a.d + c) =
              make_float2(dk[m][nt][2 * i] * scale, dk[m][nt][2 * i + 1] * scale);
          *reinterpret_cast<float2 *>(dvg + n * a.dv + c) = make_float2(dv[m][nt][2 * i], dv[m][nt][2 * i + 1]);
        }
      }
    }
}

/* One streamed key tile of the dq kernel for one warp (MB * 16 query rows; this thread's rows are
 * r0 + m * 16 (+ 8), absolute): S = Q~ K~^T, dP = dO V^T, dS = P (dP - D), dQ~ += dS K~. sQw, sdOw:
 * the warp's rows. Key rows past the range need no mask: their K~ and V rows are zeros, so they add
 * dS * 0 to dQ~. */
template <typename T, int D, int BK, int MB>
__device__ __forceinline__ void dq_step(float (&dq)[MB][D / 8][4], const CfAttnArgs &a, const T *sQw, const T *sdOw,
                                        const T *sK, const T *sV, const float *s_kvalid, int64_t n0, int64_t r0,
                                        int64_t qoff, const float (&lse2)[MB][2], const float (&Drow)[MB][2],
                                        bool need_mask, float sl2, int lane) {
  constexpr int LDS = D + 8, NTK = BK / 8;
  float s[MB][NTK][4], dp[MB][NTK][4];
  zero_acc(s);
  zero_acc(dp);
  gemm_ss<T, MB, NTK, D / 16>(s, sQw, LDS, sK, LDS, lane);
  gemm_ss<T, MB, NTK, D / 16>(dp, sdOw, LDS, sV, LDS, lane);
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int nt = 0; nt < NTK; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float p = ex2_fast(fmaf(s[m][nt][e], sl2, -lse2[m][e >> 1]));
        if (need_mask) {
          const int cc = nt * 8 + 2 * (lane & 3) + (e & 1);
          const int64_t row = r0 + m * 16 + (e >> 1) * 8;
          if (s_kvalid[cc] == 0.f || (a.causal && n0 + cc > row + qoff)) p = 0.f;
        }
        s[m][nt][e] = p * (dp[m][nt][e] - Drow[m][e >> 1]); /* dS */
      }
  uint32_t pa[MB][NTK / 2][4];
  acc_to_a<T>(pa, s);
  gemm_rs<T, true>(dq, pa, sK, LDS, lane);
}

/* dQ~ (scaled) of rows r0 + m * 16 (+ 8) (those < q_hi) into dq_rot (float32, contiguous). */
template <int D, int MB>
__device__ __forceinline__ void dq_store(const float (&dq)[MB][D / 8][4], const CfAttnArgs &a, int64_t b, int64_t hq,
                                         int64_t r0, int64_t q_hi, int lane) {
  const float scale = (float)a.scale;
  float *dqg = (float *)a.dq_rot + (b * a.H + hq) * a.Lq * a.d;
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int64_t row = r0 + m * 16 + i * 8;
      if (row < q_hi) {
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++) {
          const int c = nt * 8 + 2 * (lane & 3);
          *reinterpret_cast<float2 *>(dqg + row * a.d + c) =
              make_float2(dq[m][nt][2 * i] * scale, dq[m][nt][2 * i + 1] * scale);
        }
      }
    }
}

/* ---- the dkdv and dq kernels: dkdv_step, dq_step on tiles that are plain copies of q~, k~ ----
 * NW warps of MB * 16 owned rows
 * each (MB = 2: 32 rows per warp halves the shared-memory traffic per FLOP), the streamed side
 * double-buffered with cp.async and one barrier per tile (as attn_fwd_pre_kernel: the barrier that
 * publishes tile i also frees tile i-1's buffer for tile i+1). Two CTAs per SM when NW = 4. */
template <int D, int NW, int MB, int BS> struct BwdCfg {
  static constexpr int BO = NW * MB * 16, NTHR = NW * 32, LDS = D + 8, MINB = NW <= 4 ? 2 : 1;
  /* owned: two tiles of BO rows; streamed: two buffers of two tiles of BS rows; then floats:
   * dkdv: key validity (BO) + 2 x (lse2, D) (BS each); dq: lse2, D (BO each) + 2 x key validity (BS) */
  static constexpr size_t tiles = (size_t)(2 * BO + 4 * BS) * LDS * 2;
  static constexpr size_t smem = tiles + (size_t)(2 * BO + 4 * BS) * 4;
};

template <typename T, int D, int NW, int MB, int BQ>
__global__ void __launch_bounds__(NW * 32, BwdCfg<D, NW, MB, BQ>::MINB) attn_bwd_dkdv_kernel(const CfAttnArgs a) {
  using Cfg = BwdCfg<D, NW, MB, BQ>;
  constexpr int BK = Cfg::BO, NTHR = Cfg::NTHR, LDS = Cfg::LDS, NTD = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sK = reinterpret_cast<T *>(smem);
  T *sV = sK + BK * LDS;
  T *sQ0 = sV + BK * LDS; /* buffer i: Q~ at sQ0 + i * 2 * BQ * LDS, dO right after it */
  float *s_kvalid = reinterpret_cast<float *>(smem + Cfg::tiles);
  float *s_stat0 = s_kvalid + BK; /* buffer i: lse2 at s_stat0 + i * 2 * BQ, D right after it */

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t hq = blockIdx.y, b = blockIdx.z, hk = hq / (a.H / a.Hkv);
  Span ks;
  if (!map_tile(a, blockIdx.x, BK, a.Lk, ks)) return; /* causal: key tile 0 (the longest) starts first */
  const bool packed = a.cu_seqlens != nullptr;
  const int64_t q_lo = packed ? ks.seq_lo : 0, q_hi = packed ? ks.seq_hi : a.Lq;
  const int64_t qoff = packed ? 0 : a.q_offset;
  const bool vec = a.vec != 0;
  const int64_t nvk = ks.hi - ks.lo;

  stage_async<T, BK, D>(sK, (const T *)a.k_rot + ((b * a.H + hq) * a.Lk + ks.lo) * D, D, nvk, true, tid, NTHR);
  stage_async<T, BK, D>(sV, (const T *)a.v + b * a.v_s.b + hk * a.v_s.h + ks.lo * a.v_s.l, a.v_s.l, nvk, vec, tid, NTHR);
  stage_key_valid(a, b, ks.lo, nvk, BK, s_kvalid, tid, NTHR);
  cp_async_commit();

  const T *qg = (const T *)a.q_rot + (b * a.H + hq) * a.Lq * D;
  const T *dog = (const T *)a.dout + b * a.dout_s.b + hq * a.dout_s.h;
  const int kw0 = warp * MB * 16, kl0 = kw0 + (lane >> 2); /* the warp's first key, this thread's (local) */
  const float sl2 = (float)a.scale * kLog2e;
  const int64_t m_start = a.causal ? imax64(q_lo, ks.lo - qoff) : q_lo;
  const int64_t ntile = m_start < q_hi ? (q_hi - m_start + BQ - 1) / BQ : 0;
  auto issue = [&](int64_t it) {
    const int buf = (int)(it & 1);
    const int64_t m0 = m_start + it * BQ, nvq = imin64(BQ, q_hi - m0);
    T *sQ = sQ0 + buf * 2 * BQ * LDS;
    stage_async<T, BQ, D>(sQ, qg + m0 * D, D, nvq, true, tid, NTHR);
    stage_async<T, BQ, D>(sQ + BQ * LDS, dog + m0 * a.dout_s.l, a.dout_s.l, nvq, vec, tid, NTHR);
    float *st = s_stat0 + buf * 2 * BQ;
    stage_row_stats(a, b, hq, m0, nvq, BQ, st, st + BQ, tid, NTHR);
    cp_async_commit();
  };

  float dk[MB][NTD][4], dv[MB][NTD][4];
  zero_acc(dk);
  zero_acc(dv);
  if (ntile > 0) issue(0);
  for (int64_t it = 0; it < ntile; it++) {
    cp_async_wait<0>(); /* this thread's copies of tile it (first time: and of K~, V) have landed */
    __syncthreads();    /* ... everyone's; and every warp is done with tile it-1 */
    if (it + 1 < ntile) issue(it + 1); /* into tile it-1's buffer */
    const int buf = (int)(it & 1);
    const int64_t m0 = m_start + it * BQ;
    const T *sQ = sQ0 + buf * 2 * BQ * LDS;
    const float *st = s_stat0 + buf * 2 * BQ;
    constexpr int BQI = CF_ATTN_SM80_PASS ? BQ / 2 : BQ; /* see CF_ATTN_SM80_PASS */
#pragma unroll
    for (int j = 0; j < BQ / BQI; j++)
      dkdv_step<T, D, BQI, MB>(dk, dv, a, sK + kw0 * LDS, sV + kw0 * LDS, sQ + j * BQI * LDS,
                               sQ + (BQ + j * BQI) * LDS, s_kvalid, st + j * BQI, st + BQ + j * BQI, ks.lo,
                               m0 + j * BQI, qoff, kw0, bwd_need_mask(a, ks.lo + kw0, MB * 16, m0 + j * BQI, qoff),
                               sl2, lane);
  }
  cp_async_wait<0>(); /* no copy outlives the CTA (ntile = 0: K~/V were never waited for) */
  dkdv_store<D, MB>(dk, dv, a, b, hq, ks.lo, ks.hi, kl0, lane);
}

template <typename T, int D, int NW, int MB, int BK>
__global__ void __launch_bounds__(NW * 32, BwdCfg<D, NW, MB, BK>::MINB) attn_bwd_dq_kernel(const CfAttnArgs a) {
  using Cfg = BwdCfg<D, NW, MB, BK>;
  constexpr int BQ = Cfg::BO, NTHR = Cfg::NTHR, LDS = Cfg::LDS, NTD = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sdO = sQ + BQ * LDS;
  T *sKV0 = sdO + BQ * LDS; /* buffer i: K~ at sKV0 + i * 2 * BK * LDS, V right after it */
  float *s_lse2 = reinterpret_cast<float *>(smem + Cfg::tiles);
  float *s_D = s_lse2 + BQ;
  float *s_kvalid0 = s_D + BQ; /* buffer i: s_kvalid0 + i * BK */

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t hq = blockIdx.y, b = blockIdx.z, hk = hq / (a.H / a.Hkv);
  Span qs;
  /* causal: the last query tiles (most key tiles) start first, the short ones fill the tail */
  if (!map_tile(a, gridDim.x - 1 - blockIdx.x, BQ, a.Lq, qs)) return;
  const bool packed = a.cu_seqlens != nullptr;
  const int64_t k_lo = packed ? qs.seq_lo : 0, k_hi = packed ? qs.seq_hi : a.Lk;
  const int64_t qoff = packed ? 0 : a.q_offset;
  const int64_t k_end = a.causal ? imin64(k_hi, imax64(k_lo, qs.hi + qoff)) : k_hi;
  const bool vec = a.vec != 0;
  const int64_t nvq = qs.hi - qs.lo;

  const T *kg = (const T *)a.k_rot + (b * a.H + hq) * a.Lk * D;
  const T *vg = (const T *)a.v + b * a.v_s.b + hk * a.v_s.h;
  const int64_t ntile = (k_end - k_lo + BK - 1) / BK;
  auto issue = [&](int64_t it) {
    const int buf = (int)(it & 1);
    const int64_t n0 = k_lo + it * BK, nv = imin64(BK, k_hi - n0);
    T *sK = sKV0 + buf * 2 * BK * LDS;
    stage_async<T, BK, D>(sK, kg + n0 * D, D, nv, true, tid, NTHR);
    stage_async<T, BK, D>(sK + BK * LDS, vg + n0 * a.v_s.l, a.v_s.l, nv, vec, tid, NTHR);
    stage_key_valid(a, b, n0, nv, BK, s_kvalid0 + buf * BK, tid, NTHR);
    cp_async_commit();
  };
  stage_async<T, BQ, D>(sQ, (const T *)a.q_rot + ((b * a.H + hq) * a.Lq + qs.lo) * D, D, nvq, true, tid, NTHR);
  stage_async<T, BQ, D>(sdO, (const T *)a.dout + b * a.dout_s.b + hq * a.dout_s.h + qs.lo * a.dout_s.l, a.dout_s.l, nvq, vec, tid,
                        NTHR);
  cp_async_commit();
  if (ntile > 0) issue(0);
  stage_row_stats(a, b, hq, qs.lo, nvq, BQ, s_lse2, s_D, tid, NTHR);
  /* every thread has read D (parked in dq_rot[..., 0]) before any thread overwrites dq_rot below */
  __syncthreads();

  const int64_t w_lo = qs.lo + warp * MB * 16, r0 = w_lo + (lane >> 2);
  float lse2[MB][2], Drow[MB][2];
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      const int rl = warp * MB * 16 + m * 16 + i * 8 + (lane >> 2);
      lse2[m][i] = s_lse2[rl];
      Drow[m][i] = s_D[rl];
    }
  const T *sQw = sQ + warp * MB * 16 * LDS, *sdOw = sdO + warp * MB * 16 * LDS;
  const float sl2 = (float)a.scale * kLog2e;

  float dq[MB][NTD][4];
  zero_acc(dq);
  for (int64_t it = 0; it < ntile; it++) {
    cp_async_wait<0>(); /* this thread's copies of tile it (first time: and of Q~, dO) have landed */
    __syncthreads();    /* ... everyone's; and every warp is done with tile it-1 */
    if (it + 1 < ntile) issue(it + 1);
    const int buf = (int)(it & 1);
    const int64_t n0 = k_lo + it * BK;
    const T *sK = sKV0 + buf * 2 * BK * LDS;
    constexpr int BKI = CF_ATTN_SM80_PASS ? BK / 2 : BK; /* see CF_ATTN_SM80_PASS */
#pragma unroll
    for (int j = 0; j < BK / BKI; j++)
      dq_step<T, D, BKI, MB>(dq, a, sQw, sdOw, sK + j * BKI * LDS, sK + (BK + j * BKI) * LDS,
                             s_kvalid0 + buf * BK + j * BKI, n0 + j * BKI, r0, qoff, lse2, Drow,
                             bwd_need_mask(a, n0 + j * BKI, BKI, w_lo, qoff), sl2, lane);
  }
  cp_async_wait<0>(); /* no copy outlives the CTA (ntile = 0: Q~/dO were never waited for) */
  dq_store<D, MB>(dq, a, b, hq, r0, qs.hi, lane);
}

/* The dkdv / dq kernels over the key / query tiles of the grid. */
template <typename T, int D, int NW, int MB, int BQ>
static const char *launch_dkdv(const CfAttnArgs &a, cudaStream_t st) {
  using Cfg = BwdCfg<D, NW, MB, BQ>;
  return launch_tiles(attn_bwd_dkdv_kernel<T, D, NW, MB, BQ>, Cfg::smem, Cfg::NTHR, Cfg::BO, a.Lk, a, st);
}
template <typename T, int D, int NW, int MB, int BK>
static const char *launch_dq(const CfAttnArgs &a, cudaStream_t st) {
  using Cfg = BwdCfg<D, NW, MB, BK>;
  return launch_tiles(attn_bwd_dq_kernel<T, D, NW, MB, BK>, Cfg::smem, Cfg::NTHR, Cfg::BO, a.Lq, a, st);
}

/* The tile configurations of the backward: the one place to change them. */
template <typename T, int D>
static const char *launch_bwd(const CfAttnArgs &a, cudaStream_t st) {
  if (a.Lq > 0) {
    const dim3 grid(cf_ceil_div_u(a.Lq, 256 / (D / 8)), (unsigned)a.H, (unsigned)a.B);
    attn_bwd_dot_kernel<T, D><<<grid, 256, 0, st>>>(a);
    CF_LAUNCH_CHECK();
  }
  if (const char *err = launch_prerotate<T, D>(a, st)) return err;
  /* dkdv: d = 64: 4 warps x 32 keys, query tiles of 32; d = 128: dK~ and dV of 32 keys would not fit
   * in registers, so 4 warps x 16 keys (two CTAs per SM beat one CTA of 8 warps, see
   * benchmarks/RESULTS.md). dq: 4 warps x 32 rows, key tiles of 64 (d = 128: 32). All chosen as the
   * largest tiles that compile without spills (-Xptxas -v). */
  if (const char *err = launch_dkdv<T, D, 4, D == 64 ? 2 : 1, 32>(a, st)) return err;
  return launch_dq<T, D, 4, 2, D == 64 ? 64 : 32>(a, st);
}

}  // namespace cfattn

extern "C" const char *cf_attn_bwd_cuda(const CfAttnArgs *a, int device, void *stream) {
  using namespace cfattn;
  if (!cf_attn_cuda_supported(a->dtype, a->d, a->dv)) return "unsupported dtype or head dim (d = dv in {64, 128}, float16/bfloat16)";
  if (a->H > 65535 || a->B > 65535) return "batch and head counts must be at most 65535";
  if (a->H == 0 || a->B == 0) return NULL;
  CfDeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (a->Lq == 0 || a->Lk == 0) { /* no (query, key) pair: zero gradients (the workspaces would be empty) */
    CF_CUDA_TRY(cudaMemsetAsync(a->dq_rot, 0, (size_t)(a->B * a->H * a->Lq * a->d) * sizeof(float), st));
    CF_CUDA_TRY(cudaMemsetAsync(a->dk_rot, 0, (size_t)(a->B * a->H * a->Lk * a->d) * sizeof(float), st));
    CF_CUDA_TRY(cudaMemsetAsync(a->dv_full, 0, (size_t)(a->B * a->H * a->Lk * a->dv) * sizeof(float), st));
    return NULL;
  }
  if (!a->q_rot || !a->k_rot) return "the backward needs the rotation workspaces q_ws and k_ws";
  if (a->dtype == CF_BF16) return a->d == 64 ? launch_bwd<__nv_bfloat16, 64>(*a, st) : launch_bwd<__nv_bfloat16, 128>(*a, st);
  return a->d == 64 ? launch_bwd<__half, 64>(*a, st) : launch_bwd<__half, 128>(*a, st);
}
