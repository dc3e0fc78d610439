/* Python bindings of the fused CMHA attention CUDA kernels (contract: docs/design.md, "Attention"):
 *   _C.attn_fwd_cuda(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, lse,
 *                    causal, scale, q_offset, layout, stream[, q_ws, k_ws])
 *   _C.attn_bwd_cuda(q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu_seqlens, out, dout, lse,
 *                    dq_rot, dk_rot, dv_full, causal, scale, q_offset, layout, stream[, q_ws, k_ws])
 * q_ws (B, H, Lq, d), k_ws (B, H, Lk, d), dtype of q, contiguous: the rotation workspaces (the
 * kernels first write the rotated q~, k~ there, then copy plain tiles). The backward needs them; a
 * forward without them rotates each key tile on load (the glue's choice for GQA).
 *   _C.attn_cuda_supported(dtype_name, d, dv) -> bool
 * Every argument is validated here (the launchers trust the CfAttnArgs they get); errors name it. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "attn_cuda.h"
#include "rotate_math.h"
#include "tensor.h"

#ifdef CF_WITH_CUDA
typedef struct {
  CfTensor q, k, v, delta, beta, freqs, q_pos, k_pos, kpm, cu, out, lse, dout, dq, dk, dv, qws, kws;
} AttnTensors;

static int require_cuda(const CfTensor *t, const char *name, const CfTensor *q) {
  if (t->device != CF_DEV_CUDA) {
    PyErr_Format(PyExc_ValueError, "%s: must be a CUDA tensor", name);
    return -1;
  }
  return cf_check_same_device(t, name, q, "q");
}

static int aligned16(const CfTensor *t) {
  if ((uintptr_t)t->data % 16) return 0;
  for (int i = 0; i < t->ndim - 1; i++)
    if (t->shape[i] > 1 && t->strides[i] % 8) return 0;
  return 1;
}

/* Positions (Bp, L) int64 with Bp in {1, B}: strides with batch stride 0 when broadcast. */
static int check_pos(const CfTensor *t, const char *name, int64_t B, int64_t L, int64_t *sb, int64_t *sl) {
  if (cf_check_dtype(t, name, CF_I64) || cf_check_ndim(t, name, 2)) return -1;
  if ((t->shape[0] != 1 && t->shape[0] != B) || t->shape[1] != L) {
    PyErr_Format(PyExc_ValueError, "%s: expected shape (1, %lld) or (%lld, %lld), got (%lld, %lld)", name,
                 (long long)L, (long long)B, (long long)L, (long long)t->shape[0], (long long)t->shape[1]);
    return -1;
  }
  *sb = t->shape[0] == 1 ? 0 : t->strides[0];
  *sl = t->strides[1];
  return 0;
}

