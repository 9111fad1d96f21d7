// bf16 attention tiles on CPUs with AVX512-BF16 (vdpbf16ps): bf16 x bf16 -> fp32 GEMMs at about twice
// the fp32 FMA rate. Same algorithm and contract as flash_attn.cpp; only the tile GEMMs differ.
//
// GEMM operands: A is bf16 row-major [M, K] (K even, zero-padded); B is "pair-packed": for every pair of
// K indices (2p, 2p+1) and column n, one 32-bit word {B[2p][n], B[2p+1][n]}, rows of Np words, which is
// the operand layout of vdpbf16ps. K and V are packed once per (batch, kv head) and reused by every query
// tile; per-tile operands (P, dS, their transposes, Q and dO pairs) are packed as they are produced.
// Like torch's CPU flash kernel, P and dS are rounded to bf16 before their GEMMs; scores, softmax
// statistics and all accumulators stay fp32.
#include "attention/attn_problem.h"

#ifdef LONGMOE_BF16_DOT

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "tile_math.h"

namespace longmoe {
namespace {

using bf16 = uint16_t;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline bf16 to_bf16(float x) {  // round to nearest even (inputs here are finite)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<bf16>(u >> 16);
}

// dst[0:npad] = bf16(src[0:n]), zero beyond n.
inline void row_to_bf16(const float* src, int64_t n, bf16* dst, int64_t npad) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + j));
    std::memcpy(dst + j, &v, 32);
  }
  for (; j < n; ++j) dst[j] = to_bf16(src[j]);
  for (; j < npad; ++j) dst[j] = 0;
}

// dst[j][i] = bf16(src[i][j]) for an [m, n] fp32 tile: dst is [n, mpad], zero in columns m..mpad.
inline void transpose_to_bf16(const float* src, int64_t lds, int64_t m, int64_t n, bf16* dst, int64_t mpad) {
  for (int64_t j = 0; j < n; ++j) {
    bf16* d = dst + j * mpad;
    for (int64_t i = 0; i < m; ++i) d[i] = to_bf16(src[i * lds + j]);
    for (int64_t i = m; i < mpad; ++i) d[i] = 0;
  }
}

// B = X^T with X [n, k] bf16 rows (stride ldx): word (p, c) = {X[c][2p], X[c][2p+1]}; zero past n / k.
void pack_cols(const bf16* X, int64_t ldx, int64_t n, int64_t k, uint32_t* dst, int64_t np) {
  const int64_t kp2 = (k + 1) / 2;
  for (int64_t p = 0; p < kp2; ++p) {
    uint32_t* d = dst + p * np;
    const bool full = 2 * p + 1 < k;
    for (int64_t c = 0; c < n; ++c) {
      const bf16* x = X + c * ldx + 2 * p;
      d[c] = full ? (static_cast<uint32_t>(x[0]) | (static_cast<uint32_t>(x[1]) << 16)) : x[0];
    }
    std::fill(d + n, d + np, 0u);
  }
}

// B = rows of X [k, n] bf16 (stride ldx): word (p, c) = {X[2p][c], X[2p+1][c]}; zero past k / n.
void pack_rows(const bf16* X, int64_t ldx, int64_t k, int64_t n, uint32_t* dst, int64_t np) {
  const int64_t kp2 = (k + 1) / 2;
  for (int64_t p = 0; p < kp2; ++p) {
    uint32_t* d = dst + p * np;
    const bf16* x0 = X + (2 * p) * ldx;
    const bf16* x1 = 2 * p + 1 < k ? x0 + ldx : nullptr;
    if (x1 != nullptr) {
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) d[c] = static_cast<uint32_t>(x0[c]) | (static_cast<uint32_t>(x1[c]) << 16);
    } else {
      for (int64_t c = 0; c < n; ++c) d[c] = x0[c];
    }
    std::fill(d + n, d + np, 0u);
  }
}

