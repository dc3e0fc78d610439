/* csrc/rotate_cuda.cu, run under emu_runtime.h, against the CPU float32 kernel (rotate_cpu.c) on
 * the same (rounded) inputs: float32 / float16 / bfloat16 storage, float32 or same-dtype grads,
 * both layouts, GQA up to G = 96 (the 32-column backward), shared / per-head freqs, beta on / off,
 * positions (1, L) / (B, L), padded and misaligned rows (scalar path), q and k in one launch,
 * several chunk sizes. Prints "N cases, F failures" and exits non-zero on a failure. */
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>
#include <random>
#include <string>
#include "rotate.h"
extern "C" const char *cf_rotate_fwd_cuda(const CfRotJob *q, void *q_out, const CfRotJob *k, void *k_out, int device, void *stream);
extern "C" const char *cf_rotate_bwd_cuda(const CfRotBwdJob *job, int device, void *stream);
extern "C" void cf_rotate_fwd_cpu(const CfRotJob *job, void *out, int nthreads);
extern "C" void cf_rotate_bwd_cpu(const CfRotBwdJob *job, int nthreads);

static std::mt19937 rng(1);
static float rnd() { return std::normal_distribution<float>(0.f, 1.f)(rng); }
static int fails = 0;

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

static void check(const char *what, const std::vector<float> &a, const std::vector<float> &b, double tol, const char *name) {
  double m = 0, s = 1;
  for (size_t i = 0; i < a.size(); i++) { m = std::fmax(m, std::fabs((double)a[i] - b[i])); s = std::fmax(s, std::fabs(b[i])); }
  if (!(m <= tol * s)) { printf("FAIL %s %s: max err %.3e (scale %.3e)\n", name, what, m, s); fails++; }
}

template <typename T, typename TG>
void run(const char *name, int64_t B, int64_t H, int64_t Hx, int64_t L, int64_t d, int layout, bool beta_on,
         bool per_head, bool batch_pos, int64_t pad, int64_t shift, int64_t chunk, bool with_k) {
  const int64_t h = d / 2, rowst = d + pad;
  // x (B, Hx, L, d) stored with row stride rowst, starting `shift` elements into the buffer
  std::vector<T> xs(shift + B * Hx * L * rowst);
  std::vector<float> xf(B * Hx * L * d);  // what the CPU reference reads (the same rounded values)
  for (int64_t r = 0; r < B * Hx * L; r++)
    for (int64_t e = 0; e < d; e++) { T v = cvt<T>(rnd()); xs[shift + r * rowst + e] = v; xf[r * d + e] = back(v); }
  std::vector<float> delta(H * h), beta(H * h), freqs(per_head ? H * h : h);
  for (auto &v : delta) v = rnd() / 3; for (auto &v : beta) v = rnd() / 3;
  for (size_t i = 0; i < freqs.size(); i++) freqs[i] = std::pow(10000.f, -2.f * (i % h) / d) * (1 + 0.01f * (i / h));
  const int64_t Bp = batch_pos ? B : 1;
  std::vector<int64_t> pos(Bp * L);
  for (int64_t i = 0; i < Bp * L; i++) pos[i] = batch_pos ? (i * 7919) % 1000 : i + 3;
  CfRotJob jg{}, jc{};
  jg.x = xs.data() + shift; jg.x_dtype = dt<T>(); jg.B = B; jg.H = H; jg.Hx = Hx; jg.L = L; jg.h = h;
  jg.x_s.b = Hx * L * rowst; jg.x_s.h = L * rowst; jg.x_s.l = rowst; jg.pos = pos.data(); jg.pos_s.b = batch_pos ? L : 0; jg.pos_s.l = 1;
  jg.delta = delta.data(); jg.beta = beta_on ? beta.data() : nullptr; jg.freqs = freqs.data(); jg.freqs_sh = per_head ? h : 0;
  jg.layout = layout;
  jc = jg; jc.x = xf.data(); jc.x_dtype = CF_F32; jc.x_s.b = Hx * L * d; jc.x_s.h = L * d; jc.x_s.l = d;
  const int64_t n_out = B * H * L * d;
  std::vector<T> og(n_out); std::vector<float> oc(n_out);
  // k: a second job (no beta, shared structure) to exercise the one-launch path
  CfRotJob kg = jg; kg.beta = nullptr;
  std::vector<T> okg(with_k ? n_out : 1);
  const char *err = cf_rotate_fwd_cuda(&jg, og.data(), with_k ? &kg : nullptr, with_k ? okg.data() : nullptr, 0, nullptr);
  if (err) { printf("FAIL %s fwd error %s\n", name, err); fails++; return; }
  cf_rotate_fwd_cpu(&jc, oc.data(), 1);
  std::vector<float> ogf(n_out); for (int64_t i = 0; i < n_out; i++) ogf[i] = back(og[i]);
  const double tol = sizeof(T) == 4 ? 2e-5 : (dt<T>() == CF_F16 ? 2e-3 : 1.6e-2);
  check("fwd", ogf, oc, tol, name);
  if (with_k) {
    CfRotJob kc = jc; kc.beta = nullptr; std::vector<float> okc(n_out); cf_rotate_fwd_cpu(&kc, okc.data(), 1);
    std::vector<float> f(n_out); for (int64_t i = 0; i < n_out; i++) f[i] = back(okg[i]);
    check("fwd k", f, okc, tol, name);
  }
  // backward: grad (B, H, L, d) with a padded row stride
  const int64_t gst = d + 2;
  std::vector<TG> gg(B * H * L * gst); std::vector<float> gc(n_out);
  for (int64_t r = 0; r < B * H * L; r++) for (int64_t e = 0; e < d; e++) { TG v = cvt<TG>(rnd()); gg[r * gst + e] = v; gc[r * d + e] = back(v); }
  CfRotBwdJob bg{}; bg.f = jg; bg.grad = gg.data(); bg.grad_dtype = dt<TG>(); bg.grad_s.b = H * L * gst; bg.grad_s.h = L * gst; bg.grad_s.l = gst;
  std::vector<T> dxg(B * Hx * L * d); bg.dx = dxg.data(); bg.chunk = chunk;
  const int64_t P = cf_rot_chunks(&bg);
  std::vector<float> wsg(P * 3 * H * h), ddg(H * h), dbg(H * h), dfg(freqs.size());
  bg.ws = wsg.data(); bg.ddelta = ddg.data(); bg.dbeta = beta_on ? dbg.data() : nullptr; bg.dfreqs = dfg.data();
  err = cf_rotate_bwd_cuda(&bg, 0, nullptr);
  if (err) { printf("FAIL %s bwd error %s\n", name, err); fails++; return; }
  CfRotBwdJob bc{}; bc.f = jc; bc.grad = gc.data(); bc.grad_dtype = CF_F32; bc.grad_s.b = H * L * d; bc.grad_s.h = L * d; bc.grad_s.l = d;
  std::vector<float> dxc(B * Hx * L * d); bc.dx = dxc.data(); bc.chunk = 3;
  std::vector<double> wsc(cf_rot_chunks(&bc) * 3 * H * h); std::vector<float> ddc(H * h), dbc(H * h), dfc(freqs.size());
  bc.ws = wsc.data(); bc.ddelta = ddc.data(); bc.dbeta = beta_on ? dbc.data() : nullptr; bc.dfreqs = dfc.data();
  cf_rotate_bwd_cpu(&bc, 1);
  std::vector<float> dxf(dxg.size()); for (size_t i = 0; i < dxg.size(); i++) dxf[i] = back(dxg[i]);
  check("dx", dxf, dxc, tol * 2, name);
  check("ddelta", ddg, ddc, 1e-4, name);
  if (beta_on) check("dbeta", dbg, dbc, 1e-4, name);
  check("dfreqs", dfg, dfc, 1e-4, name);
}

