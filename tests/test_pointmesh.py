"""Tests of the exact point-to-mesh closest points (`ofer.eval.pointmesh`): closed-form cases for every
Voronoi region of a triangle, degenerate triangles, and random meshes against libigl and trimesh."""
from __future__ import annotations

import igl
import numpy as np
import pytest
import torch
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st

from ofer.eval import pointmesh
from ofer.eval.pointmesh import (
    closest_point_on_triangle,
    closest_points_brute_force,
    closest_points_igl,
    closest_points_torch,
)

A, B, C = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def _tri(p, a=A, b=B, c=C) -> np.ndarray:
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return closest_point_on_triangle(t(p), t(a), t(b), t(c)).numpy()


@pytest.mark.parametrize(
    "p, expected",
    [
        ((0.2, 0.3, 5.0), (0.2, 0.3, 0.0)),  # above the interior (face region)
        ((0.2, 0.3, -2.0), (0.2, 0.3, 0.0)),  # below: unsigned
        ((0.5, -2.0, 1.0), (0.5, 0.0, 0.0)),  # beyond edge ab
        ((1.0, 1.0, 0.0), (0.5, 0.5, 0.0)),  # beyond edge bc
        ((-1.0, 0.5, 3.0), (0.0, 0.5, 0.0)),  # beyond edge ca
        ((-1.0, -1.0, 2.0), A),  # beyond vertex a
        ((2.0, -0.5, 0.0), B),  # beyond vertex b
        ((-0.5, 2.0, -1.0), C),  # beyond vertex c
        ((0.25, 0.25, 0.0), (0.25, 0.25, 0.0)),  # on the triangle
    ],
)
def test_closed_form_regions(p, expected) -> None:
    np.testing.assert_allclose(_tri(p), expected, atol=1e-15)


