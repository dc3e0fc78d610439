/* Fused CMHA attention forward on CUDA: FlashAttention-2 structure with the Euler rotation of q and
 * k done on the device (contract: docs/design.md, "Attention"; building blocks: attn_cuda_tile.cuh).
 * Two kernels, chosen by the glue (complexformer/attention.py, _rotation_workspaces):
 *
 *  - H == Hkv: attn_fwd_pre_kernel. A pre-pass (launch_prerotate) writes the rotated q~ and k~ into
 *    torch-allocated workspaces (q_rot, k_rot); the kernel proper copies plain tiles with cp.async.
 *  - GQA (H != Hkv): attn_fwd_gqa_kernel rotates each key tile per query head as it loads it, so the
 *    forward never materialises a (B, H, Lk, d) copy of K.
 *
 * Both: a CTA owns a tile of query rows of one (batch, query head); key tiles stream through shared
 * memory. Per key tile: S = Q~ K~^T on tensor cores, the online softmax in fp32 registers (scores
 * pre-scaled by scale * log2(e), exp2), then O += P V with P kept in registers. Causal CTAs stop at
 * their last visible key tile. The log-sum-exp (natural log) is saved for the backward; a row that
 * sees no key writes out = 0, lse = -inf. */
#include <string.h>
#include "attn_cuda_tile.cuh"

