"""Tests of the NoW scorer (`ofer.eval.now`) against closed forms, hand computations and independent
implementations (scipy procrustes / Rotation / cg / least_squares, trimesh and libigl closest points), plus
bad inputs, the synthetic NoW-layout writer and an end-to-end run of `scripts/eval_now.py`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import igl
import numpy as np
import pytest
import torch
import trimesh
from scipy.optimize import least_squares
from scipy.sparse.linalg import cg
from scipy.spatial import procrustes as scipy_procrustes
from scipy.spatial.transform import Rotation

from ofer.eval.now import (
    _closest_igl,
    crop_scan,
    crop_sphere,
    landmark_similarity,
    now_distances,
    refine_alignment,
    residuals_and_jacobian,
    rodrigues,
    rodrigues_jacobian,
    score_now,
)
from ofer.eval.now_synthetic import HEAD_LANDMARK_DIRECTIONS, densify_scan, synthetic_head, write_now_benchmark
from ofer.meshio import read_pp, save_mesh

REPO = Path(__file__).resolve().parents[1]
PRED_PARAMS = dict(a=78, b=92, c=85, nose=20, brow=4, eyes=5, cheeks=6, lips=3)


def _similar(v: np.ndarray, s: float, rotvec, t) -> np.ndarray:
    return s * np.asarray(v, dtype=np.float64) @ Rotation.from_rotvec(rotvec).as_matrix().T + np.asarray(t)


@pytest.fixture(scope="module")
def scan():
    """A head-like scan (mm) with float32 landmarks, and its crop."""
    v, f, lm = synthetic_head(n_lat=40, n_lon=40)
    lm = lm.astype(np.float32)
    return v, f, lm, v[crop_scan(v, lm)]


@pytest.fixture(scope="module")
def pred():
    """A different head (other shape, coarser) in another frame: the refinement cannot reach 0."""
    v, f, lm = synthetic_head(n_lat=24, n_lon=24, params=PRED_PARAMS)
    return _similar(v, 1.1, [0.2, -0.4, 0.1], [3, 4, 5]), f, _similar(lm, 1.1, [0.2, -0.4, 0.1], [3, 4, 5]).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# step 1: crop (hand computed)
# ---------------------------------------------------------------------------------------------------


def test_crop_hand_computed() -> None:
    # L0/L3 100 mm apart, bridge (0,10,0), nose bottom (0,-10,0): centre (0,-4,0), radius 1.4 (100 + 20) / 2 = 84.
    lm = np.array([[-50, 0, 0], [-10, 10, 0], [10, 10, 0], [50, 0, 0], [0, -10, 0], [-20, -30, 0], [20, -30, 0]], np.float32)
    centre, radius = crop_sphere(lm)
    np.testing.assert_array_equal(centre, np.array([0, -4, 0], np.float32))
    assert radius == pytest.approx(84.0, abs=1e-12)
    pts = np.array(
        [
            [0, -4, 0],  # centre: in
            [0, 80, 0],  # exactly on the sphere: in (<=)
            [0, 80.001, 0],  # just outside
            [84, -4, 0],  # on the sphere along x: in
            [0, -4, -84.01],  # outside along -z
            [59, 55, 0],  # |(59, 59, 0)| = 83.44: in
            [60, 56, 0],  # |(60, 60, 0)| = 84.85: out
        ],
        dtype=np.float64,
    )
    np.testing.assert_array_equal(crop_scan(pts, lm), [0, 1, 3, 5])


def test_crop_radius_uses_float32_landmark_sums() -> None:
    # The radius is 1.4 * float32(|L0-L3| + |bridge-L4|) / 2 in float64 (NumPy 1.x semantics of the official).
    rng = np.random.default_rng(0)
    lm = (rng.normal(size=(7, 3)) * 40).astype(np.float32)
    centre, radius = crop_sphere(lm)
    bridge = (lm[1] + lm[2]) / np.float32(2)
    s32 = np.float32(np.linalg.norm(lm[0] - lm[3]) + np.linalg.norm(bridge - lm[4]))
    assert radius == 1.4 * float(s32) / 2
    assert centre.dtype == np.float32


# ---------------------------------------------------------------------------------------------------
# step 2: Procrustes
# ---------------------------------------------------------------------------------------------------


def test_procrustes_recovers_known_similarity_and_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    Y = (rng.normal(size=(7, 3)) * 30).astype(np.float32)
    T = Rotation.from_rotvec([0.3, 1.1, -0.4]).as_matrix()
    X = (2.5 * Y.astype(np.float64) @ T + np.array([10.0, -20.0, 5.0])).astype(np.float32)
    sim = landmark_similarity(X, Y)
    assert sim.rotation.dtype == np.float32  # float32 landmarks -> float32 arithmetic, like the official
    assert float(sim.scale) == pytest.approx(2.5, rel=1e-5)
    np.testing.assert_allclose(sim.rotation, T, atol=1e-5)
    np.testing.assert_allclose(sim.translation, [10, -20, 5], atol=2e-3)
    # scipy.spatial.procrustes standardises both sets; its mtx2, de-standardised with X's mean and norm, is
    # b Y T + c.
    rng2 = np.random.default_rng(2)
    Yn = Y + rng2.normal(size=Y.shape).astype(np.float32) * 3
    mtx1, mtx2, _ = scipy_procrustes(X.astype(np.float64), Yn.astype(np.float64))
    X0 = X.astype(np.float64) - X.mean(0)
    expected = mtx2 * np.linalg.norm(X0) + X.astype(np.float64).mean(0)
    np.testing.assert_allclose(landmark_similarity(X, Yn).apply(Yn), expected, atol=2e-3)


def test_procrustes_no_reflection_fix() -> None:
    rng = np.random.default_rng(3)
    X = (rng.normal(size=(7, 3)) * 30).astype(np.float32)
    Y = X * np.array([-1, 1, 1], np.float32)  # mirrored prediction
    sim = landmark_similarity(X, Y)
    assert np.linalg.det(sim.rotation.astype(np.float64)) < 0  # the reflection is kept, not fixed
    np.testing.assert_allclose(sim.apply(Y), X, atol=1e-3)  # ... and the mirrored set maps exactly onto X


def test_procrustes_degenerate_landmarks() -> None:
    X = np.ones((7, 3), np.float32)
    with pytest.raises(ValueError, match="coincide"):
        landmark_similarity(X, X)


# ---------------------------------------------------------------------------------------------------
# rotations and the Jacobian
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [[0.0, 0.0, 0.0], [1e-7, -2e-7, 3e-8], [3e-3, 1e-3, -2e-3], [0.3, -1.2, 0.7], [2.0, 1.0, -2.5]])
def test_rodrigues_and_derivative(r) -> None:
    rt = torch.tensor([r], dtype=torch.float64)
    np.testing.assert_allclose(rodrigues(rt)[0].numpy(), Rotation.from_rotvec(r).as_matrix(), atol=1e-15)
    h = 1e-6
    dR = rodrigues_jacobian(rt)[0].numpy()
    for k in range(3):
        e = np.zeros(3)
        e[k] = h
        fd = (Rotation.from_rotvec(np.array(r) + e).as_matrix() - Rotation.from_rotvec(np.array(r) - e).as_matrix()) / (2 * h)
        np.testing.assert_allclose(dR[k], fd, atol=1e-9)


def _resjac(theta, X, V, F, metrical=False):
    T = lambda a: torch.as_tensor(np.asarray(a))[None]  # noqa: E731
    r, J = residuals_and_jacobian(
        T(theta), T(X), torch.ones(1, len(X), dtype=torch.bool), T(V), T(F), torch.ones(1, len(F), dtype=torch.bool),
        metrical=metrical, closest=_closest_igl,
    )
    return r[0].numpy(), J[0].numpy()


@pytest.mark.parametrize("metrical", [False, True])
def test_jacobian_matches_finite_differences(scan, pred, metrical) -> None:
    X = scan[3]
    V = landmark_similarity(scan[2], pred[2]).apply(pred[0])
    theta = np.array([0.97, 0.05, -0.08, 0.03, 0.6, -0.9, 1.3])
    r0, J = _resjac(theta, X, V, pred[1], metrical)
    free = list(range(1, 7)) if metrical else list(range(7))
    assert J.shape == (len(r0), len(free))
    h = 1e-6
    for col, k in enumerate(free):
        tp, tm = theta.copy(), theta.copy()
        tp[k] += h
        tm[k] -= h
        fd = (_resjac(tp, X, V, pred[1], metrical)[0] - _resjac(tm, X, V, pred[1], metrical)[0]) / (2 * h)
        err = np.abs(fd - J[:, col])
        scale = np.abs(J[:, col]).max()
        # A closest point switching region inside +-h makes a kink: allow a handful of such rows.
        assert np.mean(err < 1e-5 * scale + 1e-7) > 0.98, (k, err.max())
        assert np.median(err) < 1e-7 * scale + 1e-9
    if not metrical:
        # the scale residual 100(|s| - s): derivative 0 for s > 0 and -200 for s < 0
        assert r0[-1] == 0 and np.all(J[-1] == 0)
        r_neg, J_neg = _resjac(np.array([-0.5, 0, 0, 0, 0, 0, 0]), X, V, pred[1])
        assert r_neg[-1] == pytest.approx(100.0) and J_neg[-1, 0] == -200.0 and np.all(J_neg[-1, 1:] == 0)


# ---------------------------------------------------------------------------------------------------
# an independent implementation of the spec's pseudo-code: numpy, scipy cg, trimesh closest points,
# scipy Rotation and the Gallego-Yezzi formula for dR/dr
# ---------------------------------------------------------------------------------------------------


def _skew(v):
    return np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])


def _dR_gallego_yezzi(r):
    th = np.linalg.norm(r)
    if th == 0:
        return [_skew(e) for e in np.eye(3)]
    R = Rotation.from_rotvec(r).as_matrix()
    return [(r[i] * _skew(r) + _skew(np.cross(r, (np.eye(3) - R)[:, i]))) @ R / th ** 2 for i in range(3)]


def _ref_eval(theta, X, V, F, metrical):
    s, r, t = theta[0], theta[1:4], theta[4:7]
    R = Rotation.from_rotvec(r).as_matrix()
    c = trimesh.proximity.closest_point(trimesh.Trimesh(s * V @ R.T + t, F, process=False), X)[0]
    diff = X - c
    e = np.linalg.norm(diff, axis=1)
    u = diff / e[:, None]
    ct = (c - t) @ R / s
    J = np.zeros((len(X), 7))
    J[:, 0] = -(u * (ct @ R.T)).sum(1)
    for k, dRk in enumerate(_dR_gallego_yezzi(r)):
        J[:, 1 + k] = -(u * (s * ct @ dRk.T)).sum(1)
    J[:, 4:] = -u
    if metrical:
        return e, J[:, 1:], e
    return np.append(e, 100 * (abs(s) - s)), np.vstack([J, [100 * (np.sign(s) - 1)] + [0] * 6]), e


def _ref_dogleg(X, V, F, metrical):
    """The spec's pseudo-code, line by line (delta_0 0.1, e_3 1e-4, e_1 = e_2 = 1e-15, maxiter 200)."""
    full = (lambda p: np.concatenate([[1.0], p])) if metrical else (lambda p: p)
    p = np.zeros(6) if metrical else np.array([1.0, 0, 0, 0, 0, 0, 0])
    r, J, e = _ref_eval(full(p), X, V, F, metrical)
    A, g, delta, k, stop = J.T @ J, -J.T @ r, 0.1, 0, False
    while not stop:
        k += 1
        d_sd = (g @ g) / np.sum((J @ g) ** 2) * g
        d_gn = None
        while True:
            if np.linalg.norm(d_sd) >= delta:
                d = delta / np.linalg.norm(d_sd) * d_sd
            else:
                if d_gn is None:
                    d_gn = cg(A, g, maxiter=2000)[0]
                if np.linalg.norm(d_gn) <= delta:
                    d = d_gn
                else:
                    df = d_gn - d_sd
                    beta = (delta ** 2 - d_sd @ d_sd) / (
                        df @ d_sd + np.sqrt(df @ df * delta ** 2 + (d_gn @ d_sd) ** 2 - (d_gn @ d_gn) * (d_sd @ d_sd))
                    )
                    d = d_sd + beta * df
            r_new, J_new, e_new = _ref_eval(full(p + d), X, V, F, metrical)
            rho = r @ r - r_new @ r_new
            accepted = rho > 0
            if accepted:
                rho = rho / (2 * g @ d - d @ A @ d)
                p, e = p + d, e_new
                if (r @ r - r_new @ r_new) / (r @ r) < 1e-4:
                    stop = True
                else:
                    J, r = J_new, r_new
                    A, g = J.T @ J, -J.T @ r
            if rho > 0.9:
                delta = max(delta, 2.5 * np.linalg.norm(d))
            elif rho < 0.05:
                delta /= 4
            if stop or accepted:
                break
        stop = stop or k >= 200
    return full(p), e, k


