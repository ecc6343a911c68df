"""The one training loop of every job: :func:`train`.

Per step: next batch of the deterministic sampler -> ``task.loss`` (bf16 autocast on CUDA when
asked) -> backward -> gradient norm -> one collective + one host sync of a small stats vector
(loss sums, per-quartile sums, non-finite flag, stop flag) -> clip, AdamW, EMA, LR schedule ->
log / evaluate / checkpoint when due. The step counter counts optimizer steps including skipped
ones, so the data position and LR schedule are functions of it.

Resume is automatic: when ``<run_dir>/checkpoints/last.pt`` (or, if that one is damaged, a previous
good one) exists, the run continues from it and is bitwise the same run (on CPU; on GPU up to
non-deterministic kernels) as one that was never interrupted: same weights, optimizer, EMA, LR
scheduler, RNG streams and next batch.

``trainer.cuda_graph=true`` (CUDA; one process, or several with ``trainer.grad_sync=flat``): after 2 eager steps the
step is captured as two CUDA graphs (forward + backward + stats; clip + AdamW + EMA, replayed after the host has
read the stats, so non-finite steps are skipped as before) and replayed with each batch copied into the captured
inputs. Same function as the eager step (tests compare weights, EMA and optimizer state); the random draws of the
loss (timesteps, noise) come from the CUDA generator as before but need not be the same numbers, so a graphed run is
not bitwise the same as an eager one (nor a resumed graphed run as an uninterrupted one: it runs 2 eager steps after
resuming). The loss must depend on the batch through its tensors alone (other values, such as names, are not part of
the replay). A batch of other tensor shapes runs eagerly (event ``cuda_graph_batch_mismatch``, once); a loss that
cannot be captured (it syncs with the host) is logged (event ``cuda_graph_failed``) and the run goes on eagerly.
Measured on an H100 (`benchmarks/bench_trainer.py`, 65,536 rows, bf16, compiled): ExpGen 34.98 -> 19.49 ms per step,
IdGen 34.92 -> 30.37 ms (BENCHMARKS.md).

``trainer.compile=true`` compiles the model (``compile_scope=model``) or, with ``compile_scope=loss`` (one process, or
several with ``trainer.grad_sync=flat``, the default there),
the task's whole ``loss`` around it, so that what the task computes around the network (the diffusion tasks' noise
mixing and L1 loss) fuses into the same graph. Random draws inside it stay ATen's (inductor's ``fallback_random``):
they are the eager run's numbers, and the checkpointed RNG state restores them on resume as it does eagerly. The
default ``compile_scope=auto`` is ``loss`` except under DDP (``grad_sync=ddp``), ``model`` there (event ``compile``
names it):
IdGen 27.22 -> 26.37 ms and ExpGen 17.87 -> 16.15 ms per step with the loss compiled (H100, 65,536 rows, bf16,
CUDA graphs; BENCHMARKS.md). With ``trainer.reduction_launch=one_row`` (the default) a compiled CUDA run launches
inductor's 257-512-column norm reductions with >= 3 reductions per kernel one row per warp instead of two
(``ofer/reduction_launch.py``; events ``reduction_relaunched`` with the number of kernels, or ``reduction_launch``
where this torch has no heuristic to wrap): IdGen's bare step 20.49 -> 19.95-20.33 ms on an H200.

Several processes: ``trainer.grad_sync=flat`` (what the default ``auto`` picks with ``trainer.flat_params=true``)
does not wrap the model: rank 0's parameters and buffers are broadcast once at the start, and after each backward
every group's flat gradient buffer is all-reduced to its mean over the ranks (DDP's gradients; the buffers are
not synced again, as none of OFER's networks changes one in training), so the step is the one-process step plus
those all-reduces: the whole loss can be compiled, and with ``trainer.cuda_graph`` the all-reduces are captured in
the step's graph (all ranks capture, or none: a failed capture on one rank sends all of them back to eager steps).
``grad_sync=ddp`` (what ``auto`` picks without flat params or with ``ddp_find_unused_parameters=true``) wraps the
model in DistributedDataParallel. Event ``grad_sync`` names the mode. Measured on 2 x H200 (65,536 rows per GPU,
bf16, compiled, `benchmarks/bench_trainer.py`; BENCHMARKS.md, "Session of 2026-11-29, eighth" and "..., ninth"):
flat with CUDA graphs IdGen 1.89-1.91x one graphed GPU in the same call, ExpGen 1.86-1.88x; flat without graphs
IdGen 1.82-1.93x, ExpGen 1.56-2.09x (host-bound). Under DDP ``trainer.flat_params`` is off (event
``flat_params_off``): flat buffers inside DDP's wrapper made IdGen steps 2.5x slower (median 98 vs 39 ms), and
DDP's 31-39 ms stays slower than flat's 21-25.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ofer.fast_sampling import COMPILE_OPTIONS, LOSS_SCOPE_OPTIONS
from ofer.reduction_launch import one_row_per_warp
from ofer.training.checkpoint import (
    CheckpointStore,
    ConfigMismatchError,
    capture_rng_state,
    config_differences,
    restore_rng_state,
    software_versions,
    to_plain,
)
from ofer.training.config import TrainerConfig
from ofer.training.distributed import DistContext
from ofer.training.ema import EMA
from ofer.training.flat import FlatParameters
from ofer.training.loggers import MetricsLogger, build_logger, check_logger_cfg
from ofer.training.preemption import PreemptionWatcher, TrainingPreempted
from ofer.training.sampler import DeterministicBatchSampler
from ofer.training.seeding import seed_everything, set_deterministic
from ofer.training.task import check_task

log = logging.getLogger("ofer.training")

_NUM_QUARTILES = 4
_EAGER_STEPS_BEFORE_CAPTURE = 2  # trainer.cuda_graph: steps run eagerly (first compilation, optimizer state) first


class NonFiniteLossError(RuntimeError):
    """A step produced a NaN/inf loss or gradient (nan_policy "stop", or too many skips in a row)."""

    def __init__(self, message: str, *, step: int, batch_indices: list[int]) -> None:
        super().__init__(message)
        self.step = step
        self.batch_indices = batch_indices


@dataclass
class TrainResult:
    """What :func:`train` returns: the last step, the last checkpoint and the last metrics."""

    step: int
    checkpoint: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: int = 0


def train(
    task: Any,
    cfg_trainer: Mapping[str, Any] | TrainerConfig,
    *,
    run_dir: str | Path,
    device: str | torch.device,
    resolved_config: Mapping[str, Any],
    logger_cfg: Mapping[str, Any] | None = None,
    on_step_end: Callable[[int], None] | None = None,
) -> TrainResult:
    """Train ``task`` (see :class:`ofer.training.task.Task`) until ``trainer.max_steps``.

    Args:
        task: the job; its ``model`` is moved to ``device`` and trained in place.
        cfg_trainer: the ``trainer`` config group (mapping or :class:`TrainerConfig`).
        run_dir: everything is written here: ``checkpoints/``, ``metrics.jsonl``.
        device: "cpu", "cuda" (becomes ``cuda:LOCAL_RANK`` under torchrun) or "cuda:N".
        resolved_config: the whole resolved run config, stored in checkpoints; its
            ``trainer.model_keys`` subtrees (default ``model``) must match on resume.
        logger_cfg: the ``logger`` config group; None = metrics.jsonl only.
        on_step_end: called with the step number after each step (after its checkpoint); for
            tools and tests.

    Raises:
        TrainingPreempted: (a SystemExit with code EXIT_PREEMPTED) after SIGTERM/SIGUSR2 and the
            checkpoint that follows.
        NonFiniteLossError, CheckpointWriteError, ConfigMismatchError, ValueError on bad config.
    """
    cfg = TrainerConfig.from_mapping(cfg_trainer)
    check_task(task)
    logger_cfg = check_logger_cfg(logger_cfg)
    config = to_plain(resolved_config, "resolved_config")
    ctx = DistContext.setup(device)
    trainer = None
    try:
        trainer = _Trainer(task, cfg, Path(run_dir), ctx, config, logger_cfg, on_step_end)
        return trainer.run()
    finally:
        # The trainer sits in reference cycles (e.g. its checkpoint store's event callback calls back into it), so
        # without a collection it outlived train() with its DDP wrapper, whose reducer holds the process group:
        # the group was then torn down at interpreter exit instead of in ctx.close(), where gloo's worker threads
        # can abort the process ("terminate called without an active exception", once in a CI run of the
        # two-rank test). Free it here, before the group is destroyed.
        del trainer
        gc.collect()
        ctx.close()


def _map_tensors(fn: Callable[[Tensor], Tensor], batch: Any) -> Any:
    """The batch (tensors in dicts, lists, tuples) with `fn` applied to each tensor; other values as they are."""
    if isinstance(batch, Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(fn, v) for v in batch)
    return batch


def _move(batch: Any, device: torch.device) -> Any:
    return _map_tensors(lambda t: t.to(device, non_blocking=True), batch)


def _signature(batch: Any) -> Any:
    """The batch's structure with each tensor replaced by (shape, dtype, device): a CUDA graph replays only batches
    of the signature it was captured with. Other values (e.g. the actor names of a batch) count by type only: the
    graph replays the loss of the captured step, so under trainer.cuda_graph a loss must depend on the batch
    through its tensors alone."""
    if isinstance(batch, Tensor):
        return ("tensor", tuple(batch.shape), batch.dtype, batch.device)
    if isinstance(batch, Mapping):
        return ("map", tuple((k, _signature(v)) for k, v in batch.items()))
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, tuple(_signature(v) for v in batch))
    return ("value", type(batch).__name__)


def _copy_into(static: Any, batch: Any) -> None:
    """Copy the tensors of `batch` into the same-signature `static` batch (the graph's inputs)."""
    if isinstance(static, Tensor):
        static.copy_(batch, non_blocking=True)
    elif isinstance(static, Mapping):
        for k, v in static.items():
            _copy_into(v, batch[k])
    elif isinstance(static, (list, tuple)):
        for a, b in zip(static, batch):
            _copy_into(a, b)


def _float_lrs(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer or LR-scheduler state dict with tensor learning rates (trainer.cuda_graph keeps them on the
    device) as plain floats, so checkpoints load the same into runs with or without graphs."""
    def plain(v: Any) -> Any:
        return float(v) if isinstance(v, Tensor) and v.numel() == 1 else v

    out = dict(state)
    if "param_groups" in out:
        out["param_groups"] = [{k: plain(v) if k in ("lr", "initial_lr") else v for k, v in g.items()}
                               for g in out["param_groups"]]
    if "_last_lr" in out:
        out["_last_lr"] = [plain(v) for v in out["_last_lr"]]
    return out


class _StepGraphs:
    """trainer.cuda_graph: the training step as two CUDA graphs, captured once on one batch's shapes and replayed
    with each batch copied into the captured input tensors (no Python, autograd or launch overhead per step):

    * forward + backward + gradient norm + stats vector (`_Trainer._forward_backward`),
    * clip + AdamW + EMA (`_Trainer._update`), replayed only when the host has read the stats and found the step
      finite, as the eager step does.

    The parameter gradients are the first graph's outputs (allocated during capture, overwritten by each replay);
    the learning rates are device tensors that the LR schedulers fill in place; AdamW runs with capturable=True.
    Random draws inside the loss (timesteps, noise) come from the CUDA generator, advanced on every replay.
    """

    def __init__(self, trainer: _Trainer, batch: Mapping[str, Any]) -> None:
        self.trainer = trainer
        self.signature = _signature(batch)
        self.batch = _map_tensors(torch.clone, batch)
        self.stop = torch.zeros((), device=trainer.device)
        trainer._zero_grad(set_to_none=True)  # the captured backward allocates them (graph outputs)
        torch.cuda.synchronize(trainer.device)
        self.fb_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.fb_graph):
            self.terms, self.grad_norm, self.stats = trainer._forward_backward(self.batch, self.stop, capturing=True)
        self.update_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.update_graph, pool=self.fb_graph.pool()):
            trainer._update(self.grad_norm)

    def matches(self, batch: Mapping[str, Any]) -> bool:
        return _signature(batch) == self.signature

    def forward_backward(self, batch: Mapping[str, Any], stop: bool) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        _copy_into(self.batch, batch)
        self.stop.fill_(float(stop))
        self.fb_graph.replay()
        return self.terms, self.grad_norm, self.stats

    def update(self) -> None:
        self.update_graph.replay()
        if self.trainer.ema is not None:
            self.trainer.ema.num_updates += 1


def _lr_lambda(cfg: TrainerConfig) -> Callable[[int], float]:
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _Trainer:
    def __init__(
        self,
        task: Any,
        cfg: TrainerConfig,
        run_dir: Path,
        ctx: DistContext,
        config: dict[str, Any],
        logger_cfg: dict[str, Any],
        on_step_end: Callable[[int], None] | None,
    ) -> None:
        self.task, self.cfg, self.run_dir, self.ctx = task, cfg, run_dir, ctx
        self.config, self.logger_cfg, self.on_step_end = config, logger_cfg, on_step_end
        self.device = ctx.device
        self.use_bf16 = cfg.precision == "bf16" and self.device.type == "cuda"
        self.logger: MetricsLogger | None = None
        # loop state saved in checkpoints
        self.step = 0
        self.position = (0, 0)  # (epoch, batch in epoch) of the next batch
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.plateau_sum = 0.0
        self.plateau_count = 0
        self.last_ckpt: Path | None = None
        self.last_ckpt_step: int | None = None
        self.last_metrics: dict[str, float] = {}
        self._term_keys: list[str] | None = None
        self._window = self._empty_window()
        # trainer.cuda_graph: eager steps before capture (compilation, lazy initialisation), then the graphs
        self._eager_left = _EAGER_STEPS_BEFORE_CAPTURE
        self._graphs: _StepGraphs | None = None
        self._told_mismatch = False

    # ------------------------------------------------------------------------------------- setup

    def _event(self, name: str, **info: Any) -> None:
        log.info("%s at step %d: %s", name, self.step, info)
        if self.logger is not None:
            self.logger.event(self.step, name, info)

    def _check_param_groups(self, groups: Any, model: nn.Module) -> list[dict]:
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) and "params" in g for g in groups):
            raise TypeError(f"task {self.task.name!r}: param_groups() must return a list of dicts with 'params'")
        names = {id(p): n for n, p in model.named_parameters()}
        seen: set[int] = set()
        out = []
        for i, g in enumerate(groups):
            params = list(g["params"])
            for p in params:
                if id(p) not in names:
                    raise ValueError(
                        f"task {self.task.name!r}: param group {i} holds a tensor that is not a parameter of "
                        "task.model (it would be trained but neither saved nor averaged)"
                    )
                if id(p) in seen:
                    raise ValueError(f"task {self.task.name!r}: parameter {names[id(p)]!r} is in two param groups")
                seen.add(id(p))
            out.append({**g, "params": params})
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
        if orphans:
            raise ValueError(
                f"task {self.task.name!r}: trainable parameters {orphans[:8]}{'...' if len(orphans) > 8 else ''} "
                "are in no param group; add them or set requires_grad=False to freeze them"
            )
        return out

    def _build(self) -> None:
        cfg, task = self.cfg, self.task
        # several processes: DistributedDataParallel around the model (trainer.grad_sync=ddp), or no wrapper and
        # one all-reduce of each flat gradient buffer after the backward (grad_sync=flat; what auto picks with
        # flat params and no search for unused parameters: cfg.grad_sync_mode), which leaves the step
        # what it is in one process (the whole loss compiled), so trainer.cuda_graph captures it with its
        # all-reduces (NCCL collectives in the graph); not under DDP, whose reducer works from autograd hooks.
        # PyTorch has open reports of hangs with captured NCCL collectives (pytorch#115388 at
        # destroy_process_group, pytorch#196133 with host syncs after replays): GPU test
        # test_flat_grad_sync_with_cuda_graphs_on_two_gpus_matches_one_process
        self.sync_flat = self.ctx.enabled and cfg.grad_sync_mode == "flat"
        # trainer.grad_sync_dtype: None sums the gradients in their own dtype (float32)
        self.sync_dtype = torch.bfloat16 if cfg.grad_sync_dtype == "bfloat16" else None
        wrapped = self.ctx.enabled and not self.sync_flat
        if cfg.cuda_graph and wrapped:
            raise ValueError(f"trainer.cuda_graph=true captures the step of one process or of trainer.grad_sync=flat "
                             f"(the all-reduces inside the graph); this run has {self.ctx.world_size} processes under "
                             "DDP. Set trainer.grad_sync=flat (with trainer.flat_params=true) or cuda_graph=false")
        # auto: the whole loss in one process (IdGen 27.22 -> 26.37 ms, ExpGen 17.87 -> 16.15 ms per step on an
        # H100, BENCHMARKS.md) and under grad_sync=flat; the model inside DDP's wrapper (grad_sync=ddp)
        self.compile_scope = cfg.compile_scope_for(self.ctx.enabled)
        if cfg.compile and cfg.compile_scope == "loss" and wrapped:
            raise ValueError(f"trainer.compile_scope='loss' compiles the loss of one process; this run has "
                             f"{self.ctx.world_size} (DDP). Use trainer.compile_scope=model or "
                             "trainer.grad_sync=flat for DDP runs")
        self.model: nn.Module = task.model.to(self.device)
        self.groups = self._check_param_groups(task.param_groups(), self.model)
        self.params = [p for g in self.groups for p in g["params"]]
        # trainer.flat_params: each group's parameters as views of one buffer, so that the gradient norm, clipping,
        # AdamW and the EMA are one launch per group (ofer/training/flat.py); before compile and the EMA copy. Not
        # under DDP (cfg.flat_params_for): its reducer keeps the gradients in its buckets, and flat buffers inside
        # it made compiled IdGen steps 2.5x slower on 2 x H200 (BENCHMARKS.md)
        self.flat = FlatParameters(self.model, self.groups) if cfg.flat_params_for(self.ctx.enabled) else None
        # what the gradient norm, clipping and AdamW see: the groups' buffers, or the parameters
        self.update_params = self.flat.buffers if self.flat is not None else self.params
        if wrapped:
            # DDP broadcasts rank 0's weights here, so the EMA below starts identical on all ranks
            self.ddp: nn.Module = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=cfg.ddp_find_unused_parameters,
                gradient_as_bucket_view=cfg.ddp_gradient_as_bucket_view,
            )
            if self.sync_dtype is not None:  # trainer.grad_sync_dtype=bfloat16: torch's own hook for DDP's buckets
                self.ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
        else:
            self.ddp = self.model
            if self.sync_flat:  # as DDP does when it is built: rank 0's parameters and buffers on every rank
                self.ctx.broadcast_tensors_(self._module_state_tensors())
        self._loss: Callable[[Mapping[str, Any]], dict[str, Tensor]] = self._task_loss
        # dynamic=False: every step has the same shapes (the sampler drops the incomplete tail), and a second run
        # in the same process (a Hydra multirun, IdGen then ExpGen) would otherwise recompile the shared code with
        # symbolic shapes: slower kernels, and with the loss scope torch 2.11 fails on the noise draw
        # (randn of a symbolic shape under fallback_random; seen on an H100, BENCHMARKS.md)
        if cfg.compile and self.compile_scope == "model":
            # only the training forward/backward; checkpoints and EMA use the plain module. The sampler's inductor
            # options (matmul shape padding, no padded strides): IdGen 65,536 rows on an H200 0.0301 -> 0.0284 s
            # per step with the first, 27.28 -> 26.51 ms with the second (BENCHMARKS.md)
            self.ddp = torch.compile(self.ddp, dynamic=False, options=dict(COMPILE_OPTIONS) or None)
        elif cfg.compile:
            # the task's loss around the model as one graph (the diffusion tasks' q_sample and L1 loss, eager
            # around a compiled model: 0.74 ms of a 25.4 ms IdGen step on an H100, BENCHMARKS.md "Next: goal 4").
            # fallback_random: random draws stay ATen's, so the RNG stream (and exact resume) are eager's.
            # LOSS_SCOPE_OPTIONS: small pointwise kernels grouped into one launch (measured in this scope only)
            self._loss = torch.compile(self._task_loss, dynamic=False,
                                       options={**COMPILE_OPTIONS, **LOSS_SCOPE_OPTIONS, "fallback_random": True})
        self.ema = EMA(self.model, cfg.ema_decay, self.flat) if cfg.ema_decay > 0 else None
        # every module of the training model, to check its mode each step (`_train_step`); the tree is built by now
        self._model_modules = list(self.ddp.modules())
        self.use_graphs = cfg.cuda_graph and self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(  # fused: one kernel per <= 36 tensors on CUDA (as bench_training)
            self.flat.optimizer_groups() if self.flat is not None else self.groups, lr=cfg.lr, betas=cfg.betas,
            weight_decay=cfg.weight_decay, fused=self.device.type == "cuda", capturable=self.use_graphs,
        )
        self.dataset = task.train_dataset()
        self.num_items = len(self.dataset)
        probe = DeterministicBatchSampler(
            num_items=self.num_items, batch_size=cfg.batch_size, seed=cfg.seed, world_size=self.ctx.world_size
        )
        self.steps_per_epoch = probe.steps_per_epoch
        self.plateau_every = cfg.plateau_every or self.steps_per_epoch
        if cfg.lr_scheduler == "plateau":
            self.scheduler: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.num_timesteps = getattr(task, "num_timesteps", None)

    # ------------------------------------------------------------------------------------ resume

    def _resume(self) -> None:
        store = self.store
        found_path: str | None = None
        if self.ctx.is_main:
            for p in store.remove_stale_temp_files():
                log.warning("removed a temp file left by an interrupted checkpoint write: %s", p)
            found = store.latest_valid()
            found_path = str(found[0]) if found is not None else None
        found_path = self.ctx.broadcast_from_main(found_path)
        if found_path is None:
            return
        from ofer.training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(found_path)
        self._check_compatible(Path(found_path), ckpt)
        self.model.load_state_dict(ckpt["model"], strict=True)
        if self.ema is not None:
            if ckpt.get("ema") is not None:
                self.ema.load_state_dict(ckpt["ema"])
            else:
                self.ema = EMA(self.model, self.cfg.ema_decay, self.flat)
                self._event("ema_started_on_resume", path=found_path)
        self._check_optimizer_shapes(Path(found_path), ckpt)
        state = ckpt["optimizer"]
        if self.flat is not None:
            try:
                state = self.flat.flat_state(state, where=f"cannot resume from {found_path}")
            except ValueError as exc:
                raise ConfigMismatchError(str(exc)) from None
        self.optimizer.load_state_dict(state)
        loop = ckpt["loop"]
        if loop["lr_scheduler"] == self.cfg.lr_scheduler:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        else:
            self._event("scheduler_changed_on_resume", old=loop["lr_scheduler"], new=self.cfg.lr_scheduler)
        self.step = int(ckpt["step"])
        sampler = ckpt["sampler"]
        self.position = (int(sampler["epoch"]), int(sampler["batch_in_epoch"]))
        self.skipped_total = int(loop["skipped_total"])
        self.consecutive_skips = int(loop["consecutive_skips"])
        self.plateau_sum = float(loop["plateau_sum"])
        self.plateau_count = int(loop["plateau_count"])
        if int(ckpt["world_size"]) == self.ctx.world_size:
            restore_rng_state(ckpt["rng"][self.ctx.rank], self.device)
        else:
            seed_everything(self.cfg.seed, rank=self.ctx.rank + self.ctx.world_size * (self.step + 1))
            self._event("rng_reseeded_on_resume", old_world_size=int(ckpt["world_size"]))
        self.last_ckpt, self.last_ckpt_step = Path(found_path), self.step
        self._event("resume", path=found_path, epoch=self.position[0], batch_in_epoch=self.position[1])

    def _check_optimizer_shapes(self, path: Path, ckpt: Mapping[str, Any]) -> None:
        """The checkpoint's optimizer state (per parameter, in param-group order, whatever trainer.flat_params)
        must have the parameters' shapes. It has not when the model's weights load (the model keys match) but its
        parameters changed shape: a generator run resumed with another `pad_widths` (the padded copy saves its
        weights in the original layout, its AdamW moments in its own)."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        saved = ckpt["optimizer"]
        ids = [i for g in saved["param_groups"] for i in g["params"]]
        if len(ids) != len(self.params):
            raise ConfigMismatchError(f"cannot resume from {path}: its optimizer state holds {len(ids)} parameters, "
                                      f"this run trains {len(self.params)}")
        for i, p in zip(ids, self.params, strict=True):
            for key, v in saved["state"].get(i, {}).items():
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape:
                    raise ConfigMismatchError(
                        f"cannot resume from {path}: its optimizer state {key!r} of parameter "
                        f"{names.get(id(p), '?')!r} has shape {tuple(v.shape)}, the parameter has shape "
                        f"{tuple(p.shape)}; was it written with another pad_widths (there: "
                        f"{ckpt.get('config', {}).get('pad_widths', 'not set')})? Resume with the same setting")

    def _optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state dict as AdamW over the groups' parameters (the checkpoint format, also with
        trainer.flat_params)."""
        state = self.optimizer.state_dict()
        return self.flat.per_parameter_state(state) if self.flat is not None else state

    def _zero_grad(self, set_to_none: bool) -> None:
        """The trained parameters' gradients set to None or zeroed (with trainer.flat_params the optimizer's own
        parameters, the groups' buffers, keep theirs: `FlatParameters.gather_grads` fills them)."""
        if self.flat is not None:
            self.flat.zero_grad(set_to_none)
        else:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def _check_compatible(self, path: Path, ckpt: Mapping[str, Any]) -> None:
        if ckpt["task_name"] != self.task.name:
            raise ConfigMismatchError(
                f"cannot resume from {path}: it was written by task {ckpt['task_name']!r}, this run is task "
                f"{self.task.name!r}; use another run dir"
            )
        diffs = config_differences(ckpt["config"], self.config, self.cfg.model_keys)
        if diffs:
            raise ConfigMismatchError(
                f"cannot resume from {path}: model-defining config differs ({'; '.join(diffs)}); "
                "restore the config or use another run dir"
            )
        sampler = ckpt["sampler"]
        for key, now in (("num_items", self.num_items), ("batch_size", self.cfg.batch_size), ("seed", self.cfg.seed)):
            if int(sampler[key]) != now:
                raise ConfigMismatchError(
                    f"cannot resume from {path}: data order would change: checkpoint has {key}={sampler[key]}, "
                    f"this run has {key}={now}; use another run dir"
                )
        others = config_differences(ckpt["config"], self.config, [""])
        if others:
            self._event("config_changed_on_resume", differences=others[:20])

    # ------------------------------------------------------------------------------- checkpoints

    def _payload(self, rng: list[dict]) -> dict[str, Any]:
        describe = getattr(self.task, "describe", None)
        return {
            "task_name": self.task.name,
            "task_meta": to_plain(describe() if describe is not None else {}, "task.describe()"),
            "step": self.step,
            "sampler": {
                "epoch": self.position[0],
                "batch_in_epoch": self.position[1],
                "num_items": self.num_items,
                "batch_size": self.cfg.batch_size,
                "seed": self.cfg.seed,
            },
            "loop": {
                "skipped_total": self.skipped_total,
                "consecutive_skips": self.consecutive_skips,
                "plateau_sum": self.plateau_sum,
                "plateau_count": self.plateau_count,
                "lr_scheduler": self.cfg.lr_scheduler,
            },
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": _float_lrs(self._optimizer_state()),
            "scheduler": _float_lrs(self.scheduler.state_dict()),
            "rng": rng,
            "world_size": self.ctx.world_size,
            "config": self.config,
            "trainer": self.cfg.to_dict(),
            "versions": software_versions(),
        }

    def _checkpoint(self, reason: str) -> None:
        rng = self.ctx.all_gather(capture_rng_state(self.device))
        t0 = time.perf_counter()
        path = self.ctx.run_on_main(lambda: self.store.save(self._payload(rng)))
        self.last_ckpt = path if path is not None else self.store.last
        self.last_ckpt_step = self.step
        self._event("checkpoint", path=str(self.store.last), reason=reason, seconds=round(time.perf_counter() - t0, 3))

    # --------------------------------------------------------------------------------- one step

    @staticmethod
    def _empty_window() -> dict[str, Any]:
        return {"steps": 0, "loss": 0.0, "count": 0.0, "grad_norm": 0.0, "q_sum": [0.0] * 4, "q_cnt": [0.0] * 4,
                "terms": {}, "t0": time.perf_counter(), "step0": None}

    def _check_terms(self, terms: Any) -> None:
        if not isinstance(terms, Mapping) or "loss" not in terms:
            raise TypeError(f"task {self.task.name!r}: loss() must return a dict with a 'loss' entry")
        n = None
        for k, v in terms.items():
            if not isinstance(v, Tensor) or v.dim() != 1:
                raise ValueError(
                    f"task {self.task.name!r}: loss term {k!r} must be a per-sample tensor of shape (B,), got "
                    f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                )
            if n is not None and v.shape[0] != n:
                raise ValueError(f"task {self.task.name!r}: loss terms have different lengths ({k!r}: {v.shape[0]})")
            n = v.shape[0]
        if "t" in terms:
            if terms["t"].is_floating_point():
                raise ValueError(f"task {self.task.name!r}: loss term 't' must hold integer timesteps")
            if not isinstance(self.num_timesteps, int) or self.num_timesteps <= 0:
                raise ValueError(
                    f"task {self.task.name!r} returns timesteps 't' but task.num_timesteps={self.num_timesteps!r}; "
                    "set it to the number of diffusion steps"
                )
        keys = sorted(k for k in terms if k not in ("loss", "t"))
        if self._term_keys is None:
            self._term_keys = keys
        elif keys != self._term_keys:
            raise ValueError(f"task {self.task.name!r}: loss terms changed from {self._term_keys} to {keys}")

    def _stats(self, terms: Mapping[str, Tensor], loss: Tensor, grad_norm: Tensor, stop: bool | Tensor) -> Tensor:
        """Vector summed over ranks: [loss_sum, n, grad_norm, bad, stop, q_sum x4, q_cnt x4, terms...]."""
        per_sample = terms["loss"].detach().float()
        q_sum = torch.zeros(_NUM_QUARTILES, device=self.device)
        q_cnt = torch.zeros(_NUM_QUARTILES, device=self.device)
        if "t" in terms:
            q = (terms["t"].detach().long() * _NUM_QUARTILES // self.num_timesteps).clamp(0, _NUM_QUARTILES - 1)
            q_sum.scatter_add_(0, q, per_sample)
            q_cnt.scatter_add_(0, q, torch.ones_like(per_sample))
        bad = (~torch.isfinite(loss.detach())).float() + (~torch.isfinite(grad_norm)).float()
        if not isinstance(stop, Tensor):
            stop = torch.full((), float(stop), device=self.device)
        head = torch.stack([  # torch.full, not torch.tensor: no host-to-device copy (CUDA-graph capturable)
            per_sample.sum(),
            torch.full((), float(per_sample.numel()), device=self.device),
            grad_norm.float() / self.ctx.world_size,
            bad,
            stop,
        ])
        extra = [terms[k].detach().float().sum().reshape(1) for k in self._term_keys or []]
        return torch.cat([head, q_sum, q_cnt, *extra])

    def _nonfinite(self, terms: Mapping[str, Tensor], stats: list[float], epoch: int, b: int) -> None:
        step = self.step + 1
        indices = self.sampler.global_batch(epoch, b)
        local = self.sampler.local_batch(epoch, b)
        bad_rows = torch.nonzero(~torch.isfinite(terms["loss"].detach())).flatten().tolist()
        bad_local = [local[i] for i in bad_rows if i < len(local)]
        where = (
            f"non-finite loss or gradient at step {step} (mean loss {stats[0] / max(stats[1], 1):.4g}, grad norm "
            f"{stats[2]:.4g}); batch = dataset indices {indices} (epoch {epoch}, batch {b} of the epoch); "
            f"samples with a non-finite loss on rank {self.ctx.rank}: {bad_local}"
        )
        if self.cfg.nan_policy == "stop":
            self._event("nonfinite_stop", indices=indices)
            raise NonFiniteLossError(
                f"{where}. Stopped (trainer.nan_policy='stop'); the last good checkpoint is {self.last_ckpt} "
                f"(step {self.last_ckpt_step})",
                step=step,
                batch_indices=indices,
            )
        if self._graphs is None:  # graph-owned gradients stay allocated (the next step overwrites them)
            self._zero_grad(set_to_none=True)
        self.skipped_total += 1
        self.consecutive_skips += 1
        self.step = step
        self._event("nonfinite_skip", indices=indices, skipped_total=self.skipped_total)
        if self.consecutive_skips > self.cfg.max_skips:
            raise NonFiniteLossError(
                f"{where}. {self.consecutive_skips} steps in a row were non-finite, more than trainer.max_skips="
                f"{self.cfg.max_skips}; the last good checkpoint is {self.last_ckpt} (step {self.last_ckpt_step})",
                step=step,
                batch_indices=indices,
            )

    def _module_state_tensors(self) -> list[Tensor]:
        """The model's parameters and tensor buffers, each once; with flat parameters, each group's buffer in place
        of the parameters that are views of it (one collective per group instead of one per parameter)."""
        seen: set[int] = set()
        out = []
        if self.flat is not None:
            out += [b.detach() for b in self.flat.buffers]
            seen.update(id(p) for p in self.flat.params)
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t.detach())
        return out

    def _task_loss(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        return self.task.loss(self.ddp, batch)

    def _forward_backward(self, batch: Mapping[str, Any], stop: bool | Tensor,
                          capturing: bool = False) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """Loss, backward, gradient norm and the stats vector (summed over ranks): (terms, grad_norm, stats)
        as tensors, no host sync. With trainer.cuda_graph, autocast's weight cache is off in every step (a cached
        cast would not be refreshed on replay; the eager steps before the capture run the same way, so a compiled
        model is not recompiled for the capture)."""
        autocast = (
            torch.autocast(device_type="cuda", dtype=torch.bfloat16, cache_enabled=not self.use_graphs)
            if self.use_bf16 else contextlib.nullcontext()
        )
        with autocast:
            terms = self._loss(batch)
        self._check_terms(terms)
        loss = terms["loss"].float().mean()
        if not capturing:  # captured: the gradients are None before capture and the graph's outputs after
            # once graphs exist, zero their gradients in place (the update graph reads those tensors)
            self._zero_grad(set_to_none=self._graphs is None)
        loss.backward()
        if self.flat is not None:
            self.flat.gather_grads()
            if self.sync_flat:  # the mean over ranks, as DDP's: one all-reduce per group's buffer
                self.ctx.all_reduce_mean_(self.flat.grads(), self.sync_dtype)
        grads = [p.grad for p in self.update_params if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        stats_t = self.ctx.all_reduce_sum(self._stats(terms, loss, grad_norm, stop))
        return terms, grad_norm, stats_t

    def _update(self, grad_norm: Tensor) -> None:
        """Clip, AdamW, EMA: device work only (captured as one CUDA graph with trainer.cuda_graph)."""
        if self.cfg.clip_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.update_params, self.cfg.clip_norm, grad_norm)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def _may_prefetch(self, stop: bool) -> bool:
        """Whether the next batch may be loaded while this step runs on the device, before the host reads its stats
        (with trainer.cuda_graph the update graph is short: host work between the update and the next step would
        leave the GPU idle). Only in one process, where `stop` is this process's own request (under DDP another
        rank's can stop the run), and not before the end, an evaluation or a checkpoint: their RNG state must not
        include the next batch's loading (a resumed run loads that batch itself), so the random draws stay in the
        order of a run without prefetching."""
        cfg, after = self.cfg, self.step + 1
        return (not self.ctx.enabled and not stop and after < cfg.max_steps
                and not (cfg.eval_every and after % cfg.eval_every == 0)
                and not (cfg.ckpt_every and after % cfg.ckpt_every == 0))

    def _train_step(self, batch: Mapping[str, Any], stop: bool,
                    prefetch: Iterator[Any] | None = None) -> tuple[bool, bool, Any]:
        """One step; returns (stepped, stop requested on any rank, the next batch or None). With `prefetch` (the
        data iterator, see `_may_prefetch`) the next batch is loaded once the step's device work is launched,
        before its one host sync."""
        epoch, b = self.position
        # training mode for the whole model, as train() sets it, but only when some module is not in it: train()
        # walks the tree in Python (~0.2 ms per step for IdGen's 130 modules on this project's CPU machine, host
        # time between the update and the next step's launch), the check ~4 us
        if not all(m.training for m in self._model_modules):
            self.ddp.train()
        if self.use_graphs and self._graphs is None and self._eager_left == 0:
            self._capture(batch)
        graphed = self._graphs is not None and self._graphs.matches(batch)
        if self._graphs is not None and not graphed and not self._told_mismatch:
            self._told_mismatch = True  # once per run: such batches run eagerly (correct, slower)
            self._event("cuda_graph_batch_mismatch", captured=str(self._graphs.signature)[:300],
                        batch=str(_signature(batch))[:300])
        if graphed:
            terms, grad_norm, stats_t = self._graphs.forward_backward(batch, stop)
        else:
            terms, grad_norm, stats_t = self._forward_backward(batch, stop)
            self._eager_left = max(self._eager_left - 1, 0)
        ahead = _move(next(prefetch), self.device) if prefetch is not None else None
        stats = stats_t.tolist()  # the one host sync of the step
        stop_any = stats[4] > 0
        self.position = self.sampler.advance(epoch, b)
        if stats[3] > 0:
            self._nonfinite(terms, stats, epoch, b)
            if self.cfg.lr_scheduler != "plateau":
                with warnings.catch_warnings():
                    # the schedule follows the step counter, skipped steps included: stepping it
                    # without an optimizer step is intended
                    warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
                    self.scheduler.step()
            return False, stop_any, ahead
        if graphed:
            self._graphs.update()
        else:
            self._update(grad_norm)
        self.step += 1
        self.consecutive_skips = 0
        self._accumulate(stats)
        if self.cfg.lr_scheduler == "plateau":
            self.plateau_sum += stats[0]
            self.plateau_count += int(stats[1])
            if self.step % self.plateau_every == 0:
                self.scheduler.step(self.plateau_sum / self.plateau_count)
                self.plateau_sum, self.plateau_count = 0.0, 0
        else:
            self.scheduler.step()
        return True, stop_any, ahead

    def _capture(self, batch: Mapping[str, Any]) -> None:
        """Capture the step's two CUDA graphs (trainer.cuda_graph) on this batch's shapes; on failure (a task whose
        loss syncs with the host, say) log why and go on without graphs."""
        for g in self.optimizer.param_groups:  # the schedulers fill_ tensor learning rates in place
            if not isinstance(g["lr"], Tensor):
                g["lr"] = torch.tensor(float(g["lr"]), device=self.device)
            g["capturable"] = True  # also when resumed from a checkpoint of a run without graphs
        error = None
        try:
            self._graphs = _StepGraphs(self, batch)
        except Exception as exc:  # noqa: BLE001 -- reported, training goes on eagerly
            error = f"{type(exc).__name__}: {exc}"[:500]
        if self.ctx.enabled:  # every rank replays its graph (captured all-reduces included) or none does
            failed = self.ctx.all_reduce_sum(torch.tensor(float(error is not None), device=self.device))
            if error is None and failed.item() > 0:
                error = "another rank's capture failed"
        if error is not None:
            self._graphs = None
            self.use_graphs = False
            self._zero_grad(set_to_none=True)  # drop gradients a failed capture may have left
            self._event("cuda_graph_failed", error=error)
            return
        captured = self._graphs.batch
        shapes = {k: list(v.shape) for k, v in captured.items() if isinstance(v, Tensor)} if isinstance(
            captured, Mapping) else {}
        self._event("cuda_graph_captured", batch_shapes=shapes)

    def _accumulate(self, stats: list[float]) -> None:
        w = self._window
        w["steps"] += 1
        w["loss"] += stats[0]
        w["count"] += stats[1]
        w["grad_norm"] += stats[2]
        for i in range(_NUM_QUARTILES):
            w["q_sum"][i] += stats[5 + i]
            w["q_cnt"][i] += stats[9 + i]
        for j, k in enumerate(self._term_keys or []):
            w["terms"][k] = w["terms"].get(k, 0.0) + stats[13 + j]

    def _log(self) -> None:
        w = self._window
        if w["steps"] == 0:
            return
        record: dict[str, float] = {"loss": w["loss"] / w["count"]}
        for i in range(_NUM_QUARTILES):
            if w["q_cnt"][i] > 0:
                record[f"loss_q{i}"] = w["q_sum"][i] / w["q_cnt"][i]
        for k, v in w["terms"].items():
            record[k] = v / w["count"]
        record["grad_norm"] = w["grad_norm"] / w["steps"]
        for i, g in enumerate(self.optimizer.param_groups):
            record["lr" if i == 0 else f"lr_g{i}"] = float(g["lr"])
        record["epoch"] = self.position[0] + self.position[1] / self.steps_per_epoch
        record["skipped_total"] = self.skipped_total
        record["steps_per_s"] = w["steps"] / max(time.perf_counter() - w["t0"], 1e-9)
        self.last_metrics.update(record)
        if self.logger is not None:
            self.logger.log(self.step, record)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.3g}")
        self._window = self._empty_window()

    def _evaluate(self) -> None:
        evaluate = getattr(self.task, "evaluate", None)
        if evaluate is None:
            return
        model = self.ema.module if self.ema is not None else self.model

        def run() -> dict[str, float]:
            # evaluation draws from its own copy of the RNG streams so that training does not depend
            # on how often it is evaluated (our choice)
            saved = capture_rng_state(self.device)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    metrics = evaluate(model)
            finally:
                model.train(was_training)
                restore_rng_state(saved, self.device)
            if not isinstance(metrics, Mapping):
                raise TypeError(f"task {self.task.name!r}: evaluate() must return a dict of floats")
            return {f"eval/{k}": float(v) for k, v in metrics.items()}

        metrics = self.ctx.run_on_main(run)
        if metrics:
            self.last_metrics.update(metrics)
            if self.logger is not None:
                self.logger.log(self.step, metrics)

    @contextlib.contextmanager
    def _reduction_launch(self) -> Iterator[None]:
        """trainer.reduction_launch=one_row with trainer.compile on CUDA: inductor's 257-512-column persistent
        reductions with >= 3 reductions (the 300-304-wide norms' backward kernels) one row per warp while the steps
        run (ofer/reduction_launch.py; H200, bare IdGen step 20.49 -> 19.95-20.33 ms, BENCHMARKS.md). Events:
        ``reduction_launch`` (unavailable in this torch), and ``reduction_relaunched`` with the number of kernels
        changed once the loop ends."""
        if not (self.cfg.compile and self.device.type == "cuda" and self.cfg.reduction_launch == "one_row"):
            yield
            return
        with one_row_per_warp() as records:
            if records is None:
                self._event("reduction_launch", launch="inductor", reason=f"torch {torch.__version__} has no "
                            "triton_heuristics._persistent_reduction_configs to wrap")
            yield
            if records is not None:
                self._event("reduction_relaunched", kernels=len(records))

    # ----------------------------------------------------------------------------------- driver

    def run(self) -> TrainResult:
        cfg = self.cfg
        determinism = set_deterministic(cfg.deterministic)
        data_iter = None
        self.pbar = None
        try:
            seed_everything(cfg.seed, rank=self.ctx.rank)
            self._build()
            if self.ctx.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            self.logger = build_logger(
                self.logger_cfg, run_dir=self.run_dir, config=self.config, is_main=self.ctx.is_main
            )
            self.store = CheckpointStore(
                self.run_dir, keep_every=cfg.keep_every, on_event=lambda name, info: self._event(name, **info)
            )
            if cfg.precision == "bf16" and not self.use_bf16:
                self._event("bf16_ignored_on_cpu", device=str(self.device))
            if cfg.cuda_graph and not self.use_graphs:
                self._event("cuda_graph_ignored_on_cpu", device=str(self.device))
            if cfg.compile:  # what trainer.compile_scope (auto by default) compiles in this run
                self._event("compile", scope=self.compile_scope)
            if self.ctx.enabled:  # how the processes sync (trainer.grad_sync, auto by default)
                self._event("grad_sync", mode=cfg.grad_sync_mode, world_size=self.ctx.world_size,
                            dtype=cfg.grad_sync_dtype)
                if cfg.flat_params and self.flat is None:
                    self._event("flat_params_off", reason="grad_sync=ddp keeps the gradients in DDP's buckets; "
                                "AdamW, clipping and EMA run per parameter")
            self._resume()
            self.sampler = DeterministicBatchSampler(
                num_items=self.num_items,
                batch_size=cfg.batch_size,
                seed=cfg.seed,
                rank=self.ctx.rank,
                world_size=self.ctx.world_size,
                epoch=self.position[0],
                batch_in_epoch=self.position[1],
            )
            loader = DataLoader(
                self.dataset,
                batch_sampler=self.sampler,
                num_workers=cfg.num_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=cfg.num_workers > 0,
                # its own generator: creating the iterator must not draw from the global torch RNG,
                # or a resumed run would diverge from an uninterrupted one
                generator=torch.Generator().manual_seed(cfg.seed),
            )
            if self.step >= cfg.max_steps:
                self._event("already_done", max_steps=cfg.max_steps)
                return TrainResult(self.step, self.last_ckpt, dict(self.last_metrics), self.skipped_total)
            show = cfg.progress and self.ctx.is_main and sys.stderr.isatty()
            if show:
                from tqdm import tqdm

                self.pbar = tqdm(total=cfg.max_steps, initial=self.step, dynamic_ncols=True, desc=self.task.name)
            data_iter = iter(loader)
            batch = None
            with self._reduction_launch(), PreemptionWatcher(cfg.preempt_signals) as watcher:
                while self.step < cfg.max_steps:
                    if batch is None:
                        batch = _move(next(data_iter), self.device)
                    requested = watcher.requested
                    stepped, stop, batch = self._train_step(
                        batch, requested, data_iter if self._may_prefetch(requested) else None)
                    if self.pbar is not None:
                        self.pbar.update(1)
                    final = self.step >= cfg.max_steps
                    if stepped and (self.step % cfg.log_every == 0 or final or stop):
                        self._log()
                    if not stop and (final or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                        self._evaluate()
                    if stop or final or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0):
                        self._checkpoint("preempted" if stop else "final" if final else "periodic")
                    if self.on_step_end is not None:
                        self.on_step_end(self.step)
                    if stop:
                        name = watcher.signal_name
                        self._event("preempted", signal=name)
                        if self.logger is not None:
                            self.logger.close()
                        watcher.chain()
                        raise TrainingPreempted(step=self.step, signal_name=name, checkpoint=str(self.last_ckpt))
            return TrainResult(self.step, self.last_ckpt, dict(self.last_metrics), self.skipped_total)
        finally:
            if self.pbar is not None:
                self.pbar.close()
            del data_iter
            if self.logger is not None:
                self.logger.close()
            determinism.restore()
