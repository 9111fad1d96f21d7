// Grouped expert GEMMs on oneDNN's micro-kernels (at::native::cpublas::brgemm) for experts with few rows: the
// fine-grained MoE regime (64-256 experts, top-8, 30-600 rows per expert at 2K-8K tokens). bf16 where the
// micro-kernels run it (brgemm_bf16_available(): AMX, or AVX512-BF16 without AMX; all three kinds), and the fp32
// forward (AVX-512; see grouped_f32). The thresholds below were tuned on the AMX CPU.
//
// Why: at::mm_out per expert costs about 60 us of fixed work per bf16 call on an AMX CPU (oneDNN reorders the
// weight into its blocked layout inside every call), against ~10 us of AMX work for 64 rows x 128 x 1024; 256
// experts x 128 wide x H 1024 ran at 270 GFLOP/s vs 1.6 TFLOP/s for one large GEMM (2-core Xeon VM, one thread).
// Here each expert's B operand is packed into the micro-kernel's VNNI layout by our own AVX-512 packers (an
// L2-resident buffer per thread), and its rows run as brgemm calls of kMB rows x kNB columns with A read in
// place. Experts with more rows than kMaxRows[kind] are left to the caller's at::mm_out (oneDNN's own blocking
// suits large GEMMs, and its fixed cost is small next to them).
//
// Measured (same VM, one thread, H 1024, top-8, uniform routing; the six GEMMs of a SwiGLU layer's forward and
// backward, this path vs mm_out for every expert): 2K tokens: 256 experts x 64 wide 107 -> 48 ms, 128 x 128
// 107 -> 60 ms, 64 x 256 120 -> 91 ms; 8K tokens: 234 -> 156, 279 -> 240, 389 -> 363 ms.
//
// Same contract as moe_grouped_mm_cpu (grouped_gemm.cpp): kind 0 y = x_e w_e^T, kind 1 dx = dy_e w_e, kind 2
// dw_e = dy_e^T x_e. B operands are packed by vnni_pack.h (its header gives the layout).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_paths.h"
#include "moe/grouped_gemm.h"
#include "vnni_pack.h"
#include "work_queue.h"

