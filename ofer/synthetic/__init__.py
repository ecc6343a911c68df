"""Synthetic stand-ins written in the official file formats, so every code path runs without licensed data."""
from __future__ import annotations

from ofer.synthetic.assets import SyntheticPaths, ensure_synthetic_flame
from ofer.synthetic.head import make_head_model, write_flame_files

__all__ = ["SyntheticPaths", "ensure_synthetic_flame", "make_head_model", "write_flame_files"]
