"""Networks of OFER: the diffusion denoiser (IdGen / ExpGen share one class, two configs)."""

from __future__ import annotations

from ofer.models.unet1d import Denoiser

__all__ = ["Denoiser"]
