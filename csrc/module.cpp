// Python module of the extension. Importing it runs the TORCH_LIBRARY
// registrations of the other translation units; the module itself only
// carries plain helpers.
#include <pybind11/pybind11.h>
#include <torch/version.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
#ifdef CATDPO_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  // The torch the module was compiled against: a mismatch with the running torch explains import failures.
  info["torch_version"] = TORCH_VERSION;
  info["cplusplus"] = static_cast<long>(__cplusplus);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "catdpo_kernels compiled ops (registered as torch.ops.catdpo.*)";
  m.def("build_info", &build_info, "Compile-time facts: {'cuda': bool, 'torch_version': str, 'cplusplus': int}");
}
