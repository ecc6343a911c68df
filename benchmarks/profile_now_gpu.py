"""Where the CUDA NoW scorer spends its time (issue 8, goal 3): closest-point calls per batch, their share of
the batched dogleg, and a (k, group_size) sweep of `closest_points_torch`. Prints a table and JSON.

    python benchmarks/profile_now_gpu.py --images 32 --json $OUT/now_profile.json
    python benchmarks/profile_now_gpu.py --images 32 --configs 8x16c,8x16t,8x16ct --json $OUT/now_profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ofer.eval.now as now  # noqa: E402
from benchmarks.bench_now import make_inputs, prepare  # noqa: E402
from ofer.eval.pointmesh import closest_points_torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--configs", default="8x16,8x16c,16x8c,8x8c,4x32c,16x16c",
                    help="k x group_size of closest_points_torch; suffix c = compile=True, t = triton=True "
                         "(Triton search kernel), ct = both")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    scan_v, scan_l, preds = make_inputs(args.images, 120_000, 0)
    X, aligned, faces = prepare(scan_v, scan_l, preds)
    out = {"device": torch.cuda.get_device_name(), "images": args.images, "points": len(X), "rows": []}
    ref = None
    for cfg in args.configs.split(","):
        flags = cfg.lstrip("0123456789x")
        comp, tri = "c" in flags, "t" in flags
        k, g = (int(v) for v in cfg.rstrip("ct").split("x"))
        calls, call_s = [0], [0.0]

        def timed(*a, k=k, g=g, comp=comp, tri=tri, **kw):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            kw.pop("compile", None)
            kw.pop("triton", None)
            r = closest_points_torch(*a, k=k, group_size=g, compile=comp, triton=tri, **kw)
            torch.cuda.synchronize()
            calls[0] += 1
            call_s[0] += time.perf_counter() - t0
            return r

        now.closest_points_torch = timed
        try:
            now.refine_alignment([X] * len(aligned), aligned, faces, device="cuda")  # warm-up
            calls[0], call_s[0] = 0, 0.0
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = now.refine_alignment([X] * len(aligned), aligned, faces, device="cuda")
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            d = torch.tensor([float(abs(x).max()) for x in res.distances])
            if ref is None:
                ref = res.distances
            diff = max(float(abs(a - b).max()) for a, b in zip(ref, res.distances))
            row = {"k": k, "group_size": g, "compile": comp, "triton": tri, "s_per_batch": total, "images_per_s": len(aligned) / total,
                   "closest_calls": calls[0], "closest_s": call_s[0], "closest_share": call_s[0] / total,
                   "max_diff_vs_first": diff, "max_dist": float(d.max())}
        except Exception as exc:  # noqa: BLE001
            row = {"k": k, "group_size": g, "error": f"{type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(row), flush=True)
        out["rows"].append(row)
    now.closest_points_torch = closest_points_torch
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        now.refine_alignment([X] * len(aligned), aligned, faces, device="cuda")
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
