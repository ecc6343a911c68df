"""One Triton kernel for the exact search of `closest_points_torch` (`pointmesh._search_groups`), float64.

What: for every query point, the exact closest point over the k * G candidate triangles of its k nearest groups
(Ericson's point-triangle test, the same formula as `pointmesh.closest_point_on_triangle`: every Voronoi region in
the same priority order, the same safe divisions, the same edge pass for degenerate triangles), masked by the
triangles' validity, and the first candidate attaining the minimum (as torch's `min` / `argmin`).

Why: the torch form gathers a (B, Pc, k * G, 3, 3) float64 tensor of candidate triangles and runs the test as
~60 element-wise passes over (B, Pc, k * G) tensors (or a few fused ones compiled): ~60 ms per call of the NoW
scorer on an H200 (32 images x 22,271 scan points x 128 candidates), ~89% of the scorer, for ~9 GFLOP of fp64
arithmetic. The kernel reads each candidate's 9 corner coordinates once (from L2: one mesh's triangles are
~1.2 MB) and keeps everything else in registers; DRAM traffic is about the points in and the results out.

How: one program per block of `LAUNCH["block"]` points of one batch item, vectorised over the points, looping
over the k groups and the G triangles of each; a running minimum with strict `<`, its slot and closest point.
The first candidate is always taken, so a point whose candidates are all invalid gets distance inf and the first
candidate's slot and point, as `_search_groups` does.

Triton is optional: `available(x)` says whether the kernel can run on `x` (Triton importable and a CUDA tensor,
or TRITON_INTERPRET=1 for the CPU interpreter used in our tests); `search_groups` raises a RuntimeError
otherwise. On CUDA the compiler may contract a * b + c into fused multiply-adds, so results can differ from the
torch form in the last bits (the GPU test allows 1e-12 relative; the certificate's margin is 1e-6 of the mesh
scale), and a near-tie may pick another triangle at the same distance; in the interpreter the arithmetic is
numpy's, operation for operation the torch form's (our tests find identical results).
Compiled ahead of time for sm_90 (no GPU needed) the kernel uses 135 registers per thread and no local memory.
"""
from __future__ import annotations

import os

import torch

__all__ = ["LAUNCH", "available", "search_groups"]

try:  # Triton is an optional dependency (shipped with CUDA builds of torch)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Points per program (a power of two) and warps per program: one point per thread with the defaults (our choice,
# not tuned yet; module-level so a benchmark can sweep it).
LAUNCH = {"block": 128, "num_warps": 4}


def available(x: torch.Tensor) -> bool:
    """Whether `search_groups` runs on tensors like `x` (Triton installed, and a CUDA tensor or the interpreter)."""
    return triton is not None and (x.is_cuda or _INTERPRET)


