/* Python bindings of the fused CMHA attention (contract: docs/design.md, "Attention"):
 *
 *   _C.attn_fwd(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, lse,
 *               causal, scale, q_offset, layout, nthreads, stream[, q_ws, k_ws, k_cache, n_cached])
 *   _C.attn_bwd(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse, dlse,
 *               dq_rot, dk_rot, dv_full, causal, scale, q_offset, layout, nthreads, stream[, q_ws, k_ws])
 *   _C.attn_cuda_supported(dtype_name, d, dv) -> bool
 *
 * One parse fills one CfAttnArgs (attn.h); q's device then picks the CPU kernel (nthreads threads)
 * or the CUDA launcher (on `stream`, with the rotation workspaces q_ws, k_ws: (B, H, Lq, d) and
 * (B, H, Lk, d), q's dtype, contiguous; the backward needs them, a forward without them rotates
 * each key tile on load, the glue's choice for GQA). complexformer/attention.py validates the
 * public arguments; this checks what memory safety needs (dtypes, devices, shapes, strides,
 * bounds), with errors naming the argument, because the kernels trust what they get. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "attn.h"
#include "rotate_math.h"
#include "tensor.h"

/* The compute dtype (attn.h): float64 for float64 q, float32 otherwise. */
static int compute_dtype(int dtype) { return dtype == CF_F64 ? CF_F64 : CF_F32; }

/* t on q's device with the given dtype and shape; contiguous, or (contiguous = 0) rows may be strided. */
static int check_like(const CfTensor *t, const char *name, const CfTensor *q, int dtype, int ndim,
                      const int64_t *shape, int contiguous) {
  return cf_check_same_device(t, name, q, "q") || cf_check_dtype(t, name, dtype) ||
                 cf_check_shape(t, name, ndim, shape) ||
                 (contiguous ? cf_check_contiguous(t, name) : cf_check_last_contiguous(t, name))
             ? -1
             : 0;
}

/* Positions (Bp, L) int64 with Bp in {1, B}. */
static int check_pos(const CfTensor *t, const char *name, const CfTensor *q, int64_t B, int64_t L) {
  if (cf_check_same_device(t, name, q, "q") || cf_check_dtype(t, name, CF_I64) || cf_check_ndim(t, name, 2))
    return -1;
  if ((t->shape[0] != 1 && t->shape[0] != B) || t->shape[1] != L) {
    PyErr_Format(PyExc_ValueError, "%s: expected shape (1, %lld) or (%lld, %lld), got (%lld, %lld)", name,
                 (long long)L, (long long)B, (long long)L, (long long)t->shape[0], (long long)t->shape[1]);
    return -1;
  }
  return 0;
}

/* What each implementation takes, beyond what the argument block can describe. */
static int check_kernel_limits(const CfTensor *q, int64_t d, int64_t dv) {
  if (q->device == CF_DEV_CUDA) {
    if (q->dtype == CF_F32 || q->dtype == CF_F64) {
      PyErr_Format(PyExc_NotImplementedError,
                   "q: dtype %s; the CUDA fused attention kernel runs on tensor cores and takes float16 or "
                   "bfloat16 (use backend='sdpa' for %s)",
                   cf_dtype_name(q->dtype), cf_dtype_name(q->dtype));
      return -1;
    }
    if (cf_check_dtype(q, "q", CF_F16 | CF_BF16)) return -1;
    if (!cf_attn_cuda_supported(q->dtype, d, dv)) {
      PyErr_Format(PyExc_NotImplementedError,
                   "q, v: head dims d=%lld, dv=%lld are not supported by the CUDA fused kernel (d = dv in {64, 128})",
                   (long long)d, (long long)dv);
      return -1;
    }
    return 0;
  }
  if (cf_check_dtype(q, "q", CF_F32 | CF_F64)) return -1;
  if (d <= 0 || d % 2 || d > CF_ATTN_MAX_D) {
    PyErr_Format(PyExc_ValueError, "q: head dim must be even and in [2, %d], got %lld", CF_ATTN_MAX_D,
                 (long long)d);
    return -1;
  }
  if (dv <= 0 || dv > CF_ATTN_MAX_D) {
    PyErr_Format(PyExc_ValueError, "v: head dim must be in [1, %d], got %lld", CF_ATTN_MAX_D, (long long)dv);
    return -1;
  }
  return 0;
}

/* cu_seqlens (S + 1,) int32 for a packed batch (B == 1, Lq == Lk). The CPU kernel trusts its
 * values, so they are checked here; on CUDA reading them would synchronise with the host, and
 * the Python layer has checked them. */
