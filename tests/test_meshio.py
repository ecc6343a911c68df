"""Tests of `ofer.meshio`: hand-written files with known content, round trips, trimesh as an independent
reader, and bad inputs (each error must name the file)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import trimesh

from ofer.meshio import MeshIOError, load_mesh, read_landmarks, read_pp, save_mesh, write_pp


def _random_mesh(rng: np.random.Generator, n_v: int = 50, n_f: int = 80) -> tuple[np.ndarray, np.ndarray]:
    v = rng.normal(size=(n_v, 3)) * 37.0
    f = np.stack([rng.choice(n_v, 3, replace=False) for _ in range(n_f)]).astype(np.int64)
    return v, f


# ---------------------------------------------------------------------------------------------------
# OBJ
# ---------------------------------------------------------------------------------------------------


def test_obj_hand_written_tokens_polygons_negative_indices(tmp_path: Path) -> None:
    text = (
        "# comment\n"
        "mtllib x.mtl\n"
        "v 0 0 0\n"
        "  v 1 0 0   \n"  # leading whitespace
        "vt 0.5 0.5\n"
        "vn 0 0 1\n"
        "v 1 1 0\n"
        "v 0 1 0 # trailing comment\n"
        "g part\n"
        "f 1/1/1 2/1/1 3/1/1\n"  # v/vt/vn
        "f 1//1 3//1 4//1\n"  # v//vn
        "v 0.5 0.5 2\n"
        "f -5 -4 -1\n"  # relative: vertices 1, 2, 5 (1-based) at this point
        "f 1 2 3 4\n"  # quad -> fan (0,1,2), (0,2,3)
    )
    p = tmp_path / "m.obj"
    p.write_text(text)
    v, f = load_mesh(p)
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 2]])
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [0, 1, 4], [0, 1, 2], [0, 2, 3]])
    assert v.dtype == np.float64 and f.dtype == np.int64


def test_obj_fast_path_with_slashes_and_quads(tmp_path: Path) -> None:
    p = tmp_path / "q.obj"
    p.write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nv 2 0 0\nv 2 1 0\nf 1/1 2/2 3/3 4/4\nf 2/1 5/1 6/1 3/1\n")
    _, f = load_mesh(p)
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [1, 4, 5], [1, 5, 2]])


def test_obj_round_trip_exact_and_matches_trimesh(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    v, f = _random_mesh(rng)
    p = save_mesh(tmp_path / "sub" / "r.obj", v, f)
    v2, f2 = load_mesh(p)
    np.testing.assert_array_equal(v2, v)  # 17 significant digits: exact float64
    np.testing.assert_array_equal(f2, f)
    ref = trimesh.load(p, process=False, maintain_order=True)
    np.testing.assert_allclose(np.asarray(ref.vertices), v, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(ref.faces), f)
    assert [x.name for x in p.parent.iterdir()] == ["r.obj"]  # no temp file left behind


def test_save_scale(tmp_path: Path) -> None:
    v = np.array([[0.001, 0.002, -0.003], [0.0, 0.01, 0.0], [0.1, 0.0, 0.0]])
    f = np.array([[0, 1, 2]])
    for suffix in (".obj", ".ply"):
        v2, _ = load_mesh(save_mesh(tmp_path / f"s{suffix}", v, f, scale=1000.0))
        np.testing.assert_allclose(v2, v * 1000.0, rtol=1e-15)


# ---------------------------------------------------------------------------------------------------
# PLY
# ---------------------------------------------------------------------------------------------------


def test_ply_round_trip_and_trimesh_reads_ours(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    v, f = _random_mesh(rng)
    p = save_mesh(tmp_path / "r.ply", v, f)
    v2, f2 = load_mesh(p)
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(f2, f)
    ref = trimesh.load(p, process=False)
    np.testing.assert_array_equal(np.asarray(ref.vertices), v)
    np.testing.assert_array_equal(np.asarray(ref.faces), f)


def test_ply_written_by_trimesh_ascii_and_binary(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    v, f = _random_mesh(rng)
    mesh = trimesh.Trimesh(v, f, process=False)
    for enc in ("ascii", "binary"):
        p = tmp_path / f"t_{enc}.ply"
        p.write_bytes(trimesh.exchange.ply.export_ply(mesh, encoding=enc))
        v2, f2 = load_mesh(p)
        if enc == "binary":  # trimesh stores float32
            np.testing.assert_array_equal(v2, v.astype(np.float32).astype(np.float64))
        else:
            np.testing.assert_allclose(v2, v, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(f2, f)


def test_ply_ascii_hand_written_extra_properties_and_quad(tmp_path: Path) -> None:
    text = (
        "ply\nformat ascii 1.0\ncomment hi\n"
        "element vertex 4\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\n"
        "element face 2\nproperty list uchar int vertex_indices\nproperty uchar flag\n"
        "end_header\n"
        "0 0 0 255 0 0\n1 0 0 0 255 0\n1 1 0 0 0 255\n0 1 0 9 9 9\n"
        "4 0 1 2 3 7\n3 3 2 1 0\n"
    )
    p = tmp_path / "h.ply"
    p.write_text(text)
    v, f = load_mesh(p)
    np.testing.assert_array_equal(v, [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]])
    np.testing.assert_array_equal(f, [[0, 1, 2], [0, 2, 3], [3, 2, 1]])


def test_ply_binary_big_endian(tmp_path: Path) -> None:
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=">f4")
    header = (
        b"ply\nformat binary_big_endian 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
        b"property float z\nelement face 1\nproperty list uchar uint vertex_indices\nend_header\n"
    )
    face = np.array([3], ">u1").tobytes() + np.array([0, 1, 2], ">u4").tobytes()
    p = tmp_path / "be.ply"
    p.write_bytes(header + v.tobytes() + face)
    v2, f2 = load_mesh(p)
    np.testing.assert_array_equal(v2, v.astype(np.float64))
    np.testing.assert_array_equal(f2, [[0, 1, 2]])


# ---------------------------------------------------------------------------------------------------
# bad meshes
# ---------------------------------------------------------------------------------------------------

_TRI = "v 0 0 0\nv 1 0 0\nv 0 1 0\n"


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("empty.obj", b"", "empty file"),
        ("novert.obj", b"# nothing\n", "no vertices"),
        ("colour.obj", (_TRI + "v 1 1 1 0.5 0.5 0.5\nf 1 2 3\n").encode(), "vertex colours"),
        ("short.obj", (_TRI + "v 1 1\n").encode(), "expected exactly 3 coordinates"),
        ("bare_v.obj", (_TRI + "f 1 2 3\nv\n").encode(), "expected exactly 3 coordinates"),
        ("word.obj", (_TRI + "v 1 a 2\n").encode(), "cannot parse vertex"),
        ("nan.obj", (_TRI + "v nan 0 0\nf 1 2 3\n").encode(), "NaN"),
        ("inf.obj", (_TRI + "v 0 inf 0\nf 1 2 3\n").encode(), "NaN/infinite"),
        ("range.obj", (_TRI + "f 1 2 4\n").encode(), "out of range"),
        ("neg_range.obj", (_TRI + "f -1 -2 -4\n").encode(), "out of range"),
        ("zero.obj", (_TRI + "f 0 1 2\n").encode(), "face index 0"),
        ("twovert.obj", (_TRI + "f 1 2\n").encode(), "at least 3"),
        ("badtok.obj", (_TRI + "f 1 2 x3\n").encode(), "bad face token"),
        ("nofaces.obj", _TRI.encode(), "no faces"),
        ("nul.obj", b"v 0 0 0\x00\x01\x02", "NUL bytes"),
        ("mesh.stl", b"solid x\n", "unsupported mesh suffix"),
        ("notply.ply", b"hello world", "not a PLY file"),
        ("empty.ply", b"", "empty file"),
    ],
)
def test_bad_meshes_raise_naming_the_file(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(MeshIOError) as info:
        load_mesh(p)
    assert str(p) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MeshIOError, match="cannot read mesh file"):
        load_mesh(tmp_path / "nope.obj")


def test_scan_without_faces_allowed(tmp_path: Path) -> None:
    p = tmp_path / "cloud.obj"
    p.write_text(_TRI)
    v, f = load_mesh(p, require_faces=False)
    assert v.shape == (3, 3) and f.shape == (0, 3)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_truncated_files(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(3)
    v, f = _random_mesh(rng, 200, 300)
    full = save_mesh(tmp_path / f"full{suffix}", v, f).read_bytes()
    p = tmp_path / f"cut{suffix}"
    if suffix == ".obj":
        # cut inside the first face line: "f 12 3" is a 2-vertex face
        cut = full.index(b"\nf ") + 1
        p.write_bytes(full[: full.index(b" ", cut + 2) + 2])
        fragment = "at least 3"
    else:
        p.write_bytes(full[: len(full) - 7])
        fragment = "truncated binary PLY"
    with pytest.raises(MeshIOError, match=fragment) as info:
        load_mesh(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("suffix", [".obj", ".ply"])
def test_random_bytes_raise(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(4)
    for i in range(5):
        p = tmp_path / f"rand{i}{suffix}"
        p.write_bytes(rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes())
        with pytest.raises(MeshIOError) as info:
            load_mesh(p)
        assert str(p) in str(info.value)


def test_save_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(MeshIOError, match="out of range"):
        save_mesh(tmp_path / "x.obj", np.zeros((3, 3)), np.array([[0, 1, 3]]))
    with pytest.raises(MeshIOError, match="shape"):
        save_mesh(tmp_path / "x.obj", np.zeros((3, 2)), np.array([[0, 1, 2]]))
    with pytest.raises(MeshIOError, match="NaN"):
        save_mesh(tmp_path / "x.ply", np.full((3, 3), np.nan), np.array([[0, 1, 2]]))
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# .pp and landmark files
# ---------------------------------------------------------------------------------------------------

# The layout of a NoW scans_lmks_onlypp file (MeshLab PickedPoints); the points are on 0-based lines 8..14.
_PP = """<!DOCTYPE PickedPoints>
<PickedPoints>
 <DocumentData>
  <DateTime time="16:47:12" date="2018-11-15"/>
  <User name="someone"/>
  <DataFileName name="scan.obj"/>
  <templateName name=""/>
 </DocumentData>
 <point x="-43.3614" y="19.4398" z="-33.7421" active="1" name="1"/>
 <point x="-13.8455" y="18.1562" z="-26.1133" active="1" name="2"/>
 <point active="1" x="13.1022" name="3" y="17.9612" z="-25.5306"/>
 <point x="42.8214" y="20.9167" z="-32.3466" active="1" name="4"/>
 <point x="0.162543" y="-17.6339" z="-13.8542" active="1" name="5"/>
 <point x="-22.7633" y="-38.3432" z="-25.4125" active="1" name="6"/>
 <point x="22.4219" y="-37.4981" z="-25.1118" active="1" name="7"/>
