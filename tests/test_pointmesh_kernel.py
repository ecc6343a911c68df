"""Tests of the Triton closest-point search (`ofer.eval.pointmesh_kernel`) and of `closest_points_torch(triton=True)`.
The kernel runs here through Triton's CPU interpreter (a subprocess: TRITON_INTERPRET must be set before Triton
is imported), against the torch search `_search_groups`, brute force and libigl; on CUDA in the GPU tests."""
from __future__ import annotations

import importlib.util
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ofer.eval import pointmesh, pointmesh_kernel
from ofer.eval.pointmesh import closest_point_on_triangle, closest_points_igl, closest_points_torch
from tests._triton_interpreter import run_interpreted
from tests.test_pointmesh import _near_surface_points, _random_mesh

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
REGIONS = ("a", "b", "c", "ab", "ac", "bc", "face", "degenerate", "non-finite")


def make_search_inputs(seed: int, *, B: int = 2, Pc: int = 150, k: int = 3, G: int = 8, nG: int = 6,
                       device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Random inputs of `_search_groups`: p (B, Pc, 3), gidx (B, Pc, k), tri_s (B, nG * G, 3, 3), valid, G.

    Triangles are scattered (so a point placed near one is often closest to it) with degenerate ones (collinear
    corners, coincident corners, a single point), pairs sharing a corner (exact ties), ~15% invalid slots and,
    in item 0, two groups of padding only, which are all the candidates of the last two points (distance inf).
    Points are placed near a vertex, an edge or the face of one of their candidates, exactly on a corner, or far
    away, so that every Voronoi region occurs among the winners (`test_search_inputs_cover_every_region`). The
    third-last point of each item lies on a triangle of size 1e79, whose interior solve overflows (inf - inf)
    while the area test does not: the non-finite check sends it to the edge pass.
    """
    rng = np.random.default_rng(seed)
    S = nG * G
    tri = rng.normal(size=(B, S, 1, 3)) * 3 + rng.normal(size=(B, S, 3, 3))
    for b in range(B):
        s = rng.choice(S, 18, replace=False)
        a, e = tri[b, s, 0], tri[b, s, 1]
        tri[b, s[0:3], 2] = a[0:3] + 0.7 * (e[0:3] - a[0:3])  # collinear, c between a and b
        tri[b, s[3:5], 2] = a[3:5] + 1.8 * (e[3:5] - a[3:5])  # collinear, c beyond b
        tri[b, s[5:8], 1] = a[5:8]  # a == b
        tri[b, s[8:10], 2] = tri[b, s[8:10], 1]  # b == c
        tri[b, s[10:12], 1:] = tri[b, s[10:12], :1]  # a single point
        tri[b, s[12:15], 0] = tri[b, s[15:18], 2]  # shared corners
    valid = rng.random((B, S)) > 0.15
    valid[0, : 2 * G] = False
    gidx = np.argsort(rng.random((B, Pc, nG)), -1)[..., :k]
    gidx[0, -2:] = np.resize([0, 1], k)  # the two padding groups (repeated when k > 2)
    # one candidate triangle per point, and a point near it
    j = rng.integers(0, k, (B, Pc))
    slot = np.take_along_axis(gidx, j[..., None], -1)[..., 0] * G + rng.integers(0, G, (B, Pc))
    t = np.take_along_axis(tri, slot[..., None, None], 1)  # (B, Pc, 3, 3)
    A, Bv, C = t[..., 0, :], t[..., 1, :], t[..., 2, :]
    cen = t.mean(-2)
    n = np.cross(Bv - A, C - A)
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    u = lambda lo, hi: rng.uniform(lo, hi, (B, Pc, 1))  # noqa: E731
    kind = rng.integers(0, 6, (B, Pc))
    corner = t[np.arange(B)[:, None], np.arange(Pc)[None, :], rng.integers(0, 3, (B, Pc))]
    near_vertex = corner + (corner - cen) * u(0.05, 0.6) + n * u(-0.3, 0.3)
    lerp = A + (Bv - A) * u(0, 1)
    near_edge = lerp + (lerp - cen) * u(0.05, 0.6) + n * u(-0.3, 0.3)
    w = rng.dirichlet(np.ones(3), (B, Pc))
    near_face = np.einsum("bpi,bpic->bpc", w, t) + n * u(-0.5, 0.5)
    far = rng.normal(size=(B, Pc, 3)) * 8
    p = np.select([kind[..., None] == i for i in range(5)], [near_vertex, near_edge, near_face, far, corner],
                  near_vertex + rng.normal(size=(B, Pc, 3)))
    huge = 1e79 * np.array([[10.0, 0.0, 0.0], [11.0, 0.2, 0.1], [10.3, 1.0, -0.2]])
    for b in range(B):
        gidx[b, -3, 0] = nG - 1  # not a padding group of item 0
        s0 = (nG - 1) * G
        tri[b, s0], valid[b, s0], p[b, -3] = huge, True, huge.mean(0)
    dev = torch.device(device)
    return (torch.tensor(p, device=dev), torch.tensor(gidx, device=dev), torch.tensor(tri, device=dev),
            torch.tensor(valid, device=dev), G)


def ericson_region(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Label of the region of Ericson's sequence that gives the closest point (arrays (..., 3)); "degenerate"
    for zero-area triangles, "non-finite" where the interior solve overflows."""
    dot = lambda x, y: (x * y).sum(-1)  # noqa: E731
    ab, ac = b - a, c - a
    d1, d2, d3, d4 = dot(ab, p - a), dot(ac, p - a), dot(ab, p - b), dot(ac, p - b)
    d5, d6 = dot(ab, p - c), dot(ac, p - c)
    vc, vb, va = d1 * d4 - d3 * d2, d5 * d2 - d1 * d6, d3 * d6 - d5 * d4
    n = np.cross(ab, ac)
    conds = [dot(n, n) <= 1e-20 * dot(ab, ab) * dot(ac, ac), ~np.isfinite(va + vb + vc), (d1 <= 0) & (d2 <= 0),
             (d3 >= 0) & (d4 <= d3), (vc <= 0) & (d1 >= 0) & (d3 <= 0), (d6 >= 0) & (d5 <= d6),
             (vb <= 0) & (d2 >= 0) & (d6 <= 0), (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)]
    return np.select(conds, ["degenerate", "non-finite", "a", "b", "ab", "c", "ac", "bc"], "face")


def check_search(p: torch.Tensor, gidx: torch.Tensor, tri_s: torch.Tensor, valid: torch.Tensor, G: int, *,
                 atol: float = 1e-20) -> int:
    """The kernel against `_search_groups`: distances to 1e-12 relative (`atol` for distances near 0), the same
    slot or a tie (the kernel's triangle attains the reference distance), the same closest point where the slots
    agree, and the first candidate for points with no valid one. Returns the number of differing slots."""
    sq, q, slot = pointmesh_kernel.search_groups(p, gidx, tri_s, valid, G)
    ref_sq, ref_q, ref_slot = pointmesh._search_groups(p, gidx, tri_s, valid, torch.arange(G, device=p.device))
    assert sq.shape == ref_sq.shape and q.shape == ref_q.shape and slot.shape == ref_slot.shape
    assert sq.dtype == q.dtype == torch.float64 and slot.dtype == torch.int64
    fin = torch.isfinite(ref_sq)
    assert torch.equal(torch.isfinite(sq), fin)
    torch.testing.assert_close(sq[fin], ref_sq[fin], rtol=1e-12, atol=atol)
    t = tri_s.gather(1, slot[..., None, None].expand(*slot.shape, 3, 3))
    q_at = closest_point_on_triangle(p, t[..., 0, :], t[..., 1, :], t[..., 2, :])
    d_at = ((p - q_at) ** 2).sum(-1)
    diff = slot != ref_slot
    assert bool(valid.gather(1, slot)[fin].all())
    torch.testing.assert_close(d_at[diff & fin], ref_sq[diff & fin], rtol=1e-12, atol=atol)
    assert torch.equal(slot[~fin], gidx[..., 0][~fin] * G)
    # relative too: the overflowing triangle's closest points are ~1e79 from the origin
    torch.testing.assert_close(q[~diff], ref_q[~diff], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(q[diff], q_at[diff], rtol=1e-12, atol=1e-12)
    return int(diff.sum())


def test_search_inputs_cover_every_region() -> None:
    """The winners of the reference search on `make_search_inputs` lie in every region of Ericson's test, on
    degenerate triangles of each kind and on the overflowing one, and some points have no valid candidate: the
    kernel tests below compare every branch."""
    for seed in (0, 1):
        p, gidx, tri, valid, G = make_search_inputs(seed)
        sq, _, slot = pointmesh._search_groups(p, gidx, tri, valid, torch.arange(G))
        fin = torch.isfinite(sq)
        t = tri.gather(1, slot[..., None, None].expand(*slot.shape, 3, 3))[fin].numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            labels = ericson_region(p[fin].numpy(), t[:, 0], t[:, 1], t[:, 2])
        counts = {r: int((labels == r).sum()) for r in REGIONS}
        assert all(n >= 2 for n in counts.values()) and counts["non-finite"] == 2, counts
        deg = t[labels == "degenerate"]
        ab, bc = np.all(deg[:, 0] == deg[:, 1], -1), np.all(deg[:, 1] == deg[:, 2], -1)
        assert (ab | bc).any() and (~ab & ~bc).any()  # coincident corners, and collinear ones
        assert int((~fin).sum()) == 2 and bool((~valid).any())
        assert p.shape[1] % pointmesh_kernel.LAUNCH["block"] != 0


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_kernel_matches_torch_search_in_the_interpreter() -> None:
    """In Triton's CPU interpreter: the kernel against `_search_groups` on inputs covering every region (two
    launch blocks: partial last blocks), then `closest_points_torch(triton=True)` against the torch search,
    brute force and libigl on two padded meshes, and on points that fail the certificate (the fallback runs with
    the kernel too)."""
    script = textwrap.dedent("""
        import numpy as np
        import torch
        from ofer.eval import pointmesh, pointmesh_kernel as pk
        from ofer.eval.pointmesh import closest_points_brute_force, closest_points_igl, closest_points_torch
        from tests.test_pointmesh import _near_surface_points, _random_mesh
        from tests.test_pointmesh_kernel import check_search, make_search_inputs

        for seed, block in ((0, 128), (1, 32)):
            pk.LAUNCH["block"] = block
            assert check_search(*make_search_inputs(seed)) == 0  # same arithmetic as torch: ties break alike
        pk.LAUNCH["block"] = 128

        meshes = [_random_mesh(s, subdiv=sd) for s, sd in [(10, 2), (11, 1)]]
        pts = [np.concatenate([v[rng.integers(0, len(v), n)] * rng.uniform(0.8, 1.2, (n, 1))
                               + rng.normal(scale=0.05, size=(n, 3)), rng.normal(size=(20, 3)) * 2])
               for (v, _, rng), n in zip(meshes, (130, 60))]
        Pn, Vn, Fn = max(map(len, pts)), max(len(m[0]) for m in meshes), max(len(m[1]) for m in meshes)
        P, V = torch.zeros(2, Pn, 3, dtype=torch.float64), torch.zeros(2, Vn, 3, dtype=torch.float64)
        F = torch.zeros(2, Fn, 3, dtype=torch.int64)
        pm, fm = torch.zeros(2, Pn, dtype=torch.bool), torch.zeros(2, Fn, dtype=torch.bool)
        for i, ((v, f, _), p) in enumerate(zip(meshes, pts)):
            P[i, :len(p)], V[i, :len(v)], F[i, :len(f)] = torch.tensor(p), torch.tensor(v), torch.tensor(f)
            pm[i, :len(p)], fm[i, :len(f)] = True, True
        kw = dict(point_mask=pm, face_mask=fm, k=4, group_size=4)
        out = closest_points_torch(P, V, F, triton=True, **kw)
        ref = closest_points_torch(P, V, F, **kw)
        bf = closest_points_brute_force(P, V, F, face_mask=fm)
        assert torch.equal(out.face, ref.face)
        torch.testing.assert_close(out.sqdist, ref.sqdist, rtol=1e-12, atol=1e-20)
        torch.testing.assert_close(out.points, ref.points, rtol=0, atol=1e-12)
        for i, ((v, f, _), p) in enumerate(zip(meshes, pts)):
            n = len(p)
            np.testing.assert_allclose(out.sqdist[i, :n].numpy(), bf.sqdist[i, :n].numpy(), rtol=1e-12, atol=1e-20)
            sq_i, cp_i, _ = closest_points_igl(p, v, f)
            np.testing.assert_allclose(out.sqdist[i, :n].numpy(), sq_i, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(out.points[i, :n].numpy(), cp_i, atol=1e-9)
            assert torch.all(out.face[i, n:] == -1)

        # points near the centre of a sphere fail the certificate with k=2; the fallback keeps triton=True
        v, f, rng = _random_mesh(2, subdiv=2, noise=0.0)
        p = rng.normal(scale=0.01, size=(40, 3))
        calls = []
        real = pointmesh._fallback
        pointmesh._fallback = lambda *a, **kw: (calls.append(kw["triton"]), real(*a, **kw))
        out = closest_points_torch(torch.tensor(p)[None], torch.tensor(v)[None], torch.tensor(f)[None], k=2,
                                   group_size=4, triton=True)
        assert calls and all(calls), calls
        np.testing.assert_allclose(out.sqdist[0].numpy(), closest_points_igl(p, v, f)[0], rtol=1e-10, atol=1e-12)
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs the kernel on CPU tensors")
def test_triton_on_cpu_tensors_is_an_error() -> None:
    V, F, rng = _random_mesh(7, subdiv=1)
    P = torch.tensor(rng.normal(size=(5, 3)))[None]
    with pytest.raises(RuntimeError, match=r"closest_points_torch\(triton=True\) needs Triton and CUDA"):
        closest_points_torch(P, torch.tensor(V)[None], torch.tensor(F)[None], triton=True)
    with pytest.raises(RuntimeError, match="needs Triton .* CUDA tensor"):
        pointmesh_kernel.search_groups(*make_search_inputs(0))
    from ofer.eval.now import refine_alignment

    for backend in ("auto", "torch"):  # auto is igl on the CPU
        with pytest.raises(RuntimeError, match=r"triton=True \(now.triton\).*backend '(igl|torch)' on cpu"):
            refine_alignment([P[0].numpy()], [V], [F], device="cpu", backend=backend, triton=True)


def test_config_passes_now_triton(tmp_path, monkeypatch) -> None:
    """`now.triton` exists in the eval_now config (off) and reaches `score_now`."""
    from hydra import compose, initialize_config_dir

    from ofer.eval import now

    seen = {}

    class Stop(Exception):
        pass

    def fake_score_now(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.update(kwargs)
        raise Stop  # before the report is printed

    monkeypatch.setattr(now, "score_now", fake_score_now)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("eval_now", overrides=[f"now.root={tmp_path}", f"now.predictions={tmp_path}"])
        assert cfg.now.triton is False
        cfg = compose("eval_now", overrides=[f"now.root={tmp_path}", f"now.predictions={tmp_path}", "now.triton=true"])
    with pytest.raises(Stop):
        now.score_now_from_config(cfg, out_dir=tmp_path)
    assert seen["triton"] is True and seen["compile"] is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_matches_torch_search_on_cuda() -> None:
    """On CUDA (fused multiply-adds may change the last bits, so near-ties may pick another triangle attaining
    the same distance): the kernel against `_search_groups` on the region-covering inputs, larger ones, and the
    NoW shape (k = 8 groups of 16)."""
    for seed, kw in ((0, {}), (1, {"B": 3, "Pc": 5000, "nG": 64}), (2, {"B": 2, "Pc": 20000, "k": 8, "G": 16,
                                                                         "nG": 256})):
        diff = check_search(*make_search_inputs(seed, device="cuda", **kw), atol=1e-16)
        assert diff <= 0.001 * kw.get("B", 2) * kw.get("Pc", 150) + 2, diff


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_triton_matches_eager_and_igl(compile: bool) -> None:
    V, F, rng = _random_mesh(8, subdiv=5)
    P = np.concatenate([_near_surface_points(V, rng), rng.normal(size=(500, 3)) * 3])  # far points: some fail the certificate
    sq_i, cp_i, _ = closest_points_igl(P, V, F)
    dev = torch.device("cuda")
    args = (torch.tensor(P, device=dev)[None], torch.tensor(V, device=dev)[None], torch.tensor(F, device=dev)[None])
    out = closest_points_torch(*args, compile=compile, triton=True)
    ref = closest_points_torch(*args)
    torch.testing.assert_close(out.sqdist, ref.sqdist, rtol=1e-12, atol=1e-16)
    # Another face only on ties: points near a vertex or edge shared by several faces (2% of these points on an
    # H200, where fused multiply-adds change the last bits); the kernel's face attains the reference distance.
    tri = args[1][0][args[2][0][out.face[0]]]  # (P, 3 corners, 3)
    q_at = closest_point_on_triangle(args[0][0], tri[:, 0], tri[:, 1], tri[:, 2])
    torch.testing.assert_close(((args[0][0] - q_at) ** 2).sum(-1), ref.sqdist[0], rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(out.sqdist[0].cpu().numpy(), sq_i, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.points[0].cpu().numpy(), cp_i, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_refine_alignment_triton_matches_torch_on_cuda(compile: bool) -> None:
    """The NoW refinement with the kernel (and with the compiled group selection) against the torch search, on a
    batch of FLAME-sized synthetic predictions (10,080 faces) with padding: the same iterations and distances."""
    from scipy.spatial.transform import Rotation

    from ofer.eval.now import crop_scan, landmark_similarity, refine_alignment
    from ofer.eval.now_synthetic import synthetic_head

    v, _, lm = synthetic_head(n_lat=120, n_lon=120)
    X = v[crop_scan(v, lm.astype(np.float32))]
    Xs, Vs, Fs = [], [], []
    for i in range(4):
        pv, pf, pl = synthetic_head(n_lat=72, n_lon=72, params={"nose": 20 + 2 * i, "a": 76 + i})
        R = Rotation.from_rotvec([0.1 * i, -0.2, 0.05]).as_matrix()
        Vs.append(landmark_similarity(lm.astype(np.float32), (pl @ R.T + i).astype(np.float32)).apply(pv @ R.T + i))
        Fs.append(pf)
        Xs.append(X[: len(X) - 50 * i])  # different point counts: padding
    ref = refine_alignment(Xs, Vs, Fs, device="cuda")
    out = refine_alignment(Xs, Vs, Fs, device="cuda", compile=compile, triton=True)
    np.testing.assert_array_equal(out.iterations, ref.iterations)
    for a, b in zip(out.distances, ref.distances):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_search_kernel_compiles_for_sm90_with_the_installed_triton() -> None:
    """`_search_groups_kernel` compiled ahead of time (no GPU needed) for sm_90 with `LAUNCH`, plain and as a launch
    with aligned pointers and integers (`tests/_triton_aot.py`): it builds in float64, keeps no arrays in local
    memory and fits an H100's shared memory. Catches a Triton change before a user's GPU does (the GPU tests run
    another Triton version)."""
    from tests._triton_aot import compile_sm90

    sig = {"p_ptr": "*fp64", "gidx_ptr": "*i64", "tri_ptr": "*fp64", "valid_ptr": "*u8", "sq_ptr": "*fp64",
           "q_ptr": "*fp64", "slot_ptr": "*i64", "Pc": "i32", "K": "i32", "G": "i32", "S": "i32", "BLOCK": "constexpr"}
    launch = pointmesh_kernel.LAUNCH
    for compiled in compile_sm90(pointmesh_kernel._search_groups_kernel, sig, {"BLOCK": launch["block"]},
                                 launch["num_warps"]):
        ptx = compiled.asm["ptx"]
        assert ".f64" in ptx
        assert "st.local" not in ptx and "ld.local" not in ptx