@pytest.mark.parametrize("metrical", [False, True])
def test_dogleg_matches_independent_reference(scan, pred, metrical) -> None:
    X = scan[3]
    V = landmark_similarity(scan[2], pred[2]).apply(pred[0], scale=1.0 if metrical else None)
    theta_ref, e_ref, iters_ref = _ref_dogleg(X, V, pred[1], metrical)
    res = refine_alignment([X], [V], [pred[1]], metrical=metrical, device="cpu", backend="igl")
    assert res.failure == [None]
    assert res.iterations[0] == iters_ref
    np.testing.assert_allclose(res.distances[0], e_ref, rtol=0, atol=5e-4)  # the spec's per-vertex bound
    assert np.median(e_ref) > 0.5  # a real optimisation problem, not a trivial zero
    if metrical:
        assert res.theta[0, 0] == 1.0


def test_dogleg_vs_converged_optimum(scan, pred) -> None:
    """The dogleg's e_3 stop leaves the official result close to (not at) the least-squares optimum."""
    X = scan[3]
    V = landmark_similarity(scan[2], pred[2]).apply(pred[0])
    F = pred[1]

    def closest(th):
        R = Rotation.from_rotvec(th[1:4]).as_matrix()
        return igl.point_mesh_squared_distance(X, th[0] * V @ R.T + th[4:], F)[2], R

    def fun(th):
        c, _ = closest(th)
        return np.append(np.linalg.norm(X - c, axis=1), 100 * (abs(th[0]) - th[0]))

    def jac(th):  # the spec's Jacobian with the Gallego-Yezzi rotation derivative
        c, R = closest(th)
        s, t = th[0], th[4:]
        u = (X - c) / np.linalg.norm(X - c, axis=1)[:, None]
        ct = (c - t) @ R / s
        J = np.zeros((len(X) + 1, 7))
        J[:-1, 0] = -(u * (ct @ R.T)).sum(1)
        for k, dRk in enumerate(_dR_gallego_yezzi(th[1:4])):
            J[:-1, 1 + k] = -(u * (s * ct @ dRk.T)).sum(1)
        J[:-1, 4:] = -u
        J[-1, 0] = 100 * (np.sign(s) - 1)
        return J

    opt = least_squares(fun, np.array([1.0, 0, 0, 0, 0, 0, 0]), jac=jac, x_scale="jac", xtol=1e-12, ftol=1e-12,
                        gtol=1e-12, max_nfev=300)
    d_opt = fun(opt.x)[:-1]
    res = refine_alignment([X], [V], [F])
    d = res.distances[0]
    cost, cost_opt = (d ** 2).sum(), (d_opt ** 2).sum()
    assert cost_opt <= cost * (1 + 1e-9)
    assert (cost - cost_opt) / cost_opt < 2e-3
    assert np.median(np.abs(d - d_opt)) < 0.03
    assert np.median(d) == pytest.approx(np.median(d_opt), abs=0.02)


