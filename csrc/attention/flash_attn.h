// CPU flash attention with log-sum-exp and an optional block mask; see flash_attn.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace longmoe {

// q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D) -> out (B, Sq, Hq, D) in out_dtype (default q's dtype; float32
// for ring partials), lse (B, Hq, Sq) fp32.
std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const std::optional<at::Tensor>& block_mask,
                                                      int64_t block_size, bool causal, double softmax_scale,
                                                      std::optional<at::ScalarType> out_dtype);

// Gradients given the (possibly globally merged) lse and either out or delta = rowsum(dout * out)
// (B, Hq, Sq) fp32: (dq, dk, dv) in grad_dtype (default: the input dtype).
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& out, const at::Tensor& lse, const std::optional<at::Tensor>& block_mask,
    int64_t block_size, bool causal, double softmax_scale, const std::optional<at::Tensor>& delta,
    std::optional<at::ScalarType> grad_dtype);

// True when the tile GEMMs run through a BLAS sgemm found in the torch libraries.
bool native_has_blas();

// True when bf16 tiles run on AVX512-BF16 dot products (compiled in and supported by this CPU).
bool native_has_bf16_dot();

}  // namespace longmoe
