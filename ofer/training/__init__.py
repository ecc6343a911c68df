"""One training loop for every job (IdGen, ExpGen, IdRank, baselines).

A job is a small object following :class:`~ofer.training.task.Task`::

    class Task(Protocol):
        name: str                   # "idgen", "expgen", "idrank", "baseline" ...
        model: nn.Module            # the trainable module (the loop wraps it in DDP, keeps its EMA)
        def param_groups(self) -> list[dict]: ...        # AdamW groups, e.g. [{"params": ..., "lr": 1e-3}]
        def train_dataset(self) -> torch.utils.data.Dataset: ...  # items: dicts of tensors / numbers
        def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]: ...
            # per-sample terms, each (B,); must contain "loss" (B,); may contain "t" (B,) integer
            # timesteps -> loss per timestep quartile loss_q0..q3 is logged (needs the task attribute
            # num_timesteps: int | None)
        def evaluate(self, model: nn.Module) -> dict[str, float]: ...  # optional; called with the EMA
            # model on rank 0 every trainer.eval_every steps and at the end
        def describe(self) -> dict: ...  # optional: extra metadata stored in the checkpoint

and is run by::

    train(task, cfg_trainer, *, run_dir, device, resolved_config, logger_cfg=None) -> TrainResult

``cfg_trainer`` is the ``trainer`` config group (``configs/trainer/default.yaml``,
:class:`~ofer.training.config.TrainerConfig`); ``logger_cfg`` the ``logger`` group
(``configs/logger/{none,wandb}.yaml``). The loop owns seeding, the deterministic data order, bf16
autocast, clipping, AdamW, the LR schedule, EMA, NaN handling, checkpoints (automatic resume),
logging, SIGTERM/SIGUSR2 pre-emption (exit code :data:`EXIT_PREEMPTED`) and DDP under ``torchrun``.

Typical use in a Hydra script::

    seed_everything(cfg.trainer.seed)            # same initial weights on every rank
    task = IdGenTask(...)                        # builds task.model
    train(task, cfg.trainer, run_dir=Path(HydraConfig.get().runtime.output_dir), device=cfg.device,
          resolved_config=OmegaConf.to_container(cfg, resolve=True), logger_cfg=cfg.logger)

Later, ``load_model_from_checkpoint(run_dir_or_file, build_model)`` returns the EMA network.
"""

from __future__ import annotations

from ofer.training.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStore,
    CheckpointWriteError,
    ConfigMismatchError,
    load_checkpoint,
    load_model_from_checkpoint,
    model_state_from_checkpoint,
    save_checkpoint,
)
from ofer.training.config import TrainerConfig
from ofer.training.distributed import DistContext
from ofer.training.ema import EMA
from ofer.training.loop import NonFiniteLossError, TrainResult, train
from ofer.training.preemption import EXIT_PREEMPTED, TrainingPreempted
from ofer.training.sampler import DeterministicBatchSampler
from ofer.training.seeding import seed_everything
from ofer.training.task import Task

__all__ = [
    "EMA",
    "EXIT_PREEMPTED",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWriteError",
    "ConfigMismatchError",
    "DeterministicBatchSampler",
    "DistContext",
    "NonFiniteLossError",
    "Task",
    "TrainResult",
    "TrainerConfig",
    "TrainingPreempted",
    "load_checkpoint",
    "load_model_from_checkpoint",
    "model_state_from_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "train",
]
