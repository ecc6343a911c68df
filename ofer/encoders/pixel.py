"""A deterministic pixel encoder: the stand-in for ArcFace/FaRL on SYNTHETIC data only.

Our own design, for the synthetic demo and tests, where no pretrained face encoder is meaningful
or available. It is not a face encoder and must never be used on real photographs:

    image -> [0, 1] RGB -> grayscale (BT.601) -> area-resize to 16x16 -> flatten (256)
          -> standardise per image: minus its mean, divided by its standard deviation
          -> fixed seeded projection with orthonormal columns (256 -> 512)
          -> L2-normalise (ArcFace slot) / keep the scale, norm = grid (FaRL slot)

Because the projection has orthonormal columns it is an isometry: distances and angles between
features equal those between the standardised 16x16 thumbnails, so images that look alike get
nearby features.

Why standardise (ours): the synthetic photos of one identity differ in light direction, skin tone
and exposure, which scale and shift the whole thumbnail, while the identity's shape shows in the
pattern of shading and outline. Standardising makes the feature invariant to any brightness change
a * image + b (a > 0) and leaves that pattern. Measured on the synthetic sets (ridge regression
from the feature to the 300 shape coefficients, fit on SYNTH_TRAIN's 120 identities, face-region
vertex error on SYNTH_TEST, where the mean shape scores 3.96 mm): 3.70 mm with the former map
(thumbnail minus 0.5, ``contrast="none"``), 3.52 mm standardised. Larger grids, colour, gradient
or log-intensity maps did no better; what limits every variant is the per-photo expression, jaw and
head pose (with them removed from the renderer the same regression reaches 2.0 mm against 3.8).
A constant image (thumbnail std below 1e-4) has no pattern: its standardised thumbnail and its feature are zero.
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
# "standardize": per-image zero mean, unit variance thumbnail (default); "none": thumbnail - 0.5 (the
# map before standardisation, kept to compare against).
CONTRASTS = ("standardize", "none")


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
        contrast: ``"standardize"`` (per-image zero mean, unit variance thumbnail) or ``"none"``
            (thumbnail minus 0.5, the former map).

    ``forward``: images -> (B, dim).
    """

    synthetic_only = True
    is_random = False

    def __init__(self, *, slot: str, dim: int = 512, grid: int = 16, seed: int | None = None,
                 contrast: str = "standardize") -> None:
        super().__init__()
        if slot not in SLOTS:
            raise ValueError(f"PixelEncoder: unknown slot {slot!r}; allowed: {list(SLOTS)}")
        if contrast not in CONTRASTS:
            raise ValueError(f"PixelEncoder: unknown contrast {contrast!r}; allowed: {list(CONTRASTS)}")
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
        self.contrast = contrast
        self.name = f"pixel-{slot}"
        proj = orthonormal_projection(dim, grid * grid, self.seed).to(torch.float32)
        # Not persistent: rebuilt identically from the seed, so checkpoints need not carry it.
        self.register_buffer("projection", proj, persistent=False)  # (dim, grid*grid)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor(LUMA).view(1, 3, 1, 1), persistent=False)

    @cached_property
    def weights_id(self) -> str:
        """Identity for cache keys: the contrast mode, the seed and a digest of the projection."""
        probe = nn.Module()
        probe.register_buffer("projection", self.projection)
        return f"pixel:seed{self.seed}:{self.contrast}:" + state_digest(probe)[:16]

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

    def centred(self, images: torch.Tensor) -> torch.Tensor:
        """images -> (B, grid*grid): the thumbnail standardised per image (or minus 0.5 with contrast="none")."""
        thumb = self.thumbnails(images)
        if self.contrast == "none":
            return thumb - 0.5
        thumb = thumb - thumb.mean(dim=1, keepdim=True)
        std = thumb.pow(2).mean(dim=1, keepdim=True).sqrt()  # population std, (B, 1)
        # A (numerically) constant thumbnail maps to zero: dividing its float rounding residue by a tiny std
        # would blow noise up to a unit feature. 1e-4 is far below one 8-bit grey level (1/255).
        return torch.where(std > 1e-4, thumb / std.clamp_min(1e-4), torch.zeros_like(thumb))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) -> (B, dim); unit norm for the ArcFace slot."""
        feats = self.centred(images) @ self.projection.T  # (B, dim)
        return F.normalize(feats, dim=-1) if self.normalized else feats