static int parse_cu_seqlens(const CfTensor *cu, const CfTensor *q, CfAttnArgs *a) {
  if (cf_check_same_device(cu, "cu_seqlens", q, "q") || cf_check_dtype(cu, "cu_seqlens", CF_I32) ||
      cf_check_ndim(cu, "cu_seqlens", 1) || cf_check_contiguous(cu, "cu_seqlens"))
    return -1;
  if (cu->shape[0] < 2 || a->B != 1 || a->Lq != a->Lk) {
    PyErr_Format(PyExc_ValueError,
                 "cu_seqlens: packed sequences need B == 1, Lq == Lk and at least 2 entries "
                 "(got B=%lld, Lq=%lld, Lk=%lld, %lld entries)",
                 (long long)a->B, (long long)a->Lq, (long long)a->Lk, (long long)cu->shape[0]);
    return -1;
  }
  const int32_t *c = (const int32_t *)cu->data;
  const int64_t S = cu->shape[0] - 1;
  if (cu->device == CF_DEV_CPU) {
    if (c[0] != 0 || c[S] != a->Lq) {
      PyErr_Format(PyExc_ValueError, "cu_seqlens: needs cu_seqlens[0] == 0 and cu_seqlens[-1] == Lq == %lld "
                   "(got %d and %d)", (long long)a->Lq, (int)c[0], (int)c[S]);
      return -1;
    }
    for (int64_t s = 0; s < S; s++)
      if (c[s + 1] < c[s]) {
        PyErr_Format(PyExc_ValueError, "cu_seqlens: must be non-decreasing (entry %lld)", (long long)(s + 1));
        return -1;
      }
  }
  a->cu_seqlens = c;
  a->nseq = S;
  return 0;
}

#ifdef CF_WITH_CUDA
/* Rows of t start 16-byte aligned: then the CUDA kernels may load them 16 bytes at a time. */
static int aligned16(const CfTensor *t) {
  if ((uintptr_t)t->data % 16) return 0;
  for (int i = 0; i < t->ndim - 1; i++)
    if (t->shape[i] > 1 && t->strides[i] % 8) return 0;
  return 1;
}
#endif

/* Validates everything the forward and backward share (objs: q, k, v, delta, beta, freqs, q_pos,
 * k_pos, kpm, cu_seqlens) and fills `a`; *q_out is q's view (device, device id). */
