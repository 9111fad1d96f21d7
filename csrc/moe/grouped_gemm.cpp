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
// Gathered operand (src_slot given): the row operand is not materialised in expert order; its row i is
// tokens[src_slot[i] / top_k], as moe_permute would write it, with `tokens` = a (kinds 0, 1 and 2) or b (kind 2
// with gather_b). The rows are gathered per pass of consecutive experts into a reused scratch, so that the
// layer's (T * top_k, H) permuted copy of x (64 MB fp32 at 2K tokens x top-8, H 1024) is neither written nor
// kept for the backward. The results are bit-identical to moe_permute followed by the plain op. (Gathering the
// probs-weighted output gradient for the second GEMM's backward the same way, twice, was slower than one
// moe_permute shared by its dx and dw: each gather costs about what the permute does on this CPU.)
//
// moe_grouped_mm_unpermute (kinds 0 and 1, at the end of this file): the op followed by moe_unpermute, with each
// expert row stored at the slot it came from.
//
// Experts with few rows run on oneDNN brgemm micro-kernels instead where that is faster (bf16 on AMX or
// AVX512-BF16, the fp32 forward, every fp32 kind on AMD CPUs; grouped_gemm_brgemm.cpp); the rest here.
#include "moe/grouped_gemm.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <numeric>

#include "moe/moe_dispatch.h"

namespace longmoe {

namespace {

// Every expert's GEMM into `out`: brgemm for the experts it takes, mm_out for the rest. Operands already checked.
// `stream`: the whole op's output is over kStreamOutputBytes (`out` may be one pass's part of it).
void grouped_mm_into(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind, at::Tensor& out,
                     bool stream) {
  const int64_t done_rows = moe_grouped_mm_brgemm(a, b, counts, kind, out, stream, nullptr);  // experts <= done_rows
  int64_t start = 0;
  for (int64_t e = 0; e < static_cast<int64_t>(counts.size()); ++e) {
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
}

// Bytes of gathered rows per pass: the scratch they are gathered into is reused from pass to pass, so it
// stays in cache instead of streaming a (num_rows, features) copy through memory.
constexpr int64_t kGatherBytes = int64_t{1} << 20;

// The checks of kinds 0 and 1 on a (N, features) and b (E, out, in); returns the output's width.
int64_t check_weight_operand(const at::Tensor& a, const at::Tensor& b, int64_t E, int64_t kind) {
  TORCH_CHECK(b.dim() == 3 && b.size(0) == E, "b must be (num_experts=", E, ", out, in); got ", b.sizes());
  const int64_t k_dim = kind == 0 ? b.size(2) : b.size(1);
  TORCH_CHECK(a.size(1) == k_dim, "a has ", a.size(1), " features; expected ", k_dim, " for kind ", kind);
  return kind == 0 ? b.size(1) : b.size(2);
}

void check_counts(at::IntArrayRef counts, int64_t N, const char* rows_of) {
  int64_t total = 0;
  for (int64_t c : counts) {
    TORCH_CHECK(c >= 0, "counts must be >= 0; got ", counts);
    total += c;
  }
  TORCH_CHECK(total == N, "counts sum to ", total, "; expected ", rows_of, " rows ", N);
}

}  // namespace

at::Tensor moe_grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              const std::optional<at::Tensor>& src_slot, int64_t top_k, bool gather_b) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "kind must be 0 (x @ w^T), 1 (dy @ w) or 2 (dy^T @ x); got ", kind);
  TORCH_CHECK(a.dim() == 2, "a must be 2-D (num_rows, features); got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype; got ", a.scalar_type(), " and ",
              b.scalar_type());
  const bool gather = src_slot.has_value();
  TORCH_CHECK(gather || !gather_b, "gather_b needs src_slot");
  TORCH_CHECK(!gather_b || kind == 2, "gather_b applies to kind 2 (dy^T @ x) only; got kind ", kind);
  // The gathered operand: a (token rows), or b for kind 2 with gather_b; its rows are x[src_slot[i] / top_k].
  const at::Tensor& tokens = gather_b ? b : a;
  at::Tensor src;
  if (gather) {
    src = src_slot->contiguous();
    TORCH_CHECK(src.dim() == 1 && src.scalar_type() == at::kLong, "src_slot must be 1-D int64; got ", src.sizes(),
                " ", src.scalar_type());
    TORCH_CHECK(top_k >= 1, "top_k must be >= 1; got ", top_k);
    TORCH_CHECK(tokens.dim() == 2, gather_b ? "b" : "a", " (the gathered tokens) must be 2-D; got shape ",
                tokens.sizes());
  }
  const int64_t E = static_cast<int64_t>(counts.size());
  const int64_t N = gather && !gather_b ? src.size(0) : a.size(0);
  check_counts(counts, N, gather && !gather_b ? "src_slot's" : "a's");
  at::Tensor out;
  if (kind == 2) {
    const int64_t b_rows = gather_b ? src.size(0) : b.size(0);
    TORCH_CHECK(b.dim() == 2 && b_rows == N, "kind 2: b must be (num_rows=", N, ", in)",
                gather_b ? " after the gather" : "", "; got ", b.sizes());
    out = at::empty({E, a.size(1), b.size(1)}, a.options());
  } else {
    out = at::empty({N, check_weight_operand(a, b, E, kind)}, a.options());
  }
  const bool stream = out.nbytes() > static_cast<size_t>(kStreamOutputBytes);
  if (!gather) {
    grouped_mm_into(a, b, counts, kind, out, stream);
    return out;
  }
  // Passes over consecutive experts holding about kGatherBytes of gathered rows (at least the largest expert):
  // gather the pass's rows into the scratch, then run its experts on it.
  const at::Tensor tok = tokens.contiguous();  // once, not per pass
  const int64_t row_bytes = tok.size(1) * tok.element_size();
  const int64_t most = counts.empty() ? 0 : *std::max_element(counts.begin(), counts.end());
  const int64_t budget = std::max<int64_t>({kGatherBytes / std::max<int64_t>(row_bytes, 1), most, 1});
  at::Tensor scratch = at::empty({std::min(budget, N), tok.size(1)}, tok.options());
  const int64_t* sp = src.data_ptr<int64_t>();
  for (int64_t e0 = 0, r0 = 0; e0 < E;) {
    int64_t e1 = e0, rows = 0;
    while (e1 < E && (e1 == e0 || rows + counts[e1] <= budget)) rows += counts[e1++];
    at::Tensor g = scratch.narrow(0, 0, rows);
    moe_permute_into(tok, sp + r0, rows, top_k, std::nullopt, g);
    const at::IntArrayRef cnt = counts.slice(e0, e1 - e0);
    if (kind == 2) {
      at::Tensor o = out.narrow(0, e0, e1 - e0);
      grouped_mm_into(gather_b ? a.narrow(0, r0, rows) : g, gather_b ? g : b.narrow(0, r0, rows), cnt, 2, o, stream);
    } else {
      at::Tensor o = out.narrow(0, r0, rows);
      grouped_mm_into(g, b.narrow(0, e0, e1 - e0), cnt, kind, o, stream);
    }
    e0 = e1;
    r0 += rows;
  }
  return out;
}

