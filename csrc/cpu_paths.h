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

// PyTorch's brgemm packs bf16 operands for AMX on this CPU (cpublas::could_pack) and LONGMOE_NATIVE_AMX is
// not "0". Defined in attention/flash_attn_amx.cpp.
bool brgemm_bf16_available();

}  // namespace longmoe
