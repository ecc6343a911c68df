"""A procedural FLAME-format head model, written in the official file formats.

Nothing licensed can be downloaded here, so every code path runs on this stand-in: a closed head surface
(5042 vertices, 10080 triangles; FLAME has 5023 / 9976) with a nose, eye sockets and eyeballs, brows,
cheekbones, lips and a mouth line, a chin, ears and a neck; 300 smooth shape components and 100
face-localised expression components with FLAME-like scales (coefficient 1 on the first shape component
moves the surface by ~5 mm RMS, the 300th by ~0.017 mm); five joints (global, neck, jaw, left and right eye)
with skinning weights, so the jaw opens the mouth region; pose-corrective blend shapes; a 68-point landmark
embedding (and its 51-point static subset) and the FLAME_masks regions.

Coordinates follow FLAME: metres, y up, the face looks along +z, the subject's left eye at +x.
Everything is a deterministic function of the seed.
"""
from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np

from ofer.synthetic.render import vertex_normals as _vertex_normals

__all__ = ["make_head_model", "write_flame_files", "LANDMARKS_68_XY", "N_RINGS", "N_SEGMENTS"]

N_RINGS = 70  # latitude rings between the poles
N_SEGMENTS = 72  # vertices per ring
HEAD_CENTRE = np.array([0.0, 0.01, -0.01])
HEAD_AXES = np.array([0.078, 0.108, 0.095])  # half width, half height, half depth (metres)


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss2(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def _sphere_grid() -> tuple[np.ndarray, np.ndarray]:
    """Unit directions (V,3) of a lat-long grid with two poles, and its faces (F,3) oriented outwards."""
    theta = np.linspace(0.0, np.pi, N_RINGS + 2)[1:-1]  # polar angle from +y
    phi = np.linspace(0.0, 2 * np.pi, N_SEGMENTS, endpoint=False)  # 0 = +z (the face)
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    dirs = np.stack([np.sin(th) * np.sin(ph), np.cos(th), np.sin(th) * np.cos(ph)], -1).reshape(-1, 3)
    dirs = np.concatenate([[[0.0, 1.0, 0.0]], dirs, [[0.0, -1.0, 0.0]]])
    top, bottom = 0, dirs.shape[0] - 1

    def vid(r: int, s: int) -> int:
        return 1 + r * N_SEGMENTS + (s % N_SEGMENTS)

    faces = []
    for s in range(N_SEGMENTS):
        faces.append([top, vid(0, s), vid(0, s + 1)])
        faces.append([bottom, vid(N_RINGS - 1, s + 1), vid(N_RINGS - 1, s)])
    for r in range(N_RINGS - 1):
        for s in range(N_SEGMENTS):
            a, b, c, d = vid(r, s), vid(r, s + 1), vid(r + 1, s), vid(r + 1, s + 1)
            faces += [[a, c, b], [b, c, d]]
    faces = np.asarray(faces, dtype=np.int64)
    # Orient outwards: the normal of a face must point away from the centre.
    v = dirs[faces]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    flip = (n * v.mean(1)).sum(-1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    return dirs, faces


def _base_surface(dirs: np.ndarray) -> np.ndarray:
    """Ellipsoid head, narrowed and stretched into a neck below the jaw, plus facial features."""
    r = 1.0 / np.sqrt(((dirs / HEAD_AXES) ** 2).sum(-1))
    p = HEAD_CENTRE + r[:, None] * dirs
    # Neck: below the jaw, pull towards a cylinder and extend downwards.
    t = _smoothstep(-0.04, -0.095, p[:, 1])
    p[:, 0] *= 1.0 - 0.35 * t
    p[:, 2] = (p[:, 2] + 0.02) * (1.0 - 0.35 * t) - 0.02
    p[:, 1] -= 0.05 * t ** 1.5
    x, y = p[:, 0], p[:, 1]
    front = _smoothstep(0.0, 0.45, dirs[:, 2]) * (1.0 - t)
    side = _smoothstep(0.55, 0.85, np.abs(dirs[:, 0]))
    h = np.zeros(len(p))
    # Nose: a ridge from the bridge (y=0.03) to the tip (y=-0.008), dropping below the tip.
    tip_profile = np.interp(y, [-0.03, -0.018, -0.008, 0.01, 0.03, 0.045], [0.0, 0.008, 0.022, 0.014, 0.004, 0.0])
    width = np.interp(y, [-0.02, -0.008, 0.03], [0.013, 0.011, 0.006])
    h += tip_profile * np.exp(-0.5 * (x / width) ** 2)
    for sx in (-1.0, 1.0):
        h -= 0.009 * _gauss2(x, y, sx * 0.032, 0.03, 0.016, 0.010)  # eye socket
        h += 0.007 * _gauss2(x, y, sx * 0.032, 0.03, 0.0075, 0.0065)  # eyeball
        h += 0.004 * _gauss2(x, y, sx * 0.048, 0.0, 0.014, 0.012)  # cheekbone
    h += 0.004 * np.exp(-0.5 * ((y - 0.048) / 0.006) ** 2) * np.exp(-0.5 * (x / 0.04) ** 2)  # brow ridge
    h += 0.004 * _gauss2(x, y, 0.0, -0.04, 0.02, 0.008)  # lips
    h -= 0.003 * _gauss2(x, y, 0.0, -0.041, 0.018, 0.0015)  # mouth line
    h += 0.005 * _gauss2(x, y, 0.0, -0.078, 0.02, 0.012)  # chin
    p += (front * h)[:, None] * dirs
    # Ears: bumps on the sides at eye height, slightly behind the centre.
    ear = side * _gauss2(p[:, 1], p[:, 2], 0.01, -0.015, 0.018, 0.01)
    p[:, 0] += 0.012 * ear * np.sign(p[:, 0])
    return p


def _orthonormal_fields(fields: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fields (V,3,K) -> orthogonal (in R^{3V}) fields whose per-vertex RMS displacement is `scales`."""
    V, _, K = fields.shape
    q, _ = np.linalg.qr(fields.reshape(V * 3, K))
    return (q * np.sqrt(V) * scales).reshape(V, 3, K)


def _rbf_fields(rng: np.random.Generator, anchors: np.ndarray, normals: np.ndarray, widths: np.ndarray,
                weight: np.ndarray, n_centres: int = 3) -> np.ndarray:
    """Smooth random displacement fields (V,3,K): sums of Gaussian bumps of the given widths, mostly along
    the normal, multiplied by a per-vertex weight."""
    V = anchors.shape[0]
    K = len(widths)
    out = np.zeros((V, 3, K))
    pool = np.flatnonzero(weight > 0.05)
    for k, w in enumerate(widths):
        centres = anchors[rng.choice(pool, size=n_centres)]
        amp = rng.normal(size=n_centres)
        d2 = ((anchors[:, None, :] - centres[None]) ** 2).sum(-1)  # (V,c)
        s = (np.exp(-0.5 * d2 / w ** 2) * amp).sum(-1) * weight
        tangential = rng.normal(size=3) * 0.3
        out[:, :, k] = s[:, None] * (normals + tangential)
    return out


# 68 iBUG landmarks as frontal (x, y) targets in metres; the subject's right is -x (iBUG 36-41 = right eye).
def _landmarks_xy() -> np.ndarray:
    jaw = [(0.066 * np.cos(a), 0.015 + 0.092 * np.sin(a)) for a in np.linspace(np.pi * 1.03, np.pi * 1.97, 17)]
    r_brow = [(-0.055, 0.042), (-0.045, 0.048), (-0.034, 0.05), (-0.023, 0.049), (-0.013, 0.046)]
    l_brow = [(-x, y) for x, y in reversed(r_brow)]
    nose = [(0.0, 0.028), (0.0, 0.017), (0.0, 0.006), (0.0, -0.005)]
    nostrils = [(-0.012, -0.016), (-0.006, -0.018), (0.0, -0.019), (0.006, -0.018), (0.012, -0.016)]
    r_eye = [(-0.047, 0.03), (-0.037, 0.035), (-0.026, 0.035), (-0.017, 0.03), (-0.026, 0.026), (-0.037, 0.026)]
    l_eye = [(0.017, 0.03), (0.026, 0.035), (0.037, 0.035), (0.047, 0.03), (0.037, 0.026), (0.026, 0.026)]
    mouth = [(-0.025, -0.04), (-0.016, -0.034), (-0.006, -0.032), (0.0, -0.033), (0.006, -0.032),
             (0.016, -0.034), (0.025, -0.04), (0.016, -0.047), (0.006, -0.05), (0.0, -0.05), (-0.006, -0.05),
             (-0.016, -0.047)]
    inner = [(-0.02, -0.04), (-0.008, -0.038), (0.0, -0.038), (0.008, -0.038), (0.02, -0.04), (0.008, -0.042),
             (0.0, -0.042), (-0.008, -0.042)]
    pts = np.asarray(jaw + r_brow + l_brow + nose + nostrils + r_eye + l_eye + mouth + inner, dtype=np.float64)
    assert pts.shape == (68, 2)
    return pts


LANDMARKS_68_XY = _landmarks_xy()


def _embed_landmarks(v: np.ndarray, f: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cast rays along -z at each (x, y); return the front-most hit face and its barycentric coordinates."""
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    d = np.array([0.0, 0.0, -1.0])
    e1, e2 = b - a, c - a
    pvec = np.cross(d, e2)
    det = (e1 * pvec).sum(-1)
    ok = np.abs(det) > 1e-14
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    idx, bary = [], []
    for x, y in xy:
        o = np.array([x, y, 1.0])
        tvec = o - a
        u = (tvec * pvec).sum(-1) * inv
        q = np.cross(tvec, e1)
        w = (q * d).sum(-1) * inv
        t = (q * e2).sum(-1) * inv
        hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 0)
        if not hit.any():
            raise RuntimeError(f"landmark ray at ({x}, {y}) misses the synthetic head")
        k = np.flatnonzero(hit)[np.argmin(t[hit])]
        idx.append(k)
        bary.append([1.0 - u[k] - w[k], u[k], w[k]])
    return np.asarray(idx, dtype=np.int64), np.asarray(bary)


def make_head_model(seed: int = 0) -> dict:
    """Build the synthetic head. Returns a dict with the FLAME model arrays (`model`), the 68-point
    embedding (`lmk_faces_idx`, `lmk_bary`) and `masks` (region -> vertex indices)."""
    rng = np.random.default_rng(seed)
    dirs, faces = _sphere_grid()
    v = _base_surface(dirs)
    normals = _vertex_normals(v, faces)
    V = v.shape[0]
    x, y, z = v.T
    front = _smoothstep(0.0, 0.45, dirs[:, 2])
    neck_t = _smoothstep(-0.04, -0.095, y)

    # Shape: 300 smooth components over the whole head, low frequencies first, ~5 mm -> ~0.017 mm RMS (scale 5 mm / k).
    K_shape = 300
    widths = 0.1 * (np.arange(1, K_shape + 1) ** -0.4)
    shape_fields = _rbf_fields(rng, v, normals, widths, np.ones(V), n_centres=4)
    shapedirs = _orthonormal_fields(shape_fields, 0.005 * np.arange(1, K_shape + 1) ** -1.0)

    # Expression: 100 components localised on the face; a few named ones first.
    face_w = front * (1.0 - neck_t) * _smoothstep(0.075, 0.05, np.abs(x)) * _smoothstep(0.075, 0.055, y)
    named = np.zeros((V, 3, 5))
    named[:, 1, 0] = -_gauss2(x, y, 0.0, -0.06, 0.03, 0.02) * face_w  # lower lip / chin down
    for sx in (-1.0, 1.0):  # smile: mouth corners up and out
        g = _gauss2(x, y, sx * 0.025, -0.04, 0.01, 0.008) * face_w
        named[:, 0, 1] += sx * g
        named[:, 1, 1] += g
        named[:, 1, 2] += _gauss2(x, y, sx * 0.035, 0.048, 0.015, 0.006) * face_w  # brows up
        named[:, 1, 3] -= _gauss2(x, y, sx * 0.032, 0.033, 0.01, 0.004) * face_w  # upper lids down
    named[:, 2, 4] = _gauss2(x, y, 0.0, -0.041, 0.015, 0.008) * face_w  # pucker
    K_exp = 100
    rand_exp = _rbf_fields(rng, v, normals, 0.03 * np.arange(1, K_exp - 4) ** -0.35, face_w, n_centres=2)
    exp_fields = np.concatenate([named, rand_exp], axis=-1)
    expdirs = _orthonormal_fields(exp_fields, np.ones(K_exp))
    # Expression moves only the face: keep the rest exactly still, and set each component's RMS over the
    # moving region (~2 mm for the first, decaying) so that N(0,1) coefficients give a few mm overall.
    active = face_w > 1e-3
    expdirs *= active[:, None, None]
    rms = np.sqrt((expdirs[active] ** 2).sum(1).mean(0))
    expdirs *= 0.002 * np.arange(1, K_exp + 1) ** -0.7 / rms.clip(1e-12)

    # Joints: root (bottom of the neck), neck, jaw hinge (between the two sides below the ears), eyes.
    J_regressor = np.zeros((5, V))

    def mean_of(mask: np.ndarray) -> np.ndarray:
        if mask.sum() < 3:
            raise RuntimeError("synthetic head: a joint region is empty")
        return mask / mask.sum()

    J_regressor[0] = mean_of(y < y.min() + 0.012)
    J_regressor[1] = mean_of(np.abs(y - (-0.075)) < 0.006)
    J_regressor[2] = mean_of((np.abs(x) > 0.055) & (np.abs(y + 0.015) < 0.012) & (np.abs(z + 0.005) < 0.015))
    left_eye = _gauss2(x, y, 0.032, 0.03, 0.0075, 0.0065) * front > 0.5
    right_eye = _gauss2(x, y, -0.032, 0.03, 0.0075, 0.0065) * front > 0.5
    J_regressor[3] = mean_of(left_eye)
    J_regressor[4] = mean_of(right_eye)

    weights = np.zeros((V, 5))
    w_root = _smoothstep(-0.11, -0.14, y)
    w_jaw = front * _smoothstep(-0.03, -0.05, y) * (1 - w_root) * _smoothstep(0.07, 0.045, np.abs(x))
    w_eyes = np.stack([left_eye, right_eye], 1) * 0.9
    weights[:, 0] = w_root
    weights[:, 2] = w_jaw * (1 - w_eyes.sum(1))
    weights[:, 3:] = w_eyes
    weights[:, 1] = 1.0 - weights.sum(1)

    # Pose correctives: small smooth fields near the jaw and neck (~0.5 mm per unit of (R - I)).
    pose_w = np.clip(w_jaw + _smoothstep(-0.05, -0.1, y), 0, 1)
    posedirs = _rbf_fields(rng, v, normals, np.full(36, 0.03), pose_w, n_centres=2)
    posedirs *= 0.0005 / np.sqrt((posedirs ** 2).sum(1).mean(0)).clip(1e-12)

    lmk_idx, lmk_bary = _embed_landmarks(v, faces, LANDMARKS_68_XY)

    fw = front * (1 - neck_t)
    masks = {
        "face": np.flatnonzero((fw > 0.5) & (np.abs(x) < 0.06) & (y > -0.088) & (y < 0.058)),
        "nose": np.flatnonzero((fw > 0.5) & (np.abs(x) < 0.016) & (y > -0.022) & (y < 0.035)),
        "lips": np.flatnonzero((fw > 0.5) & (np.abs(x) < 0.03) & (y > -0.054) & (y < -0.027)),
        "left_eye_region": np.flatnonzero((fw > 0.5) & (np.abs(x - 0.032) < 0.022) & (np.abs(y - 0.032) < 0.02)),
        "right_eye_region": np.flatnonzero((fw > 0.5) & (np.abs(x + 0.032) < 0.022) & (np.abs(y - 0.032) < 0.02)),
        "forehead": np.flatnonzero((fw > 0.3) & (y > 0.05) & (y < 0.095) & (np.abs(x) < 0.06)),
        "scalp": np.flatnonzero(((y > 0.07) & (fw < 0.5)) | ((dirs[:, 2] < -0.2) & (neck_t < 0.5))),
        "neck": np.flatnonzero(neck_t > 0.5),
        "boundary": np.flatnonzero(y < y.min() + 0.006),
        "left_ear": np.flatnonzero((x > 0.06) & (np.abs(y - 0.01) < 0.02) & (np.abs(z + 0.015) < 0.015)),
        "right_ear": np.flatnonzero((x < -0.06) & (np.abs(y - 0.01) < 0.02) & (np.abs(z + 0.015) < 0.015)),
        "left_eyeball": np.flatnonzero(left_eye),
        "right_eyeball": np.flatnonzero(right_eye),
    }
    masks["eye_region"] = np.union1d(masks["left_eye_region"], masks["right_eye_region"])
    for name, ids in masks.items():
        if ids.size == 0:
            raise RuntimeError(f"synthetic head: mask '{name}' is empty")

    model = {
        "v_template": v,
        "shapedirs": np.concatenate([shapedirs, expdirs], axis=-1),  # (V,3,400)
        "posedirs": posedirs,
        "J_regressor": J_regressor,
        "weights": weights,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "f": faces.astype(np.uint32),
    }
    return {"model": model, "lmk_faces_idx": lmk_idx, "lmk_bary": lmk_bary, "masks": masks}


class _FakeChumpyModule(types.ModuleType):
    """Context in which objects pickle as `chumpy.ch.Ch`, as in the official FLAME2020 file."""


def _chumpy_class() -> type:
    cls = type("Ch", (), {"__module__": "chumpy.ch"})
    return cls


def _pickle_with_chumpy(obj: dict, path: Path, chumpy_keys: tuple[str, ...]) -> None:
    Ch = _chumpy_class()
    pkg, mod = _FakeChumpyModule("chumpy"), _FakeChumpyModule("chumpy.ch")
    mod.Ch = Ch
    pkg.ch = mod
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    out = dict(obj)
    for k in chumpy_keys:
        c = Ch.__new__(Ch)
        c.__dict__.update({"x": np.asarray(obj[k]), "_dirty_vars": set()})
        out[k] = c
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = pkg, mod
    try:
        with open(path, "wb") as fh:
            pickle.dump(out, fh, protocol=2)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_flame_files(out_dir: str | Path, *, seed: int = 0, style: str = "flame2020") -> dict[str, Path]:
    """Write the synthetic head in the official formats into `out_dir`.

    style "flame2020": `generic_model.pkl` with chumpy objects (shapedirs, posedirs, v_template) and a
    scipy-sparse J_regressor, like the licensed file; "flame2023": plain arrays (`flame2023.pkl`);
    "npz": `generic_model.npz`. Always writes `landmark_embedding.npy` (DECA/MICA, 68 points),
    `flame_static_embedding.pkl` (51 points) and `FLAME_masks.pkl`. Returns the written paths by role.
    """
    import scipy.sparse as sp

    styles = ("flame2020", "flame2023", "npz")
    if style not in styles:
        raise ValueError(f"unknown style {style!r}; allowed: {styles}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    head = make_head_model(seed)
    m = head["model"]
    paths: dict[str, Path] = {}
    if style == "npz":
        paths["model"] = out_dir / "generic_model.npz"
        np.savez(paths["model"], **m)
    elif style == "flame2020":
        paths["model"] = out_dir / "generic_model.pkl"
        obj = dict(m, J_regressor=sp.csc_matrix(m["J_regressor"]), bs_style="lbs", bs_type="lrotmin")
        _pickle_with_chumpy(obj, paths["model"], ("shapedirs", "posedirs", "v_template"))
    else:
        paths["model"] = out_dir / "flame2023.pkl"
        with open(paths["model"], "wb") as fh:
            pickle.dump(dict(m, J_regressor=sp.csc_matrix(m["J_regressor"])), fh, protocol=2)
    paths["landmarks"] = out_dir / "landmark_embedding.npy"
    static = slice(17, 68)
    np.save(paths["landmarks"], {
        "full_lmk_faces_idx": head["lmk_faces_idx"][None],  # (1,68) as in DECA's file
        "full_lmk_bary_coords": head["lmk_bary"][None],  # (1,68,3)
        "static_lmk_faces_idx": head["lmk_faces_idx"][static],
        "static_lmk_bary_coords": head["lmk_bary"][static],
    }, allow_pickle=True)
    paths["static_landmarks"] = out_dir / "flame_static_embedding.pkl"
    with open(paths["static_landmarks"], "wb") as fh:
        pickle.dump({"lmk_face_idx": head["lmk_faces_idx"][static].astype(np.uint32),
                     "lmk_b_coords": head["lmk_bary"][static]}, fh, protocol=2)
    paths["masks"] = out_dir / "FLAME_masks.pkl"
    with open(paths["masks"], "wb") as fh:
        pickle.dump(head["masks"], fh, protocol=2)
    return paths
