"""Where the GPU time of a profiled step goes, from a Chrome trace of torch.profiler (issue 8).

Reads a trace written by `bench_training.py --profile auto --trace DIR` or `bench_trainer.py --profile --trace DIR`
(CPU ops recorded with their input shapes) and prints the kernel time by kind (cuBLAS GEMMs, our attention
kernels, inductor's Triton kernels, other), the kernels with the most time (with their most common launch
shape: blocks, threads per block, registers per thread), the GEMM time per launching aten op
and input shapes (each kernel is matched to the runtime/driver call that launched it, same correlation id, and
that call to the innermost CPU op around it on the same thread), and where the GPU waits: its busy time, the gaps
between kernels and what the host did meanwhile.

    python benchmarks/trace_kernels.py docs/bench/train_trace_idgen_65536_h100.json.gz
"""
from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import Counter, defaultdict
from pathlib import Path


def load_trace(path: Path) -> list[dict]:
    """The trace's events, from a .json or .json.gz Chrome trace."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: not a readable Chrome trace ({exc})") from None
    events = data.get("traceEvents") if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise SystemExit(f"{path}: expected a Chrome trace with a 'traceEvents' list")
    return events


def kind_of(name: str) -> str:
    """GEMM (cuBLAS / cuBLASLt / CUTLASS), attention (our Triton kernels), inductor (its Triton kernels), other."""
    if "nvjet" in name or "gemm" in name.lower() or "splitKreduce" in name or "cutlass" in name:
        return "gemm"
    if "token_attention" in name or "project_pool" in name:
        return "attention"
    if name.startswith("triton_"):
        return "inductor"
    return "other"


def summarize(events: list[dict]) -> dict:
    """Kernel microseconds by kind, by kernel name, and GEMM microseconds by (launching op, input shapes)."""
    kernels = [e for e in events if e.get("cat") == "kernel"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    ops_by_thread: dict = defaultdict(list)
    frames_by_thread: dict = defaultdict(list)  # Python frames of this package (traces recorded with_stack)
    for e in events:
        if e.get("cat") == "cpu_op":
            ops_by_thread[e["tid"]].append(e)
        elif e.get("cat") == "python_function" and "ofer/" in e.get("name", ""):
            frames_by_thread[e["tid"]].append(e)
    starts, frame_starts = {}, {}
    for table, first in ((ops_by_thread, starts), (frames_by_thread, frame_starts)):
        for tid, evs in table.items():
            evs.sort(key=lambda o: o["ts"])
            first[tid] = [o["ts"] for o in evs]

    def innermost(launch: dict, table: dict, first: dict) -> dict | None:
        evs, t0, t1 = table.get(launch["tid"], []), launch["ts"], launch["ts"] + launch.get("dur", 0)
        best = None
        for o in evs[: bisect.bisect_right(first.get(launch["tid"], []), t0)]:
            if o["ts"] + o.get("dur", 0) >= t1 and (best is None or o.get("dur", 0) < best.get("dur", 0)):
                best = o
        return best

    def launching_op(launch: dict) -> dict | None:
        return innermost(launch, ops_by_thread, starts)

    by_kind: dict = defaultdict(float)
    by_name: dict = defaultdict(lambda: [0.0, 0])
    launch_by_name: dict = defaultdict(Counter)  # (grid, block, registers per thread) of each kernel's launches
    gemm_by_op: dict = defaultdict(lambda: [0.0, 0])
    other_by_frame: dict = defaultdict(lambda: [0.0, 0])
    for k in kernels:
        dur, name = float(k.get("dur", 0)), k["name"]
        kind = kind_of(name)
        by_kind[kind] += dur
        by_name[name][0] += dur
        by_name[name][1] += 1
        args = k.get("args", {})
        if "grid" in args and "block" in args:
            launch_by_name[name][(tuple(args["grid"]), tuple(args["block"]), args.get("registers per thread"))] += 1
        if kind == "gemm":
            launch = launches.get(k.get("args", {}).get("correlation"))
            op = launching_op(launch) if launch else None
            key = (op["name"], str(op.get("args", {}).get("Input Dims"))) if op else ("?", "?")
            gemm_by_op[key][0] += dur
            gemm_by_op[key][1] += 1
        elif kind == "other":  # kernels outside cuBLAS, ours and inductor's: where in this package they come from
            launch = launches.get(k.get("args", {}).get("correlation"))
            op = launching_op(launch) if launch else None
            frame = innermost(launch, frames_by_thread, frame_starts) if launch else None
            key = (op["name"] if op else "?", str(op.get("args", {}).get("Input Dims")) if op else "?",
                   frame["name"] if frame else "?")
            other_by_frame[key][0] += dur
            other_by_frame[key][1] += 1
    launches_of = {name: c.most_common(1)[0][0] for name, c in launch_by_name.items()}
    return {"total_us": sum(by_kind.values()), "by_kind": dict(by_kind), "by_name": dict(by_name),
            "launch_by_name": launches_of, "gemm_by_op": dict(gemm_by_op), "other_by_frame": dict(other_by_frame)}


def launch_text(launch: tuple | None) -> str:
    """'  [32768 x 32, 254 regs]' for a launch of grid (32768, 1, 1), block (32, 1, 1) and 254 registers per thread
    (how a 1-warp inductor reduction shows up); '' where the trace has no launch shape."""
    if launch is None:
        return ""
    grid, block, regs = launch
    blocks, threads = grid[0] * grid[1] * grid[2], block[0] * block[1] * block[2]
    return f"  [{blocks} x {threads}" + (f", {regs} regs]" if regs is not None else "]")


def idle_gaps(events: list[dict], min_us: float = 5.0) -> dict:
    """Where the GPU waits: the union of the kernel intervals (busy), its span from the first kernel's start to
    the last one's end, and every gap of at least `min_us` between busy intervals with the kernels on either side
    and the longest CPU ops that started inside it (what the host was doing)."""
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        return {"busy_us": 0.0, "span_us": 0.0, "gaps": []}
    ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    op_starts = [o["ts"] for o in ops]
    busy, gaps = 0.0, []
    start, end, last = kernels[0]["ts"], kernels[0]["ts"] + kernels[0].get("dur", 0), kernels[0]
    for k in kernels[1:]:
        k_end = k["ts"] + k.get("dur", 0)
        if k["ts"] > end:
            busy += end - start
            if k["ts"] - end >= min_us:
                inside = ops[bisect.bisect_left(op_starts, end): bisect.bisect_left(op_starts, k["ts"])]
                longest = sorted(inside, key=lambda o: -o.get("dur", 0))[:3]
                gaps.append({"us": k["ts"] - end, "before": last["name"], "after": k["name"],
                             "cpu_ops": [f"{o['name']} ({o.get('dur', 0):.0f} us)" for o in longest]})
            start, end = k["ts"], k_end
        elif k_end > end:
            end = k_end
        if k_end >= end:
            last = k
    busy += end - start
    return {"busy_us": busy, "span_us": end - kernels[0]["ts"], "gaps": gaps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace", type=Path)
    ap.add_argument("--top", type=int, default=25, help="rows of the per-kernel and per-op tables")
    args = ap.parse_args()
    events = load_trace(args.trace)
    s = summarize(events)
    total = s["total_us"] or 1.0
    print(f"{args.trace}: {s['total_us'] / 1e3:.2f} ms of kernel time")
    for kind, us in sorted(s["by_kind"].items(), key=lambda kv: -kv[1]):
        print(f"  {kind:10s} {us / 1e3:8.2f} ms  {100 * us / total:5.1f}%")
    print("kernels (us, calls, name, most common launch: blocks x threads per block, registers per thread):")
    for name, (us, n) in sorted(s["by_name"].items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {us:9.0f} {n:4d}  {name[:110]}{launch_text(s['launch_by_name'].get(name))}")
    print("GEMM time by launching op and input shapes (us, kernels, op, shapes):")
    for (op, dims), (us, n) in sorted(s["gemm_by_op"].items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {us:9.0f} {n:4d}  {op} {dims}")
    if s["other_by_frame"]:
        print("other kernels by launching op, shapes and innermost frame of this package (traces with_stack):")
        for (op, dims, frame), (us, n) in sorted(s["other_by_frame"].items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"  {us:9.0f} {n:4d}  {op} {dims} <- {frame}")
    idle = idle_gaps(events)
    if idle["span_us"]:
        waits = sum(g["us"] for g in idle["gaps"])
        print(f"GPU busy {idle['busy_us'] / 1e3:.2f} ms of a {idle['span_us'] / 1e3:.2f} ms span (first kernel to "
              f"last); {len(idle['gaps'])} gaps of 5 us or more, {waits / 1e3:.2f} ms. The largest (us, kernel "
              f"before -> after, longest CPU ops started in the gap):")
        for g in sorted(idle["gaps"], key=lambda g: -g["us"])[: args.top]:
            print(f"  {g['us']:8.0f}  {g['before'][:50]} -> {g['after'][:50]}  | {'; '.join(g['cpu_ops'])[:150]}")


if __name__ == "__main__":
    main()