# ---------------------------------------------------------------------------------------------------
# closed-form cases
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["igl", "torch"])
def test_exact_similarity_gives_zero(scan, backend) -> None:
    v, f, lm, _ = scan
    pv = _similar(v, 0.001, [0.5, -0.3, 1.2], [0.02, -0.1, 0.3])  # e.g. metres, another pose
    pl = _similar(lm, 0.001, [0.5, -0.3, 1.2], [0.02, -0.1, 0.3]).astype(np.float32)
    d = now_distances(v, lm, pv, f, pl, device="cpu", backend=backend)
    assert len(d) == len(crop_scan(v, lm)) and d.dtype == np.float64
    assert d.max() < 1e-4


def test_sphere_vs_sphere_scale_is_refined() -> None:
    ico = trimesh.creation.icosphere(subdivisions=4)
    u, F = ico.vertices, ico.faces
    R1, R2, delta = 90.0, 70.0, 0.05
    lidx = [int(np.argmin(np.linalg.norm(u - d, axis=1))) for d in HEAD_LANDMARK_DIRECTIONS]
    scan_v, scan_l = u * R1, (u[lidx] * R1).astype(np.float32)
    pred_v = u * R2
    pred_l = (u[lidx] * R2 * (1 + delta)).astype(np.float32)  # landmarks 5% off the surface
    X = scan_v[crop_scan(scan_v, scan_l)]
    sim = landmark_similarity(scan_l, pred_l)
    assert float(sim.scale) == pytest.approx(R1 / (R2 * (1 + delta)), rel=1e-6)
    V = sim.apply(pred_v)
    # Before the refinement: the scan sphere's vertices sit R1 - R1/(1+delta) outside the aligned sphere.
    d0 = np.sqrt(igl.point_mesh_squared_distance(X, V, F)[0])
    np.testing.assert_allclose(d0, R1 * delta / (1 + delta), atol=2e-4)
    res = refine_alignment([X], [V], [F])
    assert res.theta[0, 0] == pytest.approx(1 + delta, rel=1e-6)  # the scale refinement undoes the 5%
    assert res.distances[0].max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu(scan, pred) -> None:
    v, f, lm, X = scan
    Vs, Fs, Xs = [], [], []
    for i, (s, rv) in enumerate([(1.1, [0.2, -0.4, 0.1]), (0.9, [0.0, 0.3, 0.0]), (1.0, [0.1, 0.1, 0.1])]):
        pv, pf, pl = synthetic_head(n_lat=24 + 4 * i, n_lon=24, params=PRED_PARAMS)
        pv, pl = _similar(pv, s, rv, [1, 2, 3]), _similar(pl, s, rv, [1, 2, 3]).astype(np.float32)
        Vs.append(landmark_similarity(lm, pl).apply(pv))
        Fs.append(pf)
        Xs.append(X[: len(X) - 20 * i])  # different point counts: padding
    cpu = refine_alignment(Xs, Vs, Fs, device="cpu", backend="igl")
    gpu = refine_alignment(Xs, Vs, Fs, device="cuda")
    for a, b in zip(cpu.distances, gpu.distances):
        np.testing.assert_allclose(a, b, rtol=0, atol=5e-4)
    np.testing.assert_array_equal(cpu.iterations, gpu.iterations)