</PickedPoints>
"""


def test_read_pp_hand_written(tmp_path: Path) -> None:
    p = tmp_path / "s.pp"
    p.write_text(_PP)
    lm = read_pp(p)
    assert lm.dtype == np.float32 and lm.shape == (7, 3)
    expected = np.array(
        [
            [-43.3614, 19.4398, -33.7421],
            [-13.8455, 18.1562, -26.1133],
            [13.1022, 17.9612, -25.5306],  # attribute order does not matter
            [42.8214, 20.9167, -32.3466],
            [0.162543, -17.6339, -13.8542],
            [-22.7633, -38.3432, -25.4125],
            [22.4219, -37.4981, -25.1118],
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(lm, expected)


def test_pp_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    pts = (rng.normal(size=(7, 3)) * 50).astype(np.float32)
    p = write_pp(tmp_path / "a" / "b.pp", pts)
    np.testing.assert_array_equal(read_pp(p), pts)
    lines = p.read_text().splitlines()
    assert all(lines[j].lstrip().startswith("<point ") for j in range(8, 15))
    assert not lines[7].lstrip().startswith("<point ")


def test_read_pp_bad(tmp_path: Path) -> None:
    short = tmp_path / "short.pp"
    short.write_text("\n".join(_PP.splitlines()[:12]))
    with pytest.raises(MeshIOError, match="lines") as info:
        read_pp(short)
    assert str(short) in str(info.value)
    nokey = tmp_path / "nokey.pp"
    nokey.write_text(_PP.replace(' y="18.1562"', ""))
    with pytest.raises(MeshIOError, match="line 10 lacks y"):
        read_pp(nokey)
    badnum = tmp_path / "badnum.pp"
    badnum.write_text(_PP.replace('z="-26.1133"', 'z="abc"'))
    with pytest.raises(MeshIOError, match="not a number"):
        read_pp(badnum)


def test_read_landmarks_npy_and_txt(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    lm = rng.normal(size=(7, 3))
    np.save(tmp_path / "a.npy", lm.astype(np.float32))
    np.save(tmp_path / "b.npy", lm[None])  # (1, 7, 3) float64
    a, b = read_landmarks(tmp_path / "a.npy"), read_landmarks(tmp_path / "b.npy")
    assert a.dtype == np.float32 and b.dtype == np.float64  # dtype as stored (the Procrustes runs in it)
    np.testing.assert_array_equal(a, lm.astype(np.float32))
    np.testing.assert_array_equal(b, lm)
    (tmp_path / "c.txt").write_text("\n".join(" ".join(f"{x:.6f}" for x in row) for row in lm) + "\n")
    c = read_landmarks(tmp_path / "c.txt")
    assert c.dtype == np.float32
    np.testing.assert_allclose(c, lm, atol=1e-6)


@pytest.mark.parametrize(
    "name, writer, fragment",
    [
        ("w68.npy", lambda p: np.save(p, np.zeros((68, 3))), "shape (68, 3)"),
        ("w2d.npy", lambda p: np.save(p, np.zeros((7, 2))), "shape (7, 2)"),
        ("nan.npy", lambda p: np.save(p, np.full((7, 3), np.nan)), "NaN"),
        ("garbage.npy", lambda p: Path(p).write_bytes(b"\x93NUMPY garbage"), "cannot read landmarks"),
        ("obj.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True), "cannot read"),
        ("six.txt", lambda p: Path(p).write_text("1 2 3\n" * 6), "shape (6, 3)"),
        ("ragged.txt", lambda p: Path(p).write_text("1 2 3\n" * 6 + "1 2\n"), "different numbers"),
        ("word.txt", lambda p: Path(p).write_text("1 2 a\n" * 7), "non-numeric"),
        ("lm.csv", lambda p: Path(p).write_text("1,2,3\n"), "unsupported landmark suffix"),
    ],
)
def test_read_landmarks_bad(tmp_path: Path, name: str, writer, fragment: str) -> None:
    p = tmp_path / name
    writer(os.fspath(p))
    with pytest.raises(MeshIOError, match=None) as info:
        read_landmarks(p)
    assert fragment in str(info.value)
    assert str(p) in str(info.value)
