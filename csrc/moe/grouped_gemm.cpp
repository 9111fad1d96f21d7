// Grouped GEMMs of the MoE experts on CPU: one op call runs every expert's GEMM, each written straight
// into its slice of the output by at::mm_out (MKL/oneDNN underneath), with no per-expert Python work.
//
// Why not torch._grouped_mm: on CPU it ran slower than per-expert mm_out calls into the output, most of all
// for the weight gradient (measured on a 2-core AVX-512/AMX Xeon, one thread, 2K tokens x top-8, H 1024:
// dw at 256 experts x 64 wide 68 -> 26 ms fp32 and 42 -> 18 ms bf16; at 64 x 256 137 -> 95 / 47 -> 24 ms).
//
// kind 0, forward:  a = x (N, in), b = w (E, out, in) -> (N, out), rows of e: x_e @ w[e]^T
// kind 1, dx:       a = dy (N, out), b = w (E, out, in) -> (N, in), rows of e: dy_e @ w[e]
// kind 2, dw:       a = dy (N, out), b = x (N, in) -> (E, out, in), dw[e] = dy_e^T @ x_e (0 if e has no rows)
// counts (E): rows of each expert, contiguous in expert order, summing to N.
//
// Experts with few rows run on oneDNN brgemm micro-kernels instead where that is faster (bf16 on AMX, the fp32
// forward; grouped_gemm_brgemm.cpp); the rest here.
#include "moe/grouped_gemm.h"

#include <ATen/ATen.h>

#include <numeric>

namespace longmoe {

at::Tensor moe_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (x @ w^T), 1 (dy @ w) or 2 (dy^T @ x); got ", kind);
  TORCH_CHECK(a.dim() == 2, "a must be 2-D (num_rows, features); got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype; got ", a.scalar_type(), " and ",
              b.scalar_type());
  const int64_t E = static_cast<int64_t>(counts.size());
  const int64_t N = a.size(0);
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "counts must be >= 0; got ", counts);
    total += c;
  }
  TORCH_CHECK(total == N, "counts sum to ", total, "; expected a's rows ", N);
  at::Tensor out;
  if (kind == 2) {
    TORCH_CHECK(b.dim() == 2 && b.size(0) == N, "kind 2: b must be (num_rows=", N, ", in); got ", b.sizes());
    out = at::empty({E, a.size(1), b.size(1)}, a.options());
  } else {
    TORCH_CHECK(b.dim() == 3 && b.size(0) == E, "b must be (num_experts=", E, ", out, in); got ", b.sizes());
    const int64_t k_dim = kind == 0 ? b.size(2) : b.size(1);
    TORCH_CHECK(a.size(1) == k_dim, "a has ", a.size(1), " features; expected ", k_dim, " for kind ", kind);
    out = at::empty({N, kind == 0 ? b.size(1) : b.size(2)}, a.options());
  }
  const int64_t done_rows = moe_grouped_mm_brgemm(a, b, counts, kind, out);  // experts with <= done_rows rows
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = counts[e];
    if (n <= done_rows) {
      start += n;
      continue;
    }
    if (kind == 2) {
      at::Tensor dst = out.select(0, e);
      if (n == 0) {
        dst.zero_();
      } else {
        at::mm_out(dst, a.narrow(0, start, n).t(), b.narrow(0, start, n));
      }
    } else if (n > 0) {
      at::Tensor dst = out.narrow(0, start, n);
      at::mm_out(dst, a.narrow(0, start, n), kind == 0 ? b.select(0, e).t() : b.select(0, e));
    }
    start += n;
  }
  return out;
}

}  // namespace longmoe