/* Validates everything the forward and backward share and fills `a`. */
static int parse_common(const char *op, PyObject *const *objs, AttnTensors *t, CfAttnArgs *a, int causal,
                        double scale, long long q_offset, int layout) {
  memset(a, 0, sizeof(*a));
  if (cf_tensor_arg(objs[0], "q", &t->q) || cf_tensor_arg(objs[1], "k", &t->k) ||
      cf_tensor_arg(objs[2], "v", &t->v) || cf_tensor_arg(objs[3], "delta", &t->delta) ||
      cf_tensor_arg(objs[4], "beta", &t->beta) || cf_tensor_arg(objs[5], "freqs", &t->freqs) ||
      cf_tensor_arg(objs[6], "q_pos", &t->q_pos) || cf_tensor_arg(objs[7], "k_pos", &t->k_pos) ||
      cf_tensor_opt(objs[8], "key_padding_mask", &t->kpm) || cf_tensor_opt(objs[9], "cu_seqlens", &t->cu))
    return -1;
  const CfTensor *q = &t->q;
  if (q->device != CF_DEV_CUDA) {
    PyErr_Format(PyExc_ValueError, "%s: q must be a CUDA tensor", op);
    return -1;
  }
  if (q->dtype == CF_F32 || q->dtype == CF_F64) {
    PyErr_Format(PyExc_NotImplementedError,
                 "%s: q is %s; the CUDA fused attention kernel runs on tensor cores and takes float16 or "
                 "bfloat16 (use backend='sdpa' for %s)",
                 op, cf_dtype_name(q->dtype), cf_dtype_name(q->dtype));
    return -1;
  }
  if (cf_check_dtype(q, "q", CF_F16 | CF_BF16) || cf_check_ndim(q, "q", 4) || cf_check_ndim(&t->k, "k", 4) ||
      cf_check_ndim(&t->v, "v", 4))
    return -1;
  if (t->k.dtype != q->dtype || t->v.dtype != q->dtype) {
    PyErr_Format(PyExc_TypeError, "%s: q, k, v must share one dtype (got %s, %s, %s)", op, cf_dtype_name(q->dtype),
                 cf_dtype_name(t->k.dtype), cf_dtype_name(t->v.dtype));
    return -1;
  }
  const int64_t B = q->shape[0], H = q->shape[1], Lq = q->shape[2], d = q->shape[3];
  const int64_t Hkv = t->k.shape[1], Lk = t->k.shape[2], dv = t->v.shape[3];
  const int64_t kshape[4] = {B, Hkv, Lk, d}, vshape[4] = {B, Hkv, Lk, dv};
  if (cf_check_shape(&t->k, "k", 4, kshape) || cf_check_shape(&t->v, "v", 4, vshape)) return -1;
  if (Hkv < 1 || H % Hkv) {
    PyErr_Format(PyExc_ValueError, "%s: q has %lld heads, k/v %lld: the query heads must be a multiple of the kv heads",
                 op, (long long)H, (long long)Hkv);
    return -1;
  }
  if (!cf_attn_cuda_supported(q->dtype, d, dv)) {
    PyErr_Format(PyExc_NotImplementedError,
                 "%s: head dims d=%lld, dv=%lld are not supported by the CUDA fused kernel (d = dv in {64, 128})",
                 op, (long long)d, (long long)dv);
    return -1;
  }
  if (cf_check_last_contiguous(q, "q") || cf_check_last_contiguous(&t->k, "k") ||
      cf_check_last_contiguous(&t->v, "v"))
    return -1;
  if (require_cuda(&t->k, "k", q) || require_cuda(&t->v, "v", q) || require_cuda(&t->delta, "delta", q) ||
      require_cuda(&t->beta, "beta", q) || require_cuda(&t->freqs, "freqs", q) ||
      require_cuda(&t->q_pos, "q_pos", q) || require_cuda(&t->k_pos, "k_pos", q))
    return -1;
  const int64_t h = d / 2, pshape[2] = {H, h};
  if (cf_check_dtype(&t->delta, "delta", CF_F32) || cf_check_shape(&t->delta, "delta", 2, pshape) ||
      cf_check_last_contiguous(&t->delta, "delta") || cf_check_dtype(&t->beta, "beta", CF_F32) ||
      cf_check_shape(&t->beta, "beta", 2, pshape) || cf_check_last_contiguous(&t->beta, "beta") ||
      cf_check_dtype(&t->freqs, "freqs", CF_F32) || cf_check_last_contiguous(&t->freqs, "freqs"))
    return -1;
  if (t->freqs.ndim == 1) {
    if (cf_check_dim(&t->freqs, "freqs", 0, h)) return -1;
    a->freqs_sh = 0;
  } else {
    if (cf_check_shape(&t->freqs, "freqs", 2, pshape)) return -1;
    a->freqs_sh = t->freqs.strides[0];
  }
  if (check_pos(&t->q_pos, "q_pos", B, Lq, &a->qpos_sb, &a->qpos_sl) ||
      check_pos(&t->k_pos, "k_pos", B, Lk, &a->kpos_sb, &a->kpos_sl))
    return -1;
  if (objs[8] != Py_None) {
    const int64_t mshape[2] = {B, Lk};
    if (require_cuda(&t->kpm, "key_padding_mask", q) || cf_check_dtype(&t->kpm, "key_padding_mask", CF_BOOL) ||
        cf_check_shape(&t->kpm, "key_padding_mask", 2, mshape))
      return -1;
    a->kpm = (const uint8_t *)t->kpm.data;
    a->kpm_sb = t->kpm.strides[0];
    a->kpm_sl = t->kpm.strides[1];
  }
  if (objs[9] != Py_None) {
    if (require_cuda(&t->cu, "cu_seqlens", q) || cf_check_dtype(&t->cu, "cu_seqlens", CF_I32) ||
        cf_check_ndim(&t->cu, "cu_seqlens", 1) || cf_check_contiguous(&t->cu, "cu_seqlens"))
      return -1;
    if (t->cu.shape[0] < 1 || B != 1 || Lq != Lk) {
      PyErr_Format(PyExc_ValueError,
                   "%s: cu_seqlens needs B == 1, Lq == Lk and at least one entry (got B=%lld, Lq=%lld, Lk=%lld, "
                   "%lld entries)",
                   op, (long long)B, (long long)Lq, (long long)Lk, (long long)t->cu.shape[0]);
      return -1;
    }
    a->cu_seqlens = (const int32_t *)t->cu.data;
    a->nseq = t->cu.shape[0] - 1;
  }
  if (layout != CF_LAYOUT_HALF && layout != CF_LAYOUT_INTERLEAVED) {
    PyErr_Format(PyExc_ValueError, "%s: layout must be 0 (half) or 1 (interleaved), got %d", op, layout);
    return -1;
  }
  a->q = q->data, a->k = t->k.data, a->v = t->v.data;
  a->q_sb = q->strides[0], a->q_sh = q->strides[1], a->q_sl = q->strides[2];
  a->k_sb = t->k.strides[0], a->k_sh = t->k.strides[1], a->k_sl = t->k.strides[2];
  a->v_sb = t->v.strides[0], a->v_sh = t->v.strides[1], a->v_sl = t->v.strides[2];
  a->delta = (const float *)t->delta.data, a->delta_sh = t->delta.strides[0];
  a->beta = (const float *)t->beta.data, a->beta_sh = t->beta.strides[0];
  a->freqs = (const float *)t->freqs.data;
  a->q_pos = (const int64_t *)t->q_pos.data, a->k_pos = (const int64_t *)t->k_pos.data;
  a->B = B, a->H = H, a->Hkv = Hkv, a->Lq = Lq, a->Lk = Lk, a->d = d, a->dv = dv;
  a->dtype = q->dtype, a->causal = causal != 0, a->layout = layout;
  a->vec = aligned16(q) && aligned16(&t->k) && aligned16(&t->v);
  a->scale = scale, a->q_offset = q_offset;
  return 0;
}

