// XAttention antidiagonal block scoring on CPU; see antidiag.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace longmoe {

// q (B, Lq, Hq, D), k (B, Lk, Hkv, D) -> per-query-head block scores (B, Hq, ceil(Lq/block_size),
// ceil(Lk/block_size)) fp32, before any GQA group averaging. q_offset is the absolute position of the
// first query (already resolved; may be negative when Lq > Lk). softmax_scale: the attention's logit scale
// (default 1/sqrt(D)); antidiagonal sums are scaled by softmax_scale / stride.
at::Tensor xattn_block_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t stride, int64_t block_size,
                                  bool causal, int64_t q_offset, std::optional<double> softmax_scale);

}  // namespace longmoe
