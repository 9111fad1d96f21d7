"""``ShardedKVCache``: a Hugging Face ``Cache`` whose K/V are sharded over a sequence-parallel group.

Every rank of the group holds one shard of every layer's K/V, for every sequence of the batch:

* **Prefill** writes, on each rank, the K/V of the prompt tokens the zigzag or contiguous layout gave that
  rank (the same tokens its sequence-parallel attention computed), so prefill adds no communication.
* **Decode (balanced append).** Every rank computes the new token's K/V (the non-attention part of a
  decode step is replicated, see :mod:`longmoe.inference.generation`); only the token's *owner* stores it.
  The owner of sequence ``b``'s next token is the rank holding the fewest of ``b``'s tokens, ties broken
  to the lowest rank. Every rank keeps the same ``(batch, world)`` table of token counts, so every rank
  knows the owner without communicating, and shards stay balanced within one token (the layouts
  themselves leave at most one token of imbalance per sequence).

Memory per rank is therefore ``ceil`` or ``floor`` of ``tokens / P`` per sequence and layer, i.e. ``1/P``
of the single-process cache within one token per layer and sequence (:meth:`ShardedKVCache.memory_bytes`).

Storage: per layer, ``keys`` / ``values`` buffers ``(batch, capacity, heads_kv, head_dim)`` (flash-attention
layout, so the decode kernel reads them without a copy), grown by doubling; ``lengths[b]`` tokens of row
``b`` are valid. Cached tokens carry no position: RoPE is applied before caching, and every cached token
precedes every decoded query, so decode attention over a shard needs no mask.

The HF ``Cache`` API: ``update`` (called by the attention modules), ``get_seq_length``, ``get_mask_sizes``,
``reset``, ``batch_select_indices`` and ``reorder_cache`` (beam search: rows are permuted locally; shards
stay valid because a row's shard layout moves with it), ``batch_repeat_interleave`` and ``crop``
(assisted decoding: every rank keeps the same per-token owner log, so each trims its own rows without
communicating) are supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache

from longmoe.runtime.distributed import group_key, world_and_rank

__all__ = ["ShardedKVCache", "balanced_owner"]


def balanced_owner(counts: list[int]) -> int:
    """The rank that stores the next token of a sequence whose shards hold ``counts[r]`` tokens on rank
    ``r``: the fewest tokens, ties to the lowest rank."""
    return min(range(len(counts)), key=lambda r: (counts[r], r))


@dataclass(slots=True)
class _Layer:
    """One layer's shard: keys/values (batch, capacity, heads_kv, head_dim); lengths[b] valid rows of b."""

    keys: torch.Tensor
    values: torch.Tensor
    lengths: list[int]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]


