"""Sequence parallelism: TokenRing, KV ring and Ulysses attention over sequence shards, a cost model that
picks among them, and the sharding helpers."""

from longmoe.parallel.api import (
    SequenceParallelAttention,
    autotune_algorithm,
    select_algorithm,
    sequence_parallel_attention,
    sequence_parallel_sdpa,
)
from longmoe.parallel.cost_model import (
    ALGORITHMS,
    AttentionShape,
    ComputeProfile,
    Topology,
    choose_algorithm,
    communication_bytes,
    estimate_time,
    measure_topology,
    profile_compute,
)
from longmoe.parallel.ring import ring_attention
from longmoe.parallel.sharding import shard_bounds, shard_positions, shard_sequence, unshard_sequence
from longmoe.parallel.token_ring import token_ring_attention
from longmoe.parallel.ulysses import heads_to_seq, seq_to_heads, ulysses_attention

__all__ = [
    "ALGORITHMS",
    "AttentionShape",
    "ComputeProfile",
    "SequenceParallelAttention",
    "Topology",
    "autotune_algorithm",
    "choose_algorithm",
    "communication_bytes",
    "estimate_time",
    "heads_to_seq",
    "measure_topology",
    "profile_compute",
    "ring_attention",
    "select_algorithm",
    "seq_to_heads",
    "sequence_parallel_attention",
    "sequence_parallel_sdpa",
    "shard_bounds",
    "shard_positions",
    "shard_sequence",
    "token_ring_attention",
    "ulysses_attention",
    "unshard_sequence",
]
