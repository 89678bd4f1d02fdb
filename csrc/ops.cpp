// The one schema file of the perceiver_fast operator library. Kernels are
// registered per backend in cpu/ and cuda/ (TORCH_LIBRARY_IMPL); the fake
// (meta) kernels and autograd formulas live in Python (perceiver_fast/ops/).
#include <torch/library.h>

TORCH_LIBRARY(perceiver_fast, m) {
  // inputs: (B, P, Cin) with P = prod(index_dims); Cin may be 0.
  // Returns (B, P, Cin + C): [inputs | Fourier features of the grid].
  // max_resolution: one entry per index dim, or empty for index_dims.
  m.def(
      "fourier_encode(Tensor inputs, int[] index_dims, float[] max_resolution, int num_bands, "
      "bool concat_pos, bool sine_only) -> Tensor");
}

#ifdef PERCEIVER_FAST_PYTHON_MODULE
// setup.py builds this file into perceiver_fast._C; an empty Python module is
// enough for `import perceiver_fast._C` to load the library and run the
// registrations above. The CMake build (torch.ops.load_library) skips it.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      "perceiver_fast's C++/CUDA operators (registered as torch.ops.perceiver_fast.*)",
      -1,    // size of per-interpreter state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
#endif