if triton is not None:

    @triton.jit
    def _dot3(x0, x1, x2, y0, y1, y2):
        # (x0 y0 + x1 y1) + x2 y2: the summation order of torch's (x * y).sum(-1) over 3 elements
        return x0 * y0 + x1 * y1 + x2 * y2

    @triton.jit
    def _safe_div(n, d):
        return n / tl.where(d != 0, d, 1.0)

    @triton.jit
    def _select3(m, x0, x1, x2, y0, y1, y2):
        # where(m, x, y) on the three coordinates
        return tl.where(m, x0, y0), tl.where(m, x1, y1), tl.where(m, x2, y2)

    @triton.jit
    def _closest_on_segment(px, py, pz, ax, ay, az, bx, by, bz):
        # pointmesh._closest_on_segment
        abx, aby, abz = bx - ax, by - ay, bz - az
        den = _dot3(abx, aby, abz, abx, aby, abz)
        t = _dot3(px - ax, py - ay, pz - az, abx, aby, abz) / tl.where(den > 0, den, 1.0)
        t = tl.where(den > 0, t, 0.0)
        t = tl.minimum(tl.maximum(t, 0.0), 1.0)
        return ax + t * abx, ay + t * aby, az + t * abz

    @triton.jit
    def _closest_on_triangle(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
        # pointmesh.closest_point_on_triangle, operation for operation (Ericson, Real-Time Collision Detection,
        # 5.1.5): the face solution, then the regions in reverse priority so that the first matching test of
        # Ericson's sequence wins, then the edge pass for degenerate triangles.
        abx, aby, abz = bx - ax, by - ay, bz - az
        acx, acy, acz = cx - ax, cy - ay, cz - az
        apx, apy, apz = px - ax, py - ay, pz - az
        bpx, bpy, bpz = px - bx, py - by, pz - bz
        cpx, cpy, cpz = px - cx, py - cy, pz - cz
        d1 = _dot3(abx, aby, abz, apx, apy, apz)
        d2 = _dot3(acx, acy, acz, apx, apy, apz)
        d3 = _dot3(abx, aby, abz, bpx, bpy, bpz)
        d4 = _dot3(acx, acy, acz, bpx, bpy, bpz)
        d5 = _dot3(abx, aby, abz, cpx, cpy, cpz)
        d6 = _dot3(acx, acy, acz, cpx, cpy, cpz)
        vc = d1 * d4 - d3 * d2
        vb = d5 * d2 - d1 * d6
        va = d3 * d6 - d5 * d4
        denom = va + vb + vc
        v = _safe_div(vb, denom)
        w = _safe_div(vc, denom)
        qx = ax + v * abx + w * acx  # face region
        qy = ay + v * aby + w * acy
        qz = az + v * abz + w * acz
        e43 = d4 - d3
        e56 = d5 - d6
        m = (va <= 0) & (e43 >= 0) & (e56 >= 0)  # edge bc
        t = _safe_div(e43, e43 + e56)
        qx, qy, qz = _select3(m, bx + t * (cx - bx), by + t * (cy - by), bz + t * (cz - bz), qx, qy, qz)
        m = (vb <= 0) & (d2 >= 0) & (d6 <= 0)  # edge ac
        t = _safe_div(d2, d2 - d6)
        qx, qy, qz = _select3(m, ax + t * acx, ay + t * acy, az + t * acz, qx, qy, qz)
        m = (d6 >= 0) & (d5 <= d6)  # vertex c
        qx, qy, qz = _select3(m, cx, cy, cz, qx, qy, qz)
        m = (vc <= 0) & (d1 >= 0) & (d3 <= 0)  # edge ab
        t = _safe_div(d1, d1 - d3)
        qx, qy, qz = _select3(m, ax + t * abx, ay + t * aby, az + t * abz, qx, qy, qz)
        m = (d3 >= 0) & (d4 <= d3)  # vertex b
        qx, qy, qz = _select3(m, bx, by, bz, qx, qy, qz)
        m = (d1 <= 0) & (d2 <= 0)  # vertex a
        qx, qy, qz = _select3(m, ax, ay, az, qx, qy, qz)

        # Degenerate triangles (or a non-finite interior solve): the closest of the three edges, the first on ties.
        nx = aby * acz - abz * acy
        ny = abz * acx - abx * acz
        nz = abx * acy - aby * acx
        deg = _dot3(nx, ny, nz, nx, ny, nz) <= 1e-20 * _dot3(abx, aby, abz, abx, aby, abz) * _dot3(
            acx, acy, acz, acx, acy, acz)
        deg = deg | ~((tl.abs(qx) < float("inf")) & (tl.abs(qy) < float("inf")) & (tl.abs(qz) < float("inf")))
        sx, sy, sz = _closest_on_segment(px, py, pz, ax, ay, az, bx, by, bz)
        ex, ey, ez = px - sx, py - sy, pz - sz
        sd = _dot3(ex, ey, ez, ex, ey, ez)
        tx, ty, tz = _closest_on_segment(px, py, pz, bx, by, bz, cx, cy, cz)
        ex, ey, ez = px - tx, py - ty, pz - tz
        td = _dot3(ex, ey, ez, ex, ey, ez)
        m = td < sd
        sx, sy, sz, sd = tl.where(m, tx, sx), tl.where(m, ty, sy), tl.where(m, tz, sz), tl.where(m, td, sd)
        tx, ty, tz = _closest_on_segment(px, py, pz, cx, cy, cz, ax, ay, az)
        ex, ey, ez = px - tx, py - ty, pz - tz
        td = _dot3(ex, ey, ez, ex, ey, ez)
        m = td < sd
        sx, sy, sz = tl.where(m, tx, sx), tl.where(m, ty, sy), tl.where(m, tz, sz)
        qx, qy, qz = _select3(deg, sx, sy, sz, qx, qy, qz)
        return qx, qy, qz

    @triton.jit
    def _search_groups_kernel(
        p_ptr, gidx_ptr, tri_ptr, valid_ptr, sq_ptr, q_ptr, slot_ptr, Pc, K, G, S, BLOCK: tl.constexpr,
    ):
        # Program (block of BLOCK points, batch item b). p: (B, Pc, 3), gidx: (B, Pc, K), tri: (B, S, 3, 3),
        # valid: (B, S) uint8, all contiguous; S = number of group-ordered triangle slots.
        b = tl.program_id(1).to(tl.int64)
        pt = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = pt < Pc
        row = b * Pc + pt  # (BLOCK,) int64
        px = tl.load(p_ptr + row * 3, mask=ok, other=0.0)
        py = tl.load(p_ptr + row * 3 + 1, mask=ok, other=0.0)
        pz = tl.load(p_ptr + row * 3 + 2, mask=ok, other=0.0)
        best = tl.zeros((BLOCK,), dtype=tl.float64)
        bx = tl.zeros((BLOCK,), dtype=tl.float64)
        by = tl.zeros((BLOCK,), dtype=tl.float64)
        bz = tl.zeros((BLOCK,), dtype=tl.float64)
        bslot = tl.zeros((BLOCK,), dtype=tl.int64)
        for j in range(K):
            g = tl.load(gidx_ptr + row * K + j, mask=ok, other=0)
            for s in range(G):
                slot = g * G + s  # (BLOCK,) int64
                t = (b * S + slot) * 9
                ax = tl.load(tri_ptr + t, mask=ok, other=0.0)
                ay = tl.load(tri_ptr + t + 1, mask=ok, other=0.0)
                az = tl.load(tri_ptr + t + 2, mask=ok, other=0.0)
                cbx = tl.load(tri_ptr + t + 3, mask=ok, other=0.0)
                cby = tl.load(tri_ptr + t + 4, mask=ok, other=0.0)
                cbz = tl.load(tri_ptr + t + 5, mask=ok, other=0.0)
                ccx = tl.load(tri_ptr + t + 6, mask=ok, other=0.0)
                ccy = tl.load(tri_ptr + t + 7, mask=ok, other=0.0)
                ccz = tl.load(tri_ptr + t + 8, mask=ok, other=0.0)
                vld = tl.load(valid_ptr + b * S + slot, mask=ok, other=0) != 0
                qx, qy, qz = _closest_on_triangle(px, py, pz, ax, ay, az, cbx, cby, cbz, ccx, ccy, ccz)
                ex, ey, ez = px - qx, py - qy, pz - qz
                d = tl.where(vld, _dot3(ex, ey, ez, ex, ey, ez), float("inf"))
                # strict <: the first minimum wins, as torch's min; the first candidate is always taken, so all
                # invalid candidates give (inf, first slot, first candidate's point) as in _search_groups
                take = (d < best) | ((j == 0) & (s == 0))
                best = tl.where(take, d, best)
                bslot = tl.where(take, slot, bslot)
                bx = tl.where(take, qx, bx)
                by = tl.where(take, qy, by)
                bz = tl.where(take, qz, bz)
        tl.store(sq_ptr + row, best, mask=ok)
        tl.store(slot_ptr + row, bslot, mask=ok)
        tl.store(q_ptr + row * 3, bx, mask=ok)
        tl.store(q_ptr + row * 3 + 1, by, mask=ok)
        tl.store(q_ptr + row * 3 + 2, bz, mask=ok)


def search_groups(
    p: torch.Tensor, gidx: torch.Tensor, tri_s: torch.Tensor, valid: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact search of the candidate groups of every point (the kernel form of `pointmesh._search_groups`).

    Args:
        p: (B, Pc, 3) float64 points.
        gidx: (B, Pc, k) integer group indices (group g holds slots g * group_size ... + group_size - 1).
        tri_s: (B, nG * group_size, 3, 3) float64 triangles in group order.
        valid: (B, nG * group_size) bool, False for padding slots (never chosen unless all candidates are).
        group_size: G, triangles per group.

    Returns:
        squared distance (B, Pc) float64, closest point (B, Pc, 3) float64 and group-ordered slot (B, Pc) int64
        of the first candidate attaining the minimum.
    """
    if not available(p):
        raise RuntimeError("the Triton closest-point search needs Triton (shipped with CUDA builds of torch) and a "
                           f"CUDA tensor (or TRITON_INTERPRET=1); got a {p.device.type} tensor, Triton "
                           f"{'installed' if triton is not None else 'not installed'}")
    B, Pc, k = gidx.shape
    S = tri_s.shape[1]
    if p.shape != (B, Pc, 3) or tri_s.shape != (B, S, 3, 3) or valid.shape != (B, S) or S % group_size:
        raise ValueError(f"search_groups: inconsistent shapes p {tuple(p.shape)}, gidx {tuple(gidx.shape)}, tri_s "
                         f"{tuple(tri_s.shape)}, valid {tuple(valid.shape)}, group_size {group_size}")
    if p.dtype != torch.float64 or tri_s.dtype != torch.float64 or valid.dtype != torch.bool:
        raise ValueError(f"search_groups: expected float64 p and tri_s and bool valid, got {p.dtype}, "
                         f"{tri_s.dtype}, {valid.dtype}")
    sq = p.new_empty(B, Pc)
    q = p.new_empty(B, Pc, 3)
    slot = torch.empty(B, Pc, dtype=torch.int64, device=p.device)
    if B == 0 or Pc == 0:
        return sq, q, slot
    if k == 0:
        raise ValueError("search_groups: every point needs at least one candidate group")
    grid = (triton.cdiv(Pc, LAUNCH["block"]), B)
    _search_groups_kernel[grid](
        p.contiguous(), gidx.to(torch.int64).contiguous(), tri_s.contiguous(), valid.contiguous().view(torch.uint8),
        sq, q, slot, Pc, k, group_size, S, BLOCK=LAUNCH["block"], num_warps=LAUNCH["num_warps"],
    )
    return sq, q, slot
