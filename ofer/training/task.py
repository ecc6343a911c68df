"""The small interface every training job implements; :func:`ofer.training.train` does the rest."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class Task(Protocol):
    """One training job (IdGen, ExpGen, IdRank, a baseline ...), as seen by the shared loop.

    Required:
      * ``name``: short job name stored in checkpoints ("idgen", "expgen", "idrank", ...).
      * ``model``: the trainable ``nn.Module``. The loop moves it to the device, wraps it in DDP,
        keeps its EMA and saves its ``state_dict``. Parameters with ``requires_grad=True`` must all
        appear in ``param_groups()``; freeze a part by setting ``requires_grad=False``.
      * ``param_groups()``: AdamW groups, e.g. ``[{"params": [...], "lr": 1e-3}]``; a group without
        ``"lr"`` gets ``trainer.lr``.
      * ``train_dataset()``: a map-style dataset whose items are dicts of tensors / numbers (an
        ``"index"`` key is welcome but not needed: the sampler knows the indices).
      * ``loss(model, batch)``: per-sample terms, each of shape (B,). Must hold ``"loss"`` (B,),
        which the loop averages and back-propagates; may hold ``"t"`` (B,) integer timesteps, in
        which case the loop logs the loss per timestep quartile (``loss_q0`` .. ``loss_q3``) and the
        task must set ``num_timesteps``. Other terms are logged as their batch means. ``model`` may
        be the DDP wrapper: call ``model(...)`` (its forward) exactly once per step.

    Optional (may be absent):
      * ``num_timesteps: int | None``: number of diffusion steps, needed when ``loss`` returns ``"t"``.
      * ``evaluate(model) -> dict[str, float]``: called on rank 0 with the EMA model (eval mode,
        under ``torch.no_grad``) every ``trainer.eval_every`` steps and at the end.
      * ``describe() -> dict``: extra metadata (plain dicts/lists/str/numbers) stored in checkpoints.
    """

    name: str
    model: nn.Module

    def param_groups(self) -> list[dict]: ...

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]: ...


def check_task(task: Any) -> None:
    """Raise a TypeError naming what is missing when ``task`` does not follow :class:`Task`."""
    missing = [a for a in ("name", "model", "param_groups", "train_dataset", "loss") if not hasattr(task, a)]
    if missing:
        raise TypeError(f"task {type(task).__name__} does not implement the Task interface: missing {missing}")
    if not isinstance(task.name, str) or not task.name:
        raise TypeError(f"task.name must be a non-empty string, got {task.name!r}")
    if not isinstance(task.model, nn.Module):
        raise TypeError(f"task.model must be an nn.Module, got {type(task.model).__name__}")
    for method in ("param_groups", "train_dataset", "loss"):
        if not callable(getattr(task, method)):
            raise TypeError(f"task.{method} must be callable")
    for method in ("evaluate", "describe"):
        if hasattr(task, method) and not callable(getattr(task, method)):
            raise TypeError(f"task.{method} must be callable when present")
