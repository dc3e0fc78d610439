/* PDL kernels: the interface between bind_pdl.c and the CPU (pdl_cpu.c) / CUDA (pdl_cuda.cu)
 * implementations. All sizes, strides and offsets are int64 (N x V > 2^31 works). */
#ifndef CF_PDL_H
#define CF_PDL_H
#include "cf_common.h"
#include "pdl_math.h"

/* The rows of a (B, T, V) or (N, V) logits tensor whose last dimension has stride 1: row
 * r = b * T + t starts at element b * sb + t * st. A 2-D tensor is B = 1. */
typedef struct {
  const void *logits;
  int64_t B, T, V, sb, st;
  const void *targets; /* (B*T,) contiguous, int32 or int64 */
  int targets_i64;
  const void *weights; /* (V,) contiguous: the logits' dtype on CPU, float32 on CUDA */
  int64_t ignore_index;
  double eps;          /* label smoothing */
  int reduction;       /* CF_PDL_* */
  int norm_mode;       /* CF_PDL_NORM_*: where the mean's denominator comes from */
  void *row_loss;      /* (B*T,) per-row loss, already divided by the denominator */
  void *grad;          /* (B*T, V) contiguous gradient of the summed row losses, or NULL: loss only */
} CfPdlArgs;

/* The denominator of reduction "mean": the batch's sum of target weights computed by the kernel
 * (0 -> loss 0), a caller's normalizer (must be > 0, else NaN), or a batch sum computed upstream
 * (fused_linear_pdl_loss's chunks; 0 -> loss 0). */
enum { CF_PDL_NORM_BATCH = 0, CF_PDL_NORM_GIVEN = 1, CF_PDL_NORM_PRECOMPUTED = 2 };

/* ---- CPU (pdl_cpu.c) ---- */
/* Histogram of ids into counts (int64, zeroed here). Returns 0, or -1 with *bad_pos / *bad_value
 * set to the first out-of-range id. */
int cf_pdl_token_counts_cpu(const void *ids, int ids_i64, int64_t n, int64_t ignore_index,
                            int64_t *counts, int64_t V, int nthreads, int64_t *bad_pos,
                            int64_t *bad_value);

/* Loss and gradient in one pass per row (float32 or float64 logits; weights and row_loss of the
 * same dtype). norm: the mean's denominator when norm_mode is GIVEN or PRECOMPUTED. Returns 0, or -1 with the first out-of-range target in
 * *bad_pos / *bad_value. */
int cf_pdl_loss_cpu(const CfPdlArgs *a, int is_f64, double norm, int nthreads, int64_t *bad_pos,
                    int64_t *bad_value);

/* ---- CUDA (pdl_cuda.cu); every launcher runs on `stream` and returns NULL or an error ---- */
/* bad (int64 [2], zeroed by the caller): bad[0] = number of out-of-range ids, bad[1] = one of them. */
CF_EXTERN_C const char *cf_pdl_token_counts_cuda(const void *ids, int ids_i64, int64_t n,
                                                 int64_t ignore_index, int64_t *counts, int64_t V,
                                                 int64_t *bad, int device, void *stream);
/* dtype: CF_F32 / CF_F16 / CF_BF16 logits and grad; weights and row_loss float32.
 * norm: caller's denominator (float32 scalar on the device) or NULL. ws: float32 [4] scratch. */
CF_EXTERN_C const char *cf_pdl_loss_cuda(const CfPdlArgs *a, int dtype, const float *norm,
                                         float *ws, int device, void *stream);
/* grad (n_rows, V) contiguous *= g: one scalar g[0] (per_row = 0; returns at once on the device
 * when g[0] == 1, moving no data) or g[row] per row (per_row = 1). */
CF_EXTERN_C const char *cf_pdl_scale_cuda(void *grad, int dtype, int64_t n_rows, int64_t V,
                                          const float *g, int per_row, int device, void *stream);

#endif
