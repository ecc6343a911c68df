"""A synthetic NoW benchmark in the official layout, from the synthetic FLAME head.

Each subject: a random identity (shape ~ N(0, I)); its ground-truth scan is the neutral FLAME mesh in mm,
subdivided to ~4x the vertices, with 0.2 mm noise and holes (as real scans have); its 7 landmarks are the
FLAME NoW landmarks. Photos of the subject in NoW's four challenges: `multiview_neutral` (no expression, no
occluder), `multiview_expressions` (strong expression and jaw), `multiview_occlusions` (occluders), `selfie`
(close, larger head turns). Besides the official files we write `ofer_annotations.json` (5 landmarks and a
box per image) because the synthetic photos have no detector pack to run on.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ofer.eval.now_synthetic import densify_scan, write_now_benchmark
from ofer.flame import FLAME, MM_PER_M
from ofer.synthetic.assets import GENERATOR_VERSION
from ofer.synthetic.dataset import render_face

__all__ = ["write_synthetic_now", "CHALLENGES"]

CHALLENGES = ("multiview_neutral", "multiview_expressions", "multiview_occlusions", "selfie")


def write_synthetic_now(root: str | Path, flame: FLAME, *, subjects: int = 4, images_per_challenge: int = 2,
                        seed: int = 5, split: str = "validation") -> Path:
    """Write the benchmark into `root` (replaced atomically). Returns `root`."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    rng = np.random.default_rng(seed)
    faces = flame.faces.cpu().numpy()
    subj: dict = {}
    images = []
    annotations = {}
    truth = {}
    try:
        for s in range(subjects):
            name = f"SYNTH_{s:05d}_NOW"
            shape = rng.standard_normal(flame.n_shape)
            with torch.no_grad():
                out = flame(torch.as_tensor(shape[None], dtype=torch.float32))
            v = out.vertices[0].double().numpy() * MM_PER_M
            lm7 = out.now_landmarks()[0].double().numpy() * MM_PER_M
            sv, sf = densify_scan(v, faces, target_vertices=4 * v.shape[0], noise_mm=0.2, hole_fraction=0.05,
                                  seed=int(rng.integers(1 << 31)), protect_points=lm7)
            subj[name] = (sv, sf, lm7.astype(np.float32))
            truth[name] = shape.tolist()
            albedo_rng_seed = int(rng.integers(1 << 31))
            for challenge in CHALLENGES:
                for k in range(images_per_challenge):
                    exp = np.zeros(flame.n_exp)
                    pose = np.zeros(15)
                    occ, yaw_max, scale = "none", 0.4, (0.68, 0.8)
                    if challenge == "multiview_expressions":
                        exp = rng.standard_normal(flame.n_exp) * 1.0
                        pose[6] = rng.uniform(0.1, 0.3)
                    elif challenge == "multiview_occlusions":
                        exp = rng.standard_normal(flame.n_exp) * 0.3
                        occ = str(rng.choice(["mask", "sunglasses", "hand", "bar"]))
                    elif challenge == "selfie":
                        exp = rng.standard_normal(flame.n_exp) * 0.5
                        yaw_max, scale = 0.6, (0.8, 0.9)
                    r = render_face(flame, faces, shape, exp, pose, rng, occluder=occ, yaw_max=yaw_max,
                                    scale_range=scale, albedo_rng=np.random.default_rng(albedo_rng_seed))
                    stem = f"IMG_{k:04d}"
                    images.append((name, challenge, stem, r["image"], r["box"].tolist()))
                    annotations[f"{name}/{challenge}/{stem}"] = {"kps": r["kps"].tolist(), "box": r["box"].tolist()}
        write_now_benchmark(tmp, subjects=subj, images=images, split=split)
        (tmp / "ofer_annotations.json").write_text(json.dumps(annotations))
        (tmp / "ofer_ground_truth.json").write_text(json.dumps({"shapes": truth}))
        (tmp / "generator.json").write_text(json.dumps({
            "generator_version": GENERATOR_VERSION, "subjects": subjects,
            "images_per_challenge": images_per_challenge, "seed": seed, "split": split}))
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_synthetic_now(root: str | Path, flame: FLAME, **opts: object) -> Path:
    root = Path(root)
    stamp = root / "generator.json"
    if stamp.is_file():
        try:
            old = json.loads(stamp.read_text())
            if old.get("generator_version") == GENERATOR_VERSION and all(old.get(k) == v for k, v in opts.items()):
                return root
        except (OSError, ValueError):
            pass
    return write_synthetic_now(root, flame, **opts)  # type: ignore[arg-type]
