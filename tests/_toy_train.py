"""A tiny linear-regression task for the training-loop tests: importable, and runnable as a script

    python tests/_toy_train.py --run-dir X --max-steps N --ckpt-every K --seed S
        [--die-at-step M] [--sleep-per-step [SECONDS]] [--deterministic-loss] [--dump-final]
        [--device cpu|cuda] [--precision fp32|bf16] [--grad-sync ddp|flat]
        [--grad-sync-dtype float32|bfloat16] [--rank-seeded] [--cuda-graph]

(also under ``torchrun --nproc_per_node=2``). ``--die-at-step M`` SIGKILLs the process right after
step M (and its checkpoint, if one is due); ``--dump-final`` writes ``final_rank{R}.pt`` with the
final weights of every rank. ``--rank-seeded`` builds each rank's model from seed + rank (the loop must start
every rank from rank 0's weights). ``--cuda-graph`` sets trainer.cuda_graph=true (and a loss without host syncs).
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ofer.training import seed_everything, train

NUM_TIMESTEPS = 8


class ToyDataset(Dataset):
    """``num_items`` points x (4,) with targets y = x . w + 0.5 from a fixed generator."""

    def __init__(self, num_items: int = 64) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(num_items, 4, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.5

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"x": self.x[i], "y": self.y[i], "index": i}


class ToyTask:
    """Weighted squared error of a linear model (or a 1-hidden-layer MLP when ``hidden`` > 0).

    The loss weight depends on a timestep t in [0, 8): drawn from the torch RNG (so resuming must
    restore the RNG), or ``index % 8`` with ``deterministic_loss`` (then the loss depends on the
    batch only, and a 2-rank DDP run must equal a 1-process run).
    """

    name = "toy"
    num_timesteps = NUM_TIMESTEPS

    def __init__(
        self,
        *,
        num_items: int = 64,
        hidden: int = 0,
        noise: float = 0.1,
        deterministic_loss: bool = False,
        nan_at_index: int | None = None,
        lr: float = 1e-2,
        record_seen: bool = True,
    ) -> None:
        self.model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 1)) if hidden else nn.Linear(4, 1)
        self.num_items = num_items
        self.noise = noise
        self.deterministic_loss = deterministic_loss
        self.nan_at_index = nan_at_index
        self.lr = lr
        self.record_seen = record_seen  # off: no host sync in the loss (it can be captured in a CUDA graph)
        self.seen: list[list[int]] = []

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.lr}]

    def train_dataset(self) -> ToyDataset:
        return ToyDataset(self.num_items)

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        index = batch["index"]
        if self.record_seen:
            self.seen.append(index.tolist())
        pred = model(batch["x"])[:, 0]  # (B,)
        b = pred.shape[0]
        if self.deterministic_loss:
            t = index % NUM_TIMESTEPS
            target = batch["y"]
        else:
            t = torch.randint(0, NUM_TIMESTEPS, (b,), device=pred.device)
            target = batch["y"] + self.noise * torch.randn(b, device=pred.device)
        loss = (1.0 + t.float() / NUM_TIMESTEPS) * (pred - target) ** 2
        if self.nan_at_index is not None:
            loss = torch.where(index == self.nan_at_index, torch.full_like(loss, float("nan")), loss)
        return {"loss": loss, "t": t, "mse": (pred.detach() - batch["y"]) ** 2}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        data = ToyDataset(self.num_items)
        device = next(model.parameters()).device
        return {"mse": float(((model(data.x.to(device))[:, 0] - data.y.to(device)) ** 2).mean())}

    def describe(self) -> dict:
        return {"kind": "toy linear regression", "num_items": self.num_items}


def toy_trainer_cfg(**overrides: Any) -> dict[str, Any]:
    """A small trainer config (global batch 8 of 64 items: 8 steps per epoch)."""
    cfg: dict[str, Any] = {
        "max_steps": 20,
        "batch_size": 8,
        "ckpt_every": 5,
        "log_every": 1,
        "lr_scheduler": "constant",
        "ema_decay": 0.9,
        "seed": 0,
        "progress": False,
    }
    cfg.update(overrides)
    return cfg


def resolved(cfg: dict[str, Any], hidden: int = 0) -> dict[str, Any]:
    return {"model": {"kind": "toy", "hidden": hidden}, "trainer": cfg}


def make_task(seed: int, **kwargs: Any) -> ToyTask:
    seed_everything(seed)
    return ToyTask(**kwargs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--die-at-step", type=int, default=None)
    p.add_argument("--sleep-per-step", type=float, nargs="?", const=0.05, default=0.0)
    p.add_argument("--deterministic-loss", action="store_true")
    p.add_argument("--dump-final", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--grad-sync", default="ddp")
    p.add_argument("--grad-sync-dtype", default="float32")
    p.add_argument("--rank-seeded", action="store_true")
    p.add_argument("--cuda-graph", action="store_true")
    args = p.parse_args(argv)

    cfg = toy_trainer_cfg(
        max_steps=args.max_steps, ckpt_every=args.ckpt_every, seed=args.seed, precision=args.precision,
        grad_sync=args.grad_sync, grad_sync_dtype=args.grad_sync_dtype, cuda_graph=args.cuda_graph,
    )
    model_seed = args.seed + (int(os.environ.get("RANK", "0")) if args.rank_seeded else 0)
    task = make_task(model_seed, deterministic_loss=args.deterministic_loss, record_seen=not args.cuda_graph)

    def on_step_end(step: int) -> None:
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
        if args.die_at_step is not None and step == args.die_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    train(task, cfg, run_dir=args.run_dir, device=args.device, resolved_config=resolved(cfg), on_step_end=on_step_end)
    if args.dump_final:
        rank = int(os.environ.get("RANK", "0"))
        torch.save(task.model.state_dict(), args.run_dir / f"final_rank{rank}.pt")


if __name__ == "__main__":
    main()
