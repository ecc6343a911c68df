"""The `trainer` config group as a validated dataclass (``configs/trainer/default.yaml``).

Every value is checked when :class:`TrainerConfig` is built, so that a typo fails at once with the
list of allowed values instead of 10k steps later.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

LR_SCHEDULERS = ("plateau", "cosine", "constant")
OPTIMIZERS = ("adamw",)
PRECISIONS = ("fp32", "bf16")
NAN_POLICIES = ("stop", "skip")
COMPILE_SCOPES = ("auto", "model", "loss")
REDUCTION_LAUNCHES = ("one_row", "inductor")
# trainer.grad_sync: DistributedDataParallel, one all-reduce per flat buffer, or auto (flat where it applies)
GRAD_SYNCS = ("auto", "ddp", "flat")
# trainer.grad_sync_dtype: the dtype the gradients are all-reduced in (float32: the exact mean of float32 gradients;
# bfloat16: half the bytes, each rank's gradient rounded once before the sum, as DDP's bf16_compress_hook)
GRAD_SYNC_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """Knobs of :func:`ofer.training.train`; see ``configs/trainer/default.yaml`` for the meaning of each.

    ``batch_size`` is the *global* batch: under DDP each of the W ranks gets ``batch_size / W`` items
    of the same deterministic batch, so a run means the same thing on 1 or 8 GPUs (our choice).
    """

    max_steps: int
    batch_size: int
    num_workers: int = 0
    ckpt_every: int | None = 1000
    keep_every: int | None = None
    eval_every: int | None = None
    log_every: int = 50
    optimizer: str = "adamw"
    lr: float = 1e-3  # OFER: denoiser LR; used for groups that do not set their own "lr"
    weight_decay: float = 1e-4  # OFER: AdamW weight decay
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: str = "plateau"
    plateau_factor: float = 0.99  # OFER: ReduceLROnPlateau(factor=0.99, patience=2)
    plateau_patience: int = 2
    plateau_every: int | None = None  # None = one pass of the sampler (OFER steps it per epoch)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None
    ema_decay: float = 0.999
    precision: str = "fp32"
    nan_policy: str = "stop"
    max_skips: int = 10
    seed: int = 0
    deterministic: bool = False
    model_keys: tuple[str, ...] = ("model",)
    ddp_find_unused_parameters: bool = False
    ddp_gradient_as_bucket_view: bool = True
    grad_sync: str = "auto"
    grad_sync_dtype: str = "float32"
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR2")
    progress: bool = True
    compile: bool = False
    compile_scope: str = "auto"
    cuda_graph: bool = False
    flat_params: bool = True
    reduction_launch: str = "one_row"

    def __post_init__(self) -> None:
        def choose(key: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"trainer.{key}={value!r} is not allowed; expected one of {list(allowed)}")

        def positive(key: str, *, allow_none: bool = False, allow_zero: bool = False) -> None:
            value = getattr(self, key)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
                bound = ">= 0" if allow_zero else ">= 1"
                none = " or null" if allow_none else ""
                raise ValueError(f"trainer.{key}={value!r} is not allowed; expected an integer {bound}{none}")

        choose("optimizer", OPTIMIZERS)
        choose("lr_scheduler", LR_SCHEDULERS)
        choose("precision", PRECISIONS)
        choose("nan_policy", NAN_POLICIES)
        choose("compile_scope", COMPILE_SCOPES)
        choose("reduction_launch", REDUCTION_LAUNCHES)
        choose("grad_sync", GRAD_SYNCS)
        choose("grad_sync_dtype", GRAD_SYNC_DTYPES)
        positive("max_steps")
        positive("batch_size")
        positive("num_workers", allow_zero=True)
        positive("log_every")
        positive("plateau_patience", allow_zero=True)
        positive("warmup_steps", allow_zero=True)
        positive("max_skips", allow_zero=True)
        positive("seed", allow_zero=True)
        for key in ("ckpt_every", "keep_every", "eval_every", "plateau_every"):
            positive(key, allow_none=True)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"trainer.ema_decay={self.ema_decay!r} is not allowed; expected 0 <= decay < 1 (0 = off)")
        if not 0.0 < self.plateau_factor < 1.0:
            raise ValueError(f"trainer.plateau_factor={self.plateau_factor!r} is not allowed; expected 0 < factor < 1")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"trainer.min_lr_ratio={self.min_lr_ratio!r} is not allowed; expected 0 <= ratio <= 1")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"trainer.grad_clip={self.grad_clip!r} is not allowed; expected > 0, or 0/null = off")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"trainer.lr={self.lr!r} / weight_decay={self.weight_decay!r}: expected lr > 0, wd >= 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"trainer.betas={list(self.betas)!r} is not allowed; expected two values in [0, 1)")
        if self.lr_scheduler == "plateau" and self.warmup_steps:
            raise ValueError(
                f"trainer.warmup_steps={self.warmup_steps} is not supported with lr_scheduler='plateau'; "
                "use 'cosine' or 'constant' for a warmup"
            )
        if self.grad_sync == "flat" and not self.flat_params:
            raise ValueError("trainer.grad_sync='flat' all-reduces the flat gradient buffers of trainer.flat_params; "
                             "set trainer.flat_params=true, or trainer.grad_sync=ddp")
        if self.grad_sync == "flat" and self.ddp_find_unused_parameters:
            raise ValueError("trainer.grad_sync='flat' needs every parameter to get a gradient in every step; "
                             "trainer.ddp_find_unused_parameters=true needs trainer.grad_sync=ddp")
        for name in self.preempt_signals:
            if not isinstance(name, str) or not hasattr(signal, name):
                raise ValueError(f"trainer.preempt_signals: {name!r} is not a signal name such as 'SIGTERM'")

    @property
    def grad_sync_mode(self) -> str:
        """``grad_sync`` with ``auto`` resolved: ``flat`` where it applies (``flat_params=true`` and no search for
        unused parameters, which only DDP does), else ``ddp``. Used only when several processes train."""
        if self.grad_sync != "auto":
            return self.grad_sync
        return "flat" if self.flat_params and not self.ddp_find_unused_parameters else "ddp"

    def compile_scope_for(self, distributed: bool) -> str:
        """``compile_scope`` with ``auto`` resolved for a run in one process (``distributed=False``) or several:
        the model inside DDP's wrapper (several processes, ``grad_sync_mode`` ddp), else the task's whole loss."""
        if self.compile_scope != "auto":
            return self.compile_scope
        return "model" if distributed and self.grad_sync_mode == "ddp" else "loss"

    def flat_params_for(self, distributed: bool) -> bool:
        """``flat_params`` as the loop applies it in one process (``distributed=False``) or several: off under DDP
        (``grad_sync_mode`` ddp), which keeps the gradients in its own buckets. Flat buffers inside DDP's wrapper
        trained the same weights but took 86-802 ms per compiled IdGen step on 2 x H200 (median 98), against
        31-48 ms (median 39) without them on the same machine, 26-36 ms (median 31) on another (BENCHMARKS.md,
        "Session of 2026-11-29, ninth")."""
        return self.flat_params and not (distributed and self.grad_sync_mode == "ddp")

    @property
    def clip_norm(self) -> float | None:
        """The clipping norm, or None when clipping is off (``grad_clip`` 0 or null)."""
        return self.grad_clip if self.grad_clip else None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | TrainerConfig) -> TrainerConfig:
        """Build from a plain mapping or an OmegaConf ``DictConfig``; unknown keys are an error."""
        if isinstance(cfg, TrainerConfig):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except ImportError:  # pragma: no cover - omegaconf is a dependency, plain dicts still work
            pass
        if not isinstance(cfg, Mapping):
            raise TypeError(f"trainer config must be a mapping, got {type(cfg).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown trainer config keys {unknown}; allowed keys are {sorted(known)}")
        missing = [k for k in ("max_steps", "batch_size") if cfg.get(k) in (None, "???")]
        if missing:
            raise ValueError(f"trainer config is missing required keys {missing}")
        values = dict(cfg)
        for key in ("betas", "model_keys", "preempt_signals"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain-container copy (lists instead of tuples), safe for ``torch.load(weights_only=True)``."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