int main() {
  int n = 0;
  for (int layout = 0; layout < 2; layout++)
    for (int cfg = 0; cfg < 6; cfg++) {
      // B, H, Hx, L, d, beta, per_head, batch_pos, pad, shift, chunk, with_k
      struct { int64_t B, H, Hx, L, d; bool beta, ph, bp; int64_t pad, shift, chunk; bool k; } c[] = {
        {2, 4, 2, 7, 16, true, false, false, 0, 0, 5, true},    // vector path, GQA
        {3, 6, 1, 5, 6, true, true, true, 0, 0, 16, false},     // h = 3: scalar path
        {1, 96, 1, 3, 8, true, true, false, 0, 0, 2, false},    // G = 96: 32-column backward
        {2, 8, 8, 9, 64, false, false, true, 4, 0, 4, true},    // keys, padded rows (vector ok)
        {2, 4, 4, 6, 32, true, true, false, 1, 1, 3, true},     // odd row stride + misaligned: scalar
        {1, 2, 2, 130, 128, true, false, false, 0, 0, 16, false},
      };
      auto &k = c[cfg];
      char name[128];
      snprintf(name, sizeof name, "layout=%d cfg=%d", layout, cfg);
      std::string s(name);
      run<float, float>((s + " f32").c_str(), k.B, k.H, k.Hx, k.L, k.d, layout, k.beta, k.ph, k.bp, k.pad, k.shift, k.chunk, k.k);
      run<__half, float>((s + " f16/g32").c_str(), k.B, k.H, k.Hx, k.L, k.d, layout, k.beta, k.ph, k.bp, k.pad, k.shift, k.chunk, k.k);
      run<__half, __half>((s + " f16/g16").c_str(), k.B, k.H, k.Hx, k.L, k.d, layout, k.beta, k.ph, k.bp, k.pad, k.shift, k.chunk, k.k);
      run<__nv_bfloat16, float>((s + " bf16/g32").c_str(), k.B, k.H, k.Hx, k.L, k.d, layout, k.beta, k.ph, k.bp, k.pad, k.shift, k.chunk, k.k);
      run<__nv_bfloat16, __nv_bfloat16>((s + " bf16/g16").c_str(), k.B, k.H, k.Hx, k.L, k.d, layout, k.beta, k.ph, k.bp, k.pad, k.shift, k.chunk, k.k);
      n += 5;
    }
  extern long emu_vec_accesses;
  printf("vector accesses: %ld\n", emu_vec_accesses);
  if (emu_vec_accesses == 0) { printf("FAIL the vector path never ran\n"); fails++; }
  printf("%d cases, %d failures\n", n, fails);
  return fails != 0;
}
