"""Would IdGen and ExpGen sampling gain from running concurrently on two CUDA streams? (issue 8, goal 1)

ExpGen does not depend on IdGen's samples (its condition is ArcFace (+) FaRL), so the pipeline could replay the
ExpGen sampler's CUDA graphs on a side stream while IdGen's run. This times the two graphed samplers of the
compiled fast pipeline (`bench_pipeline.build`, paper-sized denoisers, 100 samples per image) one after the other
and overlapped. Timing only: both samplers draw their noise from the default CUDA generator, whose graph-safe
seed/offset tensors are shared by all graphs, so concurrent replays would race on them; the pipeline would need a
private generator for the side stream (`CUDAGraph.register_generator_state`). Measured on an H100 (BENCHMARKS.md,
session of 2026-11-27, third): DDIM-25 at 4,096 images 1.228 -> 1.197 s per call, DDPM-1000 at 512 images
6.878 -> 6.877 s: not adopted.

    python benchmarks/bench_stream_overlap.py --batch 512 --sampler ddpm
    python benchmarks/bench_stream_overlap.py --batch 4096 --sampler ddim25
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_pipeline import build  # noqa: E402
from ofer.flame import FLAME  # noqa: E402
from ofer.synthetic.assets import ensure_synthetic_flame  # noqa: E402


def seconds(fn, repeats: int) -> float:
    fn()  # warm
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=512, help="images per call (100 samples each)")
    ap.add_argument("--sampler", default="ddpm", help="ddpm (1000 steps) or ddimN (e.g. ddim25)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.sampler == "ddpm":
        sampler = {"sampler": "ddpm"}
    elif args.sampler.startswith("ddim") and args.sampler[4:].isdigit():
        sampler = {"sampler": "ddim", "steps": int(args.sampler[4:])}
    else:
        ap.error(f"--sampler {args.sampler!r}: expected ddpm or ddimN, e.g. ddim25")
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    assets = ensure_synthetic_flame(Path(tempfile.mkdtemp()))
    flame = FLAME(assets.flame_model, masks_path=assets.masks).to("cuda")
    pipe = build("cuda", flame, fast=True, sampler=sampler, compile=True)
    b = args.batch
    arc = torch.nn.functional.normalize(torch.randn(b, 512, device="cuda"), dim=-1)
    farl = torch.randn(b, 512, device="cuda")
    ctx = torch.cat([arc, farl], -1)
    pipe(arc, farl)  # builds, compiles and captures both samplers
    torch.cuda.synchronize()
    dev = str(arc.device)
    id_sampler, exp_sampler = pipe._graphed[("id", b, 100, dev)], pipe._graphed[("exp", b, 100, dev)]
    side = torch.cuda.Stream()

    def one_after_the_other() -> None:
        id_sampler(arc, num_samples=100)
        exp_sampler(ctx, num_samples=100)

    def overlapped() -> None:
        main_stream = torch.cuda.current_stream()
        side.wait_stream(main_stream)
        id_sampler(arc, num_samples=100)
        with torch.cuda.stream(side):
            exp_sampler(ctx, num_samples=100)
        main_stream.wait_stream(side)

    out = {"device": torch.cuda.get_device_name(), "batch": b, "sampler": args.sampler,
           "idgen_s": seconds(lambda: id_sampler(arc, num_samples=100), args.repeats),
           "expgen_s": seconds(lambda: exp_sampler(ctx, num_samples=100), args.repeats),
           "one_after_the_other_s": seconds(one_after_the_other, args.repeats),
           "overlapped_s": seconds(overlapped, args.repeats)}
    out["speedup"] = out["one_after_the_other_s"] / out["overlapped_s"]
    print(json.dumps(out))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
