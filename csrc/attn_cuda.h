/* Fused CMHA attention on CUDA (contract: docs/design.md, "Attention").
 *
 * One argument block serves the forward and the backward launchers; bind_attn_cuda.c fills it
 * from validated DLPack views. Strides are in elements; a stride of 0 broadcasts (q_pos / k_pos
 * with one row, freqs shared by all heads). */
#ifndef CF_ATTN_CUDA_H
#define CF_ATTN_CUDA_H
#include "cf_common.h"

typedef struct {
  /* q (B, H, Lq, d), k (B, Hkv, Lk, d), v (B, Hkv, Lk, dv): last dim contiguous */
  const void *q, *k, *v;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  /* float32 parameters: delta, beta (H, h); freqs (h,) or (H, h) (head stride 0 when shared) */
  const float *delta, *beta, *freqs;
  int64_t delta_sh, beta_sh, freqs_sh;
  /* int64 positions (Bp, L), Bp in {1, B} (batch stride 0 when Bp == 1) */
  const int64_t *q_pos, *k_pos;
  int64_t qpos_sb, qpos_sl, kpos_sb, kpos_sl;
  /* optional: key padding mask (B, Lk) bool, True = attend; packed sequences cu_seqlens (nseq+1,) */
  const uint8_t *kpm;
  int64_t kpm_sb, kpm_sl;
  const int32_t *cu_seqlens;
  int64_t nseq;
  int64_t B, H, Hkv, Lq, Lk, d, dv;
  int dtype;   /* CF_F16 or CF_BF16 */
  int causal, layout;
  int vec;     /* 1: q, k, v (backward: and out, dout) rows are 16-byte aligned, 16-byte loads are safe */
  double scale;
  int64_t q_offset;
  /* out (B, H, Lq, dv) dtype of q: written by the forward, read by the backward */
  void *out;
  int64_t o_sb, o_sh, o_sl;
  float *lse;  /* (B, H, Lq) contiguous: written by the forward, read by the backward */
  /* backward only: dout like out; float32 contiguous outputs */
  const void *dout;
  int64_t do_sb, do_sh, do_sl;
  float *dq_rot, *dk_rot, *dv_full;
  /* rotation workspaces (both set, else both NULL): (B, H, Lq, d) and (B, H, Lk, d), dtype of q,
   * contiguous, 16-byte aligned. The launcher first writes the rotated q~ and k~ (k per query head)
   * into them, then runs kernels that only copy tiles (cp.async pipelining). The backward needs
   * them; a forward without them (GQA) rotates each key tile as it loads it. */
  void *q_rot, *k_rot;
} CfAttnArgs;

/* Both return NULL on success or a static error message; they run on `stream` of `device`. */
CF_EXTERN_C const char *cf_attn_fwd_cuda(const CfAttnArgs *a, int device, void *stream);
CF_EXTERN_C const char *cf_attn_bwd_cuda(const CfAttnArgs *a, int device, void *stream);
/* 1 when the CUDA kernels take this (dtype, d, dv), else 0 (the glue then picks another backend):
 * tensor cores only, float16/bfloat16, d = dv in {64, 128}. */
CF_INLINE int cf_attn_cuda_supported(int dtype, int64_t d, int64_t dv) {
  return (dtype == CF_F16 || dtype == CF_BF16) && d == dv && (d == 64 || d == 128);
}

#endif
