/* Python bindings of the PDL kernels (complexformer._C.pdl_*). complexformer/pdl.py validates
 * user input and allocates every output; these functions re-check what memory safety depends on
 * (dtypes, shapes, strides, devices) and raise errors naming the argument. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "pdl.h"
#include "tensor.h"

static int check_vector(const CfTensor *t, const char *name, int64_t n) {
  if (cf_check_ndim(t, name, 1) || cf_check_dim(t, name, 0, n) || cf_check_contiguous(t, name)) return -1;
  return 0;
}

/* pdl_token_counts(ids, counts, ignore_index, nthreads, stream, bad) -> None
 * ids: contiguous int32/int64 (any shape); counts: (V,) int64; bad: int64 [2] on CUDA, else None.
 * CPU raises ValueError on an out-of-range id; CUDA records it in `bad` for the caller to check. */
static PyObject *pdl_token_counts(PyObject *self, PyObject *args) {
  PyObject *o_ids, *o_counts, *o_bad;
  long long ignore;
  int nthreads;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOLiKO", &o_ids, &o_counts, &ignore, &nthreads, &stream, &o_bad)) return NULL;
  CfTensor ids, counts, bad;
  if (cf_tensor_arg(o_ids, "ids", &ids) || cf_tensor_out(o_counts, "counts", &counts) ||
      cf_tensor_out_opt(o_bad, "bad", &bad))
    return NULL;
  if (cf_check_dtype(&ids, "ids", CF_I32 | CF_I64) || cf_check_contiguous(&ids, "ids") ||
      cf_check_dtype(&counts, "counts", CF_I64) || cf_check_ndim(&counts, "counts", 1) ||
      cf_check_contiguous(&counts, "counts") || cf_check_same_device(&ids, "ids", &counts, "counts"))
    return NULL;
  const int64_t V = counts.shape[0];
  if (V < 1) {
    PyErr_SetString(PyExc_ValueError, "vocab_size: must be positive");
    return NULL;
  }
  if (ids.device == CF_DEV_CUDA) {
#ifdef CF_WITH_CUDA
    if (!bad.data || cf_check_dtype(&bad, "bad", CF_I64) || check_vector(&bad, "bad", 2) ||
        cf_check_same_device(&ids, "ids", &bad, "bad")) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad: an int64 [2] CUDA workspace is required");
      return NULL;
    }
    const char *err = cf_pdl_token_counts_cuda(ids.data, ids.dtype == CF_I64, ids.numel, ignore,
                                               (int64_t *)counts.data, V, (int64_t *)bad.data,
                                               ids.device_id, (void *)(uintptr_t)stream);
    if (err) return cf_raise_cuda("token_counts", err);
    Py_RETURN_NONE;
#else
    return cf_no_cuda("token_counts");
#endif
  }
  int64_t bad_pos = -1, bad_value = 0;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = cf_pdl_token_counts_cpu(ids.data, ids.dtype == CF_I64, ids.numel, ignore, (int64_t *)counts.data,
                               V, cf_clamp_threads(nthreads), &bad_pos, &bad_value);
  Py_END_ALLOW_THREADS
  if (rc) {
    PyErr_Format(PyExc_ValueError,
                 "ids: value %lld (at flat position %lld) is out of range for vocab_size=%lld "
                 "(expected 0 <= id < vocab_size, or ignore_index=%lld)",
                 (long long)bad_value, (long long)bad_pos, (long long)V, ignore);
    return NULL;
  }
  Py_RETURN_NONE;
}

/* pdl_loss_fwd(logits, targets, weights, norm, row_loss, grad, ignore_index, reduction,
 *              label_smoothing, norm_value, norm_mode, nthreads, stream, ws) -> None
 * nthreads: CPU threads (unused on CUDA).
 * logits (N, V) or (B, T, V) with last-dim stride 1; targets (B*T,) contiguous int32/int64;
 * weights (V,); row_loss (B*T,); grad (B*T, V) contiguous (any shape with that many elements),
 * or None to compute the loss only.
 * norm_mode (CF_PDL_NORM_*): BATCH, or the denominator is given: on the CPU as norm_value, on
 * CUDA as `norm`, a float32 scalar tensor on the device. ws: CUDA float32 [4] workspace. */
