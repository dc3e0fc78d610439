/* Per-row math of the Power-Law Decay Loss (docs/design.md, "PDL"), shared by the CPU kernels (gcc) and
 * the CUDA kernels (nvcc), so the CPU tests exercise the formulas the GPU runs.
 *
 * Row t, logits z (V,), target y, class weights w, smoothing eps, denominator `norm`:
 *   lse   = log sum_c exp(z_c)
 *   loss  = [ (1-eps) w_y (lse - z_y) + (eps/V) sum_c w_c (lse - z_c) ] / norm
 *         = [ (1-eps) w_y (lse - z_y) + (eps/V) (lse W - sum_c w_c z_c) ] / norm,   W = sum_c w_c
 * which is torch's weighted cross-entropy with label smoothing (the smoothing term weights each
 * class by its own w_c; the mean divides by sum_t w_{y_t}, not by a token count). Its gradient is
 *   dz_c  = [ ((1-eps) w_y + eps W / V) p_c - (eps/V) w_c - (1-eps) w_y [c == y] ] / norm.
 * With p_c = e_c / s, e_c = exp(z_c - max), s = sum e_c, every kernel computes
 *   dz_c  = e_c * A - B w_c - [c == y] C,   A = ((1-eps) w_y + eps W / V) / (s norm),
 *                                          B = eps / (V norm),  C = (1-eps) w_y / norm.
 */
#ifndef CF_PDL_MATH_H
#define CF_PDL_MATH_H
#include <math.h>
#include <string.h>
#include "cf_common.h"
#include "fast_exp.h"

/* reduction codes shared with complexformer/pdl.py */
enum { CF_PDL_NONE = 0, CF_PDL_SUM = 1, CF_PDL_MEAN = 2 };

typedef struct {
  double A_times_s; /* ((1-eps) w_y + eps W / V) / norm: divide by s to get A */
  double B;         /* eps / (V norm) */
  double C;         /* (1-eps) w_y / norm */
} CfPdlCoef;

CF_INLINE CfPdlCoef cf_pdl_coef(double wy, double W, double V, double eps, double inv_norm) {
  CfPdlCoef c;
  c.A_times_s = ((1.0 - eps) * wy + eps * W / V) * inv_norm;
  c.B = eps / V * inv_norm;
  c.C = (1.0 - eps) * wy * inv_norm;
  return c;
}

/* swz = sum_c w_c z_c (only read when eps > 0). An infinite class weight makes W infinite: the
 * smoothing term sum_c w_c (lse - z_c) is then W itself (each lse - z_c > 0), as torch computes it,
 * where lse W - swz would be inf - inf = NaN. */
CF_INLINE double cf_pdl_row_loss(double lse, double zy, double wy, double W, double swz, double V,
                                 double eps, double inv_norm) {
  double l = (1.0 - eps) * wy * (lse - zy);
  if (eps > 0.0) l += eps / V * (isinf(W) ? W : lse * W - swz);
  return l * inv_norm;
}

/* 1 / norm. A denominator the kernel computed itself (sum of the batch's target weights) is
 * exactly 0 when the batch has no counted token (or only zero-weight targets): the loss is then
 * 0 with a zero gradient, as the reference trainer does. Any other sum, negative included (a
 * negative class weight), is divided by, as F.cross_entropy(weight=w) does. A caller-given
 * normalizer that is not positive is a bug upstream: NaN, never a silent 0. */
CF_INLINE double cf_pdl_inv_norm(double norm, int computed) {
  if (computed) return norm != 0.0 ? 1.0 / norm : 0.0;
  return norm > 0.0 ? 1.0 / norm : NAN;
}

#endif