class ShardedKVCache(Cache):
    """A KV cache sharded over the ranks of ``group`` (see the module docstring for the policy).

    Args:
        batch_size: number of sequences B.
        group: the sequence-parallel process group (None: the default group, or one process).

    Phases are set by :func:`longmoe.generate` (or any caller running the model the same way):
    :meth:`plan_prefill` before the sequence-parallel prefill forward, :meth:`plan_decode` before each
    decode forward. ``update`` then stores what the plan says and returns this rank's shard.
    """

    def __init__(self, batch_size: int, *, group: dist.ProcessGroup | None = None):
        super().__init__(layers=[])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}; expected an int >= 1")
        self.group = group
        self.group_id = group_key(group)
        self.world, self.rank = world_and_rank(group)
        self.batch = batch_size
        # counts[b][r]: tokens of sequence b held by rank r (identical on every rank).
        self.counts: list[list[int]] = [[0] * self.world for _ in range(batch_size)]
        # owner_log[b][t]: the rank holding token t of sequence b (identical on every rank; None if the prefill
        # plan gave no owners). Each rank's shard of a sequence is in increasing token order, so the last
        # tokens of a sequence are the last rows of the shards that hold them: what crop relies on.
        self.owner_log: list[list[int]] | None = [[] for _ in range(batch_size)]
        self._plan: tuple | None = None

    # ------------------------------------------------------------------------------------- planning
    def plan_prefill(
        self, rows: list[tuple[int, int, int]], counts: list[list[int]], owners: list[list[int]] | None = None
    ) -> None:
        """Next forward is the prefill: sequence ``b``'s local tokens are rows ``[start, stop)`` of batch
        row ``src`` of the incoming K/V, ``rows[b] = (src, start, stop)``; ``counts[b][r]`` is what every
        rank will hold of ``b`` afterwards (from the layout); ``owners[b][t]`` the rank holding token ``t``
        (needed by :meth:`crop`; implied at one rank). Every rank's local rows must be in token order."""
        if len(rows) != self.batch or len(counts) != self.batch:
            raise ValueError(
                f"plan_prefill: expected {self.batch} sequences; got {len(rows)} and {len(counts)}"
            )
        if any(len(c) != self.world for c in counts):
            raise ValueError(f"plan_prefill: counts must have {self.world} entries per sequence")
        if any(sum(c) for c in self.counts):
            raise RuntimeError("plan_prefill: the cache already holds tokens; prefill an empty cache")
        if owners is None and self.world == 1:
            owners = [[0] * c[0] for c in counts]
        if owners is not None:
            if len(owners) != self.batch or any(
                sorted(o) != [r for r in range(self.world) for _ in range(c[r])]
                for o, c in zip(owners, counts, strict=True)
            ):
                raise ValueError(
                    "plan_prefill: owners[b] must name a rank per token, counts[b][r] times rank r"
                )
            self.owner_log = [list(o) for o in owners]
        else:
            self.owner_log = None
        self._plan = ("prefill", list(rows))
        self.counts = [list(c) for c in counts]

    def plan_decode(self) -> list[int]:
        """Next forward decodes one token per sequence; returns the owner rank of each sequence's token
        (balanced append) and counts it."""
        owners = [balanced_owner(c) for c in self.counts]
        for b, r in enumerate(owners):
            self.counts[b][r] += 1
            if self.owner_log is not None:
                self.owner_log[b].append(r)
        self._plan = ("decode", owners)
        return owners

    # ------------------------------------------------------------------------------------ HF Cache API
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key_states, value_states: (batch_in, heads_kv, seqlen_new, head_dim), HF layout.

        Prefill: stores this rank's rows and returns the inputs (the local shard the sequence-parallel
        attention needs). Decode (seqlen_new == 1, batch_in == batch): stores row ``b`` where this rank owns
        ``b``'s token and returns this rank's whole shard as (batch, heads_kv, max_length, head_dim) views;
        :meth:`layer_lengths` gives the valid length of each row.
        """
        if self._plan is None:
            raise RuntimeError(
                "ShardedKVCache.update: no plan; run the model through longmoe.generate (or call plan_prefill / "
                "plan_decode before each forward)"
            )
        if key_states.dim() != 4 or key_states.shape != value_states.shape:
            raise ValueError(
                f"ShardedKVCache.update: key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must both be (batch, heads_kv, seqlen, head_dim)"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(None)
        k = key_states.transpose(1, 2)  # (batch_in, seqlen_new, heads_kv, head_dim)
        v = value_states.transpose(1, 2)
        kind, plan = self._plan
        if kind == "prefill":
            need = [stop - start for _, start, stop in plan]
            layer = self._layer(layer_idx, k, max(need) if need else 0)
            for b, (src, start, stop) in enumerate(plan):
                n = stop - start
                layer.keys[b, :n] = k[src, start:stop]
                layer.values[b, :n] = v[src, start:stop]
                layer.lengths[b] = n
            return key_states, value_states
        if k.shape[0] != self.batch or k.shape[1] != 1:
            raise ValueError(
                f"ShardedKVCache.update: a decode step takes (batch={self.batch}, heads_kv, 1, head_dim); got "
                f"{tuple(key_states.shape)}"
            )
        layer = self.layers[layer_idx]
        if layer is None:
            layer = self._layer(layer_idx, k, 0)
        mine = [b for b, r in enumerate(plan) if r == self.rank]
        if mine:
            self._reserve(layer, max(layer.lengths[b] for b in mine) + 1)
        for b in mine:
            layer.keys[b, layer.lengths[b]] = k[b, 0]
            layer.values[b, layer.lengths[b]] = v[b, 0]
            layer.lengths[b] += 1
        n = max(layer.lengths)
        return layer.keys[:, :n].transpose(1, 2), layer.values[:, :n].transpose(1, 2)

    def _layer(self, idx: int, like: torch.Tensor, capacity: int) -> _Layer:
        if self.layers[idx] is None:
            shape = (self.batch, max(capacity, 1), like.shape[2], like.shape[3])
            self.layers[idx] = _Layer(like.new_empty(shape), like.new_empty(shape), [0] * self.batch)
        layer = self.layers[idx]
        self._reserve(layer, capacity)
        return layer

    @staticmethod
    def _reserve(layer: _Layer, capacity: int) -> None:
        cap = layer.keys.shape[1]
        if capacity <= cap:
            return
        new_cap = max(capacity, 2 * cap)  # doubling: amortised O(1) appends
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_empty((old.shape[0], new_cap, *old.shape[2:]))
            new[:, :cap] = old
            setattr(layer, name, new)

    def layer_lengths(self, layer_idx: int) -> list[int]:
        """Valid tokens of each sequence in this rank's shard of layer ``layer_idx``."""
        return list(self.layers[layer_idx].lengths)

    def global_lengths(self) -> list[int]:
        """Tokens of each sequence over all ranks."""
        return [sum(c) for c in self.counts]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest sequence's length over all ranks (what a single-process cache would report)."""
        return max(self.global_lengths(), default=0)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.layers)

    @property
    def is_croppable(self) -> bool:
        return self.owner_log is not None

    @property
    def batch_size(self) -> int:
        return self.batch

    def reset(self) -> None:
        self.layers = []
        self.counts = [[0] * self.world for _ in range(self.batch)]
        self.owner_log = [[] for _ in range(self.batch)]
        self._plan = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``tokens_to_remove`` tokens of every sequence (HF semantics; assisted decoding).

        Local, no communication: the owner log says which ranks hold those tokens, and each rank trims its
        own rows (a shard is in token order). Shards may then differ by more than one token; the balanced
        append evens them out again as decoding continues.
        """
        if (
            isinstance(tokens_to_remove, bool)
            or not isinstance(tokens_to_remove, int)
            or tokens_to_remove < 0
        ):
            raise ValueError(f"crop(tokens_to_remove={tokens_to_remove!r}): expected an int >= 0")
        if self.owner_log is None:
            raise NotImplementedError(
                f"ShardedKVCache.crop(tokens_to_remove={tokens_to_remove}): the prefill plan named no token owners "
                "(plan_prefill(owners=...)), so the cache cannot tell which ranks hold the last tokens"
            )
        lengths = self.global_lengths()
        if tokens_to_remove > min(lengths, default=0):
            raise ValueError(
                f"crop(tokens_to_remove={tokens_to_remove}): sequences hold {lengths} tokens; cannot remove more "
                "than the shortest holds"
            )
        if tokens_to_remove == 0:
            return
        for b, log in enumerate(self.owner_log):
            gone = log[len(log) - tokens_to_remove :]
            del log[len(log) - tokens_to_remove :]
            for r in gone:
                self.counts[b][r] -= 1
            mine = gone.count(self.rank)
            for layer in self.layers:
                if layer is not None:
                    layer.lengths[b] -= mine

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (a 1-D int tensor, the same on every rank); local, no communication."""
        idx = [int(i) for i in torch.as_tensor(indices).flatten().tolist()]
        if any(not 0 <= i < self.batch for i in idx):
            raise ValueError(f"batch_select_indices: indices {idx} out of range for batch {self.batch}")
        for layer in self.layers:
            if layer is not None:
                t = torch.tensor(idx, device=layer.keys.device)
                layer.keys, layer.values = layer.keys[t], layer.values[t]
                layer.lengths = [layer.lengths[i] for i in idx]
        self.counts = [list(self.counts[i]) for i in idx]
        if self.owner_log is not None:
            self.owner_log = [list(self.owner_log[i]) for i in idx]
        self.batch = len(idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``b`` becomes old row ``beam_idx[b]`` (same on every rank; local)."""
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.batch_select_indices(torch.arange(self.batch).repeat_interleave(repeats))

    # ----------------------------------------------------------------------------------------- memory
    def memory_bytes(self) -> int:
        """Bytes of the valid K and V rows this rank holds, summed over layers (capacity slack excluded;
        :meth:`allocated_bytes` includes it)."""
        total = 0
        for layer in self.layers:
            if layer is not None:
                per_token = 2 * layer.keys.shape[2] * layer.keys.shape[3] * layer.keys.element_size()
                total += per_token * sum(layer.lengths)
        return total

    def allocated_bytes(self) -> int:
        return sum(
            2 * layer.keys.numel() * layer.keys.element_size() for layer in self.layers if layer is not None
        )

    def __repr__(self) -> str:
        return (
            f"ShardedKVCache(batch={self.batch}, rank={self.rank}/{self.world}, layers={len(self.layers)}, "
            f"tokens={self.global_lengths()})"
        )