namespace longmoe {

#if defined(__AVX512BF16__) && defined(__AVX512BW__)

namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kNB = kVnniN;  // output columns per packed block (the brgemm N)
constexpr int64_t kMB = 64;  // rows per brgemm call: 64 rows x K stay in L2 across the column blocks
// Experts with more rows than this run at::mm_out, by kind (forward, dx, dw): where oneDNN's own blocking
// overtook these kernels (one thread, H 1024, 8K tokens x top-8: at 512 rows per expert brgemm won dx and dw
// and tied the forward; at 1024 rows mm_out won the forward and dx by 10-15%, brgemm still won dw by 15%).
constexpr int64_t kMaxRows[3] = {512, 512, 1024};
// ... but in the forward and dx, an expert whose packed weight exceeds the L2 (2 MB per core on that Xeon) streams
// it from memory once per kMB rows: such experts run here only up to kMB rows. 8 experts x 2816 wide, 512 rows
// each, bf16, one thread: forward 74.7 -> 50.2 ms (H -> 2F), 32.3 -> 24.6 ms (F -> H); dx 69.8 -> 57.1 and
// 33.0 -> 22.9 ms with mm_out. The fine-grained weights (<= 1 MB at 64 x 256) stay in L2.
constexpr int64_t kMaxPackedBytes = int64_t{2} << 20;
// The forward of experts with a long input (K = in >= kBlockPackMinK: the up projection, H -> 2F) packs and runs
// one kNB-column block of the weight at a time, so that the packed block (128 KB at K 1024) stays in the L2 beside
// the expert's rows instead of the whole packed weight (1 MB at 2F = 512). One thread, bf16, H 1024, 2K tokens x
// top-8: 64 experts x 2F 512 28.4-30.4 -> 26.4 ms, 128 x 256 20.2-21.2 -> 19.2-19.7 ms, 256 x 128 unchanged; layer
// forward+backward at 64 x 256 1.01-1.03x. With a short K (the down projection, K = F <= 256) and for dx it was
// slower (F -> H forward 12.2 -> 13.8 ms, fc1 dx 23 -> 27 ms at 64 x 256), so those pack the whole weight.
constexpr int64_t kBlockPackMinK = 1024;
// fp32 forward: experts of at most kMaxRowsF32 rows, K (input width) at least kMinKF32. One thread, 8K tokens:
// at 1024 rows per expert brgemm still matched mm_out; with K = 64-256 (the down projection) it lost 5-10%.
constexpr int64_t kMaxRowsF32 = 1024, kMinKF32 = 512;

// LONGMOE_NATIVE_BRGEMM=0 keeps fp32 on mm_out (as LONGMOE_NATIVE_AMX=0 does bf16), so that both paths are
// testable on one machine.
bool brgemm_f32_enabled() {
  static const bool on = !native_path_off("LONGMOE_NATIVE_BRGEMM");
  return on;
}

// On AMD CPUs every fp32 kind runs here, at any K and row count: mm_out's fp32 GEMM is MKL's sgemm, which ran at
// half the micro-kernels' rate there. Zen 5 core, one thread, H 1024, 2K tokens x top-8, the six GEMMs of a SwiGLU
// layer (benchmarks/moe_gemms.py, fp32): 64 experts x 256 wide 631 -> 344 ms, 128 x 128 352 -> 194 ms, 256 x 64
// 205 -> 120 ms, 8 x 2816 1543 -> 874 ms (the equal-FLOP dense GEMMs, on MKL: 704, 373, 203, 1865 ms).
bool brgemm_f32_all_kinds() {
  static const bool on = brgemm_f32_enabled() && __builtin_cpu_is("amd");
  return on;
}

// A growable buffer aligned to a cache line: AMX tile rows (64 bytes) that straddle two lines load at half speed.
template <typename T>
class Buffer {
 public:
  T* data() const { return p_.get(); }
  void resize(int64_t n) {
    if (n <= n_) return;
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
    p_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    TORCH_CHECK(p_ != nullptr, "moe_grouped_mm: could not allocate ", bytes, " bytes of scratch");
    n_ = n;
  }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
  int64_t n_ = 0;
};

struct Scratch {
  Buffer<bf16> a, b, t;  // A row chunk (padded stride); the expert's packed B blocks; kind 2 staging
  Buffer<float> c;       // brgemm output block
  bool stream = false;   // output stores non-temporal (see moe_grouped_mm_brgemm)
  ~Scratch() { cpublas::brgemm_release(); }
};

// Row stride of an A operand built in scratch: whole cache lines, plus one when the row is a multiple of 256
// bytes (at power-of-two strides the 16 rows of an AMX A tile share few L1 sets).
int64_t padded_ld(int64_t K) {
  const int64_t k = (K + 31) / 32 * 32;  // whole cache lines
  return k % 128 == 0 ? k + 32 : k;
}

// out[r, c] = sum_k A[r, k] B[k, c] for r < rows, c < N: B packed by column blocks of kNB, block j at
// B + j * kpad(K) * kNB; A rows at stride lda, zero in columns [K, kpad(K)); stored as bf16 at row stride ldd,
// row r at dst + r * ldd, or at dst + dst_rows[r] * ldd where dst_rows is given (a scattered output).
void run_blocks(Scratch& s, const bf16* A, int64_t lda, int64_t rows, int64_t K, const bf16* B, int64_t N, bf16* dst,
                int64_t ldd, const int64_t* dst_rows) {
  const int64_t Kp = kpad(K), row_bytes = ldd * static_cast<int64_t>(sizeof(bf16));
  for (int64_t c0 = 0; c0 < N; c0 += kNB) {
    const bf16* Bj = B + (c0 / kNB) * Kp * kNB;
    const int64_t nc = std::min(kNB, N - c0);
    cpublas::brgemm(rows, kNB, Kp, lda, kNB, kNB, false, A, Bj, s.c.data());
    if (dst_rows != nullptr) {
      for (int64_t r = 0; r < rows; ++r) {
        bf16* d = dst + dst_rows[r] * ldd + c0;
        if (s.stream && nc == kNB && stream_rows_ok(d, row_bytes))
          store_bf16_stream(s.c.data() + r * kNB, kNB, 1, kNB, d, ldd);
        else
          store_bf16(s.c.data() + r * kNB, kNB, 1, nc, d, ldd);
      }
    } else if (s.stream && nc == kNB && stream_rows_ok(dst + c0, row_bytes)) {
      store_bf16_stream(s.c.data(), kNB, rows, kNB, dst + c0, ldd);
    } else {
      store_bf16(s.c.data(), kNB, rows, nc, dst + c0, ldd);
    }
  }
}

// C = A B for an expert whose B is packed in s.b, kMB rows of A (n rows at stride ld_src) at a time. A is read
// in place when it holds zeros up to kpad(K) (`zero_padded`, kind 2's dy^T) or K is whole tile rows; otherwise
// each chunk is copied into s.a with the zero columns. (Copying every A into a padded stride was measured
// slower: 65K rows x 2 KB at 8K tokens cost more in memcpy than the L1 conflicts it avoided.)
// dst_rows: as in run_blocks, for the expert's rows (dst is then the output's first row).
void run_expert(Scratch& s, const bf16* A, int64_t ld_src, bool zero_padded, int64_t n, int64_t K, int64_t N,
                bf16* dst, int64_t ldd, const int64_t* dst_rows = nullptr) {
  const bool copy = !zero_padded && K % 32 != 0;
  const int64_t lda = copy ? padded_ld(K) : ld_src;
  if (copy) s.a.resize(std::min(kMB, n) * lda);
  for (int64_t r0 = 0; r0 < n; r0 += kMB) {
    const int64_t mr = std::min(kMB, n - r0);
    const bf16* a = A + r0 * ld_src;
    if (copy) {
      for (int64_t r = 0; r < mr; ++r) {
        bf16* d = s.a.data() + r * lda;
        std::memcpy(static_cast<void*>(d), a + r * ld_src, K * sizeof(bf16));
        std::memset(static_cast<void*>(d + K), 0, (kpad(K) - K) * sizeof(bf16));
      }
      a = s.a.data();
    }
    run_blocks(s, a, lda, mr, K, s.b.data(), N, dst_rows != nullptr ? dst : dst + r0 * ldd, ldd,
               dst_rows != nullptr ? dst_rows + r0 : nullptr);
  }
}

// First row of each expert (E + 1 entries, the last = total rows) and its work-queue cost: rows + empty_cost,
// or 0 for experts over max_rows (left to the caller's mm_out).
struct ExpertWork {
  std::vector<int64_t> start, cost;
  ExpertWork(at::IntArrayRef counts, int64_t max_rows, int64_t empty_cost)
      : start(counts.size() + 1, 0), cost(counts.size()) {
    for (size_t e = 0; e < counts.size(); ++e) {
      start[e + 1] = start[e] + counts[e];
      cost[e] = counts[e] > max_rows ? 0 : counts[e] + empty_cost;
    }
  }
};

// C (rows, nc) at ldc = A (rows, K) at lda times B (K, nc) at ldb kNB, fp32, K summed in chunks of kKcF32 added
// into C: the micro-kernel sums each chunk in order, so the rounding error grows with the chunk, not with K (a
// dw with K = 1025 rows was 3x torch.mm's error of fp64 summed in one go).
constexpr int64_t kKcF32 = 256;
void brgemm_f32_chunked(int64_t rows, int64_t nc, int64_t K, const float* A, int64_t lda, const float* B, float* C,
                        int64_t ldc) {
  for (int64_t k0 = 0; k0 < K; k0 += kKcF32)
    cpublas::brgemm(rows, nc, std::min(kKcF32, K - k0), lda, kNB, ldc, k0 > 0, A + k0, B + k0 * kNB, C);
}

// fp32 grouped GEMMs on oneDNN's AVX-512 brgemm (no VNNI), experts of up to max_rows rows (the rest are the
// caller's mm_out); B's kNB-column blocks go into a contiguous buffer, results straight into the output.
//   kind 0 (forward): B = w_e^T, a 32-bit transpose of the block's rows of w_e. One thread, AMX Xeon, H 1024 ->
//     2F, top-8: 256 experts x 128 at 2K tokens 43.7 -> 27.2 ms, 8K 122 -> 95 ms; 128 x 256 57 -> 49 and 204 ->
//     179 ms. On that Intel CPU only the forward runs here, K >= kMinKF32: the dx and dw, with B packed or read
//     in place, were no faster than MKL's own small GEMMs, and dw at 64-row experts was 20% slower.
//   kind 1 (dx, a = dy (N, outf), b = w (E, outf, in) -> (N, in)) and kind 2 (dw, a = dy, b = x (N, in) ->
//     (E, outf, in); A = dy_e^T, a 32-bit transpose of the expert's rows): where brgemm_f32_all_kinds().
void grouped_f32(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind, at::Tensor& out,
                 int64_t max_rows) {
  const int64_t outf = kind == 2 ? a.size(1) : b.size(1), in = kind == 2 ? b.size(1) : b.size(2);
  const ExpertWork ew(counts, max_rows, kind == 2 ? 1 : 0);  // an empty expert still zero-fills its dw
  const std::vector<int64_t>& start = ew.start;
  const float* ad = a.data_ptr<float>();
  const float* bd = b.data_ptr<float>();
  float* od = out.data_ptr<float>();
  const WorkQueue work(ew.cost);
  at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
    Buffer<float> bp, at_;
    for (int64_t e; work.next(e);) {
      const int64_t n = counts[e], r0 = start[e];
      if (n > max_rows) continue;  // the caller's mm_out
      if (kind == 0) {  // y_e [n, outf] = x_e [n, in] w_e^T
        if (n == 0) continue;
        const float* w = bd + e * outf * in;
        bp.resize(in * kNB);
        for (int64_t c0 = 0; c0 < outf; c0 += kNB) {
          const int64_t nc = std::min(kNB, outf - c0);
          transpose_u32(reinterpret_cast<const uint32_t*>(w + c0 * in), in, nc, in,
                        reinterpret_cast<uint32_t*>(bp.data()), kNB);
          for (int64_t m0 = 0; m0 < n; m0 += kMB)
            brgemm_f32_chunked(std::min(kMB, n - m0), nc, in, ad + (r0 + m0) * in, in, bp.data(),
                               od + (r0 + m0) * outf + c0, outf);
        }
      } else if (kind == 1) {  // dx_e [n, in] = dy_e [n, outf] w_e [outf, in]
        if (n == 0) continue;
        const float* w = bd + e * outf * in;
        bp.resize(outf * kNB);
        for (int64_t c0 = 0; c0 < in; c0 += kNB) {
          const int64_t nc = std::min(kNB, in - c0);
          for (int64_t k = 0; k < outf; ++k)
            std::memcpy(bp.data() + k * kNB, w + k * in + c0, nc * sizeof(float));
          for (int64_t m0 = 0; m0 < n; m0 += kMB)
            brgemm_f32_chunked(std::min(kMB, n - m0), nc, outf, ad + (r0 + m0) * outf, outf, bp.data(),
                               od + (r0 + m0) * in + c0, in);
        }
      } else {  // dw_e [outf, in] = dy_e^T [outf, n] x_e [n, in]
        float* dw = od + e * outf * in;
        if (n == 0) {
          std::memset(static_cast<void*>(dw), 0, outf * in * sizeof(float));
          continue;
        }
        at_.resize(outf * n);
        transpose_u32(reinterpret_cast<const uint32_t*>(ad + r0 * outf), outf, n, outf,
                      reinterpret_cast<uint32_t*>(at_.data()), n);
        const float* x = bd + r0 * in;
        bp.resize(n * kNB);
        for (int64_t c0 = 0; c0 < in; c0 += kNB) {
          const int64_t nc = std::min(kNB, in - c0);
          for (int64_t r = 0; r < n; ++r) std::memcpy(bp.data() + r * kNB, x + r * in + c0, nc * sizeof(float));
          for (int64_t m0 = 0; m0 < outf; m0 += kMB)
            brgemm_f32_chunked(std::min(kMB, outf - m0), nc, n, at_.data() + m0 * n, n, bp.data(), dw + m0 * in + c0,
                               in);
        }
      }
    }
    cpublas::brgemm_release(false);
  });
}

}  // namespace