# ---------------------------------------------------------------------------------------------------
# synthetic layout, bad inputs, end to end
# ---------------------------------------------------------------------------------------------------


def _dataset(tmp_path: Path):
    """2 subjects, 3 challenges; predictions: exact similarity copies of the scans, one other head."""
    root, preds = tmp_path / "now", tmp_path / "pred"
    subjects = {}
    for i, name in enumerate(["FaMoS_180424_03335_TA", "FaMoS_180426_03336_TA"]):
        v, f, lm = synthetic_head(n_lat=36 + 6 * i, n_lon=40, params={"nose": 22 + 3 * i})
        subjects[name] = (v, f, lm.astype(np.float32))
    img = np.zeros((8, 6, 3), np.uint8)
    images = [
        ("FaMoS_180424_03335_TA", "multiview_neutral", "IMG_0101", img, (1, 2, 5, 7)),
        ("FaMoS_180424_03335_TA", "multiview_expressions", "IMG_0102", None, None),
        ("FaMoS_180426_03336_TA", "multiview_neutral", "IMG_0201", None, {"left": 0, "top": 0, "right": 4, "bottom": 4}),
        ("FaMoS_180426_03336_TA", "selfie", "IMG_0202", None, None),
        ("FaMoS_180426_03336_TA", "multiview_expressions", "IMG_0203", None, None),
    ]
    write_now_benchmark(root, subjects=subjects, images=images)
    for k, (subj, chal, stem, _, _) in enumerate(images):
        v, f, lm = subjects[subj]
        if stem == "IMG_0203":  # a different head: non-zero errors
            v, f, lm = synthetic_head(n_lat=24, n_lon=24, params=PRED_PARAMS)
        rv = [0.1 * k, -0.2, 0.05]
        save_mesh(preds / subj / chal / f"{stem}.obj", _similar(v, 0.001, rv, [0, 0.1, 0]), f)
        np.save(preds / subj / chal / f"{stem}.npy", _similar(lm, 0.001, rv, [0, 0.1, 0]).astype(np.float32))
    return root, preds, subjects, images


