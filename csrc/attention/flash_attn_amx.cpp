// bf16 attention forward on oneDNN's AMX micro-kernels through PyTorch's at::native::cpublas::brgemm, for
// CPUs where PyTorch packs bf16 operands for them (cpublas::could_pack: AMX). Same algorithm, tiles and
// contract as forward_kernel (flash_attn.cpp): online softmax over the key tiles a query tile sees (and its
// block mask keeps), fp32 scores, statistics and accumulators. Only the two tile GEMMs differ: S = Q K^T
// and acc += P V run as bf16 x bf16 -> fp32 brgemm calls, with P rounded to bf16 before its GEMM (as
// torch's CPU flash kernel and our AVX512-BF16 tiles do).
//
// Why: on an AMX CPU (a 2-core Sapphire Rapids-class VM) the AVX512-BF16 dot-product tiles ran a causal
// 8K x 8 heads x D 128 forward in 870 ms, the fp32 tiles in 570 ms, and torch's SDPA (AMX) in 120 ms.
//
// K^T and V are packed once per call into the micro-kernel's VNNI layout (PackedTiles) and reused by every
// query tile. Eligible: bf16, head_dim a multiple of 64, and a block mask's block size a multiple of 64.
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "attention/attn_problem.h"
#include "tile_math.h"
#include "vnni_pack.h"

namespace longmoe {

bool amx_bf16_available() {
  static const bool ok = at::native::cpublas::could_pack(at::kBFloat16);
  return ok;
}

bool brgemm_bf16_available() {
#if defined(LONGMOE_VNNI_PACK)
  static const bool isa = amx_bf16_available() || __builtin_cpu_supports("avx512bf16");
#else
  static const bool isa = amx_bf16_available();
#endif
  static const bool ok = isa && !native_path_off("LONGMOE_NATIVE_AMX");
  return ok;
}

namespace {

namespace cpublas = at::native::cpublas;

// oneDNN's packing takes at most kPackN columns with a leading dimension equal to the width, so B operands
// are packed, and the GEMMs run, in column blocks of kPackN.
constexpr int64_t kPackN = 64;
#if defined(LONGMOE_VNNI_PACK)
static_assert(kPackN == kVnniN);
#endif

// Packed key tiles of one call. Tile t of (b, hk) covers keys [t * bk, t * bk + nk), zero-padded to bkp =
// bk rounded up to kPackN: K^T [D, bkp] as bkp / kPackN blocks of [D, kPackN], and V [bkp, D] as
// D / kPackN blocks of [bkp, kPackN], each block in the micro-kernel's VNNI layout.
struct PackedTiles {
  at::Tensor kt, vr;  // bf16 (B * Hkv * n_kt, D * bkp) each
  int64_t n_kt, bkp, D;
  const bf16* k_tile(int64_t b, int64_t hk, int64_t hkv, int64_t t) const {
    return kt.data_ptr<bf16>() + ((b * hkv + hk) * n_kt + t) * D * bkp;
  }
  const bf16* v_tile(int64_t b, int64_t hk, int64_t hkv, int64_t t) const {
    return vr.data_ptr<bf16>() + ((b * hkv + hk) * n_kt + t) * D * bkp;
  }
};

PackedTiles pack_tiles(const Problem& p, const at::Tensor& k, const at::Tensor& v) {
  PackedTiles out;
  const int64_t D = p.D, bk = p.bk;
  out.D = D;
  out.bkp = (bk + kPackN - 1) / kPackN * kPackN;
  out.n_kt = (p.Sk + bk - 1) / bk;
  const int64_t bkp = out.bkp, n = p.B * p.Hkv * out.n_kt;
  out.kt = at::empty({n, D * bkp}, k.options());
  out.vr = at::empty({n, D * bkp}, v.options());
  const bf16* kd = k.data_ptr<bf16>();
  const bf16* vd = v.data_ptr<bf16>();
  const Strides ks(k), vs(v);
#if defined(LONGMOE_VNNI_PACK)
  // Our AVX-512 packers (vnni_pack.h): K^T blocks are a 32-bit transpose of K's rows, which needs every row to
  // start on a 4-byte boundary; V blocks interleave row pairs. (oneDNN's scalar reorder below took 10% of a
  // block-sparse forward at 8K, density 0.16.)
  const bool words = rows_are_words(kd, ks.b, ks.s, ks.h);
#endif
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<bf16> kbuf, vbuf;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i % out.n_kt, hk = (i / out.n_kt) % p.Hkv, b = i / (out.n_kt * p.Hkv);
      const int64_t k0 = t * bk, nk = std::min(bk, p.Sk - k0);
      const bf16* krows = kd + b * ks.b + k0 * ks.s + hk * ks.h;
      const bf16* vrows = vd + b * vs.b + k0 * vs.s + hk * vs.h;
      bf16* kdst = out.kt.data_ptr<bf16>() + i * D * bkp;
      bf16* vdst = out.vr.data_ptr<bf16>() + i * D * bkp;
#if defined(LONGMOE_VNNI_PACK)
      if (words) {
        for (int64_t c0 = 0; c0 < bkp; c0 += kPackN) {  // K^T columns = keys c0 .. c0 + kPackN
          if (c0 < nk)
            pack_cols(krows + c0 * ks.s, ks.s, D, std::min(kPackN, nk - c0), kdst + c0 * D);
          else
            std::memset(static_cast<void*>(kdst + c0 * D), 0, D * kPackN * sizeof(bf16));
        }
        pack_rows(vrows, vs.s, nk, D, vdst, bkp);  // V column blocks d0 at vdst + d0 * bkp
        continue;
      }
#endif
      kbuf.resize(D * kPackN);
      vbuf.resize(bkp * kPackN);
      for (int64_t c0 = 0; c0 < bkp; c0 += kPackN) {  // K^T columns = keys c0 .. c0 + kPackN
        std::fill(kbuf.begin(), kbuf.end(), bf16(0.f));
        for (int64_t j = c0; j < std::min(nk, c0 + kPackN); ++j)
          for (int64_t d = 0; d < D; ++d) kbuf[d * kPackN + (j - c0)] = krows[j * ks.s + d];
        cpublas::pack(D, kPackN, kPackN, kPackN, at::kBFloat16, at::kBFloat16, kbuf.data(), kdst + c0 * D);
      }
      for (int64_t d0 = 0; d0 < D; d0 += kPackN) {  // V columns d0 .. d0 + kPackN
        std::fill(vbuf.begin(), vbuf.end(), bf16(0.f));
        for (int64_t j = 0; j < nk; ++j) std::copy(vrows + j * vs.s + d0, vrows + j * vs.s + d0 + kPackN, vbuf.data() + j * kPackN);
        cpublas::pack(bkp, kPackN, kPackN, kPackN, at::kBFloat16, at::kBFloat16, vbuf.data(), vdst + d0 * bkp);
      }
    }
  });
  return out;
}

