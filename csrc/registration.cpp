// Every longmoe op: its schema, its CPU kernel, and the Python module that loading registers them from.
// Fake (meta) kernels for torch.compile live in longmoe/runtime/fake_kernels.py.
#include <torch/extension.h>
#include <torch/library.h>

#include "attention/flash_attn.h"
#include "moe/grouped_gemm.h"
#include "moe/moe_dispatch.h"
#include "xattention/antidiag.h"

TORCH_LIBRARY(longmoe, m) {
  m.def(
      "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? block_mask, int block_size, bool causal, "
      "float softmax_scale, ScalarType? out_dtype=None) -> (Tensor out, Tensor lse)");
  m.def(
      "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? out, Tensor lse, Tensor? block_mask, "
      "int block_size, bool causal, float softmax_scale, Tensor? delta=None, ScalarType? grad_dtype=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "moe_dispatch_map(Tensor expert_ids, int num_experts) -> (Tensor row_map, Tensor src_slot, "
      "Tensor tokens_per_expert)");
  m.def("moe_permute(Tensor x, Tensor src_slot, int top_k, Tensor? probs) -> Tensor");
  m.def("moe_unpermute(Tensor y, Tensor row_map, Tensor? probs) -> Tensor");
  m.def("moe_unpermute_probs_grad(Tensor dout, Tensor y, Tensor row_map) -> Tensor");
  m.def(
      "moe_grouped_mm(Tensor a, Tensor b, int[] counts, int kind, Tensor? src_slot=None, int top_k=1, "
      "bool gather_b=False) -> Tensor");
  m.def(
      "moe_grouped_mm_unpermute(Tensor a, Tensor b, int[] counts, int kind, Tensor row_map, Tensor src_slot, "
      "Tensor? probs) -> Tensor");
  m.def("topk_lowest_index(Tensor key, int k) -> Tensor");
  m.def("mm_bf16_f32(Tensor a, Tensor b) -> Tensor");
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("moe_scale_rows_dot(Tensor u, Tensor a, Tensor p) -> (Tensor, Tensor, Tensor)");
  m.def("swiglu_backward(Tensor da, Tensor h) -> Tensor");
  m.def(
      "xattn_block_scores(Tensor q, Tensor k, int stride, int block_size, bool causal, int q_offset, "
      "float? softmax_scale=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(longmoe, CPU, m) {
  m.impl("flash_attn_fwd", &longmoe::flash_attn_fwd_cpu);
  m.impl("flash_attn_bwd", &longmoe::flash_attn_bwd_cpu);
  m.impl("moe_dispatch_map", &longmoe::moe_dispatch_map_cpu);
  m.impl("moe_permute", &longmoe::moe_permute_cpu);
  m.impl("moe_unpermute", &longmoe::moe_unpermute_cpu);
  m.impl("moe_unpermute_probs_grad", &longmoe::moe_unpermute_probs_grad_cpu);
  m.impl("moe_grouped_mm", &longmoe::moe_grouped_mm_cpu);
  m.impl("moe_grouped_mm_unpermute", &longmoe::moe_grouped_mm_unpermute_cpu);
  m.impl("topk_lowest_index", &longmoe::topk_lowest_index_cpu);
  m.impl("mm_bf16_f32", &longmoe::mm_bf16_f32_cpu);
  m.impl("swiglu", &longmoe::swiglu_cpu);
  m.impl("moe_scale_rows_dot", &longmoe::moe_scale_rows_dot_cpu);
  m.impl("swiglu_backward", &longmoe::swiglu_backward_cpu);
  m.impl("xattn_block_scores", &longmoe::xattn_block_scores_cpu);
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
#if defined(__x86_64__)
    info["cpu_vendor"] = __builtin_cpu_is("intel") ? "intel" : __builtin_cpu_is("amd") ? "amd" : "other";
#else
    info["cpu_vendor"] = "other";
#endif
    info["openmp"] = at::get_parallel_info();
    return info;
  });
}
