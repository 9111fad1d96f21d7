// Small building blocks shared by longmoe's CPU kernels: a row-major GEMM over the BLAS that torch
// ships (MKL or OpenBLAS, found at load time), a vectorisable exp, and tile loaders that turn any
// floating dtype into fp32 rows.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>

extern "C" {
// Fortran BLAS sgemm. torch's CPU wheels export it from libtorch_cpu (MKL); declared weak so the
// extension still loads against a torch without it, and falls back to the loops below.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
}

namespace longmoe {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline bool have_blas() { return sgemm_ != nullptr; }

// Row-major C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C.
// trans_a: A is stored [K,M]; trans_b: B is stored [N,K]. Leading dimensions are row strides.
inline void gemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                    const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                    int64_t ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && K > 0) {
    // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    sgemm_(&ta, &tb, &m, &n, &k, &alpha, B, &la, A, &lb, &beta, C, &lc);
    return;
  }
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      std::fill(c, c + N, 0.f);
    } else if (beta != 1.f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
    for (int64_t p = 0; p < K; ++p) {
      const float a = alpha * (trans_a ? A[p * lda + i] : A[i * lda + p]);
      if (!trans_b) {
        const float* b = B + p * ldb;
#pragma omp simd
        for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
      } else {
        for (int64_t j = 0; j < N; ++j) c[j] += a * B[j * ldb + p];
      }
    }
  }
}

// exp(x) for x <= 0 to ~2 ulp, branch-free so GCC vectorises loops over it; returns 0 for x < -87
// (and for -inf), where expf would be denormal or 0 anyway.
inline float exp_nonpos(float x) {
  const bool tiny = x < -87.0f;
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;  // ln2 split in a high part exact in fp32 ...
  r = r + n * 2.12194440e-4f;      // ... and the low remainder (Cephes)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.f : p * scale;
}

#if defined(__AVX512F__)
// The AVX-512 helpers below use the zero-masked forms of max/roundscale/scalef/extract: GCC 12's unmasked
// forms start from _mm512_undefined_ps and flood the build with -Wmaybe-uninitialized.
constexpr __mmask16 kAll16 = 0xFFFF;

// The 16 lanes of v combined by op (lane-wise on __m128: add or max) as a tree over 128-bit quarters,
// (q0 op q1) op (q2 op q3), then within the quarter. (A 16-term sequential sum through memory took 13% of the
// AMX attention forward's own time: one per row and key tile.)
template <typename Op>
inline float reduce16(__m512 v, Op op) {
  const __m128 a = op(_mm512_maskz_extractf32x4_ps(0xF, v, 0), _mm512_maskz_extractf32x4_ps(0xF, v, 1));
  const __m128 b = op(_mm512_maskz_extractf32x4_ps(0xF, v, 2), _mm512_maskz_extractf32x4_ps(0xF, v, 3));
  __m128 s = op(a, b);
  s = op(s, _mm_movehl_ps(s, s));
  s = op(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float reduce_add16(__m512 v) {
  return reduce16(v, [](__m128 a, __m128 b) { return _mm_add_ps(a, b); });
}

inline float reduce_max16(__m512 v) {
  return reduce16(v, [](__m128 a, __m128 b) { return _mm_max_ps(a, b); });
}

// exp_nonpos on 16 lanes: the same range reduction and polynomial, in AVX-512 instructions (GCC compiles
// loops over exp_nonpos into masked 8-lane code, which profiled as 1.5x the GEMM time of a bf16 forward).
inline __m512 exp_nonpos16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_maskz_max_ps(kAll16, x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_maskz_roundscale_ps(kAll16, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 q = _mm512_set1_ps(1.9875691500e-4f);
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.3981999507e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(8.3334519073e-3f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(4.1665795894e-2f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.6666665459e-1f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(5.0000001201e-1f));
  q = _mm512_fmadd_ps(_mm512_mul_ps(q, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), q, n);
}

// 16 fp32 lanes of a bf16 or fp32 vector.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll16, _mm512_maskz_cvtepu16_epi32(kAll16, bits), 16));
}

// Stores 16 fp32 lanes as fp32, or as bf16 with c10's own rounding: round to nearest even on the bits, NaN ->
// 0x7FC0, no denormal flush (the AVX512-BF16 conversion flushes denormals), so bit for bit what
// static_cast<at::BFloat16> gives.
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll16, u, 16), _mm512_set1_epi32(1));
  const __m512i bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_maskz_srli_epi32(kAll16, _mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(kAll16, r));
}
#endif

