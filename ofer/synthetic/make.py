"""`scripts/make_synthetic.py`: every synthetic asset in the official formats, generated deterministically."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from ofer.config import build_flame
from ofer.flame import FLAME
from ofer.synthetic.assets import GENERATOR_VERSION, ensure_synthetic_flame
from ofer.synthetic.dataset import write_mica_dataset
from ofer.synthetic.export import export_samples

log = logging.getLogger(__name__)

# The synthetic sets, name -> options of write_mica_dataset (seeds differ so the sets are disjoint).
# scripts/make_synthetic.py may override any of them (datasets.<NAME>.<key>=...).
_ID_VARIATION = {"expression_std": 0.1, "jaw_max": 0.05, "yaw_max": 0.15, "occlusion_prob": 0.2}
DEFAULT_DATASETS: dict[str, dict[str, Any]] = {
    "SYNTH_TRAIN": {"mode": "identity", "actors": 120, "images_per_actor": 4, "seed": 1},
    "SYNTH_TEST": {"mode": "identity", "actors": 24, "images_per_actor": 2, "seed": 2},
    "SYNTHEXP_TRAIN": {"mode": "frame", "actors": 240, "images_per_actor": 1, "seed": 3},
    "SYNTHEXP_TEST": {"mode": "frame", "actors": 48, "images_per_actor": 1, "seed": 4},
    # IdGen's default sets (configs/data/synthetic_id.yaml): little expression, jaw, head turn and occlusion per
    # photo. ArcFace is trained to ignore those; our pixel stand-in encoder is not, and with the full per-photo
    # variation of SYNTH_TRAIN a 3-minute CPU run cannot learn the identity signal (README "Results").
    "SYNTH_ID_TRAIN": {"mode": "identity", "actors": 120, "images_per_actor": 4, "seed": 5, **_ID_VARIATION},
    "SYNTH_ID_TEST": {"mode": "identity", "actors": 48, "images_per_actor": 2, "seed": 6, **_ID_VARIATION},
}


def ensure_datasets(root: str | Path, flame: FLAME, datasets: Mapping[str, Mapping[str, Any]], *,
                    force: bool = False) -> dict[str, Path]:
    """Write each named dataset unless one generated with the same options is already there."""
    root = Path(root)
    out = {}
    for name, opts in datasets.items():
        opts = dict(opts)
        stamp = root / name / "generator.json"
        if not force and stamp.is_file() and (root / "image_paths" / f"{name}.npy").is_file():
            try:
                old = json.loads(stamp.read_text())
                if old.get("generator_version") == GENERATOR_VERSION and all(old.get(k) == v for k, v in opts.items()):
                    out[name] = root / name
                    continue
            except (OSError, ValueError):
                pass
        log.info("rendering synthetic dataset %s (%s)", name, opts)
        out[name] = write_mica_dataset(root, name, flame, **opts)
    return out


def dataset_sizes(changes: Any, *, allow_new: bool) -> dict[str, dict[str, Any]]:
    """`DEFAULT_DATASETS` with per-dataset option changes (a mapping or DictConfig; None/empty: none). Names
    outside the defaults are added when `allow_new`, otherwise an error naming them."""
    if isinstance(changes, DictConfig):
        changes = OmegaConf.to_container(changes, resolve=True)
    extra = dict(changes or {})
    unknown = sorted(set(extra) - set(DEFAULT_DATASETS))
    if unknown and not allow_new:
        raise ValueError(f"datasets: unknown dataset(s) {unknown}; known: {sorted(DEFAULT_DATASETS)}")
    datasets = {k: {**v, **(extra.get(k) or {})} for k, v in DEFAULT_DATASETS.items()}
    datasets.update({k: extra[k] for k in unknown})
    return datasets


def make_synthetic(cfg: DictConfig) -> dict[str, Path]:
    root = Path(cfg.paths.synthetic_dir)
    flame_paths = ensure_synthetic_flame(root, seed=int(cfg.seed), force=bool(cfg.force))
    flame = build_flame(cfg.paths)
    written = ensure_datasets(root, flame, dataset_sizes(cfg.get("datasets"), allow_new=True), force=bool(cfg.force))
    meshes = export_samples(flame, Path(cfg.paths.output_dir) / "meshes", n=int(cfg.samples), seed=int(cfg.seed))
    print(f"synthetic FLAME model: {flame_paths.flame_model}")
    for name, path in written.items():
        print(f"dataset {name}: {path}")
    print(f"sample meshes: {meshes[0].parent} ({len(meshes)} files)")
    return {"flame": flame_paths.flame_model, "meshes": meshes[0].parent, **written}
