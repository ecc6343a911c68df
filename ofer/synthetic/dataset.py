"""Synthetic 2D-3D training and test sets in the MICA layout, rendered from the synthetic FLAME head.

Layout written (the same one MICA's real datasets use, read by `ofer.data` through the same code path):

    <root>/<NAME>/FLAME_parameters/<actor>/<npz>.npz   betas (400: 300 shape + 100 expression), pose (15)
    <root>/<NAME>/arcface_input/<actor>/<stem>.jpg      the photo (224x224 RGB)
    <root>/<NAME>/arcface_input/<actor>/<stem>.npy      ArcFace blob (3,112,112) float32 RGB in [-1,1]
    <root>/<NAME>/arcface_input/<actor>/<stem>_farl.npy FaRL crop (3,224,224) float16, CLIP-normalised
    <root>/<NAME>/arcface_input/<actor>/<stem>_gt.npz   ground truth of this image (ours; readers ignore it)
    <root>/image_paths/<NAME>.npy                        {actor: ([image paths], npz path)} (pickled dict)

`mode="identity"` (IdGen / IdRank): one npz per actor with the identity (expression zero), K images of
that actor with random expressions, head poses, lighting and occluders. `mode="frame"` (ExpGen): every
image is its own entry with an npz holding that frame's shape, expression and jaw pose (FaMoS-style
per-frame fits expressed in the MICA container).

The ground truth distribution is known: shape ~ N(0, I_300), expression ~ N(0, sigma_e^2 I_100), jaw
opening ~ U(0, jaw_max) rad, so "random FLAME" baselines and ideal errors are well defined.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from ofer.data.preprocess import arcface_blob, farl_crop_image, farl_normalize
from ofer.flame import FLAME
from ofer.synthetic.assets import GENERATOR_VERSION
from ofer.synthetic.render import OCCLUDERS, Camera, draw_occluder, project, render, skin_albedo

__all__ = ["write_mica_dataset", "render_face", "arcface_kps_from_68", "face_box_from_68"]


def arcface_kps_from_68(lmk2d: np.ndarray) -> np.ndarray:
    """The 5 ArcFace points (image-left eye, image-right eye, nose tip, image-left and image-right mouth
    corner) from 68 iBUG landmarks in pixels."""
    return np.stack([lmk2d[36:42].mean(0), lmk2d[42:48].mean(0), lmk2d[30], lmk2d[48], lmk2d[54]]).astype(np.float32)


def face_box_from_68(lmk2d: np.ndarray) -> np.ndarray:
    """A detector-like face box (x1, y1, x2, y2): the landmarks' box, raised to cover the forehead."""
    x1, y1 = lmk2d.min(0)
    x2, y2 = lmk2d.max(0)
    return np.array([x1, y1 - 0.25 * (y2 - y1), x2, y2], dtype=np.float32)


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


def render_face(flame: FLAME, faces: np.ndarray, shape: np.ndarray, exp: np.ndarray, pose: np.ndarray,
                rng: np.random.Generator, *, occluder: str = "none", yaw_max: float = 0.5, image_size: int = 224,
                albedo_rng: np.random.Generator | None = None, scale_range: tuple[float, float] = (0.68, 0.8)) -> dict:
    """Render one photo of FLAME(shape, exp, pose) with a random view, light, background and `occluder`.

    Returns image (H,W,3) uint8 RGB, landmarks2d (68,2), kps (5,2), box (4,), occluded_vertices (V,) bool
    (vertices projecting into the occluder), yaw.
    """
    yaw = rng.uniform(-yaw_max, yaw_max)
    pitch, roll = rng.uniform(-0.15, 0.15), rng.uniform(-0.1, 0.1)
    with torch.no_grad():
        out = flame(torch.as_tensor(shape[None], dtype=torch.float32),
                    torch.as_tensor(exp[None], dtype=torch.float32),
                    torch.as_tensor(pose[None], dtype=torch.float32))
    verts = out.vertices[0].double().numpy()
    lmk3d = out.landmarks[0].double().numpy()
    cam = Camera(rotation=_rotation(yaw, pitch, roll), scale=image_size * rng.uniform(*scale_range) / 0.2,
                 centre=(image_size / 2 + rng.uniform(-6, 6), image_size / 2 + rng.uniform(-4, 8)), size=image_size)
    bg = np.clip(rng.uniform(40, 200, 3)[None, None] + rng.normal(0, 8, (image_size, image_size, 1)),
                 0, 255).astype(np.uint8)
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.6), 1.0])
    albedo = skin_albedo(verts, flame.masks, albedo_rng if albedo_rng is not None else rng)
    r = render(verts, faces, cam, albedo=albedo, light=light, background=bg)
    lmk2d = project(lmk3d, cam)[:, :2]
    image, occ_px = draw_occluder(r.image, occluder, lmk2d, rng)
    # A vertex counts as occluded when it projects into the occluder, seen or not.
    pv = np.clip(np.round(project(verts, cam)[:, :2] - 0.5).astype(int), 0, image_size - 1)
    return {"image": image, "landmarks2d": lmk2d, "kps": arcface_kps_from_68(lmk2d), "box": face_box_from_68(lmk2d),
            "occluded_vertices": occ_px[pv[:, 1], pv[:, 0]], "yaw": yaw}


