"""Export example meshes of a FLAME model: the quickest way to look at what a model (synthetic or real) does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ofer.flame import FLAME, MM_PER_M
from ofer.meshio import save_mesh


def export_samples(flame: FLAME, out_dir: str | Path, *, n: int = 8, seed: int = 0) -> list[Path]:
    """Write `n` meshes in millimetres (.obj) with their 7 NoW landmarks (.npy, (7,3) mm) beside each:
    the template, random identities, random expressions on the first identity, and an open jaw."""
    out_dir = Path(out_dir)
    g = torch.Generator().manual_seed(seed)
    B = max(n, 1)
    shape = torch.randn(B, flame.n_shape, generator=g)
    shape[0] = 0
    exp = torch.zeros(B, flame.n_exp)
    pose = torch.zeros(B, 15)
    half = B // 2
    shape[half:] = shape[min(1, B - 1)]
    exp[half:] = torch.randn(B - half, flame.n_exp, generator=g)
    pose[-1, 6] = 0.25  # jaw open
    with torch.no_grad():
        out = flame(shape, exp, pose)
    faces = flame.faces.cpu().numpy()
    written = []
    for i in range(B):
        kind = "template" if i == 0 else ("identity" if i < half else "expression")
        if i == B - 1 and B > 1:
            kind = "jaw_open"
        path = out_dir / f"{i:02d}_{kind}.obj"
        save_mesh(path, out.vertices[i].double().numpy(), faces, scale=MM_PER_M)
        if out.landmarks is not None:
            np.save(path.with_suffix(".npy"), out.now_landmarks()[i].double().numpy() * MM_PER_M)
        written.append(path)
    return written
