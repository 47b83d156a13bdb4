// The Python module init of mixedprec._C: `import mixedprec._C` only has to load this library so
// that the registrations of ops.cpp, cpu/, cuda/ and simt/ run. Kept apart from the schemas so
// that C++ programs (tests/csrc/cpu_kernel_tests.cpp) link the ops without Python.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
