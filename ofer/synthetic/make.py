"""`scripts/make_synthetic.py`: every synthetic asset in the official formats, generated deterministically."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from ofer.config import build_flame
from ofer.synthetic.assets import ensure_synthetic_flame
from ofer.synthetic.export import export_samples

log = logging.getLogger(__name__)


def make_synthetic(cfg: DictConfig) -> dict[str, Path]:
    root = Path(cfg.paths.synthetic_dir)
    flame_paths = ensure_synthetic_flame(root, seed=int(cfg.seed), force=bool(cfg.force))
    flame = build_flame(cfg.paths)
    meshes = export_samples(flame, Path(cfg.paths.output_dir) / "meshes", n=int(cfg.samples), seed=int(cfg.seed))
    log.info("synthetic FLAME: %s", flame_paths.flame_model.parent)
    log.info("sample meshes (mm): %s", meshes[0].parent)
    print(f"synthetic FLAME model: {flame_paths.flame_model}")
    print(f"sample meshes: {meshes[0].parent} ({len(meshes)} files)")
    return {"flame": flame_paths.flame_model, "meshes": meshes[0].parent}