// C[MR, ncols<=32] (=|+=) alpha * A[MR, 2*kp2] B[2*kp2, 32 cols of the pair-packed panel].
template <int MR>
inline void ukernel(int64_t kp2, const bf16* A, int64_t lda, const uint32_t* B, int64_t np, float* C,
                    int64_t ldc, int ncols, float alpha, bool accumulate) {
  __m512 c0[MR], c1[MR];
  for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kp2; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + p * np);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + p * np + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      uint32_t w;
      std::memcpy(&w, A + m * lda + 2 * p, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(w));
      c0[m] = _mm512_dpbf16_ps(c0[m], a, b0);
      c1[m] = _mm512_dpbf16_ps(c1[m], a, b1);
    }
  }
  const __mmask16 k0 = ncols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << ncols) - 1);
  const __mmask16 k1 = ncols >= 32 ? 0xFFFF : (ncols > 16 ? static_cast<__mmask16>((1u << (ncols - 16)) - 1) : 0);
  const __m512 va = _mm512_set1_ps(alpha);
  for (int m = 0; m < MR; ++m) {
    float* cr = C + m * ldc;
    __m512 v0 = _mm512_mul_ps(c0[m], va), v1 = _mm512_mul_ps(c1[m], va);
    if (accumulate) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, cr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, k0, v0);
    _mm512_mask_storeu_ps(cr + 16, k1, v1);
  }
}

// C[M, N] (=|+=) alpha * A[M, 2*kp2] B, B pair-packed with rows of np words.
void gemm_bf16(int64_t M, int64_t N, int64_t kp2, const bf16* A, int64_t lda, const uint32_t* B, int64_t np,
               float* C, int64_t ldc, float alpha, bool accumulate) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    const int nc = static_cast<int>(std::min<int64_t>(32, N - n0));
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8)
      ukernel<8>(kp2, A + m0 * lda, lda, B + n0, np, C + m0 * ldc + n0, ldc, nc, alpha, accumulate);
    const bf16* a = A + m0 * lda;
    float* c = C + m0 * ldc + n0;
    switch (M - m0) {
      case 7: ukernel<7>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 6: ukernel<6>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 5: ukernel<5>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 4: ukernel<4>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 3: ukernel<3>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 2: ukernel<2>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      case 1: ukernel<1>(kp2, a, lda, B + n0, np, c, ldc, nc, alpha, accumulate); break;
      default: break;
    }
  }
}

const bf16* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

// Pair-packed K^T / V^T (pack_cols: [D/2, SkP] per (b, hk)) or K / V rows (pack_rows: [SkE/2, Dp] per (b, hk)).
struct Packed {
  at::Tensor buf;
  int64_t rows, np;  // words per (b, hk) slab = rows * np
  const uint32_t* slab(int64_t b, int64_t hk, int64_t hkv) const {
    return reinterpret_cast<const uint32_t*>(buf.data_ptr<int32_t>()) + (b * hkv + hk) * rows * np;
  }
};

Packed pack_heads(const Problem& p, const at::Tensor& x, bool transpose) {
  Packed out;
  if (transpose) {
    out.rows = p.D / 2;
    out.np = round_up(p.Sk, 32);
  } else {
    out.rows = round_up(p.Sk, 2) / 2;
    out.np = round_up(p.D, 32);
  }
  out.buf = at::empty({p.B * p.Hkv * out.rows * out.np}, x.options().dtype(at::kInt));
  const bf16* xd = bf16_ptr(x);
  const Strides xs(x);
  uint32_t* base = reinterpret_cast<uint32_t*>(out.buf.data_ptr<int32_t>());
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / p.Hkv, hk = i % p.Hkv;
      const bf16* src = xd + b * xs.b + hk * xs.h;
      uint32_t* dst = base + i * out.rows * out.np;
      if (transpose) {
        pack_cols(src, xs.s, p.Sk, p.D, dst, out.np);
      } else {
        pack_rows(src, xs.s, p.Sk, p.D, dst, out.np);
      }
    }
  });
  return out;
}

}  // namespace

