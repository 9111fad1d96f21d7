// MoE token dispatch on CPU: the dispatch map, permute (token order -> expert-contiguous order) and
// unpermute (back, combining each token's top-k expert outputs with its routing weights).
//
// Slots: token t's j-th routing choice is slot s = t * k + j. expert_ids (T, k) holds the expert of every
// slot, or -1 when capacity dropped it. The dispatch map is a *stable* counting sort of the slots by
// expert: rows of expert 0 first (in slot order), then expert 1, ...; dropped slots get no row. So
//   row_map (T, k)  row of slot (t, j) in the sorted order, -1 if dropped;
//   src_slot (N)    the slot each sorted row came from (its inverse; N = number of kept slots);
//   tokens_per_expert (E)  rows per expert (the histogram of routed tokens).
// torch.argsort(stable=True) gives the same order, so the maps are bit-identical to the reference.
//
// permute:   out[i] = x[src_slot[i] / k] (* probs.flat[src_slot[i]], rounded once to x's dtype)
// unpermute: out[t] = sum over kept j (in order j = 0..k-1) of probs[t, j] * y[row_map[t, j]], accumulated
//            from -0.0 in fp32 (fp64 for fp64 inputs), rounded once to y's dtype; a token whose slots were
//            all dropped gets +0.
// permute's backward is unpermute without probs; unpermute's backward is permute with probs plus
// moe_unpermute_probs_grad. All loops run over independent rows with at::parallel_for (no atomics), so
// results do not depend on the thread count.
#include "moe/moe_dispatch.h"

#include "moe/grouped_gemm.h"
#include "tile_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

// Bit-exactness with the PyTorch reference: `acc += w * y` must round the product before the add, as
// torch's separate mul and add kernels do. GCC contracts a*b+c into an FMA across statements by default
// (-ffp-contract=fast); switch that off for this translation unit only.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace longmoe {
namespace {

#if defined(__AVX512F__)
// sum_h a[h] * b[h] over the whole 16-lane blocks of [0, n) with fp32 FMAs; sets `end` to where it stopped.
// (The probs gradient's summation order is the backend's own; the scalar loop ran at ~1.5 GFLOP/s for bf16.)
template <typename scalar_t>
inline float dot16(const scalar_t* a, const scalar_t* b, int64_t n, int64_t& end) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t h = 0;
  for (; h + 32 <= n; h += 32) {
    acc0 = _mm512_fmadd_ps(load16(a + h), load16(b + h), acc0);
    acc1 = _mm512_fmadd_ps(load16(a + h + 16), load16(b + h + 16), acc1);
  }
  for (; h + 16 <= n; h += 16) acc0 = _mm512_fmadd_ps(load16(a + h), load16(b + h), acc0);
  end = h;
  return reduce_add16(_mm512_add_ps(acc0, acc1));
}
#endif

// o[h] = scalar_t(acc_t(x[h]) * w), h < n: a probs-weighted permuted row. bf16 with AVX-512 runs 16 lanes at a
// time with c10's own rounding (round to nearest even on the bits, NaN -> 0x7FC0, no denormal flush), so the
// result is the scalar loop's bit for bit (16K rows x 1024, one thread: 3.6 -> 3.0 ms; an unweighted copy 2.5 ms).
template <typename scalar_t, typename acc_t>
inline void scale_row(const scalar_t* x, acc_t w, scalar_t* o, int64_t n) {
  int64_t h = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m512 wv = _mm512_set1_ps(w);
    for (; h + 16 <= n; h += 16) store16(o + h, _mm512_mul_ps(load16(x + h), wv));
  }
#endif
  for (; h < n; ++h) o[h] = static_cast<scalar_t>(static_cast<acc_t>(x[h]) * w);
}

// Rows per parallel task: enough that each task moves ~64 KiB, so scheduling cost stays negligible
// even at H = 128, and small enough that 8K-token batches split over every core.
int64_t row_grain(int64_t row_bytes) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(row_bytes, 1));
}

void check_rows(const at::Tensor& t, const char* name, const char* shape) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D ", shape, "; got shape ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), "longmoe::moe CPU kernel got ", name, " on ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating dtype; got ", t.scalar_type());
}

