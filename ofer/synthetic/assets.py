"""Generate-on-first-use of the synthetic assets under `data/synthetic/` (git-ignored)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ofer.synthetic.head import write_flame_files

log = logging.getLogger(__name__)

# Bump when the generator changes so that stale assets are regenerated, never silently reused.
GENERATOR_VERSION = 3


@dataclass(frozen=True)
class SyntheticPaths:
    root: Path
    flame_model: Path
    landmarks: Path
    static_landmarks: Path
    masks: Path


def _paths(root: Path) -> SyntheticPaths:
    flame = root / "FLAME"
    return SyntheticPaths(root=root, flame_model=flame / "generic_model.pkl",
                          landmarks=flame / "landmark_embedding.npy",
                          static_landmarks=flame / "flame_static_embedding.pkl", masks=flame / "FLAME_masks.pkl")


def ensure_synthetic_flame(root: str | Path, *, seed: int = 0, force: bool = False) -> SyntheticPaths:
    """Write the synthetic FLAME files under `<root>/FLAME/` unless a matching set is already there.

    Written into a temporary folder and renamed into place, so a crash never leaves a partial set.
    """
    root = Path(root)
    paths = _paths(root)
    stamp = root / "FLAME" / "generator.json"
    want = {"generator_version": GENERATOR_VERSION, "seed": seed}
    if not force and stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == want and paths.flame_model.is_file():
                return paths
        except (OSError, ValueError):
            pass
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".FLAME-", dir=root))
    try:
        write_flame_files(tmp, seed=seed, style="flame2020")
        (tmp / "generator.json").write_text(json.dumps(want))
        final = root / "FLAME"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote synthetic FLAME assets to %s", root / "FLAME")
    return paths