// max(x[0:n]) (-inf when n == 0), for finite inputs. Written with vector max instructions because GCC leaves
// `#pragma omp simd reduction(max : m)` over std::max scalar (a loop-carried vmaxss chain): profiled as 28%
// of a bf16 attention forward.
inline float row_max(const float* x, int64_t n) {
  float mx = kNegInf;
  int64_t j = 0;
#if defined(__AVX512F__)
  __m512 v = _mm512_set1_ps(kNegInf);
  for (; j + 16 <= n; j += 16) v = _mm512_maskz_max_ps(kAll16, v, _mm512_loadu_ps(x + j));
  mx = reduce_max16(v);
#elif defined(__AVX2__)
  __m256 v = _mm256_set1_ps(kNegInf);
  for (; j + 8 <= n; j += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + j));
  alignas(32) float t[8];
  _mm256_store_ps(t, v);
  for (float y : t) mx = std::max(mx, y);
#endif
  for (; j < n; ++j) mx = std::max(mx, x[j]);
  return mx;
}

// row[j] = exp((row[j] - m) * mult) for j < n, in place, with m >= max(row[0:n]) and mult > 0; returns the
// sum of the new values.
inline float exp_shifted_inplace(float* row, int64_t n, float m, float mult) {
  float sum = 0.f;
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vm = _mm512_set1_ps(m), vk = _mm512_set1_ps(mult);
  __m512 vsum = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp_nonpos16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(row + j), vm), vk));
    _mm512_storeu_ps(row + j, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  sum = reduce_add16(vsum);
#endif
  for (; j < n; ++j) {
    const float e = exp_nonpos((row[j] - m) * mult);
    row[j] = e;
    sum += e;
  }
  return sum;
}

// The end of one row's online-softmax step over a key tile whose probabilities exp(s - m_new) sum to `sum`:
// the running max m and sum l move to m_new, and the output accumulator row acc[0:D] is rescaled by
// exp(m_old - m_new).
inline void advance_running_row(float m_new, float sum, float& m, float& l, float* acc, int64_t D) {
  const float corr = exp_nonpos(m - m_new);
  l = l * corr + sum;
  m = m_new;
  if (corr != 1.f) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] *= corr;
  }
}

// One query row of the online softmax over a key tile: scores row[0:vis] become exp(s - m_new) in place
// (row[vis:nk] = 0), the running max m and sum l are updated, and the output accumulator row acc[0:D] is
// rescaled by exp(m_old - m_new). A row with no visible key in this tile is left unchanged.
inline void online_softmax_row(float* row, int64_t vis, int64_t nk, float& m, float& l, float* acc, int64_t D) {
  const float m_new = std::max(m, row_max(row, vis));
  const float sum = vis > 0 ? exp_shifted_inplace(row, vis, m_new, 1.f) : 0.f;
  std::fill(row + vis, row + nk, 0.f);
  if (vis > 0) advance_running_row(m_new, sum, m, l, acc, D);
}