/* out-like tensor (B, H, Lq, dv) of q's dtype, last dim contiguous; strides into sb, sh, sl. */
static int check_out_like(const CfTensor *t, const char *name, const CfTensor *q, int64_t dv, int64_t *sb,
                          int64_t *sh, int64_t *sl) {
  const int64_t shape[4] = {q->shape[0], q->shape[1], q->shape[2], dv};
  if (require_cuda(t, name, q) || cf_check_shape(t, name, 4, shape) || cf_check_last_contiguous(t, name)) return -1;
  if (t->dtype != q->dtype) {
    PyErr_Format(PyExc_TypeError, "%s: dtype %s, expected q's dtype %s", name, cf_dtype_name(t->dtype),
                 cf_dtype_name(q->dtype));
    return -1;
  }
  *sb = t->strides[0], *sh = t->strides[1], *sl = t->strides[2];
  return 0;
}

static int check_f32_out(const CfTensor *t, const char *name, const CfTensor *q, int ndim, const int64_t *shape) {
  return require_cuda(t, name, q) || cf_check_dtype(t, name, CF_F32) || cf_check_shape(t, name, ndim, shape) ||
                 cf_check_contiguous(t, name)
             ? -1
             : 0;
}

/* The rotation workspaces: both None, or both given with the shapes
 * (B, H, Lq, d) and (B, H, Lk, d), q's dtype, contiguous and 16-byte aligned. */
