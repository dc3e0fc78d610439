/* Python bindings of the Euler rotation (complexformer/rotate.py is the only caller):
 *
 *   rotate_fwd(x, delta, beta|None, freqs, pos, out, layout, nthreads, stream)
 *   rotate_fwd_qk(q, k, delta, beta, freqs, q_pos, k_pos, q_out, k_out, layout, nthreads, stream)
 *       q and k in one CUDA launch (on the CPU: one call after the other); keys get no beta.
 *   rotate_bwd(x, grad, delta, beta|None, freqs, pos, dx, ws, ddelta, dbeta|None, dfreqs|None,
 *              chunk, layout, nthreads, stream)
 *
 * Every tensor is checked here (shape, dtype, device, strides) with a message naming it, so a
 * wrong call from Python raises instead of reading out of bounds. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "rotate.h"
#include "rotate_math.h"
#include "tensor.h"

static int check_layout(int layout) {
  if (layout == CF_LAYOUT_HALF || layout == CF_LAYOUT_INTERLEAVED) return 0;
  PyErr_Format(PyExc_ValueError, "layout: expected 0 (half) or 1 (interleaved), got %d", layout);
  return -1;
}

static int bad(const char *fmt, const char *name) {
  PyErr_Format(PyExc_ValueError, fmt, name);
  return -1;
}

/* Fill job from (x, delta, beta, freqs, pos); H comes from delta. */
static int parse_job(PyObject *ox, PyObject *odelta, PyObject *obeta, PyObject *ofreqs,
                     PyObject *opos, const char *xname, const char *posname, int layout,
                     CfRotJob *job, CfTensor *x) {
  CfTensor delta, beta, freqs, pos;
  if (cf_tensor_arg(ox, xname, x) || cf_tensor_arg(odelta, "delta", &delta) ||
      cf_tensor_opt(obeta, "beta", &beta) || cf_tensor_arg(ofreqs, "freqs", &freqs) ||
      cf_tensor_arg(opos, posname, &pos))
    return -1;
  const int xmask = x->device == CF_DEV_CUDA ? (CF_F32 | CF_F16 | CF_BF16) : (CF_F32 | CF_F64);
  const int pdt = x->dtype == CF_F64 ? CF_F64 : CF_F32;
  if (cf_check_ndim(x, xname, 4) || cf_check_dtype(x, xname, xmask) ||
      cf_check_last_contiguous(x, xname))
    return -1;
  if (x->shape[3] % 2) return bad("%s: the head dimension must be even", xname);
  const int64_t B = x->shape[0], Hx = x->shape[1], L = x->shape[2], h = x->shape[3] / 2;
  if (cf_check_ndim(&delta, "delta", 2) || cf_check_dtype(&delta, "delta", pdt) ||
      cf_check_contiguous(&delta, "delta") || cf_check_dim(&delta, "delta", 1, h) ||
      cf_check_same_device(x, xname, &delta, "delta"))
    return -1;
  const int64_t H = delta.shape[0];
  if (Hx == 0 || H % Hx) {
    PyErr_Format(PyExc_ValueError, "%s: %lld heads do not divide the %lld query heads of delta",
                 xname, (long long)Hx, (long long)H);
    return -1;
  }
  if (obeta != Py_None) {
    if (cf_check_ndim(&beta, "beta", 2) || cf_check_dtype(&beta, "beta", pdt) ||
        cf_check_contiguous(&beta, "beta") || cf_check_dim(&beta, "beta", 0, H) ||
        cf_check_dim(&beta, "beta", 1, h) || cf_check_same_device(x, xname, &beta, "beta"))
      return -1;
  }
  if (cf_check_dtype(&freqs, "freqs", pdt) || cf_check_contiguous(&freqs, "freqs") ||
      cf_check_same_device(x, xname, &freqs, "freqs"))
    return -1;
  int64_t fhs;
  if (freqs.ndim == 1 && freqs.shape[0] == h) fhs = 0;
  else if (freqs.ndim == 2 && freqs.shape[0] == H && freqs.shape[1] == h) fhs = h;
  else return bad("freqs: expected shape (h,) or (H, h) matching delta", "freqs");
  if (cf_check_ndim(&pos, posname, 2) || cf_check_dtype(&pos, posname, CF_I64) ||
      cf_check_dim(&pos, posname, 1, L) || cf_check_same_device(x, xname, &pos, posname))
    return -1;
  if (pos.shape[0] != 1 && pos.shape[0] != B)
    return bad("%s: the first dimension must be 1 or the batch size", posname);
  job->x = x->data;
  job->x_dtype = x->dtype;
  job->B = B; job->H = H; job->Hx = Hx; job->L = L; job->h = h;
  job->x_s = cf_strides_bhl(x);
  job->pos = (const int64_t *)pos.data;
  job->pos_s = cf_strides_bl(&pos);
  job->delta = delta.data;
  job->beta = obeta == Py_None ? NULL : beta.data;
  job->freqs = freqs.data;
  job->freqs_sh = fhs;
  job->layout = layout;
  return 0;
}

