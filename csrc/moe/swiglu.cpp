// SwiGLU of the MoE experts on CPU, forward and backward, one pass over the rows each:
//   forward:  h = [gate | up] (rows, 2F) -> a (rows, F), a = silu(gate) * up
//   backward: da (rows, F), h -> dh (rows, 2F), d up = da * silu(gate), d gate = da * up * s * (1 + gate * (1 - s))
// with s = sigmoid(gate) = 1 / (1 + e) for gate >= 0 and e / (1 + e) otherwise, e = exp(-|gate|) <= 1, so
// neither sign overflows. fp32 and bf16 (loaded into fp32, results rounded once with c10's rounding); other
// dtypes take the PyTorch expression (longmoe.moe.experts.SwiGLUFunction).
//
// Why: PyTorch's composition makes several passes over (rows, F) tensors, two of them strided (the halves of h):
// the forward silu(gate), then the product; the backward silu(gate) again, da * up, silu_backward and the
// product. At 8K tokens x top-8 and F 256 (65K rows, 128 MB of fp32 h) that took 38 ms forward and 104 ms
// backward on one core of a 2-core AVX-512 Xeon VM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "moe/moe_dispatch.h"
#include "tile_math.h"

namespace longmoe {
namespace {

inline float sigmoid1(float g) {
  const float e = exp_nonpos(-std::fabs(g));
  const float inv = 1.0f / (1.0f + e);
  return g < 0.0f ? e * inv : inv;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
inline __m512 sigmoid16(__m512 g) {
  const __m512 neg_abs =  // -|g|: the sign bit set
      _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
  const __m512 e = exp_nonpos16(neg_abs);
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
  return _mm512_mask_mul_ps(inv, _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), inv, e);
}
#endif

// a[r, j] for rows [r0, r1); h rows at stride 2F, a at stride F.
template <typename T>
void forward_rows(const T* h, T* a, int64_t F, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gate = h + r * 2 * F;
    const T* up = gate + F;
    T* out = a + r * F;
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    for (; j + 16 <= F; j += 16) {
      const __m512 g = load16(gate + j);
      store16(out + j, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), load16(up + j)));
    }
#endif
    for (; j < F; ++j) {
      const float g = static_cast<float>(gate[j]);
      out[j] = static_cast<T>(g * sigmoid1(g) * static_cast<float>(up[j]));
    }
  }
}

template <typename T>
void backward_rows(const T* da, const T* h, T* dh, int64_t F, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gate = h + r * 2 * F;
    const T* up = gate + F;
    const T* d = da + r * F;
    T* dgate = dh + r * 2 * F;
    T* dup = dgate + F;
    int64_t j = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; j + 16 <= F; j += 16) {
      const __m512 g = load16(gate + j), u = load16(up + j), dv = load16(d + j);
      const __m512 s = sigmoid16(g);
      store16(dup + j, _mm512_mul_ps(dv, _mm512_mul_ps(g, s)));
      const __m512 ds = _mm512_mul_ps(s, _mm512_fmadd_ps(g, _mm512_sub_ps(one, s), one));  // s (1 + g (1 - s))
      store16(dgate + j, _mm512_mul_ps(_mm512_mul_ps(dv, u), ds));
    }
#endif
    for (; j < F; ++j) {
      const float g = static_cast<float>(gate[j]), u = static_cast<float>(up[j]), dv = static_cast<float>(d[j]);
      const float s = sigmoid1(g);
      dup[j] = static_cast<T>(dv * (g * s));
      dgate[j] = static_cast<T>((dv * u) * (s * (1.0f + g * (1.0f - s))));
    }
  }
}

void check_h(const at::Tensor& h) {
  TORCH_CHECK(h.device().is_cpu(), "swiglu: h must be a CPU tensor; got ", h.device());
  TORCH_CHECK(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu: h must be (rows, 2 * ffn) with an even width; got shape ",
              h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16,
              "swiglu: h must be float32 or bfloat16; got ", h.scalar_type());
}

// Rows per parallel task: ~16K elements of a (64 KB of fp32), so 8K-token batches split over every core.
int64_t grain(int64_t F) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(F, 1)); }

template <typename T>
void run_forward(const T* h, T* a, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, grain(F), [&](int64_t r0, int64_t r1) { forward_rows(h, a, F, r0, r1); });
}

template <typename T>
void run_backward(const T* da, const T* h, T* dh, int64_t rows, int64_t F) {
  at::parallel_for(0, rows, grain(F), [&](int64_t r0, int64_t r1) { backward_rows(da, h, dh, F, r0, r1); });
}

}  // namespace

at::Tensor swiglu_cpu(const at::Tensor& h) {
  check_h(h);
  const at::Tensor hc = h.contiguous();
  const int64_t rows = hc.size(0), F = hc.size(1) / 2;
  at::Tensor a = at::empty({rows, F}, hc.options());
  if (hc.scalar_type() == at::kFloat) {
    run_forward(hc.data_ptr<float>(), a.data_ptr<float>(), rows, F);
  } else {
    run_forward(hc.data_ptr<at::BFloat16>(), a.data_ptr<at::BFloat16>(), rows, F);
  }
  return a;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& da, const at::Tensor& h) {
  check_h(h);
  const int64_t rows = h.size(0), F = h.size(1) / 2;
  TORCH_CHECK(da.dim() == 2 && da.size(0) == rows && da.size(1) == F, "swiglu_backward: da must be (rows=", rows,
              ", ffn=", F, "); got shape ", da.sizes());
  TORCH_CHECK(da.scalar_type() == h.scalar_type(), "swiglu_backward: da must be ", h.scalar_type(), " as h; got ",
              da.scalar_type());
  TORCH_CHECK(da.device().is_cpu(), "swiglu_backward: da must be a CPU tensor; got ", da.device());
  const at::Tensor hc = h.contiguous(), dc = da.contiguous();
  at::Tensor dh = at::empty({rows, 2 * F}, hc.options());
  if (hc.scalar_type() == at::kFloat) {
    run_backward(dc.data_ptr<float>(), hc.data_ptr<float>(), dh.data_ptr<float>(), rows, F);
  } else {
    run_backward(dc.data_ptr<at::BFloat16>(), hc.data_ptr<at::BFloat16>(), dh.data_ptr<at::BFloat16>(), rows, F);
  }
  return dh;
}

}  // namespace longmoe
