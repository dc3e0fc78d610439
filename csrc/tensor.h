/* The tensor boundary: DLPack capsules in, validated CfTensor views out.
 * Every check raises a Python exception that names the argument; callers return NULL on -1. */
#ifndef CF_TENSOR_H
#define CF_TENSOR_H
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "cf_common.h"

typedef struct {
  void *data;                       /* already offset by byte_offset */
  int dtype;                        /* one CF_* dtype bit */
  int device;                       /* CF_DEV_CPU or CF_DEV_CUDA */
  int device_id;
  int ndim;
  int64_t shape[CF_MAX_DIMS];
  int64_t strides[CF_MAX_DIMS];     /* in elements, filled in even for compact tensors */
  int64_t numel;
  int read_only;                    /* DLPack 1.x DLPACK_FLAG_BITMASK_READ_ONLY */
} CfTensor;

/* Parse a DLPack capsule (legacy or versioned). The capsule stays owned by the caller
 * (we borrow the memory for the duration of the call, never rename or consume it). */
int cf_tensor_arg(PyObject *capsule, const char *name, CfTensor *t);
/* Like cf_tensor_arg, but Py_None gives t->data == NULL and returns 0. */
int cf_tensor_opt(PyObject *capsule, const char *name, CfTensor *t);
/* An output the kernel writes: cf_tensor_arg / cf_tensor_opt, and a ValueError for a tensor its
 * producer marked read-only (e.g. a NumPy view of an immutable bytes object). */
int cf_tensor_out(PyObject *capsule, const char *name, CfTensor *t);
int cf_tensor_out_opt(PyObject *capsule, const char *name, CfTensor *t);

/* A caller's CPU thread count made safe for OpenMP: at least 1, and at most a few times the
 * processors (libgomp aborts or runs out of stack for absurd counts such as 10**6). */
int cf_clamp_threads(int nthreads);

int cf_check_dtype(const CfTensor *t, const char *name, int dtype_mask);
int cf_check_ndim(const CfTensor *t, const char *name, int ndim);
int cf_check_contiguous(const CfTensor *t, const char *name);
/* Innermost dimension has stride 1 (rows may be strided). */
int cf_check_last_contiguous(const CfTensor *t, const char *name);
int cf_check_same_device(const CfTensor *a, const char *na, const CfTensor *b, const char *nb);
int cf_check_dim(const CfTensor *t, const char *name, int dim, int64_t size);
/* Exactly `ndim` dimensions with the sizes in shape[0..ndim). */
int cf_check_shape(const CfTensor *t, const char *name, int ndim, const int64_t *shape);

/* The batch, head and token strides (CfStrides) of a (B, H, L, d) tensor, and of a (Bp, L) one
 * (positions, masks: no head dimension, batch stride 0 when Bp == 1 so it broadcasts). */
CfStrides cf_strides_bhl(const CfTensor *t);
CfStrides cf_strides_bl(const CfTensor *t);

const char *cf_dtype_name(int dtype);

/* CUDA launchers report failures as a message (NULL on success); this raises it. */
PyObject *cf_raise_cuda(const char *what, const char *msg);
/* Raised by bindings when a CUDA tensor reaches a build without CUDA kernels. */
PyObject *cf_no_cuda(const char *op);

#endif
