// Grouped expert GEMMs on CPU (see grouped_gemm.cpp for the three kinds and why not torch._grouped_mm).
#pragma once

#include <ATen/ATen.h>

namespace longmoe {

at::Tensor moe_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind);

}  // namespace longmoe
