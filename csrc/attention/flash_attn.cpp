// Tiled online-softmax attention on CPU, forward and backward, with an optional block mask.
//
// Layout follows flash-attention: q (B, Sq, Hq, D), k/v (B, Sk, Hkv, D), out like q, lse (B, Hq, Sq)
// fp32 natural log of the scaled scores. GQA/MQA index the kv head h / (Hq / Hkv); K/V are never
// repeated. Causal with Sq != Sk is aligned bottom-right: query i sees key j iff j <= i + Sk - Sq.
// A row with no visible key gets output 0 and lse -inf.
//
// block_mask (optional) is bool (B, Hq, ceil(Sq/bs), ceil(Sk/bs)); tiles whose mask bit is false
// are skipped entirely, so the cost scales with the kept fraction (XAttention builds on this).
//
// Every dtype is computed in fp32 tiles: bf16/fp16 rows are converted when loaded (this CPU family
// has no fast low-precision GEMM outside oneDNN), and the tile GEMMs go through torch's BLAS.
#include "attention/flash_attn.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdlib>
#include <numeric>
#include <vector>

#include "attention/attn_problem.h"
#include "tile_math.h"

namespace longmoe {
namespace {

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& block_mask, int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 4, "q must be (batch, seqlen_q, heads_q, head_dim); got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k must be (batch, seqlen_k, heads_kv, head_dim); got shape ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have k's shape ", k.sizes(), "; got ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0), "k batch ", k.size(0), " must equal q batch ", q.size(0));
  TORCH_CHECK(q.size(3) == k.size(3), "k head_dim ", k.size(3), " must equal q head_dim ", q.size(3));
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "heads_q=", q.size(2),
              " must be a multiple of heads_kv=", k.size(2));
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "longmoe::flash_attn CPU kernel got tensors on ", q.device(), ", ", k.device(), ", ",
              v.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must share a dtype; got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "q must be float32, bfloat16 or float16 for the native kernel (it computes in fp32 tiles; "
              "use the reference backend for float64); got ",
              q.scalar_type());
  TORCH_CHECK(scale > 0, "softmax_scale must be > 0; got ", scale);
  if (block_mask.has_value()) {
    const auto& m = *block_mask;
    TORCH_CHECK(block_size > 0, "block_size must be > 0; got ", block_size);
    TORCH_CHECK(m.scalar_type() == at::kBool, "block_mask must be bool; got ", m.scalar_type());
    const int64_t nq = (q.size(1) + block_size - 1) / block_size;
    const int64_t nk = (k.size(1) + block_size - 1) / block_size;
    TORCH_CHECK(m.dim() == 4 && m.size(0) == q.size(0) && m.size(1) == q.size(2) && m.size(2) == nq &&
                    m.size(3) == nk,
                "block_mask must be (batch, heads_q, ceil(seqlen_q/block_size), "
                "ceil(seqlen_k/block_size)) = (",
                q.size(0), ", ", q.size(2), ", ", nq, ", ", nk, "); got ", m.sizes());
  }
}

#ifdef LONGMOE_BF16_DOT
// bf16 inputs take the AVX512-BF16 dot-product tiles when the CPU has them (about 2x the fp32 GEMM
// rate on the dev box); LONGMOE_NATIVE_BF16_DOT=0 keeps them on the fp32 tiles (for comparisons).
bool bf16_dot_eligible(const at::Tensor& q, const std::optional<at::Tensor>& block_mask, int64_t block_size) {
  static const bool enabled = __builtin_cpu_supports("avx512bf16") && !native_path_off("LONGMOE_NATIVE_BF16_DOT");
  return enabled && q.scalar_type() == at::kBFloat16 && q.size(3) % 2 == 0 &&
         (!block_mask.has_value() || block_size % 2 == 0);
}
#endif

}  // namespace

