// XAttention (arXiv 2503.16428) antidiagonal block scores on CPU.
//
// With stride S, key group j is K_r[j] = concat_i K[jS+i] and query group r is the reversed
// Q_r[r] = concat_i Q[rS+S-1-i] (rows past the sequence are zero), so Q_r[r] . K_r[j] is the antidiagonal
// sum of the S x S tile (r, j) of q k^T. Scores are scaled by softmax_scale / S (default 1/(sqrt(d) S)); key group j is visible to
// query group r iff jS < Lk and, when causal, jS <= q_offset + rS + S - 1. Each query group's row is
// softmax-normalised in fp32 over its visible key groups (a row with none contributes 0), the
// (block/S) x (block/S) sub-grids are summed, and each block row is divided by its number of real query
// groups (rS < Lq). This is longmoe.attention.xattention's reference `blocks` before GQA averaging.
//
// Work split: K is regrouped once per (batch, kv head) into contiguous fp32 rows of S*D (any input dtype;
// one fp32 copy of K, small next to the L^2 D / S product). Then one task per (batch, q head, chunk of
// query blocks) gathers the chunk's reversed query groups into an fp32 [M, S*D] buffer, multiplies it
// against the visible key groups with one sgemm ([M, S*D] x [S*D, visible]), and runs a two-pass softmax
// per row, adding each row's per-key-block sums into its query block's scores.
// GQA/MQA index the kv head h / (Hq / Hkv); K is never repeated per query head.
//
// bf16 inputs on a CPU where oneDNN's micro-kernels run bf16 (brgemm_bf16_available(): AMX, or AVX512-BF16)
// stay bf16: K is regrouped straight into the micro-kernel's packed layout (blocks of 256 key groups), the
// reversed query groups are copied as bf16, and the scores GEMM runs as bf16 x bf16 -> fp32 brgemm calls; the
// softmax scale is applied in the exp. Products of bf16 values are exact in fp32 and sums are fp32 on both
// paths. (AVX512-BF16 dot products were tried for this GEMM and ran slower than the fp32 path on an AMX CPU.)
// On a Zen 5 core (AVX512-BF16, no AMX; one thread, causal, 8 heads x D 128, stride 8) the brgemm path took
// 30 / 96 ms at 8K / 16K against 112 / 389 ms on the fp32 path.
#include "xattention/antidiag.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "attention/attn_problem.h"
#include "tile_math.h"
#include "vnni_pack.h"

namespace longmoe {
namespace {

// Number of key groups visible to query group r: jS < Lk (j < nkg) and, causal, jS <= last, where last is
// the group's last query position.
inline int64_t visible_groups(int64_t r, int64_t S, int64_t nkg, bool causal, int64_t q_offset) {
  if (!causal) return nkg;
  const int64_t last = q_offset + r * S + S - 1;
  if (last < 0) return 0;
  return std::min(last / S + 1, nkg);
}

// Query groups per GEMM (see block_scores_impl).
constexpr int64_t kRowsPerGemm = 64;
// AMX GEMMs take the key groups in blocks of kAmxCols columns: a 32K x 8 heads estimate ran in 0.226 s with
// 256, 0.227-0.229 s with 64 or 128, 0.240 s with 512, and 0.339 s with every visible column in one call
// (measured before the packing of K was made cache-friendly, which brought 256 to 0.139 s). Rows per GEMM
// (64, 128 or 256) made no difference.
constexpr int64_t kAmxCols = 256;

template <typename scalar_t>
void block_scores_impl(const at::Tensor& q, const at::Tensor& k, int64_t S, int64_t block_size, bool causal,
                       int64_t q_offset, double softmax_scale, at::Tensor& out) {
  const int64_t B = q.size(0), Lq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Lk = k.size(1), Hkv = k.size(2);
  const int64_t group = Hq / Hkv;
  const int64_t R = block_size / S;  // query (and key) groups per block
  const int64_t nqg = (Lq + S - 1) / S, nkg = (Lk + S - 1) / S;
  const int64_t nqb = (Lq + block_size - 1) / block_size, nkb = (Lk + block_size - 1) / block_size;
  const int64_t SD = S * D;
  const int64_t qsb = q.stride(0), qsl = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), ksl = k.stride(1), ksh = k.stride(2);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const float scale = static_cast<float>(softmax_scale / static_cast<double>(S));
  namespace cpublas = at::native::cpublas;
  const bool amx = std::is_same_v<scalar_t, at::BFloat16> && D % 2 == 0 && brgemm_bf16_available();
  const int64_t NB = kAmxCols;
  const int64_t nkgp = (nkg + NB - 1) / NB * NB;

