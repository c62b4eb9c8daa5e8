// Schemas of the fused_ckpt_ext ops and the Python module stub for `fused_ckpt._C`.
//
// Importing fused_ckpt._C loads this shared object; its static initialisers register the
// schemas below, the CPU kernels (act_cpu.cpp) and, when built with nvcc, the CUDA kernels
// (act_cuda.cu).  The Python-facing API lives in fused_ckpt/_ext.py.
#include <Python.h>
#include <torch/library.h>

#ifndef FUSED_CKPT_WITH_CUDA
#define FUSED_CKPT_WITH_CUDA 0
#endif

TORCH_LIBRARY(fused_ckpt_ext, m) {
  // z: [M, F1] with F1 = f, or 2f = [gate | up] for gated names.  h: [M, f], z's dtype.
  m.def("act_forward(Tensor z, str activation) -> Tensor");
  // dh: [M, f].  Returns dz (z's shape and dtype, contiguous) and h (the recomputed forward
  // output when need_h, else an empty tensor of shape [0]).
  m.def("act_backward(Tensor z, Tensor dh, str activation, bool need_h) -> (Tensor dz, Tensor h)");
}

namespace {
PyModuleDef fused_ckpt_c_module = {
    PyModuleDef_HEAD_INIT,
    "fused_ckpt._C",
    "fused_ckpt compiled ops; registers torch.ops.fused_ckpt_ext.* on import.",
    -1,
    nullptr,
};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&fused_ckpt_c_module);
  if (mod == nullptr) return nullptr;
  if (PyModule_AddIntConstant(mod, "WITH_CUDA", FUSED_CKPT_WITH_CUDA) != 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