void check_index(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, "; got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, name, " must be int64; got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), "longmoe::moe CPU kernel got ", name, " on ", t.device());
}

// probs as a contiguous tensor of the accumulation dtype, or an undefined tensor.
at::Tensor probs_as(const std::optional<at::Tensor>& probs, int64_t tokens, int64_t top_k, at::ScalarType acc) {
  if (!probs.has_value()) return {};
  const auto& p = *probs;
  TORCH_CHECK(p.dim() == 2 && p.size(0) == tokens && p.size(1) == top_k, "probs must be (num_tokens, top_k) = (",
              tokens, ", ", top_k, "); got shape ", p.sizes());
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "probs must be a floating dtype; got ", p.scalar_type());
  TORCH_CHECK(p.device().is_cpu(), "longmoe::moe CPU kernel got probs on ", p.device());
  return p.to(acc).contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_dispatch_map_cpu(const at::Tensor& expert_ids,
                                                                    int64_t num_experts) {
  TORCH_CHECK(expert_ids.dim() == 2, "expert_ids must be 2-D (num_tokens, top_k); got shape ", expert_ids.sizes());
  TORCH_CHECK(expert_ids.scalar_type() == at::kLong || expert_ids.scalar_type() == at::kInt,
              "expert_ids must be int64 or int32; got ", expert_ids.scalar_type());
  TORCH_CHECK(expert_ids.device().is_cpu(), "longmoe::moe_dispatch_map CPU kernel got expert_ids on ",
              expert_ids.device());
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1; got ", num_experts);
  const at::Tensor ids = expert_ids.to(at::kLong).contiguous();
  const int64_t n = ids.numel(), top_k = ids.size(1), bins = num_experts + 1;  // bin E: dropped
  const int64_t* id = ids.data_ptr<int64_t>();

  // Fixed chunking (same in both passes) makes the counting sort stable: chunk c's rows of expert e
  // come after chunk c-1's.
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  auto lo = [&](int64_t c) { return c * n / nchunks; };
  std::vector<int64_t> counts(nchunks * bins, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* cnt = counts.data() + c * bins;
      for (int64_t s = lo(c); s < lo(c + 1); ++s) {
        const int64_t e = id[s];
        TORCH_CHECK(e >= -1 && e < num_experts, "expert_ids[", s / top_k, ", ", s % top_k, "]=", e,
                    " is outside [-1, num_experts=", num_experts, ") (-1 marks a dropped slot)");
        ++cnt[e < 0 ? num_experts : e];
      }
    }
  });
  at::Tensor tokens_per_expert = at::empty({num_experts}, ids.options());
  int64_t* tpe = tokens_per_expert.data_ptr<int64_t>();
  std::vector<int64_t> offset(nchunks * bins);
  int64_t base = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    int64_t total = 0;
    for (int64_t c = 0; c < nchunks; ++c) {
      offset[c * bins + e] = base + total;
      total += counts[c * bins + e];
    }
    tpe[e] = total;
    base += total;
  }
  const int64_t kept = base;
  at::Tensor row_map = at::empty({ids.size(0), top_k}, ids.options());
  at::Tensor src_slot = at::empty({kept}, ids.options());
  int64_t* rm = row_map.data_ptr<int64_t>();
  int64_t* src = src_slot.data_ptr<int64_t>();
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t* off = offset.data() + c * bins;
      for (int64_t s = lo(c); s < lo(c + 1); ++s) {
        const int64_t e = id[s];
        if (e < 0) {
          rm[s] = -1;
        } else {
          const int64_t row = off[e]++;
          rm[s] = row;
          src[row] = s;
        }
      }
    }
  });
  return {row_map, src_slot, tokens_per_expert};
}