Problem make_problem(const at::Tensor& q, const at::Tensor& k, bool causal, double scale,
                     const std::optional<at::Tensor>& block_mask, int64_t block_size) {
  Problem p;
  p.B = q.size(0);
  p.Sq = q.size(1);
  p.Hq = q.size(2);
  p.D = q.size(3);
  p.Sk = k.size(1);
  p.Hkv = k.size(2);
  p.q_per_kv = p.Hq / p.Hkv;
  p.offset = p.Sk - p.Sq;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  if (block_mask.has_value()) {
    p.mask = block_mask->data_ptr<bool>();
    for (int i = 0; i < 4; ++i) p.ms[i] = block_mask->stride(i);
    p.block_size = block_size;
  }
  // On AMX CPUs bf16 forwards take the brgemm tiles, and backwards the fp32 tiles: there the AVX512-BF16
  // dot products ran slower than fp32 FMAs (a causal 8K x 8 heads forward 870 vs 570 ms; a sparse
  // forward+backward 915 vs 607 ms). Elsewhere bf16 takes the AVX512-BF16 dot-product tiles both ways: on a
  // Zen 5 core (no AMX) the brgemm forward ran no faster (causal 2K / 4K x 4 heads x D 128: 602 / 680 vs
  // 611 / 637 GFLOP/s).
  p.brgemm = q.scalar_type() == at::kBFloat16 && p.D % 64 == 0 && p.D > 0 &&
             (!block_mask.has_value() || block_size % 64 == 0) && amx_bf16_available() && brgemm_bf16_available();
#ifdef LONGMOE_BF16_DOT
  p.bf16_dot = !p.brgemm && bf16_dot_eligible(q, block_mask, block_size);
#endif
  choose_tiles(p);
  return p;
}

namespace {

// Data pointers and row strides of a forward call's operands (q, k, v, out (B, S, H, D); lse (B, Hq, Sq)).
template <typename scalar_t, typename out_t>
struct ForwardOperands {
  const scalar_t *q, *k, *v;
  out_t* out;
  float* lse;
  Strides qs, ks, vs, os;
  ForwardOperands(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, at::Tensor& out_, at::Tensor& lse_)
      : q(q_.data_ptr<scalar_t>()), k(k_.data_ptr<scalar_t>()), v(v_.data_ptr<scalar_t>()),
        out(out_.data_ptr<out_t>()), lse(lse_.data_ptr<float>()), qs(q_), ks(k_), vs(v_), os(out_) {}
};

template <typename scalar_t, typename out_t>
void forward_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    at::Tensor& out, at::Tensor& lse) {
  const ForwardOperands<scalar_t, out_t> f(q, k, v, out, lse);
  const int64_t D = p.D, bq = p.bq, bk = p.bk;
  struct Scratch {
    std::vector<float> qbuf, kbuf, vbuf, sbuf;
    const float* Q = nullptr;
    int64_t ldq = 0;
  };
  forward_query_tiles<out_t>(
      p, out, lse, [&] { return Scratch{std::vector<float>(bq * D), std::vector<float>(bk * D),
                                        std::vector<float>(bk * D), std::vector<float>(bq * bk)}; },
      [&](Scratch& s, const QueryTile& t) {
        s.Q = load_rows(f.q + t.b * f.qs.b + t.q0 * f.qs.s + t.h * f.qs.h, f.qs.s, t.mq, D, s.qbuf.data(), &s.ldq);
      },
      [&](Scratch& s, const QueryTile& t, int64_t k0, int64_t nk) {
        int64_t ldk, ldv;
        const float* K = load_rows(f.k + t.b * f.ks.b + k0 * f.ks.s + t.hk * f.ks.h, f.ks.s, nk, D, s.kbuf.data(), &ldk);
        const float* V = load_rows(f.v + t.b * f.vs.b + k0 * f.vs.s + t.hk * f.vs.h, f.vs.s, nk, D, s.vbuf.data(), &ldv);
        float* S = s.sbuf.data();
        gemm_rm(false, true, t.mq, nk, D, p.scale, s.Q, s.ldq, K, ldk, 0.f, S, nk);
        for (int64_t i = 0; i < t.mq; ++i)
          online_softmax_row(S + i * nk, p.visible(t.q0 + i, k0, nk), nk, t.m[i], t.l[i], t.acc + i * D, D);
        gemm_rm(false, false, t.mq, D, nk, 1.f, S, nk, V, ldv, 1.f, t.acc, D);
      });
}

