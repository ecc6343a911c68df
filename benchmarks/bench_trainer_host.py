"""The training loop's own host work per step (issue 8, goal 4): everything `ofer.training.train` does in a step
except the model's forward/backward and the optimizer update, which are replaced by stubs that return at once.

With `trainer.cuda_graph=true` the GPU runs the update graph while the host does this work and launches the next
step; host work longer than that graph leaves the GPU idle. This measures it on any machine (the CPU suffices):
the real trainer (sampler, data loader, batch transfer, mode check, stats, scheduler, logging checks) on a
`bench_trainer.py` generator job whose dataset is item indices, as there.

    python benchmarks/bench_trainer_host.py --jobs idgen,expgen --json $OUT/trainer_host.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ofer.training.loop as loop  # noqa: E402
from benchmarks.bench_trainer import BlockTask  # noqa: E402
from benchmarks.bench_training import comma_choices  # noqa: E402
from ofer.training import train  # noqa: E402


def host_us_per_step(kind: str, steps: int, warmup: int, items_per_step: int) -> float:
    """Mean host time per step (us) of the trainer on job `kind` with the step's model work stubbed out."""
    task = BlockTask(kind, 2 * items_per_step, 1, "cpu", pad=True)
    zero = torch.zeros(())
    stats = torch.zeros(13)  # [loss_sum, n, grad_norm, bad, stop, 4 quartile sums, 4 counts]
    stats[1] = 1.0

    def forward_backward(self, batch, stop, capturing=False):
        return {"loss": zero.expand(1)}, zero, stats

    saved = loop._Trainer._forward_backward, loop._Trainer._update
    loop._Trainer._forward_backward = forward_backward
    loop._Trainer._update = lambda self, grad_norm: None
    ends: dict[int, float] = {}
    cfg = {"max_steps": steps, "batch_size": items_per_step, "ckpt_every": None, "log_every": 10 ** 6,
           "lr_scheduler": "constant", "precision": "fp32", "compile": False, "cuda_graph": False,
           "progress": False, "seed": 0}
    try:
        with tempfile.TemporaryDirectory() as run_dir, warnings.catch_warnings():
            # the stubbed update never calls optimizer.step(), so the scheduler warns at every step
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            train(task, cfg, run_dir=run_dir, device="cpu", resolved_config={"model": {"kind": kind}, "trainer": cfg},
                  on_step_end=lambda step: ends.__setitem__(step, time.perf_counter()))
    finally:
        loop._Trainer._forward_backward, loop._Trainer._update = saved
    # up to the second-last step: the last one ends with the final checkpoint
    return (ends[steps - 1] - ends[warmup]) / (steps - 1 - warmup) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="idgen,expgen", help="comma list of idgen, expgen")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--items-per-step", type=int, default=64, help="trainer.batch_size, as bench_trainer.py")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not 0 < args.warmup < args.steps - 1:
        ap.error(f"need 0 < --warmup < --steps - 1, got {args.warmup} and {args.steps}")
    try:
        jobs = comma_choices(args.jobs, ("idgen", "expgen"), "--jobs")
    except ValueError as exc:
        ap.error(str(exc))
    rows = []
    for kind in jobs:
        us = host_us_per_step(kind, args.steps, args.warmup, args.items_per_step)
        rows.append({"job": kind, "host_us_per_step": us})
        print(f"{kind:8} {us:8.1f} us of host work per step", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