# What forked render workers share (set by write_mica_dataset before the pool starts; not pickled per job).
_JOB: dict = {}


def _render_actor(a: int) -> list[tuple[str, list[str], str]]:
    """Render and write every image of actor `a` (its own RNG stream, so any worker count gives the same files)."""
    (ds, flame, mode, seed, images_per_actor, occlusion_prob, occluders, expression_std, jaw_max, yaw_max,
     image_size) = _JOB["args"]
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, a])
    faces = flame.faces.cpu().numpy()
    shape = rng.standard_normal(flame.n_shape)
    albedo_seed = int(rng.integers(1 << 31))
    entries = []
    for k in range(images_per_actor):
        exp = rng.standard_normal(flame.n_exp) * expression_std
        pose = np.zeros(15)
        pose[6] = rng.uniform(0.0, jaw_max)  # jaw opening about x (positive opens)
        occ = "none"
        if occluders and rng.uniform() < occlusion_prob:
            occ = str(rng.choice(occluders))
        r = render_face(flame, faces, shape, exp, pose, rng, occluder=occ, yaw_max=yaw_max, image_size=image_size,
                        albedo_rng=np.random.default_rng(albedo_seed))
        image, kps, box = r["image"], r["kps"], r["box"]
        actor = f"actor{a:05d}" if mode == "identity" else f"frame{a * images_per_actor + k:06d}"
        stem = f"img{k:02d}"
        img_dir = ds / "arcface_input" / actor
        img_dir.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(img_dir / f"{stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        # The same preprocessing functions as for real photos (ofer.data.preprocess).
        np.save(img_dir / f"{stem}.npy", arcface_blob(image, kps))
        np.save(img_dir / f"{stem}_farl.npy", farl_normalize(farl_crop_image(image, box)).astype(np.float16))
        np.savez(img_dir / f"{stem}_gt.npz", shape=shape, expression=exp, pose=pose, occluder=occ,
                 occluded_vertices=r["occluded_vertices"], kps=kps, box=box, landmarks2d=r["landmarks2d"],
                 yaw=r["yaw"])
        npz_dir = ds / "FLAME_parameters" / actor
        npz_dir.mkdir(parents=True, exist_ok=True)
        betas = np.concatenate([shape, np.zeros(100)])
        if mode == "identity":
            npz_rel = f"{actor}/identity.npz"
            if k == 0:
                np.savez(ds / "FLAME_parameters" / npz_rel, betas=betas, pose=np.zeros(15))
        else:
            npz_rel = f"{actor}/{stem}.npz"
            betas[300:300 + flame.n_exp] = exp
            np.savez(ds / "FLAME_parameters" / npz_rel, betas=betas, pose=pose)
        entries.append((actor, [f"{actor}/{stem}.jpg"], npz_rel))
    return entries


def write_mica_dataset(
    root: str | Path, name: str, flame: FLAME, *, actors: int, images_per_actor: int, mode: str = "identity",
    seed: int = 0, occlusion_prob: float = 0.6, occluders: tuple[str, ...] = ("mask", "sunglasses", "hand", "bar"),
    expression_std: float = 0.6, jaw_max: float = 0.25, yaw_max: float = 0.5, image_size: int = 224,
    workers: int | None = None,
) -> Path:
    """Render and write one synthetic dataset in the MICA layout. Written into a temporary folder and moved
    into place at the end, so an interrupted run leaves nothing half-written. Returns `<root>/<name>`.
    `workers` processes render actors in parallel (default: all cores); the files do not depend on it."""
    modes = ("identity", "frame")
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; allowed: {modes}")
    bad = [o for o in occluders if o not in OCCLUDERS]
    if bad:
        raise ValueError(f"unknown occluders {bad}; allowed: {OCCLUDERS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    index: dict[str, tuple[list[str], str]] = {}
    try:
        ds = tmp / name
        flame = flame.cpu()
        _JOB["args"] = (ds, flame, mode, seed, images_per_actor, occlusion_prob, tuple(occluders), expression_std,
                        jaw_max, yaw_max, image_size)
        workers = min(workers or os.cpu_count() or 1, max(actors, 1))
        try:
            if workers > 1:
                import multiprocessing as mp

                with mp.get_context("fork").Pool(workers) as pool:
                    results = pool.map(_render_actor, range(actors), chunksize=max(1, actors // (4 * workers)))
            else:
                results = [_render_actor(a) for a in range(actors)]
        finally:
            _JOB.clear()
        for entries in results:
            for actor, imgs, npz_rel in entries:
                index.setdefault(actor, ([], npz_rel))[0].extend(imgs)
        (tmp / "image_paths").mkdir()
        np.save(tmp / "image_paths" / f"{name}.npy", index, allow_pickle=True)
        (ds / "generator.json").write_text(json.dumps({
            "generator_version": GENERATOR_VERSION, "mode": mode, "seed": seed, "actors": actors, "images_per_actor": images_per_actor,
            "occlusion_prob": occlusion_prob, "occluders": list(occluders), "expression_std": expression_std,
            "jaw_max": jaw_max, "yaw_max": yaw_max, "flame_model": flame.model_path,
        }, indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(ds, final)
        (root / "image_paths").mkdir(exist_ok=True)
        os.replace(tmp / "image_paths" / f"{name}.npy", root / "image_paths" / f"{name}.npy")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / name