// Decode: one query row per head (Sq == 1), no block mask, GQA/MQA. The q_per_kv query heads that share a
// KV head form one tile, so each K/V row is read once per KV head rather than once per query head: decode
// over a long cache is memory-bound, and forward_kernel's per-query-head GEMVs re-read the cache q_per_kv
// times. With Sq == 1 every key is visible, causal or not (bottom-right alignment).
template <typename scalar_t, typename out_t>
void decode_kernel(const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse) {
  const ForwardOperands<scalar_t, out_t> f(q, k, v, out, lse);
  const scalar_t *qd = f.q, *kd = f.k, *vd = f.v;
  out_t* od = f.out;
  float* ld_ = f.lse;
  const Strides &qs = f.qs, &ks = f.ks, &vs = f.vs, &os = f.os;
  const int64_t D = p.D, g = p.q_per_kv, bk = p.bk;

  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qbuf(g * D), kbuf(bk * D), vbuf(bk * D), sbuf(g * bk), acc(g * D);
    std::vector<float> m(g), l(g);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t hk = item % p.Hkv, b = item / p.Hkv, h0 = hk * g;
      int64_t ldq, ldk, ldv;
      const float* Q = load_rows(qd + b * qs.b + h0 * qs.h, qs.h, g, D, qbuf.data(), &ldq);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < p.Sk; k0 += bk) {
        const int64_t nk = std::min(bk, p.Sk - k0);
        const float* K = load_rows(kd + b * ks.b + k0 * ks.s + hk * ks.h, ks.s, nk, D, kbuf.data(), &ldk);
        const float* V = load_rows(vd + b * vs.b + k0 * vs.s + hk * vs.h, vs.s, nk, D, vbuf.data(), &ldv);
        float* S = sbuf.data();
        gemm_rm(false, true, g, nk, D, p.scale, Q, ldq, K, ldk, 0.f, S, nk);
        for (int64_t i = 0; i < g; ++i) online_softmax_row(S + i * nk, nk, nk, m[i], l[i], acc.data() + i * D, D);
        gemm_rm(false, false, g, D, nk, 1.f, S, nk, V, ldv, 1.f, acc.data(), D);
      }
      finish_rows(acc.data(), g, D, m.data(), l.data(), ld_ + b * p.Hq + h0);  // lse (B, Hq, 1)
      store_rows(acc.data(), D, g, D, od + b * os.b + h0 * os.h, os.h);
    }
  });
}

