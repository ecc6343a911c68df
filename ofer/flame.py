"""FLAME as a stateless layer: pure functions for blend shapes, skinning and landmarks, and a thin module
that holds the model arrays as buffers.

Reads the official files: FLAME2020 `generic_model.pkl` (pickled with chumpy objects; chumpy is not
needed), FLAME2023 `flame2023.pkl`, an `.npz` with the same keys, DECA/MICA `landmark_embedding.npy`
(68 points), `flame_static_embedding.pkl` (51 points) and `FLAME_masks.pkl`. FLAME works in metres; the
NoW benchmark and our exports use millimetres (`MM_PER_M`).

Shapes: B batch, V vertices (5023 for FLAME), J = 5 joints (global, neck, jaw, left eye, right eye).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ofer.io import SafeLoadError, safe_load_npy_object, safe_load_pickle

__all__ = [
    "FLAME", "FlameOutput", "FlameModelError", "load_flame_model", "load_landmark_embedding",
    "load_masks", "batch_rodrigues", "blend_shapes", "vertices2joints", "batch_rigid_transform", "lbs",
    "vertices2landmarks", "NOW_LANDMARKS_68", "MM_PER_M", "NUM_JOINTS", "POSE_DIM",
]

MM_PER_M = 1000.0
NUM_JOINTS = 5
POSE_DIM = 3 * NUM_JOINTS  # axis-angle: global, neck, jaw, left eye, right eye
# NoW's 7 points as 68-point (iBUG) indices: outer/inner right eye, inner/outer left eye, nose bottom,
# right/left mouth corner (now_protocol.md; NoW README).
NOW_LANDMARKS_68 = (36, 39, 42, 45, 33, 48, 54)
# flame_static_embedding.pkl holds points 17..67 of the 68 (no jaw contour).
STATIC_EMBEDDING_FIRST = 17

WHERE_TO_GET_FLAME = (
    "FLAME is licensed and cannot be downloaded by this project: register at https://flame.is.tue.mpg.de, "
    "download FLAME2020 (generic_model.pkl) or FLAME2023 (flame2023.pkl), place it under data/FLAME/ "
    "and set paths.flame_model (see data/README.md). `python scripts/make_synthetic.py` writes a "
    "synthetic model in the same format for trying the code without it."
)


class FlameModelError(ValueError):
    """A FLAME-related file is missing, unreadable or malformed; the message names the file and key."""


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

def _dense(x: object) -> np.ndarray:
    if hasattr(x, "toarray"):  # scipy sparse J_regressor in the official files
        return np.asarray(x.toarray())
    return np.asarray(x)


def load_flame_model(path: str | Path) -> dict[str, np.ndarray]:
    """Read a FLAME model file (.pkl, chumpy or plain, or .npz) into checked float64/int64 arrays.

    Returns keys v_template (V,3), shapedirs (V,3,K), posedirs (V,3,36), J_regressor (J,V) dense,
    weights (V,J), kintree_table (2,J), f (F,3).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME model file not found: {path}. {WHERE_TO_GET_FLAME}")
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                raw = {k: z[k] for k in z.files}
        else:
            raw = safe_load_pickle(path)
    except (SafeLoadError, OSError, ValueError) as err:
        raise FlameModelError(f"cannot read FLAME model {path}: {err}") from None
    if not isinstance(raw, dict):
        raise FlameModelError(f"{path}: expected a dict of FLAME arrays, found {type(raw).__name__}")

    required = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
    missing = [k for k in required if k not in raw]
    if missing:
        raise FlameModelError(f"{path}: missing key(s) {missing}; found {sorted(raw)}")
    try:
        m = {k: _dense(raw[k]) for k in required}
    except (TypeError, ValueError) as err:
        raise FlameModelError(f"{path}: cannot convert FLAME arrays ({err})") from None

    V = m["v_template"].shape[0] if m["v_template"].ndim == 2 else -1
    J = m["kintree_table"].shape[-1] if m["kintree_table"].ndim == 2 else -1
    if m["shapedirs"].ndim == 2:  # (V*3, K) variant
        m["shapedirs"] = m["shapedirs"].reshape(V, 3, -1)
    if m["posedirs"].ndim == 2:
        m["posedirs"] = m["posedirs"].reshape(V, 3, -1)
    expected = {
        "v_template": (V, 3),
        "shapedirs": (V, 3, None),
        "posedirs": (V, 3, 9 * (J - 1)),
        "J_regressor": (J, V),
        "weights": (V, J),
        "kintree_table": (2, J),
        "f": (None, 3),
    }
    for key, shape in expected.items():
        found = m[key].shape
        ok = len(found) == len(shape) and all(e is None or e == f for e, f in zip(shape, found))
        if V <= 0 or J != NUM_JOINTS or not ok:
            want = tuple("K" if e is None else e for e in shape)
            raise FlameModelError(
                f"{path}: key '{key}' has shape {found}, expected {want} (V vertices, {NUM_JOINTS} joints)"
            )
    out = {k: m[k].astype(np.float64) for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights")}
    out["kintree_table"] = m["kintree_table"].astype(np.int64)
    out["f"] = m["f"].astype(np.int64)
    if out["f"].min() < 0 or out["f"].max() >= V:
        raise FlameModelError(f"{path}: key 'f' indexes vertices outside [0, {V})")
    for k in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        if not np.isfinite(out[k]).all():
            raise FlameModelError(f"{path}: key '{k}' contains NaN or inf")
    return out


def load_landmark_embedding(path: str | Path) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Read a landmark embedding: DECA/MICA `landmark_embedding.npy` (68 points) or
    `flame_static_embedding.pkl` (51 points: 68-point indices 17..67).

    Returns (face indices (L,), barycentric coordinates (L,3), the 68-point index of each landmark).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark embedding not found: {path}. It ships with FLAME / DECA / MICA; "
                                "set paths.flame_landmarks (see data/README.md)")
    try:
        raw = safe_load_npy_object(path) if path.suffix == ".npy" else safe_load_pickle(path)
    except (SafeLoadError, OSError) as err:
        raise FlameModelError(f"cannot read landmark embedding {path}: {err}") from None
    if not isinstance(raw, dict):
        raise FlameModelError(f"{path}: expected a dict, found {type(raw).__name__}")
    if "full_lmk_faces_idx" in raw and "full_lmk_bary_coords" in raw:
        idx, bary = raw["full_lmk_faces_idx"], raw["full_lmk_bary_coords"]
        ids = tuple(range(68))
        keys = ("full_lmk_faces_idx", "full_lmk_bary_coords")
    elif "lmk_face_idx" in raw and "lmk_b_coords" in raw:
        idx, bary = raw["lmk_face_idx"], raw["lmk_b_coords"]
        ids = tuple(range(STATIC_EMBEDDING_FIRST, 68))
        keys = ("lmk_face_idx", "lmk_b_coords")
    else:
        raise FlameModelError(
            f"{path}: expected keys full_lmk_faces_idx/full_lmk_bary_coords (landmark_embedding.npy) or "
            f"lmk_face_idx/lmk_b_coords (flame_static_embedding.pkl); found {sorted(raw)}"
        )
    idx = np.asarray(idx).reshape(-1).astype(np.int64)
    bary = np.asarray(bary, dtype=np.float64).reshape(-1, 3)
    if idx.shape[0] != len(ids) or bary.shape[0] != len(ids):
        raise FlameModelError(f"{path}: keys {keys} have {idx.shape[0]} and {bary.shape[0]} entries, "
                              f"expected {len(ids)}")
    return idx, bary, ids


