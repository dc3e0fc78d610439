/* Euler rotation kernels (docs/design.md, "CMHA"): x (B, Hx, L, d) -> x~ (B, H, L, d), Hx divides H.
 *
 * Pair j of query head i, token (b, l), reads kv head i / G (G = H / Hx) of x and becomes
 *     (r cos phi, r sin phi),  phi = delta[i][j] * theta + beta[i][j] + omega[i][j] * pos[b][l]
 * (beta absent for keys). The per-pair math is csrc/rotate_math.h; this header only describes
 * the jobs the CPU (rotate_cpu.c) and CUDA (rotate_cuda.cu) kernels run.
 *
 * Memory: x and grad may have arbitrary strides in their first three dimensions (last stride 1);
 * everything the kernels write is contiguous and allocated by torch. delta, beta (H, h) and freqs
 * ((h,) with freqs_sh = 0, or (H, h) with freqs_sh = h) are contiguous in the compute dtype:
 * double for float64 x, float otherwise. pos is int64 (Bp, L), Bp in {1, B} (pos_s.b = 0 when
 * Bp = 1). Strides are in elements (CfStrides, the vocabulary of the attention's CfAttnArgs).
 *
 * Parameter gradients are reductions over tokens (b, l). They are deterministic: the B*L tokens
 * are cut into P = ceil(B*L / chunk) fixed chunks (chunk chosen from the shape alone), every chunk
 * writes its own partial sums ws[p][3][H][h] in a fixed order, and a second pass adds the P
 * partials in index order. No float atomics anywhere. */
#ifndef CF_ROTATE_H
#define CF_ROTATE_H
#include "cf_common.h"

typedef struct {
  const void *x;        /* (B, Hx, L, d), dtype x_dtype */
  int x_dtype;          /* CF_F32 / CF_F64 (CPU); CF_F32 / CF_F16 / CF_BF16 (CUDA) */
  int64_t B, H, Hx, L, h;
  CfStrides x_s;
  const int64_t *pos;
  CfStrides pos_s;
  const void *delta, *beta, *freqs; /* beta NULL for keys */
  int64_t freqs_sh;     /* head stride of freqs: 0 when shared by all heads, else h */
  int layout;           /* CF_LAYOUT_HALF / CF_LAYOUT_INTERLEAVED */
} CfRotJob;

typedef struct {
  CfRotJob f;
  const void *grad;     /* (B, H, L, d): dtype grad_dtype (CPU: = x_dtype; CUDA: float32 or x_dtype) */
  int grad_dtype;
  CfStrides grad_s;
  void *dx;             /* (B, Hx, L, d) contiguous, dtype of x */
  void *ws;             /* (P, 3, H, h) contiguous per-chunk partial sums of (d delta, d beta,
                           d omega): double on the CPU, float on CUDA */
  int64_t chunk;        /* tokens per chunk; P = ceil(B*L / chunk) */
  void *ddelta, *dbeta, *dfreqs; /* compute dtype; dbeta / dfreqs NULL when not wanted;
                                    dfreqs has the shape of freqs */
} CfRotBwdJob;

static inline int64_t cf_rot_chunks(const CfRotBwdJob *j) {
  int64_t n = j->f.B * j->f.L;
  return n == 0 ? 0 : (n + j->chunk - 1) / j->chunk;
}

CF_EXTERN_C void cf_rotate_fwd_cpu(const CfRotJob *job, void *out, int nthreads);
CF_EXTERN_C void cf_rotate_bwd_cpu(const CfRotBwdJob *job, int nthreads);

#ifdef CF_WITH_CUDA
/* Rotate q and k (k may be NULL) in one launch. Returns NULL or an error message. */
CF_EXTERN_C const char *cf_rotate_fwd_cuda(const CfRotJob *q, void *q_out, const CfRotJob *k,
                                           void *k_out, int device, void *stream);
CF_EXTERN_C const char *cf_rotate_bwd_cuda(const CfRotBwdJob *job, int device, void *stream);
/* Largest group size G = H / Hx the CUDA backward takes (Python expands keys beyond it). */
#define CF_ROT_CUDA_MAX_GROUP 128
#endif

#endif