/* A contiguous output of the given shape, dtype and device. */
static int check_out(PyObject *o, const char *name, const CfTensor *like, int dtype, int ndim,
                     const int64_t *shape, CfTensor *t) {
  if (cf_tensor_out(o, name, t) || cf_check_ndim(t, name, ndim) || cf_check_dtype(t, name, dtype) ||
      cf_check_contiguous(t, name) || cf_check_same_device(like, "inputs", t, name))
    return -1;
  for (int i = 0; i < ndim; i++)
    if (cf_check_dim(t, name, i, shape[i])) return -1;
  return 0;
}

static int check_fwd_out(PyObject *o, const char *name, const CfRotJob *job, const CfTensor *x,
                         CfTensor *out) {
  const int64_t shape[4] = {job->B, job->H, job->L, 2 * job->h};
  return check_out(o, name, x, x->dtype, 4, shape, out);
}

static PyObject *rotate_fwd(PyObject *self, PyObject *args) {
  PyObject *ox, *odelta, *obeta, *ofreqs, *opos, *oout;
  int layout, nthreads;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOiiK", &ox, &odelta, &obeta, &ofreqs, &opos, &oout, &layout,
                        &nthreads, &stream))
    return NULL;
  CfRotJob job;
  CfTensor x, out;
  if (check_layout(layout) || parse_job(ox, odelta, obeta, ofreqs, opos, "x", "positions", layout,
                                        &job, &x) ||
      check_fwd_out(oout, "out", &job, &x, &out))
    return NULL;
  if (out.numel == 0) Py_RETURN_NONE;
  if (x.device == CF_DEV_CUDA) {
#ifdef CF_WITH_CUDA
    const char *err = cf_rotate_fwd_cuda(&job, out.data, NULL, NULL, x.device_id, (void *)stream);
    if (err) return cf_raise_cuda("euler_rotate forward", err);
    Py_RETURN_NONE;
#else
    return cf_no_cuda("euler_rotate");
#endif
  }
  Py_BEGIN_ALLOW_THREADS
  cf_rotate_fwd_cpu(&job, out.data, cf_clamp_threads(nthreads));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *rotate_fwd_qk(PyObject *self, PyObject *args) {
  PyObject *oq, *ok, *odelta, *obeta, *ofreqs, *oqpos, *okpos, *oqout, *okout;
  int layout, nthreads;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOiiK", &oq, &ok, &odelta, &obeta, &ofreqs, &oqpos, &okpos,
                        &oqout, &okout, &layout, &nthreads, &stream))
    return NULL;
  CfRotJob jq, jk;
  CfTensor q, k, qout, kout;
  if (check_layout(layout) ||
      parse_job(oq, odelta, obeta, ofreqs, oqpos, "q", "q_pos", layout, &jq, &q) ||
      parse_job(ok, odelta, Py_None, ofreqs, okpos, "k", "k_pos", layout, &jk, &k) ||
      check_fwd_out(oqout, "q_out", &jq, &q, &qout) || check_fwd_out(okout, "k_out", &jk, &k, &kout) ||
      cf_check_same_device(&q, "q", &k, "k"))
    return NULL;
  if (q.dtype != k.dtype) {
    PyErr_Format(PyExc_TypeError, "k: dtype %s differs from q's %s", cf_dtype_name(k.dtype),
                 cf_dtype_name(q.dtype));
    return NULL;
  }
  if (jq.B != jk.B) {
    PyErr_SetString(PyExc_ValueError, "k: batch size differs from q's");
    return NULL;
  }
  if (q.device == CF_DEV_CUDA) {
#ifdef CF_WITH_CUDA
    const char *err = cf_rotate_fwd_cuda(&jq, qout.data, &jk, kout.data, q.device_id, (void *)stream);
    if (err) return cf_raise_cuda("euler_rotate forward (q and k)", err);
    Py_RETURN_NONE;
#else
    return cf_no_cuda("euler_rotate");
#endif
  }
  Py_BEGIN_ALLOW_THREADS
  if (qout.numel) cf_rotate_fwd_cpu(&jq, qout.data, cf_clamp_threads(nthreads));
  if (kout.numel) cf_rotate_fwd_cpu(&jk, kout.data, cf_clamp_threads(nthreads));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

