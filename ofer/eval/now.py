"""NoW benchmark scorer: a faithful, batched re-implementation of the official `compute_error.py`.

The algorithm is `/work/shared/specs/now_protocol.md` (written down from the official
`now_evaluation/compute_error.py` + `scan2mesh_computations.py`, psbody-mesh and chumpy):

1. crop the scan around the face (`crop_scan`, float32 landmark arithmetic as the official);
2. similarity from the 7 landmarks, MATLAB-style Procrustes without reflection fix (`landmark_similarity`);
3. rigid + scale refinement of the scan-to-mesh distance with chumpy's dogleg, replicated step by step
   (`refine_alignment`, batched over images: every image keeps its own trust-region state);
4. unsigned scan-vertex-to-surface distances at the final parameters;
5. the official outputs (`score_now`).

Closest points are exact (face, edge or vertex) over all triangles: `ofer.eval.pointmesh`, through libigl's
AABB tree on CPU (about 50x faster there than our torch kernel) and the batched torch kernel on CUDA.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from glob import glob
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ofer.eval import pointmesh_kernel
from ofer.eval.pointmesh import closest_points_igl, closest_points_torch
from ofer.meshio import MESH_SUFFIXES, MeshIOError, atomic_write, load_mesh, read_landmarks, read_pp

__all__ = [
    "UNIT_FACTORS",
    "DoglegOptions",
    "Similarity",
    "RefineResult",
    "ImageFailure",
    "NowReport",
    "crop_sphere",
    "crop_scan",
    "landmark_similarity",
    "rodrigues",
    "rodrigues_jacobian",
    "residuals_and_jacobian",
    "refine_alignment",
    "now_distances",
    "align_prediction",
    "read_image_list",
    "load_scan",
    "scan_folders",
    "pooled_stats",
    "score_now",
    "score_now_from_config",
    "write_outputs",
    "resolve_device",
]

log = logging.getLogger(__name__)

# OFER: `scan2mesh_computations_metrical.get_unit_factor`: scans are in mm.
UNIT_FACTORS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}


# ----------------------------------------------------------------------------------------------------
# step 1: crop
# ----------------------------------------------------------------------------------------------------


def crop_sphere(scan_lmks7: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre (float32, (3,)) and radius of the NoW face crop, computed like the official `compute_mask`.

    OFER: `bridge = (L1+L2)/2`, `centre = L4 + 0.3 (bridge - L4)`, `radius = 1.4 (|L0-L3| + |bridge-L4|) / 2`.
    The landmark arithmetic is float32 (the `.pp` landmarks are float32). The radius follows NumPy 1.x,
    which the official scorer needs (chumpy does not import under NumPy >= 1.24): there `1.4 * np.float32`
    is a float64, so only the sum of the two norms is rounded to float32.
    """
    L = np.asarray(scan_lmks7)
    if L.shape != (7, 3):
        raise ValueError(f"scan landmarks must have shape (7, 3), got {L.shape}")
    L = L.astype(np.float32, copy=False)
    nose_bottom = L[4]
    bridge = (L[1] + L[2]) / np.float32(2)
    centre = nose_bottom + np.float32(0.3) * (bridge - nose_bottom)
    outer_eye = np.linalg.norm(L[0] - L[3])
    nose = np.linalg.norm(bridge - nose_bottom)
    radius = 1.4 * float(outer_eye + nose) / 2
    return centre, radius


def crop_scan(scan_vertices: np.ndarray, scan_lmks7: np.ndarray) -> np.ndarray:
    """Indices of the scan vertices inside the NoW face crop, in their original order.

    Args:
        scan_vertices: (V, 3) float64 scan vertices (mm).
        scan_lmks7: (7, 3) scan landmarks (float32 as read from the `.pp`).

    Returns:
        int64 indices, shape (N,), of vertices with `|v - centre| <= radius` (official `crop_face_scan`).
    """
    centre, radius = crop_sphere(scan_lmks7)
    dist = np.linalg.norm(np.asarray(scan_vertices, dtype=np.float64) - centre, axis=1)
    return np.flatnonzero(dist <= radius).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# step 2: landmark similarity
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Similarity:
    """Row-vector similarity `v' = scale * (v @ rotation) + translation` (official `tform`).

    rotation: (3, 3) in the Procrustes dtype; may be a reflection (det < 0): no fix is applied.
    """

    scale: float
    rotation: np.ndarray
    translation: np.ndarray

    def apply(self, vertices: np.ndarray, *, scale: float | None = None) -> np.ndarray:
        """Transform (V, 3) vertices to float64; `scale` overrides the fitted scale (metrical mode)."""
        b = self.scale if scale is None else scale
        v = np.asarray(vertices, dtype=np.float64)
        # OFER: `tform['scale'] * (tform['rotation'].T.dot(v.T).T) + tform['translation']`, float64 result.
        return np.float64(b) * (self.rotation.T.astype(np.float64).dot(v.T).T) + self.translation.astype(np.float64)


