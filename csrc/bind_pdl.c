/* Placeholder: the pdl family fills this table. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
PyMethodDef cf_pdl_methods[] = {{NULL, NULL, 0, NULL}};
