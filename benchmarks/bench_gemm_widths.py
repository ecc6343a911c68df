"""cuBLAS time of the IdGen training GEMMs at padded widths: is a 304-wide layer worth padding further?

IdGen's widest layers have 300 true channels; training pads them to 304 (`Denoiser.padded()`, multiples of 8).
For each padded width C this times, in bf16 at `--rows` rows, the three GEMMs of a Linear (forward y = x W^T,
input gradient dx = dy W, weight gradient dW = dy^T x) for the attention q/k/v projection (C -> 6,144) and a
FiLM block's Linears (C -> C and 2C -> C, the up path's concatenated input). "useful" TFLOP/s counts the true
300-channel work only, so a wider padding pays off only where its useful rate goes up.

    python benchmarks/bench_gemm_widths.py --json $OUT/gemm_widths.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def time_us(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def linear_gemms(rows: int, c_in: int, c_out: int) -> dict[str, float]:
    """Microseconds of forward, input-gradient and weight-gradient GEMMs of a (c_in -> c_out) Linear."""
    x = torch.randn(rows, c_in, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(c_out, c_in, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(rows, c_out, device="cuda", dtype=torch.bfloat16)
    return {"forward": time_us(lambda: x @ w.t()), "input_grad": time_us(lambda: dy @ w),
            "weight_grad": time_us(lambda: dy.t() @ x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--true-width", type=int, default=300)
    ap.add_argument("--widths", default="300,304,312,320,384", help="comma list of padded widths to time")
    ap.add_argument("--qkv", type=int, default=6144, help="output width of the q/k/v projection")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs CUDA")
    true = args.true_width
    layers = {  # name -> (c_in, c_out) as functions of the padded width, and the true (c_in, c_out)
        "qkv": (lambda c: (c, args.qkv), (true, args.qkv)),
        "film_lin": (lambda c: (c, c), (true, true)),
        "film_up": (lambda c: (2 * c, c), (2 * true, true)),
    }
    rows_out = []
    for c in (int(v) for v in args.widths.split(",")):
        for name, (shape, (t_in, t_out)) in layers.items():
            c_in, c_out = shape(c)
            times = linear_gemms(args.rows, c_in, c_out)
            useful = 2 * args.rows * t_in * t_out  # FLOP of one GEMM at the true widths
            for gemm, us in times.items():
                rows_out.append({"width": c, "layer": name, "gemm": gemm, "c_in": c_in, "c_out": c_out, "us": us,
                                 "useful_tflops": useful / us / 1e6})
    name = torch.cuda.get_device_name()
    print(f"device: {name}, {args.rows} rows, bf16; useful = FLOP at {true} true channels")
    print(f"{'layer':9} {'gemm':12} " + " ".join(f"{'C=' + w:>15}" for w in args.widths.split(",")))
    for layer in layers:
        for gemm in ("forward", "input_grad", "weight_grad"):
            cells = [r for r in rows_out if r["layer"] == layer and r["gemm"] == gemm]
            print(f"{layer:9} {gemm:12} " + " ".join(f"{r['us']:7.1f}us {r['useful_tflops']:4.0f}T" for r in cells))
    for c in args.widths.split(","):
        total = sum(r["us"] for r in rows_out if r["width"] == int(c))
        print(f"C={c}: all nine GEMMs {total:.1f} us")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "args": vars(args) | {"json": str(args.json)},
                                         "rows": rows_out}, indent=1))


if __name__ == "__main__":
    main()
