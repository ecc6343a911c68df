"""All-reduce bandwidth between the GPUs of one host: what DDP's gradient sync costs on this machine (issue 8, goal 5).

DDP sums every gradient across the processes once per step. Whether that hides behind the backward depends on the
step's length and on the link between the GPUs (NVLink with peer-to-peer access, or through host memory when the
GPUs cannot reach each other directly, as in some virtual machines). This times `dist.all_reduce` of buffers of
the size of a model's gradients (default: IdGen's 12.45 M and ExpGen's 3.16 M parameters, in float32 as DDP's
buckets hold them, and bf16) and prints the time per call, the algorithm bandwidth (bytes / time) and the bus
bandwidth (2 (n - 1) / n of it, NCCL's measure), with the result checked against the closed-form sum.

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_allreduce.py --json $OUT/allreduce.json
    torchrun --standalone --nproc_per_node=2 benchmarks/bench_allreduce.py --cpu   # gloo, a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_ELEMENTS = "12450000,3160000"  # IdGen, ExpGen: parameters used in the forward (issue 8)


def parse_elements(spec: str) -> list[int]:
    """Comma list of positive buffer sizes in elements."""
    try:
        sizes = [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--elements: expected a comma list of positive integers, got {spec!r}") from None
    if not sizes or min(sizes) <= 0:
        raise SystemExit(f"--elements: expected a comma list of positive integers, got {spec!r}")
    return sizes


def time_all_reduce(n: int, dtype: torch.dtype, device: torch.device, calls: int, warmup: int) -> float:
    """Seconds per all_reduce of n elements (mean over `calls`, after `warmup`); raises if the sum is wrong."""
    world, rank = dist.get_world_size(), dist.get_rank()
    buf = torch.full((n,), float(rank + 1), dtype=dtype, device=device)
    for _ in range(warmup):
        buf.fill_(rank + 1)
        dist.all_reduce(buf)
    expected = world * (world + 1) / 2  # sum of rank + 1 over the ranks: exact in bf16 for small worlds
    if not torch.all(buf == expected):
        raise RuntimeError(f"all_reduce of {n} {dtype} elements gave {buf[:4].tolist()}..., expected {expected}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()
    t = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--elements", default=DEFAULT_ELEMENTS, help="comma list of buffer sizes (elements)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="gloo on the CPU (a smoke run)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sizes = parse_elements(args.elements)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    bad = [d for d in args.dtypes.split(",") if d not in dtypes]
    if bad:
        ap.error(f"--dtypes: unknown {bad}; expected a comma list of {sorted(dtypes)}")
    if "WORLD_SIZE" not in os.environ:
        ap.error("run under torchrun (e.g. torchrun --standalone --nproc_per_node=2 benchmarks/bench_allreduce.py)")
    dist.init_process_group("gloo" if args.cpu else "nccl")
    if args.cpu:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    out = {"world_size": world, "backend": dist.get_backend(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "peer_access": (torch.cuda.can_device_access_peer(0, 1)
                           if device.type == "cuda" and torch.cuda.device_count() > 1 else None),
           "rows": []}
    for name in args.dtypes.split(","):
        for n in sizes:
            s = time_all_reduce(n, dtypes[name], device, args.calls, args.warmup)
            nbytes = n * dtypes[name].itemsize
            row = {"elements": n, "dtype": name, "mb": nbytes / 1e6, "ms_per_call": s * 1e3,
                   "algbw_gb_s": nbytes / s / 1e9, "busbw_gb_s": nbytes / s / 1e9 * 2 * (world - 1) / world}
            out["rows"].append(row)
    if rank == 0:
        print(f"{out['device']} x{world}, backend {out['backend']}, peer access 0->1: {out['peer_access']}")
        print(f"{'elements':>10s} {'dtype':>9s} {'MB':>8s} {'ms/call':>9s} {'algbw GB/s':>11s} {'busbw GB/s':>11s}")
        for r in out["rows"]:
            print(f"{r['elements']:10d} {r['dtype']:>9s} {r['mb']:8.1f} {r['ms_per_call']:9.3f} "
                  f"{r['algbw_gb_s']:11.1f} {r['busbw_gb_s']:11.1f}")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
