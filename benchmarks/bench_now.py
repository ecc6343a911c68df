"""NoW scorer throughput on NoW-sized synthetic inputs (issue 6).

Inputs: a dense noisy head scan (~120k vertices, cropped by the NoW rule to tens of thousands) and FLAME-sized
predictions (`synthetic_head`: 5042 vertices / 10080 faces, FLAME has 5023 / 9976), each image with another
head shape and pose. Rows (seconds per image, images per second):
  * ours-cpu: `refine_alignment` on the CPU (libigl AABB closest points), one image after the other;
  * ours-cuda: `refine_alignment` on CUDA, `--batch-size` images per batched dogleg (torch closest points);
    ours-cuda-compile: the same with the compiled closest-point search (`compile=True`), ours-cuda-triton with
    the exact search as a Triton kernel (`triton=True`), ours-cuda-compile-triton with both;
  * baseline: trimesh closest points + `scipy.optimize.least_squares` over the 7 parameters (2-point
    Jacobian), i.e. what one writes without the official optimiser, on `--baseline-images` images.
Crop and Procrustes are included in every row (they are the same code). Also reported: the largest
per-vertex difference between the CPU and CUDA results (and between ours-cuda and each other CUDA row), and the
baseline's median error next to ours.
Prints a table and a JSON line; `--json PATH` writes the JSON too.

    PYTHONPATH=. python benchmarks/bench_now.py --images 4 --devices cpu --json /tmp/now.json
    PYTHONPATH=. python benchmarks/bench_now.py --images 64 --batch-size 32 --devices cpu,cuda --json $OUT/now.json
    PYTHONPATH=. python benchmarks/bench_now.py --images 256 --batch-size 32 --baseline-images 0 \
        --devices cuda,cuda-compile,cuda-triton,cuda-compile-triton --json $OUT/now_triton.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import trimesh
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from ofer.eval.now import crop_scan, landmark_similarity, refine_alignment
from ofer.eval.now_synthetic import densify_scan, synthetic_head


def make_inputs(n_images: int, scan_vertices: int, seed: int):
    """One dense scan with landmarks, and n_images predictions (vertices in metres, faces, landmarks)."""
    rng = np.random.default_rng(seed)
    # A frontal scan like NoW's: the head in front of z = -20 mm (about 60% of a full head's vertices).
    n_lat = int(np.sqrt(scan_vertices / 0.6 / 2)) + 1
    v, f, lm = synthetic_head(n_lat=n_lat, n_lon=2 * n_lat)
    keep = v[:, 2] > -20.0
    f = f[keep[f].all(1)]
    v, f = v[keep], (np.cumsum(keep) - 1)[f]
    scan_v, _ = densify_scan(v, f, target_vertices=0, noise_mm=0.1, hole_fraction=0.03, seed=seed, protect_points=lm)
    scan_l = lm.astype(np.float32)
    preds = []
    for _ in range(n_images):
        params = {
            "a": 75 + rng.normal() * 3, "b": 95 + rng.normal() * 3, "c": 88 + rng.normal() * 3,
            "nose": 24 + rng.normal() * 3, "brow": 6 + rng.normal(), "eyes": 7 + rng.normal(),
            "cheeks": 4 + rng.normal(), "lips": 5 + rng.normal(),
        }
        pv, pf, pl = synthetic_head(n_lat=72, n_lon=72, params=params)
        R = Rotation.from_rotvec(rng.normal(size=3) * 0.3).as_matrix()
        t = rng.normal(size=3) * 0.05
        # FLAME-like output in metres in its own frame; landmarks with ~1 mm annotation noise
        pl = pl + rng.normal(size=pl.shape)
        preds.append(((pv / 1000.0) @ R.T + t, pf, ((pl / 1000.0) @ R.T + t).astype(np.float32)))
    return scan_v, scan_l, preds


def prepare(scan_v, scan_l, preds):
    idx = crop_scan(scan_v, scan_l)
    X = scan_v[idx]
    return X, [landmark_similarity(scan_l, pl).apply(pv) for pv, _, pl in preds], [pf for _, pf, _ in preds]


def run_ours(scan_v, scan_l, preds, *, device: str, batch_size: int, compile: bool = False, triton: bool = False):
    t0 = time.perf_counter()
    X, aligned, faces = prepare(scan_v, scan_l, preds)
    dists = []
    step = batch_size if device != "cpu" else 1
    for s in range(0, len(preds), step):
        res = refine_alignment([X] * len(aligned[s:s + step]), aligned[s:s + step], faces[s:s + step], device=device,
                               compile=compile and device != "cpu", triton=triton)
        dists.extend(res.distances)
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, dists


def run_baseline(scan_v, scan_l, preds, *, max_nfev: int | None):
    t0 = time.perf_counter()
    X, aligned, faces = prepare(scan_v, scan_l, preds)
    dists, nfev = [], []
    for V, F in zip(aligned, faces):
        def fun(th, V=V, F=F):
            R = Rotation.from_rotvec(th[1:4]).as_matrix()
            mesh = trimesh.Trimesh(th[0] * V @ R.T + th[4:], F, process=False)
            _, d, _ = trimesh.proximity.closest_point(mesh, X)
            return np.append(d, 100 * (abs(th[0]) - th[0]))

        sol = least_squares(fun, np.array([1.0, 0, 0, 0, 0, 0, 0]), max_nfev=max_nfev)
        dists.append(fun(sol.x)[:-1])
        nfev.append(int(sol.nfev))
    return time.perf_counter() - t0, dists, nfev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--scan-vertices", type=int, default=120_000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--devices", default="cpu,cuda", help="comma list of cpu, cuda, cuda-compile (compiled "
                    "closest-point search), cuda-triton (Triton search kernel), cuda-compile-triton (both); CUDA "
                    "rows skipped when unavailable")
    ap.add_argument("--cpu-images", type=int, default=None, help="images for the CPU row (default: all)")
    ap.add_argument("--baseline-images", type=int, default=1, help="images for the baseline row (0: skip)")
    ap.add_argument("--baseline-max-nfev", type=int, default=60,
                    help="least_squares max_nfev (each is one trimesh closest-point pass; 0: scipy's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t = time.perf_counter()
    scan_v, scan_l, preds = make_inputs(args.images, args.scan_vertices, args.seed)
    n_crop = len(crop_scan(scan_v, scan_l))
    print(f"inputs: scan {len(scan_v)} vertices ({n_crop} cropped), {args.images} predictions of "
          f"{len(preds[0][0])} vertices / {len(preds[0][1])} faces (built in {time.perf_counter() - t:.1f} s)")
    out = {
        "scan_vertices": len(scan_v), "cropped_vertices": n_crop, "pred_vertices": len(preds[0][0]),
        "pred_faces": len(preds[0][1]), "images": args.images, "rows": {},
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "cpu_threads": torch.get_num_threads(),
    }
    results = {}
    for row in [d.strip() for d in args.devices.split(",") if d.strip()]:
        tri = row.endswith("-triton")
        dev = row.removesuffix("-triton")
        dev, comp = dev.removesuffix("-compile"), dev.endswith("-compile")
        if (comp or tri) and not dev.startswith("cuda"):
            raise SystemExit(f"--devices {row}: -compile / -triton rows are CUDA rows (cuda-compile, cuda-triton, "
                             "cuda-compile-triton)")
        if dev.startswith("cuda") and not torch.cuda.is_available():
            print(f"skip {row}: CUDA not available")
            continue
        subset = preds if dev != "cpu" or args.cpu_images is None else preds[: args.cpu_images]
        if dev != "cpu":  # warm-up with one full batch: CUDA context, allocator, kernels, and compilation for the
            # batch's shapes (a 2-image warm-up left the compiled rows recompiling inside the timed run)
            run_ours(scan_v, scan_l, subset[: min(args.batch_size, len(subset))], device=dev,
                     batch_size=args.batch_size, compile=comp, triton=tri)
        sec, dists = run_ours(scan_v, scan_l, subset, device=dev, batch_size=args.batch_size, compile=comp,
                              triton=tri)
        name = f"ours-{dev.split(':')[0]}" + ("-compile" if comp else "") + ("-triton" if tri else "")
        results[name] = dists
        out["rows"][name] = {"images": len(subset), "seconds": sec, "sec_per_image": sec / len(subset),
                             "images_per_sec": len(subset) / sec,
                             "median_mm": float(np.median(np.hstack(dists)))}
    if args.baseline_images > 0:
        subset = preds[: args.baseline_images]
        sec, dists, nfev = run_baseline(scan_v, scan_l, subset, max_nfev=args.baseline_max_nfev or None)
        results["baseline"] = dists
        out["rows"]["baseline"] = {"images": len(subset), "seconds": sec, "sec_per_image": sec / len(subset),
                                   "images_per_sec": len(subset) / sec,
                                   "median_mm": float(np.median(np.hstack(dists))), "nfev": nfev}
    diff_keys = []
    for name in results:
        if name.startswith("ours-cuda-") and "ours-cuda" in results:  # e.g. cuda_vs_cuda_compile_max_abs_mm
            key = "cuda_vs_" + name.removeprefix("ours-").replace("-", "_") + "_max_abs_mm"
            out[key] = float(max(np.abs(a - b).max() for a, b in zip(results["ours-cuda"], results[name])))
            diff_keys.append(key)
    if "ours-cpu" in results and "ours-cuda" in results:
        n = min(len(results["ours-cpu"]), len(results["ours-cuda"]))
        out["cpu_vs_cuda_max_abs_mm"] = float(max(np.abs(a - b).max() for a, b in
                                                  zip(results["ours-cpu"][:n], results["ours-cuda"][:n])))
    ref = results.get("ours-cpu") or results.get("ours-cuda")
    if "baseline" in results and ref:
        n = len(results["baseline"])
        out["rows"]["baseline"]["ours_median_mm_same_images"] = float(np.median(np.hstack(ref[:n])))
        out["baseline_vs_ours_median_abs_mm"] = float(np.median(np.abs(np.hstack(results["baseline"]) - np.hstack(ref[:n]))))

    print(f"\n{'row':<24} {'images':>6} {'s/image':>9} {'images/s':>9} {'median mm':>10}")
    for name, r in out["rows"].items():
        print(f"{name:<24} {r['images']:>6} {r['sec_per_image']:>9.3f} {r['images_per_sec']:>9.2f} {r['median_mm']:>10.4f}")
    for k in ("cpu_vs_cuda_max_abs_mm", *diff_keys, "baseline_vs_ours_median_abs_mm"):
        if k in out:
            print(f"{k}: {out[k]:.2e}")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