namespace cfattn {

/* Shared memory of attn_fwd_gqa_kernel: the Q~ tile, one K~ and one V tile, the rotation
 * parameters and the key tile's validity. */
template <int D, int BR, int BC> struct FwdGqaSmem {
  static constexpr int LDS = D + 8;
  static constexpr size_t tiles = (size_t)(BR + 2 * BC) * LDS * 2; /* 16-bit elements */
  static constexpr size_t bytes = tiles + (size_t)(D / 2) * (8 + 4 + 4) + (size_t)BC * 4;
};

/* One warp's MB * 16 query rows: O accumulator, running max (log2 units of the scaled score) and
 * partial row sums. Thread rows: r0 + m * 16 + i * 8 for block m, half i (r0 = warp's row + lane / 4). */
template <int D, int MB> struct FwdRows {
  float o[MB][D / 8][4];
  float mrow[MB][2], lrow[MB][2];
  __device__ __forceinline__ void init() {
    zero_acc(o);
#pragma unroll
    for (int m = 0; m < MB; m++) mrow[m][0] = mrow[m][1] = -INFINITY, lrow[m][0] = lrow[m][1] = 0.f;
  }
};

/* Given the raw scores S = Q~ K~^T of one key tile (s, MB*16 x BC): mask, online softmax, O += P V.
 * w_lo: the warp's first query row (the mask is skipped when every key of the tile is visible to
 * every row of the warp). P = exp2(S * scale * log2(e) - m) is one FFMA and one ex2 per score. */
template <typename T, int D, int BC, int MB>
__device__ __forceinline__ void fwd_softmax_pv(FwdRows<D, MB> &st, float (&s)[MB][BC / 8][4], const CfAttnArgs &a,
                                               const T *sV, const float *s_kvalid, int64_t n0, int64_t nv,
                                               int64_t w_lo, int64_t qoff, int64_t r0, float sl2, int lane) {
  constexpr int LDS = D + 8, NTS = BC / 8, NTO = D / 8;
  /* uniform per warp: a full key tile of an unpadded range left of the causal diagonal needs no mask */
  const bool need_mask = a.kpm != nullptr || nv < BC || (a.causal && n0 + BC - 1 > w_lo + qoff);
  if (need_mask) {
#pragma unroll
    for (int m = 0; m < MB; m++)
#pragma unroll
      for (int nt = 0; nt < NTS; nt++)
#pragma unroll
        for (int e = 0; e < 4; e++) {
          const int cc = nt * 8 + 2 * (lane & 3) + (e & 1);
          const int64_t row = r0 + m * 16 + (e >> 1) * 8;
          if (s_kvalid[cc] == 0.f || (a.causal && n0 + cc > row + qoff)) s[m][nt][e] = -INFINITY;
        }
  }

  /* online softmax: rows (m, i) are spread over a lane quad (e = 2i, 2i + 1 of every column tile) */
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NTS; nt++) mx = fmaxf(mx, fmaxf(s[m][nt][2 * i], s[m][nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float mnew = fmaxf(st.mrow[m][i], mx * sl2);            /* sl2 > 0: max commutes with it */
      const float muse = mnew == -INFINITY ? 0.f : mnew;            /* all masked so far: avoid -inf - -inf */
      const float alpha = ex2_fast(st.mrow[m][i] - muse);
      st.mrow[m][i] = mnew;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NTS; nt++) {
        const float p0 = ex2_fast(fmaf(s[m][nt][2 * i], sl2, -muse));
        const float p1 = ex2_fast(fmaf(s[m][nt][2 * i + 1], sl2, -muse));
        s[m][nt][2 * i] = p0;
        s[m][nt][2 * i + 1] = p1;
        sum += p0 + p1;
      }
      st.lrow[m][i] = st.lrow[m][i] * alpha + sum; /* this lane's partial row sum; the quad is summed at the end */
#pragma unroll
      for (int nt = 0; nt < NTO; nt++) {
        st.o[m][nt][2 * i] *= alpha;
        st.o[m][nt][2 * i + 1] *= alpha;
      }
    }

  uint32_t pa[MB][NTS / 2][4];
  acc_to_a<T>(pa, s);
  gemm_rs<T, true>(st.o, pa, sV, LDS, lane);
}

/* One key tile for one warp with its Q rows in shared memory (sQw): S = Q~ K~^T, then fwd_softmax_pv. */
template <typename T, int D, int BC, int MB>
__device__ __forceinline__ void fwd_tile(FwdRows<D, MB> &st, const CfAttnArgs &a, const T *sQw, const T *sK,
                                         const T *sV, const float *s_kvalid, int64_t n0, int64_t nv, int64_t w_lo,
                                         int64_t qoff, int64_t r0, float sl2, int lane) {
  constexpr int LDS = D + 8;
  float s[MB][BC / 8][4];
  zero_acc(s);
  gemm_ss<T, MB, BC / 8, D / 16>(s, sQw, LDS, sK, LDS, lane);
  fwd_softmax_pv<T, D, BC, MB>(st, s, a, sV, s_kvalid, n0, nv, w_lo, qoff, r0, sl2, lane);
}

/* out = O / l (0 for a row that saw no key), lse = ln(sum exp) (-inf for such a row). */
template <typename T, int D, int MB>
__device__ __forceinline__ void fwd_finalize(const FwdRows<D, MB> &st, const CfAttnArgs &a, int64_t b, int64_t hq,
                                             int64_t r0, int64_t q_hi, int lane) {
  T *og = (T *)a.out + b * a.out_s.b + hq * a.out_s.h;
  float *lse = (float *)a.lse + (b * a.H + hq) * a.Lq;
#pragma unroll
  for (int m = 0; m < MB; m++)
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float l = st.lrow[m][i];
      l += __shfl_xor_sync(kFull, l, 1);
      l += __shfl_xor_sync(kFull, l, 2);
      const int64_t row = r0 + m * 16 + i * 8;
      if (row < q_hi) {
        const float inv = l > 0.f ? 1.f / l : 0.f;
        T *orow = og + row * a.out_s.l;
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++) {
          const uint32_t w = pack2<T>(st.o[m][nt][2 * i] * inv, st.o[m][nt][2 * i + 1] * inv);
          memcpy(orow + nt * 8 + 2 * (lane & 3), &w, 4);
        }
        /* l NaN (a NaN score): lse NaN too, so the backward makes the row's gradients NaN */
        if ((lane & 3) == 0) lse[row] = l > 0.f ? (st.mrow[m][i] + log2f(l)) * kLn2 : l == 0.f ? -INFINITY : l;
      }
    }
}

/* What every forward CTA sets up first: its query tile, key range, per-head parameters, and the
 * rotated Q tile in shared memory (published by the caller's next barrier). False: no tile. */
struct FwdCta {
  Span qs;
  int64_t b, hq, hk, k_lo, k_hi, k_end, qoff;
};