static PyObject *pdl_loss_fwd(PyObject *self, PyObject *args) {
  PyObject *o_z, *o_y, *o_w, *o_norm, *o_loss, *o_grad, *o_ws;
  long long ignore;
  int reduction, nthreads, norm_mode;
  double eps, norm_value;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOOOOOLiddiiKO", &o_z, &o_y, &o_w, &o_norm, &o_loss, &o_grad, &ignore,
                        &reduction, &eps, &norm_value, &norm_mode, &nthreads, &stream, &o_ws))
    return NULL;
  CfTensor z, y, w, norm, loss, grad, ws;
  if (cf_tensor_arg(o_z, "logits", &z) || cf_tensor_arg(o_y, "targets", &y) ||
      cf_tensor_arg(o_w, "weights", &w) || cf_tensor_opt(o_norm, "normalizer", &norm) ||
      cf_tensor_out(o_loss, "row_loss", &loss) || cf_tensor_out_opt(o_grad, "grad", &grad) ||
      cf_tensor_out_opt(o_ws, "workspace", &ws))
    return NULL;
  if (z.ndim != 2 && z.ndim != 3) {
    PyErr_Format(PyExc_ValueError, "logits: expected 2 or 3 dimensions, got %d", z.ndim);
    return NULL;
  }
  if (reduction < CF_PDL_NONE || reduction > CF_PDL_MEAN || !(eps >= 0.0 && eps <= 1.0) ||
      norm_mode < CF_PDL_NORM_BATCH || norm_mode > CF_PDL_NORM_PRECOMPUTED) {
    PyErr_SetString(PyExc_ValueError, "pdl_loss: bad reduction code or label_smoothing");
    return NULL;
  }
  CfPdlArgs a;
  a.V = z.shape[z.ndim - 1];
  if (z.ndim == 2) {
    a.B = 1, a.T = z.shape[0], a.sb = 0, a.st = z.strides[0];
  } else {
    a.B = z.shape[0], a.T = z.shape[1], a.sb = z.strides[0], a.st = z.strides[1];
  }
  const int64_t N = a.B * a.T;
  if (a.V < 1) {
    PyErr_SetString(PyExc_ValueError, "logits: the class dimension must not be empty");
    return NULL;
  }
  if (cf_check_last_contiguous(&z, "logits") || cf_check_dtype(&y, "targets", CF_I32 | CF_I64) ||
      check_vector(&y, "targets", N) || check_vector(&w, "weights", a.V) ||
      check_vector(&loss, "row_loss", N) || (grad.data && cf_check_contiguous(&grad, "grad")) ||
      cf_check_same_device(&z, "logits", &y, "targets") || cf_check_same_device(&z, "logits", &w, "weights") ||
      cf_check_same_device(&z, "logits", &loss, "row_loss") ||
      (grad.data && cf_check_same_device(&z, "logits", &grad, "grad")))
    return NULL;
  if (grad.data && (grad.numel != N * a.V || grad.dtype != z.dtype)) {
    PyErr_SetString(PyExc_ValueError, "grad: must have the logits' dtype and N * V elements");
    return NULL;
  }
  a.logits = z.data, a.targets = y.data, a.targets_i64 = y.dtype == CF_I64, a.weights = w.data;
  a.ignore_index = ignore, a.eps = eps, a.reduction = reduction, a.norm_mode = norm_mode, a.row_loss = loss.data, a.grad = grad.data;

  if (z.device == CF_DEV_CUDA) {
#ifdef CF_WITH_CUDA
    if (cf_check_dtype(&z, "logits", CF_F32 | CF_F16 | CF_BF16) || cf_check_dtype(&w, "weights", CF_F32) ||
        cf_check_dtype(&loss, "row_loss", CF_F32))
      return NULL;
    if (!ws.data || cf_check_dtype(&ws, "workspace", CF_F32) || check_vector(&ws, "workspace", 4) ||
        cf_check_same_device(&z, "logits", &ws, "workspace")) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "workspace: a float32 [4] CUDA tensor is required");
      return NULL;
    }
    if (reduction == CF_PDL_MEAN && norm_mode != CF_PDL_NORM_BATCH && !norm.data) {
      PyErr_SetString(PyExc_ValueError, "normalizer: a float32 CUDA scalar is required for this norm_mode");
      return NULL;
    }
    if (norm.data && (cf_check_dtype(&norm, "normalizer", CF_F32) || norm.numel != 1 ||
                      cf_check_same_device(&z, "logits", &norm, "normalizer"))) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "normalizer: expected one float32 value");
      return NULL;
    }
    const char *err = cf_pdl_loss_cuda(&a, z.dtype, (const float *)norm.data, (float *)ws.data, z.device_id,
                                       (void *)(uintptr_t)stream);
    if (err) return cf_raise_cuda("pdl_loss", err);
    Py_RETURN_NONE;
