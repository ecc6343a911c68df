"""IdRank as a task on the shared loop: ListNet over cached IdGen candidate pools.

Items (one per training image): `shape (300,)` ground truth, `arcface_feat (512,)`, `farl_feat (512,)`,
`candidates (N,300)` from the stored pool. The public OFER code draws 100 fresh 1000-step samples per image
at every step; we sample the pools once (`ofer.ranking.ensure_pool`) and can refresh them.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ofer.eval.metrics import spearman
from ofer.flame import FLAME, MM_PER_M
from ofer.models.ranker import candidate_vertices, check_face_idx
from ofer.ranking import listnet_loss, ranking_metrics, ranking_targets

log = logging.getLogger(__name__)

__all__ = ["RankerTask", "ImageFeatureDataset"]


class ImageFeatureDataset(Dataset):
    """One item per image of a MICA-layout dataset: its identity's coefficients and cached features.

    Args:
        dataset: an `ofer.data.datasets.MicaDataset` (built with inputs=()).
        features: {slot: (num_images, D) array} in the order of `dataset.image_keys`.
    """

    def __init__(self, dataset: Any, features: dict[str, np.ndarray]) -> None:
        self.dataset = dataset
        self.features = features
        self.name = dataset.name
        self.keys = [f"{dataset.name}/{k}" for k in dataset.image_keys]
        actor_of = np.empty(len(self.keys), dtype=np.int64)
        for a in range(len(dataset)):
            actor_of[dataset.actor_image_ids(a)] = a
        self.actor_of = actor_of

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.dataset.params[int(self.actor_of[i])]
        item = {"shape": torch.from_numpy(p.shape.astype(np.float32)), "key": self.keys[i], "index": i}
        for slot, arr in self.features.items():
            item[f"{slot}_feat"] = torch.from_numpy(np.array(arr[i], dtype=np.float32))
        return item


class RankerTask:
    """Task for `ofer.training.train`: model = IdRanker, loss = ListNet against softmax(-L1 mm / T)."""

    name = "idrank"

    def __init__(self, *, model: nn.Module, flame: FLAME, dataset: Dataset, lr: float = 1e-6,
                 temperature: float = 1.0, eval_dataset: Dataset | None = None, describe: dict | None = None) -> None:
        self.model = model
        self.flame = flame
        self.face_idx = flame.face_mask("face")
        check_face_idx("RankerTask", flame, self.face_idx)  # once: the loss then decodes without the check's syncs
        # face_idx as a buffer, moved to the batch's device by the loss's first call (`_inputs`): no copy per step,
        # and no Python state that a compiled loss would see change after its first call
        self._face = nn.Module()
        self._face.register_buffer("idx", self.face_idx.clone(), persistent=False)
        if getattr(model, "num_face_vertices", len(self.face_idx)) != len(self.face_idx):
            raise ValueError(f"IdRanker expects {model.num_face_vertices} face vertices, the FLAME `face` mask has "
                             f"{len(self.face_idx)}")
        self.lr = lr
        self.temperature = temperature
        self._dataset = dataset
        self._eval = eval_dataset
        self._describe = dict(describe or {})
        self.num_timesteps = None
        if getattr(model, "input_norm", False):
            self._fit_input_normalization()

    @torch.no_grad()
    def _fit_input_normalization(self, max_items: int = 256) -> None:
        """IdRank's input standardisation from the first `max_items` training pools (deterministic; a
        resumed run then loads the same buffers from its checkpoint)."""
        n = min(max_items, len(self._dataset))
        shapes = torch.stack([torch.as_tensor(self._dataset[i]["candidates"]).float() for i in range(n)])
        flame = self.flame.to("cpu")
        self.model.fit_input_normalization(candidate_vertices(flame, shapes, self.face_idx.cpu()).to(
            self.model.input_center.device))
        s_m, s_r = self.model.input_scale.tolist()
        log.info("IdRank input standardisation from %d training pools: RMS of M - C %.2f mm, of residuals %.2f mm",
                 n, s_m, s_r)

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.lr}]

    def train_dataset(self) -> Dataset:
        return self._dataset

    def describe(self) -> dict:
        return {"temperature": self.temperature, **self._describe}

    def _inputs(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        flame = self.flame.to(batch["candidates"].device)
        face = self._face.to(batch["candidates"].device).idx
        cand = candidate_vertices(flame, batch["candidates"].float(), face, check=False)  # (B,N,Vf,3) mm
        gt = flame.shape_vertices(batch["shape"][:, :flame.n_shape].float())[:, face] * MM_PER_M  # (B,Vf,3)
        ctx = torch.cat([batch["arcface_feat"], batch["farl_feat"]], dim=-1).float()  # OFER: ArcFace (+) FaRL
        return cand, gt, ctx

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        cand, gt, ctx = self._inputs(batch)
        errors, target = ranking_targets(cand, gt, temperature=self.temperature)
        logits = model(cand, ctx)
        m = ranking_metrics(logits, errors)
        return {"loss": listnet_loss(logits, target), "chosen_error_mm": m["chosen_error"],
                "best_error_mm": m["best_error"], "mean_error_mm": m["mean_error"]}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out: error (mean L1, mm, face region) of the ranked candidate vs the mean over candidates, the
        best one (oracle), a random one, the candidate-mean shape, and the Spearman correlation between scores
        and -error."""
        if self._eval is None:
            return {}
        device = next(model.parameters()).device
        loader = torch.utils.data.DataLoader(self._eval, batch_size=16, shuffle=False)
        rows: dict[str, list[Tensor]] = {k: [] for k in ("ranked", "mean", "best", "random", "avg_shape", "rho")}
        g = torch.Generator().manual_seed(0)
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            cand, gt, ctx = self._inputs(batch)
            errors, _ = ranking_targets(cand, gt)
            logits = model(cand, ctx)
            m = ranking_metrics(logits, errors)
            pick = torch.randint(errors.shape[1], (errors.shape[0], 1), generator=g).to(device)
            avg = (cand.mean(1) - gt).abs().mean((-1, -2))  # error of the mean candidate shape
            rows["ranked"].append(m["chosen_error"])
            rows["mean"].append(m["mean_error"])
            rows["best"].append(m["best_error"])
            rows["random"].append(errors.gather(1, pick).squeeze(1))
            rows["avg_shape"].append(avg)
            rows["rho"].append(spearman(logits.float(), -errors).float())  # ties: average ranks
        return {f"{k}_error_mm" if k != "rho" else "spearman": torch.cat(v).nanmean().item() for k, v in rows.items()}