template <typename scalar_t, typename grad_t>
void backward_kernel(const Problem& p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& delta, const at::Tensor& lse,
                     at::Tensor& dq, at::Tensor& dk_acc, at::Tensor& dv_acc) {
  const scalar_t* dod = dout.data_ptr<scalar_t>();
  const scalar_t* qd = q.data_ptr<scalar_t>();
  const scalar_t* kd = k.data_ptr<scalar_t>();
  const scalar_t* vd = v.data_ptr<scalar_t>();
  // Row term D_i = rowsum(dO * O): from `delta` (B, Hq, Sq) when given (ring backward sends D instead of
  // O), else computed here from `out`.
  const bool have_delta = delta.defined();
  const scalar_t* od = have_delta ? nullptr : out.data_ptr<scalar_t>();
  const float* deltad = have_delta ? delta.data_ptr<float>() : nullptr;
  const int64_t dl_b = have_delta ? delta.stride(0) : 0, dl_h = have_delta ? delta.stride(1) : 0;
  const int64_t dl_s = have_delta ? delta.stride(2) : 0;
  const float* lsed = lse.data_ptr<float>();
  const int64_t lse_b = lse.stride(0), lse_h = lse.stride(1), lse_s = lse.stride(2);
  grad_t* dqd = dq.data_ptr<grad_t>();
  float* dkd = dk_acc.data_ptr<float>();  // (B, Hq, Sk, D) fp32, one slab per query head
  float* dvd = dv_acc.data_ptr<float>();
  const Strides dos(dout), qs(q), ks(k), vs(v), os(have_delta ? dout : out), dqs(dq);
  const int64_t D = p.D, bq = p.bq, bk = p.bk;

  // One work item per (batch, query head): it owns its dq rows and its dk/dv slab, so no two
  // threads write the same memory; the query heads of each KV head are summed afterwards.
  const WorkQueue work(head_costs(p));
  at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
    std::vector<float> qbuf(bq * D), dobuf(bq * D), obuf(bq * D), kbuf(bk * D), vbuf(bk * D);
    std::vector<float> pbuf(bq * bk), dpbuf(bq * bk), dqacc(bq * D), lrow(bq), drow(bq);
    for (int64_t item; work.next(item);) {
      const int64_t h = item % p.Hq, b = item / p.Hq, hk = h / p.q_per_kv;
      float* dK = dkd + item * p.Sk * D;
      float* dV = dvd + item * p.Sk * D;
      for (int64_t q0 = 0; q0 < p.Sq; q0 += bq) {
        const int64_t mq = std::min(bq, p.Sq - q0);
        int64_t ldq, lddo, ldo = 0, ldk, ldv;
        const float* Q = load_rows(qd + b * qs.b + q0 * qs.s + h * qs.h, qs.s, mq, D, qbuf.data(), &ldq);
        const float* dO =
            load_rows(dod + b * dos.b + q0 * dos.s + h * dos.h, dos.s, mq, D, dobuf.data(), &lddo);
        const float* O =
            have_delta ? nullptr : load_rows(od + b * os.b + q0 * os.s + h * os.h, os.s, mq, D, obuf.data(), &ldo);
        for (int64_t i = 0; i < mq; ++i) {
          lrow[i] = lsed[b * lse_b + h * lse_h + (q0 + i) * lse_s];
          if (have_delta) {
            drow[i] = deltad[b * dl_b + h * dl_h + (q0 + i) * dl_s];
            continue;
          }
          float dsum = 0.f;  // D_i = rowsum(dO * O), the softmax-backward row term
          const float* x = dO + i * lddo;
          const float* y = O + i * ldo;
#pragma omp simd reduction(+ : dsum)
          for (int64_t d = 0; d < D; ++d) dsum += x[d] * y[d];
          drow[i] = dsum;
        }
        std::fill(dqacc.begin(), dqacc.end(), 0.f);
        const int64_t kv_end = p.kv_end(q0, mq);
        for (int64_t k0 = 0; k0 < kv_end; k0 += bk) {
          if (!p.tile_on(b, h, q0, k0)) continue;
          const int64_t nk = std::min(bk, kv_end - k0);
          const float* K =
              load_rows(kd + b * ks.b + k0 * ks.s + hk * ks.h, ks.s, nk, D, kbuf.data(), &ldk);
          const float* V =
              load_rows(vd + b * vs.b + k0 * vs.s + hk * vs.h, vs.s, nk, D, vbuf.data(), &ldv);
          float* P = pbuf.data();
          float* dP = dpbuf.data();
          gemm_rm(false, true, mq, nk, D, p.scale, Q, ldq, K, ldk, 0.f, P, nk);
          recompute_probs(p, P, mq, nk, lrow.data(), q0, k0);
          gemm_rm(true, false, nk, D, mq, 1.f, P, nk, dO, lddo, 1.f, dV + k0 * D, D);  // dV += P^T dO
          gemm_rm(false, true, mq, nk, D, 1.f, dO, lddo, V, ldv, 0.f, dP, nk);         // dP = dO V^T
          for (int64_t i = 0; i < mq; ++i) {
            float* ds = dP + i * nk;
            const float* pr = P + i * nk;
            const float di = drow[i];
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) ds[j] = pr[j] * (ds[j] - di);  // dS = P * (dP - D)
          }
          gemm_rm(false, false, mq, D, nk, p.scale, dP, nk, K, ldk, 1.f, dqacc.data(), D);  // dQ += dS K
          gemm_rm(true, false, nk, D, mq, p.scale, dP, nk, Q, ldq, 1.f, dK + k0 * D, D);    // dK += dS^T Q
        }
        store_rows(dqacc.data(), D, mq, D, dqd + b * dqs.b + q0 * dqs.s + h * dqs.h, dqs.s);
      }
    }
  });
}


}  // namespace

