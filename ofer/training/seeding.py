"""All seeding in one place."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch


def seed_everything(seed: int, *, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from (seed, rank).

    Call it with ``rank=0`` before building a task so that every rank builds the same initial
    weights (DDP broadcasts rank 0's anyway); the loop calls it again with the real rank so that
    ranks draw different noise / timesteps. The three generators get distinct streams derived by
    numpy's SeedSequence, not the same integer.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    words = np.random.SeedSequence([seed, rank]).generate_state(4, dtype=np.uint32)
    random.seed(int(words[0]))
    np.random.seed(int(words[1]))
    torch.manual_seed((int(words[2]) << 32) | int(words[3]))


@dataclass
class DeterminismState:
    """Global flags changed by :func:`set_deterministic`, to put back afterwards."""

    algorithms: bool
    warn_only: bool
    cudnn_deterministic: bool
    cudnn_benchmark: bool

    def restore(self) -> None:
        torch.use_deterministic_algorithms(self.algorithms, warn_only=self.warn_only)
        torch.backends.cudnn.deterministic = self.cudnn_deterministic
        torch.backends.cudnn.benchmark = self.cudnn_benchmark


def set_deterministic(enabled: bool) -> DeterminismState:
    """Switch PyTorch's deterministic algorithms on (errors on ops without one); returns the old state.

    cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first use; it is set here if unset.
    """
    old = DeterminismState(
        algorithms=torch.are_deterministic_algorithms_enabled(),
        warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn_deterministic=torch.backends.cudnn.deterministic,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return old
