/* Placeholder: the attn_cuda family fills this table. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyMethodDef cf_attn_cuda_methods[] = {{NULL, NULL, 0, NULL}};
