"""A small exact z-buffer renderer (numpy, orthographic) and synthetic occluders.

Enough to turn FLAME-format heads into face images whose pixels depend on the 3D shape (shading from
interpolated normals), so that occluding part of the face really removes information about it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["vertex_normals", "Camera", "Rendering", "render", "project", "OCCLUDERS", "draw_occluder", "skin_albedo"]


@dataclass(frozen=True)
class Camera:
    """Orthographic camera: pixel = centre + scale * (R @ v)[:2] with the image y axis pointing down."""

    rotation: np.ndarray  # (3,3) world -> camera
    scale: float  # pixels per metre
    centre: tuple[float, float]  # pixel position of the world origin
    size: int  # square image side in pixels


@dataclass
class Rendering:
    image: np.ndarray  # (H,W,3) uint8 RGB
    face_id: np.ndarray  # (H,W) int64, -1 for background
    depth: np.ndarray  # (H,W) float64 camera z (larger = closer), -inf for background


def project(vertices: np.ndarray, cam: Camera) -> np.ndarray:
    """(V,3) metres -> (V,3): pixel x, pixel y, camera depth."""
    p = vertices @ cam.rotation.T
    return np.stack([cam.centre[0] + cam.scale * p[:, 0], cam.centre[1] - cam.scale * p[:, 1], p[:, 2]], -1)


def vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    return n / np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)


def render(vertices: np.ndarray, faces: np.ndarray, cam: Camera, *, albedo: np.ndarray,
           light: np.ndarray = np.array([0.3, 0.4, 1.0]), ambient: float = 0.35,
           background: np.ndarray | None = None) -> Rendering:
    """Render a triangle mesh (V,3) metres with per-vertex albedo (V,3) in [0,1]."""
    H = W = cam.size
    pv = project(vertices, cam)
    tri = pv[faces]  # (F,3,3)
    # Back-face culling (closed surfaces): keep triangles facing the camera (counter-clockwise on screen
    # after the y flip means clockwise area sign).
    e1 = tri[:, 1, :2] - tri[:, 0, :2]
    e2 = tri[:, 2, :2] - tri[:, 0, :2]
    area = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    keep = np.flatnonzero(area < -1e-9)
    tri, area = tri[keep], area[keep]
    lo = np.clip(np.floor(tri[:, :, :2].min(1)).astype(np.int64), 0, W - 1)
    hi = np.clip(np.ceil(tri[:, :, :2].max(1)).astype(np.int64), 0, W - 1)
    ext = (hi - lo).max(1) + 1
    # Candidate (triangle, pixel) pairs inside each triangle's bounding box, in groups of similar size
    # so that a few long silhouette slivers do not make every triangle test a large box.
    parts = []
    for lo_span, span in ((0, 4), (4, 8), (8, 16), (16, 32), (32, W)):
        sel = np.flatnonzero((ext > lo_span) & (ext <= span))
        if sel.size == 0:
            continue
        oy, ox = np.meshgrid(np.arange(span), np.arange(span), indexing="ij")
        px = lo[sel, None, 0] + ox.reshape(1, -1)
        py = lo[sel, None, 1] + oy.reshape(1, -1)
        valid = (px <= hi[sel, None, 0]) & (py <= hi[sel, None, 1])
        parts.append((np.broadcast_to(sel[:, None], px.shape)[valid], px[valid], py[valid]))
    t_idx = np.concatenate([p[0] for p in parts])
    px = np.concatenate([p[1] for p in parts])
    py = np.concatenate([p[2] for p in parts])
    cx, cy = px + 0.5, py + 0.5
    a, b, c = tri[t_idx, 0], tri[t_idx, 1], tri[t_idx, 2]
    w0 = ((b[:, 0] - cx) * (c[:, 1] - cy) - (b[:, 1] - cy) * (c[:, 0] - cx)) / area[t_idx]
    w1 = ((c[:, 0] - cx) * (a[:, 1] - cy) - (c[:, 1] - cy) * (a[:, 0] - cx)) / area[t_idx]
    w2 = 1.0 - w0 - w1
    inside = (w0 >= -1e-9) & (w1 >= -1e-9) & (w2 >= -1e-9)
    t_idx, px, py = t_idx[inside], px[inside], py[inside]
    w = np.stack([w0[inside], w1[inside], w2[inside]], -1)
    z = (w * tri[t_idx, :, 2]).sum(-1)
    pix = py * W + px
    order = np.lexsort((z, pix))  # by pixel, then depth: the last of each pixel is the closest
    pix_sorted = pix[order]
    last = np.flatnonzero(np.r_[pix_sorted[1:] != pix_sorted[:-1], True])
    win = order[last]

    face_id = np.full(H * W, -1, dtype=np.int64)
    depth = np.full(H * W, -np.inf)
    face_id[pix[win]] = keep[t_idx[win]]
    depth[pix[win]] = z[win]

    normals = vertex_normals(vertices, faces) @ cam.rotation.T
    fidx = faces[keep[t_idx[win]]]  # (P,3)
    n = (w[win, :, None] * normals[fidx]).sum(1)
    n /= np.linalg.norm(n, axis=1, keepdims=True).clip(1e-12)
    col = (w[win, :, None] * albedo[fidx]).sum(1)
    L = light / np.linalg.norm(light)
    shade = ambient + (1.0 - ambient) * np.clip(n @ L, 0.0, 1.0)
    img = np.zeros((H * W, 3)) if background is None else background.reshape(-1, 3).astype(np.float64) / 255
    img[pix[win]] = col * shade[:, None]
    image = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(H, W, 3)
    return Rendering(image=image, face_id=face_id.reshape(H, W), depth=depth.reshape(H, W))


def skin_albedo(vertices: np.ndarray, masks: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """Per-vertex colour: a random skin tone, darker brows and eyes, redder lips, slight mottling."""
    V = vertices.shape[0]
    tone = np.array([0.85, 0.66, 0.55]) * rng.uniform(0.55, 1.1) + rng.normal(0, 0.03, 3)
    alb = np.tile(tone, (V, 1)) * (1 + 0.04 * rng.normal(size=(V, 1)))
    if "lips" in masks:
        alb[masks["lips"]] = alb[masks["lips"]] * np.array([1.05, 0.6, 0.6])
    for k in ("left_eyeball", "right_eyeball"):
        if k in masks:
            alb[masks[k]] = np.array([0.15, 0.12, 0.1]) + rng.uniform(0, 0.2)
    hair = rng.uniform(0.05, 0.45, 3).mean() * np.array([1.0, 0.85, 0.7])
    if "scalp" in masks:
        alb[masks["scalp"]] = hair
    return np.clip(alb, 0, 1)


OCCLUDERS = ("none", "mask", "sunglasses", "hand", "bar")


def _poly_mask(size: int, poly: np.ndarray) -> np.ndarray:
    """Pixels (H,W) inside a convex or simple polygon (even-odd rule)."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    inside = np.zeros((size, size), dtype=bool)
    n = len(poly)
    for i in range(n):
        x0, y0 = poly[i]
        x1, y1 = poly[(i + 1) % n]
        cond = (y0 > yy) != (y1 > yy)
        xint = (x1 - x0) * (yy - y0) / (y1 - y0 + 1e-12) + x0
        inside ^= cond & (xx < xint)
    return inside


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def draw_occluder(image: np.ndarray, kind: str, lmk2d: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint an occluder over the face. lmk2d: the 68 landmarks in pixels (68,2).

    Returns (occluded image, occluder pixel mask (H,W) bool). "mask" hides everything below the nose
    bridge (the lower face, as a medical mask), "sunglasses" the eyes, "hand" a cheek and the mouth,
    "bar" a random horizontal band.
    """
    if kind not in OCCLUDERS:
        raise ValueError(f"unknown occluder {kind!r}; allowed: {OCCLUDERS}")
    size = image.shape[0]
    out = image.copy()
    if kind == "none":
        return out, np.zeros((size, size), dtype=bool)
    jaw = lmk2d[0:17]
    if kind == "mask":
        top = lmk2d[29, 1] + rng.uniform(-2, 4)
        left, right = jaw[1, 0] - 4, jaw[15, 0] + 4
        chin = jaw[8, 1] + 6
        poly = np.array([[left, top + 6], [lmk2d[27, 0], top], [right, top + 6], [right - 6, chin - 10],
                         [lmk2d[8, 0], chin], [left + 6, chin - 10]])
        m = _poly_mask(size, poly)
        colour = rng.choice([np.array([200, 220, 235]), np.array([90, 110, 160]), np.array([240, 240, 240])])
    elif kind == "sunglasses":
        le, re = lmk2d[36:42].mean(0), lmk2d[42:48].mean(0)
        r = 0.35 * np.linalg.norm(re - le) + rng.uniform(0, 3)
        m = _ellipse(size, *le, r * 1.2, r) | _ellipse(size, *re, r * 1.2, r)
        bridge = _poly_mask(size, np.array([[le[0], le[1] - 2], [re[0], re[1] - 2], [re[0], re[1] + 2], [le[0], le[1] + 2]]))
        m |= bridge
        colour = np.array([20, 20, 25])
    elif kind == "hand":
        side = rng.choice([-1, 1])
        anchor = lmk2d[48] if side < 0 else lmk2d[54]
        cx = anchor[0] + side * rng.uniform(5, 15)
        cy = anchor[1] + rng.uniform(-10, 5)
        m = _ellipse(size, cx, cy, rng.uniform(22, 32), rng.uniform(14, 20), rng.uniform(-0.6, 0.6))
        colour = np.array([215, 170, 140]) * rng.uniform(0.6, 1.05)
    else:  # bar
        y0 = rng.uniform(lmk2d[19, 1], lmk2d[8, 1])
        h = rng.uniform(12, 30)
        yy = np.arange(size)[:, None] + 0.5
        m = np.broadcast_to((yy >= y0) & (yy <= y0 + h), (size, size)).copy()
        colour = rng.uniform(0, 255, 3)
    texture = rng.normal(0, 6, (size, size, 1))
    out[m] = np.clip(colour[None] + texture[m], 0, 255).astype(np.uint8)
    return out, m
