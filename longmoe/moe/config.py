"""``MoEConfig``: one validated description of an MoE layer (field names follow Megatron-core's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch.distributed as dist

__all__ = ["MoEConfig"]


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MoEConfig.{name}={value!r}: expected an int >= 1")


def _non_negative_float(name: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"MoEConfig.{name}={value!r}: expected a finite number >= 0")


@dataclass(kw_only=True, slots=True)
class MoEConfig:
    """Configuration of :class:`longmoe.moe.MoELayer`.

    Example (Mixtral-8x7B's MoE block)::

        MoEConfig(hidden_size=4096, ffn_hidden_size=14336, num_experts=8, top_k=2)
    """

    hidden_size: int
    """Model width H: the layer maps ``(..., H)`` to ``(..., H)``."""

    ffn_hidden_size: int
    """Intermediate width of each routed expert (Megatron's ``moe_ffn_hidden_size``)."""

    num_experts: int
    """Number of routed experts E (global, over all expert-parallel ranks)."""

    top_k: int = 2
    """Experts per token."""

    score_function: Literal["softmax", "sigmoid", "sparsemixer"] = "softmax"
    """Router scores: ``softmax`` over experts (Mixtral, Qwen2-MoE), ``sigmoid`` per expert (DeepSeek-V3),
    or ``sparsemixer`` (PhiMoE: top-2 by successive masked softmaxes, deterministic form). Scores are
    computed in fp32 (fp64 for fp64 inputs) whatever the activation dtype."""

    router_dtype: Literal["float32", "input"] = "float32"
    """dtype of the router logits: ``"float32"`` (fp64 for fp64 inputs; Megatron-core's
    ``moe_router_dtype="fp32"``), or ``"input"``, the activation dtype as Hugging Face's Mixtral/Qwen2-MoE
    compute them (bf16 logits, then scores upcast to fp32): choose it for bit-level parity with an HF
    bf16 model. Scores and top-k are fp32 either way."""

    normalize_topk: bool = True
    """Divide the top-k weights of a token by their sum (Mixtral: yes; Qwen2-MoE: its ``norm_topk_prob``).
    Ignored for ``sparsemixer``."""

    sparsemixer_eps: float = 0.01
    """``sparsemixer`` only: experts whose score lies more than ``2 * eps`` (relative) below the current
    maximum are masked out of that step's softmax (PhiMoE's ``router_jitter_noise``)."""

    capacity_factor: float | None = None
    """``None``: dropless. Otherwise each expert takes at most ``ceil(capacity_factor * tokens * top_k /
    num_experts)`` of this rank's routed slots; the rest are dropped per ``drop_policy``."""

    drop_policy: Literal["probs", "position"] = "probs"
    """Which slots an over-full expert keeps: the highest routing weights (``probs``; ties keep the earlier
    token), or the earliest tokens (``position``). A dropped slot contributes 0 to its token's output; a token
    with every slot dropped gets output 0 (the residual connection around the layer carries it). Drops are
    counted in ``MoEAux.dropped_tokens``."""

    aux_loss_coeff: float = 0.0
    """Weight of the Switch/GShard load-balancing loss ``E * sum_e f_e * P_e`` (0 = off)."""

    z_loss_coeff: float = 0.0
    """Weight of the router z-loss ``mean_t logsumexp(logits_t)^2`` (ST-MoE; 0 = off)."""

    expert_bias_update_rate: float | None = None
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for top-k *selection*
    only, moved by ``rate * sign(mean_load - load)`` at each :meth:`MoELayer.update_expert_bias` from token
    counts all-reduced over the data/expert-parallel ranks. ``None`` = off."""

    shared_expert_ffn_hidden_size: int | None = None
    """Width of an always-on shared expert added to every token's output (``None`` = no shared expert)."""

    shared_expert_gate: bool = False
    """Scale the shared expert's output by ``sigmoid(x @ w_gate)`` (Qwen2-MoE's ``shared_expert_gate``)."""

    activation: Literal["swiglu", "gelu"] = "swiglu"
    """Expert MLP: ``swiglu`` = ``fc2(silu(x W_gate) * x W_up)``, ``gelu`` = ``fc2(gelu(fc1 x))``."""

    expert_ffn_hidden_sizes: tuple[int, ...] | None = None
    """Per-expert intermediate widths (length ``num_experts``, each <= ``ffn_hidden_size``) for experts slimmed
    to different widths; ``None`` = every expert has ``ffn_hidden_size``. Weights are stored padded to
    ``ffn_hidden_size``; each expert computes at its own width."""

    expert_parallel_group: dist.ProcessGroup | None = None
    """Process group the experts are sharded over (rank r holds experts ``[r*E/P, (r+1)*E/P)``); tokens are
    exchanged with ``all_to_all_single`` on it. ``None`` = every expert is local."""

    dispatch_chunks: int = 1
    """Expert parallel only: split each rank's local experts into this many contiguous chunks and exchange
    each chunk's rows with its own asynchronous all-to-all, so chunk ``c + 1``'s rows travel (and chunk
    ``c - 1``'s outputs return) while chunk ``c``'s experts compute. 1 = one exchange each way. At most the
    number of local experts."""

    init_method_std: float = 0.02
    """Standard deviation of the normal initialisation of every weight."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            _positive_int(name, getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "expected top_k <= num_experts"
            )
        if self.score_function not in ("softmax", "sigmoid", "sparsemixer"):
            raise ValueError(
                f"MoEConfig.score_function={self.score_function!r}: expected 'softmax', 'sigmoid' or 'sparsemixer'"
            )
        if self.score_function == "sparsemixer" and self.top_k != 2:
            raise ValueError(
                f"MoEConfig.top_k={self.top_k} with score_function='sparsemixer': expected top_k=2"
            )
        _non_negative_float("sparsemixer_eps", self.sparsemixer_eps)
        if self.capacity_factor is not None and (
            isinstance(self.capacity_factor, bool)
            or not isinstance(self.capacity_factor, (int, float))
            or not math.isfinite(self.capacity_factor)
            or self.capacity_factor <= 0
        ):
            raise ValueError(
                f"MoEConfig.capacity_factor={self.capacity_factor!r}: expected None (dropless) or a finite number > 0"
            )
        if self.router_dtype not in ("float32", "input"):
            raise ValueError(f"MoEConfig.router_dtype={self.router_dtype!r}: expected 'float32' or 'input'")
        if self.drop_policy not in ("probs", "position"):
            raise ValueError(f"MoEConfig.drop_policy={self.drop_policy!r}: expected 'probs' or 'position'")
        _non_negative_float("aux_loss_coeff", self.aux_loss_coeff)
        _non_negative_float("z_loss_coeff", self.z_loss_coeff)
        if self.expert_bias_update_rate is not None:
            _non_negative_float("expert_bias_update_rate", self.expert_bias_update_rate)
            if self.score_function == "sparsemixer":
                raise ValueError(
                    f"MoEConfig.expert_bias_update_rate={self.expert_bias_update_rate} with score_function='sparsemixer': "
                    "the sparsemixer picks experts by masked argmax and takes no bias; expected 'softmax' or 'sigmoid'"
                )
        if self.shared_expert_ffn_hidden_size is not None:
            _positive_int("shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size)
        if self.shared_expert_gate and self.shared_expert_ffn_hidden_size is None:
            raise ValueError(
                "MoEConfig.shared_expert_gate=True needs a shared expert: expected shared_expert_ffn_hidden_size set"
            )
        if self.activation not in ("swiglu", "gelu"):
            raise ValueError(f"MoEConfig.activation={self.activation!r}: expected 'swiglu' or 'gelu'")
        if self.expert_ffn_hidden_sizes is not None:
            sizes = tuple(self.expert_ffn_hidden_sizes)
            if len(sizes) != self.num_experts:
                raise ValueError(
                    f"MoEConfig.expert_ffn_hidden_sizes has {len(sizes)} entries: expected num_experts={self.num_experts}"
                )
            for i, f in enumerate(sizes):
                if isinstance(f, bool) or not isinstance(f, int) or not 1 <= f <= self.ffn_hidden_size:
                    raise ValueError(
                        f"MoEConfig.expert_ffn_hidden_sizes[{i}]={f!r}: expected an int in "
                        f"[1, ffn_hidden_size={self.ffn_hidden_size}]"
                    )
            self.expert_ffn_hidden_sizes = sizes
        if not (math.isfinite(self.init_method_std) and self.init_method_std >= 0):
            raise ValueError(
                f"MoEConfig.init_method_std={self.init_method_std!r}: expected a finite number >= 0"
            )
        _positive_int("dispatch_chunks", self.dispatch_chunks)
        if self.expert_parallel_group is not None:
            if not dist.is_initialized():
                raise ValueError(
                    "MoEConfig.expert_parallel_group is set but torch.distributed is not initialised: "
                    "expected longmoe.runtime.init_from_env() first"
                )
            ep = dist.get_world_size(self.expert_parallel_group)
            if self.num_experts % ep != 0:
                raise ValueError(
                    f"MoEConfig.num_experts={self.num_experts} is not divisible by the expert-parallel size "
                    f"{ep} (expert_parallel_group): expected a multiple of {ep}"
                )
            if self.dispatch_chunks > self.num_experts // ep:
                raise ValueError(
                    f"MoEConfig.dispatch_chunks={self.dispatch_chunks} exceeds the {self.num_experts // ep} local "
                    f"experts per rank (num_experts={self.num_experts} over {ep} ranks): expected at most that"
                )

    @property
    def expert_parallel_size(self) -> int:
        """Ranks the experts are sharded over (1 when ``expert_parallel_group`` is None)."""
        if self.expert_parallel_group is None:
            return 1
        return dist.get_world_size(self.expert_parallel_group)

    @property
    def expert_parallel_rank(self) -> int:
        """This rank's index in ``expert_parallel_group`` (0 when it is None)."""
        if self.expert_parallel_group is None:
            return 0
        return dist.get_rank(self.expert_parallel_group)

    @property
    def num_local_experts(self) -> int:
        """Experts held by this rank."""
        return self.num_experts // self.expert_parallel_size

    @property
    def expert_widths(self) -> tuple[int, ...]:
        """Intermediate width of every expert (global order)."""
        return self.expert_ffn_hidden_sizes or (self.ffn_hidden_size,) * self.num_experts
