/* Branch-free float32 atan2 and sincos that gcc vectorises (no libm call in the loop body), for
 * the Euler rotation inside the CPU attention tile loads, where scalar libm calls cost as much as
 * the attention arithmetic itself.
 *
 * Both are the Cephes single-precision algorithms with their branches turned into selects:
 *   atan2: t = min(|x|,|y|) / max(|x|,|y|) in [0, 1], reduced to |u| <= tan(pi/8) by
 *          u = (t - 1) / (t + 1) (+ pi/4), an odd degree-9 polynomial, then octant fix-up.
 *          Max error ~2 ulp; signed zeros follow libm (atan2(-0, -1) = -pi, atan2(+0, -0) = pi).
 *   sincos: n = round(x * 2/pi), r = x - n * pi/2 with pi/2 split in three (exact for
 *          |x| < ~1e4, accuracy degrading slowly beyond), degree-7/8 polynomials on [-pi/4, pi/4],
 *          quadrant select. Max error ~1 ulp for the angles the rotation produces. */
#ifndef CF_FAST_TRIG_H
#define CF_FAST_TRIG_H
#include "cf_common.h"

CF_INLINE float cf_fast_atan2f(float y, float x) {
  float ax = x < 0 ? -x : x, ay = y < 0 ? -y : y;
  float mx = ax > ay ? ax : ay, mn = ax > ay ? ay : ax;
  float t = mx > 0 ? mn / mx : 0.0f;
  int big = t > 0.41421356237309504880f;
  float u = big ? (t - 1.0f) / (t + 1.0f) : t;
  float z = u * u;
  float p = 8.05374449538e-2f;
  p = p * z - 1.38776856032e-1f;
  p = p * z + 1.99777106478e-1f;
  p = p * z - 3.33329491539e-1f;
  float a = p * z * u + u + (big ? 0.78539816339744830962f : 0.0f);
  a = ay > ax ? 1.57079632679489661923f - a : a;
  a = __builtin_copysignf(1.0f, x) < 0 ? 3.14159265358979323846f - a : a; /* x < 0 or x = -0 */
  return __builtin_copysignf(a, y);
}

CF_INLINE void cf_fast_sincosf(float x, float *s_out, float *c_out) {
  const float shifter = 12582912.0f; /* 1.5 * 2^23: round to nearest without roundps */
  float n = (x * 0.63661977236758134308f + shifter) - shifter;
  float r = x - n * 1.5703125f;
  r = r - n * 4.837512969970703125e-4f;
  r = r - n * 7.54978995489188216e-8f;
  float z = r * r;
  float s = -1.9515295891e-4f;
  s = s * z + 8.3321608736e-3f;
  s = s * z - 1.6666654611e-1f;
  s = s * z * r + r;
  float c = 2.443315711809948e-5f;
  c = c * z - 1.388731625493765e-3f;
  c = c * z + 4.166664568298827e-2f;
  c = c * z * z - 0.5f * z + 1.0f;
  int q = (int)n & 3;
  float sin_v = (q & 1) ? c : s;
  float cos_v = (q & 1) ? s : c;
  *s_out = (q & 2) ? -sin_v : sin_v;
  *c_out = ((q + 1) & 2) ? -cos_v : cos_v;
}

#endif