int64_t moe_grouped_mm_brgemm(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef counts, int64_t kind,
                              at::Tensor& out, bool stream, const int64_t* dst_rows) {
  if (!a.is_contiguous() || !b.is_contiguous()) return -1;
  // Scattered rows: bf16 kinds 0 and 1. (fp32 through a staging block ran no faster than the two steps on a Zen 5
  // core: layer forward+backward 0.997-0.998x at 128:8:128 and 256:8:64.)
  if (dst_rows != nullptr && (kind == 2 || a.scalar_type() != at::kBFloat16)) return -1;
  if (a.scalar_type() == at::kFloat) {
    if (brgemm_f32_all_kinds()) {
      grouped_f32(a, b, counts, kind, out, std::numeric_limits<int64_t>::max());
      return std::numeric_limits<int64_t>::max();
    }
    if (kind != 0 || b.size(2) < kMinKF32 || !brgemm_f32_enabled()) return -1;
    grouped_f32(a, b, counts, 0, out, kMaxRowsF32);
    return kMaxRowsF32;
  }
  if (a.scalar_type() != at::kBFloat16 || !brgemm_bf16_available()) return -1;
  // K of the packed operand must be even where a row pair of a (or w) is read as one 32-bit word.
  const int64_t in = kind == 2 ? b.size(1) : b.size(2), outf = kind == 2 ? a.size(1) : b.size(1);
  if ((kind == 0 && in % 2 != 0) || (kind == 1 && outf % 2 != 0)) return -1;
  const int64_t max_rows = kind != 2 && in * outf * 2 > kMaxPackedBytes ? kMB : kMaxRows[kind];
  const ExpertWork ew(counts, max_rows, 1);  // an empty expert still zero-fills its dw
  const std::vector<int64_t>& start = ew.start;

  const bf16* ad = a.data_ptr<bf16>();
  const bf16* bd = b.data_ptr<bf16>();
  bf16* od = out.data_ptr<bf16>();
  const auto blocks = [](int64_t N) { return (N + kNB - 1) / kNB; };
  // Where kinds 0 and 1 store an expert's rows (first row r0, output width ldd, from column c0): in place, or
  // scattered by dst_rows (then the output's base and the expert's part of dst_rows).
  const auto out_at = [&](int64_t r0, int64_t ldd, int64_t c0) {
    return od + (dst_rows != nullptr ? 0 : r0 * ldd) + c0;
  };
  const auto rows_at = [&](int64_t r0) { return dst_rows != nullptr ? dst_rows + r0 : nullptr; };
  const WorkQueue work(ew.cost);
  at::parallel_for(0, work.threads(), 1, [&](int64_t, int64_t) {
    Scratch s;
    s.c.resize(kMB * kNB);
    s.stream = stream;
    for (int64_t e; work.next(e);) {
      const int64_t n = counts[e], r0 = start[e];
      if (n > max_rows) continue;  // the caller's mm_out
      if (kind == 0) {  // y_e [n, outf] = x_e [n, in] w_e^T; B = w_e^T [in, outf], packed from w_e's rows
        if (n == 0) continue;
        const bf16* w = bd + e * outf * in;
        if (in >= kBlockPackMinK && in % 32 == 0) {  // one packed column block at a time (kBlockPackMinK)
          s.b.resize(kpad(in) * kNB);
          for (int64_t c0 = 0; c0 < outf; c0 += kNB) {
            const int64_t nc = std::min(kNB, outf - c0);
            pack_cols(w + c0 * in, in, in, nc, s.b.data());
            run_expert(s, ad + r0 * in, in, false, n, in, nc, out_at(r0, outf, c0), outf, rows_at(r0));
          }
          continue;
        }
        s.b.resize(blocks(outf) * kpad(in) * kNB);
        for (int64_t c0 = 0; c0 < outf; c0 += kNB)
          pack_cols(w + c0 * in, in, in, std::min(kNB, outf - c0), s.b.data() + (c0 / kNB) * kpad(in) * kNB);
        run_expert(s, ad + r0 * in, in, false, n, in, outf, out_at(r0, outf, 0), outf, rows_at(r0));
      } else if (kind == 1) {  // dx_e [n, in] = dy_e [n, outf] w_e; B = w_e [outf, in]
        if (n == 0) continue;
        const bf16* w = bd + e * outf * in;
        s.b.resize(blocks(in) * kpad(outf) * kNB);
        pack_rows(w, in, outf, in, s.b.data());
        run_expert(s, ad + r0 * outf, outf, false, n, outf, in, out_at(r0, in, 0), in, rows_at(r0));
      } else {  // dw_e [outf, in] = dy_e^T [outf, n] x_e [n, in]; A = dy_e^T, B = x_e
        bf16* dw = od + e * outf * in;
        if (n == 0) {
          std::memset(static_cast<void*>(dw), 0, outf * in * sizeof(bf16));
          continue;
        }
        const int64_t np = (n + 1) / 2 * 2, lda = padded_ld(n);  // n rounded up to a row pair
        const bf16* x = bd + r0 * in;
        s.b.resize(blocks(in) * kpad(n) * kNB);
        pack_rows(x, in, n, in, s.b.data());
        // dy_e^T [outf, kpad(n)] at stride lda: row pairs of dy_e interleaved, a 32-bit transpose of the pairs,
        // zero columns from np.
        const bf16* dy = ad + r0 * outf;
        s.t.resize(np * outf);
        for (int64_t k = 0; k < n; k += 2)
          interleave_rows(dy + k * outf, k + 1 < n ? dy + (k + 1) * outf : nullptr, outf, s.t.data() + k * outf);
        s.a.resize(outf * lda);
        transpose_u32(reinterpret_cast<const uint32_t*>(s.t.data()), outf, np / 2, outf,
                      reinterpret_cast<uint32_t*>(s.a.data()), lda / 2);
        for (int64_t o = 0; o < outf; ++o)
          std::memset(static_cast<void*>(s.a.data() + o * lda + np), 0, (kpad(n) - np) * sizeof(bf16));
        run_expert(s, s.a.data(), lda, true, outf, n, in, dw, in);
      }
    }
    if (stream) stream_fence();  // this thread's non-temporal stores visible before the join
  });
  return max_rows;
}

#else  // no AVX512-BF16 / AVX512-BW at build time: the mm_out path only

int64_t moe_grouped_mm_brgemm(const at::Tensor&, const at::Tensor&, at::IntArrayRef, int64_t, at::Tensor&, bool,
                              const int64_t*) {
  return -1;
}

#endif

}  // namespace longmoe
