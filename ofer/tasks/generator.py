"""IdGen and ExpGen as one task: a conditional diffusion model over a FLAME coefficient vector.

IdGen: x0 = the 300 shape coefficients, condition = the ArcFace feature (512).
ExpGen: x0 = 50 expression coefficients + 3 jaw axis-angle values (53), condition = ArcFace (+) FaRL
(1024). The same class serves both; only `target` and `cond_keys` differ (configs/job/*.yaml).

Dataset items are dicts holding at least the target fields (`shape (300,)`, or `expression (>=50,)` and
`pose (15,)`) and one feature vector per condition key (`arcface (512,)`, `farl (512,)`); an identity item
with K images may hold features of shape (K, 512): every image then becomes one training row with the same
target (MICA/OFER train IdGen on 16 identities x 4 images).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ofer.diffusion import GaussianDiffusion
from ofer.flame import FLAME, MM_PER_M

__all__ = ["GeneratorTask", "TARGETS", "targets_from_batch", "condition_from_batch"]

# target name -> dimension. OFER [code]: ExpGen predicts 50 expression + 3 jaw values.
TARGETS = {"shape": 300, "expression_jaw": 53}
JAW = slice(6, 9)  # jaw axis-angle inside the 15-d FLAME pose


def targets_from_batch(batch: dict, target: str) -> Tensor:
    """The diffusion variable x0 (B, D) of a batch."""
    if target == "shape":
        return batch["shape"][..., :300].float()
    if target == "expression_jaw":
        return torch.cat([batch["expression"][..., :50], batch["pose"][..., JAW]], dim=-1).float()
    raise ValueError(f"unknown target {target!r}; allowed: {sorted(TARGETS)}")


def condition_from_batch(batch: dict, cond_keys: Sequence[str]) -> Tensor:
    """Concatenated condition features (B, C) or (B, K, C)."""
    missing = [k for k in cond_keys if k not in batch]
    if missing:
        raise KeyError(f"batch has no condition feature(s) {missing}; keys: {sorted(batch)}")
    return torch.cat([batch[k].float() for k in cond_keys], dim=-1)


def _rows(x0: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
    """Flatten K images per item: x0 (B,D), cond (B,K,C) -> (B*K, D), (B*K, C)."""
    if cond.ndim == 3:
        K = cond.shape[1]
        return x0.repeat_interleave(K, dim=0), cond.reshape(-1, cond.shape[-1])
    return x0, cond


class GeneratorTask:
    """Task for `ofer.training.train` (see `ofer/training/task.py`)."""

    def __init__(
        self, *, name: str, model: nn.Module, diffusion: GaussianDiffusion, dataset: torch.utils.data.Dataset,
        target: str, cond_keys: Sequence[str], lr: float = 1e-3, eval_dataset: Any = None,
        flame: FLAME | None = None, eval_items: int = 16, eval_samples: int = 10,
        eval_sampling: dict | None = None, describe: dict | None = None,
    ) -> None:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; allowed: {sorted(TARGETS)}")
        self.name = name
        self.model = model
        self.diffusion = diffusion
        self.num_timesteps = diffusion.num_steps
        self.target = target
        self.dim = TARGETS[target]
        self.cond_keys = list(cond_keys)
        self.lr = lr
        self._dataset = dataset
        self._eval = eval_dataset
        self.flame = flame
        self.eval_items = eval_items
        self.eval_samples = eval_samples
        self.eval_sampling = dict(eval_sampling or {"sampler": "ddim", "steps": 50})
        self._describe = dict(describe or {})
        self._check_dims(dataset, "training data")
        if eval_dataset is not None:
            self._check_dims(eval_dataset, "evaluation data")

    def _check_dims(self, dataset: Any, what: str) -> None:
        """Fail at construction when data and model disagree, naming both sides."""
        if len(dataset) == 0:
            raise ValueError(f"{self.name}: the {what} is empty")
        item = dataset[0]
        batch = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in item.items()}
        try:
            x0 = targets_from_batch(batch, self.target)
            cond = condition_from_batch(batch, self.cond_keys)
        except (KeyError, IndexError) as err:
            raise ValueError(f"{self.name}: the {what} does not provide target {self.target!r} / "
                             f"conditions {self.cond_keys}: {err}") from None
        model_dim = getattr(self.model, "dim", None)
        model_cond = getattr(self.model, "cond_dim", None)
        if x0.shape[-1] != self.dim or (model_dim is not None and model_dim != self.dim):
            raise ValueError(f"{self.name}: target {self.target!r} has {x0.shape[-1]} values in the {what}, "
                             f"the model has dim={model_dim} (expected {self.dim})")
        if model_cond is not None and cond.shape[-1] != model_cond:
            raise ValueError(f"{self.name}: conditions {self.cond_keys} have {cond.shape[-1]} values in the "
                             f"{what}, the model has cond_dim={model_cond}")

    # --- Task interface ---------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.lr}]

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self._dataset

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        x0, cond = _rows(targets_from_batch(batch, self.target), condition_from_batch(batch, self.cond_keys))
        return self.diffusion.training_losses(model, x0, cond)

    def describe(self) -> dict:
        return {"target": self.target, "dim": self.dim, "cond_keys": self.cond_keys, **self._describe}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Sample the held-out items and compare with the truth (and with samples from the prior).

        Reported (mm, vertex error on the FLAME `face` region when a FLAME layer is given, otherwise the
        coefficient L2): `err_mean_sample` (average over samples), `err_best_of_n` (closest sample),
        `err_prior` (the same for N(0, I) draws: what an untrained generator would give; for ExpGen the
        prior of the targets' own spread is unknown, so the zero vector is used instead).
        `err_mean_sample_other_cond`: the average sample error when every item is given the condition of the next
        item (a control: it shows how much of the gain over `err_prior` comes from the condition; needs >= 2 items).
        Also the held-out denoising loss (the training objective, same t and noise for both, 8 draws per item):
        `denoise_loss` of the model and `denoise_loss_untrained` of the untrained network, whose zero output
        layer makes it predict eps = 0 (with `prior_skip`: the exact noise predictor of the N(0, I) prior).
        """
        if self._eval is None:
            return {}
        items = [self._eval[i] for i in range(min(self.eval_items, len(self._eval)))]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0] if isinstance(items[0][k], Tensor)}
        device = next(model.parameters()).device
        x0 = targets_from_batch(batch, self.target).to(device)
        cond = condition_from_batch(batch, self.cond_keys).to(device)
        if cond.ndim == 3:
            cond = cond[:, 0]  # one image per item
        g = torch.Generator(device=device).manual_seed(0)
        samples = self.diffusion.sample(model, cond, dim=self.dim, num_samples=self.eval_samples,
                                        generator=g, **self.eval_sampling)  # (B,N,D)
        if self.target == "shape":
            baseline = torch.randn(samples.shape, generator=g, device=device)
        else:
            baseline = torch.zeros_like(samples)
        err = self._errors(samples, x0)
        err_base = self._errors(baseline, x0)
        other = {}
        if cond.shape[0] >= 2:
            g_other = torch.Generator(device=device).manual_seed(0)  # the same noise as `samples`
            shuffled = self.diffusion.sample(model, cond.roll(1, dims=0), dim=self.dim, num_samples=self.eval_samples,
                                             generator=g_other, **self.eval_sampling)
            other = {"err_mean_sample_other_cond": self._errors(shuffled, x0).mean().item()}
        x_rep, c_rep = x0.float().repeat(8, 1), cond.float().repeat(8, 1)
        t = torch.randint(0, self.diffusion.num_steps, (x_rep.shape[0],), device=device, generator=g)
        noise = torch.randn(x_rep.shape, device=device, generator=g)
        loss = self.diffusion.training_losses(model, x_rep, c_rep, t=t, noise=noise)["loss"].mean()
        untrained = self.diffusion.training_losses(lambda x, t_, c: torch.zeros_like(x), x_rep, c_rep, t=t,
                                                   noise=noise)["loss"].mean()
        return {"err_mean_sample": err.mean().item(), "err_best_of_n": err.min(1).values.mean().item(),
                "err_prior": err_base.mean().item(), "err_prior_best_of_n": err_base.min(1).values.mean().item(),
                "denoise_loss": loss.item(), "denoise_loss_untrained": untrained.item(), **other}

    def _errors(self, samples: Tensor, x0: Tensor) -> Tensor:
        """(B,N,D) vs (B,D) -> (B,N) per-sample error."""
        B, N, D = samples.shape
        if self.flame is None:
            return (samples - x0[:, None]).norm(dim=-1)
        flame = self.flame.to(samples.device)
        face = flame.face_mask("face") if flame.masks else slice(None)
        if self.target == "shape":
            pred = flame.shape_vertices(samples.reshape(B * N, D).float())
            gt = flame.shape_vertices(x0.float())
        else:
            def decode(v: Tensor) -> Tensor:
                exp = torch.zeros(v.shape[0], flame.n_exp, device=v.device)
                exp[:, :50] = v[:, :50]
                pose = torch.zeros(v.shape[0], 15, device=v.device)
                pose[:, JAW] = v[:, 50:53]
                return flame(torch.zeros(v.shape[0], flame.n_shape, device=v.device), exp, pose).vertices
            pred, gt = decode(samples.reshape(B * N, D).float()), decode(x0.float())
        pred = pred.view(B, N, -1, 3)[:, :, face]
        gt = gt[:, face]
        return (pred - gt[:, None]).norm(dim=-1).mean(-1) * MM_PER_M