template <typename out_t>
void forward_bf16_dot(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse) {
  const Packed kt = pack_heads(p, k, /*transpose=*/true);
  const Packed vr = pack_heads(p, v, /*transpose=*/false);
  const bf16* qd = bf16_ptr(q);
  const Strides qs(q);
  const int64_t D = p.D, bq = p.bq, bk = p.bk, bke = round_up(bk, 2);
  struct Scratch {
    std::vector<float> sbuf;
    std::vector<bf16> pb;
    const bf16* Q = nullptr;
  };
  forward_query_tiles<out_t>(
      p, out, lse, [&] { return Scratch{std::vector<float>(bq * bk), std::vector<bf16>(bq * bke)}; },
      [&](Scratch& s, const QueryTile& t) { s.Q = qd + t.b * qs.b + t.q0 * qs.s + t.h * qs.h; },
      [&](Scratch& s, const QueryTile& t, int64_t k0, int64_t nk) {
        const int64_t nke = round_up(nk, 2);
        float* S = s.sbuf.data();
        gemm_bf16(t.mq, nk, D / 2, s.Q, qs.s, kt.slab(t.b, t.hk, p.Hkv) + k0, kt.np, S, nk, p.scale, false);
        for (int64_t i = 0; i < t.mq; ++i) {
          float* row = S + i * nk;
          online_softmax_row(row, p.visible(t.q0 + i, k0, nk), nk, t.m[i], t.l[i], t.acc + i * D, D);
          row_to_bf16(row, nk, s.pb.data() + i * nke, nke);
        }
        gemm_bf16(t.mq, D, nke / 2, s.pb.data(), nke, vr.slab(t.b, t.hk, p.Hkv) + (k0 / 2) * vr.np, vr.np, t.acc,
                  D, 1.f, true);
      });
}

