// Grouped expert GEMMs on CPU (see grouped_gemm.cpp for the three kinds and why not torch._grouped_mm).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace longmoe {

at::Tensor moe_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              const std::optional<at::Tensor>& src_slot, int64_t top_k, bool gather_b);

// The same GEMMs on oneDNN brgemm micro-kernels into `out` (already shaped): bf16 where the micro-kernels run it
// (AMX, AVX512-BF16), the fp32 forward, and on AMD CPUs every fp32 kind (grouped_gemm_brgemm.cpp). Computes the
// experts with at most R rows and returns R, or returns -1 (nothing done) when the call is not eligible (dtype,
// kind, CPU, layout, LONGMOE_NATIVE_AMX / LONGMOE_NATIVE_BRGEMM=0).
// `stream`: write bf16 outputs with non-temporal stores where a block's rows are whole aligned cache lines
// (for outputs over kStreamOutputBytes).
// dst_rows (bf16 kinds 0 and 1 only; -1 otherwise): row i of the result goes to out's row dst_rows[i] (out then has
// any number of rows).
int64_t moe_grouped_mm_brgemm(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              at::Tensor& out, bool stream, const int64_t* dst_rows);

// moe_unpermute(moe_grouped_mm(a, b, counts, kind), row_map, probs), bit for bit, for kind 0 or 1 without a gather:
// a (N, features) expert-contiguous, row_map (T, k) and src_slot (N) of the dispatch map -> (T, width).
at::Tensor moe_grouped_mm_unpermute_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                                        const at::Tensor& row_map, const at::Tensor& src_slot,
                                        const std::optional<at::Tensor>& probs);

// Outputs of a grouped op over this many bytes are written with non-temporal stores on the brgemm path. Such an
// output does not stay in the L2 (2 MB per core) anyway, and each ordinary store first reads its line from
// memory. One thread, bf16, H 1024, 2K tokens x top-8, the six GEMMs of a SwiGLU layer (benchmarks/moe_gemms.py,
// all stores non-temporal vs none): 256 experts x 64 wide 93 -> 72 ms, 64 x 256 150 -> 121 ms, the weight
// gradients gaining most (fc1 dw 22.9 -> 14.4 ms at 256 x 64); layer forward+backward 1.13-1.18x at 64-256
// experts, 1.02-1.07x at 8 x 2816.
constexpr int64_t kStreamOutputBytes = int64_t{2} << 20;

}  // namespace longmoe
