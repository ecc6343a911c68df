"""What DDP adds around a compiled IdGen training step, measured apart from the GPUs and the link (issue 8, goal 5).

Runs the paper-sized IdGen denoiser's training step (fp32, AdamW, `--rows` rows) compiled with torch.compile, either
plain, inside DistributedDataParallel, or inside DDP with `torch._dynamo.config.optimize_ddp=False` (one graph, no
bucket split), and prints the mean time per step after 3 warm-up steps. On the CPU with one gloo rank, DDP's own work
(its reducer's hooks, the graph split) is what differs between the modes. With `TORCH_LOGS=aot_graphs` and
`--warm-only`, the AOT forward/backward graphs of the modes can be compared (count the `torch.ops.aten` calls).

    torchrun --standalone --nproc_per_node=1 benchmarks/bench_ddp_overhead.py --mode ddp
    TORCH_LOGS=aot_graphs torchrun --standalone --nproc_per_node=1 benchmarks/bench_ddp_overhead.py \\
        --mode plain --warm-only 2>&1 | grep -o "torch.ops.aten" | wc -l
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_training import SHAPES  # noqa: E402
from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("plain", "ddp", "ddp_noopt"), required=True)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warm-only", action="store_true", help="stop after the warm-up (compilation) steps")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    if args.mode == "ddp_noopt":
        torch._dynamo.config.optimize_ddp = False
    torch.manual_seed(0)
    dim, cond, widths = SHAPES["idgen"]
    model = Denoiser(dim=dim, cond_dim=cond, widths=widths)
    net = model if args.mode == "plain" else torch.nn.parallel.DistributedDataParallel(
        model, gradient_as_bucket_view=True)
    net = torch.compile(net)
    diff = GaussianDiffusion()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x0, c = torch.randn(args.rows, dim), torch.randn(args.rows, cond)

    def step() -> None:
        diff.training_losses(net, x0, c)["loss"].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if not args.warm_only:
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        print(f"{args.mode}: {(time.perf_counter() - t) / args.steps * 1e3:.2f} ms per step "
              f"({args.rows} rows, {len(list(model.parameters()))} parameter tensors)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
