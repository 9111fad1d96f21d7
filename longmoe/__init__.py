"""longmoe: long-context and Mixture-of-Experts runtime for PyTorch.

Subpackages: ``longmoe.runtime`` (native loader, backends, process groups, launcher, exchanger),
``longmoe.attention`` (attention core with LSE, merge), ``longmoe.kernels`` (Triton GPU kernels),
``longmoe.parallel`` (sequence parallelism: TokenRing, KV ring, Ulysses), ``longmoe.moe`` (Mixture of Experts),
``longmoe.inference`` (sharded KV cache and ``longmoe.generate``; imported on use, it needs transformers).
"""

import os as _os

# CPU tensors of 2 MB and more get 2 MB-aligned, huge-page-advised memory (PyTorch's THP_MEM_ALLOC_ENABLE):
# without it every large fresh tensor (a permute's rows, a GEMM's output) is first touched through 4 KB page
# faults. Measured (2-core Xeon VM, one thread, THP "madvise"): a 64 MB MoE permute 27 -> 12.5 ms, the
# MoE layer's forward+backward 0.77-0.84x the time. PyTorch reads the variable at its first CPU allocation,
# so it takes effect when longmoe is imported before any tensor exists (spawned ranks inherit it); set
# THP_MEM_ALLOC_ENABLE=0 beforehand to opt out. Kernels without THP, or with it set to "never", are left alone.


def _thp_usable() -> bool:
    """Transparent huge pages exist and are not off (elsewhere PyTorch's madvise would only warn)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


if _thp_usable():
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from longmoe import attention, moe, parallel, runtime  # noqa: E402
from longmoe.attention import (  # noqa: E402
    flash_attention,
    flash_attention_backward,
    merge_attention_partials,
)

# Opt-in: keep freed CPU memory in the heap (see longmoe/runtime/memory.py).
if _os.environ.get("LONGMOE_KEEP_CPU_MEMORY", "0") == "1":
    runtime.keep_cpu_memory()

# Load the C++ kernels now so torch.ops.longmoe.* exist after `import longmoe` (warns once if not built).
runtime.load_native()

__version__ = "0.1.0"
__all__ = [
    "attention",
    "moe",
    "parallel",
    "runtime",
    "flash_attention",
    "flash_attention_backward",
    "merge_attention_partials",
    "generate",
]


def generate(model, input_ids, **kwargs):
    """Generate with a Hugging Face causal LM across the ranks of a group: see
    :func:`longmoe.inference.generate` (imported lazily: it needs ``transformers``)."""
    from longmoe.inference import generate as _generate

    return _generate(model, input_ids, **kwargs)
