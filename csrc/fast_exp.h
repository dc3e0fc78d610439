/* A vectorisable float32 exp, shared by the PDL kernels (pdl_math.h) and the CPU attention kernel's
 * online softmax (attn_cpu.c). */
#ifndef CF_FAST_EXP_H
#define CF_FAST_EXP_H
#include <stdint.h>
#include <string.h>
#include "cf_common.h"

/* exp(x) for float32 in a form gcc auto-vectorises (no calls, no branches: the selects become
 * blends). Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact
 * reduction), a degree-7 polynomial for e^r, and 2^n built in the exponent bits. Max error
 * about 1 ulp over the range used here (x <= 0 in the softmax). n is rounded with the
 * 1.5 * 2^23 trick rather than floorf/rintf, which need SSE4.1 to vectorise. Inputs below
 * -87.3 return 0 (the true value is < 1.2e-38, a denormal); NaN propagates (NaN in, NaN out),
 * so a NaN logit makes the row's loss NaN as in torch. */
CF_INLINE float cf_exp_f32(float x) {
  const float lo = -87.33654f, hi = 88.37626f;
  float xc = x < lo ? lo : x;  /* NaN compares false: stays NaN */
  xc = xc > hi ? hi : xc;
  const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
  float t = xc * 1.44269504088896341f + magic;
  float n = t - magic;
  int32_t ti;
  memcpy(&ti, &t, sizeof ti);
  int32_t ni = ti - 0x4B400000; /* bits of magic: the integer n */
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t sbits = (uint32_t)(ni + 127) << 23;
  float scale;
  memcpy(&scale, &sbits, sizeof scale);
  float y = p * scale;
  return x < lo ? 0.0f : y;
}

#endif
