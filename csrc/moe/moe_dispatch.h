// MoE token dispatch on CPU: dispatch map (stable counting sort by expert), permute, unpermute; see
// moe_dispatch.cpp for the contract shared with the Triton kernels and the PyTorch reference.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace longmoe {

// expert_ids (T, k) int32/int64, values in [0, E) or -1 (dropped) ->
// row_map (T, k) int64 (row of slot (t, j) in expert-sorted order, -1 if dropped),
// src_slot (N) int64 (flat slot t*k+j of each sorted row), tokens_per_expert (E) int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_map_cpu(const at::Tensor& expert_ids,
                                                                    int64_t num_experts);

// x (T, H), src_slot (N) -> out (N, H): out[i] = x[src_slot[i] / topk] (* probs.flat[src_slot[i]]).
at::Tensor moe_permute_cpu(const at::Tensor& x, const at::Tensor& src_slot, int64_t topk,
                           const std::optional<at::Tensor>& probs);

// The same for the rows i < rows of src_slot (a pointer into it: a range of rows), into out's first rows
// (contiguous, (>= rows, H), x's dtype): the grouped expert GEMMs' gathered operands (grouped_gemm.cpp).
void moe_permute_into(const at::Tensor& x, const int64_t* src_slot, int64_t rows, int64_t top_k,
                      const std::optional<at::Tensor>& probs, at::Tensor& out);

// y (N, H), row_map (T, k) -> out (T, H): out[t] = sum_j probs[t, j] * y[row_map[t, j]] over kept slots,
// accumulated in order j = 0..k-1 in fp32 (fp64 for fp64 inputs).
at::Tensor moe_unpermute_cpu(const at::Tensor& y, const at::Tensor& row_map,
                             const std::optional<at::Tensor>& probs);

// dout (T, H), y (N, H), row_map (T, k) -> dprobs (T, k): dot(dout[t], y[row_map[t, j]]), 0 if dropped.
at::Tensor moe_unpermute_probs_grad_cpu(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& row_map);

// key (T, n) floating -> (T, k) int64: the first k indices of a stable descending sort of each row (NaN first),
// ordered by value; router_topk.cpp.
at::Tensor topk_lowest_index_cpu(const at::Tensor& key, int64_t k);

// a (M, K) bf16, b (K, N) bf16 -> (M, N) fp32 = a.float() @ b.float() on bf16 micro-kernels; router_gemm.cpp.
at::Tensor mm_bf16_f32_cpu(const at::Tensor& a, const at::Tensor& b);

// u, a (N, F), p (N) fp32 (fp64 for fp64 u) -> (p * u, p * a, <u, a> per row): the row-wise part of the backward
// of the second expert GEMM fused with the weighted combine; combine_grad.cpp.
std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_scale_rows_dot_cpu(const at::Tensor& u, const at::Tensor& a,
                                                                      const at::Tensor& p);

// h (rows, 2F) float32/bf16 = [gate | up] -> (rows, F) silu(gate) * up, and its backward: da (rows, F), h ->
// dh (rows, 2F); swiglu.cpp.
at::Tensor swiglu_cpu(const at::Tensor& h);
at::Tensor swiglu_backward_cpu(const at::Tensor& da, const at::Tensor& h);

}  // namespace longmoe
