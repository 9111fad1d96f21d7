// Whether the CPU kernels may use AMX through PyTorch's oneDNN micro-kernels (at::native::cpublas::brgemm).
#pragma once

namespace longmoe {

// PyTorch's brgemm packs bf16 operands for AMX on this CPU (cpublas::could_pack) and LONGMOE_NATIVE_AMX is
// not "0". Defined in attention/flash_attn_amx.cpp.
bool brgemm_bf16_available();

}  // namespace longmoe
