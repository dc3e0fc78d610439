/* The fused-attention CUDA launchers (cf_attn_fwd_cuda / cf_attn_bwd_cuda, compiled under
 * emu_fibers.h by tests/test_cuda_emulated.py) against the float64 CPU kernel (attn_cpu.c)
 * on the same inputs (bfloat16 / float16 values, float32 parameters, both widened exactly).
 *
 * Every case runs twice: "load" (no workspaces: the forward that rotates each key tile on load,
 * which the glue runs for GQA; forward only) and "pre" (the two rotation workspaces, as the glue
 * passes them for H == Hkv and for every backward; their rotated q~ and k~ are checked against a
 * float64 rotation too). Checked: out and
 * lse (rows that see no key: lse = -inf and out = 0 exactly), then the backward's dq_rot, dk_rot,
 * dv_full (float32, per query head, w.r.t. the rotated q~, k~). Every output buffer starts as NaN,
 * every input lies just before an inaccessible page, so unwritten outputs and reads past an input
 * fail. Errors are max |emu - ref| / max |ref| per tensor (lse: absolute), against tolerances that
 * cover the 16-bit rounding of q~, k~, P and dS on the tensor-core path.
 * Prints one line per case and "N cases, F failures"; exits non-zero on a failure. */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>
#include "attn.h"
#include "rotate_math.h"

static std::mt19937 rng(1234);
/* the case running now, named by the crash handler (a fault in a kernel would otherwise leave only
 * the previous case's line in the log) */
static char current[256];
static void on_crash(int sig) {
  char msg[400];
  const int n = snprintf(msg, sizeof msg, "\nEMU: signal %d in case %s\n", sig, current);
  fflush(stdout);
  if (write(2, msg, n) < 0) {}
  signal(sig, SIG_DFL);
  raise(sig);
}
static double rnd() { return std::normal_distribution<double>(0.0, 1.0)(rng); }
static int cases = 0, fails = 0;

/* ---- guarded host buffers: the data ends where an inaccessible page begins ---- */
struct Guarded {
  std::vector<std::pair<void *, size_t>> maps;
  template <typename T> T *alloc(size_t n) {
    const size_t page = 4096, bytes = (n * sizeof(T) + 15) / 16 * 16, len = (bytes + page - 1) / page * page + page;
    void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { printf("mmap failed\n"); exit(2); }
    mprotect((char *)m + len - page, page, PROT_NONE);
    maps.push_back({m, len});
    T *p = (T *)((char *)m + len - page - bytes);
    memset((void *)p, 0xff, bytes); /* NaN for 16-bit floats and float32 */
    return p;
  }
  ~Guarded() {
    for (auto &m : maps) munmap(m.first, m.second);
  }
};

static uint16_t to16(double x, int dtype) {
  uint16_t u;
  if (dtype == CF_BF16) {
    const __nv_bfloat16 b = __float2bfloat16_rn((float)x);
    memcpy(&u, &b, 2);
  } else {
    const __half h = __float2half_rn((float)x);
    memcpy(&u, &h, 2);
  }
  return u;
}
static double from16(uint16_t u, int dtype) {
  if (dtype == CF_BF16) {
    uint32_t w = (uint32_t)u << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
  }
  __half_raw r;
  r.x = u;
  return __half2float(__half(r));
}

struct Case {
  std::string name;
  int dtype = CF_BF16;
  int64_t B = 1, H = 2, Hkv = 2, Lq = 64, Lk = 64, d = 64;
  bool causal = true;
  int64_t q_offset = 0;
  int layout = CF_LAYOUT_HALF;
  int kpm = 0;                 /* 0: none, 1: random (~80% visible), 2: random, the last batch fully masked */
  std::vector<int32_t> cu;     /* packed sequences (B = 1, Lq = Lk) */
  int pos = 0;                 /* 0: q_offset + arange / arange, shared (Bp = 1); 1: per batch, random */
  bool head_freqs = false;     /* freqs (H, h) instead of (h,) */
  bool nan_q = false;          /* one NaN in q: its row (and what it touches) must come out NaN */
  int64_t qpad = 0;            /* extra elements per q and dout row (not a multiple of 8: vec = 0) */
  bool bshd = false;           /* q, k, v stored (B, L, H, d) */
  double scale = 0;            /* 0: 1 / sqrt(d) */
  bool dlse = false;           /* the backward also gets a gradient w.r.t. lse */
};