void moe_permute_into(const at::Tensor& x, const int64_t* src_slot, int64_t rows, int64_t top_k,
                      const std::optional<at::Tensor>& probs, at::Tensor& out) {
  const at::Tensor xc = x.contiguous();
  const int64_t tokens = xc.size(0), hidden = xc.size(1), slots = tokens * top_k;
  TORCH_CHECK(out.is_contiguous() && out.size(0) >= rows && out.size(1) == hidden &&
                  out.scalar_type() == xc.scalar_type(),
              "moe_permute_into: out must be contiguous (>= ", rows, ", ", hidden, ") ", xc.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "moe_permute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor pc = probs_as(probs, tokens, top_k, c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* p = pc.defined() ? pc.data_ptr<acc_t>() : nullptr;
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(scalar_t));
    // Unweighted rows of an output over kStreamOutputBytes go out with non-temporal stores (no read of each
    // destination line first). The output gradient's permute of a bf16 layer backward (2K tokens x top-8,
    // H 1024, 32 MB): layer forward+backward 1.04-1.06x at 256 experts x 64, 1.00-1.01x at 64 x 256. The
    // gathers inside moe_grouped_mm (about 1 MB a pass, reused from cache) stay ordinary.
    const bool stream = p == nullptr && stream_rows_ok(op, row_bytes) && rows * row_bytes > kStreamOutputBytes;
    at::parallel_for(0, rows, row_grain(row_bytes), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const int64_t s = src_slot[i];
        TORCH_CHECK(s >= 0 && s < slots, "src_slot[", i, "]=", s, " is outside [0, num_tokens * top_k = ", slots, ")");
        const scalar_t* xr = xp + (s / top_k) * hidden;
        scalar_t* o = op + i * hidden;
        if (stream) {
          stream_copy_row(o, xr, row_bytes);
        } else if (p == nullptr) {
          std::memcpy(o, xr, row_bytes);
        } else {
          scale_row(xr, p[s], o, hidden);
        }
      }
      if (stream) stream_fence();
    });
  });
}

at::Tensor moe_permute_cpu(const at::Tensor& x, const at::Tensor& src_slot, int64_t top_k,
                           const std::optional<at::Tensor>& probs) {
  check_rows(x, "x", "(num_tokens, hidden)");
  check_index(src_slot, "src_slot", 1, "(num_rows,)");
  TORCH_CHECK(top_k >= 1, "top_k must be >= 1; got ", top_k);
  const at::Tensor src = src_slot.contiguous();
  at::Tensor out = at::empty({src.size(0), x.size(1)}, x.options());
  moe_permute_into(x, src.data_ptr<int64_t>(), src.size(0), top_k, probs, out);
  return out;
}

// Prefetch the rows that token t's kept slots map to (row_map row rm_t), to be called one token ahead in the
// loops that read y by row_map: the rows lie in random order, so each starts with a miss that the hardware
// prefetcher cannot foresee. bf16 unpermute of 16K rows x 1024 (2K tokens x top-8) with y out of cache (as the
// expert GEMMs leave it, non-temporal stores): 5.9 -> 3.7-4.2 ms with probs, 4.4-5.2 -> 3.3-3.9 ms without.
template <typename scalar_t>
inline void prefetch_token_rows(const scalar_t* y, const int64_t* rm_t, int64_t top_k, int64_t rows, int64_t hidden) {
  const int64_t bytes = hidden * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t j = 0; j < top_k; ++j) {
    const int64_t r = rm_t[j];
    if (r < 0 || r >= rows) continue;  // dropped, or left to the caller's bounds check
    const char* base = reinterpret_cast<const char*>(y + r * hidden);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(base + b, 0, 3);
  }
}