def load_masks(path: str | Path) -> dict[str, np.ndarray]:
    """Read `FLAME_masks.pkl`: region name -> vertex indices (int64)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLAME masks not found: {path}. FLAME_masks.pkl ships with FLAME2020 on "
                                "https://flame.is.tue.mpg.de; set paths.flame_masks (see data/README.md)")
    try:
        raw = safe_load_pickle(path)
    except (SafeLoadError, OSError) as err:
        raise FlameModelError(f"cannot read FLAME masks {path}: {err}") from None
    if not isinstance(raw, dict) or "face" not in raw:
        found = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise FlameModelError(f"{path}: expected a dict of regions including 'face'; found {found}")
    return {str(k): np.asarray(v).reshape(-1).astype(np.int64) for k, v in raw.items()}


# ----------------------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------------------

def batch_rodrigues(rvec: Tensor) -> Tensor:
    """Axis-angle (N,3) -> rotation matrices (N,3,3); exact at zero angle (Taylor branch)."""
    angle_sq = (rvec * rvec).sum(-1, keepdim=True)  # (N,1)
    angle = angle_sq.clamp_min(1e-24).sqrt()
    small = angle_sq < 1e-8
    # sin(a)/a and (1-cos(a))/a^2 with their series near 0.
    a = torch.where(small, 1.0 - angle_sq / 6.0, torch.sin(angle) / angle)
    b = torch.where(small, 0.5 - angle_sq / 24.0, (1.0 - torch.cos(angle)) / angle_sq.clamp_min(1e-24))
    x, y, z = rvec.unbind(-1)
    zero = torch.zeros_like(x)
    K = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=rvec.dtype, device=rvec.device)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def blend_shapes(coeffs: Tensor, dirs: Tensor) -> Tensor:
    """coeffs (B,K), dirs (V,3,K) -> offsets (B,V,3)."""
    return torch.einsum("bk,vck->bvc", coeffs, dirs)


def vertices2joints(J_regressor: Tensor, vertices: Tensor) -> Tensor:
    """J_regressor (J,V), vertices (B,V,3) -> joints (B,J,3)."""
    return torch.einsum("jv,bvc->bjc", J_regressor, vertices)


def batch_rigid_transform(rot_mats: Tensor, joints: Tensor, parents: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Forward kinematics.

    rot_mats (B,J,3,3) local rotations, joints (B,J,3) rest positions, parents[j] < j (parents[0] = -1).
    Returns posed joints (B,J,3) and transforms (B,J,4,4) that map rest-pose points to posed points.
    """
    B, J = joints.shape[:2]
    rel = joints.clone()
    rel[:, 1:] = joints[:, 1:] - joints[:, list(parents[1:])]
    local = torch.cat([rot_mats, rel.unsqueeze(-1)], dim=-1)  # (B,J,3,4)
    bottom = local.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(B, J, 1, 4)
    local = torch.cat([local, bottom], dim=-2)  # (B,J,4,4)
    chain = [local[:, 0]]
    for j in range(1, J):
        chain.append(chain[parents[j]] @ local[:, j])
    world = torch.stack(chain, dim=1)  # (B,J,4,4)
    posed_joints = world[:, :, :3, 3]
    # Remove the rest-pose joint location so the transform applies to rest-pose vertices.
    offset = (world[:, :, :3, :3] @ joints.unsqueeze(-1)).squeeze(-1)  # (B,J,3)
    transforms = world.clone()
    transforms[:, :, :3, 3] = world[:, :, :3, 3] - offset
    return posed_joints, transforms


