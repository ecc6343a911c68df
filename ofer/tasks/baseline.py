"""A deterministic MICA-style baseline: ArcFace feature -> MLP -> 300 FLAME shape coefficients.

One answer per image, trained with an L1 vertex loss that weighs the face region more (MICA weighs its face
mask; our weights: `face_weight` on the FLAME `face` region, 1 elsewhere). It makes the value of multiple
hypotheses visible: a row next to ranked / average / best-of-N in every table.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ofer.flame import FLAME, MM_PER_M

__all__ = ["ShapeRegressor", "RegressionTask"]


class ShapeRegressor(nn.Module):
    """`forward(feature (B,in_dim)) -> shape (B,out_dim)`: LeakyReLU MLP (MICA's mapping network shape:
    hidden layers of 300 units), zero-initialised output so training starts at the mean shape."""

    def __init__(self, *, in_dim: int = 512, out_dim: int = 300, hidden: Sequence[int] = (300, 300, 300)) -> None:
        super().__init__()
        dims = (in_dim, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(dims[-1], out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Zero output: the first prediction is the template (coefficients 0), a sane start for a regressor.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, feature: Tensor) -> Tensor:
        return self.out(self.net(feature))


class RegressionTask:
    """Task for `ofer.training.train`: items hold `shape (300,)` and `arcface_feat (K,512)` or `(512,)`."""

    name = "baseline"
    num_timesteps = None

    def __init__(self, *, model: ShapeRegressor, flame: FLAME, dataset: torch.utils.data.Dataset, lr: float = 1e-4,
                 face_weight: float = 10.0, eval_dataset: torch.utils.data.Dataset | None = None) -> None:
        self.model, self.flame, self.lr = model, flame, lr
        self._dataset, self._eval = dataset, eval_dataset
        w = torch.ones(flame.num_vertices)
        w[flame.face_mask("face").cpu()] = face_weight
        self.weights = w / w.mean()

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters()), "lr": self.lr}]

    def train_dataset(self) -> torch.utils.data.Dataset:
        return self._dataset

    def describe(self) -> dict:
        return {"face_weight_normalised": float(self.weights.max())}

    def _rows(self, batch: dict) -> tuple[Tensor, Tensor]:
        feat, shape = batch["arcface_feat"].float(), batch["shape"][:, :300].float()
        if feat.ndim == 3:  # K photos per identity
            shape = shape.repeat_interleave(feat.shape[1], dim=0)
            feat = feat.reshape(-1, feat.shape[-1])
        return feat, shape

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        feat, shape = self._rows(batch)
        flame = self.flame.to(feat.device)
        pred_v = flame.shape_vertices(model(feat).float())
        gt_v = flame.shape_vertices(shape)
        w = self.weights.to(feat.device)
        per = ((pred_v - gt_v).abs().sum(-1) * w).mean(-1) * MM_PER_M  # (B,) weighted L1, mm
        return {"loss": per}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out mean per-vertex distance (mm) on the `face` region."""
        if self._eval is None:
            return {}
        device = next(model.parameters()).device
        face = self.flame.face_mask("face").to(device)
        flame = self.flame.to(device)
        errs = []
        for batch in torch.utils.data.DataLoader(self._eval, batch_size=64):
            feat, shape = self._rows({k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)})
            d = (flame.shape_vertices(model(feat).float()) - flame.shape_vertices(shape))[:, face]
            errs.append(d.norm(dim=-1).mean(-1) * MM_PER_M)
        return {"face_error_mm": torch.cat(errs).mean().item()}