static int parse_common(PyObject *const *objs, CfAttnArgs *a, CfTensor *q_out, int causal, double scale,
                        long long q_offset, int layout, int nthreads) {
  CfTensor q, k, v, delta, beta, freqs, qpos, kpos, kpm, cu;
  memset(a, 0, sizeof(*a));
  if (cf_tensor_arg(objs[0], "q", &q)) return -1;
#ifndef CF_WITH_CUDA
  if (q.device == CF_DEV_CUDA) {
    cf_no_cuda("cmha attention");
    return -1;
  }
#endif
  if (cf_check_ndim(&q, "q", 4) || cf_tensor_arg(objs[1], "k", &k) || cf_tensor_arg(objs[2], "v", &v) ||
      cf_check_same_device(&k, "k", &q, "q") || cf_check_same_device(&v, "v", &q, "q") ||
      cf_check_ndim(&k, "k", 4) || cf_check_ndim(&v, "v", 4))
    return -1;
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], d = q.shape[3];
  const int64_t Hkv = k.shape[1], Lk = k.shape[2], dv = v.shape[3], h = d / 2;
  if (check_kernel_limits(&q, d, dv) || cf_check_dtype(&k, "k", q.dtype) || cf_check_dtype(&v, "v", q.dtype))
    return -1;
  if (Hkv <= 0 || H % Hkv) {
    PyErr_Format(PyExc_ValueError, "k: %lld kv heads do not divide the %lld query heads", (long long)Hkv,
                 (long long)H);
    return -1;
  }
  const int64_t kshape[4] = {B, Hkv, Lk, d}, vshape[4] = {B, Hkv, Lk, dv}, pshape[2] = {H, h};
  if (cf_check_shape(&k, "k", 4, kshape) || cf_check_shape(&v, "v", 4, vshape) ||
      cf_check_last_contiguous(&q, "q") || cf_check_last_contiguous(&k, "k") || cf_check_last_contiguous(&v, "v"))
    return -1;
  const int cdt = compute_dtype(q.dtype);
  if (cf_tensor_arg(objs[3], "delta", &delta) || check_like(&delta, "delta", &q, cdt, 2, pshape, 1) ||
      cf_tensor_arg(objs[4], "beta", &beta) || check_like(&beta, "beta", &q, cdt, 2, pshape, 1) ||
      cf_tensor_arg(objs[5], "freqs", &freqs) ||
      check_like(&freqs, "freqs", &q, cdt, freqs.ndim == 1 ? 1 : 2, freqs.ndim == 1 ? pshape + 1 : pshape, 1))
    return -1;
  if (cf_tensor_arg(objs[6], "q_pos", &qpos) || check_pos(&qpos, "q_pos", &q, B, Lq) ||
      cf_tensor_arg(objs[7], "k_pos", &kpos) || check_pos(&kpos, "k_pos", &q, B, Lk))
    return -1;
  a->B = B, a->H = H, a->Hkv = Hkv, a->Lq = Lq, a->Lk = Lk, a->d = d, a->dv = dv;
  if (cf_tensor_opt(objs[8], "key_padding_mask", &kpm) || cf_tensor_opt(objs[9], "cu_seqlens", &cu)) return -1;
  if (objs[8] != Py_None) {
    const int64_t mshape[2] = {B, Lk};
    if (cf_check_same_device(&kpm, "key_padding_mask", &q, "q") || cf_check_dtype(&kpm, "key_padding_mask", CF_BOOL) ||
        cf_check_shape(&kpm, "key_padding_mask", 2, mshape)) /* any strides */
      return -1;
    a->kpm = (const uint8_t *)kpm.data;
    a->kpm_s = cf_strides_bl(&kpm);
  }
  if (objs[9] != Py_None && parse_cu_seqlens(&cu, &q, a)) return -1;
  if (layout != CF_LAYOUT_HALF && layout != CF_LAYOUT_INTERLEAVED) {
    PyErr_Format(PyExc_ValueError, "layout: expected 0 (half) or 1 (interleaved), got %d", layout);
    return -1;
  }
  a->dtype = q.dtype;
  a->q = q.data, a->k = k.data, a->v = v.data;
  a->q_s = cf_strides_bhl(&q), a->k_s = cf_strides_bhl(&k), a->v_s = cf_strides_bhl(&v);
  a->delta = delta.data, a->beta = beta.data, a->freqs = freqs.data;
  a->freqs_sh = freqs.ndim == 1 ? 0 : h;
  a->q_pos = (const int64_t *)qpos.data, a->k_pos = (const int64_t *)kpos.data;
  a->qpos_s = cf_strides_bl(&qpos), a->kpos_s = cf_strides_bl(&kpos);
  a->causal = causal != 0, a->scale = scale, a->q_offset = (int64_t)q_offset, a->layout = layout;
  a->nthreads = cf_clamp_threads(nthreads);
#ifdef CF_WITH_CUDA
  a->vec = aligned16(&q) && aligned16(&k) && aligned16(&v);
#endif
  *q_out = q;
  return 0;
}

/* The rotation workspaces: both None, or (CUDA only) both given with the shapes (B, H, Lq, d)
 * and (B, H, Lk, d), q's dtype, contiguous and 16-byte aligned. */
static int parse_workspaces(PyObject *qo, PyObject *ko, const CfTensor *q, CfAttnArgs *a) {
  if ((qo == Py_None) != (ko == Py_None)) {
    PyErr_SetString(PyExc_ValueError, "q_ws, k_ws: must both be given or both be None");
    return -1;
  }
  if (qo == Py_None) return 0;
  if (q->device != CF_DEV_CUDA) {
    PyErr_SetString(PyExc_ValueError, "q_ws, k_ws: the CPU kernel takes no rotation workspaces (pass None)");
    return -1;
  }
  CfTensor w[2];
  const int64_t qs[4] = {a->B, a->H, a->Lq, a->d}, ks[4] = {a->B, a->H, a->Lk, a->d};
  const char *names[2] = {"q_ws", "k_ws"};
  for (int i = 0; i < 2; i++) {
    if (cf_tensor_out(i ? ko : qo, names[i], &w[i]) || check_like(&w[i], names[i], q, q->dtype, 4, i ? ks : qs, 1))
      return -1;
    if ((uintptr_t)w[i].data % 16) {
      PyErr_Format(PyExc_ValueError, "%s: data must be 16-byte aligned", names[i]);
      return -1;
    }
  }
  a->q_rot = w[0].data, a->k_rot = w[1].data;
  return 0;
}