  // AMX: kt[b, hk] = Kr^T [SD, nkgp] as nkgp / NB blocks of NB columns, each in the micro-kernel's VNNI
  // layout (pairs of rows interleaved: element (x, j) of a block at ((x / 2) * NB + j) * 2 + x % 2), with
  // Kr[j][i*D + d] = K[jS+i, d] (0 past Lk). D is even, so a pair never straddles two key positions; packed
  // here as 32-bit words rather than by cpublas::pack, which takes at most 64 columns per call.
  // Uninitialised (at::empty): every word is written below, padding included.
  const at::Tensor kt_buf = at::empty({amx ? B * Hkv * nkgp * SD / 2 : 0}, q.options().dtype(at::kInt));
  uint32_t* kt = reinterpret_cast<uint32_t*>(kt_buf.data_ptr<int32_t>());
#if defined(LONGMOE_VNNI_PACK)
  // Rows of S*D/2 words at a time by a 16 x 16 word transpose (vnni_pack.h) where every K row starts on a
  // 4-byte boundary. (The word-by-word gather below took 47% of a 16K x 8 heads bf16 estimate.)
  const bool words = rows_are_words(reinterpret_cast<const bf16*>(kp), ksb, ksl, ksh);  // read on the AMX (bf16) path
#endif
  if (amx) {
    // One task per block of NB key groups; the writes of a block are contiguous, its K rows stay in cache.
    at::parallel_for(0, B * Hkv * (nkgp / NB), 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t cb = t % (nkgp / NB), bh = t / (nkgp / NB), hk = bh % Hkv, b = bh / Hkv;
        uint32_t* dst = kt + (bh * nkgp + cb * NB) * SD / 2;
#if defined(LONGMOE_VNNI_PACK)
        if (words) {
          for (int64_t i = 0; i < S; ++i) {
            // Key groups j = cb * NB + jj with a row at position jS + i < Lk: jj < valid.
            const int64_t groups = i < Lk ? (Lk - i - 1) / S + 1 : 0;
            const int64_t valid = std::clamp<int64_t>(std::min(groups, nkg) - cb * NB, 0, NB);
            uint32_t* di = dst + i * (D / 2) * NB;
            if (valid < NB) std::memset(di, 0, (D / 2) * NB * sizeof(uint32_t));
            if (valid == 0) continue;
            const auto* src = reinterpret_cast<const uint32_t*>(kp + b * ksb + (cb * NB * S + i) * ksl + hk * ksh);
            transpose_u32(src, S * ksl / 2, valid, D / 2, di, NB);
          }
          continue;
        }
#endif
        for (int64_t i = 0; i < S; ++i) {
          for (int64_t dp = 0; dp < D / 2; ++dp) {
            uint32_t* drow = dst + (i * D / 2 + dp) * NB;
            for (int64_t jj = 0; jj < NB; ++jj) {
              const int64_t j = cb * NB + jj, pos = j * S + i;
              uint32_t w = 0;
              if (j < nkg && pos < Lk)  // two bf16 (this path runs for bf16 only)
                std::memcpy(&w, kp + b * ksb + pos * ksl + hk * ksh + 2 * dp, 4);
              drow[jj] = w;
            }
          }
        }
      }
    });
  }

  // fp32: regrouped keys kr[b, hk, j, i*D + d] = K[b, jS+i, hk, d] (0 past Lk).
  std::vector<float> kr(amx ? 0 : static_cast<size_t>(B * Hkv * nkg * SD));
  if (!amx) at::parallel_for(0, B * Hkv * nkg, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t j = t % nkg, bh = t / nkg, hk = bh % Hkv, b = bh / Hkv;
      float* dst = kr.data() + t * SD;
      for (int64_t i = 0; i < S; ++i) {
        const int64_t pos = j * S + i;
        float* d = dst + i * D;
        if (pos >= Lk) {
          std::fill(d, d + D, 0.f);
          continue;
        }
        const scalar_t* src = kp + b * ksb + pos * ksl + hk * ksh;
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) d[c] = static_cast<float>(src[c]);
      }
    }
  });

  // Query blocks are taken ~64 query groups at a time (M of the GEMM): one sgemm per chunk against the
  // key groups its last row sees. The regrouped K rows are re-read once per chunk, so one block per GEMM
  // (M = R = 16 at S=8, block 128) is memory-bound: 64 rows measured 0.090 s vs 0.100 s at 16 rows, 0.096 s
  // at 256 (L=8192, H=8, D=128, causal, 2 cores, fp32); larger chunks also waste more causally hidden columns.
  const int64_t qc = std::max<int64_t>(1, kRowsPerGemm / R);  // query blocks per task
  const int64_t nchunks = (nqb + qc - 1) / qc;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, B * Hq * nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(amx ? 0 : static_cast<size_t>(qc * R * SD));
    std::vector<at::BFloat16> qbuf16(amx ? static_cast<size_t>(qc * R * SD) : 0);
    std::vector<float> sbuf(static_cast<size_t>(qc * R * nkgp));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t c = t % nchunks, bh = t / nchunks, h = bh % Hq, b = bh / Hq, hk = h / group;
      const int64_t r0 = c * qc * R;
      const int64_t nr = std::min(qc * R, nqg - r0);  // real query groups in this chunk (>= 1)
      // Reversed query groups: qbuf[rr, i*D + d] = Q[b, (r0+rr)S + S-1-i, h, d] (0 past Lq).
      for (int64_t rr = 0; rr < nr && amx; ++rr) {
        for (int64_t i = 0; i < S; ++i) {
          const int64_t pos = (r0 + rr) * S + S - 1 - i;
          at::BFloat16* d = qbuf16.data() + rr * SD + i * D;
          if (pos >= Lq) {
            std::fill(d, d + D, at::BFloat16(0.f));
          } else {
            std::memcpy(d, qp + b * qsb + pos * qsl + h * qsh, D * sizeof(at::BFloat16));
          }
        }
      }
      for (int64_t rr = 0; rr < nr && !amx; ++rr) {
        for (int64_t i = 0; i < S; ++i) {
          const int64_t pos = (r0 + rr) * S + S - 1 - i;
          float* d = qbuf.data() + rr * SD + i * D;
          if (pos >= Lq) {
            std::fill(d, d + D, 0.f);
            continue;
          }
          const scalar_t* src = qp + b * qsb + pos * qsl + h * qsh;
#pragma omp simd
          for (int64_t x = 0; x < D; ++x) d[x] = static_cast<float>(src[x]);
        }
      }
      // Visible key groups grow with r; the chunk's last real row sees the most.
      const int64_t nvis = visible_groups(r0 + nr - 1, S, nkg, causal, q_offset);
      if (nvis == 0) continue;
      int64_t lds = nvis;  // row stride of the raw scores in sbuf
      float mult = 1.f;    // what the exp multiplies the shifted scores by: the scale, if not applied yet
      if (amx) {
        mult = scale;
        const auto* kbase = reinterpret_cast<const at::BFloat16*>(kt + (b * Hkv + hk) * nkgp * SD / 2);
        lds = (nvis + NB - 1) / NB * NB;
        for (int64_t c0 = 0; c0 < lds; c0 += NB)
          cpublas::brgemm(nr, NB, SD, SD, NB, lds, false, qbuf16.data(), kbase + c0 * SD, sbuf.data() + c0);
      } else {
        const float* kbase = kr.data() + (b * Hkv + hk) * nkg * SD;
        gemm_rm(false, true, nr, nvis, SD, scale, qbuf.data(), SD, kbase, SD, 0.f, sbuf.data(), nvis);
      }
      for (int64_t rr = 0; rr < nr; ++rr) {
        const int64_t r = r0 + rr, qb = r / R;
        const int64_t vis = visible_groups(r, S, nkg, causal, q_offset);
        if (vis == 0) continue;  // no visible key group: the row contributes 0
        float* row = sbuf.data() + rr * lds;
        // Two-pass softmax: max, then exp and sum; probabilities summed per key block.
        const float sum = exp_shifted_inplace(row, vis, row_max(row, vis), mult);
        // Divided by the block's real query groups, so a block row is a distribution over key blocks.
        const int64_t rows_in_block = std::min(R, nqg - qb * R);
        const float w = 1.f / (sum * static_cast<float>(rows_in_block));  // sum >= 1: max term is exp(0)
        float* orow = op + ((b * Hq + h) * nqb + qb) * nkb;
        for (int64_t kb = 0, j0 = 0; j0 < vis; ++kb, j0 += R) {
          const int64_t j1 = std::min(j0 + R, vis);
          float part = 0.f;
#pragma omp simd reduction(+ : part)
          for (int64_t j = j0; j < j1; ++j) part += row[j];
          orow[kb] += part * w;
        }
      }
    }
    if (amx) cpublas::brgemm_release();
  });
}

}  // namespace