template <typename T, int D, int BR, bool PRE = false>
__device__ __forceinline__ bool fwd_setup(const CfAttnArgs &a, FwdCta &c, T *sQ, RotParams &rp, double *s_omega,
                                          float *s_delta, float *s_beta, int tid, int nthr) {
  c.hq = blockIdx.y, c.b = blockIdx.z, c.hk = c.hq / (a.H / a.Hkv);
  /* PRE: the most expensive (causal: last) query tiles start first, so the short ones fill the tail */
  if (!map_tile(a, PRE ? gridDim.x - 1 - blockIdx.x : blockIdx.x, BR, a.Lq, c.qs)) return false;
  const bool packed = a.cu_seqlens != nullptr;
  c.k_lo = packed ? c.qs.seq_lo : 0, c.k_hi = packed ? c.qs.seq_hi : a.Lk;
  c.qoff = packed ? 0 : a.q_offset; /* key n visible to query m iff n <= m + qoff */
  c.k_end = a.causal ? imin64(c.k_hi, imax64(c.k_lo, c.qs.hi + c.qoff)) : c.k_hi;
  if (PRE) { /* q~ was written by the pre-rotation pass */
    stage_plain<T, BR, D>(sQ, (const T *)a.q_rot + ((c.b * a.H + c.hq) * a.Lq + c.qs.lo) * D, D, c.qs.hi - c.qs.lo,
                          true, tid, nthr);
    return true;
  }
  stage_params(a, c.hq, D / 2, s_delta, s_beta, s_omega, tid, nthr);
  __syncthreads();
  rp = {s_delta, s_beta, s_omega};
  stage_rotated<T, BR, D, true>(sQ, (const T *)a.q + c.b * a.q_s.b + c.hq * a.q_s.h + c.qs.lo * a.q_s.l, a.q_s.l,
                                c.qs.hi - c.qs.lo, a.q_pos + c.b * a.qpos_s.b + c.qs.lo * a.qpos_s.l, a.qpos_s.l, rp,
                                a.layout, a.vec != 0, tid, nthr);
  return true;
}

/* The GQA forward: BR = 128 query rows per CTA, 8 warps of 16 rows. The Q tile is rotated once (with
 * beta) into shared memory; all 8 warps stage every key tile of BC rows, rotating it for this query
 * head (GQA never builds a per-query-head copy of K), and copy the V tile; the next tile's K/V loads
 * are issued into registers before the current tile's tensor-core work (KVPrefetch). */
template <typename T, int D, int BR, int BC>
__global__ void __launch_bounds__(BR * 2, 1) attn_fwd_gqa_kernel(const CfAttnArgs a) {
  constexpr int NTHR = BR * 2, LDS = D + 8, H2 = D / 2;
  using Smem = FwdGqaSmem<D, BR, BC>;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sK = sQ + BR * LDS;
  T *sV = sK + BC * LDS;
  double *s_omega = reinterpret_cast<double *>(smem + Smem::tiles);
  float *s_delta = reinterpret_cast<float *>(s_omega + H2);
  float *s_beta = s_delta + H2;
  float *s_kvalid = s_beta + H2;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  FwdCta c;
  RotParams rp;
  if (!fwd_setup<T, D, BR>(a, c, sQ, rp, s_omega, s_delta, s_beta, tid, NTHR)) return;
  const bool vec = a.vec != 0;
  const T *kg = (const T *)a.k + c.b * a.k_s.b + c.hk * a.k_s.h;
  const T *vg = (const T *)a.v + c.b * a.v_s.b + c.hk * a.v_s.h;
  const int64_t *kp = a.k_pos + c.b * a.kpos_s.b;
  const int64_t r0 = c.qs.lo + warp * 16 + (lane >> 2); /* this thread's rows: r0 and r0 + 8 */
  const float sl2 = (float)a.scale * kLog2e;
  FwdRows<D, 1> st;
  st.init();

  KVPrefetch<T, BC, D, NTHR> pf;
  if (c.k_lo < c.k_end) pf.load(a, kg, vg, kp, c.b, c.k_lo, imin64(BC, c.k_hi - c.k_lo), vec, tid);
  for (int64_t n0 = c.k_lo; n0 < c.k_end; n0 += BC) {
    const int64_t nv = imin64(BC, c.k_hi - n0);
    __syncthreads(); /* the previous tile's sK/sV reads are done (and sQ is published) */
    pf.store(sK, sV, s_kvalid, rp, a.layout, nv, tid);
    __syncthreads();
    /* the next tile's loads fly while this tile's tensor-core work runs */
    if (n0 + BC < c.k_end) pf.load(a, kg, vg, kp, c.b, n0 + BC, imin64(BC, c.k_hi - n0 - BC), vec, tid);
    fwd_tile<T, D, BC, 1>(st, a, sQ + warp * 16 * LDS, sK, sV, s_kvalid, n0, nv, c.qs.lo + warp * 16, c.qoff, r0,
                          sl2, lane);
  }
  fwd_finalize<T, D, 1>(st, a, c.b, c.hq, r0, c.qs.hi, lane);
}

