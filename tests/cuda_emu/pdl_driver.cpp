/* csrc/pdl_cuda.cu under emu_threads.h, against the CPU float32 kernel (pdl_cpu.c) on the same
 * (rounded) inputs: float32 / float16 / bfloat16 logits, int32 / int64 targets, V from 1 to
 * 8197 (both block sizes), the row cache whole, partial and absent, contiguous, strided, misaligned
 * (scalar paths) and 3-D rows, every
 * reduction and denominator mode, label smoothing, ignored and out-of-range targets; the backward's
 * scale kernel (g == 1 leaves the buffer untouched, g != 1, per row); token_counts (shared and
 * global histograms). Prints "N cases, F failures" and exits non-zero on a failure. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>
extern "C" {
#include "pdl.h"
}

static std::mt19937 rng(7);
static float rnd() { return std::normal_distribution<float>(0.f, 1.f)(rng); }
static int fails = 0, cases = 0;

template <typename T> T cvt(float v);
template <> float cvt<float>(float v) { return v; }
template <> __half cvt<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 cvt<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
static float back(float v) { return v; }
static float back(__half v) { return __half2float(v); }
static float back(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> int dt();
template <> int dt<float>() { return CF_F32; }
template <> int dt<__half>() { return CF_F16; }
template <> int dt<__nv_bfloat16>() { return CF_BF16; }
template <typename T> double tol();
template <> double tol<float>() { return 2e-5; }
template <> double tol<__half>() { return 2e-3; }
template <> double tol<__nv_bfloat16>() { return 1e-2; }

template <typename T>
void loss_case(const char *name, int64_t B, int64_t Tn, int64_t V, int64_t pad, int64_t shift, int reduction,
               double eps, int norm_mode, float norm_given, bool i64, bool with_bad, bool no_grad = false, float offset = 0.f,
               bool neg_w = false) {
  cases++;
  const int64_t N = B * Tn, st = V + pad, sb = Tn * st + 3;
  std::vector<T> zs(shift + B * sb + 16);
  std::vector<float> zf(N * V);
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < Tn; t++)
      for (int64_t c = 0; c < V; c++) {
        T v = cvt<T>(3 * rnd() + offset);
        zs[shift + b * sb + t * st + c] = v;
        zf[(b * Tn + t) * V + c] = back(v);
      }
  std::vector<float> w(V);
  for (auto &x : w) x = (0.1f + std::fabs(rnd())) * (neg_w ? -1.f : 1.f);
  std::vector<int64_t> y(N);
  std::vector<int32_t> y32(N);
  for (int64_t r = 0; r < N; r++) {
    y[r] = (int64_t)(rng() % (uint32_t)V);
    if (rng() % 4 == 0) y[r] = -100;
  }
  int64_t bad_row = -1;
  if (with_bad && N > 1) bad_row = N / 2, y[bad_row] = V + 2;
  for (int64_t r = 0; r < N; r++) y32[r] = (int32_t)y[r];

  // the device kernels
  std::vector<float> loss_d(N, -7.f), ws(4);
  std::vector<T> grad_d(N * V, cvt<T>(-7.f));
  CfPdlArgs a{};
  a.logits = zs.data() + shift; a.B = B; a.T = Tn; a.V = V; a.sb = sb; a.st = st;
  a.targets = i64 ? (const void *)y.data() : (const void *)y32.data(); a.targets_i64 = i64;
  a.weights = w.data(); a.ignore_index = -100; a.eps = eps; a.reduction = reduction; a.norm_mode = norm_mode;
  a.row_loss = loss_d.data(); a.grad = no_grad ? nullptr : grad_d.data();
  const char *err = cf_pdl_loss_cuda(&a, dt<T>(), norm_mode == CF_PDL_NORM_BATCH ? nullptr : &norm_given, ws.data(), 0,
                                     nullptr);
  if (err) { printf("FAIL %s: %s\n", name, err); fails++; return; }

  // the CPU reference on the same values (the bad row ignored there, checked for NaN here)
  std::vector<int64_t> yc = y;
  if (bad_row >= 0) yc[bad_row] = -100;
  std::vector<float> loss_c(N), grad_c(N * V);
  CfPdlArgs c = a;
  c.logits = zf.data(); c.B = 1; c.T = N; c.sb = 0; c.st = V; c.targets = yc.data(); c.targets_i64 = 1;
  c.row_loss = loss_c.data(); c.grad = grad_c.data();
  int64_t bp, bv;
  if (cf_pdl_loss_cpu(&c, 0, norm_given, 1, &bp, &bv)) { printf("FAIL %s: CPU reference rejected targets\n", name); fails++; return; }
  if (bad_row >= 0 && reduction == CF_PDL_MEAN && norm_mode == CF_PDL_NORM_BATCH) {
    // the device's batch denominator skips the bad row: same as the CPU's with it ignored
  }
  double lerr = 0, lscale = 1, gerr = 0, gscale = 1e-6;  // 1e-6: a floor for all-zero gradients
  bool nan_ok = true;
  for (int64_t r = 0; r < N; r++) {
    if (r == bad_row) {
      nan_ok = nan_ok && std::isnan(loss_d[r]);
      for (int64_t k = 0; k < V && !no_grad; k++) nan_ok = nan_ok && std::isnan(back(grad_d[r * V + k]));
      continue;
    }
    if (V == 1 && (loss_d[r] != 0.f || (!no_grad && back(grad_d[r]) != 0.f))) nan_ok = false;  // exactly 0, as torch
    lerr = std::fmax(lerr, std::fabs((double)loss_d[r] - loss_c[r]));
    lscale = std::fmax(lscale, std::fabs(loss_c[r]));
    for (int64_t k = 0; k < V; k++) {
      if (no_grad) {  // the gradient buffer must be untouched
        if (back(grad_d[r * V + k]) != -7.f) nan_ok = false;
        continue;
      }
      gerr = std::fmax(gerr, std::fabs((double)back(grad_d[r * V + k]) - grad_c[r * V + k]));
      gscale = std::fmax(gscale, std::fabs(grad_c[r * V + k]));
    }
  }
  if (neg_w && reduction == CF_PDL_MEAN) {  // a negative weight sum divides (as torch), never a silent 0
    double s = 0;
    for (int64_t r = 0; r < N; r++) s += r == bad_row ? 0.0 : std::fabs((double)loss_d[r]);
    nan_ok = nan_ok && s > 0;
  }
  const bool ok = !(lerr > 2e-5 * lscale) && !(gerr > tol<T>() * gscale) && nan_ok;
  if (!ok) {
    printf("FAIL %s B=%lld T=%lld V=%lld pad=%lld shift=%lld red=%d eps=%.2f norm_mode=%d i64=%d bad=%d: "
           "loss err %.3e (scale %.3e) grad err %.3e (scale %.3e) nan_ok=%d\n",
           name, (long long)B, (long long)Tn, (long long)V, (long long)pad, (long long)shift, reduction, eps,
           norm_mode, (int)i64, (int)with_bad, lerr, lscale, gerr, gscale, (int)nan_ok);
    fails++;
  }
}

template <typename T> void scale_case(const char *name, int64_t rows, int64_t V) {
  for (int mode = 0; mode < 3; mode++) {
    cases++;
    std::vector<T> g(rows * V);
    std::vector<float> ref(rows * V);
    for (int64_t i = 0; i < rows * V; i++) g[i] = cvt<T>(rnd()), ref[i] = back(g[i]);
    std::vector<float> go(mode == 2 ? rows : 1);
    for (size_t i = 0; i < go.size(); i++) go[i] = mode == 0 ? 1.0f : 0.5f + (float)i;
    const char *err = cf_pdl_scale_cuda(g.data(), dt<T>(), rows, V, go.data(), mode == 2, 0, nullptr);
    if (err) { printf("FAIL %s scale: %s\n", name, err); fails++; continue; }
    double e = 0, s = 1e-30;
    for (int64_t i = 0; i < rows * V; i++) {
      const double want = (double)ref[i] * go[mode == 2 ? i / V : 0];
      e = std::fmax(e, std::fabs(back(g[i]) - want));
      s = std::fmax(s, std::fabs(want));
    }
    if (mode == 0 ? e != 0 : e > tol<T>() * s) {
      printf("FAIL %s scale mode %d rows=%lld V=%lld: err %.3e\n", name, mode, (long long)rows, (long long)V, e);
      fails++;
    }
  }
}

template <typename I> void counts_case(int64_t n, int64_t V, bool with_bad) {
  cases++;
  std::vector<I> ids(n);
  std::vector<int64_t> want(V, 0);
  for (int64_t i = 0; i < n; i++) {
    ids[i] = (I)(rng() % (uint32_t)V);
    if (i % 9 == 0) ids[i] = (I)-100;
    if (with_bad && i == n / 3) ids[i] = (I)(V + 5);  // never counted
    if (ids[i] >= 0 && ids[i] < V) want[ids[i]]++;
  }
  std::vector<int64_t> counts(V, -1), bad(2, 0);
  const char *err = cf_pdl_token_counts_cuda(ids.data(), sizeof(I) == 8, n, -100, counts.data(), V, bad.data(), 0, nullptr);
  bool ok = !err && counts == want && (with_bad ? bad[0] == 1 && bad[1] == V + 5 : bad[0] == 0);
  if (!ok) {
    printf("FAIL token_counts n=%lld V=%lld i64=%d bad=%d: err=%s bad=[%lld, %lld]\n", (long long)n, (long long)V,
           (int)(sizeof(I) == 8), (int)with_bad, err ? err : "-", (long long)bad[0], (long long)bad[1]);
    fails++;
  }
}

template <typename T> void all_loss_cases(const char *name) {
  const int64_t Vs[] = {1, 3, 33, 1031};
  for (int64_t V : Vs)
    for (int red = 0; red < 3; red++) {
      const double eps = (V + red) % 2 ? 0.1 : 0.0;
      loss_case<T>(name, 1, 3, V, 0, 0, red, eps, CF_PDL_NORM_BATCH, 0.f, true, false);        // contiguous
      loss_case<T>(name, 2, 2, V, 3, 1, red, 0.1 - eps, CF_PDL_NORM_BATCH, 0.f, false, true);  // strided, misaligned, 3-D
      if (V >= 33) loss_case<T>(name, 1, 2, V, 8, 8, red, eps, CF_PDL_NORM_BATCH, 0.f, true, false);  // aligned rows, row stride
    }
  // V >= 8192: the 512-thread kernel
  loss_case<T>(name, 1, 2, 8197, 0, 0, CF_PDL_MEAN, 0.1, CF_PDL_NORM_BATCH, 0.f, true, false);
  loss_case<T>(name, 1, 2, 8197, 5, 3, CF_PDL_NONE, 0.0, CF_PDL_NORM_BATCH, 0.f, false, true);
  // a long row: most of it outside the cache (which holds 1 KB of the row here)
  if (sizeof(T) == 4) loss_case<T>(name, 1, 3, 24601, 3, 1, CF_PDL_SUM, 0.1, CF_PDL_NORM_BATCH, 0.f, true, false);
  loss_case<T>(name, 1, 4, 1031, 0, 0, CF_PDL_MEAN, 0.1, CF_PDL_NORM_GIVEN, 7.5f, true, false);
  loss_case<T>(name, 1, 4, 1031, 0, 0, CF_PDL_MEAN, 0.0, CF_PDL_NORM_PRECOMPUTED, 0.f, true, false);  // 0 -> loss 0
  loss_case<T>(name, 1, 4, 33, 5, 2, CF_PDL_MEAN, 0.0, CF_PDL_NORM_PRECOMPUTED, 3.f, false, false);
  loss_case<T>(name, 2, 2, 1031, 3, 1, CF_PDL_MEAN, 0.1, CF_PDL_NORM_BATCH, 0.f, true, true, /*no_grad=*/true);
  loss_case<T>(name, 1, 3, 1031, 0, 0, CF_PDL_SUM, 0.1, CF_PDL_NORM_BATCH, 0.f, true, false, false, 40.f);
  scale_case<T>(name, 3, 1031);
  scale_case<T>(name, 2, 8);
}

