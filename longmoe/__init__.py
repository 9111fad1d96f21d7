"""longmoe: long-context and Mixture-of-Experts runtime for PyTorch.

Subpackages: ``longmoe.runtime`` (native loader, backends, process groups, launcher, exchanger),
``longmoe.attention`` (attention core with LSE, merge), ``longmoe.kernels`` (Triton GPU kernels),
``longmoe.parallel`` (sequence parallelism: TokenRing, KV ring, Ulysses), ``longmoe.moe`` (Mixture of Experts),
``longmoe.inference`` (sharded KV cache and ``longmoe.generate``; imported on use, it needs transformers).
"""

from longmoe import attention, moe, parallel, runtime
from longmoe.attention import flash_attention, flash_attention_backward, merge_attention_partials

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
