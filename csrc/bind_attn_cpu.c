/* Placeholder: the attn_cpu family fills this table. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyMethodDef cf_attn_cpu_methods[] = {{NULL, NULL, 0, NULL}};
