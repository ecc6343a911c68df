"""Feature precompute throughput: ArcFace iresnet100 + FaRL ViT-B/16 encoding (issue 4; issue 8, goal 6).

Random weights (`weights=random`; the cost does not depend on them) on random inputs already in memory, so
this measures the encoders, not JPEG decoding. Rows: one image per call (a naive per-image loop: the
baseline) and batched (`--batch`), fp32 on the CPU, bf16 autocast on CUDA. Prints a table and JSON.

    python benchmarks/bench_features.py --device cpu --batch 32 --images 64
    python benchmarks/bench_features.py --device cuda --batch 256 --images 4096 --json $OUT/features.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer.encoders import ArcFaceEncoder, FaRLEncoder  # noqa: E402


def rate(enc: torch.nn.Module, size: int, batch: int, images: int, device: str, bf16: bool) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    calls = max(1, images // batch)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        enc(x)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            enc(x)
        if device == "cuda":
            torch.cuda.synchronize()
    return calls * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--baseline-images", type=int, default=None, help="images for the batch-1 rows")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dev = args.device
    bf16 = dev == "cuda"
    encs = {"arcface-r100": (ArcFaceEncoder(weights="random", arch="r100", freeze="all"), 112),
            "farl-vitb16": (FaRLEncoder(weights="random"), 224)}
    rows = []
    for name, (enc, size) in encs.items():
        enc = enc.to(dev).eval()
        base_n = args.baseline_images or max(4, args.images // 16)
        base = rate(enc, size, 1, base_n, dev, bf16)
        fast = rate(enc, size, args.batch, args.images, dev, bf16)
        rows.append({"encoder": name, "baseline_batch1_images_per_s": base, "batch": args.batch,
                     "images_per_s": fast, "speedup": fast / base})
    both = 1 / sum(1 / r["images_per_s"] for r in rows)
    dev_name = torch.cuda.get_device_name() if dev == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name}  precision: {'bf16' if bf16 else 'fp32'}")
    print(f"{'encoder':14s} {'batch 1 img/s':>14s} {'batch':>6s} {'img/s':>9s} {'speedup':>8s}")
    for r in rows:
        print(f"{r['encoder']:14s} {r['baseline_batch1_images_per_s']:14.1f} {r['batch']:6d} "
              f"{r['images_per_s']:9.1f} {r['speedup']:8.1f}")
    print(f"ArcFace + FaRL per image, batched: {both:.1f} images/s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": dev_name, "rows": rows, "both_images_per_s": both}, indent=1))


if __name__ == "__main__":
    main()
