"""Writing reconstructions: meshes (mm), NoW layout, coefficient archives and the contact sheet."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from ofer.flame import MM_PER_M
from ofer.meshio import atomic_write, save_mesh
from ofer.pipeline import Hypotheses, OferPipeline, spread_mm
from ofer.synthetic.render import Camera, render

__all__ = ["write_reconstruction", "contact_sheet", "now_relative_path", "is_complete", "HYPOTHESES_FILE"]

# Written last and atomically by `write_reconstruction`: its presence marks an image whose outputs are all on disk.
HYPOTHESES_FILE = "hypotheses.npz"


def now_relative_path(image_path: str) -> Path:
    """NoW's `<subject>/<challenge>/<stem>` from an image path (its last three components)."""
    parts = Path(image_path).parts
    if len(parts) < 3:
        raise ValueError(f"NoW image path needs <subject>/<challenge>/<file>, got {image_path!r}")
    subject, challenge, name = parts[-3:]
    return Path(subject) / challenge / Path(name).stem


def _colormap(values: np.ndarray, vmax: float) -> np.ndarray:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return cmap(np.clip(values / max(vmax, 1e-9), 0, 1))[:, :3]


def _view(vertices_m: np.ndarray, faces: np.ndarray, albedo: np.ndarray, yaw: float, size: int) -> np.ndarray:
    c, s = np.cos(yaw), np.sin(yaw)
    R = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    centre = vertices_m.mean(0)
    v = vertices_m - centre
    extent = np.abs(v @ R.T)[:, :2].max()
    cam = Camera(rotation=R, scale=0.46 * size / max(extent, 1e-6), centre=(size / 2, size / 2), size=size)
    bg = np.full((size, size, 3), 255, np.uint8)
    return render(v, faces, cam, albedo=albedo, background=bg).image