@pytest.mark.parametrize(
    "tri, p, expected",
    [
        (((0, 0, 0), (1, 0, 0), (2, 0, 0)), (1.5, 1.0, 0.0), (1.5, 0.0, 0.0)),  # collinear
        (((0, 0, 0), (2, 0, 0), (1, 0, 0)), (3.0, 1.0, 0.0), (2.0, 0.0, 0.0)),  # collinear, end point
        (((0, 0, 0), (0, 0, 0), (0, 2, 0)), (1.0, 1.0, 0.0), (0.0, 1.0, 0.0)),  # two corners coincide
        (((1, 1, 1), (1, 1, 1), (1, 1, 1)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # a point
    ],
)
def test_degenerate_triangles(tri, p, expected) -> None:
    tri = [tuple(float(x) for x in v) for v in tri]
    out = _tri(p, *tri)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, expected, atol=1e-15)


def test_degenerate_triangles_compiled_without_graph_break() -> None:
    """Under torch.compile the edge pass for degenerate triangles runs unconditionally (no data-dependent
    branch, which would break the graph and sync the host): fullgraph tracing must succeed and give the
    closed-form answers of the degenerate cases above, next to a regular triangle."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    tris = t([[(0, 0, 0), (1, 0, 0), (2, 0, 0)], [(0, 0, 0), (0, 0, 0), (0, 2, 0)], [A, B, C]])
    pts = t([(1.5, 1.0, 0.0), (1.0, 1.0, 0.0), (0.2, 0.3, 5.0)])
    expected = [(1.5, 0.0, 0.0), (0.0, 1.0, 0.0), (0.2, 0.3, 0.0)]
    torch._dynamo.reset()
    compiled = torch.compile(closest_point_on_triangle, backend="eager", fullgraph=True)
    out = compiled(pts, tris[:, 0], tris[:, 1], tris[:, 2])
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-15)


# A 0.01 grid keeps exact degeneracies (collinear, coincident corners) but avoids underflowing products, on
# which libigl itself returns inf.
coord = st.integers(-1000, 1000).map(lambda i: i / 100)
vec = st.tuples(coord, coord, coord)


@settings(max_examples=300, deadline=None)
@given(p=vec, a=vec, b=vec, c=vec)
def test_single_triangle_matches_igl(p, a, b, c) -> None:
    out = _tri(p, a, b, c)
    V = np.array([a, b, c], dtype=np.float64)
    sq, _, cp = igl.point_mesh_squared_distance(np.array([p], dtype=np.float64), V, np.array([[0, 1, 2]]))
    d_ours = np.sum((np.array(p) - out) ** 2)
    assert d_ours == pytest.approx(sq[0], rel=1e-9, abs=1e-9)


def _random_mesh(seed: int, subdiv: int = 3, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    m = trimesh.creation.icosphere(subdivisions=subdiv)
    v = m.vertices * (1 + noise * rng.normal(size=(len(m.vertices), 1))) * np.array([1.0, 1.3, 0.8])
    return v, m.faces.astype(np.int64), rng


def _near_surface_points(V: np.ndarray, rng: np.random.Generator, n: int = 20000) -> np.ndarray:
    """n points near the mesh: random vertices scaled by 0.9-1.1 plus 0.01 noise (the GPU tests' queries)."""
    return V[rng.integers(0, len(V), n)] * rng.uniform(0.9, 1.1, (n, 1)) + rng.normal(scale=0.01, size=(n, 3))


def _regions(points, V, F, face_idx, cp) -> tuple[int, int, int]:
    """Count closest points in face interiors, on edges and at vertices (from barycentric coordinates)."""
    tri = V[F[face_idx]]
    bary = igl.barycentric_coordinates(cp, tri[:, 0].copy(), tri[:, 1].copy(), tri[:, 2].copy())
    zeros = (bary < 1e-9).sum(1)
    return int((zeros == 0).sum()), int((zeros == 1).sum()), int((zeros == 2).sum())


def test_random_mesh_matches_igl_and_trimesh_all_regions() -> None:
    V, F, rng = _random_mesh(0)
    # points near the surface on both sides and far away: all three region types occur
    P = np.concatenate([
        V[rng.integers(0, len(V), 300)] * rng.uniform(0.8, 1.3, (300, 1)) + rng.normal(scale=0.05, size=(300, 3)),
        rng.normal(size=(100, 3)) * 3,
    ])
    sq_i, cp_i, fi_i = closest_points_igl(P, V, F)
    out = closest_points_torch(torch.tensor(P)[None], torch.tensor(V)[None], torch.tensor(F)[None], k=16)
    np.testing.assert_allclose(out.sqdist[0].numpy(), sq_i, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.points[0].numpy(), cp_i, atol=1e-9)
    cp_t, d_t, _ = trimesh.proximity.closest_point(trimesh.Trimesh(V, F, process=False), P)
    np.testing.assert_allclose(np.sqrt(out.sqdist[0].numpy()), d_t, atol=1e-9)
    # the reported face attains the distance
    f = out.face[0].numpy()
    d_face = np.array([np.sum((P[i] - _tri(P[i], *V[F[f[i]]])) ** 2) for i in range(len(P))])
    np.testing.assert_allclose(d_face, sq_i, rtol=1e-10, atol=1e-12)
    n_face, n_edge, n_vert = _regions(P, V, F, fi_i, cp_i)
    assert n_face > 0 and n_edge > 0 and n_vert > 0


def test_brute_force_matches_igl() -> None:
    V, F, rng = _random_mesh(1, subdiv=2)
    P = rng.normal(size=(200, 3)) * 1.5
    sq_i, _, _ = closest_points_igl(P, V, F)
    out = closest_points_brute_force(torch.tensor(P)[None], torch.tensor(V)[None], torch.tensor(F)[None], max_pairs=5000)
    np.testing.assert_allclose(out.sqdist[0].numpy(), sq_i, rtol=1e-10, atol=1e-12)


def test_uncertified_points_fall_back_exactly(monkeypatch) -> None:
    # Points near the centre of a sphere: every triangle is about equally far, k=2 candidates cannot be
    # certified, so the fallback (more candidates, then brute force) must still give the exact answer.
    V, F, rng = _random_mesh(2, subdiv=3, noise=0.0)
    P = rng.normal(scale=0.01, size=(50, 3))
    sq_i, _, _ = closest_points_igl(P, V, F)
    calls = []
    real = pointmesh._fallback
    monkeypatch.setattr(pointmesh, "_fallback", lambda *a, **kw: (calls.append(len(a[4])), real(*a, **kw)))
    out = closest_points_torch(torch.tensor(P)[None], torch.tensor(V)[None], torch.tensor(F)[None], k=2)
    assert calls and calls[0] == len(P)  # the certificate rejected every point
    np.testing.assert_allclose(out.sqdist[0].numpy(), sq_i, rtol=1e-10, atol=1e-12)


def test_batched_padding_masks() -> None:
    meshes = [_random_mesh(s, subdiv=sd) for s, sd in [(3, 2), (4, 3), (5, 1)]]
    pts = [rng.normal(size=(n, 3)) for (_, _, rng), n in zip(meshes, (40, 75, 10))]
    Pn, Vn, Fn = 75, max(len(m[0]) for m in meshes), max(len(m[1]) for m in meshes)
    P = torch.zeros(3, Pn, 3, dtype=torch.float64)
    V = torch.zeros(3, Vn, 3, dtype=torch.float64)
    F = torch.zeros(3, Fn, 3, dtype=torch.int64)
    pm = torch.zeros(3, Pn, dtype=torch.bool)
    fm = torch.zeros(3, Fn, dtype=torch.bool)
    for i, ((v, f, _), p) in enumerate(zip(meshes, pts)):
        P[i, : len(p)] = torch.tensor(p)
        V[i, : len(v)] = torch.tensor(v)
        F[i, : len(f)] = torch.tensor(f)
        pm[i, : len(p)] = True
        fm[i, : len(f)] = True
    out = closest_points_torch(P, V, F, point_mask=pm, face_mask=fm, k=8, max_pairs=20000)
    for i, ((v, f, _), p) in enumerate(zip(meshes, pts)):
        sq_i, cp_i, _ = closest_points_igl(p, v, f)
        np.testing.assert_allclose(out.sqdist[i, : len(p)].numpy(), sq_i, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(out.points[i, : len(p)].numpy(), cp_i, atol=1e-9)
        assert torch.all(out.face[i, len(p):] == -1) and torch.all(out.sqdist[i, len(p):] == 0)


def test_degenerate_faces_in_a_mesh() -> None:
    V, F, rng = _random_mesh(6, subdiv=2)
    V = np.concatenate([V, [[0.0, 0.0, 2.0], [0.0, 0.0, 3.0], [0.0, 0.0, 4.0]]])
    F = np.concatenate([F, [[len(V) - 3, len(V) - 2, len(V) - 1], [len(V) - 1, len(V) - 1, len(V) - 1]]])
    P = np.concatenate([rng.normal(size=(60, 3)), [[0.5, 0.0, 3.5], [0.0, 0.0, 5.0]]])
    sq_i, _, _ = closest_points_igl(P, V, F)  # igl treats degenerate triangles as segments / points
    out = closest_points_torch(torch.tensor(P)[None], torch.tensor(V)[None], torch.tensor(F)[None], k=8)
    assert torch.isfinite(out.sqdist).all()
    np.testing.assert_allclose(out.sqdist[0].numpy(), sq_i, rtol=1e-10, atol=1e-12)
    assert out.sqdist[0, -2].item() == pytest.approx(0.25) and out.sqdist[0, -1].item() == pytest.approx(1.0)


def test_no_valid_face_is_an_error() -> None:
    V, F, _ = _random_mesh(7, subdiv=1)
    with pytest.raises(ValueError, match="at least one valid face"):
        closest_points_torch(torch.zeros(1, 4, 3, dtype=torch.float64), torch.tensor(V)[None], torch.tensor(F)[None],
                             face_mask=torch.zeros(1, len(F), dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_matches_igl(compile: bool) -> None:
    V, F, rng = _random_mesh(8, subdiv=5)
    P = _near_surface_points(V, rng)
    sq_i, cp_i, _ = closest_points_igl(P, V, F)
    dev = torch.device("cuda")
    out = closest_points_torch(torch.tensor(P, device=dev)[None], torch.tensor(V, device=dev)[None],
                               torch.tensor(F, device=dev)[None], compile=compile)
    np.testing.assert_allclose(out.sqdist[0].cpu().numpy(), sq_i, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.points[0].cpu().numpy(), cp_i, atol=1e-9)


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("block", [1, 4, 8])
def test_nearest_groups_is_the_exact_top_k(traced: bool, block: int) -> None:
    """The two-stage group selection (block minima, then the chosen blocks' groups) returns exactly the k + 1
    smallest bounds of a direct computation over all groups, with some groups invalid; `traced` runs the
    code path taken under torch.compile (direct differences)."""
    g = torch.Generator().manual_seed(0)
    B, Pc, nG, k = 2, 300, 128, 8
    p = torch.randn(B, Pc, 3, generator=g, dtype=torch.float64)
    gc = torch.randn(B, nG, 3, generator=g, dtype=torch.float64)
    gr = torch.rand(B, nG, generator=g, dtype=torch.float64) * 0.5
    gvalid = torch.rand(B, nG, generator=g) > 0.2
    ref = ((p[:, :, None] - gc[:, None]).norm(dim=-1) - gr[:, None]).masked_fill(~gvalid[:, None], float("inf"))
    ref_vals = torch.topk(ref, k + 1, dim=-1, largest=False, sorted=True).values
    fn = pointmesh._nearest_groups
    if traced:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="eager", fullgraph=True)
    vals, idx = fn(p, gc, gr, gvalid, k, block)
    np.testing.assert_allclose(vals.numpy(), ref_vals.numpy(), rtol=0, atol=1e-12)
    # the indices name groups with those bounds
    np.testing.assert_allclose(ref.gather(-1, idx).numpy(), vals.numpy(), rtol=0, atol=1e-12)