def landmark_similarity(scan_lmk: np.ndarray, pred_lmk: np.ndarray) -> Similarity:
    """MATLAB-style Procrustes (scaling on, `reflection='best'` i.e. no reflection fix) of pred onto scan.

    OFER: `scan2mesh_computations.procrustes(X, Y, scaling=True, reflection='best')`: the arithmetic runs in
    the landmarks' dtypes (float32 for `.pp` scan landmarks and float32 predictions), as NumPy does there.

    Args:
        scan_lmk: X, (7, 3) scan landmarks.
        pred_lmk: Y, (7, 3) predicted landmarks.

    Returns:
        Similarity mapping predicted coordinates into the scan frame.

    Raises:
        ValueError: wrong shapes, non-finite values, or all landmarks of one set coincide (zero spread).
    """
    X = np.asarray(scan_lmk)
    Y = np.asarray(pred_lmk)
    if X.shape != (7, 3) or Y.shape != (7, 3):
        raise ValueError(f"landmarks must have shape (7, 3), got scan {X.shape} and prediction {Y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(Y))):
        raise ValueError("landmarks contain NaN or infinite values")
    muX, muY = X.mean(0), Y.mean(0)
    X0, Y0 = X - muX, Y - muY
    normX = np.sqrt((X0 ** 2.0).sum())
    normY = np.sqrt((Y0 ** 2.0).sum())
    if not (normX > 0 and normY > 0):
        raise ValueError("degenerate landmarks: all 7 points coincide, the similarity is undefined")
    X0 = X0 / normX
    Y0 = Y0 / normY
    U, s, Vt = np.linalg.svd(np.dot(X0.T, Y0), full_matrices=False)
    T = np.dot(Vt.T, U.T)  # no reflection fix: det(T) < 0 is kept (official reflection='best')
    b = s.sum() * normX / normY
    c = muX - b * np.dot(muY, T)
    return Similarity(scale=b, rotation=T, translation=c)


# ----------------------------------------------------------------------------------------------------
# rotations
# ----------------------------------------------------------------------------------------------------


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices."""
    z = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([z, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], z, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], z], -1),
        ],
        -2,
    )


def _rodrigues_coeffs(theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A = sin t / t, B = (1 - cos t)/t^2, A'/t, B'/t with Taylor series near 0 (no cancellation)."""
    small = theta < 1e-2
    t = torch.where(small, torch.ones_like(theta), theta)
    t2 = theta * theta
    A = torch.where(small, 1 - t2 / 6 + t2 * t2 / 120, torch.sin(t) / t)
    B = torch.where(small, 0.5 - t2 / 24 + t2 * t2 / 720, (1 - torch.cos(t)) / (t * t))
    dA = torch.where(small, -1.0 / 3 + t2 / 30 - t2 * t2 / 840, (t * torch.cos(t) - torch.sin(t)) / t ** 3)
    dB = torch.where(small, -1.0 / 12 + t2 / 180 - t2 * t2 / 6720, (t * torch.sin(t) - 2 * (1 - torch.cos(t))) / t ** 4)
    return A, B, dA, dB


def rodrigues(r: torch.Tensor) -> torch.Tensor:
    """Rotation matrices of axis-angle vectors (cv2.Rodrigues convention): (..., 3) -> (..., 3, 3)."""
    theta = torch.linalg.vector_norm(r, dim=-1)
    A, B, _, _ = _rodrigues_coeffs(theta)
    K = _skew(r)
    eye = torch.eye(3, dtype=r.dtype, device=r.device).expand(K.shape)
    return eye + A[..., None, None] * K + B[..., None, None] * (K @ K)


def rodrigues_jacobian(r: torch.Tensor) -> torch.Tensor:
    """Derivatives dR/dr_k of `rodrigues`: (..., 3) -> (..., 3 [k], 3, 3).

    With R = I + A(t) K + B(t) K^2, t = |r|, K = [r]x:
    dR/dr_k = (A'/t) r_k K + A E_k + (B'/t) r_k K^2 + B (E_k K + K E_k), E_k = [e_k]x.
    """
    theta = torch.linalg.vector_norm(r, dim=-1)
    A, B, dA, dB = _rodrigues_coeffs(theta)
    K = _skew(r)[..., None, :, :]  # (..., 1, 3, 3)
    E = _skew(torch.eye(3, dtype=r.dtype, device=r.device))  # (3 [k], 3, 3)
    rk = r[..., :, None, None]  # (..., 3, 1, 1)
    ex = lambda x: x[..., None, None, None]  # noqa: E731 - broadcast a (...) coefficient over (3, 3, 3)
    return ex(dA) * rk * K + ex(A) * E + ex(dB) * rk * (K @ K) + ex(B) * (E @ K + K @ E)


# ----------------------------------------------------------------------------------------------------
# step 3: residuals, Jacobian and the batched dogleg
# ----------------------------------------------------------------------------------------------------

# (points (m, P, 3), point_mask (m, P), vertices (m, V, 3), faces (m, F, 3), face_mask (m, F)) -> closest points
ClosestFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _closest_torch(points, point_mask, verts, faces, face_mask) -> torch.Tensor:  # noqa: ANN001
    return closest_points_torch(points, verts, faces, point_mask=point_mask, face_mask=face_mask).points


def _closest_igl(points, point_mask, verts, faces, face_mask) -> torch.Tensor:  # noqa: ANN001
    out = torch.zeros_like(points)
    for b in range(points.shape[0]):
        pm = point_mask[b].cpu().numpy()
        fm = face_mask[b].cpu().numpy()
        _, cp, _ = closest_points_igl(points[b].cpu().numpy()[pm], verts[b].cpu().numpy(), faces[b].cpu().numpy()[fm])
        out[b, torch.from_numpy(pm).to(out.device)] = torch.from_numpy(cp).to(out)
    return out


@dataclass
class _Eval:
    rr: torch.Tensor  # (m,) sum of squared residuals
    A: torch.Tensor  # (m, n, n) J^T J
    g: torch.Tensor  # (m, n) -J^T r
    jg2: torch.Tensor  # (m,) |J g|^2
    e: torch.Tensor  # (m, P) distances (0 on padding)
    finite: torch.Tensor  # (m,) bool


def residuals_and_jacobian(
    theta: torch.Tensor,
    scan_points: torch.Tensor,
    point_mask: torch.Tensor,
    pred_vertices: torch.Tensor,
    pred_faces: torch.Tensor,
    face_mask: torch.Tensor,
    *,
    metrical: bool = False,
    closest: ClosestFn = _closest_torch,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residuals and Jacobian of the NoW refinement at theta = (s, r0, r1, r2, t0, t1, t2).

    The mesh moves as `w = s R(r) v' + t`. Residuals: `e_i = |x_i - c_i|` with c_i the exact closest point of
    the moved surface, then (non-metrical only) `100 (|s| - s)`. Jacobian rows (spec, equal to chumpy's
    autodiff of the official code): with `u = (x - c)/e` and `c~ = R^T (c - t)/s`,
    `de/ds = -u.(R c~)`, `de/dr_k = -u.(s dR/dr_k c~)`, `de/dt = -u`; extra row `100 (sign(s) - 1)` on s.
    Where e_i == 0 the row is 0 (ours: the norm has no derivative there).

    Args:
        theta: (m, 7) float64.
        scan_points: (m, P, 3) cropped scan vertices (padded); point_mask (m, P) bool.
        pred_vertices: (m, V, 3) Procrustes-aligned predicted vertices v'; pred_faces (m, F, 3); face_mask (m, F).
        metrical: only (r, t) are free and there is no scale residual.

    Returns:
        residuals (m, P [+1]) and Jacobian (m, P [+1], 7 or 6); padded rows are 0.
    """
    s = theta[:, 0]
    r = theta[:, 1:4]
    t = theta[:, 4:7]
    R = rodrigues(r)  # (m, 3, 3)
    dR = rodrigues_jacobian(r)  # (m, 3, 3, 3)
    moved = s[:, None, None] * torch.einsum("mij,mvj->mvi", R, pred_vertices) + t[:, None, :]
    c = closest(scan_points, point_mask, moved, pred_faces, face_mask)
    diff = scan_points - c
    e = torch.linalg.vector_norm(diff, dim=-1) * point_mask
    nz = e > 0
    u = diff / torch.where(nz, e, torch.ones_like(e))[..., None] * nz[..., None]
    # Foot point back in the un-moved frame: c~ = R^T (c - t) / s  (rows: (c - t) @ R / s).
    c_un = torch.einsum("mij,mpi->mpj", R, c - t[:, None, :]) / s[:, None, None]
    J_s = -(u * torch.einsum("mij,mpj->mpi", R, c_un)).sum(-1)  # (m, P)
    J_r = -(u[:, None] * s[:, None, None, None] * torch.einsum("mkij,mpj->mkpi", dR, c_un)).sum(-1)  # (m, 3, P)
    J = torch.cat([J_s[..., None], J_r.transpose(1, 2), -u], dim=-1) * point_mask[..., None]  # (m, P, 7)
    if metrical:
        return e, J[..., 1:]
    extra = 100.0 * (s.abs() - s)
    extra_row = torch.zeros_like(theta)
    extra_row[:, 0] = 100.0 * (torch.sign(s) - 1.0)
    return torch.cat([e, extra[:, None]], 1), torch.cat([J, extra_row[:, None, :]], 1)


@dataclass(frozen=True)
class DoglegOptions:
    """chumpy `minimize_dogleg` settings used by the official scorer.

    OFER: `options = {'delta_0': 0.1, 'e_3': 1e-4, 'sparse_solver': cg(A, x, maxiter=2000)}`; chumpy defaults
    `e_1 = e_2 = 1e-15`, `maxiter = 200`; scipy's cg default tolerance `rtol = 1e-5, atol = 0`.
    """

    delta_0: float = 0.1
    e_1: float = 1e-15
    e_2: float = 1e-15
    e_3: float = 1e-4
    maxiter: int = 200
    cg_rtol: float = 1e-5
    cg_maxiter: int = 2000


def _cg_batched(A: torch.Tensor, b: torch.Tensor, *, rtol: float, maxiter: int) -> torch.Tensor:
    """`scipy.sparse.linalg.cg(A, b, maxiter=maxiter)` (x0 = 0, rtol, atol = 0) for a batch of small SPD systems.

    Step for step scipy 1.17's loop: stop before an iteration when |r| < rtol |b|; b = 0 returns b.
    A: (m, n, n); b: (m, n). Returns x (m, n).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    atol = rtol * torch.linalg.vector_norm(b, dim=-1)
    active = torch.linalg.vector_norm(b, dim=-1) != 0
    p = torch.zeros_like(b)
    rho_prev = torch.ones_like(atol)
    for it in range(maxiter):
        active = active & ~(torch.linalg.vector_norm(r, dim=-1) < atol)
        if not bool(active.any()):
            break
        rho = (r * r).sum(-1)
        if it > 0:
            p_new = p * (rho / rho_prev)[:, None] + r
        else:
            p_new = r.clone()
        p = torch.where(active[:, None], p_new, p)
        q = (A @ p[..., None])[..., 0]
        alpha = rho / (p * q).sum(-1)
        am = active[:, None]
        x = torch.where(am, x + alpha[:, None] * p, x)
        r = torch.where(am, r - alpha[:, None] * q, r)
        rho_prev = torch.where(active, rho, rho_prev)
    return x


@dataclass
class RefineResult:
    """Output of `refine_alignment` for B images.

    theta: (B, 7) final (s, r0, r1, r2, t0, t1, t2) (s = 1 in metrical mode).
    distances: per image (N_b,) float64 distances at the final theta, in cropped-scan order.
    iterations: (B,) outer dogleg iterations; evaluations: (B,) residual evaluations.
    failure: per image None or the reason the refinement failed (non-finite values).
    """

    theta: np.ndarray
    distances: list[np.ndarray]
    iterations: np.ndarray
    evaluations: np.ndarray
    failure: list[str | None]


def _pad(arrays: Sequence[np.ndarray], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(a) for a in arrays)
    out = torch.zeros(len(arrays), n, arrays[0].shape[1], dtype=dtype, device=device)
    mask = torch.zeros(len(arrays), n, dtype=torch.bool, device=device)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = torch.as_tensor(np.asarray(a), dtype=dtype, device=device)
        mask[i, : len(a)] = True
    return out, mask


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is checked ('cpu', 'cuda', 'cuda:1', ...)."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected 'auto', 'cpu' or 'cuda[:N]'")
    return dev


def refine_alignment(
    scan_points: Sequence[np.ndarray],
    pred_vertices: Sequence[np.ndarray],
    pred_faces: Sequence[np.ndarray],
    *,
    metrical: bool = False,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    options: DoglegOptions = DoglegOptions(),
    max_pairs: int | None = None,
    compile: bool = False,
    triton: bool = False,
    _trace: list | None = None,
) -> RefineResult:
    """Chumpy's dogleg on the NoW scan-to-mesh residuals, batched: each image has its own trust region.

    The loop follows chumpy `minimize_dogleg` exactly (spec step 3); stopped images are masked out and only
    the images still running are evaluated.

    Args:
        scan_points: B arrays (N_b, 3) of cropped scan vertices (mm).
        pred_vertices: B arrays (V_b, 3) of Procrustes-aligned predicted vertices.
        pred_faces: B arrays (F_b, 3) int.
        metrical: optimise (r, t) only, no scale residual (official metrical mode).
        device: where to compute.
        backend: closest points by 'torch' (any device), 'igl' (CPU only) or 'auto' (igl on CPU, torch on CUDA).
        options: optimiser settings (official ones by default).
        max_pairs: torch backend: point-triangle pairs tested at once (memory, ~500 bytes each); default
            2**24 on CUDA, 2**20 on CPU.
        compile: torch backend: compile the closest-point group search (`closest_points_torch(compile=True)`).
        triton: torch backend: the exact closest-point search as one Triton kernel
            (`closest_points_torch(triton=True)`); needs CUDA (or TRITON_INTERPRET=1).

    Raises:
        RuntimeError: `triton=True` where the kernel cannot run: the 'igl' backend (which 'auto' picks on the
            CPU), a CPU device without TRITON_INTERPRET=1, or no Triton.
    """
    dev = resolve_device(device)
    if backend == "auto":
        backend = "igl" if dev.type == "cpu" else "torch"
    if backend not in ("igl", "torch"):
        raise ValueError(f"backend={backend!r}: expected 'auto', 'igl' or 'torch'")
    if backend == "igl" and dev.type != "cpu":
        raise ValueError("backend='igl' runs on the CPU only; use device='cpu' or backend='torch'")
    if triton and (backend == "igl" or not pointmesh_kernel.available(torch.empty(0, device=dev))):
        raise RuntimeError("triton=True (now.triton) runs the torch backend's closest-point search as a Triton "
                           "kernel, which needs Triton and CUDA (or TRITON_INTERPRET=1); got backend "
                           f"{backend!r} on {dev.type}: use device='cuda' or triton=False")
    if backend == "igl":
        closest: ClosestFn = _closest_igl
    else:
        pairs = max_pairs if max_pairs is not None else (1 << 24 if dev.type == "cuda" else 1 << 20)

        def closest(points, point_mask, verts, faces, face_mask):  # noqa: ANN001, ANN202
            return closest_points_torch(
                points, verts, faces, point_mask=point_mask, face_mask=face_mask, max_pairs=pairs, compile=compile,
                triton=triton,
            ).points
    B = len(scan_points)
    if not (B == len(pred_vertices) == len(pred_faces)) or B == 0:
        raise ValueError("scan_points, pred_vertices and pred_faces must be non-empty sequences of equal length")
    dt = torch.float64
    X, pmask = _pad(scan_points, dt, dev)
    V, _ = _pad(pred_vertices, dt, dev)
    Fc, fmask = _pad([np.asarray(f, dtype=np.int64) for f in pred_faces], torch.int64, dev)
    n = 6 if metrical else 7
    free = slice(1, 7) if metrical else slice(0, 7)

    def evaluate(theta_full: torch.Tensor, sel: torch.Tensor) -> _Eval:
        res, J = residuals_and_jacobian(
            theta_full, X[sel], pmask[sel], V[sel], Fc[sel], fmask[sel], metrical=metrical, closest=closest
        )
        A = J.transpose(1, 2) @ J
        g = -(J.transpose(1, 2) @ res[..., None])[..., 0]
        jg = (J @ g[..., None])[..., 0]
        rr = (res * res).sum(-1)
        finite = torch.isfinite(rr) & torch.isfinite(A).flatten(1).all(1) & torch.isfinite(g).all(1)
        return _Eval(rr=rr, A=A, g=g, jg2=(jg * jg).sum(-1), e=res[:, : X.shape[1]], finite=finite)

    o = options
    theta0 = torch.zeros(B, 7, dtype=dt, device=dev)
    theta0[:, 0] = 1.0
    p = theta0[:, free].clone()

    def full(pp: torch.Tensor) -> torch.Tensor:
        th = theta0[: len(pp)].clone()
        th[:, free] = pp
        return th

    all_idx = torch.arange(B, device=dev)
    ev = evaluate(full(p), all_idx)
    A, g, rr, jg2, e_cur = ev.A, ev.g, ev.rr, ev.jg2, ev.e
    failed = ~ev.finite
    done = failed | (g.abs().amax(-1) < o.e_1)
    delta = torch.full((B,), o.delta_0, dtype=dt, device=dev)
    iteration = torch.zeros(B, dtype=torch.int64, device=dev)
    evaluations = torch.ones(B, dtype=torch.int64, device=dev)
    new_outer = torch.ones(B, dtype=torch.bool, device=dev)
    d_sd = torch.zeros(B, n, dtype=dt, device=dev)
    d_gn = torch.zeros(B, n, dtype=dt, device=dev)
    has_gn = torch.zeros(B, dtype=torch.bool, device=dev)
    norm = lambda x: torch.linalg.vector_norm(x, dim=-1)  # noqa: E731

    while not bool(done.all()):
        act = ~done
        start = act & new_outer
        iteration = iteration + start.long()
        gn2 = (g * g).sum(-1)
        d_sd = torch.where(start[:, None], (gn2 / jg2)[:, None] * g, d_sd)
        has_gn = has_gn & ~start
        new_outer = new_outer & ~start

        # The dogleg step inside the trust region.
        nsd = norm(d_sd)
        use_sd = nsd >= delta
        need_gn = act & ~use_sd & ~has_gn
        if bool(need_gn.any()):
            idx = need_gn.nonzero(as_tuple=True)[0]
            sol = _cg_batched(A[idx], g[idx], rtol=o.cg_rtol, maxiter=o.cg_maxiter)
            bad = ~torch.isfinite(sol).all(-1)
            if bool(bad.any()):  # chumpy falls back to lsqr when the sparse solve returns NaN/inf
                sol[bad] = torch.linalg.lstsq(A[idx][bad], g[idx][bad][..., None]).solution[..., 0]
            d_gn[idx] = sol
            has_gn = has_gn | need_gn
        ngn = norm(d_gn)
        diff = d_gn - d_sd
        delta2 = delta * delta
        pnow = (diff * diff).sum(-1) * delta2 + (d_gn * d_sd).sum(-1) ** 2 - ngn ** 2 * nsd ** 2
        beta = (delta2 - nsd ** 2) / ((diff * d_sd).sum(-1) + torch.sqrt(pnow))
        d_blend = d_sd + beta[:, None] * diff
        d = torch.where(
            use_sd[:, None],
            (delta / nsd)[:, None] * d_sd,
            torch.where((ngn <= delta)[:, None], d_gn, d_blend),
        )
        nd = norm(d)
        small = act & (nd <= o.e_2 * norm(p))
        done = done | small
        trial = act & ~small
        if not bool(trial.any()):
            continue
        sel = trial.nonzero(as_tuple=True)[0]
        ds = d[sel]
        ev = evaluate(full(p[sel] + ds), sel)
        evaluations[sel] += 1
        if _trace is not None:
            _trace.append({"sel": sel.tolist(), "p": p[sel].tolist(), "d": ds.tolist(), "delta": delta[sel].tolist(),
                           "rr": rr[sel].tolist(), "rr_new": ev.rr.tolist()})
        bad = ~ev.finite
        gain = rr[sel] - ev.rr
        accepted = (gain > 0) & ~bad
        predicted = 2.0 * (g[sel] * ds).sum(-1) - (ds[:, None, :] @ A[sel] @ ds[:, :, None])[:, 0, 0]
        rho = torch.where(accepted, gain / predicted, gain)
        improvement = gain / rr[sel]
        p[sel] = torch.where(accepted[:, None], p[sel] + ds, p[sel])
        e_cur[sel] = torch.where(accepted[:, None], ev.e, e_cur[sel])
        stop_e3 = accepted & (o.e_3 > 0) & (improvement < o.e_3)
        upd = accepted & ~stop_e3
        A[sel] = torch.where(upd[:, None, None], ev.A, A[sel])
        g[sel] = torch.where(upd[:, None], ev.g, g[sel])
        rr[sel] = torch.where(upd, ev.rr, rr[sel])
        jg2[sel] = torch.where(upd, ev.jg2, jg2[sel])
        stop = stop_e3 | (upd & (ev.g.abs().amax(-1) < o.e_1))
        # Trust-region update (chumpy `updateRadius`, lb 0.05, ub 0.9).
        dl = delta[sel]
        dl = torch.where(rho > 0.9, torch.maximum(dl, 2.5 * nd[sel]), torch.where(rho < 0.05, dl * 0.25, dl))
        delta[sel] = dl
        stop = stop | (dl <= o.e_2 * norm(p[sel]))
        # A non-finite trial (e.g. NaN from a degenerate configuration) fails the image instead of looping.
        failed[sel] = failed[sel] | bad
        stop = stop | bad
        done[sel] = done[sel] | stop
        leave = done[sel] | accepted
        new_outer[sel] = new_outer[sel] | leave
        done[sel] = done[sel] | (leave & (iteration[sel] >= o.maxiter))

    theta = full(p).cpu().numpy()
    e_np = e_cur.cpu().numpy()
    counts = pmask.sum(1).cpu().numpy()
    failed_np = failed.cpu().numpy()
    return RefineResult(
        theta=theta,
        distances=[e_np[i, : counts[i]].copy() for i in range(B)],
        iterations=iteration.cpu().numpy(),
        evaluations=evaluations.cpu().numpy(),
        failure=[
            "refinement produced non-finite residuals or Jacobian (degenerate mesh or alignment?)" if failed_np[i] else None
            for i in range(B)
        ],
    )


# ----------------------------------------------------------------------------------------------------
# one image
# ----------------------------------------------------------------------------------------------------


def _degenerate_faces(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Boolean (F,) mask of zero-area triangles (official `clean_degenerated_faces` criterion, normalised edges)."""
    e1 = vertices[faces[:, 1]] - vertices[faces[:, 0]]
    e2 = vertices[faces[:, 2]] - vertices[faces[:, 0]]
    l1 = np.linalg.norm(e1, axis=1, keepdims=True)
    l2 = np.linalg.norm(e2, axis=1, keepdims=True)
    n = np.cross(e1 / np.where(l1 == 0, 1, l1), e2 / np.where(l2 == 0, 1, l2))
    return np.linalg.norm(n, axis=1) == 0


def _check_prediction(vertices: np.ndarray, faces: np.ndarray) -> str | None:
    deg = _degenerate_faces(vertices, faces)
    if deg.all():
        return f"all {len(faces)} predicted triangles are degenerate (zero area): no surface to measure against"
    return None


def now_distances(
    scan_vertices: np.ndarray,
    scan_lmks7: np.ndarray,
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    pred_lmks7: np.ndarray,
    *,
    metrical: bool = False,
    unit: str = "mm",
    device: str | torch.device = "cpu",
    backend: str = "auto",
) -> np.ndarray:
    """NoW distances of one image (official `compute_errors`): crop, Procrustes, refinement, distances.

    Returns:
        float64 (N,) distances in mm for the cropped scan vertices, in scan order.
    """
    idx = crop_scan(scan_vertices, scan_lmks7)
    if len(idx) == 0:
        raise ValueError("no scan vertex lies inside the NoW crop sphere; check the scan landmarks")
    aligned = align_prediction(scan_lmks7, pred_vertices, pred_lmks7, metrical=metrical, unit=unit)
    res = refine_alignment(
        [np.asarray(scan_vertices, dtype=np.float64)[idx]], [aligned], [pred_faces],
        metrical=metrical, device=device, backend=backend,
    )
    if res.failure[0]:
        raise ValueError(res.failure[0])
    return res.distances[0]


def align_prediction(
    scan_lmks7: np.ndarray, pred_vertices: np.ndarray, pred_lmks7: np.ndarray, *, metrical: bool, unit: str
) -> np.ndarray:
    """Predicted vertices (V, 3) moved into the scan frame by the landmark similarity (step 2), float64.

    Raises:
        ValueError: degenerate or non-finite landmarks, or an unknown unit (metrical mode).
    """
    sim = landmark_similarity(scan_lmks7, pred_lmks7)
    if metrical:
        if unit not in UNIT_FACTORS:
            raise ValueError(f"unit={unit!r}: expected one of {sorted(UNIT_FACTORS)}")
        # OFER: metrical mode keeps the Procrustes rotation and translation (fitted with b) but scales by the
        # unit factor instead of b.
        return sim.apply(pred_vertices, scale=UNIT_FACTORS[unit])
    return sim.apply(pred_vertices)


# ----------------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------------


@dataclass
class ImageFailure:
    """An image that could not be scored: its image-list entry, the offending file and the reason."""

    image: str
    path: str
    reason: str


@dataclass
class NowReport:
    """Result of `score_now`.

    median/mean/std: pooled over all distances of all scored images (mm; std with ddof 0).
    per_challenge: challenge folder name -> dict with the same statistics and counts.
    distances: per scored image, float64 (N,) in cropped-scan order (image-list order).
    input_files: prediction mesh path per scored image; images: image-list entry per scored image.
    """

    median: float
    mean: float
    std: float
    num_images: int
    num_missing: int
    num_failed: int
    failures: list[ImageFailure]
    missing: list[str]
    per_challenge: dict[str, dict]
    distances: list[np.ndarray] = field(repr=False)
    input_files: list[str] = field(repr=False)
    images: list[str] = field(repr=False)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """JSON-serialisable summary (no per-vertex distances)."""
        return {
            "median": _num(self.median),
            "mean": _num(self.mean),
            "std": _num(self.std),
            "num_images": self.num_images,
            "num_missing": self.num_missing,
            "num_failed": self.num_failed,
            "failures": [asdict(f) for f in self.failures],
            "missing": self.missing,
            "per_challenge": {k: {kk: _num(vv) for kk, vv in v.items()} for k, v in self.per_challenge.items()},
            "settings": self.settings,
        }


def _num(x: float | int) -> float | int | None:
    """NaN (no scored image) -> None, so the JSON stays standard."""
    return None if isinstance(x, float) and math.isnan(x) else x


def pooled_stats(arrays: Sequence[np.ndarray]) -> tuple[float, float, float]:
    """Median, mean and std (ddof 0) of the concatenation of per-image distance arrays; NaN when empty."""
    if not arrays:
        return math.nan, math.nan, math.nan
    # OFER: statistics of the concatenation of all images' distances (`cumulative_errors.py`).
    allv = np.hstack(arrays)
    return float(np.median(allv)), float(np.mean(allv)), float(np.std(allv))


@dataclass
class _Item:
    index: int  # position in the image list
    line: str
    subject: str
    challenge: str
    mesh_path: str
    scan_points: np.ndarray  # (N, 3) cropped scan
    aligned: np.ndarray  # (V, 3)
    faces: np.ndarray  # (F, 3)


def score_now(
    root: str | os.PathLike,
    predictions: str | os.PathLike,
    *,
    split: str = "validation",
    challenge: str | None = None,
    metrical: bool = False,
    unit: str = "mm",
    device: str | torch.device = "auto",
    backend: str = "auto",
    batch_size: int = 16,
    max_pairs: int | None = None,
    compile: bool = False,
    triton: bool = False,
    out_dir: str | os.PathLike | None = None,
    method_identifier: str = "RECON",
    imgs_list: str | os.PathLike | None = None,
    gt_mesh_folder: str | os.PathLike | None = None,
    gt_lmk_folder: str | os.PathLike | None = None,
    plot: bool = True,
) -> NowReport:
    """Score a folder of NoW predictions like the official `compute_error.py` (+ `cumulative_errors.py`).

    Reads `<root>/imagepaths<split>.txt` (or `imgs_list`), the first sorted `scans/<subject>/*.obj` and
    `scans_lmks_onlypp/<subject>/*.pp`, predictions `<predictions>/<subject>/<challenge>/<stem>.obj|.ply` and
    landmarks `<stem>.npy|.txt`. Missing prediction files are counted in `num_missing` (official behaviour);
    unreadable or degenerate inputs are recorded in `failures` with their path and reason and the run goes on.

    When `out_dir` is given, writes there: `now_metrics.json`, `<id>_computed_distances.npy` (official dict
    format, distances NOT shuffled, image-list order), `<id>_computed_distances.npy.meanmedian` and (if
    `plot`) `cumulative_errors.png`. `<id>` is `method_identifier` (+ `_metrical`), the file name gets
    `_<challenge>` when a challenge filter is set, as in the official script.

    Args:
        root: NoW dataset folder.
        predictions: folder of predicted meshes + landmarks.
        split: 'validation' or 'test' (selects `imagepaths<split>.txt`).
        challenge: keep only image-list entries whose challenge folder has this name.
        metrical: official metrical protocol (unit scale instead of the Procrustes scale, no scale refinement).
        unit: unit of the predictions in metrical mode: 'mm', 'cm' or 'm'.
        device: 'auto', 'cpu' or 'cuda[:N]'.
        backend: closest points by 'auto', 'igl' (CPU) or 'torch'.
        batch_size: images refined together (one batched dogleg; masks keep their trust regions apart).
        max_pairs: see `refine_alignment` (GPU memory of the closest-point search).
        compile: see `refine_alignment` (torch backend: compiled closest-point search).
        triton: see `refine_alignment` (torch backend: the closest-point search as a Triton kernel, CUDA).
    """
    if unit not in UNIT_FACTORS:
        raise ValueError(f"unit={unit!r}: expected one of {sorted(UNIT_FACTORS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected >= 1")
    root = Path(root)
    pred_root = Path(predictions)
    if not pred_root.is_dir():
        raise FileNotFoundError(f"predictions folder does not exist: {pred_root}")
    list_path, entries = read_image_list(root, split=split, imgs_list=imgs_list, challenge=challenge)
    scan_dir, lmk_dir = scan_folders(root, gt_mesh_folder, gt_lmk_folder)
    dev = resolve_device(device)

    scans: dict[str, tuple[np.ndarray, np.ndarray] | ImageFailure] = {}
    failures: list[tuple[int, ImageFailure]] = []
    missing: list[str] = []
    items: list[_Item] = []
    for index, (line, subject, chal, fname) in enumerate(entries):
        stem = fname[:-4]  # OFER: official `filename[:-4]`
        base = pred_root / subject / chal
        mesh_path = next((base / (stem + s) for s in MESH_SUFFIXES if (base / (stem + s)).is_file()), None)
        lmk_path = next((base / (stem + s) for s in (".npy", ".txt") if (base / (stem + s)).is_file()), None)
        if mesh_path is None or lmk_path is None:
            missing.append(line)
            continue
        if subject not in scans:
            scans[subject] = load_scan(scan_dir, lmk_dir, subject, line)
        scan = scans[subject]
        if isinstance(scan, ImageFailure):
            failures.append((index, ImageFailure(line, scan.path, scan.reason)))
            continue
        scan_points, scan_lmks = scan
        try:
            verts, faces = load_mesh(mesh_path)
        except MeshIOError as exc:
            failures.append((index, ImageFailure(line, str(mesh_path), str(exc))))
            continue
        reason = _check_prediction(verts, faces)
        if reason:
            failures.append((index, ImageFailure(line, str(mesh_path), reason)))
            continue
        try:
            lmks = read_landmarks(lmk_path)
            aligned = align_prediction(scan_lmks, verts, lmks, metrical=metrical, unit=unit)
        except (MeshIOError, ValueError) as exc:
            failures.append((index, ImageFailure(line, str(lmk_path), str(exc))))
            continue
        items.append(_Item(index, line, subject, chal, str(mesh_path), scan_points, aligned, faces))

    results: dict[int, np.ndarray] = {}
    for s in range(0, len(items), batch_size):
        batch = items[s:s + batch_size]
        res = refine_alignment(
            [it.scan_points for it in batch], [it.aligned for it in batch], [it.faces for it in batch],
            metrical=metrical, device=dev, backend=backend, max_pairs=max_pairs, compile=compile,
            triton=triton,
        )
        for it, dist, fail in zip(batch, res.distances, res.failure):
            if fail:
                failures.append((it.index, ImageFailure(it.line, it.mesh_path, fail)))
            else:
                results[it.index] = dist
        log.info("NoW: refined %d / %d images", min(s + batch_size, len(items)), len(items))

    ok_items = [it for it in items if it.index in results]
    distances = [results[it.index] for it in ok_items]
    failures.sort(key=lambda x: x[0])
    fail_list = [f for _, f in failures]
    median, mean, std = pooled_stats(distances)
    per_challenge: dict[str, dict] = {}
    for chal in sorted({e[2] for e in entries}):
        d = [results[it.index] for it in ok_items if it.challenge == chal]
        m, a, sd = pooled_stats(d)
        per_challenge[chal] = {
            "median": m, "mean": a, "std": sd, "num_images": len(d),
            "num_missing": sum(1 for line in missing if line.split("/")[-2] == chal),
            "num_failed": sum(1 for f in fail_list if f.image.split("/")[-2] == chal),
        }
    report = NowReport(
        median=median, mean=mean, std=std, num_images=len(distances), num_missing=len(missing),
        num_failed=len(fail_list), failures=fail_list, missing=missing, per_challenge=per_challenge,
        distances=distances, input_files=[it.mesh_path for it in ok_items], images=[it.line for it in ok_items],
        settings={
            "root": str(root), "predictions": str(pred_root), "image_list": str(list_path), "split": split,
            "challenge": challenge, "metrical": metrical, "unit": unit, "device": str(dev), "backend": backend,
        },
    )
    for f in fail_list:
        log.error("NoW: failed %s (%s): %s", f.image, f.path, f.reason)
    if out_dir is not None:
        write_outputs(report, out_dir, method_identifier=method_identifier, challenge=challenge,
                      metrical=metrical, plot=plot)
    return report


def read_image_list(
    root: str | os.PathLike, *, split: str = "validation", imgs_list: str | os.PathLike | None = None,
    challenge: str | None = None,
) -> tuple[Path, list[tuple[str, str, str, str]]]:
    """The NoW image list `<root>/imagepaths<split>.txt` (or `imgs_list`): its path and, per non-empty line in
    list order, `(line, subject, challenge, file)` from the line's last three components (official
    `line.split('/')[-3:]`), keeping only `challenge` when given.

    Raises:
        ValueError: unknown split, a line with fewer than three components, a challenge absent from the list.
        FileNotFoundError: no list file.
    """
    if split not in ("validation", "test"):
        raise ValueError(f"split={split!r}: expected 'validation' or 'test'")
    list_path = Path(imgs_list) if imgs_list else Path(root) / f"imagepaths{split}.txt"
    if not list_path.is_file():
        raise FileNotFoundError(f"image list not found: {list_path} (expected the NoW imagepaths{split}.txt)")
    entries = []
    for raw in list_path.read_text().splitlines():
        if not raw.strip():
            continue
        parts = raw.strip().split("/")
        if len(parts) < 3:
            raise ValueError(f"{list_path}: line {raw!r} is not '<subject>/<challenge>/<image>'")
        entries.append((raw.strip(), parts[-3], parts[-2], parts[-1]))
    found = sorted({e[2] for e in entries})
    if challenge:
        if challenge not in found:
            raise ValueError(f"challenge={challenge!r} does not occur in {list_path}; found {found}")
        entries = [e for e in entries if e[2] == challenge]
    return list_path, entries


def scan_folders(root: str | os.PathLike, gt_mesh_folder: str | os.PathLike | None = None,
                 gt_lmk_folder: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The scan and scan-landmark folders: the given ones, else NoW's `<root>/scans`, `<root>/scans_lmks_onlypp`."""
    root = Path(root)
    return (Path(gt_mesh_folder) if gt_mesh_folder else root / "scans",
            Path(gt_lmk_folder) if gt_lmk_folder else root / "scans_lmks_onlypp")


def load_scan(scan_dir: Path, lmk_dir: Path, subject: str, line: str) -> tuple[np.ndarray, np.ndarray] | ImageFailure:
    """Cropped scan vertices (N, 3) and scan landmarks (7, 3) of a subject, or the failure (reported for each of
    its images, `line` naming the image-list entry)."""
    # OFER: official takes `glob(...)[0]`; glob order is file-system order, we sort to make it reproducible.
    objs = sorted(glob(str(scan_dir / subject / "*.obj")))
    pps = sorted(glob(str(lmk_dir / subject / "*.pp")))
    if not objs:
        return ImageFailure(line, str(scan_dir / subject), "no ground-truth scan *.obj found for the subject")
    if not pps:
        return ImageFailure(line, str(lmk_dir / subject), "no ground-truth landmark *.pp found for the subject")
    try:
        verts, _ = load_mesh(objs[0], require_faces=False)
    except MeshIOError as exc:
        return ImageFailure(line, objs[0], str(exc))
    try:
        lmks = read_pp(pps[0])
    except MeshIOError as exc:
        return ImageFailure(line, pps[0], str(exc))
    idx = crop_scan(verts, lmks)
    if len(idx) == 0:
        centre, radius = crop_sphere(lmks)
        return ImageFailure(
            line, objs[0],
            f"no scan vertex inside the crop sphere (centre {centre.tolist()}, radius {radius:.3f} mm) "
            f"defined by {pps[0]}; are scan and landmarks in the same frame and in mm?",
        )
    return verts[idx], lmks


def write_outputs(
    report: NowReport,
    out_dir: str | os.PathLike,
    *,
    method_identifier: str = "RECON",
    challenge: str | None = None,
    metrical: bool = False,
    plot: bool = True,
) -> dict[str, Path]:
    """Write `now_metrics.json`, the official distances `.npy` + `.meanmedian`, and the cumulative error plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ident = method_identifier + ("_metrical" if metrical else "")
    name = f"{ident}_computed_distances.npy" if not challenge else f"{ident}_computed_distances_{challenge}.npy"
    paths = {"metrics": out / "now_metrics.json", "distances": out / name, "meanmedian": out / (name + ".meanmedian")}
    payload = {
        "computed_distances": report.distances,
        "num_missing_files": report.num_missing,
        "input_files": report.input_files,
    }
    buf = io.BytesIO()
    np.save(buf, np.array(payload, dtype=object), allow_pickle=True)
    atomic_write(paths["distances"], buf.getvalue())
    # OFER: the official `.meanmedian` holds the median line then the mean line of the pooled distances.
    atomic_write(paths["meanmedian"], f"{report.median}\n{report.mean}\n".encode())
    atomic_write(paths["metrics"], (json.dumps(report.to_json(), indent=2) + "\n").encode())
    if plot:
        from ofer.eval.now_plot import plot_cumulative_errors

        paths["plot"] = out / "cumulative_errors.png"
        plot_cumulative_errors({ident: report.distances}, paths["plot"])
    return paths



def score_now_from_config(  # noqa: ANN001
    cfg, out_dir: str | os.PathLike | None = None, *, predictions: str | os.PathLike | None = None
) -> NowReport:
    """`score_now` driven by the `eval_now` config (`cfg.now.*`, `cfg.device`) on `predictions` (default
    `cfg.now.predictions`); writes into `out_dir`, by default the Hydra run dir, and prints a summary."""
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    c = cfg.now
    report = score_now(
        c.root,
        c.predictions if predictions is None else predictions,
        split=c.split,
        challenge=c.challenge or None,
        metrical=bool(c.metrical),
        unit=c.unit,
        device=cfg.device,
        backend=c.backend,
        batch_size=int(c.batch_size),
        max_pairs=None if c.max_pairs is None else int(c.max_pairs),
        compile=bool(c.get("compile", False)),
        triton=bool(c.get("triton", False)),
        out_dir=out_dir,
        method_identifier=c.method_identifier,
        imgs_list=c.imgs_list,
        gt_mesh_folder=c.gt_mesh_folder,
        gt_lmk_folder=c.gt_lmk_folder,
        plot=bool(c.plot),
    )
    lines = [f"NoW ({report.settings['split']}, {report.settings['device']}): {report.num_images} images scored, "
             f"{report.num_missing} missing, {report.num_failed} failed"]
    lines.append(f"  {'challenge':<24} {'median':>8} {'mean':>8} {'std':>8} {'images':>7}")
    rows = [("all", {"median": report.median, "mean": report.mean, "std": report.std, "num_images": report.num_images})]
    rows += list(report.per_challenge.items())
    for name, st in rows:
        lines.append(f"  {name:<24} {st['median']:8.4f} {st['mean']:8.4f} {st['std']:8.4f} {st['num_images']:7d}")
    for f in report.failures:
        lines.append(f"  FAILED {f.image}: {f.path}: {f.reason}")
    print("\n".join(lines))
    print(f"outputs in {out_dir}")
    return report
