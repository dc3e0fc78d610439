#include "tensor.h"
#include "dlpack.h"
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CF_DLPACK_FLAG_READ_ONLY 1ULL /* DLPACK_FLAG_BITMASK_READ_ONLY (DLPack 1.0) */

static int map_dtype(DLDataType d) {
  if (d.lanes != 1) return 0;
  switch (d.code) {
    case kDLFloat:
      return d.bits == 32 ? CF_F32 : d.bits == 64 ? CF_F64 : d.bits == 16 ? CF_F16 : 0;
    case kDLBfloat: return d.bits == 16 ? CF_BF16 : 0;
    case kDLInt: return d.bits == 32 ? CF_I32 : d.bits == 64 ? CF_I64 : 0;
    case kDLUInt: return d.bits == 8 ? CF_U8 : 0;
    case kDLBool: return d.bits == 8 ? CF_BOOL : 0;
    default: return 0;
  }
}

const char *cf_dtype_name(int dtype) {
  switch (dtype) {
    case CF_F32: return "float32";
    case CF_F64: return "float64";
    case CF_F16: return "float16";
    case CF_BF16: return "bfloat16";
    case CF_I32: return "int32";
    case CF_I64: return "int64";
    case CF_BOOL: return "bool";
    case CF_U8: return "uint8";
    default: return "unknown";
  }
}

int cf_tensor_arg(PyObject *capsule, const char *name, CfTensor *t) {
  memset(t, 0, sizeof(*t));
  DLTensor *dl = NULL;
  if (PyCapsule_IsValid(capsule, "dltensor")) {
    DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(capsule, "dltensor");
    if (m) dl = &m->dl_tensor;
  } else if (PyCapsule_IsValid(capsule, "dltensor_versioned")) {
    DLManagedTensorVersioned *m =
        (DLManagedTensorVersioned *)PyCapsule_GetPointer(capsule, "dltensor_versioned");
    if (m) {
      if (m->version.major != 1) {
        PyErr_Format(PyExc_TypeError, "%s: unsupported DLPack major version %u", name,
                     (unsigned)m->version.major);
        return -1;
      }
      dl = &m->dl_tensor;
      t->read_only = (m->flags & CF_DLPACK_FLAG_READ_ONLY) != 0;
    }
  }
  if (!dl) {
    PyErr_Format(PyExc_TypeError, "%s: expected an unconsumed DLPack capsule", name);
    return -1;
  }
  if (dl->ndim < 0 || dl->ndim > CF_MAX_DIMS) {
    PyErr_Format(PyExc_ValueError, "%s: %d dimensions (at most %d supported)", name,
                 (int)dl->ndim, CF_MAX_DIMS);
    return -1;
  }
  t->dtype = map_dtype(dl->dtype);
  if (!t->dtype) {
    PyErr_Format(PyExc_TypeError, "%s: unsupported dtype (DLPack code %d, %d bits, %d lanes)",
                 name, (int)dl->dtype.code, (int)dl->dtype.bits, (int)dl->dtype.lanes);
    return -1;
  }
  if (dl->device.device_type == kDLCPU) t->device = CF_DEV_CPU;
  else if (dl->device.device_type == kDLCUDA) t->device = CF_DEV_CUDA;
  else {
    PyErr_Format(PyExc_ValueError, "%s: unsupported device type %d (CPU or CUDA expected)", name,
                 (int)dl->device.device_type);
    return -1;
  }
  t->device_id = dl->device.device_id;
  t->ndim = dl->ndim;
  t->data = (char *)dl->data + dl->byte_offset;
  int64_t numel = 1;
  for (int i = 0; i < t->ndim; i++) {
    if (dl->shape[i] < 0) {
      PyErr_Format(PyExc_ValueError, "%s: negative size in dimension %d", name, i);
      return -1;
    }
    t->shape[i] = dl->shape[i];
    /* 64-bit element counts: refuse only what would overflow int64 itself */
    if (dl->shape[i] != 0 && numel > INT64_MAX / dl->shape[i]) {
      PyErr_Format(PyExc_OverflowError, "%s: element count overflows int64", name);
      return -1;
    }
    numel *= dl->shape[i];
  }
  t->numel = numel;
  int64_t expect = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    t->strides[i] = dl->strides ? dl->strides[i] : expect;
    expect *= t->shape[i];
  }
  return 0;
}

int cf_tensor_opt(PyObject *capsule, const char *name, CfTensor *t) {
  if (capsule == Py_None) {
    memset(t, 0, sizeof(*t));
    return 0;
  }
  return cf_tensor_arg(capsule, name, t);
}