// The end of a query tile: acc rows divided by their sums, lse = m + log(l); rows that saw no key get 0
// and -inf. acc is [mq, D], m/l/lse_out have mq entries.
inline void finish_rows(float* acc, int64_t mq, int64_t D, const float* m, const float* l, float* lse_out) {
  for (int64_t i = 0; i < mq; ++i) {
    float* a = acc + i * D;
    if (l[i] > 0.f) {
      const float inv = 1.f / l[i];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] *= inv;
      lse_out[i] = m[i] + std::log(l[i]);
    } else {
      std::fill(a, a + D, 0.f);
      lse_out[i] = kNegInf;
    }
  }
}

// A [rows, cols] fp32 view of rows [r0, r0+rows) of one head of a (B, S, H, D) tensor: the tensor's
// memory when it already is fp32 with a unit inner stride, otherwise a converted copy in `buf`.
template <typename scalar_t>
inline const float* load_rows(const scalar_t* base, int64_t row_stride, int64_t rows, int64_t cols,
                              float* buf, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    *ld = row_stride;
    return base;
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* src = base + r * row_stride;
      float* dst = buf + r * cols;
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) dst[c] = static_cast<float>(src[c]);
    }
    *ld = cols;
    return buf;
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// dst[r * ldd + c] = bf16(src[r * lds + c]), round to nearest even, denormals
// flushed to zero (AVX512-BF16 conversions).
inline void store_bf16(const float* src, int64_t lds, int64_t R, int64_t C, at::BFloat16* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) {
    const float* s = src + r * lds;
    at::BFloat16* d = dst + r * ldd;
    for (int64_t c = 0; c < C; c += 16) {
      const int64_t n = std::min<int64_t>(16, C - c);
      const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, s + c));
      __m256i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm256_mask_storeu_epi16(d + c, m, bits);
    }
  }
}

// store_bf16 with non-temporal stores (no read-for-ownership of the destination lines, which go to memory instead
// of the cache), for outputs far larger than the L2 that nothing reads soon from cache. Needs C % 16 == 0 and
// every destination row 32-byte aligned (stream_rows_ok below checks whole lines); the caller issues
// stream_fence() before other threads read dst.
inline void store_bf16_stream(const float* src, int64_t lds, int64_t R, int64_t C, at::BFloat16* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) {
    const float* s = src + r * lds;
    at::BFloat16* d = dst + r * ldd;
    for (int64_t c = 0; c < C; c += 16) {
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(s + c));
      __m256i bits;
      std::memcpy(&bits, &v, sizeof(bits));
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + c), bits);
    }
  }
}
#endif

// Non-temporal row copies (for outputs far larger than the L2): stream_rows_ok(dst, row_bytes) says whether rows
// of row_bytes from dst on are whole 64-byte aligned lines (and the CPU path exists); stream_copy_row copies one
// such row; stream_fence() orders a thread's streamed stores before others read them.
inline bool stream_rows_ok(const void* dst, int64_t row_bytes) {
#if defined(__AVX512F__)
  return row_bytes % 64 == 0 && reinterpret_cast<uintptr_t>(dst) % 64 == 0;
#else
  (void)dst;
  (void)row_bytes;
  return false;
#endif
}

inline void stream_copy_row(void* dst, const void* src, int64_t row_bytes) {
#if defined(__AVX512F__)
  for (int64_t b = 0; b < row_bytes; b += 64)
    _mm512_stream_si512(reinterpret_cast<__m512i*>(static_cast<char*>(dst) + b),
                        _mm512_loadu_si512(static_cast<const char*>(src) + b));
#else
  std::memcpy(dst, src, row_bytes);
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

template <typename scalar_t>
inline void store_rows(const float* src, int64_t ld_src, int64_t rows, int64_t cols, scalar_t* dst,
                       int64_t row_stride) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  // GCC compiles the loop below for bf16 as scalar conversions with a NaN test each (9% of a bf16 attention
  // forward).
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    store_bf16(src, ld_src, rows, cols, dst, row_stride);
    return;
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = src + r * ld_src;
    scalar_t* d = dst + r * row_stride;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<scalar_t>(s[c]);
  }
}

}  // namespace longmoe
