// The shape, masking and tiling of one attention call, shared by the fp32-tile kernels
// (flash_attn.cpp) and the bf16 dot-product kernels (flash_attn_bf16.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <optional>

#include "attention/tile_math.h"

namespace longmoe {

struct Problem {
  int64_t B, Sq, Sk, Hq, Hkv, D, q_per_kv;  // q_per_kv = Hq / Hkv query heads per KV head
  int64_t offset;  // Sk - Sq: bottom-right causal alignment
  bool causal;
  float scale;
  // block mask (nullptr = dense)
  const bool* mask = nullptr;
  int64_t ms[4] = {0, 0, 0, 0};
  int64_t block_size = 0;
  // tiles
  int64_t bq, bk;
  bool bf16_dot = false;  // bf16 tiles on AVX512-BF16 dot products (flash_attn_bf16.cpp)

  bool tile_on(int64_t b, int64_t h, int64_t q0, int64_t k0) const {
    if (mask == nullptr) return true;
    return mask[b * ms[0] + h * ms[1] + (q0 / block_size) * ms[2] + (k0 / block_size) * ms[3]];
  }
  // Keys [0, kv_end) can be visible to query rows [q0, q0 + mq).
  int64_t kv_end(int64_t q0, int64_t mq) const {
    if (!causal) return Sk;
    return std::clamp<int64_t>(q0 + mq + offset, 0, Sk);
  }
  // Number of visible columns of row `qi` in the key tile starting at k0 (of width nk).
  int64_t visible(int64_t qi, int64_t k0, int64_t nk) const {
    if (!causal) return nk;
    return std::clamp<int64_t>(qi + offset - k0 + 1, 0, nk);
  }
};

// Dense tiles, from sweeps of LONGMOE_ATTN_TILES (D=128, H=4) on the 2-core dev box (AVX-512 EPYC, MKL;
// run-to-run noise there is about +-10%): fp32 tiles 256x512 -- at S=16K the forward ran 155 GFLOP/s vs
// 139 with 64-row tiles, which re-read K/V 4x as often (equal at S=4K); bf16-dot tiles 64x256 up to
// Sk=8K (backward ~15% faster than 64x512 at 4K) and 256x256 from Sk=8K on, where each query tile's pass
// over the per-head fp32 dK/dV slab (Sk*D*8 bytes) dominates: backward 406 vs 292 GFLOP/s at 16K, 394 vs
// 352 at 8K, but 399 vs 514 at 4K. Masked tiles follow the mask's block size so a tile never straddles
// two mask blocks.
inline void choose_tiles(Problem& p) {
  if (p.mask != nullptr) {
    p.bk = p.block_size;
    p.bq = std::gcd(p.block_size, static_cast<int64_t>(64));
    return;
  }
  p.bq = p.bf16_dot ? (p.Sk >= 8192 ? 256 : 64) : 256;
  p.bk = p.bf16_dot ? 256 : 512;
  // LONGMOE_ATTN_TILES="bq,bk" overrides the dense tiles (for tuning sweeps with the benchmark).
  if (const char* env = std::getenv("LONGMOE_ATTN_TILES")) {
    long bq = 0, bk = 0;
    if (std::sscanf(env, "%ld,%ld", &bq, &bk) == 2 && bq > 0 && bk > 0 && bk % 2 == 0) {
      p.bq = bq;
      p.bk = bk;
    }
  }
}

// Row strides of a (B, S, H, D) tensor with unit inner stride.
struct Strides {
  int64_t b, s, h;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), s(t.stride(1)), h(t.stride(2)) {}
};

inline at::Tensor inner_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Backward: turn the [mq, nk] score tile S (already scaled) into probabilities P = exp(S - lse) in place,
// with the forward's (possibly global) lse per row; invisible entries and rows with lse = -inf (no key
// seen in the forward, hence no gradient) become 0.
inline void recompute_probs(const Problem& p, float* P, int64_t mq, int64_t nk, const float* lrow, int64_t q0,
                            int64_t k0) {
  for (int64_t i = 0; i < mq; ++i) {
    float* row = P + i * nk;
    const float li = lrow[i];
    const int64_t vis = std::isinf(li) ? 0 : p.visible(q0 + i, k0, nk);
#pragma omp simd
    for (int64_t j = 0; j < vis; ++j) row[j] = exp_nonpos(row[j] - li);
    std::fill(row + vis, row + nk, 0.f);
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, bool causal, double scale,
                     const std::optional<at::Tensor>& block_mask, int64_t block_size);

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LONGMOE_BF16_DOT 1
// bf16 x bf16 -> fp32 tile GEMMs with AVX512-BF16 dot products (flash_attn_bf16.cpp).
// out_t / grad_t: at::BFloat16 or float (see flash_attn_fwd_cpu's out_dtype, flash_attn_bwd_cpu's grad_dtype).
template <typename out_t>
void forward_bf16_dot(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                      at::Tensor& out, at::Tensor& lse);
// `out` is undefined when `delta` (B, Hq, Sq) fp32 is given.
template <typename grad_t>
void backward_bf16_dot(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& delta, const at::Tensor& lse,
                       at::Tensor& dq, at::Tensor& dk_acc, at::Tensor& dv_acc);
#endif

}  // namespace longmoe