static int parse_workspaces(const char *op, PyObject *qo, PyObject *ko, AttnTensors *t, CfAttnArgs *a) {
  if ((qo == Py_None) != (ko == Py_None)) {
    PyErr_Format(PyExc_ValueError, "%s: q_ws and k_ws must both be given or both be None", op);
    return -1;
  }
  if (qo == Py_None) return 0;
  if (cf_tensor_arg(qo, "q_ws", &t->qws) || cf_tensor_arg(ko, "k_ws", &t->kws)) return -1;
  const int64_t qs[4] = {a->B, a->H, a->Lq, a->d}, ks[4] = {a->B, a->H, a->Lk, a->d};
  const CfTensor *w[2] = {&t->qws, &t->kws};
  const char *names[2] = {"q_ws", "k_ws"};
  for (int i = 0; i < 2; i++) {
    if (require_cuda(w[i], names[i], &t->q) || cf_check_shape(w[i], names[i], 4, i ? ks : qs) ||
        cf_check_contiguous(w[i], names[i]))
      return -1;
    if (w[i]->dtype != t->q.dtype) {
      PyErr_Format(PyExc_TypeError, "%s: dtype %s, expected q's dtype %s", names[i], cf_dtype_name(w[i]->dtype),
                   cf_dtype_name(t->q.dtype));
      return -1;
    }
    if ((uintptr_t)w[i]->data % 16) {
      PyErr_Format(PyExc_ValueError, "%s: data must be 16-byte aligned", names[i]);
      return -1;
    }
  }
  a->q_rot = t->qws.data, a->k_rot = t->kws.data;
  return 0;
}

#endif /* CF_WITH_CUDA */

static PyObject *attn_fwd_cuda(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *o[12], *qws = Py_None, *kws = Py_None;
  int causal, layout;
  double scale;
  long long q_offset;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOidLiK|OO:attn_fwd_cuda", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6],
                        &o[7], &o[8], &o[9], &o[10], &o[11], &causal, &scale, &q_offset, &layout, &stream, &qws,
                        &kws))
    return NULL;
#ifndef CF_WITH_CUDA
  return cf_no_cuda("attn_fwd_cuda");
#else
  AttnTensors t;
  CfAttnArgs a;
  if (parse_common("attn_fwd_cuda", o, &t, &a, causal, scale, q_offset, layout)) return NULL;
  if (cf_tensor_out(o[10], "out", &t.out) || cf_tensor_out(o[11], "lse", &t.lse)) return NULL;
  if (check_out_like(&t.out, "out", &t.q, a.dv, &a.o_sb, &a.o_sh, &a.o_sl) || cf_check_contiguous(&t.out, "out"))
    return NULL;
  const int64_t lshape[3] = {a.B, a.H, a.Lq};
  if (check_f32_out(&t.lse, "lse", &t.q, 3, lshape)) return NULL;
  if (parse_workspaces("attn_fwd_cuda", qws, kws, &t, &a)) return NULL;
  a.out = t.out.data;
  a.lse = (float *)t.lse.data;
  const char *err;
  Py_BEGIN_ALLOW_THREADS
  err = cf_attn_fwd_cuda(&a, t.q.device_id, (void *)(uintptr_t)stream);
  Py_END_ALLOW_THREADS
  if (err) return cf_raise_cuda("attn_fwd_cuda", err);
  Py_RETURN_NONE;
#endif
}

static PyObject *attn_bwd_cuda(PyObject *self, PyObject *args) {
  (void)self;
  PyObject *o[16], *qws = Py_None, *kws = Py_None;
  int causal, layout;
  double scale;
  long long q_offset;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOOidLiK|OO:attn_bwd_cuda", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5],
                        &o[6], &o[7], &o[8], &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15], &causal, &scale,
                        &q_offset, &layout, &stream, &qws, &kws))
    return NULL;
#ifndef CF_WITH_CUDA
  return cf_no_cuda("attn_bwd_cuda");