template <typename grad_t>
void backward_bf16_dot(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& delta, const at::Tensor& lse,
                       at::Tensor& dq, at::Tensor& dk_acc, at::Tensor& dv_acc) {
  const Packed kt = pack_heads(p, k, /*transpose=*/true);   // S = Q K^T
  const Packed vt = pack_heads(p, v, /*transpose=*/true);   // dP = dO V^T
  const Packed kr = pack_heads(p, k, /*transpose=*/false);  // dQ += dS K
  const bf16* dod = bf16_ptr(dout);
  const bf16* qd = bf16_ptr(q);
  const bool have_delta = delta.defined();
  const at::BFloat16* od = have_delta ? nullptr : out.data_ptr<at::BFloat16>();
  const float* deltad = have_delta ? delta.data_ptr<float>() : nullptr;
  const int64_t dl_b = have_delta ? delta.stride(0) : 0, dl_h = have_delta ? delta.stride(1) : 0;
  const int64_t dl_s = have_delta ? delta.stride(2) : 0;
  const float* lsed = lse.data_ptr<float>();
  const int64_t lse_b = lse.stride(0), lse_h = lse.stride(1), lse_s = lse.stride(2);
  grad_t* dqd = dq.data_ptr<grad_t>();
  float* dkd = dk_acc.data_ptr<float>();
  float* dvd = dv_acc.data_ptr<float>();
  const Strides dos(dout), qs(q), os(have_delta ? dout : out), dqs(dq);
  const int64_t D = p.D, bq = p.bq, bk = p.bk, bqe = round_up(bq, 2), bke = round_up(bk, 2);
  const int64_t dp = round_up(D, 32);

  const WorkQueue work(head_costs(p));
  at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> pbuf(bq * bk), dpbuf(bq * bk), dqacc(bq * D), lrow(bq), drow(bq);
    std::vector<bf16> pt(bk * bqe), ds(bq * bke), dst(bk * bqe);
    std::vector<uint32_t> qr(bqe / 2 * dp), dor(bqe / 2 * dp);
    for (int64_t item; work.next(item);) {
      const int64_t h = item % p.Hq, b = item / p.Hq, hk = h / p.q_per_kv;
      float* dK = dkd + item * p.Sk * D;
      float* dV = dvd + item * p.Sk * D;
      const uint32_t* KT = kt.slab(b, hk, p.Hkv);
      const uint32_t* VT = vt.slab(b, hk, p.Hkv);
      const uint32_t* KR = kr.slab(b, hk, p.Hkv);
      for (int64_t q0 = 0; q0 < p.Sq; q0 += bq) {
        const int64_t mq = std::min(bq, p.Sq - q0), mqe = round_up(mq, 2);
        const bf16* Q = qd + b * qs.b + q0 * qs.s + h * qs.h;
        const bf16* dO = dod + b * dos.b + q0 * dos.s + h * dos.h;
        pack_rows(Q, qs.s, mq, D, qr.data(), dp);
        pack_rows(dO, dos.s, mq, D, dor.data(), dp);
        for (int64_t i = 0; i < mq; ++i) {
          lrow[i] = lsed[b * lse_b + h * lse_h + (q0 + i) * lse_s];
          if (have_delta) {
            drow[i] = deltad[b * dl_b + h * dl_h + (q0 + i) * dl_s];
            continue;
          }
          const at::BFloat16* o = od + b * os.b + (q0 + i) * os.s + h * os.h;
          const at::BFloat16* g = reinterpret_cast<const at::BFloat16*>(dO + i * dos.s);
          float dsum = 0.f;
#pragma omp simd reduction(+ : dsum)
          for (int64_t d = 0; d < D; ++d) dsum += static_cast<float>(g[d]) * static_cast<float>(o[d]);
          drow[i] = dsum;
        }
        std::fill(dqacc.begin(), dqacc.end(), 0.f);
        const int64_t kv_end = p.kv_end(q0, mq);
        for (int64_t k0 = 0; k0 < kv_end; k0 += bk) {
          if (!p.tile_on(b, h, q0, k0)) continue;
          const int64_t nk = std::min(bk, kv_end - k0), nke = round_up(nk, 2);
          float* P = pbuf.data();
          float* dP = dpbuf.data();
          gemm_bf16(mq, nk, D / 2, Q, qs.s, KT + k0, kt.np, P, nk, p.scale, false);
          recompute_probs(p, P, mq, nk, lrow.data(), q0, k0);
          transpose_to_bf16(P, nk, mq, nk, pt.data(), mqe);
          gemm_bf16(nk, D, mqe / 2, pt.data(), mqe, dor.data(), dp, dV + k0 * D, D, 1.f, true);  // dV += P^T dO
          gemm_bf16(mq, nk, D / 2, dO, dos.s, VT + k0, vt.np, dP, nk, 1.f, false);             // dP = dO V^T
          for (int64_t i = 0; i < mq; ++i) {
            float* r = dP + i * nk;
            const float* pr = P + i * nk;
            const float di = drow[i];
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) r[j] = pr[j] * (r[j] - di);  // dS = P * (dP - D)
            row_to_bf16(r, nk, ds.data() + i * nke, nke);
          }
          transpose_to_bf16(dP, nk, mq, nk, dst.data(), mqe);
          gemm_bf16(mq, D, nke / 2, ds.data(), nke, KR + (k0 / 2) * kr.np, kr.np, dqacc.data(), D, p.scale, true);
          gemm_bf16(nk, D, mqe / 2, dst.data(), mqe, qr.data(), dp, dK + k0 * D, D, p.scale, true);
        }
        store_rows(dqacc.data(), D, mq, D, dqd + b * dqs.b + q0 * dqs.s + h * dqs.h, dqs.s);
      }
    }
  });
}

template void forward_bf16_dot<float>(const Problem&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      at::Tensor&, at::Tensor&);
template void forward_bf16_dot<at::BFloat16>(const Problem&, const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_bf16_dot<float>(const Problem&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                       at::Tensor&, at::Tensor&, at::Tensor&);
template void backward_bf16_dot<at::BFloat16>(const Problem&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                              at::Tensor&);

}  // namespace longmoe

#endif  // LONGMOE_BF16_DOT