// Kinds 0 and 1 with the output unpermuted: on the bf16 brgemm path each expert's row i goes straight to the slot
// it came from (row src_slot[i] of a (num_tokens * top_k, width) buffer, non-temporal stores), so the combine
// reads each token's top_k rows in sequence instead of at random rows of the expert-ordered output. One thread,
// bf16, 2K tokens x top-8, H 1024, a Zen 5 core: the unpermute of 16K rows out of cache 3.2 -> 2.3 ms; layer
// forward+backward (same-process A/B) 1.02x at 128:8:128 and 256:8:64, 1.01x at 64:8:256. The rows and their
// summation order are those of the two-step path, so the result is the same bit for bit. Elsewhere (fp32, no
// brgemm) it runs the two steps.
at::Tensor moe_grouped_mm_unpermute_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                                        const at::Tensor& row_map, const at::Tensor& src_slot,
                                        const std::optional<at::Tensor>& probs) {
  TORCH_CHECK(kind == 0 || kind == 1, "kind must be 0 (x @ w^T) or 1 (dy @ w) here; got ", kind);
  TORCH_CHECK(a.dim() == 2, "a must be 2-D (num_rows, features); got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "a and b must share a dtype; got ", a.scalar_type(), " and ",
              b.scalar_type());
  TORCH_CHECK(row_map.dim() == 2 && row_map.scalar_type() == at::kLong,
              "row_map must be (num_tokens, top_k) int64; got ", row_map.sizes(), " ", row_map.scalar_type());
  TORCH_CHECK(src_slot.dim() == 1 && src_slot.scalar_type() == at::kLong && src_slot.size(0) == a.size(0),
              "src_slot must be (num_rows=", a.size(0), ",) int64; got ", src_slot.sizes(), " ",
              src_slot.scalar_type());
  const int64_t E = static_cast<int64_t>(counts.size()), N = a.size(0);
  check_counts(counts, N, "a's");
  const int64_t width = check_weight_operand(a, b, E, kind);
  const at::Tensor rm = row_map.contiguous(), src = src_slot.contiguous();
  const int64_t slots = rm.numel(), top_k = rm.size(1);
  const int64_t* rmp = rm.data_ptr<int64_t>();
  const int64_t* sp = src.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)  // the scatter below writes row i to slot sp[i]: it must be row_map's inverse
    TORCH_CHECK(sp[i] >= 0 && sp[i] < slots && rmp[sp[i]] == i, "src_slot[", i, "]=", sp[i],
                " is not the slot of row ", i, " in row_map (expected a slot s in [0, ", slots,
                ") with row_map.flat[s] == ", i, ")");
  at::Tensor y = at::empty({slots, width}, a.options());
  const bool stream = y.nbytes() > static_cast<size_t>(kStreamOutputBytes);
  const int64_t done_rows = moe_grouped_mm_brgemm(a, b, counts, kind, y, stream, sp);
  if (done_rows < 0)  // not on the brgemm path: the two steps
    return moe_unpermute_cpu(moe_grouped_mm_cpu(a, b, counts, kind, std::nullopt, 1, false), rm, probs);
  for (int64_t e = 0, start = 0; e < E; start += counts[e++]) {  // experts over done_rows: mm_out, then scattered
    const int64_t n = counts[e];
    if (n <= done_rows) continue;
    const at::Tensor part = at::mm(a.narrow(0, start, n), kind == 0 ? b.select(0, e).t() : b.select(0, e));
    y.index_copy_(0, src.narrow(0, start, n), part);
  }
  // Token t's kept slot j is now row t * top_k + j.
  const at::Tensor slot_map = at::where(rm >= 0, at::arange(slots, rm.options()).view({-1, top_k}), rm);
  return moe_unpermute_cpu(y, slot_map, probs);
}

}  // namespace longmoe