#else
    return cf_no_cuda("pdl_loss");
#endif
  }
  if (cf_check_dtype(&z, "logits", CF_F32 | CF_F64)) return NULL;
  if (w.dtype != z.dtype || loss.dtype != z.dtype) {
    PyErr_SetString(PyExc_TypeError, "weights, row_loss: must have the logits' dtype on the CPU");
    return NULL;
  }
  int64_t bad_pos = -1, bad_value = 0;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = cf_pdl_loss_cpu(&a, z.dtype == CF_F64, norm_value, cf_clamp_threads(nthreads), &bad_pos, &bad_value);
  Py_END_ALLOW_THREADS
  if (rc) {
    PyErr_Format(PyExc_ValueError,
                 "targets: value %lld (at flat position %lld) is out of range for %lld classes "
                 "(expected 0 <= target < %lld, or ignore_index=%lld)",
                 (long long)bad_value, (long long)bad_pos, (long long)a.V, (long long)a.V, ignore);
    return NULL;
  }
  Py_RETURN_NONE;
}

/* pdl_scale(grad, g, per_row, stream) -> None: grad (rows, V) *= g on the device (CUDA only;
 * the CPU path scales with torch after checking g on the host). */
static PyObject *pdl_scale(PyObject *self, PyObject *args) {
  PyObject *o_grad, *o_g;
  int per_row;
  unsigned long long stream;
  if (!PyArg_ParseTuple(args, "OOiK", &o_grad, &o_g, &per_row, &stream)) return NULL;
  CfTensor grad, g;
  if (cf_tensor_out(o_grad, "grad", &grad) || cf_tensor_arg(o_g, "grad_output", &g)) return NULL;
  if (grad.device != CF_DEV_CUDA) {
    PyErr_SetString(PyExc_ValueError, "grad: pdl_scale runs on CUDA tensors only");
    return NULL;
  }
#ifdef CF_WITH_CUDA
  if (cf_check_dtype(&grad, "grad", CF_F32 | CF_F16 | CF_BF16) || cf_check_contiguous(&grad, "grad") ||
      grad.ndim < 1 || cf_check_dtype(&g, "grad_output", CF_F32) || cf_check_contiguous(&g, "grad_output") ||
      cf_check_same_device(&grad, "grad", &g, "grad_output")) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "grad: expected at least one dimension");
    return NULL;
  }
  const int64_t V = grad.shape[grad.ndim - 1];
  const int64_t rows = V ? grad.numel / V : 0;
  if (g.numel != (per_row ? rows : 1)) {
    PyErr_Format(PyExc_ValueError, "grad_output: expected %lld elements, got %lld",
                 (long long)(per_row ? rows : 1), (long long)g.numel);
    return NULL;
  }
  const char *err = cf_pdl_scale_cuda(grad.data, grad.dtype, rows, V, (const float *)g.data, per_row,
                                      grad.device_id, (void *)(uintptr_t)stream);
  if (err) return cf_raise_cuda("pdl_loss backward", err);
  Py_RETURN_NONE;
#else
  return cf_no_cuda("pdl_loss backward");
#endif
}

PyMethodDef cf_pdl_methods[] = {
    {"pdl_token_counts", pdl_token_counts, METH_VARARGS, "Histogram of token ids (int64 counts)."},
    {"pdl_loss_fwd", pdl_loss_fwd, METH_VARARGS, "Fused PDL loss: per-row loss and gradient in one pass."},
    {"pdl_scale", pdl_scale, METH_VARARGS, "Scale a PDL gradient by grad_output on the device."},
    {NULL, NULL, 0, NULL}};
