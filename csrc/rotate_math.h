/* Per-element math of the Euler rotation (docs/design.md, "CMHA"), shared by the CPU kernels, the CUDA
 * kernels and the fused attention tile loaders.
 *
 * One (re, im) pair of a head becomes
 *     r = sqrt(re^2 + im^2 + eps_r),  theta = atan2(im, re),
 *     phi = delta * theta + offset,   offset = beta (queries only) + omega * p,
 *     out = (r cos phi, r sin phi).
 *
 * Backward. With c = re/r, s = im/r, A = g_re cos phi + g_im sin phi, B = g_re sin phi - g_im cos phi:
 *     d re = c A + delta s B,   d im = s A - delta c B,   d phi = -r B,
 * and d delta = d phi * theta, d beta = d phi, d omega = d phi * p. The derivative of theta is
 * taken as (-s, c) / r, i.e. re^2 + im^2 is replaced by r^2 = re^2 + im^2 + eps_r: this keeps
 * |d/dx| <= 1 + |delta| as r -> 0 (never a division by re^2 + im^2). The cost: the theta terms
 * (delta s B, delta c B) differ from the exact derivative of the eps-regularised function by a
 * relative eps_r / (re^2 + im^2), i.e. 1e-9 for a pair of norm 1, 1e-5 for a pair of norm 0.01,
 * 10% at norm 1e-4. That is above float64 rounding (1e-16) for any pair of norm below ~3000, so
 * float64 gradient checks against autograd of the plain formula need a tolerance (measured on
 * N(0,1) inputs: benchmarks/RESULTS.md, "Rotation backward"); float32 rounding (6e-8) hides it
 * for pairs of norm above ~0.13. docs/design.md, "Deviations", says why the bound is worth it.
 */
#ifndef CF_ROTATE_MATH_H
#define CF_ROTATE_MATH_H
#include <math.h>
#include "cf_common.h"

#define CF_EPS_R 1e-9
#define CF_TWO_PI 6.283185307179586476925286766559
#define CF_POS_MIN -2147483648.0 /* the positions' range: int32 (complexformer/checks.py POS_MIN, POS_MAX) */
#define CF_POS_MAX 2147483647.0

/* omega * p reduced to [-pi, pi] in double, so long contexts keep float32 phase accuracy.
 * Multiplying by 1 / (2 pi) instead of dividing: a double division is a ~40-instruction sequence on
 * GPUs (it made the attention's pre-rotation pass compute-bound); the two can differ only when
 * a / (2 pi) is within an ulp of a half-integer, where both results are the same angle (+-pi). */
CF_INLINE double cf_pos_angle(double omega, double p) {
  double a = omega * p;
#ifdef __CUDA_ARCH__ /* out-of-range positions: NaN (cf_pos_value); the CPU kernels convert once per row */
  if (!(p >= CF_POS_MIN && p <= CF_POS_MAX)) return (double)NAN;
#endif
  return a - CF_TWO_PI * rint(a * (1.0 / CF_TWO_PI));
}

/* A position as the rotation reads it: positions outside the int32 range (docs/design.md, "Masks
 * and positions") become NaN, so their rotation is NaN. The Python checks raise for them on the
 * CPU; CUDA positions are not read on the host (a sync), so there the NaN is what tells. */
CF_INLINE double cf_pos_value(int64_t pos) {
  return pos >= (int64_t)CF_POS_MIN && pos <= (int64_t)CF_POS_MAX ? (double)pos : (double)NAN;
}

/* The forward in two halves, for callers that reuse a pair's polar form (r, theta) across heads:
 * cf_rot_polar (head-independent) and cf_rot_from_polar (the head's delta and offset). */
#define CF_DEFINE_ROTATE(T, SUF, SQRT, ATAN2, SIN, COS)                                          \
  CF_INLINE void cf_rot_polar_##SUF(T re, T im, T *r, T *theta) {                                \
    *r = SQRT(re * re + im * im + (T)CF_EPS_R);                                                  \
    *theta = ATAN2(im, re);                                                                      \
  }                                                                                              \
  CF_INLINE void cf_rot_from_polar_##SUF(T r, T theta, T delta, T offset, T *out_re, T *out_im) { \
    T phi = delta * theta + offset;                                                              \
    *out_re = r * COS(phi);                                                                      \
    *out_im = r * SIN(phi);                                                                      \
  }                                                                                              \
  CF_INLINE void cf_rot_fwd_##SUF(T re, T im, T delta, T offset, T *out_re, T *out_im) {          \
    T r, theta;                                                                                  \
    cf_rot_polar_##SUF(re, im, &r, &theta);                                                      \
    cf_rot_from_polar_##SUF(r, theta, delta, offset, out_re, out_im);                            \
  }                                                                                              \
  /* Returns d phi; writes the input gradients and theta (for d delta = d phi * theta). */        \
  CF_INLINE T cf_rot_bwd_##SUF(T re, T im, T delta, T offset, T g_re, T g_im, T *d_re, T *d_im,   \
                               T *theta) {                                                       \
    T r = SQRT(re * re + im * im + (T)CF_EPS_R);                                                 \
    T inv = (T)1 / r;                                                                            \
    T c = re * inv, s = im * inv;                                                                \
    T th = ATAN2(im, re);                                                                        \
    T phi = delta * th + offset;                                                                 \
    T sp = SIN(phi), cp = COS(phi);                                                              \
    T A = g_re * cp + g_im * sp;                                                                 \
    T B = g_re * sp - g_im * cp;                                                                 \
    *d_re = c * A + delta * s * B;                                                               \
    *d_im = s * A - delta * c * B;                                                               \
    *theta = th;                                                                                 \
    return -r * B;                                                                               \
  }

CF_DEFINE_ROTATE(float, f32, sqrtf, atan2f, sinf, cosf)
CF_DEFINE_ROTATE(double, f64, sqrt, atan2, sin, cos)

/* Index of element j's real and imaginary parts within a head of size d = 2h. */
enum { CF_LAYOUT_HALF = 0, CF_LAYOUT_INTERLEAVED = 1 };
CF_INLINE int64_t cf_re_index(int layout, int64_t j, int64_t h) { return layout ? 2 * j : j; }
CF_INLINE int64_t cf_im_index(int layout, int64_t j, int64_t h) { return layout ? 2 * j + 1 : j + h; }

#endif
