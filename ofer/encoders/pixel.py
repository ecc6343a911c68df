"""A deterministic pixel encoder: the stand-in for ArcFace/FaRL on SYNTHETIC data only.

Our own design, for the synthetic demo and tests, where no pretrained face encoder is meaningful
or available. It is not a face encoder and must never be used on real photographs:

    image -> [0, 1] RGB -> grayscale (BT.601) -> area-resize to 16x16 -> flatten (256)
          -> minus 0.5 -> fixed seeded projection with orthonormal columns (256 -> 512)
          -> L2-normalise (ArcFace slot) / keep the scale (FaRL slot)

Because the projection has orthonormal columns it is an isometry: distances and angles between
features equal those between the centred 16x16 thumbnails, so images that look alike get
nearby features and the map is injective on thumbnails.
"""

from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F
from torch import nn

from ofer.encoders.common import state_digest

SLOTS = ("arcface", "farl")
# CLIP normalisation (FaRL input); kept here so the encoders package does not import the data one.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# ITU-R BT.601 luma, the weights of cv2.cvtColor(RGB2GRAY).
LUMA = (0.299, 0.587, 0.114)
# Distinct fixed seeds so the two slots carry different (not identical) features.
DEFAULT_SEEDS = {"arcface": 20250001, "farl": 20250002}
_INPUT_SIZES = {"arcface": 112, "farl": 224}


def orthonormal_projection(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float64 matrix with orthonormal columns, a fixed function of ``seed``.

    QR of a seeded Gaussian matrix, with column signs fixed by sign(diag(R)) so the result does
    not depend on the LAPACK build.
    """
    if rows < cols:
        raise ValueError(f"need rows >= cols for orthonormal columns, got {rows} x {cols}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    gauss = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


class PixelEncoder(nn.Module):
    """SYNTHETIC-ONLY deterministic encoder filling the ArcFace or FaRL slot.

    Args:
        slot: ``"arcface"`` (input (B, 3, 112, 112) in [-1, 1], output L2-normalised) or
            ``"farl"`` (input (B, 3, 224, 224) CLIP-normalised, output not normalised).
        dim: output size (512, like the real encoders).
        grid: thumbnail side (16); the input size must be a multiple of it.
        seed: projection seed; defaults to a fixed per-slot value.

    ``forward``: images -> (B, dim).
    """

    synthetic_only = True
    is_random = False

    def __init__(self, *, slot: str, dim: int = 512, grid: int = 16, seed: int | None = None) -> None:
        super().__init__()
        if slot not in SLOTS:
            raise ValueError(f"PixelEncoder: unknown slot {slot!r}; allowed: {list(SLOTS)}")
        if _INPUT_SIZES[slot] % grid != 0:
            raise ValueError(f"PixelEncoder: grid {grid} must divide the {slot} input size {_INPUT_SIZES[slot]}")
        if dim < grid * grid:
            raise ValueError(f"PixelEncoder: dim {dim} must be >= grid*grid = {grid * grid}")
        self.slot = slot
        self.input_size = _INPUT_SIZES[slot]
        self.out_dim = dim
        self.grid = grid
        self.normalized = slot == "arcface"
        self.seed = DEFAULT_SEEDS[slot] if seed is None else int(seed)
        self.name = f"pixel-{slot}"
        proj = orthonormal_projection(dim, grid * grid, self.seed).to(torch.float32)
        # Not persistent: rebuilt identically from the seed, so checkpoints need not carry it.
        self.register_buffer("projection", proj, persistent=False)  # (dim, grid*grid)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @cached_property
    def weights_id(self) -> str:
        """Identity for cache keys: the seed and a digest of the projection."""
        probe = nn.Module()
        probe.register_buffer("projection", self.projection)
        return f"pixel:seed{self.seed}:" + state_digest(probe)[:16]

    def thumbnails(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in the slot's input convention -> (B, grid*grid) gray in [0, 1]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"PixelEncoder({self.slot}) expects (B, 3, {self.input_size}, {self.input_size}), "
                f"got {tuple(images.shape)}"
            )
        x = images.float()
        rgb01 = (x + 1.0) * 0.5 if self.slot == "arcface" else x * self.std + self.mean
        gray = (rgb01 * self.luma).sum(dim=1, keepdim=True)  # (B, 1, S, S)
        # Average pooling over exact S/grid blocks is area resizing (cv2.INTER_AREA).
        return F.adaptive_avg_pool2d(gray, self.grid).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> (B, dim); unit norm for the ArcFace slot."""
        feats = (self.thumbnails(images) - 0.5) @ self.projection.T  # (B, dim)
        return F.normalize(feats, dim=-1) if self.normalized else feats
