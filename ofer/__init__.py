"""ofer: open, fast, correct OFER (occluded face expression reconstruction)."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The repository root (where configs/ and data/ live): an env var wins, then the checkout this package is in.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _repo_root() -> str:
    import os

    return os.environ.get("OFER_ROOT", str(REPO_ROOT))


if not OmegaConf.has_resolver("ofer_root"):
    OmegaConf.register_new_resolver("ofer_root", _repo_root)
