/* Bindings of the CPU fused attention: _C.attn_fwd_cpu / _C.attn_bwd_cpu (docs/design.md, "Attention").
 * Everything is validated here, with errors naming the argument, before the GIL is released. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include "attn.h"
#include "rotate_math.h"
#include "tensor.h"


/* A float tensor input of the given rank, on the CPU, with dtype `dtype`, last dim contiguous. */
static int check_input(const CfTensor *t, const char *name, int ndim, int dtype) {
  if (t->device != CF_DEV_CPU) {
    PyErr_Format(PyExc_ValueError, "%s: the CPU attention kernel needs CPU tensors", name);
    return -1;
  }
  if (cf_check_ndim(t, name, ndim) || cf_check_dtype(t, name, dtype)) return -1;
  return 0;
}

/* Parses and validates the arguments shared by forward and backward into *p. */
static int parse_common(CfAttnParams *p, int *dtype, PyObject *oq, PyObject *ok, PyObject *ov,
                        PyObject *odelta, PyObject *obeta, PyObject *ofreqs, PyObject *oqpos,
                        PyObject *okpos, PyObject *okpm, PyObject *ocu, PyObject *oout,
                        PyObject *olse, int causal, double scale, long long q_offset, int layout,
                        int nthreads) {
  CfTensor q, k, v, delta, beta, freqs, qpos, kpos, kpm, cu, out, lse;
  memset(p, 0, sizeof(*p));
  if (cf_tensor_arg(oq, "q", &q)) return -1;
  if (check_input(&q, "q", 4, CF_F32 | CF_F64)) return -1;
  const int dt = q.dtype;
  *dtype = dt;
  if (cf_tensor_arg(ok, "k", &k) || check_input(&k, "k", 4, dt) ||
      cf_tensor_arg(ov, "v", &v) || check_input(&v, "v", 4, dt))
    return -1;
  if (cf_check_last_contiguous(&q, "q") || cf_check_last_contiguous(&k, "k") ||
      cf_check_last_contiguous(&v, "v"))
    return -1;
  const int64_t B = q.shape[0], H = q.shape[1], Lq = q.shape[2], d = q.shape[3];
  const int64_t Hkv = k.shape[1], Lk = k.shape[2], dv = v.shape[3];
  if (d <= 0 || d % 2 || d > CF_ATTN_MAX_D) {
    PyErr_Format(PyExc_ValueError, "q: head dim must be even and in [2, %d], got %lld",
                 CF_ATTN_MAX_D, (long long)d);
    return -1;
  }
  if (dv <= 0 || dv > CF_ATTN_MAX_D) {
    PyErr_Format(PyExc_ValueError, "v: head dim must be in [1, %d], got %lld", CF_ATTN_MAX_D,
                 (long long)dv);
    return -1;
  }
  if (Hkv <= 0 || H % Hkv) {
    PyErr_Format(PyExc_ValueError, "k: %lld kv heads do not divide the %lld query heads",
                 (long long)Hkv, (long long)H);
    return -1;
  }
  if (cf_check_dim(&k, "k", 0, B) || cf_check_dim(&k, "k", 3, d) ||
      cf_check_shape(&v, "v", 4, (const int64_t[]){B, Hkv, Lk, dv}))
    return -1;
  const int64_t h = d / 2;
  const int pdt = dt;  /* parameter dtype follows q (the glue casts) */
  if (cf_tensor_arg(odelta, "delta", &delta) || check_input(&delta, "delta", 2, pdt) ||
      cf_check_dim(&delta, "delta", 0, H) || cf_check_dim(&delta, "delta", 1, h) ||
      cf_check_contiguous(&delta, "delta"))
    return -1;
  if (cf_tensor_arg(obeta, "beta", &beta) || check_input(&beta, "beta", 2, pdt) ||
      cf_check_dim(&beta, "beta", 0, H) || cf_check_dim(&beta, "beta", 1, h) ||
      cf_check_contiguous(&beta, "beta"))
    return -1;
  if (cf_tensor_arg(ofreqs, "freqs", &freqs) || check_input(&freqs, "freqs", freqs.ndim, pdt))
    return -1;
  if (freqs.ndim == 1) {
    if (cf_check_dim(&freqs, "freqs", 0, h)) return -1;
    p->freqs_head_stride = 0;
  } else if (freqs.ndim == 2) {
    if (cf_check_dim(&freqs, "freqs", 0, H) || cf_check_dim(&freqs, "freqs", 1, h)) return -1;
    p->freqs_head_stride = h;
  } else {
    PyErr_Format(PyExc_ValueError, "freqs: expected shape (%lld,) or (%lld, %lld), got %d dims",
                 (long long)h, (long long)H, (long long)h, freqs.ndim);
    return -1;
  }
  if (cf_check_contiguous(&freqs, "freqs")) return -1;
  if (cf_tensor_arg(oqpos, "q_pos", &qpos) || check_input(&qpos, "q_pos", 2, CF_I64) ||
      cf_check_contiguous(&qpos, "q_pos") || cf_check_dim(&qpos, "q_pos", 1, Lq) ||
      cf_tensor_arg(okpos, "k_pos", &kpos) || check_input(&kpos, "k_pos", 2, CF_I64) ||
      cf_check_contiguous(&kpos, "k_pos") || cf_check_dim(&kpos, "k_pos", 1, Lk))
    return -1;
  const int64_t Bp = qpos.shape[0];
  if ((Bp != 1 && Bp != B) || kpos.shape[0] != Bp) {
    PyErr_Format(PyExc_ValueError,
                 "q_pos/k_pos: leading dims must both be 1 or both be the batch size %lld "
                 "(got %lld and %lld)",
                 (long long)B, (long long)Bp, (long long)kpos.shape[0]);
    return -1;
  }
  if (cf_tensor_opt(okpm, "key_padding_mask", &kpm)) return -1;
  if (okpm != Py_None) {
    if (check_input(&kpm, "key_padding_mask", 2, CF_BOOL) ||
        cf_check_dim(&kpm, "key_padding_mask", 0, B) ||
        cf_check_dim(&kpm, "key_padding_mask", 1, Lk))
      return -1;
    p->kpm = (const uint8_t *)kpm.data;
    p->kpm_str[0] = kpm.strides[0];
    p->kpm_str[1] = kpm.strides[1];
  }
  if (cf_tensor_opt(ocu, "cu_seqlens", &cu)) return -1;
  if (ocu != Py_None) {
    if (check_input(&cu, "cu_seqlens", 1, CF_I32) || cf_check_contiguous(&cu, "cu_seqlens"))
      return -1;
    if (cu.shape[0] < 2) {
      PyErr_SetString(PyExc_ValueError, "cu_seqlens: needs at least 2 entries (S + 1, S >= 1)");
      return -1;
    }
    const int32_t *c = (const int32_t *)cu.data;
    const int64_t S = cu.shape[0] - 1;
    if (B != 1 || Lq != Lk || c[0] != 0 || c[S] != Lq) {
      PyErr_Format(PyExc_ValueError,
                   "cu_seqlens: packed varlen needs B == 1, Lq == Lk == cu_seqlens[-1] and "
                   "cu_seqlens[0] == 0 (B=%lld, Lq=%lld, Lk=%lld, cu[0]=%d, cu[-1]=%d)",
                   (long long)B, (long long)Lq, (long long)Lk, (int)c[0], (int)c[S]);
      return -1;
    }
    for (int64_t s = 0; s < S; s++)
      if (c[s + 1] < c[s]) {
        PyErr_Format(PyExc_ValueError, "cu_seqlens: must be non-decreasing (entry %lld)",
                     (long long)(s + 1));
        return -1;
      }
    p->cu_seqlens = c;
    p->nseq = S;
  }
  if (cf_tensor_out(oout, "out", &out) || check_input(&out, "out", 4, dt) ||
      cf_check_shape(&out, "out", 4, (const int64_t[]){B, H, Lq, dv}) || cf_check_contiguous(&out, "out"))
    return -1;
  const int ldt = dt;  /* lse: float32 for float32 q, float64 for float64 q */
  if (cf_tensor_out(olse, "lse", &lse) || check_input(&lse, "lse", 3, ldt) ||
      cf_check_dim(&lse, "lse", 0, B) || cf_check_dim(&lse, "lse", 1, H) ||
      cf_check_dim(&lse, "lse", 2, Lq) || cf_check_contiguous(&lse, "lse"))
    return -1;
  if (layout != CF_LAYOUT_HALF && layout != CF_LAYOUT_INTERLEAVED) {
    PyErr_Format(PyExc_ValueError, "layout: expected 0 (half) or 1 (interleaved), got %d", layout);
    return -1;
  }
  if (!isfinite(scale)) {
    PyErr_SetString(PyExc_ValueError, "scale: must be finite");
    return -1;
  }
  p->B = B; p->H = H; p->Hkv = Hkv; p->Lq = Lq; p->Lk = Lk; p->d = d; p->dv = dv;
  p->q = q.data; p->k = k.data; p->v = v.data;
  for (int i = 0; i < 3; i++) {
    p->q_str[i] = q.strides[i];
    p->k_str[i] = k.strides[i];
    p->v_str[i] = v.strides[i];
  }
  p->delta = delta.data; p->beta = beta.data; p->freqs = freqs.data;
  p->q_pos = (const int64_t *)qpos.data;
  p->k_pos = (const int64_t *)kpos.data;
  p->pos_batch = Bp == B && B > 1 ? 1 : 0;
  p->causal = causal != 0;
  p->scale = scale;
  p->q_offset = (int64_t)q_offset;
  p->layout = layout;
  p->nthreads = cf_clamp_threads(nthreads);
  p->out = out.data;
  p->lse = lse.data;
  return 0;
}

