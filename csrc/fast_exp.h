/* A branch-free float32 exp that gcc vectorises (no libm call in the loop body).
 *
 * Cephes' expf: n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two so r is exact to ~1 ulp),
 * exp(r) by a degree-6 polynomial on [-ln2/2, ln2/2], then 2^n built in the exponent bits.
 * Max relative error ~2 ulp on [-87.3, 88.3]. Inputs below -87.3 (including -inf) return exactly
 * 0, which is what a masked attention score needs; inputs above 88.3 saturate (the attention
 * kernels only ever pass x <= 0). NaN in gives an unspecified finite value out. */
#ifndef CF_FAST_EXP_H
#define CF_FAST_EXP_H
#include "cf_common.h"

CF_INLINE float cf_fast_expf(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  /* round to nearest by the 1.5 * 2^23 trick: vectorises without SSE4.1 roundps */
  const float shifter = 12582912.0f;
  float n = (xc * 1.44269504088896341f + shifter) - shifter;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  union { int32_t i; float f; } e;
  e.i = ((int32_t)n + 127) << 23;
  float y = p * e.f;
  return x < lo ? 0.0f : y;
}

#endif
