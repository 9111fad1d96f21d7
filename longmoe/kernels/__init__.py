"""Triton kernels (GPU path; on CPU only under TRITON_INTERPRET=1). Imported lazily by the op launchers."""