namespace {

// out_dtype / grad_dtype: the input dtype (default) or float32, for partials that are merged or summed
// across ring steps before being rounded once.
at::ScalarType result_dtype(const std::optional<at::ScalarType>& want, at::ScalarType in, const char* name) {
  if (!want.has_value()) return in;
  TORCH_CHECK(*want == in || *want == at::kFloat, name, " must be the input dtype ", in, " or float32; got ",
              *want);
  return *want;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                      const at::Tensor& v_in,
                                                      const std::optional<at::Tensor>& block_mask,
                                                      int64_t block_size, bool causal, double softmax_scale,
                                                      std::optional<at::ScalarType> out_dtype) {
  check_common(q_in, k_in, v_in, block_mask, block_size, softmax_scale);
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in), v = inner_contiguous(v_in);
  const Problem p = make_problem(q, k, causal, softmax_scale, block_mask, block_size);
  const at::ScalarType odt = result_dtype(out_dtype, q.scalar_type(), "out_dtype");
  at::Tensor out = at::empty({p.B, p.Sq, p.Hq, p.D}, q.options().dtype(odt));
  at::Tensor lse = at::empty({p.B, p.Hq, p.Sq}, q.options().dtype(at::kFloat));
  if (p.B * p.Sq * p.Hq == 0) return {out, lse};
  // One query row per head with GQA/MQA: the grouped decode tile (decode_kernel).
  const bool decode = p.Sq == 1 && p.q_per_kv > 1 && p.mask == nullptr;
  if (p.brgemm && !decode) {
    if (odt == at::kFloat) {
      forward_brgemm<float>(p, q, k, v, out, lse);
    } else {
      forward_brgemm<at::BFloat16>(p, q, k, v, out, lse);
    }
    return {out, lse};
  }
#ifdef LONGMOE_BF16_DOT
  if (p.bf16_dot && !decode) {
    if (odt == at::kFloat) {
      forward_bf16_dot<float>(p, q, k, v, out, lse);
    } else {
      forward_bf16_dot<at::BFloat16>(p, q, k, v, out, lse);
    }
    return {out, lse};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "longmoe_flash_attn_fwd", [&] {
    if (odt == at::kFloat) {
      (decode ? decode_kernel<scalar_t, float> : forward_kernel<scalar_t, float>)(p, q, k, v, out, lse);
    } else {
      (decode ? decode_kernel<scalar_t, scalar_t> : forward_kernel<scalar_t, scalar_t>)(p, q, k, v, out, lse);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& block_mask,
    int64_t block_size, bool causal, double softmax_scale, const std::optional<at::Tensor>& delta_in,
    std::optional<at::ScalarType> grad_dtype) {
  check_common(q_in, k_in, v_in, block_mask, block_size, softmax_scale);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes(), "dout must have q's shape ", q_in.sizes(), "; got ",
              dout_in.sizes());
  TORCH_CHECK(dout_in.scalar_type() == q_in.scalar_type(), "dout must have q's dtype ", q_in.scalar_type(),
              "; got ", dout_in.scalar_type());
  TORCH_CHECK(out_in.has_value() || delta_in.has_value(),
              "flash_attn_bwd needs out (to compute rowsum(dout * out)) or delta; got neither");
  const int64_t B = q_in.size(0), Sq = q_in.size(1), Hq = q_in.size(2);
  at::Tensor out, delta;
  if (delta_in.has_value()) {
    delta = *delta_in;
    TORCH_CHECK(delta.scalar_type() == at::kFloat, "delta must be float32; got ", delta.scalar_type());
    TORCH_CHECK(delta.dim() == 3 && delta.size(0) == B && delta.size(1) == Hq && delta.size(2) == Sq,
                "delta must be (batch, heads_q, seqlen_q) = (", B, ", ", Hq, ", ", Sq, "); got ", delta.sizes());
  } else {
    out = inner_contiguous(*out_in);
    TORCH_CHECK(out.sizes() == q_in.sizes(), "out must have q's shape ", q_in.sizes(), "; got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == q_in.scalar_type(), "out must have q's dtype ", q_in.scalar_type(),
                "; got ", out.scalar_type(), " (pass delta = rowsum(dout * out) for another dtype)");
  }
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "lse must be float32; got ", lse.scalar_type());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) == Sq,
              "lse must be (batch, heads_q, seqlen_q) = (", B, ", ", Hq, ", ", Sq, "); got ", lse.sizes());
  const at::Tensor q = inner_contiguous(q_in), k = inner_contiguous(k_in), v = inner_contiguous(v_in);
  const at::Tensor dout = inner_contiguous(dout_in);
  const Problem p = make_problem(q, k, causal, softmax_scale, block_mask, block_size);
  const at::ScalarType gdt = result_dtype(grad_dtype, q.scalar_type(), "grad_dtype");
  at::Tensor dq = at::empty({p.B, p.Sq, p.Hq, p.D}, q.options().dtype(gdt));
  at::Tensor dk_acc = at::zeros({p.B, p.Hq, p.Sk, p.D}, q.options().dtype(at::kFloat));
  at::Tensor dv_acc = at::zeros({p.B, p.Hq, p.Sk, p.D}, q.options().dtype(at::kFloat));
  if (p.B * p.Sq * p.Hq > 0 && p.Sk > 0) {
#ifdef LONGMOE_BF16_DOT
    if (p.bf16_dot) {
      if (gdt == at::kFloat) {
        backward_bf16_dot<float>(p, dout, q, k, v, out, delta, lse, dq, dk_acc, dv_acc);
      } else {
        backward_bf16_dot<at::BFloat16>(p, dout, q, k, v, out, delta, lse, dq, dk_acc, dv_acc);
      }
    } else
#endif
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "longmoe_flash_attn_bwd", [&] {
        if (gdt == at::kFloat) {
          backward_kernel<scalar_t, float>(p, dout, q, k, v, out, delta, lse, dq, dk_acc, dv_acc);
        } else {
          backward_kernel<scalar_t, scalar_t>(p, dout, q, k, v, out, delta, lse, dq, dk_acc, dv_acc);
        }
      });
  } else {
    dq.zero_();
  }
  // (B, Hq, Sk, D) -> sum over the query heads of each KV head -> (B, Sk, Hkv, D) in the gradient dtype.
  auto fold = [&](const at::Tensor& acc) {
    at::Tensor g = p.q_per_kv == 1 ? acc : acc.view({p.B, p.Hkv, p.q_per_kv, p.Sk, p.D}).sum(2);
    return g.permute({0, 2, 1, 3}).to(gdt).contiguous();
  };
  return {dq, fold(dk_acc), fold(dv_acc)};
}

bool native_has_blas() { return have_blas(); }

bool native_has_bf16_dot() {
#ifdef LONGMOE_BF16_DOT
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace longmoe
