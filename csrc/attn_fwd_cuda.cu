/* Fused CMHA attention forward on CUDA: FlashAttention-2 structure with the Euler rotation fused
 * into the tile loads (contract: CMHA_CONTRACT.md; building blocks: attn_cuda_tile.cuh).
 *
 * A CTA owns BR = 128 query rows of one (batch, query head); each of its 8 warps owns 16 rows.
 * The Q tile is rotated once (with beta) into shared memory. Key tiles of BC = 64 rows stream
 * through shared memory, rotated per query head on the fly (GQA never builds a per-query-head copy
 * of K), V tiles are copied; the next tile's K/V loads are issued into registers before the current
 * tile's tensor-core work (KVPrefetch). Per key tile: S = Q~ K~^T on tensor cores, the online softmax in
 * fp32 registers (scores pre-scaled by scale * log2(e), exp2), then O += P V with P kept in
 * registers. Causal CTAs stop at their last visible key tile. The log-sum-exp (natural log) is
 * saved for the backward; a row that sees no key writes out = 0, lse = -inf. */
#include "attn_cuda_tile.cuh"

namespace cfattn {

template <int D, int BR, int BC> struct FwdSmem {
  static constexpr int LDS = D + 8;
  static constexpr size_t tiles = (size_t)(BR + 2 * BC) * LDS * 2; /* 16-bit elements */
  static constexpr size_t bytes = tiles + (size_t)(D / 2) * (8 + 4 + 4) + (size_t)BC * 4;
};

template <typename T, int D, int BR, int BC>
__global__ void __launch_bounds__(BR * 2, 1) attn_fwd_kernel(const CfAttnArgs a) {
  constexpr int NTHR = BR * 2, LDS = D + 8, H2 = D / 2, NTS = BC / 8, NTO = D / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T *sQ = reinterpret_cast<T *>(smem);
  T *sK = sQ + BR * LDS;
  T *sV = sK + BC * LDS;
  double *s_omega = reinterpret_cast<double *>(smem + FwdSmem<D, BR, BC>::tiles);
  float *s_delta = reinterpret_cast<float *>(s_omega + H2);
  float *s_beta = s_delta + H2;
  float *s_kvalid = s_beta + H2;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t hq = blockIdx.y, b = blockIdx.z, hk = hq / (a.H / a.Hkv);
  Span qs;
  if (!map_tile(a, blockIdx.x, BR, a.Lq, qs)) return;
  const bool packed = a.cu_seqlens != nullptr;
  const int64_t k_lo = packed ? qs.seq_lo : 0, k_hi = packed ? qs.seq_hi : a.Lk;
  const int64_t qoff = packed ? 0 : a.q_offset; /* key n visible to query m iff n <= m + qoff */
  const int64_t k_end = a.causal ? imin64(k_hi, imax64(k_lo, qs.hi + qoff)) : k_hi;
  const bool vec = a.vec != 0;

  stage_params(a, hq, H2, s_delta, s_beta, s_omega, tid, NTHR);
  __syncthreads();
  const RotParams rp = {s_delta, s_beta, s_omega};
  stage_rotated<T, BR, D, true>(sQ, (const T *)a.q + b * a.q_sb + hq * a.q_sh + qs.lo * a.q_sl, a.q_sl,
                                qs.hi - qs.lo, a.q_pos + b * a.qpos_sb + qs.lo * a.qpos_sl, a.qpos_sl, rp,
                                a.layout, vec, tid, NTHR);

  const T *kg = (const T *)a.k + b * a.k_sb + hk * a.k_sh;
  const T *vg = (const T *)a.v + b * a.v_sb + hk * a.v_sh;
  const int64_t *kp = a.k_pos + b * a.kpos_sb;
  const int64_t r0 = qs.lo + warp * 16 + (lane >> 2); /* this thread's rows: r0 and r0 + 8 */
  const float sl2 = (float)a.scale * kLog2e;

  float o[NTO][4];
#pragma unroll
  for (int i = 0; i < NTO; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};

  KVPrefetch<T, BC, D, NTHR> pf;
  if (k_lo < k_end) pf.load(a, kg, vg, kp, b, k_lo, imin64(BC, k_hi - k_lo), vec, tid);
  for (int64_t n0 = k_lo; n0 < k_end; n0 += BC) {
    const int64_t nv = imin64(BC, k_hi - n0);
    __syncthreads(); /* the previous tile's sK/sV reads are done (and sQ is published) */
    pf.store(sK, sV, s_kvalid, rp, a.layout, nv, tid);
    __syncthreads();
    /* the next tile's loads fly while this tile's tensor-core work runs */
    if (n0 + BC < k_end) pf.load(a, kg, vg, kp, b, n0 + BC, imin64(BC, k_hi - n0 - BC), vec, tid);

    float s[NTS][4];
#pragma unroll
    for (int i = 0; i < NTS; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    warp_gemm_abt<T, NTS, D>(s, sQ + warp * 16 * LDS, LDS, sK, LDS, lane);

    /* uniform per CTA: interior tiles of an unpadded, non-causal-diagonal range skip the mask */
    const bool need_mask = a.kpm != nullptr || nv < BC || (a.causal && n0 + BC - 1 > qs.lo + qoff);
#pragma unroll
    for (int nt = 0; nt < NTS; nt++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        float x = s[nt][e] * sl2;
        if (need_mask) {
          const int cc = nt * 8 + 2 * (lane & 3) + (e & 1);
          const int64_t row = r0 + (e >> 1) * 8;
          const bool vis = s_kvalid[cc] != 0.f && (!a.causal || n0 + cc <= row + qoff);
          if (!vis) x = -INFINITY;
        }
        s[nt][e] = x;
      }

    /* online softmax: rows r0 (e = 0, 1) and r0 + 8 (e = 2, 3), each spread over a lane quad */
#pragma unroll
    for (int i = 0; i < 2; i++) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < NTS; nt++) mx = fmaxf(mx, fmaxf(s[nt][2 * i], s[nt][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float mnew = fmaxf(mrow[i], mx);
      const float muse = mnew == -INFINITY ? 0.f : mnew; /* all masked so far: avoid -inf - -inf */
      const float alpha = exp2f(mrow[i] - muse);
      mrow[i] = mnew;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < NTS; nt++) {
        const float p0 = exp2f(s[nt][2 * i] - muse), p1 = exp2f(s[nt][2 * i + 1] - muse);
        s[nt][2 * i] = p0;
        s[nt][2 * i + 1] = p1;
        sum += p0 + p1;
      }
      lrow[i] = lrow[i] * alpha + sum; /* this lane's partial row sum; the quad is summed at the end */
#pragma unroll
      for (int nt = 0; nt < NTO; nt++) {
        o[nt][2 * i] *= alpha;
        o[nt][2 * i + 1] *= alpha;
      }
    }

    uint32_t pa[NTS / 2][4];
    acc_to_a<T, NTS / 2>(pa, s);
    warp_gemm_pv<T, NTO, NTS / 2>(o, pa, sV, LDS, lane);
  }

  T *og = (T *)a.out + b * a.o_sb + hq * a.o_sh;
  float *lse = a.lse + (b * a.H + hq) * a.Lq;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    float l = lrow[i];
    l += __shfl_xor_sync(kFull, l, 1);
    l += __shfl_xor_sync(kFull, l, 2);
    const int64_t row = r0 + i * 8;
    if (row < qs.hi) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T *orow = og + row * a.o_sl;
#pragma unroll
      for (int nt = 0; nt < NTO; nt++) {
        const uint32_t w = Ty<T>::pack(o[nt][2 * i] * inv, o[nt][2 * i + 1] * inv);
        memcpy(orow + nt * 8 + 2 * (lane & 3), &w, 4);
      }
      if ((lane & 3) == 0) lse[row] = l > 0.f ? (mrow[i] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
}

template <typename T, int D>
static const char *launch_fwd(const CfAttnArgs &a, cudaStream_t st) {
  constexpr int BR = 128, BC = 64;
  const size_t smem = FwdSmem<D, BR, BC>::bytes;
  auto kern = attn_fwd_kernel<T, D, BR, BC>;
  if (const char *err = allow_smem(kern, smem)) return err;
  const dim3 grid(num_tiles(a, BR, a.Lq), (unsigned)a.H, (unsigned)a.B);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return NULL;
  kern<<<grid, BR * 2, smem, st>>>(a);
  CF_LAUNCH_CHECK();
  return NULL;
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