at::Tensor xattn_block_scores_cpu(const at::Tensor& q, const at::Tensor& k, int64_t stride, int64_t block_size,
                                  bool causal, int64_t q_offset, std::optional<double> softmax_scale) {
  TORCH_CHECK(q.dim() == 4, "q must be (batch, seqlen_q, heads_q, head_dim); got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be (batch, seqlen_k, heads_kv, head_dim); got shape ", k.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), "k batch ", k.size(0), " must equal q batch ", q.size(0));
  TORCH_CHECK(q.size(3) == k.size(3), "k head_dim ", k.size(3), " must equal q head_dim ", q.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "heads_q=", q.size(2),
              " must be a multiple of heads_kv=", k.size(2));
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu(), "longmoe::xattn_block_scores CPU kernel got tensors on ",
              q.device(), ", ", k.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "q and k must share a dtype; got ", q.scalar_type(), ", ",
              k.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16 for the native estimator (it computes in fp32; use the "
              "reference backend for float64); got ",
              q.scalar_type());
  TORCH_CHECK(q.size(3) == 0 || (q.stride(3) == 1 && k.stride(3) == 1),
              "q and k must have a unit stride in head_dim; got q strides ", q.strides(), ", k strides ",
              k.strides());
  TORCH_CHECK(stride >= 1, "stride must be >= 1; got ", stride);
  TORCH_CHECK(block_size >= 1 && block_size % stride == 0, "block_size=", block_size,
              " must be a positive multiple of stride=", stride);
  const double scale = softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "softmax_scale must be positive and finite; got ", scale);
  const int64_t nqb = (q.size(1) + block_size - 1) / block_size;
  const int64_t nkb = (k.size(1) + block_size - 1) / block_size;
  auto out = at::zeros({q.size(0), q.size(2), nqb, nkb}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "xattn_block_scores", [&] {
    block_scores_impl<scalar_t>(q, k, stride, block_size, causal, q_offset, scale, out);
  });
  return out;
}

}  // namespace longmoe
