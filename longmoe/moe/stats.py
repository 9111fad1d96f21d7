"""Routing statistics: per-layer, per-expert load, dropped tokens, router entropy and imbalance over steps.

Collection is cheap enough for every step: a forward hook on each :class:`~longmoe.moe.MoELayer` keeps
references to four small tensors that the layer computed anyway (``(num_experts,)`` counts and three
scalars); nothing is copied to the host or synchronised until :meth:`RoutingStats.rows`, :meth:`to_csv` or
:meth:`plot_heatmap` is called::

    stats = RoutingStats()
    stats.attach(model)              # every MoELayer, named by its module path
    for batch in data:
        loss = ...; stats.step()     # close the step
    stats.to_csv("routing.csv"); stats.plot_heatmap("routing.png")

Several forwards of one layer within a step (micro-batches) are summed. Counts are this rank's tokens.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["RoutingStats", "LayerStepStats"]


@dataclass(slots=True)
class LayerStepStats:
    """One layer in one step. load: tokens per expert; dropped: slots dropped by capacity; entropy: mean
    router entropy (nats, averaged over the step's forwards weighted by tokens); imbalance: max(load)/mean(load)
    (1 = perfectly balanced; nan with no tokens)."""

    step: int
    layer: str
    load: list[int]
    dropped: int
    entropy: float
    tokens: int

    @property
    def imbalance(self) -> float:
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean > 0 else math.nan


class RoutingStats:
    """Collects :class:`~longmoe.moe.MoEAux` of MoE layers over training steps."""

    def __init__(self) -> None:
        self._step = 0
        # (step, layer) -> [tokens_per_expert, dropped, entropy * tokens, tokens]; tensors stay on device.
        self._acc: dict[tuple[int, str], list] = {}
        self._order: list[tuple[int, str]] = []
        self._hooks: list = []

    @property
    def current_step(self) -> int:
        return self._step

    def record(self, layer: str, aux) -> None:
        """Add one forward's :class:`~longmoe.moe.MoEAux` of ``layer`` to the current step (no host sync)."""
        key = (self._step, layer)
        counts = aux.tokens_per_expert.detach()
        weighted_entropy = aux.router_entropy.detach() * aux.num_tokens
        if key not in self._acc:
            self._acc[key] = [
                counts.clone(),
                aux.dropped_tokens.detach().clone(),
                weighted_entropy,
                aux.num_tokens,
            ]
            self._order.append(key)
        else:
            acc = self._acc[key]
            acc[0] += counts
            acc[1] += aux.dropped_tokens.detach()
            acc[2] = acc[2] + weighted_entropy
            acc[3] += aux.num_tokens

    def step(self) -> None:
        """Close the current step."""
        self._step += 1

    def attach(self, model: nn.Module) -> list[str]:
        """Record every :class:`~longmoe.moe.MoELayer` inside ``model`` (itself included) on each forward.
        Returns the layer names (module paths; ``"moe"`` for a bare layer)."""
        from longmoe.moe.layer import MoELayer

        names = []
        for name, module in model.named_modules():
            if isinstance(module, MoELayer):
                label = name or "moe"
                self._hooks.append(module.register_forward_hook(self._hook(label)))
                names.append(label)
        if not names:
            raise ValueError(
                f"attach(model={type(model).__name__}): no MoELayer inside; expected at least one"
            )
        return names

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach`."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def _hook(self, label: str):
        def hook(_module, _inputs, outputs):
            self.record(label, outputs[1])

        return hook

    def rows(self) -> list[LayerStepStats]:
        """Every (step, layer) recorded so far, in recording order (this is where the host sync happens)."""
        out = []
        for step, layer in self._order:
            counts, dropped, went, tokens = self._acc[(step, layer)]
            entropy = float(went) / tokens if tokens else math.nan
            out.append(LayerStepStats(step, layer, counts.cpu().tolist(), int(dropped), entropy, tokens))
        return out

    def to_csv(self, path: str | Path) -> Path:
        """One row per (step, layer, expert): step, layer, expert, load, and the layer's dropped, tokens,
        entropy and imbalance for that step. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "layer", "expert", "load", "dropped", "tokens", "entropy", "imbalance"])
            for r in self.rows():
                for e, load in enumerate(r.load):
                    w.writerow(
                        [
                            r.step,
                            r.layer,
                            e,
                            load,
                            r.dropped,
                            r.tokens,
                            f"{r.entropy:.6g}",
                            f"{r.imbalance:.6g}",
                        ]
                    )
        return path

    def plot_heatmap(self, path: str | Path, layers: list[str] | None = None) -> Path:
        """Save a heatmap of expert load (fraction of the step's slots) over steps, one panel per layer."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        names = layers or list(dict.fromkeys(r.layer for r in rows))
        if not names:
            raise ValueError(
                "plot_heatmap(): nothing recorded yet; call record() or attach() and run forwards"
            )
        fig, axes = plt.subplots(len(names), 1, figsize=(8, 1.6 + 1.2 * len(names)), squeeze=False)
        for ax, name in zip(axes[:, 0], names, strict=True):
            mine = [r for r in rows if r.layer == name]
            if not mine:
                raise ValueError(f"plot_heatmap(layers=...): no records for layer {name!r}")
            load = torch.tensor([r.load for r in mine], dtype=torch.float64)  # (steps, experts)
            frac = load / load.sum(1, keepdim=True).clamp(min=1)
            im = ax.imshow(frac.T.numpy(), aspect="auto", interpolation="nearest", cmap="viridis",
                           extent=(mine[0].step - 0.5, mine[-1].step + 0.5, load.shape[1] - 0.5, -0.5))  # fmt: skip
            ax.set_ylabel(f"{name}\nexpert", fontsize=8)
            fig.colorbar(im, ax=ax, label="share of slots")
        axes[-1, 0].set_xlabel("step")
        fig.suptitle("Expert load over steps")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