def test_write_now_benchmark_layout(tmp_path: Path) -> None:
    root, _, subjects, images = _dataset(tmp_path)
    lines = (root / "imagepathsvalidation.txt").read_text().splitlines()
    assert lines == [f"{s}/{c}/{n}.jpg" for s, c, n, _, _ in images]
    for name, (v, f, lm) in subjects.items():
        pp = next((root / "scans_lmks_onlypp" / name).glob("*.pp"))
        np.testing.assert_array_equal(read_pp(pp), lm)  # the pp round trip through the official line layout
        assert len(list((root / "scans" / name).glob("*.obj"))) == 1
    jpg = root / "final_release_version/iphone_pictures/FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.jpg"
    assert jpg.read_bytes()[:2] == b"\xff\xd8"
    box = np.load(root / "final_release_version/detected_face/FaMoS_180424_03335_TA/multiview_neutral/IMG_0101.npy",
                  allow_pickle=True).item()
    assert box == {"left": 1.0, "top": 2.0, "right": 5.0, "bottom": 7.0}


def test_densify_scan() -> None:
    v, f, lm = synthetic_head(n_lat=20, n_lon=20)
    dv, df = densify_scan(v, f, target_vertices=3000, noise_mm=0.2, hole_fraction=0.1, seed=0, protect_points=lm)
    # closed mesh: E = 3F/2; one 1-to-4 subdivision: V += E, E -> 2E + 3F, F -> 4F
    n_v, n_e, n_f = len(v), 3 * len(f) // 2, len(f)
    while n_v < 3000:
        n_v, n_e, n_f = n_v + n_e, 2 * n_e + 3 * n_f, 4 * n_f
    n_full = n_v
    assert n_full >= 3000 and len(dv) == n_full - round(0.1 * n_full)
    assert df.min() >= 0 and df.max() < len(dv)
    # protected landmark neighbourhoods stay (same seed without holes: same noisy vertices)
    dv0, df0 = densify_scan(v, f, target_vertices=3000, noise_mm=0.2, hole_fraction=0.0, seed=0)
    assert len(dv0) == n_full and len(df0) > len(df)
    near = lambda pts: (np.linalg.norm(pts[:, None] - lm[None], axis=-1) <= 8.0).sum(0)  # noqa: E731
    np.testing.assert_array_equal(near(dv), near(dv0))
    assert near(dv0).min() > 0
    # the noise is about 0.2 mm (distance of the dense vertices to the clean surface)
    _, d_surf = trimesh.proximity.closest_point(trimesh.Trimesh(v, f, process=False), dv[:500])[:2]
    assert 0.1 < np.sqrt(np.mean(d_surf ** 2)) < 0.3