static PyObject *run(const CfAttnParams *p, int dtype, int backward) {
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = backward ? cf_attn_bwd_cpu(p, dtype) : cf_attn_fwd_cpu(p, dtype);
  Py_END_ALLOW_THREADS
  if (rc == CF_ATTN_ENOMEM) {
    PyErr_SetString(PyExc_MemoryError, "attn_cpu: could not allocate the per-thread workspaces");
    return NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *attn_fwd_cpu(PyObject *self, PyObject *args) {
  PyObject *oq, *ok, *ov, *odelta, *obeta, *ofreqs, *oqpos, *okpos, *okpm, *ocu, *oout, *olse;
  int causal, layout, nthreads;
  double scale;
  long long q_offset;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOidLii:attn_fwd_cpu", &oq, &ok, &ov, &odelta, &obeta,
                        &ofreqs, &oqpos, &okpos, &okpm, &ocu, &oout, &olse, &causal, &scale,
                        &q_offset, &layout, &nthreads))
    return NULL;
  CfAttnParams p;
  int dtype;
  if (parse_common(&p, &dtype, oq, ok, ov, odelta, obeta, ofreqs, oqpos, okpos, okpm, ocu, oout,
                   olse, causal, scale, q_offset, layout, nthreads))
    return NULL;
  return run(&p, dtype, 0);
}

