"""Train a small MoE block with expert parallelism, aux-loss-free balancing and routing statistics.

    torchrun --nproc-per-node 2 examples/moe_expert_parallel.py          # real launcher (gloo on CPU, NCCL on GPU)
    python examples/moe_expert_parallel.py --spawn 2                      # local CPU ranks, no torchrun needed

Each rank holds num_experts / world experts, routes its own batch, exchanges tokens with all-to-all, and
regresses a fixed random target. After every optimizer step the expert bias is moved toward balance from the
load all-reduced over the ranks. Rank 0 writes the routing statistics (CSV + heatmap) to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from longmoe.moe import MoEConfig, MoELayer, RoutingStats
from longmoe.runtime import init_from_env, spawn


def train(rank: int, world: int, args: argparse.Namespace) -> dict:
    init_from_env(timeout_s=120.0)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    cfg = MoEConfig(
        hidden_size=args.hidden, ffn_hidden_size=2 * args.hidden, num_experts=args.experts, top_k=2,
        score_function="sigmoid", expert_bias_update_rate=1e-2, z_loss_coeff=1e-3,
        expert_parallel_group=dist.group.WORLD,
    )  # fmt: skip
    torch.manual_seed(0)  # same router on every rank (replicated); experts are sharded
    layer = MoELayer(cfg, device=device)
    with torch.no_grad():
        layer.router.weight[0] += 0.05  # start skewed, so balancing has work to do
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    stats = RoutingStats()
    stats.attach(layer)
    g = torch.Generator(device=device).manual_seed(1 + rank)  # each rank its own data
    target_map = torch.randn(
        args.hidden, args.hidden, device=device, generator=torch.Generator(device=device).manual_seed(7)
    )
    losses = []
    for _ in range(args.steps):
        x = torch.randn(args.tokens, args.hidden, device=device, generator=g) + 0.3
        out, aux = layer(x)
        loss = torch.nn.functional.mse_loss(out, x @ target_map * 0.1) + aux.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The router is replicated: average its gradient over the ranks (experts are not replicated).
        dist.all_reduce(layer.router.weight.grad, op=dist.ReduceOp.AVG)
        opt.step()
        layer.update_expert_bias()  # all-reduced load -> identical bias on every rank
        stats.step()
        losses.append(loss.item())
    result = {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "imbalance": [r.imbalance for r in stats.rows()],
    }
    if rank == 0:
        out_dir = Path(args.out)
        stats.to_csv(out_dir / "moe_routing.csv")
        stats.plot_heatmap(out_dir / "moe_routing.png")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--spawn", type=int, default=0, help="start this many local CPU ranks instead of using torchrun"
    )
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default="moe_example_out")
    args = ap.parse_args()
    if args.spawn:
        results = spawn(_spawned, args.spawn, args, dist_backend=None, timeout_s=600.0)
    else:
        results = [train(*init_from_env(), args)]
    r = results[0]
    print(
        f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}; load imbalance (max/mean) per step on rank 0:"
    )
    print(" ".join(f"{v:.2f}" for v in r["imbalance"]))
    print(f"routing statistics: {args.out}/moe_routing.csv, {args.out}/moe_routing.png")


def _spawned(rank: int, world: int, args: argparse.Namespace) -> dict:
    return train(rank, world, args)


if __name__ == "__main__":
    main()
