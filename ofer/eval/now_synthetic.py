"""Write a dataset in the official NoW layout from synthetic scans, and turn clean meshes into scan-like ones.

Layout written by `write_now_benchmark(root, ...)` (that of the NoW release, read by `ofer.eval.now.score_now`
and by NoW image loaders):

    imagepaths<split>.txt                                   <subject>/<challenge>/<stem>.jpg per line
    scans/<subject>/<subject>.obj                           scan in mm
    scans_lmks_onlypp/<subject>/<subject>_picked_points.pp  7 landmarks, MeshLab PickedPoints, lines 8..14
    final_release_version/iphone_pictures/<subject>/<challenge>/<stem>.jpg
    final_release_version/detected_face/<subject>/<challenge>/<stem>.npy   {'left','top','right','bottom'}

The face boxes are pickled dicts saved with `np.save`, like the NoW release (loaders read them with
`np.load(..., allow_pickle=True).item()`).
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ofer.meshio import atomic_write, save_mesh, write_pp

__all__ = ["write_now_benchmark", "densify_scan", "subdivide_midpoint", "synthetic_head", "HEAD_LANDMARK_DIRECTIONS"]


def write_now_benchmark(
    root: str | os.PathLike,
    *,
    subjects: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    images: Sequence[tuple[str, str, str, np.ndarray | None, Sequence[float] | Mapping[str, float] | None]],
    split: str = "validation",
) -> Path:
    """Write a NoW-layout dataset.

    Args:
        root: dataset folder (created).
        subjects: subject name -> (scan vertices in mm (V, 3), scan faces (F, 3), scan landmarks (7, 3)).
        images: (subject, challenge, stem, image HxWx3 uint8 or None, face box or None) per image-list entry, in
            list order. The box is (left, top, right, bottom) in pixels or a dict with those keys. Without an
            image no picture is written (the scorer does not need it).
        split: 'validation' or 'test' (name of the image list).

    Returns:
        the image-list path.
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split={split!r}: expected 'validation' or 'test'")
    root = Path(root)
    for name, (v, f, lm) in subjects.items():
        save_mesh(root / "scans" / name / f"{name}.obj", v, f)
        write_pp(root / "scans_lmks_onlypp" / name / f"{name}_picked_points.pp", lm)
    lines = []
    for subject, challenge, stem, image, box in images:
        if subject not in subjects:
            raise ValueError(f"image {subject}/{challenge}/{stem}: unknown subject; known {sorted(subjects)}")
        lines.append(f"{subject}/{challenge}/{stem}.jpg")
        rel = Path(subject) / challenge
        if image is not None:
            _write_jpg(root / "final_release_version" / "iphone_pictures" / rel / f"{stem}.jpg", image)
        if box is not None:
            if isinstance(box, Mapping):
                d = {k: float(box[k]) for k in ("left", "top", "right", "bottom")}
            else:
                left, top, right, bottom = (float(x) for x in box)
                d = {"left": left, "top": top, "right": right, "bottom": bottom}
            buf = io.BytesIO()
            np.save(buf, np.array(d, dtype=object), allow_pickle=True)
            atomic_write(root / "final_release_version" / "detected_face" / rel / f"{stem}.npy", buf.getvalue())
    return atomic_write(root / f"imagepaths{split}.txt", ("\n".join(lines) + "\n").encode())


