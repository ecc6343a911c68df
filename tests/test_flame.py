"""FLAME layer: agreement with smplx's independent FLAME, closed-form checks, file formats, bad input."""
from __future__ import annotations

import pickle
import shutil
import sys

import numpy as np
import pytest
import torch

from ofer.flame import FLAME, FlameModelError, NOW_LANDMARKS_68, batch_rodrigues, load_flame_model
from ofer.synthetic.head import write_flame_files


def _random_inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = torch.randn(B, 300, generator=g)
    exp = torch.randn(B, 100, generator=g)
    pose = 0.3 * torch.randn(B, 15, generator=g)
    return shape, exp, pose


def test_matches_smplx_flame(tmp_path, synthetic_flame):
    smplx = pytest.importorskip("smplx")
    # smplx reads FLAME_NEUTRAL.pkl with plain pickle (it would need chumpy for the 2020 file), so give it
    # the FLAME2023-style file with the same arrays.
    p = write_flame_files(tmp_path, style="flame2023")
    shutil.copy(p["model"], tmp_path / "FLAME_NEUTRAL.pkl")
    ref = smplx.FLAME(str(tmp_path), num_betas=300, num_expression_coeffs=100, use_face_contour=False,
                      batch_size=5)
    ours = FLAME(synthetic_flame.flame_model, landmark_path=synthetic_flame.static_landmarks)
    shape, exp, pose = _random_inputs(5)
    out_ref = ref(betas=shape, expression=exp, global_orient=pose[:, 0:3], neck_pose=pose[:, 3:6],
                  jaw_pose=pose[:, 6:9], leye_pose=pose[:, 9:12], reye_pose=pose[:, 12:15],
                  transl=torch.zeros(5, 3))
    out = ours(shape, exp, pose)
    # float32 agreement: vertices are ~0.1 m, so 1e-6 m is ~1e-5 relative.
    torch.testing.assert_close(out.vertices, out_ref.vertices, atol=2e-6, rtol=0)
    # smplx appends the 51 static landmarks after the 5 joints.
    torch.testing.assert_close(out.landmarks, out_ref.joints[:, 5:], atol=2e-6, rtol=0)
    torch.testing.assert_close(out.joints, out_ref.joints[:, :5], atol=2e-6, rtol=0)
    # The test must be able to fail: a wrong jaw sign changes the mesh by far more than the tolerance.
    bad = pose.clone()
    bad[:, 6:9] *= -1
    assert (ours(shape, exp, bad).vertices - out_ref.vertices).abs().max() > 1e-3


def test_chumpy_pickle_loads_without_chumpy(synthetic_flame):
    assert "chumpy" not in sys.modules
    raw = synthetic_flame.flame_model.read_bytes()
    assert b"chumpy.ch" in raw  # the file really holds chumpy objects, as the official FLAME2020 does
    m = load_flame_model(synthetic_flame.flame_model)
    assert "chumpy" not in sys.modules
    assert m["shapedirs"].shape == (5042, 3, 400) and m["J_regressor"].shape == (5, 5042)


def test_formats_agree(tmp_path, synthetic_flame):
    ref = load_flame_model(synthetic_flame.flame_model)
    for style in ("flame2023", "npz"):
        p = write_flame_files(tmp_path / style, style=style)
        m = load_flame_model(p["model"])
        for k in ref:
            np.testing.assert_array_equal(m[k], ref[k], err_msg=f"{style}:{k}")


def test_global_rotation_is_rigid_about_root(flame):
    # Closed form: with only the global rotation R set, every vertex moves as R (v - j0) + j0.
    shape, exp, _ = _random_inputs(3, seed=1)
    pose = torch.zeros(3, 15)
    pose[:, :3] = torch.tensor([[0.3, -0.2, 0.5], [0.0, 1.0, 0.0], [1e-9, 0.0, 0.0]])
    rest = flame(shape, exp)
    posed = flame(shape, exp, pose)
    R = batch_rodrigues(pose[:, :3].double()).float()
    j0 = rest.joints[:, :1]
    expect = torch.einsum("bij,bvj->bvi", R, rest.vertices - j0) + j0
    torch.testing.assert_close(posed.vertices, expect, atol=2e-6, rtol=0)


