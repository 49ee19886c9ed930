// The Python module nformer_kernels._C: importing it loads the `nformer::` op registrations
// (csrc/ops.cpp and the kernels' TORCH_LIBRARY_IMPL blocks) into torch.ops.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("has_cuda") =
#ifdef NFORMER_WITH_CUDA
      true;
#else
      false;
#endif
}
