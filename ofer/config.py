"""Helpers that turn the `paths` config group into objects, generating synthetic assets on first use."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ofer.flame import FLAME
from ofer.synthetic.assets import ensure_synthetic_flame


def _is_under(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def build_flame(paths: Any, *, n_shape: int = 300, n_exp: int = 100, landmarks: bool = True,
                masks: bool = True, **kwargs: Any) -> FLAME:
    """FLAME from `paths.flame_model/flame_landmarks/flame_masks`. Files that point into
    `paths.synthetic_dir` are generated there when absent; real files are only ever read."""
    model = Path(paths.flame_model)
    synthetic = Path(paths.synthetic_dir)
    if _is_under(model, synthetic) and not model.is_file():
        ensure_synthetic_flame(synthetic)
    return FLAME(model, n_shape=n_shape, n_exp=n_exp,
                 landmark_path=Path(paths.flame_landmarks) if landmarks else None,
                 masks_path=Path(paths.flame_masks) if masks else None, **kwargs)