/* The rotated-key cache of a CPU forward (attn.h): None, or (B, H, >= Lk, d) in q's dtype with a
 * contiguous last dim, whose first n_cached (in [0, Lk]) keys hold their rotation. */
static int parse_key_cache(PyObject *co, long long n_cached, const CfTensor *q, CfAttnArgs *a) {
  if (co == Py_None) return 0;
  CfTensor c;
  if (q->device != CF_DEV_CPU) {
    PyErr_SetString(PyExc_ValueError, "k_cache: only the CPU kernel takes a rotated-key cache (pass None)");
    return -1;
  }
  if (cf_tensor_out(co, "k_cache", &c) || cf_check_same_device(&c, "k_cache", q, "q") ||
      cf_check_dtype(&c, "k_cache", q->dtype) || cf_check_ndim(&c, "k_cache", 4) ||
      cf_check_last_contiguous(&c, "k_cache"))
    return -1;
  if (c.shape[0] != a->B || c.shape[1] != a->H || c.shape[2] < a->Lk || c.shape[3] != a->d) {
    PyErr_Format(PyExc_ValueError, "k_cache: expected shape (%lld, %lld, >= %lld, %lld), got (%lld, %lld, %lld, %lld)",
                 (long long)a->B, (long long)a->H, (long long)a->Lk, (long long)a->d, (long long)c.shape[0],
                 (long long)c.shape[1], (long long)c.shape[2], (long long)c.shape[3]);
    return -1;
  }
  if (n_cached < 0 || n_cached > a->Lk) {
    PyErr_Format(PyExc_ValueError, "n_cached: expected an int in [0, Lk = %lld], got %lld", (long long)a->Lk,
                 n_cached);
    return -1;
  }
  a->k_cache = c.data, a->kc_s = cf_strides_bhl(&c), a->kc_n = (int64_t)n_cached;
  return 0;
}

/* Runs the forward or backward on q's device; NULL with an exception set on failure. */
static PyObject *run(const CfAttnArgs *a, const CfTensor *q, unsigned long long stream, int backward) {
  const char *op = backward ? "attn_bwd" : "attn_fwd";
  if (q->device == CF_DEV_CUDA) {
#ifdef CF_WITH_CUDA
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = backward ? cf_attn_bwd_cuda(a, q->device_id, (void *)(uintptr_t)stream)
                   : cf_attn_fwd_cuda(a, q->device_id, (void *)(uintptr_t)stream);
    Py_END_ALLOW_THREADS
    if (err) return cf_raise_cuda(op, err);
    Py_RETURN_NONE;
#else
    (void)stream;
    return cf_no_cuda(op);
#endif
  }
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = backward ? cf_attn_bwd_cpu(a) : cf_attn_fwd_cpu(a);
  Py_END_ALLOW_THREADS
  if (rc == CF_ATTN_ENOMEM) {
    PyErr_Format(PyExc_MemoryError, "%s: could not allocate the CPU kernel's per-thread workspaces", op);
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *attn_fwd(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *o[12], *qws = Py_None, *kws = Py_None, *kcache = Py_None;
  int causal, layout, nthreads;
  double scale;
  long long q_offset, n_cached = 0;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOidLiiK|OOOL:attn_fwd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                        &o[7], &o[8], &o[9], &o[10], &o[11], &causal, &scale, &q_offset, &layout, &nthreads, &stream,
                        &qws, &kws, &kcache, &n_cached))
    return NULL;
  CfAttnArgs a;
  CfTensor q, out, lse;
  if (parse_common(o, &a, &q, causal, scale, q_offset, layout, nthreads)) return NULL;
  const int64_t oshape[4] = {a.B, a.H, a.Lq, a.dv}, lshape[3] = {a.B, a.H, a.Lq};
  if (cf_tensor_out(o[10], "out", &out) || check_like(&out, "out", &q, q.dtype, 4, oshape, 1) ||
      cf_tensor_out(o[11], "lse", &lse) || check_like(&lse, "lse", &q, compute_dtype(q.dtype), 3, lshape, 1) ||
      parse_workspaces(qws, kws, &q, &a) || parse_key_cache(kcache, n_cached, &q, &a))
    return NULL;
  a.out = out.data, a.out_s = cf_strides_bhl(&out);
  a.lse = lse.data;
  return run(&a, &q, stream, 0);
}

