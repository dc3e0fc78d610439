/* Fused CMHA attention (docs/design.md, "Attention"): the argument block and the launchers.
 *
 * The kernels compute ordinary softmax attention on the Euler-rotated q~ and k~. The CPU kernels
 * (attn_cpu.c, one element-type-generic body in attn_cpu_tmpl.h) rotate each query tile once
 * when it is loaded and each key tile per query head on the fly, so grouped-query attention never
 * builds a (B, H, Lk, d) rotated K; the CUDA kernels (attn_fwd_cuda.cu, attn_bwd_cuda.cu) do the
 * same in a GQA forward and otherwise rotate into the two workspaces first.
 *
 * bind_attn.c fills one CfAttnArgs from validated DLPack views and hands it to the CPU or CUDA
 * launcher by q's device; the launchers trust it. Strides are in elements (CfStrides). */
#ifndef CF_ATTN_H
#define CF_ATTN_H
#include "cf_common.h"

/* The compute dtype of a call: float64 for float64 q, float32 otherwise. The parameters, lse and
 * the backward's outputs have it; q, k, v, out and dout have q's dtype. */
typedef struct {
  int64_t B, H, Hkv, Lq, Lk, d, dv;
  int dtype;                     /* q's: CF_F32 / CF_F64 (CPU), CF_F16 / CF_BF16 (CUDA) */
  /* q (B, H, Lq, d), k (B, Hkv, Lk, d), v (B, Hkv, Lk, dv): last dim contiguous */
  const void *q, *k, *v;
  CfStrides q_s, k_s, v_s;
  /* compute dtype: delta, beta (H, d/2) contiguous; freqs (d/2,) or (H, d/2) contiguous */
  const void *delta, *beta, *freqs;
  int64_t freqs_sh;              /* head stride of freqs: 0 when shared by all heads, else d/2 */
  /* int64 positions (Bp, L), Bp in {1, B} */
  const int64_t *q_pos, *k_pos;
  CfStrides qpos_s, kpos_s;
  const uint8_t *kpm;            /* NULL or (B, Lk) bool, True = attend */
  CfStrides kpm_s;
  const int32_t *cu_seqlens;     /* NULL or (nseq + 1,) with cu[0] = 0, cu[nseq] = Lq = Lk */
  int64_t nseq;
  int causal;
  double scale;
  int64_t q_offset;              /* ignored with cu_seqlens (0 within every sequence) */
  int layout;                    /* CF_LAYOUT_HALF / CF_LAYOUT_INTERLEAVED */
  int nthreads;                  /* CPU threads */
  int vec;                       /* CUDA: rows of q, k, v (backward: and out, dout) start 16-byte
                                    aligned, so 16-byte loads are safe */
  /* out (B, H, Lq, dv): written contiguous by the forward, read with out_s by the backward */
  void *out;
  CfStrides out_s;
  void *lse;                     /* (B, H, Lq) contiguous, compute dtype */
  /* backward only: NULL, or the gradient w.r.t. lse, (B, H, Lq) contiguous, compute dtype. Since
   * d lse_m / d S_mn = P_mn, it enters as dS = P (dP - (D - dlse)) (docs/design.md, "Log-sum-exp") */
  const void *dlse;
  /* backward only: dout like out (last dim contiguous); contiguous outputs in the compute dtype,
   * per query head: dq_rot (B, H, Lq, d), dk_rot (B, H, Lk, d), dv_full (B, H, Lk, dv) */
  const void *dout;
  CfStrides dout_s;
  void *dq_rot, *dk_rot, *dv_full;
  /* CUDA rotation workspaces (both set, else both NULL): (B, H, Lq, d) and (B, H, Lk, d), q's
   * dtype, contiguous, 16-byte aligned. The launcher first writes the rotated q~ and k~ (k per
   * query head) into them, then runs kernels that only copy tiles (cp.async pipelining). The
   * backward needs them; a forward without them (GQA) rotates each key tile as it loads it. */
  void *q_rot, *k_rot;
  /* CPU forward only: NULL, or the caller's cache of rotated keys per QUERY head (B, H, >= Lk, d),
   * q's dtype, rows strided by kc_s (last dim contiguous): keys [0, kc_n) already hold their
   * rotation (trusted); the forward rotates keys [kc_n, Lk) into it with rotate_row, then scores
   * every key straight from its rows instead of rotating k (decoding: each key is rotated once). */
  void *k_cache;
  CfStrides kc_s;
  int64_t kc_n;
} CfAttnArgs;

#define CF_ATTN_MAX_D 256 /* largest head dim (d and dv) the CPU kernels accept */

/* Status codes of the CPU kernels. */
enum { CF_ATTN_OK = 0, CF_ATTN_ENOMEM = 1 };

/* dtype CF_F32 or CF_F64. Returns CF_ATTN_OK or CF_ATTN_ENOMEM (a per-thread workspace could not
 * be allocated; outputs are then undefined). Memory: each thread holds O(Lk * (d + dv)) elements
 * of rotated keys / values plus a few (64 x max(d, dv, 64)) tiles (a forward with one query tile
 * adds one shared buffer of B * (Hkv * d + d/2) * Lk elements, at most 256 MB); the backward adds
 * (splits - 1) partial dq copies (B*H*Lq*d each, capped) when B*H is too small to keep every
 * thread busy. Results are deterministic for a given thread count. */
CF_EXTERN_C int cf_attn_fwd_cpu(const CfAttnArgs *a);
CF_EXTERN_C int cf_attn_bwd_cpu(const CfAttnArgs *a);

/* 1 when the CUDA kernels take this (dtype, d, dv), else 0 (the glue then picks another backend):
 * tensor cores only, float16/bfloat16, d = dv in {64, 128}. */
CF_INLINE int cf_attn_cuda_supported(int dtype, int64_t d, int64_t dv) {
  return (dtype == CF_F16 || dtype == CF_BF16) && d == dv && (d == 64 || d == 128);
}

#ifdef CF_WITH_CUDA
/* Both return NULL on success or a static error message; they run on `stream` of `device`. */
CF_EXTERN_C const char *cf_attn_fwd_cuda(const CfAttnArgs *a, int device, void *stream);
CF_EXTERN_C const char *cf_attn_bwd_cuda(const CfAttnArgs *a, int device, void *stream);
#endif

#endif