def lbs(
    coeffs: Tensor, pose: Tensor, *, v_template: Tensor, shapedirs: Tensor, posedirs: Tensor,
    J_regressor: Tensor, parents: Sequence[int], lbs_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Linear blend skinning with shape/expression and pose-corrective blend shapes.

    coeffs (B,K) against shapedirs (V,3,K); pose (B,J*3) axis-angle; posedirs (P,V*3) with P = 9*(J-1).
    Returns vertices (B,V,3) and posed joints (B,J,3).
    """
    B = coeffs.shape[0]
    v_shaped = v_template.unsqueeze(0) + blend_shapes(coeffs, shapedirs)  # (B,V,3)
    joints = vertices2joints(J_regressor, v_shaped)
    J = joints.shape[1]
    rot_mats = batch_rodrigues(pose.reshape(-1, 3)).view(B, J, 3, 3)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rot_mats[:, 1:] - eye).reshape(B, -1)  # (B, 9*(J-1))
    v_posed = v_shaped + (pose_feature @ posedirs).view(B, -1, 3)
    posed_joints, transforms = batch_rigid_transform(rot_mats, joints, parents)
    T = torch.einsum("vj,bjmn->bvmn", lbs_weights, transforms)  # (B,V,4,4)
    verts = (T[..., :3, :3] @ v_posed.unsqueeze(-1)).squeeze(-1) + T[..., :3, 3]
    return verts, posed_joints


def vertices2landmarks(vertices: Tensor, faces: Tensor, lmk_faces_idx: Tensor, lmk_bary: Tensor) -> Tensor:
    """Barycentric landmarks: vertices (B,V,3), faces (F,3), lmk_faces_idx (L,), lmk_bary (L,3) -> (B,L,3)."""
    tri = vertices[:, faces[lmk_faces_idx]]  # (B,L,3,3): landmark, corner, xyz
    return (tri * lmk_bary[None, :, :, None]).sum(dim=2)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------

@dataclass
class FlameOutput:
    """FLAME output in metres. `landmarks` (B,L,3) follow `landmark_ids` (68-point iBUG indices)."""

    vertices: Tensor  # (B,V,3)
    joints: Tensor  # (B,5,3)
    landmarks: Tensor | None = None  # (B,L,3)
    landmark_ids: tuple[int, ...] = ()

    @property
    def landmarks68(self) -> Tensor:
        if self.landmarks is None or len(self.landmark_ids) != 68:
            raise ValueError("68 landmarks need the full embedding (landmark_embedding.npy); this model "
                             f"has {len(self.landmark_ids)} landmarks")
        return self.landmarks

    def now_landmarks(self) -> Tensor:
        """The 7 NoW landmarks (B,7,3) in NoW's order (see NOW_LANDMARKS_68)."""
        if self.landmarks is None:
            raise ValueError("no landmark embedding was given to FLAME (landmark_path)")
        pos = {lid: i for i, lid in enumerate(self.landmark_ids)}
        return self.landmarks[:, [pos[i] for i in NOW_LANDMARKS_68]]


class FLAME(nn.Module):
    """FLAME layer: `flame(shape, expression=None, pose=None) -> FlameOutput`.

    shape (B, n_shape); expression (B, n_exp) or None (zeros); pose (B, 15) axis-angle for global, neck,
    jaw, left eye, right eye, or None (zeros). Holds buffers only; a batch of 100 candidates is a batch.
    """

    def __init__(
        self, model_path: str | Path, *, n_shape: int = 300, n_exp: int = 100,
        landmark_path: str | Path | None = None, masks_path: str | Path | None = None,
        dtype: torch.dtype = torch.float32, check_finite: bool = True,
    ) -> None:
        super().__init__()
        m = load_flame_model(model_path)
        self.model_path = str(model_path)
        K = m["shapedirs"].shape[-1]
        # FLAME packs 300 shape then 100 expression components (2020 and 2023).
        n_shape_avail = min(300, K)
        n_exp_avail = K - n_shape_avail
        if n_shape > n_shape_avail or n_exp > n_exp_avail or n_shape < 1 or n_exp < 0:
            raise FlameModelError(
                f"{model_path}: asked for n_shape={n_shape}, n_exp={n_exp}; the model has {n_shape_avail} "
                f"shape and {n_exp_avail} expression components (shapedirs has {K})"
            )
        self.n_shape, self.n_exp = n_shape, n_exp
        self.check_finite = check_finite
        parents = m["kintree_table"][0].copy()
        parents[0] = -1
        if any(not (0 <= p < j) for j, p in enumerate(parents[1:], start=1)):
            raise FlameModelError(f"{model_path}: kintree_table parents {parents.tolist()} are not a tree "
                                  "in kinematic order")
        self.parents = [int(p) for p in parents]

        def buf(name: str, arr: np.ndarray, dt: torch.dtype = dtype) -> None:
            self.register_buffer(name, torch.as_tensor(np.ascontiguousarray(arr), dtype=dt), persistent=False)

        dirs = np.concatenate([m["shapedirs"][..., :n_shape], m["shapedirs"][..., 300:300 + n_exp]], axis=-1)
        buf("v_template", m["v_template"])
        buf("shapedirs", dirs)  # (V,3,n_shape+n_exp)
        P = m["posedirs"].shape[-1]
        buf("posedirs", m["posedirs"].reshape(-1, P).T)  # (P, V*3)
        buf("J_regressor", m["J_regressor"])
        buf("lbs_weights", m["weights"])
        buf("faces", m["f"], torch.long)

        self.landmark_ids: tuple[int, ...] = ()
        if landmark_path is not None:
            idx, bary, ids = load_landmark_embedding(landmark_path)
            if idx.min() < 0 or idx.max() >= m["f"].shape[0]:
                raise FlameModelError(f"{landmark_path}: landmark face indices outside [0, {m['f'].shape[0]})")
            buf("lmk_faces_idx", idx, torch.long)
            buf("lmk_bary", bary)
            self.landmark_ids = ids
        self.masks: dict[str, np.ndarray] = {}
        if masks_path is not None:
            self.masks = load_masks(masks_path)
            V = m["v_template"].shape[0]
            for k, v in self.masks.items():
                if v.size and (v.min() < 0 or v.max() >= V):
                    raise FlameModelError(f"{masks_path}: region '{k}' indexes vertices outside [0, {V})")

    @property
    def num_vertices(self) -> int:
        return int(self.v_template.shape[0])

    def face_mask(self, region: str = "face") -> Tensor:
        """Vertex indices (long) of a FLAME_masks region (default: the front face used by IdRank)."""
        if region not in self.masks:
            raise KeyError(f"mask region '{region}' not loaded; have {sorted(self.masks)} "
                           "(pass masks_path=FLAME_masks.pkl)")
        return torch.as_tensor(self.masks[region], dtype=torch.long, device=self.v_template.device)

    def _check(self, name: str, x: Tensor | None, width: int, B: int) -> Tensor:
        if x is None:
            return self.v_template.new_zeros(B, width)
        if x.ndim != 2 or x.shape[0] != B or x.shape[1] != width:
            raise ValueError(f"FLAME: '{name}' must have shape ({B}, {width}), got {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError(f"FLAME: '{name}' contains NaN or inf")
        return x.to(self.v_template.dtype)

    def forward(self, shape: Tensor, expression: Tensor | None = None, pose: Tensor | None = None) -> FlameOutput:
        if shape.ndim != 2:
            raise ValueError(f"FLAME: 'shape' must have shape (B, {self.n_shape}), got {tuple(shape.shape)}")
        B = shape.shape[0]
        shape = self._check("shape", shape, self.n_shape, B)
        expression = self._check("expression", expression, self.n_exp, B)
        pose = self._check("pose", pose, POSE_DIM, B)
        coeffs = torch.cat([shape, expression], dim=1)
        verts, joints = lbs(
            coeffs, pose, v_template=self.v_template, shapedirs=self.shapedirs, posedirs=self.posedirs,
            J_regressor=self.J_regressor, parents=self.parents, lbs_weights=self.lbs_weights,
        )
        lmks = None
        if self.landmark_ids:
            lmks = vertices2landmarks(verts, self.faces, self.lmk_faces_idx, self.lmk_bary)
        return FlameOutput(vertices=verts, joints=joints, landmarks=lmks, landmark_ids=self.landmark_ids)

    def shape_vertices(self, shape: Tensor, vertex_ids: Tensor | None = None) -> Tensor:
        """Neutral (zero expression and pose) vertices (B,V,3) for shape (B,n_shape): identity decoding
        without skinning (at zero pose LBS is the identity map, so this equals forward(shape).vertices).
        With `vertex_ids` (K,), only those vertices (B,K,3), computed from their rows alone."""
        if shape.ndim != 2 or shape.shape[1] != self.n_shape:
            raise ValueError(f"FLAME: 'shape' must have shape (B, {self.n_shape}), got {tuple(shape.shape)}")
        template, dirs = self.v_template, self.shapedirs[..., :self.n_shape]
        if vertex_ids is not None:
            idx = vertex_ids.to(template.device)
            template, dirs = template[idx], dirs[idx]
        return template + blend_shapes(shape.to(template.dtype), dirs)
