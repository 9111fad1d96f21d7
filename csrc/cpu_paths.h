// Switches of the CPU kernels' instruction-set paths.
#pragma once

#include <cstdlib>
#include <cstring>

namespace longmoe {

// An environment switch of one native path: true when the variable is set to "0" (LONGMOE_NATIVE_AMX,
// LONGMOE_NATIVE_BF16_DOT, LONGMOE_NATIVE_BRGEMM), so that the other path can be tested on the same machine.
inline bool native_path_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// oneDNN's brgemm micro-kernels (cpublas::brgemm) run bf16 x bf16 -> fp32 on this CPU with B in our VNNI
// layout, and LONGMOE_NATIVE_AMX is not "0": on AMX (PyTorch packs bf16 operands for it, cpublas::could_pack),
// or on AVX512-BF16 without AMX (Zen 4/5, Cooper Lake) in a build with AVX512-BF16 (LONGMOE_VNNI_PACK).
// Defined in attention/flash_attn_amx.cpp.
bool brgemm_bf16_available();

// The CPU has AMX for bf16 (cpublas::could_pack). There the AVX512-BF16 dot products ran slower than fp32 FMAs;
// without it they are the fastest bf16 path for the attention backward.
bool amx_bf16_available();

}  // namespace longmoe