int main() {
  all_loss_cases<float>("float32");
  all_loss_cases<__half>("float16");
  all_loss_cases<__nv_bfloat16>("bfloat16");
  // a caller's normalizer <= 0 is NaN, never a silent 0
  {
    cases++;
    std::vector<float> z(2 * 5, 0.5f), w(5, 1.f), loss(2), ws(4), g(10);
    std::vector<int64_t> y = {1, 2};
    float zero = 0.f;
    CfPdlArgs a{};
    a.logits = z.data(); a.B = 1; a.T = 2; a.V = 5; a.st = 5; a.targets = y.data(); a.targets_i64 = 1;
    a.weights = w.data(); a.ignore_index = -100; a.reduction = CF_PDL_MEAN; a.norm_mode = CF_PDL_NORM_GIVEN;
    a.row_loss = loss.data(); a.grad = g.data();
    cf_pdl_loss_cuda(&a, CF_F32, &zero, ws.data(), 0, nullptr);
    if (!std::isnan(loss[0])) { printf("FAIL: normalizer 0 gave %g, expected NaN\n", loss[0]); fails++; }
  }
  // negative class weights: the mean divides by the (negative) target-weight sum, like F.cross_entropy
  loss_case<float>("float32 negative weights", 1, 6, 33, 0, 0, CF_PDL_MEAN, 0.1, CF_PDL_NORM_BATCH, 0.f, true, false,
                   false, 0.f, true);
  loss_case<__nv_bfloat16>("bfloat16 negative weights", 2, 3, 1031, 3, 1, CF_PDL_MEAN, 0.0, CF_PDL_NORM_BATCH, 0.f,
                           false, true, false, 0.f, true);
  counts_case<int64_t>(5000, 50, false);
  counts_case<int32_t>(5000, 50, true);
  counts_case<int64_t>(20000, 20000, true);
  counts_case<int32_t>(3000, 13000, false);
  extern long emu_vec_accesses;
  printf("%d cases, %d failures (%ld vector accesses)\n", cases, fails, emu_vec_accesses);
  return fails ? 1 : 0;
}
