/* complexformer._C: one CPython C-API module. Each kernel family contributes a method table
 * (bind_*.c); this file merges them and reports what was built. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include "cf_common.h"
#ifdef _OPENMP
#include <omp.h>
#endif

extern PyMethodDef cf_pdl_methods[];
extern PyMethodDef cf_rotate_methods[];
extern PyMethodDef cf_attn_methods[];

#ifndef CF_CUDA_VERSION
#define CF_CUDA_VERSION ""
#endif
#ifndef CF_CUDA_ARCHS
#define CF_CUDA_ARCHS ""
#endif

#ifdef CF_WITH_CUDA
int cf_cuda_driver_version(void);
#endif

static PyObject *build_info(PyObject *self, PyObject *args) {
  (void)self; (void)args;
  PyObject *d = PyDict_New();
  if (!d) return NULL;
#ifdef CF_WITH_CUDA
  PyObject *cuda = Py_True;
#else
  PyObject *cuda = Py_False;
#endif
#ifdef _OPENMP
  PyObject *omp = Py_True;
#else
  PyObject *omp = Py_False;
#endif
  PyObject *v;
  int ok = PyDict_SetItemString(d, "cuda", cuda) == 0 &&
           (v = PyUnicode_FromString(CF_CUDA_VERSION)) && PyDict_SetItemString(d, "cuda_version", v) == 0 &&
           (Py_DECREF(v), 1) &&
           (v = PyUnicode_FromString(CF_CUDA_ARCHS)) && PyDict_SetItemString(d, "cuda_archs", v) == 0 &&
           (Py_DECREF(v), 1) && PyDict_SetItemString(d, "openmp", omp) == 0 &&
           (v = PyUnicode_FromString(__VERSION__)) && PyDict_SetItemString(d, "c_compiler", v) == 0 &&
           (Py_DECREF(v), 1);
#ifdef CF_WITH_CUDA
  /* -1: no usable driver (a CPU-only machine running a CUDA build) */
  if (ok) {
    v = PyLong_FromLong(cf_cuda_driver_version());
    ok = v && PyDict_SetItemString(d, "cuda_driver_version", v) == 0;
    Py_XDECREF(v);
  }
#endif
  if (!ok) {
    Py_DECREF(d);
    return NULL;
  }
  return d;
}

static PyMethodDef core_methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of complexformer._C contains."},
    {NULL, NULL, 0, NULL}};

static Py_ssize_t table_len(const PyMethodDef *t) {
  Py_ssize_t n = 0;
  while (t[n].ml_name) n++;
  return n;
}

static struct PyModuleDef cf_module = {PyModuleDef_HEAD_INIT, "complexformer._C",
                                       "complexformer C/CUDA kernels", -1, NULL};

PyMODINIT_FUNC PyInit__C(void) {
  PyMethodDef *tables[] = {core_methods, cf_pdl_methods, cf_rotate_methods, cf_attn_methods};
  const size_t ntab = sizeof(tables) / sizeof(tables[0]);
  Py_ssize_t total = 1;
  for (size_t i = 0; i < ntab; i++) total += table_len(tables[i]);
  /* lives as long as the process, as CPython requires of a module's method table */
  PyMethodDef *all = (PyMethodDef *)PyMem_RawCalloc((size_t)total, sizeof(PyMethodDef));
  if (!all) return PyErr_NoMemory();
  Py_ssize_t k = 0;
  for (size_t i = 0; i < ntab; i++)
    for (Py_ssize_t j = 0; tables[i][j].ml_name; j++) all[k++] = tables[i][j];
  cf_module.m_methods = all;
  return PyModule_Create(&cf_module);
}