#else
  AttnTensors t;
  CfAttnArgs a;
  if (parse_common("attn_bwd_cuda", o, &t, &a, causal, scale, q_offset, layout)) return NULL;
  if (cf_tensor_arg(o[10], "out", &t.out) || cf_tensor_arg(o[11], "dout", &t.dout) ||
      cf_tensor_arg(o[12], "lse", &t.lse) || cf_tensor_out(o[13], "dq_rot", &t.dq) ||
      cf_tensor_out(o[14], "dk_rot", &t.dk) || cf_tensor_out(o[15], "dv_full", &t.dv))
    return NULL;
  if (check_out_like(&t.out, "out", &t.q, a.dv, &a.o_sb, &a.o_sh, &a.o_sl) ||
      check_out_like(&t.dout, "dout", &t.q, a.dv, &a.do_sb, &a.do_sh, &a.do_sl))
    return NULL;
  const int64_t lshape[3] = {a.B, a.H, a.Lq}, dqs[4] = {a.B, a.H, a.Lq, a.d}, dks[4] = {a.B, a.H, a.Lk, a.d},
                dvs[4] = {a.B, a.H, a.Lk, a.dv};
  if (check_f32_out(&t.lse, "lse", &t.q, 3, lshape) || check_f32_out(&t.dq, "dq_rot", &t.q, 4, dqs) ||
      check_f32_out(&t.dk, "dk_rot", &t.q, 4, dks) || check_f32_out(&t.dv, "dv_full", &t.q, 4, dvs))
    return NULL;
  a.out = t.out.data;
  a.dout = t.dout.data;
  a.lse = (float *)t.lse.data;
  a.dq_rot = (float *)t.dq.data, a.dk_rot = (float *)t.dk.data, a.dv_full = (float *)t.dv.data;
  a.vec = a.vec && aligned16(&t.dout) && aligned16(&t.out); /* the backward also loads out and dout by 16 bytes */
  if (parse_workspaces("attn_bwd_cuda", qws, kws, &t, &a)) return NULL;
  if (!a.q_rot && a.B * a.H * a.Lq * a.Lk > 0) {
    PyErr_SetString(PyExc_ValueError, "attn_bwd_cuda: q_ws, k_ws: the backward needs the rotation workspaces "
                                      "(None only when Lq or Lk is 0)");
    return NULL;
  }
  const char *err;
  Py_BEGIN_ALLOW_THREADS
  err = cf_attn_bwd_cuda(&a, t.q.device_id, (void *)(uintptr_t)stream);
  Py_END_ALLOW_THREADS
  if (err) return cf_raise_cuda("attn_bwd_cuda", err);
  Py_RETURN_NONE;
#endif
}

static PyObject *attn_cuda_supported(PyObject *self, PyObject *args) {
  (void)self;
  const char *dtype;
  long long d, dv;
  if (!PyArg_ParseTuple(args, "sLL:attn_cuda_supported", &dtype, &d, &dv)) return NULL;
  int code = !strcmp(dtype, "float16") ? CF_F16 : !strcmp(dtype, "bfloat16") ? CF_BF16 : 0;
#ifdef CF_WITH_CUDA
  return PyBool_FromLong(code && cf_attn_cuda_supported(code, d, dv));
#else
  (void)code;
  Py_RETURN_FALSE;
#endif
}

PyMethodDef cf_attn_cuda_methods[] = {
    {"attn_fwd_cuda", attn_fwd_cuda, METH_VARARGS,
     "Fused CMHA attention forward (CUDA, float16/bfloat16, d = dv in {64, 128}): writes out and lse; "
     "q_ws, k_ws: the rotation workspaces (None: rotate each key tile on load, for GQA)."},
    {"attn_bwd_cuda", attn_bwd_cuda, METH_VARARGS,
     "Fused CMHA attention backward (CUDA): writes dq_rot, dk_rot, dv_full (float32, per query head); "
     "needs the rotation workspaces q_ws, k_ws."},
    {"attn_cuda_supported", attn_cuda_supported, METH_VARARGS,
     "attn_cuda_supported(dtype_name, d, dv) -> whether the CUDA fused kernels take this configuration."},
    {NULL, NULL, 0, NULL}};