def test_rodrigues_closed_form():
    r = torch.tensor([[0.0, 0.0, np.pi / 2], [0.0, 0.0, 0.0], [1e-7, 0.0, 0.0]], dtype=torch.float64)
    R = batch_rodrigues(r)
    torch.testing.assert_close(R[0], torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
                                                  dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(R[1], torch.eye(3, dtype=torch.float64))
    assert abs(R[2, 2, 1].item() - 1e-7) < 1e-15


def test_zero_pose_and_shape_vertices(flame):
    shape, _, _ = _random_inputs(2, seed=2)
    torch.testing.assert_close(flame(shape).vertices, flame.shape_vertices(shape), atol=1e-7, rtol=0)


def test_landmarks_static_and_full_agree(synthetic_flame, flame):
    static = FLAME(synthetic_flame.flame_model, landmark_path=synthetic_flame.static_landmarks)
    shape, exp, pose = _random_inputs(2, seed=3)
    a = flame(shape, exp, pose)
    b = static(shape, exp, pose)
    assert a.landmarks68.shape == (2, 68, 3)
    torch.testing.assert_close(a.now_landmarks(), b.now_landmarks())
    torch.testing.assert_close(a.now_landmarks(), a.landmarks[:, list(NOW_LANDMARKS_68)])
    # NoW order: right eye (-x) outer, inner; left eye inner, outer; nose; right, left mouth corner.
    x = flame(torch.zeros(1, 300)).now_landmarks()[0, :, 0]
    assert x[0] < x[1] < 0 < x[2] < x[3] and x[5] < 0 < x[6]


def test_jaw_moves_only_lower_face(flame):
    pose = torch.zeros(1, 15)
    pose[0, 6] = 0.3
    d = (flame(torch.zeros(1, 300), pose=pose).vertices - flame(torch.zeros(1, 300)).vertices).norm(dim=-1)[0]
    forehead = flame.face_mask("forehead")
    lips = flame.face_mask("lips")
    assert d[forehead].max() < 1e-6
    assert d[lips].max() > 5e-3  # the mouth opens by millimetres


def test_synthetic_scales_resemble_flame(flame):
    g = torch.Generator().manual_seed(0)
    base = flame(torch.zeros(1, 300)).vertices
    disp = (flame(torch.randn(64, 300, generator=g)).vertices - base).norm(dim=-1)
    rms_mm = disp.pow(2).mean().sqrt().item() * 1000
    assert 2.0 < rms_mm < 20.0
    extent = base[0].max(0).values - base[0].min(0).values
    assert 0.15 < extent[0].item() < 0.22 and 0.2 < extent[1].item() < 0.32  # a head, in metres


# ------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------

def test_missing_model_file_names_path_and_source(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FLAME(tmp_path / "nope.pkl")
    assert "nope.pkl" in str(err.value) and "flame.is.tue.mpg.de" in str(err.value)


def _write_pkl(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)
    return path


def test_missing_key_and_wrong_shape(tmp_path, synthetic_flame):
    m = load_flame_model(synthetic_flame.flame_model)
    bad = dict(m)
    del bad["posedirs"]
    with pytest.raises(FlameModelError, match="posedirs"):
        FLAME(_write_pkl(tmp_path / "a.pkl", bad))
    bad = dict(m, weights=m["weights"][:, :4])
    with pytest.raises(FlameModelError, match=r"'weights' has shape \(5042, 4\)"):
        FLAME(_write_pkl(tmp_path / "b.pkl", bad))


def test_unreadable_and_truncated(tmp_path, synthetic_flame):
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(FlameModelError, match="empty.pkl"):
        FLAME(tmp_path / "empty.pkl")
    data = synthetic_flame.flame_model.read_bytes()
    (tmp_path / "trunc.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(FlameModelError, match="trunc.pkl"):
        FLAME(tmp_path / "trunc.pkl")


def test_too_many_components(synthetic_flame):
    with pytest.raises(FlameModelError, match="n_shape=301"):
        FLAME(synthetic_flame.flame_model, n_shape=301)
    with pytest.raises(FlameModelError, match="n_exp=101"):
        FLAME(synthetic_flame.flame_model, n_exp=101)


def test_nan_and_wrong_width_inputs(flame):
    shape = torch.zeros(2, 300)
    shape[1, 5] = float("nan")
    with pytest.raises(ValueError, match="'shape' contains NaN"):
        flame(shape)
    with pytest.raises(ValueError, match=r"'expression' must have shape \(2, 100\)"):
        flame(torch.zeros(2, 300), torch.zeros(2, 50))
    pose = torch.zeros(2, 15)
    pose[0, 0] = float("inf")
    with pytest.raises(ValueError, match="'pose' contains NaN or inf"):
        flame(torch.zeros(2, 300), pose=pose)


def test_fewer_components_and_batch_one(synthetic_flame):
    f = FLAME(synthetic_flame.flame_model, n_shape=100, n_exp=50)
    out = f(torch.randn(1, 100), torch.randn(1, 50), torch.zeros(1, 15))
    assert out.vertices.shape == (1, 5042, 3) and out.landmarks is None