def test_score_now_bad_inputs_reported_and_run_continues(tmp_path: Path) -> None:
    root, preds, subjects, images = _dataset(tmp_path)
    s0, s1 = "FaMoS_180424_03335_TA", "FaMoS_180426_03336_TA"
    corrupt = preds / s0 / "multiview_expressions" / "IMG_0102.obj"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    bad_lmk = preds / s1 / "selfie" / "IMG_0202.npy"
    np.save(bad_lmk, np.zeros((68, 3), np.float32))
    nan_mesh = preds / s1 / "multiview_expressions" / "IMG_0203.obj"
    nan_mesh.write_text("v nan 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    # extra entries: a missing prediction, a degenerate mesh, a subject whose scan misses the crop
    (preds / s0 / "selfie").mkdir()
    flat = preds / s0 / "selfie" / "IMG_0104.obj"
    flat.write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nv 3 0 0\nf 1 2 3\nf 2 3 4\n")
    np.save(preds / s0 / "selfie" / "IMG_0104.npy", np.random.default_rng(1).normal(size=(7, 3)).astype(np.float32))
    far = "FaMoS_999999_00000_TA"
    v, f, lm = subjects[s0]
    save_mesh(root / "scans" / far / "far.obj", v + 1000.0, f)
    (root / "scans_lmks_onlypp" / far).mkdir(parents=True)
    (root / "scans_lmks_onlypp" / far / "far.pp").write_text(
        (next((root / "scans_lmks_onlypp" / s0).glob("*.pp"))).read_text()
    )
    (preds / far / "selfie").mkdir(parents=True)
    save_mesh(preds / far / "selfie" / "IMG_9.obj", v, f)
    np.save(preds / far / "selfie" / "IMG_9.npy", lm)
    with open(root / "imagepathsvalidation.txt", "a") as fh:
        fh.write(f"{s0}/selfie/IMG_0103.jpg\n{s0}/selfie/IMG_0104.jpg\n{far}/selfie/IMG_9.jpg\n")

    rep = score_now(root, preds, device="cpu", out_dir=tmp_path / "out", plot=False)
    assert rep.num_missing == 1 and rep.missing == [f"{s0}/selfie/IMG_0103.jpg"]
    assert rep.num_images == 2 and rep.num_failed == 5
    reasons = {f.path: f.reason for f in rep.failures}
    assert "NUL bytes" in reasons[str(corrupt)] or "expected" in reasons[str(corrupt)]
    assert "shape (68, 3)" in reasons[str(bad_lmk)] and str(bad_lmk) in reasons[str(bad_lmk)]
    assert "NaN" in reasons[str(nan_mesh)]
    assert "degenerate" in reasons[str(flat)]
    assert "crop sphere" in reasons[str(root / "scans" / far / "far.obj")]
    assert [f.image.split("/")[-1] for f in rep.failures] == ["IMG_0102.jpg", "IMG_0202.jpg", "IMG_0203.jpg", "IMG_0104.jpg", "IMG_9.jpg"]
    assert all(d.max() < 1e-4 for d in rep.distances)  # the two good images still scored
    metrics = json.loads((tmp_path / "out" / "now_metrics.json").read_text())
    assert metrics["num_failed"] == 5 and len(metrics["failures"]) == 5
    assert metrics["per_challenge"]["selfie"]["num_failed"] == 3
    assert metrics["per_challenge"]["selfie"]["median"] is None  # nothing scored there: null, not NaN


def test_score_now_metrical_units(tmp_path: Path) -> None:
    root, preds, subjects, images = _dataset(tmp_path)
    # the predictions are in metres: metrical with unit m is exact, with unit mm the mesh is 1000x too small
    rep_m = score_now(root, preds, device="cpu", metrical=True, unit="m", challenge="multiview_neutral")
    assert rep_m.num_images == 2 and max(d.max() for d in rep_m.distances) < 1e-3
    rep_mm = score_now(root, preds, device="cpu", metrical=True, unit="mm", challenge="multiview_neutral")
    assert np.median(np.hstack(rep_mm.distances)) > 10.0
    with pytest.raises(ValueError, match="unit"):
        score_now(root, preds, metrical=True, unit="inch")
    with pytest.raises(ValueError, match="does not occur"):
        score_now(root, preds, challenge="multiview_occlusions")


def test_eval_now_script_end_to_end(tmp_path: Path) -> None:
    root, preds, subjects, images = _dataset(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, str(REPO / "scripts" / "eval_now.py"), f"now.root={root}", f"now.predictions={preds}",
           "device=cpu", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    metrics = json.loads((out / "now_metrics.json").read_text())
    dist = np.load(out / "RECON_computed_distances.npy", allow_pickle=True).item()
    assert set(dist) == {"computed_distances", "num_missing_files", "input_files"}
    assert dist["num_missing_files"] == 0 and metrics["num_missing"] == 0 and metrics["num_failed"] == 0
    cd = dist["computed_distances"]
    assert metrics["num_images"] == len(cd) == len(images)
    # image-list order, cropped-scan order, unshuffled: lengths follow the subjects' crops
    crops = {n: crop_scan(v, lm) for n, (v, _, lm) in subjects.items()}
    assert [len(d) for d in cd] == [len(crops[s]) for s, *_ in images]
    assert [Path(p).stem for p in dist["input_files"]] == [n for _, _, n, _, _ in images]
    assert all(cd[i].max() < 1e-4 for i in range(4)) and np.median(cd[4]) > 0.3
    # the odd image is recomputed independently through the Python API: same per-vertex values and order
    s, c, n = images[4][:3]
    v, f, lm = subjects[s]
    pv, pf, pl = synthetic_head(n_lat=24, n_lon=24, params=PRED_PARAMS)
    rv = [0.4, -0.2, 0.05]
    d4 = now_distances(v, lm, _similar(pv, 0.001, rv, [0, 0.1, 0]), pf, _similar(pl, 0.001, rv, [0, 0.1, 0]).astype(np.float32))
    np.testing.assert_allclose(cd[4], d4, atol=1e-9)
    allv = np.hstack(cd)
    assert metrics["median"] == pytest.approx(np.median(allv)) and metrics["mean"] == pytest.approx(np.mean(allv))
    assert metrics["std"] == pytest.approx(np.std(allv))
    assert set(metrics["per_challenge"]) == {"multiview_neutral", "multiview_expressions", "selfie"}
    ex = np.hstack([cd[1], cd[4]])
    assert metrics["per_challenge"]["multiview_expressions"]["median"] == pytest.approx(np.median(ex))
    mm = (out / "RECON_computed_distances.npy.meanmedian").read_text().splitlines()
    assert float(mm[0]) == pytest.approx(np.median(allv)) and float(mm[1]) == pytest.approx(np.mean(allv))
    assert (out / "cumulative_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # challenge filter: official file name suffix; a failure gives exit code 1
    (preds / images[3][0] / "selfie" / "IMG_0202.obj").write_text("v 0 0 0\n")
    out2 = tmp_path / "run2"
    cmd2 = cmd[:-1] + ["now.challenge=selfie", f"hydra.run.dir={out2}"]
    proc2 = subprocess.run(cmd2, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 1, proc2.stdout + proc2.stderr
    assert "Traceback" not in proc2.stderr + proc2.stdout  # a clean failure exit, not a crash
    assert (out2 / "cumulative_errors.png").is_file()
    m2 = json.loads((out2 / "now_metrics.json").read_text())
    assert m2["num_failed"] == 1 and m2["num_images"] == 0 and "IMG_0202.obj" in m2["failures"][0]["path"]
    assert (out2 / "RECON_computed_distances_selfie.npy").is_file()