// One query row of the online softmax over a key tile, fused for the bf16 GEMM that follows: raw scores
// row[0:vis] (unscaled), probabilities exp(scale * s - m_new) written as bf16 to pr[0:vis] and zeros to
// pr[vis:bkp]; m, l and the accumulator row are updated as in online_softmax_row. Two passes over the row
// (max, then exp + sum + round) instead of the five of scale, online_softmax_row and a conversion, which
// on a 2-core AMX VM took more time than the GEMMs.
inline void softmax_row_to_bf16(const float* row, int64_t vis, int64_t bkp, float scale, float& m, float& l,
                                float* acc, int64_t D, bf16* pr) {
  const float m_new = std::max(m, row_max(row, vis) * scale);  // scale > 0
  float sum = 0.f;
  int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(m_new);
  __m512 vsum = _mm512_setzero_ps();
  for (; j + 16 <= vis; j += 16) {
    const __m512 ve = exp_nonpos16(_mm512_fmsub_ps(_mm512_loadu_ps(row + j), vs, vm));
    vsum = _mm512_add_ps(vsum, ve);
    const __m256bh b = _mm512_cvtneps_pbh(ve);
    std::memcpy(pr + j, &b, 32);
  }
  sum = reduce_add16(vsum);
#endif
  for (; j < vis; ++j) {
    const float e = exp_nonpos(row[j] * scale - m_new);
    sum += e;
    pr[j] = static_cast<bf16>(e);
  }
  std::fill(pr + vis, pr + bkp, bf16(0.f));
  if (vis > 0) advance_running_row(m_new, sum, m, l, acc, D);
}

}  // namespace

template <typename out_t>
void forward_brgemm(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse) {
  const PackedTiles tiles = pack_tiles(p, k, v);
  const bf16* qd = q.data_ptr<bf16>();
  const Strides qs(q);
  const int64_t D = p.D, bq = p.bq, bk = p.bk, bkp = tiles.bkp;
  struct Scratch {
    std::vector<float> sbuf;
    std::vector<bf16> pb;
    const bf16* Q = nullptr;
    ~Scratch() { cpublas::brgemm_release(); }  // the thread's AMX state, once its tiles are done
  };
  forward_query_tiles<out_t>(
      p, out, lse, [&] { return Scratch{std::vector<float>(bq * bkp), std::vector<bf16>(bq * bkp)}; },
      [&](Scratch& s, const QueryTile& t) { s.Q = qd + t.b * qs.b + t.q0 * qs.s + t.h * qs.h; },
      [&](Scratch& s, const QueryTile& t, int64_t k0, int64_t nk) {
        float* S = s.sbuf.data();
        const bf16* KT = tiles.k_tile(t.b, t.hk, p.Hkv, k0 / bk);
        const bf16* VR = tiles.v_tile(t.b, t.hk, p.Hkv, k0 / bk);
        for (int64_t c0 = 0; c0 < bkp; c0 += kPackN)  // S = Q K^T, kPackN key columns at a time
          cpublas::brgemm(t.mq, kPackN, D, qs.s, kPackN, bkp, false, s.Q, KT + c0 * D, S + c0);
        for (int64_t i = 0; i < t.mq; ++i)
          softmax_row_to_bf16(S + i * bkp, p.visible(t.q0 + i, k0, nk), bkp, p.scale, t.m[i], t.l[i],
                              t.acc + i * D, D, s.pb.data() + i * bkp);
        for (int64_t d0 = 0; d0 < D; d0 += kPackN)  // acc += P V, kPackN output columns at a time
          cpublas::brgemm(t.mq, kPackN, bkp, bkp, kPackN, D, true, s.pb.data(), VR + d0 * bkp, t.acc + d0);
      });
}

template void forward_brgemm<float>(const Problem&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    at::Tensor&, at::Tensor&);
template void forward_brgemm<at::BFloat16>(const Problem&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           at::Tensor&, at::Tensor&);

}  // namespace longmoe
