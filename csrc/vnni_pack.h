// bf16 operands in the VNNI layout of oneDNN's brgemm micro-kernels (at::native::cpublas::brgemm with
// is_vnni), packed by AVX-512 code of our own. Shared by the grouped expert GEMMs (moe/grouped_gemm_brgemm.cpp),
// the router's logits GEMM (moe/router_gemm.cpp), the AMX attention forward (attention/flash_attn_amx.cpp) and
// the XAttention scorer (xattention/antidiag.cpp).
//
// Layout of a packed [K, N] block, N = kVnniN columns (zero-padded), K rows zero-padded to an even count (here
// to whole AMX tile rows, kpad): element (k, n) at ((k / 2) * kVnniN + n) * 2 + k % 2, i.e. uint32 word (k / 2, n)
// holds rows 2p and 2p + 1 of column n. oneDNN's packing (cpublas::pack) writes the same layout, one block per
// call, through a scalar reorder.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "tile_math.h"

namespace longmoe {

using bf16 = at::BFloat16;

}  // namespace longmoe

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define LONGMOE_VNNI_PACK 1

namespace longmoe {

constexpr int64_t kVnniN = 64;  // columns per packed block (the brgemm N)

// Whether every row of a bf16 tensor with these element strides starts on a 4-byte boundary, so that its
// element pairs can be moved as uint32 words (transpose_u32 / pack_cols need it).
inline bool rows_are_words(const bf16* base, int64_t s0, int64_t s1, int64_t s2) {
  return s0 % 2 == 0 && s1 % 2 == 0 && s2 % 2 == 0 && reinterpret_cast<uintptr_t>(base) % 4 == 0;
}

// Zero-masked forms of the shuffles below (kAll16 in tile_math.h): the plain intrinsics pass GCC 12 an
// undefined source register and it warns (-Wmaybe-uninitialized) at every use.
constexpr __mmask8 kAll8 = 0xFF;

// dst[c * ldd + r] = src[r * lds + c] for 32-bit words, r < R, c < C (any R, C; tails masked).
inline void transpose_u32(const uint32_t* src, int64_t lds, int64_t R, int64_t C, uint32_t* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 < R; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, R - r0);
    for (int64_t c0 = 0; c0 < C; c0 += 16) {
      const int64_t nc = std::min<int64_t>(16, C - c0);
      const __mmask16 cm = static_cast<__mmask16>((1u << nc) - 1u);
      __m512i r[16], t[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = i < nr ? _mm512_maskz_loadu_epi32(cm, src + (r0 + i) * lds + c0) : _mm512_setzero_si512();
      for (int i = 0; i < 8; ++i) {  // t[2i], t[2i+1]: 32-bit interleave of rows 2i, 2i+1
        t[2 * i] = _mm512_maskz_unpacklo_epi32(kAll16, r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_maskz_unpackhi_epi32(kAll16, r[2 * i], r[2 * i + 1]);
      }
      for (int g = 0; g < 4; ++g) {  // r[4g + j]: columns j, 4 + j, 8 + j, 12 + j of rows 4g .. 4g + 3
        r[4 * g] = _mm512_maskz_unpacklo_epi64(kAll8, t[4 * g], t[4 * g + 2]);
        r[4 * g + 1] = _mm512_maskz_unpackhi_epi64(kAll8, t[4 * g], t[4 * g + 2]);
        r[4 * g + 2] = _mm512_maskz_unpacklo_epi64(kAll8, t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = _mm512_maskz_unpackhi_epi64(kAll8, t[4 * g + 1], t[4 * g + 3]);
      }
      for (int j = 0; j < 4; ++j) {  // 128-bit lanes: rows 0-7 and 8-15 of columns (j, 8 + j) and (4 + j, 12 + j)
        t[j] = _mm512_maskz_shuffle_i32x4(kAll16, r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_maskz_shuffle_i32x4(kAll16, r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_maskz_shuffle_i32x4(kAll16, r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_maskz_shuffle_i32x4(kAll16, r[8 + j], r[12 + j], 0xdd);
      }
      for (int j = 0; j < 4; ++j) {  // column j, 4 + j, 8 + j, 12 + j: all 16 rows
        r[j] = _mm512_maskz_shuffle_i32x4(kAll16, t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_maskz_shuffle_i32x4(kAll16, t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_maskz_shuffle_i32x4(kAll16, t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_maskz_shuffle_i32x4(kAll16, t[4 + j], t[12 + j], 0xdd);
      }
      const __mmask16 rm = static_cast<__mmask16>((1u << nr) - 1u);
      for (int64_t c = 0; c < nc; ++c) _mm512_mask_storeu_epi32(dst + (c0 + c) * ldd + r0, rm, r[c]);
    }
  }
}

// dst[2c] = r0[c], dst[2c + 1] = r1[c] (0 where r1 is null), c < nc: one VNNI row pair.
inline void interleave_rows(const bf16* r0, const bf16* r1, int64_t nc, bf16* dst) {
  static const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                             6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  static const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < nc; c += 32) {
    const int64_t n = std::min<int64_t>(32, nc - c);
    const __mmask32 m = n == 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << n) - 1u);
    const __m512i a = _mm512_maskz_loadu_epi16(m, r0 + c);
    const __m512i b = r1 != nullptr ? _mm512_maskz_loadu_epi16(m, r1 + c) : _mm512_setzero_si512();
    const __m512i x = _mm512_permutex2var_epi16(a, lo, b), y = _mm512_permutex2var_epi16(a, hi, b);
    if (n == 32) {
      _mm512_storeu_si512(dst + 2 * c, x);
      _mm512_storeu_si512(dst + 2 * c + 32, y);
    } else {  // 2n words: the first min(2n, 32) from x, the rest from y
      const int64_t nx = std::min<int64_t>(2 * n, 32), ny = 2 * n - nx;
      _mm512_mask_storeu_epi16(dst + 2 * c, static_cast<__mmask32>(nx == 32 ? ~0u : (1u << nx) - 1u), x);
      if (ny > 0) _mm512_mask_storeu_epi16(dst + 2 * c + 32, static_cast<__mmask32>((1u << ny) - 1u), y);
    }
  }
}

// The GEMMs' K, padded with zeros to whole AMX tile rows (32 bf16): oneDNN's brgemm runs K tails slowly
// (64 experts x 512 x 1024 dw, K = rows per expert ~ 256 +- 20: 50 ms with tails vs 37 ms split at 256).
inline int64_t kpad(int64_t K) { return (K + 31) / 32 * 32; }

// B[k][c] = src[k * ld + c], k < K, c < N (rows of src are B's rows) as VNNI blocks of kVnniN columns, block j
// at dst + j * Kp * kVnniN, zero-padded to Kp rows (kpad(K) unless given; even and >= K) and kVnniN columns.
// Row pairs outer, blocks inner, so that src streams row by row (block by block, the 128-byte pieces of 2 KB
// rows ran at DRAM latency).
inline void pack_rows(const bf16* src, int64_t ld, int64_t K, int64_t N, bf16* dst, int64_t Kp = 0) {
  if (Kp == 0) Kp = kpad(K);
  const int64_t nblk = (N + kVnniN - 1) / kVnniN, filled = (K + 1) / 2 * 2;
  for (int64_t j = 0; j < nblk; ++j) {
    bf16* d = dst + j * Kp * kVnniN;
    if (N - j * kVnniN < kVnniN)
      std::memset(static_cast<void*>(d), 0, Kp * kVnniN * sizeof(bf16));
    else
      std::memset(static_cast<void*>(d + filled * kVnniN), 0, (Kp - filled) * kVnniN * sizeof(bf16));
  }
  for (int64_t k = 0; k < K; k += 2) {
    const bf16* r0 = src + k * ld;
    const bf16* r1 = k + 1 < K ? r0 + ld : nullptr;
    for (int64_t j = 0; j < nblk; ++j) {
      const int64_t c0 = j * kVnniN;
      interleave_rows(r0 + c0, r1 != nullptr ? r1 + c0 : nullptr, std::min(kVnniN, N - c0),
                      dst + j * Kp * kVnniN + k * kVnniN);
    }
  }
}

// VNNI block of B[k][c] = src[c * ld + k], k < K (even), c < nc (rows of src are B's columns), zero up to
// [kpad(K), kVnniN]: the pairs (src[c][2p], src[c][2p + 1]) are already adjacent, so the block is a 32-bit transpose.
inline void pack_cols(const bf16* src, int64_t ld, int64_t K, int64_t nc, bf16* dst) {
  const int64_t filled = nc < kVnniN ? 0 : K * kVnniN;
  std::memset(static_cast<void*>(dst + filled), 0, (kpad(K) * kVnniN - filled) * sizeof(bf16));
  transpose_u32(reinterpret_cast<const uint32_t*>(src), ld / 2, nc, K / 2, reinterpret_cast<uint32_t*>(dst), kVnniN);
}

}  // namespace longmoe

#endif  // AVX512-BF16 and AVX512-BW