static PyObject *rotate_bwd(PyObject *self, PyObject *args) {
  PyObject *ox, *ograd, *odelta, *obeta, *ofreqs, *opos, *odx, *ows, *odd, *odb, *odf;
  long long chunk;
  int layout, nthreads;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOOOOOOLiiK", &ox, &ograd, &odelta, &obeta, &ofreqs, &opos,
                        &odx, &ows, &odd, &odb, &odf, &chunk, &layout, &nthreads, &stream))
    return NULL;
  CfRotBwdJob jb;
  CfTensor x, grad, dx, ws, dd, db, df;
  if (check_layout(layout) ||
      parse_job(ox, odelta, obeta, ofreqs, opos, "x", "positions", layout, &jb.f, &x))
    return NULL;
  const CfRotJob *f = &jb.f;
  const int cuda = x.device == CF_DEV_CUDA;
  const int pdt = x.dtype == CF_F64 ? CF_F64 : CF_F32;
  const int gmask = cuda ? (CF_F32 | x.dtype) : x.dtype;
  if (chunk < 1) {
    PyErr_SetString(PyExc_ValueError, "chunk: must be positive");
    return NULL;
  }
  jb.chunk = chunk;
  const int64_t P = cf_rot_chunks(&jb);
  const int64_t gshape[4] = {f->B, f->H, f->L, 2 * f->h};
  const int64_t dxshape[4] = {f->B, f->Hx, f->L, 2 * f->h};
  const int64_t wsshape[4] = {P, 3, f->H, f->h};
  const int64_t pshape[2] = {f->H, f->h};
  if (cf_tensor_arg(ograd, "grad", &grad) || cf_check_ndim(&grad, "grad", 4) ||
      cf_check_dtype(&grad, "grad", gmask) || cf_check_last_contiguous(&grad, "grad") ||
      cf_check_same_device(&x, "x", &grad, "grad"))
    return NULL;
  for (int i = 0; i < 4; i++)
    if (cf_check_dim(&grad, "grad", i, gshape[i])) return NULL;
  if (check_out(odx, "dx", &x, x.dtype, 4, dxshape, &dx) ||
      check_out(ows, "workspace", &x, cuda ? CF_F32 : CF_F64, 4, wsshape, &ws) ||
      check_out(odd, "ddelta", &x, pdt, 2, pshape, &dd))
    return NULL;
  if (cf_tensor_out_opt(odb, "dbeta", &db) || cf_tensor_out_opt(odf, "dfreqs", &df)) return NULL;
  if (odb != Py_None) {
    if (obeta == Py_None) {
      PyErr_SetString(PyExc_ValueError, "dbeta: given for keys (beta is None)");
      return NULL;
    }
    if (check_out(odb, "dbeta", &x, pdt, 2, pshape, &db)) return NULL;
  }
  if (odf != Py_None) {
    const int64_t fshape[2] = {f->freqs_sh ? f->H : f->h, f->h};
    if (check_out(odf, "dfreqs", &x, pdt, f->freqs_sh ? 2 : 1, f->freqs_sh ? fshape : fshape + 1, &df))
      return NULL;
  }
  jb.grad = grad.data;
  jb.grad_dtype = grad.dtype;
  jb.grad_s = cf_strides_bhl(&grad);
  jb.dx = dx.data;
  jb.ws = ws.data;
  jb.ddelta = dd.data;
  jb.dbeta = odb == Py_None ? NULL : db.data;
  jb.dfreqs = odf == Py_None ? NULL : df.data;
  if (dd.numel == 0) Py_RETURN_NONE; /* H == 0 or h == 0: nothing to compute */
  if (cuda) {
#ifdef CF_WITH_CUDA
    if (f->H / f->Hx > CF_ROT_CUDA_MAX_GROUP) {
      PyErr_Format(PyExc_ValueError, "x: %lld query heads per key head exceed the CUDA backward's limit %d",
                   (long long)(f->H / f->Hx), CF_ROT_CUDA_MAX_GROUP);
      return NULL;
    }
    const char *err = cf_rotate_bwd_cuda(&jb, x.device_id, (void *)stream);
    if (err) return cf_raise_cuda("euler_rotate backward", err);
    Py_RETURN_NONE;
#else
    return cf_no_cuda("euler_rotate");
#endif
  }
  Py_BEGIN_ALLOW_THREADS
  cf_rotate_bwd_cpu(&jb, cf_clamp_threads(nthreads));
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef cf_rotate_methods[] = {
    {"rotate_fwd", rotate_fwd, METH_VARARGS,
     "rotate_fwd(x, delta, beta, freqs, pos, out, layout, nthreads, stream): Euler rotation."},
    {"rotate_fwd_qk", rotate_fwd_qk, METH_VARARGS,
     "rotate_fwd_qk(q, k, delta, beta, freqs, q_pos, k_pos, q_out, k_out, layout, nthreads, stream)"},
    {"rotate_bwd", rotate_bwd, METH_VARARGS,
     "rotate_bwd(x, grad, delta, beta, freqs, pos, dx, ws, ddelta, dbeta, dfreqs, chunk, layout, "
     "nthreads, stream)"},
    {NULL, NULL, 0, NULL}};