/* H == Hkv: q~ and k~ (per query head) were written by the pre-rotation pass, so key tiles are
 * plain copies and the kernel is a FlashAttention-2 forward. NW warps of MB * 16 rows each (MB = 2:
 * 32 rows per warp, see the warp GEMMs), two CTAs per SM (one CTA's barrier wait is the other's
 * tensor-core time). K/V tiles of BC keys are double-buffered with cp.async and ONE barrier per tile:
 * the barrier that publishes tile i also proves every warp finished tile i-1, whose buffer then
 * receives tile i+1 while the tensor cores work on tile i. QR: the warp's Q~ fragments live in
 * registers for the whole key loop (only with d = 64 and key tiles of 64: with tiles of 128, or at
 * d = 128, the registers go to S and O, and Q~ is re-read from shared memory per tile). */
template <typename T, int D, int MB, int NW, int BC, bool QR>
struct FwdPreCfg {
  static constexpr int BR = NW * MB * 16, NTHR = NW * 32, LDS = D + 8, MINB = NW <= 4 ? 2 : 1;
  static constexpr bool QREG = QR && !CF_ATTN_SM80_PASS;
  static constexpr size_t smem = (size_t)(BR + 4 * BC) * LDS * 2 + 2 * BC * 4;
};

template <typename T, int D, int MB, int NW, int BC, bool QR>
__global__ void __launch_bounds__(NW * 32, FwdPreCfg<T, D, MB, NW, BC, QR>::MINB) attn_fwd_pre_kernel(const CfAttnArgs a) {
  using Cfg = FwdPreCfg<T, D, MB, NW, BC, QR>;
  constexpr int BR = Cfg::BR, NTHR = Cfg::NTHR, LDS = Cfg::LDS;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sKV0 = sQ + BR * LDS; /* buffer i: K at sKV0 + i * 2 * BC * LDS, V right after it */
  float *s_kvalid0 = reinterpret_cast<float *>(sKV0 + 4 * BC * LDS); /* buffer i: s_kvalid0 + i * BC */

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  FwdCta c;
  RotParams rp;
  if (!fwd_setup<T, D, BR, true>(a, c, sQ, rp, nullptr, nullptr, nullptr, tid, NTHR)) return;
  const bool vec = a.vec != 0;
  const T *kg = (const T *)a.k_rot + (c.b * a.H + c.hq) * a.Lk * D; /* per query head, contiguous */
  const T *vg = (const T *)a.v + c.b * a.v_s.b + c.hk * a.v_s.h;
  const int64_t w_lo = c.qs.lo + warp * MB * 16, r0 = w_lo + (lane >> 2);
  const T *sQw = sQ + warp * MB * 16 * LDS;
  const float sl2 = (float)a.scale * kLog2e;
  const int64_t ntile = (c.k_end - c.k_lo + BC - 1) / BC;
  auto issue = [&](int64_t it) {
    const int buf = (int)(it & 1);
    const int64_t n0 = c.k_lo + it * BC, nv = imin64(BC, c.k_hi - n0);
    T *sK = sKV0 + buf * 2 * BC * LDS;
    stage_async<T, BC, D>(sK, kg + n0 * D, D, nv, true, tid, NTHR);
    stage_async<T, BC, D>(sK + BC * LDS, vg + n0 * a.v_s.l, a.v_s.l, nv, vec, tid, NTHR);
    stage_key_valid(a, c.b, n0, nv, BC, s_kvalid0 + buf * BC, tid, NTHR);
    cp_async_commit();
  };
  FwdRows<D, MB> st;
  st.init();
  uint32_t qf[MB][D / 16][4];
  if (ntile > 0) issue(0);
  for (int64_t it = 0; it < ntile; it++) {
    cp_async_wait<0>(); /* this thread's copies of tile it have landed (the only group in flight) */
    __syncthreads();    /* tile it (and sQ) visible to every warp; every warp is done with tile it-1 */
    if (Cfg::QREG && it == 0) load_a<T>(qf, sQw, LDS, lane);
    if (it + 1 < ntile) issue(it + 1); /* into tile it-1's buffer */
    const int buf = (int)(it & 1);
    const int64_t n0 = c.k_lo + it * BC, nv = imin64(BC, c.k_hi - n0);
    const T *sK = sKV0 + buf * 2 * BC * LDS;
    constexpr int BCI = CF_ATTN_SM80_PASS && BC > 64 ? 64 : BC; /* see CF_ATTN_SM80_PASS */
#pragma unroll 1 /* one sub-tile's registers at a time */
    for (int j = 0; j < BC / BCI; j++) {
      float s[MB][BCI / 8][4];
      zero_acc(s);
      if (Cfg::QREG)
        gemm_rs<T, false>(s, qf, sK + j * BCI * LDS, LDS, lane);
      else
        gemm_ss<T, MB, BCI / 8, D / 16>(s, sQw, LDS, sK + j * BCI * LDS, LDS, lane);
      fwd_softmax_pv<T, D, BCI, MB>(st, s, a, sK + (BC + j * BCI) * LDS, s_kvalid0 + buf * BC + j * BCI, n0 + j * BCI,
                                    nv - j * BCI, w_lo, c.qoff, r0, sl2, lane);
    }
  }
  fwd_finalize<T, D, MB>(st, a, c.b, c.hq, r0, c.qs.hi, lane);
}

