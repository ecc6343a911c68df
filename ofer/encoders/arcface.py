"""ArcFace identity encoder: arcface_torch IResNet + L2 normalisation, with MICA/OFER freezing."""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ofer.encoders.common import (
    load_state_strict,
    resolve_weights,
    torch_load_state,
    warn_random,
    weights_identity,
)
from ofer.encoders.iresnet import ARCHS, IResNet, iresnet

log = logging.getLogger(__name__)

FREEZE_MODES = ("all", "layer4", "none")
ARCFACE_HOW_TO_GET = (
    "Download the Glint360K iresnet100 `backbone.pth` from the insightface arcface_torch model zoo "
    "(https://github.com/deepinsight/insightface/tree/master/recognition/arcface_torch#model-zoo; "
    "the same file MICA and OFER use)."
)
# Modules frozen by freeze="layer4": the stem and stages 1-3 (MICA's Arcface.freezer list).
_STEM_AND_EARLY = ("conv1", "bn1", "prelu", "layer1", "layer2", "layer3")


class ArcFaceEncoder(nn.Module):
    """ArcFace embedding of a 5-point-aligned face.

    Args:
        weights: path to an arcface_torch ``backbone.pth`` (strict key-for-key load), or
            ``"random"`` for a deliberately random network (logged; ``is_random`` is True).
        arch: ``"r100"`` (OFER/MICA), ``"r50"``, ``"r34"`` or ``"r18"``.
        freeze: ``"all"`` (frozen, for cached features), ``"layer4"`` (stem and layers 1-3
            frozen, layer4/bn2/fc/features trainable, as MICA/OFER fine-tune), or ``"none"``.
        seed: seed of the random initialisation when ``weights="random"``.

    Frozen BatchNorms stay in eval mode when the encoder is put in train mode. The final
    BatchNorm1d ``features`` always runs in eval mode (its running statistics from Glint360K
    training): in train mode it would normalise each embedding by the statistics of the current
    batch (a batch of one raises in torch, and small identity-grouped batches would make the
    embedding depend on its batch-mates). Its bias stays trainable unless frozen; its scale is
    fixed at 1 as in arcface_torch.

    ``forward``: images (B, 3, 112, 112) in [-1, 1] RGB -> (B, 512) L2-normalised.
    """

    input_size = 112
    out_dim = 512
    slot = "arcface"
    normalized = True
    synthetic_only = False

    def __init__(
        self, *, weights: str | Path | None, arch: str = "r100", freeze: str = "all", seed: int = 0
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"ArcFaceEncoder: unknown arch {arch!r}; allowed: {sorted(ARCHS)}")
        if freeze not in FREEZE_MODES:
            raise ValueError(f"ArcFaceEncoder: unknown freeze {freeze!r}; allowed: {list(FREEZE_MODES)}")
        path = resolve_weights(
            weights,
            what=f"ArcFace {arch} weights (arcface_torch backbone.pth)",
            config_key="paths.arcface_weights",
            how_to_get=ARCFACE_HOW_TO_GET,
        )
        self.arch = arch
        self.freeze = freeze
        self.weights_path = path
        self.is_random = path is None
        self.name = f"arcface-{arch}"
        if path is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.backbone: IResNet = iresnet(arch)
            warn_random(f"ArcFaceEncoder({arch})")
        else:
            self.backbone = iresnet(arch)
            load_state_strict(self.backbone, torch_load_state(path), source=path)
            log.info("ArcFaceEncoder(%s): loaded %s", arch, path)
        self._frozen_modules = self._apply_freeze()
        self.train(self.training)

    def _apply_freeze(self) -> list[nn.Module]:
        """Set requires_grad by ``self.freeze``; return the modules whose BatchNorms stay in eval."""
        bb = self.backbone
        if self.freeze == "all":
            frozen: list[nn.Module] = [bb]
        elif self.freeze == "layer4":
            frozen = [getattr(bb, name) for name in _STEM_AND_EARLY]
        else:
            frozen = []
        for module in frozen:
            module.requires_grad_(False)
        # arcface_torch keeps the scale of `features` fixed at 1 during training.
        bb.features.weight.requires_grad_(False)
        return frozen

    def train(self, mode: bool = True) -> ArcFaceEncoder:
        """Train mode for the trainable part only; frozen BatchNorms and ``features`` stay in eval."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules:
                module.eval()
            self.backbone.features.eval()
        return self

    @cached_property
    def weights_id(self) -> str:
        """Identity of the weights for cache keys: sha256 of the file, or of the random state."""
        return weights_identity(self.weights_path, self.backbone)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 112, 112) in [-1, 1] RGB -> (B, 512), unit L2 norm."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"ArcFaceEncoder expects (B, 3, 112, 112) aligned crops in [-1, 1], got {tuple(images.shape)}"
            )
        return F.normalize(self.backbone(images), dim=-1)
