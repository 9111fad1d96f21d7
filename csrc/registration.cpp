// Every longmoe op: its schema, its CPU kernel, and the Python module that loading registers them from.
// Fake (meta) kernels for torch.compile live in longmoe/runtime/fake_kernels.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention/flash_attn.h"

TORCH_LIBRARY(longmoe, m) {
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? block_mask, int block_size, bool causal, "
      "float softmax_scale, ScalarType? out_dtype=None) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? out, Tensor lse, Tensor? block_mask, "
      "int block_size, bool causal, float softmax_scale, Tensor? delta=None, ScalarType? grad_dtype=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(longmoe, CPU, m) {
  m.impl("flash_attn_fwd", &longmoe::flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &longmoe::flash_attn_bwd_cpu);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "longmoe native CPU kernels; the ops are registered as torch.ops.longmoe.*";
  m.def("build_info", [] {
    pybind11::dict info;
    info["blas_sgemm"] = longmoe::native_has_blas();
    info["bf16_dot"] = longmoe::native_has_bf16_dot();
#ifdef __AVX512F__
    info["isa"] = "avx512";
#elif defined(__AVX2__)
    info["isa"] = "avx2";
#else
    info["isa"] = "baseline";
#endif
    info["openmp"] = at::get_parallel_info();
    return info;
  });
}
