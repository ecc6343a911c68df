"""The attention blocks' output map and residual add in sampling, alone (issue 8, goal 1): `attention_output`
(x + pooled @ W.T + b in one kernel) at each launch, against the cuBLAS Linear followed by the add (eager, and the
two compiled by torch.compile as the compiled step runs them), at the paper's widths (IdGen 304, 56, 16 output
channels; ExpGen 56, 32, 16) in bf16. Times are CUDA-graph replays, microseconds per call, with the memory floor
(pooled, x and the output moved once) at the bandwidth of a large copy measured in the same run.

    python benchmarks/bench_attention_output.py --rows 51200 --launches 128x64x4,64x64x4,128x128x8 --json $OUT/o.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_token_attention import timed_us  # noqa: E402
from ofer.models import token_attention_kernel as tak  # noqa: E402


def parse_launch(spec: str) -> dict:
    parts = spec.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SystemExit(f"--launches: {spec!r} is not ROWSxCOLSxWARPS (three positive integers, e.g. 128x64x4)")
    rows, cols, warps = (int(p) for p in parts)
    if rows & (rows - 1) or cols & (cols - 1) or cols < 16 or rows < 16:
        raise SystemExit(f"--launches: {spec!r}: rows and cols must be powers of two >= 16")
    return {"block_rows": rows, "block_cols": cols, "num_warps": warps}


def copy_gbps(rows: int) -> float:
    """Bandwidth of a large device-to-device copy (read + write bytes per second)."""
    a = torch.empty(rows * 512, dtype=torch.bfloat16, device="cuda")
    us = timed_us(lambda t: t.clone(), a, 20)
    return 2 * a.numel() * 2 / (us * 1e-6) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=51_200)
    ap.add_argument("--widths", default="304,56,32,16")
    ap.add_argument("--launches", default="128x64x4")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    launches = [parse_launch(s) for s in args.launches.split(",")]
    gbps = copy_gbps(args.rows)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows,
           "copy_gbps": gbps, "results": []}
    print(f"{out['device']}  rows {args.rows}  copy bandwidth {gbps:.0f} GB/s")
    gen = torch.Generator(device="cuda").manual_seed(0)
    default = dict(tak.OUTPUT_LAUNCH)
    for n in (int(v) for v in args.widths.split(",")):
        p = torch.randn(args.rows, 128, device="cuda", generator=gen).bfloat16()
        w = (torch.randn(n, 128, device="cuda", generator=gen) * 128**-0.5).bfloat16()
        b = torch.randn(n, device="cuda", generator=gen)
        x = torch.randn(args.rows, n, device="cuda", generator=gen).bfloat16()
        floor_us = (p.numel() + 2 * x.numel()) * 2 / (gbps * 1e9) * 1e6
        ref = tak.attention_output_reference(p, w, b, x)
        bb = b.bfloat16()
        compiled = torch.compile(lambda t: t + F.linear(p, w, bb), dynamic=False)
        rows = [("linear + add, eager", lambda t: t + F.linear(p, w, bb), None),
                ("linear + add, compiled", compiled, None)]
        rows += [(f"attention_output {la['block_rows']}x{la['block_cols']}x{la['num_warps']}",
                  lambda t: tak.attention_output(p, w, b, t), la) for la in launches]
        for name, fn, launch in rows:
            tak.OUTPUT_LAUNCH.update(launch or default)
            try:
                us = timed_us(fn, x, args.iters)
                err = float((fn(x).double() - ref).abs().max())
                row = {"width": n, "form": name, "launch": launch, "us": us, "floor_us": floor_us,
                       "of_floor": floor_us / us, "max_err": err}
            except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
                row = {"width": n, "form": name, "launch": launch, "error": f"{type(exc).__name__}: {exc}"[:300]}
            tak.OUTPUT_LAUNCH.update(default)
            out["results"].append(row)
            if "us" in row:
                print(f"N={n:4d}  {name:34s} {row['us']:8.1f} us  floor {floor_us:6.1f} us "
                      f"({100 * row['of_floor']:4.0f}%)  max err {row['max_err']:.3g}", flush=True)
            else:
                print(f"N={n:4d}  {name:34s} {row['error']}", flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
