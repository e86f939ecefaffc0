// Python entry point of mae_fast._C. Importing the module loads this shared library, whose static
// initialisers register the CPU (and, when built, CUDA) kernels of the ops declared in
// mae_fast/ops/ under the mae_fast:: namespace. The module itself holds no functions.
#include <Python.h>

static struct PyModuleDef mae_fast_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mae_fast_c_module); }
