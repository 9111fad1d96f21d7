// The shape, masking and tiling of one attention call, shared by the fp32-tile kernels
// (flash_attn.cpp) and the bf16 dot-product kernels (flash_attn_bf16.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <vector>

#include "tile_math.h"
#include "cpu_paths.h"
#include "work_queue.h"

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
  bool brgemm = false;    // bf16 forward tiles on AMX micro-kernels (flash_attn_amx.cpp)

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
    // AMX tiles: 128 query rows per tile where the block allows (block-sparse bf16 forward at 16K, per-head
    // densities 0.09-0.6: 191 ms vs 213 ms with 64 rows; fwd+bwd 1.62 vs 1.76 s).
    p.bq = std::gcd(p.block_size, static_cast<int64_t>(p.brgemm ? 128 : 64));
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

// Tile work of query rows [q0, q0 + mq) of head (b, h): kept key tiles x rows.
inline int64_t query_tile_cost(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t mq) {
  const int64_t kv_end = p.kv_end(q0, mq);
  if (p.mask == nullptr) return (kv_end + p.bk - 1) / p.bk * mq;
  int64_t n = 0;
  for (int64_t k0 = 0; k0 < kv_end; k0 += p.bk) n += p.tile_on(b, h, q0, k0);
  return n * mq;
}

// Costs of the forward's items, item = (b * Hq + h) * n_qt + qt (one query tile of one head each).
inline std::vector<int64_t> query_tile_costs(const Problem& p) {
  const int64_t n_qt = (p.Sq + p.bq - 1) / p.bq;
  std::vector<int64_t> cost(p.B * p.Hq * n_qt);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t qt = 0; qt < n_qt; ++qt)
        cost[(b * p.Hq + h) * n_qt + qt] = query_tile_cost(p, b, h, qt * p.bq, std::min(p.bq, p.Sq - qt * p.bq));
  return cost;
}

// Costs of the backward's items, item = b * Hq + h (one whole head each: it owns its dK/dV slab).
inline std::vector<int64_t> head_costs(const Problem& p) {
  std::vector<int64_t> cost(p.B * p.Hq, 0);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.Hq; ++h)
      for (int64_t q0 = 0; q0 < p.Sq; q0 += p.bq) cost[b * p.Hq + h] += query_tile_cost(p, b, h, q0, std::min(p.bq, p.Sq - q0));
  return cost;
}

// Row strides of a (B, S, H, D) tensor with unit inner stride.
struct Strides {
  int64_t b, s, h;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), s(t.stride(1)), h(t.stride(2)) {}
};

inline at::Tensor inner_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// One query tile of a forward call: rows [q0, q0 + mq) of query head h (KV head hk) of batch b, with its
// running softmax state: m and l (mq entries each) and the output accumulator acc [mq, D].
struct QueryTile {
  int64_t b, h, hk, q0, mq;
  float *m, *l, *acc;
};

// The outer loops of the forward, shared by the fp32 (flash_attn.cpp), AVX512-BF16 (flash_attn_bf16.cpp)
// and AMX (flash_attn_amx.cpp) kernels, which differ only in their tile GEMMs. Query tiles go to the threads
// costliest first (WorkQueue). Per thread, `make_scratch()` builds that kernel's buffers (destroyed when the
// thread is done). Per query tile the softmax state is reset, `start(scratch, t)` prepares the tile (its Q
// rows), `tile(scratch, t, k0, nk)` runs for every key tile [k0, k0 + nk) that the causal bound and the
// block mask keep, and the rows are finished into lse (B, Hq, Sq) and stored into out (B, Sq, Hq, D).
template <typename out_t, typename MakeScratch, typename Start, typename Tile>
void forward_query_tiles(const Problem& p, at::Tensor& out, at::Tensor& lse, MakeScratch make_scratch, Start start,
                         Tile tile) {
  out_t* od = out.data_ptr<out_t>();
  float* lsed = lse.data_ptr<float>();
  const Strides os(out);
  const int64_t D = p.D, bq = p.bq, n_qt = (p.Sq + bq - 1) / bq;
  const WorkQueue work(query_tile_costs(p));
  at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    std::vector<float> m(bq), l(bq), acc(bq * D);
    for (int64_t item; work.next(item);) {
      QueryTile t;
      t.h = (item / n_qt) % p.Hq;
      t.b = item / (n_qt * p.Hq);
      t.hk = t.h / p.q_per_kv;
      t.q0 = (item % n_qt) * bq;
      t.mq = std::min(bq, p.Sq - t.q0);
      t.m = m.data();
      t.l = l.data();
      t.acc = acc.data();
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      start(scratch, t);
      const int64_t kv_end = p.kv_end(t.q0, t.mq);
      for (int64_t k0 = 0; k0 < kv_end; k0 += p.bk) {
        if (p.tile_on(t.b, t.h, t.q0, k0)) tile(scratch, t, k0, std::min(p.bk, kv_end - k0));
      }
      finish_rows(t.acc, t.mq, D, t.m, t.l, lsed + (t.b * p.Hq + t.h) * p.Sq + t.q0);
      store_rows(t.acc, D, t.mq, D, od + t.b * os.b + t.q0 * os.s + t.h * os.h, os.s);
    }
  });
}

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

// Forward with bf16 q/k/v on AMX brgemm tiles (flash_attn_amx.cpp); out_t: at::BFloat16 or float.
template <typename out_t>
void forward_brgemm(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse);

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