static PyObject *attn_bwd_cpu(PyObject *self, PyObject *args) {
  PyObject *oq, *ok, *ov, *odelta, *obeta, *ofreqs, *oqpos, *okpos, *okpm, *ocu, *oout, *odout,
      *olse, *odq, *odk, *odv;
  int causal, layout, nthreads;
  double scale;
  long long q_offset;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOidLii:attn_bwd_cpu", &oq, &ok, &ov, &odelta,
                        &obeta, &ofreqs, &oqpos, &okpos, &okpm, &ocu, &oout, &odout, &olse, &odq,
                        &odk, &odv, &causal, &scale, &q_offset, &layout, &nthreads))
    return NULL;
  CfAttnParams p;
  int dtype;
  if (parse_common(&p, &dtype, oq, ok, ov, odelta, obeta, ofreqs, oqpos, okpos, okpm, ocu, oout,
                   olse, causal, scale, q_offset, layout, nthreads))
    return NULL;
  CfTensor dout, dq, dk, dvf;
  if (cf_tensor_arg(odout, "dout", &dout) || check_input(&dout, "dout", 4, dtype) ||
      cf_check_shape(&dout, "dout", 4, (const int64_t[]){p.B, p.H, p.Lq, p.dv}) || cf_check_last_contiguous(&dout, "dout"))
    return NULL;
  if (cf_tensor_out(odq, "dq_rot", &dq) || check_input(&dq, "dq_rot", 4, dtype) ||
      cf_check_shape(&dq, "dq_rot", 4, (const int64_t[]){p.B, p.H, p.Lq, p.d}) || cf_check_contiguous(&dq, "dq_rot"))
    return NULL;
  if (cf_tensor_out(odk, "dk_rot", &dk) || check_input(&dk, "dk_rot", 4, dtype) ||
      cf_check_shape(&dk, "dk_rot", 4, (const int64_t[]){p.B, p.H, p.Lk, p.d}) || cf_check_contiguous(&dk, "dk_rot"))
    return NULL;
  if (cf_tensor_out(odv, "dv_full", &dvf) || check_input(&dvf, "dv_full", 4, dtype) ||
      cf_check_shape(&dvf, "dv_full", 4, (const int64_t[]){p.B, p.H, p.Lk, p.dv}) || cf_check_contiguous(&dvf, "dv_full"))
    return NULL;
  p.dout = dout.data;
  for (int i = 0; i < 3; i++) p.dout_str[i] = dout.strides[i];
  p.dq_rot = dq.data;
  p.dk_rot = dk.data;
  p.dv_full = dvf.data;
  return run(&p, dtype, 1);
}

PyMethodDef cf_attn_cpu_methods[] = {
    {"attn_fwd_cpu", attn_fwd_cpu, METH_VARARGS,
     "attn_fwd_cpu(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, lse, causal, "
     "scale, q_offset, layout, nthreads): fused CMHA forward on CPU tensors (docs/design.md)."},
    {"attn_bwd_cpu", attn_bwd_cpu, METH_VARARGS,
     "attn_bwd_cpu(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse, "
     "dq_rot, dk_rot, dv_full, causal, scale, q_offset, layout, nthreads): gradients with respect "
     "to the rotated q~, k~ (per query head) and v (per query head) (docs/design.md)."},
    {NULL, NULL, 0, NULL}};
