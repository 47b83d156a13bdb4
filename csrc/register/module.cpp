// The Python module init of mixedprec._C (and, built with MP_SIMT_LIBRARY, of the test-only
// mixedprec._simt): importing the module only has to load the library so that the ops'
// registrations (TORCH_LIBRARY_FRAGMENT in ops/*/<op>_glue.cpp, cpu/switches.cpp) run. Kept apart
// from them so that C++ programs (tests/csrc/cpu_kernel_tests.cpp) link the ops without Python.
#include <Python.h>

#if defined(MP_SIMT_LIBRARY)
#define MP_MODULE_NAME "_simt"
#define MP_MODULE_INIT PyInit__simt
#else
#define MP_MODULE_NAME "_C"
#define MP_MODULE_INIT PyInit__C
#endif

PyMODINIT_FUNC MP_MODULE_INIT(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, MP_MODULE_NAME, nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
