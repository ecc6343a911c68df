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
from insightface.utils import face_align

from ofer.flame import FLAME
from ofer.synthetic.render import OCCLUDERS, Camera, draw_occluder, project, render, skin_albedo

__all__ = ["write_mica_dataset", "arcface_kps_from_68", "face_box_from_68", "farl_crop", "arcface_blob",
           "CLIP_MEAN", "CLIP_STD"]

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
FARL_ENLARGE = 1.6  # OFER/FaRL: face box enlarged 1.6x


def arcface_kps_from_68(lmk2d: np.ndarray) -> np.ndarray:
    """The 5 ArcFace points (image-left eye, image-right eye, nose tip, image-left and image-right mouth
    corner) from 68 iBUG landmarks in pixels."""
    return np.stack([lmk2d[36:42].mean(0), lmk2d[42:48].mean(0), lmk2d[30], lmk2d[48], lmk2d[54]]).astype(np.float32)


def face_box_from_68(lmk2d: np.ndarray) -> np.ndarray:
    """A detector-like face box (x1, y1, x2, y2): the landmarks' box, raised to cover the forehead."""
    x1, y1 = lmk2d.min(0)
    x2, y2 = lmk2d.max(0)
    return np.array([x1, y1 - 0.25 * (y2 - y1), x2, y2], dtype=np.float32)


def arcface_blob(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """insightface 5-point alignment to 112x112, RGB, scaled to [-1, 1]: (3,112,112) float32."""
    crop = face_align.norm_crop(image_rgb, kps, 112)
    return ((crop.astype(np.float32) / 127.5) - 1.0).transpose(2, 0, 1).copy()


def farl_crop(image_rgb: np.ndarray, box: np.ndarray, size: int = 224) -> np.ndarray:
    """Square crop of side 1.6 x max(box side) around the box centre, warped to `size`, CLIP-normalised:
    (3,size,size) float32."""
    x1, y1, x2, y2 = [float(v) for v in box]
    side = FARL_ENLARGE * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    s = size / side
    M = np.array([[s, 0, size / 2 - s * cx], [0, s, size / 2 - s * cy]], dtype=np.float64)
    crop = cv2.warpAffine(image_rgb, M, (size, size), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    x = crop.astype(np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).astype(np.float32).transpose(2, 0, 1).copy()


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    cy, sy, cp, sp, cr, sr = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch), np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


def write_mica_dataset(
    root: str | Path, name: str, flame: FLAME, *, actors: int, images_per_actor: int, mode: str = "identity",
    seed: int = 0, occlusion_prob: float = 0.6, occluders: tuple[str, ...] = ("mask", "sunglasses", "hand", "bar"),
    expression_std: float = 0.6, jaw_max: float = 0.25, yaw_max: float = 0.5, image_size: int = 224,
) -> Path:
    """Render and write one synthetic dataset in the MICA layout. Written into a temporary folder and moved
    into place at the end, so an interrupted run leaves nothing half-written. Returns `<root>/<name>`."""
    modes = ("identity", "frame")
    if mode not in modes:
        raise ValueError(f"unknown mode {mode!r}; allowed: {modes}")
    bad = [o for o in occluders if o not in OCCLUDERS]
    if bad:
        raise ValueError(f"unknown occluders {bad}; allowed: {OCCLUDERS}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    rng = np.random.default_rng(seed)
    faces = flame.faces.cpu().numpy()
    index: dict[str, tuple[list[str], str]] = {}
    try:
        ds = tmp / name
        for a in range(actors):
            shape = rng.standard_normal(flame.n_shape)
            albedo_rng = np.random.default_rng(rng.integers(1 << 31))
            for k in range(images_per_actor):
                exp = rng.standard_normal(flame.n_exp) * expression_std
                pose = np.zeros(15)
                pose[6] = rng.uniform(0.0, jaw_max)  # jaw opening about x (positive opens)
                occ = "none"
                if occluders and rng.uniform() < occlusion_prob:
                    occ = str(rng.choice(occluders))
                yaw = rng.uniform(-yaw_max, yaw_max)
                pitch, roll = rng.uniform(-0.15, 0.15), rng.uniform(-0.1, 0.1)
                with torch.no_grad():
                    out = flame(torch.as_tensor(shape[None], dtype=torch.float32),
                                torch.as_tensor(exp[None], dtype=torch.float32),
                                torch.as_tensor(pose[None], dtype=torch.float32))
                verts = out.vertices[0].double().numpy()
                lmk3d = out.landmarks[0].double().numpy()
                cam = Camera(rotation=_rotation(yaw, pitch, roll),
                             scale=image_size * rng.uniform(0.68, 0.8) / 0.2,
                             centre=(image_size / 2 + rng.uniform(-6, 6), image_size / 2 + rng.uniform(-4, 8)),
                             size=image_size)
                bg = np.clip(rng.uniform(40, 200, 3)[None, None] + rng.normal(0, 8, (image_size, image_size, 1)),
                             0, 255).astype(np.uint8)
                light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(0.0, 0.6), 1.0])
                albedo = skin_albedo(verts, flame.masks, albedo_rng)
                r = render(verts, faces, cam, albedo=albedo, light=light, background=bg)
                lmk2d = project(lmk3d, cam)[:, :2]
                image, occ_px = draw_occluder(r.image, occ, lmk2d, rng)
                # A vertex counts as occluded when it projects into the occluder, seen or not.
                pv = np.clip(np.round(project(verts, cam)[:, :2] - 0.5).astype(int), 0, image_size - 1)
                occluded = occ_px[pv[:, 1], pv[:, 0]]

                actor = f"actor{a:05d}" if mode == "identity" else f"frame{a * images_per_actor + k:06d}"
                stem = f"img{k:02d}"
                img_dir = ds / "arcface_input" / actor
                img_dir.mkdir(parents=True, exist_ok=True)
                kps = arcface_kps_from_68(lmk2d)
                box = face_box_from_68(lmk2d)
                cv2.imwrite(str(img_dir / f"{stem}.jpg"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                np.save(img_dir / f"{stem}.npy", arcface_blob(image, kps))
                np.save(img_dir / f"{stem}_farl.npy", farl_crop(image, box).astype(np.float16))
                np.savez(img_dir / f"{stem}_gt.npz", shape=shape, expression=exp, pose=pose, occluder=occ,
                         occluded_vertices=occluded, kps=kps, box=box, landmarks2d=lmk2d, yaw=yaw)
                rel_img = f"{actor}/{stem}.jpg"
                npz_dir = ds / "FLAME_parameters" / actor
                npz_dir.mkdir(parents=True, exist_ok=True)
                if mode == "identity":
                    npz_rel = f"{actor}/identity.npz"
                    if k == 0:
                        np.savez(ds / "FLAME_parameters" / npz_rel,
                                 betas=np.concatenate([shape, np.zeros(100)]), pose=np.zeros(15))
                    index.setdefault(actor, ([], npz_rel))[0].append(rel_img)
                else:
                    npz_rel = f"{actor}/{stem}.npz"
                    betas = np.concatenate([shape, np.zeros(100)])
                    betas[300:300 + flame.n_exp] = exp
                    np.savez(ds / "FLAME_parameters" / npz_rel, betas=betas, pose=pose)
                    index[actor] = ([rel_img], npz_rel)
        (tmp / "image_paths").mkdir()
        np.save(tmp / "image_paths" / f"{name}.npy", index, allow_pickle=True)
        (ds / "generator.json").write_text(json.dumps({
            "mode": mode, "seed": seed, "actors": actors, "images_per_actor": images_per_actor,
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
