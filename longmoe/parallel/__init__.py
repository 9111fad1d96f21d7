"""Sequence parallelism: TokenRing, KV ring and Ulysses attention over sequence shards, a cost model that
picks among them, and the sharding helpers.

Modules, each importing only from those above it in this list (and from runtime/ and attention/):

* ``layout``: how a sequence is sharded (``ShardLayout``, ``shard_sequence``...) and which blocks a ring step
  computes (``StepSegment``);
* ``schedule``: ring schedules as data (``ring_schedule`` -> ``RingStep``s), walked by the rings and the cost model;
* ``common``: the entry-point checks and the autograd Function the algorithms share;
* ``token_ring``, ``kv_ring``, ``ulysses``: the algorithms (none imports another);
* ``cost_model``: pure bytes and time estimates, and how a ``Topology`` routes them; ``measure``: timing
  links and kernel calls on a group; ``planning``: topologies from hardware and predictions for any size;
* ``api``: ``sequence_parallel_attention``, ``SequenceParallelAttention``, ``sequence_parallel_sdpa``.
"""

from longmoe.parallel.api import (
    ALGORITHM_CHOICES,
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
    compute_calls,
    estimate_breakdown,
    estimate_time,
    link_loads,
    link_name,
    step_traffic,
)
from longmoe.parallel.kv_ring import kv_ring_attention
from longmoe.parallel.layout import (
    LAYOUTS,
    ShardLayout,
    StepSegment,
    shard_bounds,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from longmoe.parallel.measure import measure_topology, profile_compute
from longmoe.parallel.planning import HARDWARE, AlgorithmPlan, ClusterPlan, hardware_topology, plan_cluster
from longmoe.parallel.schedule import RingStep, Transfer, ring_schedule
from longmoe.parallel.token_ring import token_ring_attention
from longmoe.parallel.ulysses import heads_to_seq, seq_to_heads, ulysses_attention
from longmoe.runtime.exchanger import CommStats

__all__ = [
    "ALGORITHMS",
    "HARDWARE",
    "AlgorithmPlan",
    "ClusterPlan",
    "ALGORITHM_CHOICES",
    "LAYOUTS",
    "AttentionShape",
    "CommStats",
    "ComputeProfile",
    "RingStep",
    "SequenceParallelAttention",
    "ShardLayout",
    "StepSegment",
    "Topology",
    "Transfer",
    "autotune_algorithm",
    "choose_algorithm",
    "communication_bytes",
    "compute_calls",
    "estimate_breakdown",
    "estimate_time",
    "hardware_topology",
    "link_loads",
    "link_name",
    "heads_to_seq",
    "kv_ring_attention",
    "measure_topology",
    "plan_cluster",
    "profile_compute",
    "ring_schedule",
    "select_algorithm",
    "seq_to_heads",
    "sequence_parallel_attention",
    "sequence_parallel_sdpa",
    "shard_bounds",
    "shard_positions",
    "shard_sequence",
    "step_traffic",
    "token_ring_attention",
    "ulysses_attention",
    "unshard_sequence",
]
