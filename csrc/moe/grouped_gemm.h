// Grouped expert GEMMs on CPU (see grouped_gemm.cpp for the three kinds and why not torch._grouped_mm).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace longmoe {

at::Tensor moe_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              const std::optional<at::Tensor>& src_slot, int64_t top_k, bool gather_b);

// The same GEMMs on oneDNN brgemm micro-kernels into `out` (already shaped): bf16 on AMX CPUs, the fp32 forward
// (grouped_gemm_brgemm.cpp). Computes the experts with at most R rows and returns R, or returns -1 (nothing
// done) when the call is not eligible (dtype, kind, CPU, layout, LONGMOE_NATIVE_AMX / LONGMOE_NATIVE_BRGEMM=0).
int64_t moe_grouped_mm_brgemm(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              at::Tensor& out);

}  // namespace longmoe