static PyObject *attn_bwd(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *o[17], *qws = Py_None, *kws = Py_None;
  int causal, layout, nthreads;
  double scale;
  long long q_offset;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOOidLiiK|OO:attn_bwd", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                        &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &o[16], &causal,
                        &scale, &q_offset, &layout, &nthreads, &stream, &qws, &kws))
    return NULL;
  CfAttnArgs a;
  CfTensor q, out, dout, lse, dlse, dq, dk, dvf;
  if (parse_common(o, &a, &q, causal, scale, q_offset, layout, nthreads)) return NULL;
  const int cdt = compute_dtype(q.dtype);
  const int64_t oshape[4] = {a.B, a.H, a.Lq, a.dv}, lshape[3] = {a.B, a.H, a.Lq},
                dqs[4] = {a.B, a.H, a.Lq, a.d}, dks[4] = {a.B, a.H, a.Lk, a.d}, dvs[4] = {a.B, a.H, a.Lk, a.dv};
  if (cf_tensor_arg(o[10], "out", &out) || check_like(&out, "out", &q, q.dtype, 4, oshape, 0) ||
      cf_tensor_arg(o[11], "dout", &dout) || check_like(&dout, "dout", &q, q.dtype, 4, oshape, 0) ||
      cf_tensor_arg(o[12], "lse", &lse) || check_like(&lse, "lse", &q, cdt, 3, lshape, 1) ||
      cf_tensor_opt(o[13], "dlse", &dlse) ||
      (o[13] != Py_None && check_like(&dlse, "dlse", &q, cdt, 3, lshape, 1)) ||
      cf_tensor_out(o[14], "dq_rot", &dq) || check_like(&dq, "dq_rot", &q, cdt, 4, dqs, 1) ||
      cf_tensor_out(o[15], "dk_rot", &dk) || check_like(&dk, "dk_rot", &q, cdt, 4, dks, 1) ||
      cf_tensor_out(o[16], "dv_full", &dvf) || check_like(&dvf, "dv_full", &q, cdt, 4, dvs, 1) ||
      parse_workspaces(qws, kws, &q, &a))
    return NULL;
  if (q.device == CF_DEV_CUDA && !a.q_rot && a.B * a.H * a.Lq * a.Lk > 0) {
    PyErr_SetString(PyExc_ValueError, "q_ws, k_ws: the CUDA backward needs the rotation workspaces "
                                      "(None only when Lq or Lk is 0)");
    return NULL;
  }
  a.out = out.data, a.out_s = cf_strides_bhl(&out);
  a.dout = dout.data, a.dout_s = cf_strides_bhl(&dout);
  a.lse = lse.data;
  a.dlse = o[13] != Py_None ? dlse.data : NULL;
  a.dq_rot = dq.data, a.dk_rot = dk.data, a.dv_full = dvf.data;
#ifdef CF_WITH_CUDA
  a.vec = a.vec && aligned16(&out) && aligned16(&dout); /* the CUDA backward also loads out and dout by 16 bytes */
#endif
  return run(&a, &q, stream, 1);
}

static PyObject *attn_cuda_supported(PyObject *self, PyObject *args) {
  (void)self;
  const char *dtype;
  long long d, dv;
  if (!PyArg_ParseTuple(args, "sLL:attn_cuda_supported", &dtype, &d, &dv)) return NULL;
#ifdef CF_WITH_CUDA
  const int code = !strcmp(dtype, "float16") ? CF_F16 : !strcmp(dtype, "bfloat16") ? CF_BF16 : 0;
  return PyBool_FromLong(code && cf_attn_cuda_supported(code, d, dv));
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef cf_attn_methods[] = {
    {"attn_fwd", attn_fwd, METH_VARARGS,
     "attn_fwd(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, lse, causal, scale, q_offset, "
     "layout, nthreads, stream[, q_ws, k_ws, k_cache, n_cached]): fused CMHA forward on q's device; writes out "
     "and lse (CPU, with k_cache: rotates keys [n_cached, Lk) into the rotated-key cache, then reads keys from it)."},
    {"attn_bwd", attn_bwd, METH_VARARGS,
     "attn_bwd(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse, dlse, dq_rot, "
     "dk_rot, dv_full, causal, scale, q_offset, layout, nthreads, stream[, q_ws, k_ws]): gradients with respect "
     "to the rotated q~, k~ and v, per query head, from dout and dlse (None: 0) (CUDA: needs the rotation "
     "workspaces)."},
    {"attn_cuda_supported", attn_cuda_supported, METH_VARARGS,
     "attn_cuda_supported(dtype_name, d, dv) -> whether the CUDA fused kernels take this configuration."},
    {NULL, NULL, 0, NULL}};