template <typename T, int D, int MB, int NW, int BC, bool QR>
static const char *launch_fwd_pre(const CfAttnArgs &a, cudaStream_t st) {
  using Cfg = FwdPreCfg<T, D, MB, NW, BC, QR>;
  return launch_tiles(attn_fwd_pre_kernel<T, D, MB, NW, BC, QR>, Cfg::smem, Cfg::NTHR, Cfg::BR, a.Lq, a, st);
}

/* The tile configurations of the forward: the one place to change them. */
template <typename T, int D>
static const char *launch_fwd(const CfAttnArgs &a, cudaStream_t st) {
  if (num_tiles(a, 128, a.Lq) == 0 || a.H == 0 || a.B == 0) return NULL;
  if (!a.q_rot) /* GQA: rotate on load; 128 query rows, key tiles of 64 */
    return launch_tiles(attn_fwd_gqa_kernel<T, D, 128, 64>, FwdGqaSmem<D, 128, 64>::bytes, 128 * 2, 128, a.Lq, a, st);
  if (const char *err = launch_prerotate<T, D>(a, st)) return err;
  /* 4 warps x 32 rows = 128 rows per CTA. d = 64: key tiles of 128 (as FlashAttention-2: half the
   * softmax rescales and barriers per key; faster than tiles of 64 with Q~ in registers, see
   * benchmarks/RESULTS.md) where two such CTAs fit an SM's shared memory (sm_90), else tiles of 64.
   * d = 128: tiles of 32, so S, O and the addressing fit in 255 registers without spilling. */
  if constexpr (D == 64) {
    if (two_ctas_fit(FwdPreCfg<T, D, 2, 4, 128, false>::smem)) return launch_fwd_pre<T, D, 2, 4, 128, false>(a, st);
    return launch_fwd_pre<T, D, 2, 4, 64, true>(a, st);
  } else {
    return launch_fwd_pre<T, D, 2, 4, 32, false>(a, st);
  }
}

}  // namespace cfattn

extern "C" const char *cf_attn_fwd_cuda(const CfAttnArgs *a, int device, void *stream) {
  using namespace cfattn;
  if (!cf_attn_cuda_supported(a->dtype, a->d, a->dv)) return "unsupported dtype or head dim (d = dv in {64, 128}, float16/bfloat16)";
  if (a->H > 65535 || a->B > 65535) return "batch and head counts must be at most 65535";
  CfDeviceGuard guard(device);
  cudaStream_t st = (cudaStream_t)stream;
  if (a->dtype == CF_BF16) return a->d == 64 ? launch_fwd<__nv_bfloat16, 64>(*a, st) : launch_fwd<__nv_bfloat16, 128>(*a, st);
  return a->d == 64 ? launch_fwd<__half, 64>(*a, st) : launch_fwd<__half, 128>(*a, st);
}