def contact_sheet(path: str | Path, out: dict[str, torch.Tensor], faces: np.ndarray, *, best: int,
                  scores: np.ndarray, image: np.ndarray | None = None, max_samples: int = 6, size: int = 160,
                  title: str = "") -> Path:
    """A PNG: the input (if given), the ranked neutral shape coloured by per-vertex spread across the N
    identity samples (front and side), a few identity samples and a few expressions (front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = out["samples"]
    spread = spread_mm(samples)
    vmax = float(np.percentile(spread, 99))
    neutral = out["neutral"].double().cpu().numpy()
    gray = np.full((neutral.shape[0], 3), 0.75)
    heat = _colormap(spread, vmax)
    order = np.argsort(-scores)[:max_samples]
    cols = 2 + max_samples
    fig, axes = plt.subplots(2, cols, figsize=(cols * 1.9, 4.3))
    for ax in axes.ravel():
        ax.axis("off")
    if image is not None:
        axes[0, 0].imshow(image)
        axes[0, 0].set_title("input", fontsize=8)
    axes[1, 0].imshow(_view(neutral, faces, heat, 0.0, size))
    axes[1, 0].set_title(f"spread 0-{vmax:.1f} mm", fontsize=8)
    axes[0, 1].imshow(_view(neutral, faces, heat, 0.0, size))
    axes[0, 1].set_title(f"ranked #{best}", fontsize=8)
    axes[1, 1].imshow(_view(neutral, faces, heat, np.pi / 2, size))
    axes[1, 1].set_title("ranked, side", fontsize=8)
    for j, k in enumerate(order):
        axes[0, 2 + j].imshow(_view(samples[k].double().cpu().numpy(), faces, gray, 0.0, size))
        axes[0, 2 + j].set_title(f"id {k} s={scores[k]:.2f}", fontsize=7)
    expr = out["expressions"]
    for j in range(min(max_samples, expr.shape[0])):
        axes[1, 2 + j].imshow(_view(expr[j].double().cpu().numpy(), faces, gray, 0.0, size))
        axes[1, 2 + j].set_title(f"expression {j}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_reconstruction(pipeline: OferPipeline, h: Hypotheses, i: int, out_dir: str | Path, *,
                         mesh_format: str = "obj", max_expression_meshes: int | None = None,
                         now_dir: str | Path | None = None, now_name: str | None = None,
                         sheet: bool = True, image: np.ndarray | None = None, extra: dict | None = None) -> dict:
    """Write image i of `h` into `out_dir`: `neutral.<fmt>` (ranked shape, mm) + `neutral.npy` (7 NoW
    landmarks, mm), `expression_XXX.<fmt>` (+ .npy), `contact_sheet.png` and, last, `hypotheses.npz`
    (coefficients, scores, best); with `now_dir`, the neutral mesh and landmarks also at
    `<now_dir>/<subject>/<challenge>/<stem>.<fmt|npy>` (NoW's submission layout). `is_complete(out_dir)` is
    True only once everything is written."""
    if mesh_format not in ("obj", "ply"):
        raise ValueError(f"mesh_format must be 'obj' or 'ply', got {mesh_format!r}")
    out_dir = Path(out_dir)
    for stale in out_dir.glob(".*.tmp*"):  # temp files of a writer killed mid-write (one writer per folder)
        stale.unlink(missing_ok=True)
    faces = pipeline.flame.faces.cpu().numpy()
    meshes = pipeline.decode(h, i, max_expressions=max_expression_meshes)
    written = {}
    neutral = meshes["neutral"].double().cpu().numpy()
    written["neutral"] = save_mesh(out_dir / f"neutral.{mesh_format}", neutral, faces, scale=MM_PER_M)
    if "neutral_landmarks" in meshes:
        np.save(out_dir / "neutral.npy", meshes["neutral_landmarks"].double().cpu().numpy() * MM_PER_M)
    for j, v in enumerate(meshes["expressions"]):
        p = save_mesh(out_dir / f"expression_{j:03d}.{mesh_format}", v.double().cpu().numpy(), faces, scale=MM_PER_M)
        if "expression_landmarks" in meshes:
            np.save(p.with_suffix(".npy"), meshes["expression_landmarks"][j].double().cpu().numpy() * MM_PER_M)
    if now_dir is not None and now_name is not None:
        rel = now_relative_path(now_name)
        dest = Path(now_dir) / rel
        written["now_mesh"] = save_mesh(dest.with_suffix(f".{mesh_format}"), neutral, faces, scale=MM_PER_M)
        if "neutral_landmarks" in meshes:
            np.save(dest.with_suffix(".npy"), meshes["neutral_landmarks"].double().cpu().numpy() * MM_PER_M)
    if sheet:
        written["contact_sheet"] = contact_sheet(
            out_dir / "contact_sheet.png", meshes, faces, best=int(h.best[i]), scores=h.scores[i].cpu().numpy(),
            image=image, title=str(out_dir.name))
    meta = {k: (v if isinstance(v, (bool, int, float, str)) else str(v)) for k, v in h.meta.items()}
    # extra: per-image values saved as `meta_<key>` (flags, the source path, the encoder features).
    buf = io.BytesIO()
    np.savez(buf, shapes=h.shapes[i].cpu().numpy(), scores=h.scores[i].cpu().numpy(),
             best=int(h.best[i]), expressions=h.expressions[i].cpu().numpy(), jaw=h.jaw[i].cpu().numpy(),
             **{f"meta_{k}": np.asarray(v) for k, v in {**meta, **(extra or {})}.items()})
    # Last and atomic: a kill at any point leaves either no archive (the image is redone) or a complete one.
    written["hypotheses"] = atomic_write(out_dir / HYPOTHESES_FILE, buf.getvalue())
    return written


def is_complete(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds a finished reconstruction: a readable `hypotheses.npz` with its coefficients.

    The archive is written last and atomically, so it is absent after a crash mid-image; reading it also
    rejects a damaged one (a full disk, a copy cut short, an older version that wrote it in place)."""
    path = Path(out_dir) / HYPOTHESES_FILE
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return {"shapes", "scores", "best"} <= set(z.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # what np.load raises on a cut or garbled file
        return False
