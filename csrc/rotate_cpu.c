/* CPU Euler rotation, float32 and float64 (see rotate.h for the job layout, rotate_math.h for the
 * per-pair math, rotate_cpu_tmpl.h for the type-generic loops). OpenMP threads take rows
 * (forward) or fixed token chunks (backward, so the reduction order never depends on the thread
 * count); the loops over the h pairs of a head are flat and vectorised. */
#include <math.h>
#include <stddef.h>
#include "rotate.h"

/* Vector math. glibc's libmvec has SIMD versions of atan2f/sinf/cosf (and the double ones), but
 * math.h declares them only under -ffast-math, and gcc fuses sinf + cosf of one angle into a
 * sincosf call that has no vector form. Declaring our own names for the same symbols, with the
 * simd attribute, gets both loops vectorised (AVX2: 8 floats / 4 doubles per call) without
 * fast-math anywhere. libmvec's documented accuracy is within 4 ulp, like the scalar versions'
 * order of magnitude; the float64 tests check 1e-12. Elsewhere the plain libm calls are used. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__) && \
    (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
#define CF_VMATH(ret, name, sym, ...) \
  __attribute__((__simd__("notinbranch"), const, nothrow)) ret name(__VA_ARGS__) __asm__(sym);
CF_VMATH(float, cf_vatan2f, "atan2f", float, float)
CF_VMATH(float, cf_vsinf, "sinf", float)
CF_VMATH(float, cf_vcosf, "cosf", float)
CF_VMATH(double, cf_vatan2, "atan2", double, double)
CF_VMATH(double, cf_vsin, "sin", double)
CF_VMATH(double, cf_vcos, "cos", double)
#define atan2f cf_vatan2f
#define sinf cf_vsinf
#define cosf cf_vcosf
#define atan2 cf_vatan2
#define sin cf_vsin
#define cos cf_vcos
#define CF_ROT_VMATH 1
#endif

#include "rotate_math.h"

#ifdef CF_ROT_VMATH
#undef atan2f
#undef sinf
#undef cosf
#undef atan2
#undef sin
#undef cos
#endif

/* Threads worth waking for `pairs` pair evaluations: a parallel region costs microseconds (far
 * more on a loaded machine), one pair a few nanoseconds, so small calls stay on one thread. */
static int rot_threads(int64_t pairs, int nthreads) {
  const int64_t useful = pairs / 16384 + 1;
  if (nthreads < 1) nthreads = 1;
  return (int)(useful < nthreads ? useful : nthreads);
}

#define T float
#define SUF f32
#define ROT_FWD cf_rot_fwd_f32
#define ROT_BWD cf_rot_bwd_f32
#include "rotate_cpu_tmpl.h"
#undef T
#undef SUF
#undef ROT_FWD
#undef ROT_BWD

#define T double
#define SUF f64
#define ROT_FWD cf_rot_fwd_f64
#define ROT_BWD cf_rot_bwd_f64
#include "rotate_cpu_tmpl.h"
#undef T
#undef SUF
#undef ROT_FWD
#undef ROT_BWD

void cf_rotate_fwd_cpu(const CfRotJob *job, void *out, int nthreads) {
  nthreads = rot_threads(job->B * job->H * job->L * job->h, nthreads);
  if (job->x_dtype == CF_F64) rot_fwd_f64(job, (double *)out, nthreads);
  else rot_fwd_f32(job, (float *)out, nthreads);
}

void cf_rotate_bwd_cpu(const CfRotBwdJob *job, int nthreads) {
  nthreads = rot_threads(job->f.B * job->f.H * job->f.L * job->f.h, nthreads);
  if (job->f.x_dtype == CF_F64) rot_bwd_f64(job, nthreads);
  else rot_bwd_f32(job, nthreads);
}
