// The row-wise part of the backward of the experts' second GEMM fused with the weighted combine
// (longmoe.moe.experts._LinearUnpermuteFunction), one pass over the (rows, ffn) operands:
//   u (N, F) = G_e @ w2[e] (G the unweighted permuted output gradient), a (N, F) the activations, p (N) the
//   routing weight of each row ->  da = p * u,  pa = p * a (both in u's dtype, rounded once),
//   dot (N) = <u, a> in fp32 (fp64 for fp64 inputs), the row's routing-weight gradient.
//
// Why: the PyTorch composition makes five passes, and for bf16 three of them through fp32 copies (a bf16 tensor
// times fp32 weights promotes to fp32): at 8 experts top-2, 2K tokens, F 2816, bf16 that made the layer's
// forward+backward 11% slower than keeping y and taking <dout, y>, where this pass makes it no slower.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <tuple>

#include "moe/moe_dispatch.h"
#include "tile_math.h"

namespace longmoe {
namespace {

template <typename T, typename acc_t>
void scale_rows_dot(const T* u, const T* a, const acc_t* p, int64_t N, int64_t F, T* da, T* pa, acc_t* dot) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* ur = u + r * F;
      const T* ar = a + r * F;
      T* dr = da + r * F;
      T* pr = pa + r * F;
      const acc_t w = p[r];
      acc_t s = 0;
      int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, at::BFloat16>) {
        const __m512 wv = _mm512_set1_ps(w);
        __m512 acc = _mm512_setzero_ps();
        for (; j + 16 <= F; j += 16) {
          const __m512 uv = load16(ur + j), av = load16(ar + j);
          store16(dr + j, _mm512_mul_ps(uv, wv));
          store16(pr + j, _mm512_mul_ps(av, wv));
          acc = _mm512_fmadd_ps(uv, av, acc);
        }
        s = reduce_add16(acc);
      }
#endif
      for (; j < F; ++j) {
        const acc_t uv = static_cast<acc_t>(ur[j]), av = static_cast<acc_t>(ar[j]);
        dr[j] = static_cast<T>(uv * w);
        pr[j] = static_cast<T>(av * w);
        s += uv * av;
      }
      dot[r] = s;
    }
  });
}

template <typename T>
void run(const at::Tensor& u, const at::Tensor& a, const at::Tensor& p, at::Tensor& da, at::Tensor& pa,
         at::Tensor& dot) {
  using acc_t = at::opmath_type<T>;
  scale_rows_dot<T, acc_t>(u.data_ptr<T>(), a.data_ptr<T>(), p.data_ptr<acc_t>(), u.size(0), u.size(1),
                           da.data_ptr<T>(), pa.data_ptr<T>(), dot.data_ptr<acc_t>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_scale_rows_dot_cpu(const at::Tensor& u, const at::Tensor& a,
                                                                      const at::Tensor& p) {
  TORCH_CHECK(u.device().is_cpu() && a.device().is_cpu() && p.device().is_cpu(),
              "moe_scale_rows_dot: u, a and p must be CPU tensors; got ", u.device(), ", ", a.device(), ", ",
              p.device());
  TORCH_CHECK(u.dim() == 2 && a.sizes() == u.sizes(), "moe_scale_rows_dot: u and a must be (rows, ffn) alike; got ",
              u.sizes(), " and ", a.sizes());
  TORCH_CHECK(a.scalar_type() == u.scalar_type(), "moe_scale_rows_dot: a must be ", u.scalar_type(), " as u; got ",
              a.scalar_type());
  const at::ScalarType st = u.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf || st == at::kDouble,
              "moe_scale_rows_dot: u must be a floating dtype; got ", st);
  const at::ScalarType acc = st == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(p.dim() == 1 && p.size(0) == u.size(0) && p.scalar_type() == acc, "moe_scale_rows_dot: p must be (rows=",
              u.size(0), ",) ", acc, "; got ", p.sizes(), " ", p.scalar_type());
  const at::Tensor uc = u.contiguous(), ac = a.contiguous(), pc = p.contiguous();
  at::Tensor da = at::empty_like(uc), pa = at::empty_like(uc), dot = at::empty({u.size(0)}, pc.options());
  if (st == at::kFloat) {
    run<float>(uc, ac, pc, da, pa, dot);
  } else if (st == at::kBFloat16) {
    run<at::BFloat16>(uc, ac, pc, da, pa, dot);
  } else if (st == at::kHalf) {
    run<at::Half>(uc, ac, pc, da, pa, dot);
  } else {
    run<double>(uc, ac, pc, da, pa, dot);
  }
  return {da, pa, dot};
}

}  // namespace longmoe
