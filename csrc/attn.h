/* Fused CMHA attention (docs/design.md, "Attention"): shared declarations.
 *
 * The kernels compute ordinary softmax attention on the Euler-rotated q~ and k~, rotating each
 * query tile once when it is loaded and each key tile per query head on the fly, so grouped-query
 * attention never builds a (B, H, Lk, d) rotated K. The CPU kernels live in attn_cpu.c (one
 * element-type-generic body in attn_cpu_tmpl.h); the CUDA launchers declare themselves in
 * attn_cuda.h. */
#ifndef CF_ATTN_H
#define CF_ATTN_H
#include "cf_common.h"

/* Everything one forward or backward call needs, already validated by the binding.
 * Element pointers are float* or double* according to the call's dtype. Strides are in
 * elements; the last dimension of q, k, v, dout has stride 1. */
typedef struct {
  int64_t B, H, Hkv, Lq, Lk, d, dv;
  const void *q, *k, *v;
  int64_t q_str[3], k_str[3], v_str[3];    /* strides of dims 0..2 (batch, head, token) */
  const void *delta, *beta;                /* (H, d/2) contiguous */
  const void *freqs;                       /* (d/2,) or (H, d/2) contiguous */
  int64_t freqs_head_stride;               /* 0 when shared by all heads */
  const int64_t *q_pos, *k_pos;            /* (Bp, Lq), (Bp, Lk) contiguous, Bp in {1, B} */
  int64_t pos_batch;                       /* 1 when Bp == B, 0 when Bp == 1 */
  const uint8_t *kpm;                      /* NULL or (B, Lk) bool, True = attend */
  int64_t kpm_str[2];
  const int32_t *cu_seqlens;               /* NULL or (nseq + 1,) with cu[0] = 0, cu[nseq] = Lq = Lk */
  int64_t nseq;
  int causal;
  double scale;
  int64_t q_offset;                        /* ignored with cu_seqlens (0 within every sequence) */
  int layout;                              /* CF_LAYOUT_HALF / CF_LAYOUT_INTERLEAVED */
  int nthreads;
  /* forward outputs; the backward reads out and lse */
  void *out;                               /* (B, H, Lq, dv) contiguous */
  void *lse;                               /* (B, H, Lq) contiguous */
  /* backward only */
  const void *dout;                        /* (B, H, Lq, dv), last dim contiguous */
  int64_t dout_str[3];
  void *dq_rot, *dk_rot, *dv_full;         /* (B,H,Lq,d), (B,H,Lk,d), (B,H,Lk,dv) contiguous */
} CfAttnParams;

#define CF_ATTN_MAX_D 256 /* largest head dim (d and dv) the CPU kernels accept */

/* Status codes of the CPU kernels. */
enum { CF_ATTN_OK = 0, CF_ATTN_ENOMEM = 1 };

/* dtype: CF_F32 or CF_F64. Returns CF_ATTN_OK or CF_ATTN_ENOMEM (a per-thread workspace could
 * not be allocated; outputs are then undefined). Memory: each thread holds O(Lk * (d + dv))
 * elements of rotated keys / values plus a few (64 x max(d, dv, 64)) tiles; the backward adds
 * (splits - 1) partial dq copies (B*H*Lq*d each, capped) when B*H is too small to keep every
 * thread busy. Results are deterministic for a given thread count. */
int cf_attn_fwd_cpu(const CfAttnParams *p, int dtype);
int cf_attn_bwd_cpu(const CfAttnParams *p, int dtype);

#endif
