/* Placeholder: the rotate family fills this table. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyMethodDef cf_rotate_methods[] = {{NULL, NULL, 0, NULL}};
