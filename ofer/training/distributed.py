"""Process-group setup and every rank-dependent decision of the loop, in one place.

Ranks come from the ``torchrun`` variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); in a
submitit SLURM job with several tasks and none of those set, they are exported from submitit's
job environment. The backend is NCCL on CUDA and gloo on CPU. Side effects (checkpoints, logs,
evaluation) run on rank 0 through :meth:`DistContext.run_on_main`, which tells the other ranks when
rank 0 failed instead of leaving them waiting in the next collective.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def _maybe_export_submitit_env() -> None:
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    import submitit.helpers

    # CUDA_VISIBLE_DEVICES is left alone: CUDA may already be initialised; LOCAL_RANK picks the GPU
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


@dataclass
class DistContext:
    """Rank, world size and device of this process; ``world_size == 1`` means no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def setup(cls, device: str | torch.device) -> DistContext:
        """Read the launcher's variables, pick the device, and init the process group if needed.

        ``device="cuda"`` becomes ``cuda:LOCAL_RANK``. A process group that already exists is used
        as it is (and not destroyed by :meth:`close`).
        """
        _maybe_export_submitit_env()
        world_size = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(f"device {device!r} was requested but CUDA is not available")
            if dev.index is None:
                dev = torch.device("cuda", local_rank if world_size > 1 else torch.cuda.current_device())
            torch.cuda.set_device(dev)
        owns = False
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
            owns = True
        if dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, owns_group=owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, x: Tensor) -> Tensor:
        """Sum over ranks (identity on one process); ``x`` must live on :attr:`device`."""
        if self.enabled:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def all_reduce_mean_(self, tensors: list[Tensor], dtype: torch.dtype | None = None) -> None:
        """Each tensor in place: its mean over ranks (sum, then divided by the world size; nothing on one
        process). Tensors must live on :attr:`device`. With ``dtype`` other than a tensor's own, that tensor is
        summed in ``dtype``: cast, divided by the world size, all-reduced, copied back (the steps of DDP's
        ``bf16_compress_hook``, so the same numbers as DDP with that hook)."""
        if self.enabled:
            for x in tensors:
                if dtype is None or x.dtype == dtype:
                    self.all_reduce_sum(x).div_(self.world_size)
                else:
                    x.copy_(self.all_reduce_sum(x.to(dtype).div_(self.world_size)))

    def broadcast_tensors_(self, tensors: list[Tensor]) -> None:
        """Rank 0's values of ``tensors`` copied into them on every rank (in place; nothing on one process)."""
        if self.enabled:
            for x in tensors:
                if x.is_contiguous():
                    dist.broadcast(x, src=0)
                else:  # the collectives take contiguous tensors
                    y = x.contiguous()
                    dist.broadcast(y, src=0)
                    x.copy_(y)

    def broadcast_from_main(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, indexed by rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def run_on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; if it raises, every rank raises (rank 0 the original error)."""
        error: BaseException | None = None
        result = None
        if self.is_main:
            try:
                result = fn()
            except BaseException as e:  # re-raised below after the other ranks have been told
                error = e
        if self.enabled:
            message = self.broadcast_from_main(None if error is None else f"{type(error).__name__}: {error}")
            if message is not None and not self.is_main:
                raise RuntimeError(f"rank 0 failed, stopping rank {self.rank} too: {message}")
        if error is not None:
            raise error
        return result

    def close(self) -> None:
        """Destroy the process group if :meth:`setup` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False