struct Err {
  double e = 0;
  void add(double got, double ref, bool nan_ok = false) {
    if (std::isnan(got) && std::isnan(ref)) return; /* NaN where the reference has NaN: propagated */
    const double x = std::fabs(got - ref);
    if (!(x <= e)) e = (std::isnan(x) && nan_ok) ? e : (std::isnan(x) ? INFINITY : x);
  }
};
/* err <= tol, keeping the worst ratio (reported at the end: the tolerances' margin) */
static double worst = 0;
static std::string worst_what;
static double maxabs(const std::vector<double> &v) {
  double m = 0;
  for (double x : v) m = std::fmax(m, std::fabs(x));
  return m;
}

static bool check(double err, double tol, const Case &c, const char *what) {
  const double r = std::isnan(err) ? INFINITY : err / tol;
  if (r > worst) worst = r, worst_what = c.name + " " + what;
  return r <= 1;
}

static void run_case(const Case &c) {
  const int64_t B = c.B, H = c.H, Hkv = c.Hkv, Lq = c.Lq, Lk = c.Lk, d = c.d, dv = c.d, h = d / 2, G = H / Hkv;
  const int64_t Bp = c.pos ? B : 1;
  const double scale = c.scale ? c.scale : 1.0 / std::sqrt((double)d);
  const int dt = c.dtype;

  /* inputs, as 16-bit values and their exact float64 widening (contiguous (B, H, L, d)) */
  std::vector<double> q(B * H * Lq * d), k(B * Hkv * Lk * d), v(B * Hkv * Lk * dv), dout(B * H * Lq * dv);
  std::vector<uint16_t> q16(q.size()), k16(k.size()), v16(v.size()), do16(dout.size());
  auto fill = [&](std::vector<double> &x, std::vector<uint16_t> &x16) {
    for (size_t i = 0; i < x.size(); i++) {
      x16[i] = to16(rnd(), dt);
      x[i] = from16(x16[i], dt);
    }
  };
  fill(q, q16), fill(k, k16), fill(v, v16), fill(dout, do16);
  std::vector<double> dlse(c.dlse ? B * H * Lq : 0);
  for (auto &x : dlse) x = (double)(float)rnd(); /* exact in float32, the device's dtype */
  if (c.nan_q) q16[(Lq / 2) * d + 1] = 0x7fc0, q[(Lq / 2) * d + 1] = NAN; /* bf16 and f16 NaN alike */
  std::vector<float> delta(H * h), beta(H * h), freqs(c.head_freqs ? H * h : h);
  for (auto &x : delta) x = (float)(1.0 + 0.5 * rnd());
  for (auto &x : beta) x = (float)(0.3 * rnd());
  for (size_t i = 0; i < freqs.size(); i++)
    freqs[i] = (float)(std::pow(10000.0, -2.0 * (double)(i % h) / (double)d) * (c.head_freqs ? 1 + 0.2 * rnd() : 1));
  std::vector<int64_t> qpos(Bp * Lq), kpos(Bp * Lk);
  for (int64_t b = 0; b < Bp; b++) {
    const int64_t base = c.pos ? (int64_t)(rng() % 5000) : 0;
    for (int64_t i = 0; i < Lq; i++) qpos[b * Lq + i] = base + c.q_offset + i;
    for (int64_t i = 0; i < Lk; i++) kpos[b * Lk + i] = base + i;
  }
  if (!c.cu.empty()) /* positions restart in every packed sequence */
    for (size_t s = 0; s + 1 < c.cu.size(); s++)
      for (int32_t i = c.cu[s]; i < c.cu[s + 1]; i++) qpos[i] = kpos[i] = i - c.cu[s];
  std::vector<uint8_t> kpm(c.kpm ? B * Lk : 0);
  for (int64_t b = 0; b < (c.kpm ? B : 0); b++)
    for (int64_t n = 0; n < Lk; n++) kpm[b * Lk + n] = (c.kpm == 2 && b == B - 1) ? 0 : (rng() % 5 != 0);
  if (c.kpm) kpm[0] = 0; /* causal, q_offset 0: query 0 of batch 0 sees no key */

  /* ---- float64 reference (attn_cpu.c) ---- */
  std::vector<double> deltad(delta.begin(), delta.end()), betad(beta.begin(), beta.end()),
      freqsd(freqs.begin(), freqs.end());
  std::vector<double> out_ref(B * H * Lq * dv), lse_ref(B * H * Lq), dq_ref(B * H * Lq * d), dk_ref(B * H * Lk * d),
      dv_ref(B * H * Lk * dv);
  CfAttnArgs p;
  memset(&p, 0, sizeof p);
  p.dtype = CF_F64, p.B = B, p.H = H, p.Hkv = Hkv, p.Lq = Lq, p.Lk = Lk, p.d = d, p.dv = dv;
  p.q = q.data(), p.k = k.data(), p.v = v.data();
  p.q_s = {H * Lq * d, Lq * d, d};
  p.k_s = {Hkv * Lk * d, Lk * d, d};
  p.v_s = {Hkv * Lk * dv, Lk * dv, dv};
  p.delta = deltad.data(), p.beta = betad.data(), p.freqs = freqsd.data();
  p.freqs_sh = c.head_freqs ? h : 0;
  p.q_pos = qpos.data(), p.k_pos = kpos.data(), p.qpos_s = {c.pos ? Lq : 0, 0, 1}, p.kpos_s = {c.pos ? Lk : 0, 0, 1};
  p.kpm = c.kpm ? kpm.data() : nullptr, p.kpm_s = {Lk, 0, 1};
  p.cu_seqlens = c.cu.empty() ? nullptr : c.cu.data(), p.nseq = c.cu.empty() ? 0 : (int64_t)c.cu.size() - 1;
  p.causal = c.causal, p.scale = scale, p.q_offset = c.q_offset, p.layout = c.layout, p.nthreads = 1;
  p.out = out_ref.data(), p.out_s = {H * Lq * dv, Lq * dv, dv}, p.lse = lse_ref.data();
  p.dout = dout.data(), p.dout_s = {H * Lq * dv, Lq * dv, dv};
  p.dq_rot = dq_ref.data(), p.dk_rot = dk_ref.data(), p.dv_full = dv_ref.data();
  p.dlse = c.dlse ? dlse.data() : nullptr;
  if (cf_attn_fwd_cpu(&p) || cf_attn_bwd_cpu(&p)) { printf("reference failed\n"); exit(2); }

  /* rotated q~ (B, H, Lq, d) and k~ per query head (B, H, Lk, d), float64, for the workspaces */
  auto rotate = [&](const std::vector<double> &x, int64_t Hx, int64_t L, const std::vector<int64_t> &pos, bool is_q) {
    std::vector<double> r(B * H * L * d);
    for (int64_t b = 0; b < B; b++)
      for (int64_t hq = 0; hq < H; hq++)
        for (int64_t i = 0; i < L; i++) {
          const double *src = &x[((b * Hx + (is_q ? hq : hq / G)) * L + i) * d];
          double *dst = &r[((b * H + hq) * L + i) * d];
          const double ps = (double)pos[(Bp == B ? b : 0) * L + i];
          for (int64_t j = 0; j < h; j++) {
            const int64_t ire = cf_re_index(c.layout, j, h), iim = cf_im_index(c.layout, j, h);
            const double off =
                cf_pos_angle(freqsd[(c.head_freqs ? hq * h : 0) + j], ps) + (is_q ? betad[hq * h + j] : 0);
            cf_rot_fwd_f64(src[ire], src[iim], deltad[hq * h + j], off, &dst[ire], &dst[iim]);
          }
        }
    return r;
  };
  const std::vector<double> qrot_ref = rotate(q, H, Lq, qpos, true), krot_ref = rotate(k, Hkv, Lk, kpos, false);

  for (const std::string variant : {"load", "pre"}) {
    const bool pre = variant == "pre";
    const auto t0 = std::chrono::steady_clock::now();
    snprintf(current, sizeof current, "%s [%s]", c.name.c_str(), variant.c_str());
    cases++;
    Guarded g;
    /* device-side tensors: q (and dout) rows padded by qpad elements; bshd: (B, L, H, d) memory order */
    const int64_t qrow = d + c.qpad;
    uint16_t *qd = g.alloc<uint16_t>(B * H * Lq * qrow), *kd = g.alloc<uint16_t>(B * Hkv * Lk * d),
             *vd = g.alloc<uint16_t>(B * Hkv * Lk * dv), *dod = g.alloc<uint16_t>(B * H * Lq * (dv + c.qpad));
    CfAttnArgs a;
    memset(&a, 0, sizeof a);
    if (c.bshd) {
      a.q_s = {Lq * H * qrow, qrow, H * qrow};
      a.k_s = {Lk * Hkv * d, d, Hkv * d};
      a.v_s = {Lk * Hkv * dv, dv, Hkv * dv};
    } else {
      a.q_s = {H * Lq * qrow, Lq * qrow, qrow};
      a.k_s = {Hkv * Lk * d, Lk * d, d};
      a.v_s = {Hkv * Lk * dv, Lk * dv, dv};
    }
    a.dout_s = {H * Lq * (dv + c.qpad), Lq * (dv + c.qpad), dv + c.qpad};
    for (int64_t b = 0; b < B; b++)
      for (int64_t hh = 0; hh < H; hh++)
        for (int64_t i = 0; i < Lq; i++) {
          memcpy(qd + b * a.q_s.b + hh * a.q_s.h + i * a.q_s.l, &q16[((b * H + hh) * Lq + i) * d], d * 2);
          memcpy(dod + b * a.dout_s.b + hh * a.dout_s.h + i * a.dout_s.l, &do16[((b * H + hh) * Lq + i) * dv], dv * 2);
        }
    for (int64_t b = 0; b < B; b++)
      for (int64_t hh = 0; hh < Hkv; hh++)
        for (int64_t i = 0; i < Lk; i++) {
          memcpy(kd + b * a.k_s.b + hh * a.k_s.h + i * a.k_s.l, &k16[((b * Hkv + hh) * Lk + i) * d], d * 2);
          memcpy(vd + b * a.v_s.b + hh * a.v_s.h + i * a.v_s.l, &v16[((b * Hkv + hh) * Lk + i) * dv], dv * 2);
        }
    float *deltag = g.alloc<float>(delta.size()), *betag = g.alloc<float>(beta.size()),
          *freqsg = g.alloc<float>(freqs.size());
    memcpy(deltag, delta.data(), delta.size() * 4), memcpy(betag, beta.data(), beta.size() * 4);
    memcpy(freqsg, freqs.data(), freqs.size() * 4);
    int64_t *qposg = g.alloc<int64_t>(qpos.size()), *kposg = g.alloc<int64_t>(kpos.size());
    memcpy(qposg, qpos.data(), qpos.size() * 8), memcpy(kposg, kpos.data(), kpos.size() * 8);
    uint8_t *kpmg = c.kpm ? g.alloc<uint8_t>(kpm.size()) : nullptr;
    if (c.kpm) memcpy(kpmg, kpm.data(), kpm.size());
    int32_t *cug = c.cu.empty() ? nullptr : g.alloc<int32_t>(c.cu.size());
    if (cug) memcpy(cug, c.cu.data(), c.cu.size() * 4);
    uint16_t *outd = g.alloc<uint16_t>(B * H * Lq * dv);
    float *lsed = g.alloc<float>(B * H * Lq), *dqd = g.alloc<float>(B * H * Lq * d),
          *dkd = g.alloc<float>(B * H * Lk * d),
          *dvd = g.alloc<float>(B * H * Lk * dv);
    uint16_t *qws = nullptr, *kws = nullptr;
    if (pre) qws = g.alloc<uint16_t>(B * H * Lq * d), kws = g.alloc<uint16_t>(B * H * Lk * d);

    a.q = qd, a.k = kd, a.v = vd;
    a.delta = deltag, a.beta = betag, a.freqs = freqsg;
    a.freqs_sh = c.head_freqs ? h : 0;
    a.q_pos = qposg, a.k_pos = kposg, a.qpos_s = {c.pos ? Lq : 0, 0, 1}, a.kpos_s = {c.pos ? Lk : 0, 0, 1};
    a.kpm = kpmg, a.kpm_s = {Lk, 0, 1};
    a.cu_seqlens = cug, a.nseq = c.cu.empty() ? 0 : (int64_t)c.cu.size() - 1;
    a.B = B, a.H = H, a.Hkv = Hkv, a.Lq = Lq, a.Lk = Lk, a.d = d, a.dv = dv;
    a.dtype = dt, a.causal = c.causal, a.layout = c.layout, a.scale = scale, a.q_offset = c.q_offset;
    /* as bind_attn.c: 16-byte loads when every row of q, k, v (and dout) starts 16-byte aligned */
    auto al = [](int64_t s) { return s % 8 == 0; };
    auto al3 = [&](CfStrides s) { return al(s.b) && al(s.h) && al(s.l); };
    a.vec = al3(a.q_s) && al3(a.k_s) && al3(a.v_s);
    a.out = outd, a.out_s = {H * Lq * dv, Lq * dv, dv};
    a.lse = lsed;
    a.q_rot = qws, a.k_rot = kws;

    const char *err = cf_attn_fwd_cuda(&a, 0, nullptr);
    if (err) {
      printf("FAIL %s [%s]: forward launcher: %s\n", c.name.c_str(), variant.c_str(), err);
      fails++;
      continue;
    }

    /* forward: out relative to max |out|, lse absolute; rows that see no key exactly (-inf, 0) */
    Err eo, el;
    int exact_bad = 0;
    for (int64_t r = 0; r < B * H * Lq; r++) {
      const bool none = std::isinf(lse_ref[r]) && lse_ref[r] < 0;
      if (none) {
        exact_bad += !(std::isinf(lsed[r]) && lsed[r] < 0);
        for (int64_t j = 0; j < dv; j++) exact_bad += from16(outd[r * dv + j], dt) != 0.0;
      } else {
        el.add(lsed[r], lse_ref[r]);
      }
      for (int64_t j = 0; j < dv; j++) eo.add(from16(outd[r * dv + j], dt), out_ref[r * dv + j]);
    }
    const double mo = std::fmax(maxabs(out_ref), 1e-6);
    /* in units of the 16-bit rounding (eps = 2^-8 bf16, 2^-11 f16); over the full (--full) sweep the
     * worst errors are ~2 eps (out, grads, q~ k~) and ~10 eps (lse: absolute, grows with the logits) */
    const double eps = dt == CF_BF16 ? 1.0 / 256 : 1.0 / 2048;
    const double tol_out = 4 * eps, tol_lse = 16 * eps, tol_grad = 6 * eps, tol_rot = 3 * eps;
    bool ok = check(eo.e / mo, tol_out, c, "out") & check(el.e, tol_lse, c, "lse") && !exact_bad;
    char line[512];
    int n = snprintf(line, sizeof line, "out %.1e lse %.1e", eo.e / mo, el.e);
    if (exact_bad) n += snprintf(line + n, sizeof line - n, " (%d masked-row mismatches)", exact_bad);

    if (qws) { /* the workspaces hold the rotated q~, k~ (per query head) */
      Err eq, ek;
      for (size_t i = 0; i < qrot_ref.size(); i++) eq.add(from16(qws[i], dt), qrot_ref[i]);
      for (size_t i = 0; i < krot_ref.size(); i++) ek.add(from16(kws[i], dt), krot_ref[i]);
      const double rq = eq.e / std::fmax(maxabs(qrot_ref), 1e-6), rk = ek.e / std::fmax(maxabs(krot_ref), 1e-6);
      ok = check(rq, tol_rot, c, "q~") & check(rk, tol_rot, c, "k~") && ok;
      n += snprintf(line + n, sizeof line - n, " q~ %.1e k~ %.1e", rq, rk);
    }

    if (pre) {
      a.dout = dod, a.dq_rot = dqd, a.dk_rot = dkd, a.dv_full = dvd;
      a.vec = a.vec && al3(a.dout_s);
      std::vector<float> dlsef(dlse.begin(), dlse.end());
      a.dlse = c.dlse ? dlsef.data() : nullptr;
      err = cf_attn_bwd_cuda(&a, 0, nullptr);
      if (err) {
        printf("FAIL %s [%s]: backward launcher: %s\n", c.name.c_str(), variant.c_str(), err);
        fails++;
        continue;
      }
      Err eq, ek, ev;
      for (size_t i = 0; i < dq_ref.size(); i++) eq.add(dqd[i], dq_ref[i]);
      /* with a NaN q~ row, dk~ = dS^T q~ is NaN in that row's NaN components for every key of every
       * tile the row meets (0 * NaN where dS is masked): which keys depends on the tiling, so there a
       * NaN on either side is not a mismatch (out, lse, dq~ and dv must still match NaN for NaN) */
      for (size_t i = 0; i < dk_ref.size(); i++) ek.add(dkd[i], dk_ref[i], c.nan_q);
      for (size_t i = 0; i < dv_ref.size(); i++) ev.add(dvd[i], dv_ref[i]);
      /* dq~ = scale sum_n dS_mn k~_n with dS = P (dP - D). With one visible key (or one dominant one)
       * dP - D cancels (exactly: dq~, dk~ are float32 noise around 0), while D = dO . O carries the
       * 16-bit rounding of O, an absolute error ~ eps scale sqrt(dv) |k~| in dq~ whatever dq~'s size.
       * So dq~ (dk~) errors are taken relative to at least a quarter of scale sqrt(dv) max |k~| (|q~|). */
      const double fq = 0.25 * scale * std::sqrt((double)dv) * maxabs(krot_ref);
      const double fk = 0.25 * scale * std::sqrt((double)dv) * maxabs(qrot_ref);
      const double rq = eq.e / std::fmax(std::fmax(maxabs(dq_ref), fq), 1e-6),
                   rk = ek.e / std::fmax(std::fmax(maxabs(dk_ref), fk), 1e-6),
                   rv = ev.e / std::fmax(maxabs(dv_ref), 1e-6);
      ok = check(rq, tol_grad, c, "dq_rot") & check(rk, tol_grad, c, "dk_rot") &
               check(rv, tol_grad, c, "dv_full") && ok;
      n += snprintf(line + n, sizeof line - n, " dq %.1e dk %.1e dv %.1e", rq, rk, rv);
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    fails += !ok;
    printf("%s %-50s [%-6s] vec=%d %s (%.1fs)\n", ok ? "ok  " : "FAIL", c.name.c_str(), variant.c_str(), a.vec, line,
           secs);
    fflush(stdout);
  }
}

/* A random configuration (seeded: the same list every run) within a work budget. */
static Case random_case(int i) {
  Case c;
  auto pick = [](std::initializer_list<int64_t> v) { return *(v.begin() + rng() % v.size()); };
  c.dtype = rng() % 3 ? CF_BF16 : CF_F16;
  c.d = pick({64, 128});
  c.B = pick({1, 2});
  const int64_t hh = rng() % 5, Hs[5] = {1, 2, 2, 4, 3}, Hk[5] = {1, 2, 1, 2, 1};
  c.H = Hs[hh], c.Hkv = Hk[hh];
  const std::initializer_list<int64_t> lens = {1, 2, 17, 63, 64, 65, 100, 127, 128, 129, 191, 200, 255, 257, 300, 383};
  const int mode = (int)(rng() % 5); /* square, decode, chunk, negative offset, packed */
  c.causal = rng() % 3 != 0;
  c.Lq = c.Lk = pick(lens);
  if (mode == 1) c.Lq = 1 + rng() % 5, c.Lk = std::max<int64_t>(c.Lk, c.Lq), c.q_offset = c.Lk - c.Lq;
  if (mode == 2) c.Lq = 1 + rng() % c.Lk, c.q_offset = c.Lk - c.Lq;
  if (mode == 3) c.Lq = pick(lens), c.q_offset = -(int64_t)(rng() % (c.Lq + 1));
  if (mode == 4 && c.Lq > 2) { /* 1 to 4 packed sequences, possibly empty ones */
    c.B = 1;
    c.cu = {0};
    const int ns = 1 + rng() % 4;
    for (int s = 1; s < ns; s++) c.cu.push_back((int32_t)(rng() % (c.Lq + 1)));
    c.cu.push_back((int32_t)c.Lq);
    std::sort(c.cu.begin(), c.cu.end());
  }
  c.layout = rng() % 2 ? CF_LAYOUT_INTERLEAVED : CF_LAYOUT_HALF;
  c.kpm = rng() % 3 == 0 ? (c.B == 2 && rng() % 2 ? 2 : 1) : 0;
  c.pos = c.cu.empty() && rng() % 2;
  c.head_freqs = rng() % 2;
  c.qpad = pick({0, 0, 0, 3, 8});
  c.bshd = rng() % 4 == 0;
  c.scale = rng() % 4 == 0 ? 0.2 + 0.05 * (rng() % 6) : 0;
  c.dlse = rng() % 2;
  if (c.B * c.H * c.Lq * c.Lk * c.d > (int64_t)12e6) c.B = 1; /* keep the case cheap */
  char name[200];
  snprintf(name, sizeof name, "rand%03d %s d%lld B%lld H%lld/%lld Lq%lld Lk%lld off%lld %s%s%s%s%s%s%s", i,
           c.dtype == CF_BF16 ? "bf16" : "f16", (long long)c.d, (long long)c.B, (long long)c.H, (long long)c.Hkv,
           (long long)c.Lq, (long long)c.Lk, (long long)c.q_offset, c.causal ? "causal" : "full",
           c.layout ? " inter" : "", c.kpm ? " kpm" : "", c.cu.empty() ? "" : " cu", c.qpad % 8 ? " misal" : "",
           c.bshd ? " bshd" : "", c.dlse ? " dlse" : "");
  c.name = name;
  return c;
}

int main(int argc, char **argv) {
  const bool full = argc > 1 && !strcmp(argv[1], "--full");
  const char *dev = getenv("EMU_DEVICE");
  printf("emulated device %s\n", dev && *dev ? dev : "h100");
  static char altstack[1 << 16]; /* the handler must run even after a fiber stack overflow */
  stack_t ss = {};
  ss.ss_sp = altstack, ss.ss_size = sizeof altstack;
  sigaltstack(&ss, nullptr);
  struct sigaction sa = {};
  sa.sa_handler = on_crash;
  sa.sa_flags = SA_ONSTACK;
  for (int sig : {SIGSEGV, SIGBUS, SIGABRT, SIGFPE}) sigaction(sig, &sa, nullptr);
  std::vector<Case> cs;
  auto add = [&](const char *name, auto setup) {
    Case c;
    c.name = name;
    setup(c);
    cs.push_back(c);
  };
  /* square, several tiles, both layouts and head dims */
  add("d64 bf16 causal L=100", [](Case &c) { c.Lq = c.Lk = 100; });
  add("d128 bf16 full L=129 interleaved", [](Case &c) {
    c.d = 128, c.H = c.Hkv = 1, c.Lq = c.Lk = 129, c.causal = false, c.layout = CF_LAYOUT_INTERLEAVED;
  });
  add("d64 f16 GQA B=2 per-batch pos causal L=200", [](Case &c) {
    c.dtype = CF_F16, c.B = 2, c.H = 2, c.Hkv = 1, c.Lq = c.Lk = 200, c.pos = 1, c.head_freqs = true;
  });
  add("d128 f16 GQA 4/2 interleaved causal L=150", [](Case &c) {
    c.dtype = CF_F16, c.d = 128, c.H = 4, c.Hkv = 2, c.Lq = c.Lk = 150, c.layout = CF_LAYOUT_INTERLEAVED;
  });
  /* Lq != Lk with q_offset: decode, chunked prefill, negative offsets (leading rows see nothing) */
  add("d128 decode Lq=1 Lk=200 GQA", [](Case &c) {
    c.d = 128, c.H = 4, c.Hkv = 2, c.Lq = 1, c.Lk = 200, c.q_offset = 199;
  });
  add("d64 decode Lq=5 Lk=130 kpm", [](Case &c) { c.Lq = 5, c.Lk = 130, c.q_offset = 125, c.kpm = 1; });
  add("d64 chunk Lq=81 Lk=200 off=119", [](Case &c) { c.Lq = 81, c.Lk = 200, c.q_offset = 119; });
  add("d64 causal Lq=100 Lk=50 off=-30", [](Case &c) { c.Lq = 100, c.Lk = 50, c.q_offset = -30; });
  add("d128 full Lq=17 Lk=200 off=-5", [](Case &c) {
    c.d = 128, c.Lq = 17, c.Lk = 200, c.causal = false, c.q_offset = -5;
  });
  /* masks */
  add("d128 kpm B=2 last batch fully masked L=70", [](Case &c) {
    c.d = 128, c.B = 2, c.H = c.Hkv = 1, c.Lq = c.Lk = 70, c.causal = false, c.kpm = 2;
  });
  add("d64 cu_seqlens causal T=200", [](Case &c) { c.Lq = c.Lk = 200, c.cu = {0, 5, 5, 70, 71, 200}; });
  add("d128 cu_seqlens full T=129 interleaved", [](Case &c) {
    c.d = 128, c.H = c.Hkv = 1, c.Lq = c.Lk = 129, c.causal = false, c.cu = {0, 64, 129};
    c.layout = CF_LAYOUT_INTERLEAVED;
  });
  /* odd lengths, strides */
  add("d64 L=1", [](Case &c) { c.Lq = c.Lk = 1, c.H = c.Hkv = 1; });
  add("d64 NaN in one query causal L=70", [](Case &c) { c.Lq = c.Lk = 70, c.nan_q = true; });
  add("d128 f16 L=17 scale=0.3", [](Case &c) { c.dtype = CF_F16, c.d = 128, c.Lq = c.Lk = 17, c.scale = 0.3; });
  add("d64 misaligned q rows (vec=0) L=65", [](Case &c) { c.Lq = c.Lk = 65, c.qpad = 3, c.kpm = 1; });
  /* the gradient w.r.t. lse (return_lse): D - dlse in the dot launch */
  add("d64 dlse kpm B=2 last batch fully masked L=130", [](Case &c) {
    c.B = 2, c.Lq = c.Lk = 130, c.kpm = 2, c.dlse = true;
  });
  add("d128 f16 dlse GQA 4/2 chunk Lq=70 Lk=150", [](Case &c) {
    c.dtype = CF_F16, c.d = 128, c.H = 4, c.Hkv = 2, c.Lq = 70, c.Lk = 150, c.q_offset = 80, c.dlse = true;
  });
  add("d128 bshd layout L=100 GQA", [](Case &c) { c.d = 128, c.H = 2, c.Hkv = 1, c.Lq = c.Lk = 100, c.bshd = true; });
  if (full) {
    add("full: d64 bf16 L=300 causal", [](Case &c) { c.Lq = c.Lk = 300, c.H = c.Hkv = 1; });
    add("full: d128 bf16 L=300 full B=2 pos kpm", [](Case &c) {
      c.d = 128, c.B = 2, c.H = c.Hkv = 1, c.Lq = c.Lk = 300, c.causal = false, c.pos = 1, c.kpm = 1;
    });
    add("full: d128 f16 misaligned interleaved L=200", [](Case &c) {
      c.dtype = CF_F16, c.d = 128, c.Lq = c.Lk = 200, c.qpad = 5, c.layout = CF_LAYOUT_INTERLEAVED;
    });
    add("full: d64 f16 GQA 4/1 chunk Lq=129 Lk=257", [](Case &c) {
      c.dtype = CF_F16, c.H = 4, c.Hkv = 1, c.Lq = 129, c.Lk = 257, c.q_offset = 128, c.head_freqs = true;
    });
    add("full: d128 cu_seqlens causal T=300 kpm", [](Case &c) {
      c.d = 128, c.Lq = c.Lk = 300, c.cu = {0, 1, 130, 131, 300}, c.kpm = 1, c.H = c.Hkv = 1;
    });
    add("full: d64 decode Lq=3 Lk=513 full", [](Case &c) { c.Lq = 3, c.Lk = 513, c.causal = false, c.q_offset = 510; });
    add("full: d128 Lq=200 Lk=60 off=-100", [](Case &c) {
      c.d = 128, c.Lq = 200, c.Lk = 60, c.q_offset = -100, c.pos = 1, c.B = 2;
    });
  }
  const int nrand = full ? 120 : 16;
  for (int i = 0; i < nrand; i++) cs.push_back(random_case(i));
  for (const Case &c : cs) run_case(c);
  printf("worst error / tolerance: %.2f (%s)\n", worst, worst_what.c_str());
  printf("%d cases, %d failures\n", cases, fails);
  return fails ? 1 : 0;
}
