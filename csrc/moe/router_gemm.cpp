// out = a @ b in fp32 for bf16 a and b, on oneDNN's bf16 brgemm micro-kernels (AMX / AVX512-BF16): the logits of
// the fp32 router of a bf16 model (MoEConfig.router_dtype="float32"), x @ w^T, without an fp32 GEMM.
//
// Exactness: a product of two bf16 values is exact in fp32 and the micro-kernels accumulate in fp32, so this is
// the fp32 GEMM of the same operands (a.float() @ b.float()) up to summation order. Where the micro-kernels do not
// run bf16 (brgemm_bf16_available(): AMX, or AVX512-BF16 in an AVX512-BF16 build), or with LONGMOE_NATIVE_AMX=0,
// the op is that fp32 mm. On a Zen 5 core (AVX512-BF16, no AMX) 2K tokens x 1024 -> 256 experts: 10.6 -> 2.1 ms.
//
// Measured (2-core Xeon VM with AMX, one thread; 256 experts, H 1024): 2K tokens 6.6 -> 1.7 ms, 8K tokens
// 26.4 -> 6.5 ms. The router's backward stays in fp32 (its gradient is fp32): splitting it into three bf16
// terms to keep fp32 accuracy took 3x the bf16 FLOPs and ran no faster than the fp32 GEMMs (dx 7.4 vs 6.2 ms,
// dw 9.4 vs 6.7 ms at 2K tokens).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_paths.h"
#include "moe/moe_dispatch.h"
#include "vnni_pack.h"

namespace longmoe {

#if defined(LONGMOE_VNNI_PACK)

namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kMB = 64;  // rows of a per brgemm call

// B (K, N) bf16 as VNNI column blocks of kVnniN, K padded to Kp: block j at dst + j * Kp * kVnniN. Rows of B
// contiguous (b.stride(1) == 1): pack_rows over a share of the blocks per thread; columns contiguous (b is a
// transposed (N, K) tensor, K even, 4-byte rows): pack_cols per block.
void pack_b(const at::Tensor& b, int64_t Kp, bf16* dst) {
  const int64_t K = b.size(0), N = b.size(1), nblk = (N + kVnniN - 1) / kVnniN;
  const bf16* src = b.data_ptr<bf16>();
  if (b.stride(1) == 1) {
    at::parallel_for(0, nblk, 1, [&](int64_t j0, int64_t j1) {
      pack_rows(src + j0 * kVnniN, b.stride(0), K, std::min(N, j1 * kVnniN) - j0 * kVnniN, dst + j0 * Kp * kVnniN,
                Kp);
    });
  } else {
    at::parallel_for(0, nblk, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j)
        pack_cols(src + j * kVnniN * b.stride(1), b.stride(1), K, std::min(kVnniN, N - j * kVnniN),
                  dst + j * Kp * kVnniN);
    });
  }
}

void mm_brgemm(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1), Kp = kpad(K), nblk = (N + kVnniN - 1) / kVnniN;
  std::vector<bf16> packed(nblk * Kp * kVnniN);
  pack_b(b, Kp, packed.data());
  // A's rows (unit column stride: the caller made it so) are read in place when K is whole tile rows; otherwise
  // each chunk of kMB rows is copied into scratch with zero columns up to Kp.
  const bool in_place = K == Kp;
  const bf16* ad = a.data_ptr<bf16>();
  float* od = out.data_ptr<float>();
  at::parallel_for(0, (M + kMB - 1) / kMB, 1, [&](int64_t c0, int64_t c1) {
    std::vector<bf16> scratch(in_place ? 0 : kMB * Kp);  // value-initialised: the zero columns stay zero
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * kMB, mr = std::min(kMB, M - r0);
      const bf16* A = ad + r0 * a.stride(0);
      int64_t lda = a.stride(0);
      if (!in_place) {
        for (int64_t r = 0; r < mr; ++r)
          std::memcpy(static_cast<void*>(scratch.data() + r * Kp), A + r * a.stride(0), K * sizeof(bf16));
        A = scratch.data();
        lda = Kp;
      }
      for (int64_t j = 0; j < nblk; ++j)
        cpublas::brgemm(mr, std::min(kVnniN, N - j * kVnniN), Kp, lda, kVnniN, N, false, A,
                        packed.data() + j * Kp * kVnniN, od + r0 * N + j * kVnniN);
    }
    cpublas::brgemm_release();
  });
}

}  // namespace

#endif  // LONGMOE_VNNI_PACK

at::Tensor mm_bf16_f32_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "longmoe::mm_bf16_f32: a (M, K) and b (K, N) ",
              "expected; got a ", a.sizes(), ", b ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16,
              "longmoe::mm_bf16_f32: a and b must be bfloat16; got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "longmoe::mm_bf16_f32 CPU kernel got tensors on ",
              a.device(), " and ", b.device());
  auto out = at::empty({a.size(0), b.size(1)}, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (a.size(1) == 0) return out.zero_();
#if defined(LONGMOE_VNNI_PACK)
  if (brgemm_bf16_available()) {
    // pack_cols moves element pairs as 32-bit words: b's columns contiguous, K even, rows on 4-byte boundaries.
    const bool cols_ok =
        b.stride(0) == 1 && b.size(0) % 2 == 0 && rows_are_words(b.data_ptr<bf16>(), b.stride(1), 2, 2);
    const at::Tensor bb = b.stride(1) == 1 || cols_ok ? b : b.contiguous();
    mm_brgemm(a.stride(1) == 1 ? a : a.contiguous(), bb, out);
    return out;
  }
#endif
  return at::mm_out(out, a.to(at::kFloat), b.to(at::kFloat));
}

}  // namespace longmoe