static int refuse_read_only(const CfTensor *t, const char *name) {
  if (!t->read_only) return 0;
  PyErr_Format(PyExc_ValueError, "%s: is read-only, but it is an output the kernel writes", name);
  return -1;
}

int cf_tensor_out(PyObject *capsule, const char *name, CfTensor *t) {
  return cf_tensor_arg(capsule, name, t) || refuse_read_only(t, name) ? -1 : 0;
}

int cf_tensor_out_opt(PyObject *capsule, const char *name, CfTensor *t) {
  return cf_tensor_opt(capsule, name, t) || refuse_read_only(t, name) ? -1 : 0;
}

int cf_clamp_threads(int nthreads) {
#ifdef _OPENMP
  const int cap = 4 * (omp_get_num_procs() > 64 ? omp_get_num_procs() : 64);
#else
  const int cap = 1;
#endif
  return nthreads < 1 ? 1 : nthreads > cap ? cap : nthreads;
}

int cf_check_dtype(const CfTensor *t, const char *name, int mask) {
  if (t->dtype & mask) return 0;
  char buf[160] = "";
  const int all[] = {CF_F32, CF_F64, CF_F16, CF_BF16, CF_I32, CF_I64, CF_BOOL, CF_U8};
  for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
    if (mask & all[i]) {
      if (buf[0]) strcat(buf, ", ");
      strcat(buf, cf_dtype_name(all[i]));
    }
  PyErr_Format(PyExc_TypeError, "%s: dtype %s not supported here (expected %s)", name,
               cf_dtype_name(t->dtype), buf);
  return -1;
}

int cf_check_ndim(const CfTensor *t, const char *name, int ndim) {
  if (t->ndim == ndim) return 0;
  PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", name, ndim, t->ndim);
  return -1;
}

int cf_check_dim(const CfTensor *t, const char *name, int dim, int64_t size) {
  if (dim < t->ndim && t->shape[dim] == size) return 0;
  PyErr_Format(PyExc_ValueError, "%s: expected size %lld in dimension %d, got %lld", name,
               (long long)size, dim, dim < t->ndim ? (long long)t->shape[dim] : -1LL);
  return -1;
}

int cf_check_shape(const CfTensor *t, const char *name, int ndim, const int64_t *shape) {
  if (cf_check_ndim(t, name, ndim)) return -1;
  for (int i = 0; i < ndim; i++)
    if (cf_check_dim(t, name, i, shape[i])) return -1;
  return 0;
}

int cf_check_contiguous(const CfTensor *t, const char *name) {
  if (t->numel == 0) return 0; /* no element is ever addressed; torch's strides there are arbitrary */
  int64_t expect = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] != 1 && t->strides[i] != expect) {
      PyErr_Format(PyExc_ValueError, "%s: must be contiguous (call .contiguous())", name);
      return -1;
    }
    expect *= t->shape[i];
  }
  return 0;
}

int cf_check_last_contiguous(const CfTensor *t, const char *name) {
  if (t->ndim == 0 || t->shape[t->ndim - 1] <= 1 || t->strides[t->ndim - 1] == 1) return 0;
  PyErr_Format(PyExc_ValueError, "%s: the last dimension must have stride 1", name);
  return -1;
}

int cf_check_same_device(const CfTensor *a, const char *na, const CfTensor *b, const char *nb) {
  if (a->device == b->device && a->device_id == b->device_id) return 0;
  PyErr_Format(PyExc_ValueError, "%s and %s must be on the same device (%s:%d vs %s:%d)", na, nb,
               a->device == CF_DEV_CUDA ? "cuda" : "cpu", a->device_id,
               b->device == CF_DEV_CUDA ? "cuda" : "cpu", b->device_id);
  return -1;
}

CfStrides cf_strides_bhl(const CfTensor *t) {
  return (CfStrides){t->strides[0], t->strides[1], t->strides[2]};
}

CfStrides cf_strides_bl(const CfTensor *t) {
  return (CfStrides){t->shape[0] == 1 ? 0 : t->strides[0], 0, t->strides[1]};
}

PyObject *cf_raise_cuda(const char *what, const char *msg) {
  PyErr_Format(PyExc_RuntimeError, "%s: CUDA error: %s", what, msg);
  return NULL;
}

PyObject *cf_no_cuda(const char *op) {
  PyErr_Format(PyExc_RuntimeError,
               "%s: complexformer was built without CUDA kernels (no nvcc at build time); "
               "reinstall with nvcc on PATH or CUDA_HOME set",
               op);
  return NULL;
}