def _write_jpg(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    img = np.asarray(image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{path}: image must be HxWx3 uint8, got {img.dtype} {img.shape}")
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    atomic_write(path, buf.getvalue())


def subdivide_midpoint(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One 1-to-4 midpoint subdivision (original vertices first, then one new vertex per edge).

    Args:
        vertices: (V, 3); faces: (F, 3).

    Returns:
        vertices (V + E, 3) float64, faces (4F, 3) int64.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    edges = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])  # (3F, 2)
    key = np.sort(edges, axis=1)
    uniq, inv = np.unique(key, axis=0, return_inverse=True)
    mids = len(v) + inv.reshape(3, -1).T  # (F, 3): midpoint of edge (0,1), (1,2), (2,0)
    new_v = np.concatenate([v, 0.5 * (v[uniq[:, 0]] + v[uniq[:, 1]])])
    a, b, c = f[:, 0], f[:, 1], f[:, 2]
    ab, bc, ca = mids[:, 0], mids[:, 1], mids[:, 2]
    new_f = np.concatenate(
        [np.stack([a, ab, ca], 1), np.stack([ab, b, bc], 1), np.stack([ca, bc, c], 1), np.stack([ab, bc, ca], 1)]
    )
    return new_v, new_f


def densify_scan(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    target_vertices: int,
    noise_mm: float,
    hole_fraction: float,
    seed: int,
    num_holes: int = 6,
    protect_points: np.ndarray | None = None,
    protect_radius_mm: float = 8.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Turn a clean mesh (mm) into a scan-like one: denser, noisy, with holes.

    Midpoint subdivision until at least `target_vertices` vertices; isotropic Gaussian noise of std
    `noise_mm` on every coordinate; `num_holes` holes around random vertices, grown together until
    `hole_fraction` of the vertices is removed (faces touching removed vertices go too, the remaining
    vertices keep their order). Vertices within `protect_radius_mm` of `protect_points` (e.g. the 7 scan
    landmarks) are never removed.

    Returns:
        vertices (V', 3) float64, faces (F', 3) int64.
    """
    if not 0.0 <= hole_fraction < 1.0:
        raise ValueError(f"hole_fraction={hole_fraction}: expected in [0, 1)")
    if noise_mm < 0:
        raise ValueError(f"noise_mm={noise_mm}: expected >= 0")
    rng = np.random.default_rng(seed)
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    while len(v) < target_vertices:
        v, f = subdivide_midpoint(v, f)
    v = v + rng.normal(scale=noise_mm, size=v.shape) if noise_mm > 0 else v.copy()
    n_remove = int(round(hole_fraction * len(v)))
    if n_remove == 0:
        return v, f
    removable = np.ones(len(v), dtype=bool)
    if protect_points is not None:
        pp = np.asarray(protect_points, dtype=np.float64).reshape(-1, 3)
        dmin = np.min(np.linalg.norm(v[:, None, :] - pp[None], axis=-1), axis=1)
        removable &= dmin > protect_radius_mm
    cand = np.flatnonzero(removable)
    if len(cand) == 0:
        return v, f
    seeds = v[rng.choice(cand, size=min(num_holes, len(cand)), replace=False)]
    dist = np.full(len(v), np.inf)
    for s in seeds:
        dist = np.minimum(dist, np.linalg.norm(v - s, axis=1))
    dist[~removable] = np.inf
    order = np.argsort(dist, kind="stable")[: min(n_remove, len(cand))]
    keep = np.ones(len(v), dtype=bool)
    keep[order] = False
    new_index = np.cumsum(keep) - 1
    f = f[keep[f].all(axis=1)]
    return v[keep], new_index[f].astype(np.int64)


# Unit directions (x right of the image, y up, z towards the camera) of the 7 NoW landmarks on `synthetic_head`:
# right-eye outer/inner, left-eye inner/outer, nose bottom, right/left mouth corner (NoW order).
_LMK_XY = np.array(
    [[-0.42, 0.18], [-0.14, 0.18], [0.14, 0.18], [0.42, 0.18], [0.0, -0.15], [-0.22, -0.38], [0.22, -0.38]]
)
HEAD_LANDMARK_DIRECTIONS = np.concatenate([_LMK_XY, np.sqrt(1 - (_LMK_XY ** 2).sum(1, keepdims=True))], axis=1)


def _head_radius(d: np.ndarray, p: Mapping[str, float]) -> np.ndarray:
    """Radius (mm) of the synthetic head along unit directions d (N, 3): an ellipsoid with a nose, brows,
    eye sockets, cheeks and lips on the front (z > 0), all smooth."""
    x, y, z = d[:, 0], d[:, 1], d[:, 2]
    r = 1.0 / np.sqrt((x / p["a"]) ** 2 + (y / p["b"]) ** 2 + (z / p["c"]) ** 2)
    front = np.clip(z, 0.0, None)
    g = lambda cx, cy, sx, sy: np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))  # noqa: E731
    r = r + p["nose"] * g(0.0, 0.0, 0.07, 0.16) * front ** 2
    r = r + p["brow"] * g(0.0, 0.3, 0.35, 0.06) * front ** 2
    r = r - p["eyes"] * (g(-0.28, 0.18, 0.09, 0.06) + g(0.28, 0.18, 0.09, 0.06)) * front
    r = r + p["cheeks"] * (g(-0.35, -0.12, 0.12, 0.12) + g(0.35, -0.12, 0.12, 0.12)) * front
    r = r + p["lips"] * g(0.0, -0.36, 0.16, 0.05) * front ** 2
    return r


def synthetic_head(
    *,
    n_lat: int = 72,
    n_lon: int = 72,
    params: Mapping[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth, closed, head-like triangle mesh in mm with its 7 NoW landmarks on the analytic surface.

    A latitude-longitude grid (poles on the y axis, so the face at +z has no pole) pushed out to
    `_head_radius`. `n_lat=72, n_lon=72` gives 5042 vertices / 10080 faces, about FLAME's 5023 / 9976.

    Args:
        n_lat: latitude rings including the poles (>= 3); n_lon: longitude segments (>= 3).
        params: shape knobs (a, b, c half-axes; nose, brow, eyes, cheeks, lips heights in mm) overriding the
            defaults.

    Returns:
        vertices (V, 3) float64, faces (F, 3) int64 (outward, counter-clockwise), landmarks (7, 3) float64.
    """
    if n_lat < 3 or n_lon < 3:
        raise ValueError(f"n_lat={n_lat}, n_lon={n_lon}: expected >= 3 each")
    p = {"a": 75.0, "b": 95.0, "c": 88.0, "nose": 24.0, "brow": 6.0, "eyes": 7.0, "cheeks": 4.0, "lips": 5.0}
    if params:
        unknown = set(params) - set(p)
        if unknown:
            raise ValueError(f"unknown head parameters {sorted(unknown)}; known {sorted(p)}")
        p.update({k: float(v) for k, v in params.items()})
    lat = np.linspace(0.0, np.pi, n_lat)[1:-1]  # polar angle from +y, poles excluded
    lon = np.linspace(0.0, 2 * np.pi, n_lon, endpoint=False)
    sl, cl = np.sin(lat)[:, None], np.cos(lat)[:, None]
    ring = np.stack([sl * np.sin(lon)[None], np.broadcast_to(cl, (len(lat), n_lon)), sl * np.cos(lon)[None]], -1)
    dirs = np.concatenate([[[0.0, 1.0, 0.0]], ring.reshape(-1, 3), [[0.0, -1.0, 0.0]]])
    verts = dirs * _head_radius(dirs, p)[:, None]
    faces = []
    top, bottom = 0, len(dirs) - 1
    idx = lambda i, j: 1 + i * n_lon + (j % n_lon)  # noqa: E731
    for j in range(n_lon):
        faces.append([top, idx(0, j), idx(0, j + 1)])
        faces.append([bottom, idx(len(lat) - 1, j + 1), idx(len(lat) - 1, j)])
    for i in range(len(lat) - 1):
        for j in range(n_lon):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            faces.append([a, d, b])
            faces.append([a, c, d])
    lmk = HEAD_LANDMARK_DIRECTIONS * _head_radius(HEAD_LANDMARK_DIRECTIONS, p)[:, None]
    return verts, np.asarray(faces, dtype=np.int64), lmk
