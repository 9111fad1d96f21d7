"""Test-harness shims that let megatron-core 0.16.1 run on CPU (never imported by the library).

megatron-core calls CUDA unconditionally in places a CPU run reaches. Each shim names the call site it
replaces; they patch the process they run in (spawned test ranks only). Upstream defects hit on the way
are listed in README.md's Megatron-core section.
"""

from __future__ import annotations

import torch


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """rope_utils.get_pos_emb_on_this_cp_rank without its ``pin_memory=True`` / ``.cuda()`` index: the
    zigzag slice (chunks r and 2 CP - 1 - r) on the embedding's own device."""
    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    idx = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[seq_dim + 1 :])
    pos_emb = pos_emb.index_select(seq_dim, idx)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[seq_dim + 2 :])


def install() -> None:
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding

    # RotaryEmbedding.get_emb: ``self.inv_freq.to(device=torch.cuda.current_device())``: on CPU, "cpu".
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing's filesystem writer (preload_tensors): ``torch.cuda.synchronize()`` before copying
    # tensors to host memory; CPU tensors have nothing to wait for.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # RotaryEmbedding.forward under CP: a pinned, .cuda() index tensor.
    rope_utils.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _pos_emb_on_this_cp_rank