at::Tensor moe_unpermute_cpu(const at::Tensor& y, const at::Tensor& row_map,
                             const std::optional<at::Tensor>& probs) {
  check_rows(y, "y", "(num_rows, hidden)");
  check_index(row_map, "row_map", 2, "(num_tokens, top_k)");
  const at::Tensor yc = y.contiguous(), rmc = row_map.contiguous();
  const int64_t rows = yc.size(0), hidden = yc.size(1), tokens = rmc.size(0), top_k = rmc.size(1);
  at::Tensor out = at::empty({tokens, hidden}, yc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_unpermute", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor pc = probs_as(probs, tokens, top_k, c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* p = pc.defined() ? pc.data_ptr<acc_t>() : nullptr;
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    const int64_t* rm = rmc.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, tokens, row_grain(hidden * yc.element_size() * top_k), [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> acc(hidden);
      for (int64_t t = t0; t < t1; ++t) {
        if (t + 1 < t1) prefetch_token_rows(yp, rm + (t + 1) * top_k, top_k, rows, hidden);
        // -0.0 is the additive identity (-0 + x == x for every x, -0 included), so one kept slot with unit
        // weight reproduces its row bit for bit; a token with no kept slot is +0.
        bool any = false;
        std::fill(acc.begin(), acc.end(), acc_t(-0.0));
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rm[t * top_k + j];
          if (r < 0) continue;
          any = true;
          TORCH_CHECK(r < rows, "row_map[", t, ", ", j, "]=", r, " is outside [-1, num_rows=", rows, ")");
          const scalar_t* yr = yp + r * hidden;
          if (p == nullptr) {
            for (int64_t h = 0; h < hidden; ++h) acc[h] += static_cast<acc_t>(yr[h]);
          } else {
            const acc_t w = p[t * top_k + j];
            for (int64_t h = 0; h < hidden; ++h) acc[h] += w * static_cast<acc_t>(yr[h]);
          }
        }
        scalar_t* o = op + t * hidden;
        if (!any) std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t h = 0; h < hidden; ++h) o[h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

at::Tensor moe_unpermute_probs_grad_cpu(const at::Tensor& dout, const at::Tensor& y, const at::Tensor& row_map) {
  check_rows(dout, "dout", "(num_tokens, hidden)");
  check_rows(y, "y", "(num_rows, hidden)");
  check_index(row_map, "row_map", 2, "(num_tokens, top_k)");
  TORCH_CHECK(dout.scalar_type() == y.scalar_type(), "dout and y must share a dtype; got ", dout.scalar_type(),
              " and ", y.scalar_type());
  TORCH_CHECK(dout.size(1) == y.size(1), "dout hidden=", dout.size(1), " must equal y hidden=", y.size(1));
  TORCH_CHECK(dout.size(0) == row_map.size(0), "dout num_tokens=", dout.size(0), " must equal row_map num_tokens=",
              row_map.size(0));
  const at::Tensor dc = dout.contiguous(), yc = y.contiguous(), rmc = row_map.contiguous();
  const int64_t rows = yc.size(0), hidden = yc.size(1), tokens = rmc.size(0), top_k = rmc.size(1);
  at::Tensor dprobs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_unpermute_probs_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dprobs = at::empty({tokens, top_k}, yc.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* dp = dc.data_ptr<scalar_t>();
    const scalar_t* yp = yc.data_ptr<scalar_t>();
    const int64_t* rm = rmc.data_ptr<int64_t>();
    acc_t* gp = dprobs.data_ptr<acc_t>();
    constexpr int64_t kLanes = 8;  // independent partial sums so the dot product vectorises
    at::parallel_for(0, tokens, row_grain(hidden * yc.element_size() * top_k), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (t + 1 < t1) prefetch_token_rows(yp, rm + (t + 1) * top_k, top_k, rows, hidden);
        const scalar_t* d = dp + t * hidden;
        for (int64_t j = 0; j < top_k; ++j) {
          const int64_t r = rm[t * top_k + j];
          if (r < 0) {
            gp[t * top_k + j] = acc_t(0);
            continue;
          }
          TORCH_CHECK(r < rows, "row_map[", t, ", ", j, "]=", r, " is outside [-1, num_rows=", rows, ")");
          const scalar_t* yr = yp + r * hidden;
          acc_t part[kLanes] = {};
          int64_t h = 0;
          acc_t sum = 0;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
            sum = dot16(d, yr, hidden, h);  // h: where the vector loop stopped
          }
#endif
          for (; h + kLanes <= hidden; h += kLanes)
            for (int64_t l = 0; l < kLanes; ++l)
              part[l] += static_cast<acc_t>(d[h + l]) * static_cast<acc_t>(yr[h + l]);
          for (; h < hidden; ++h) sum += static_cast<acc_t>(d[h]) * static_cast<acc_t>(yr[h]);
          for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
          gp[t * top_k + j] = sum;
        }
      }
    });
  });
  return dprobs;
}

}  // namespace longmoe
