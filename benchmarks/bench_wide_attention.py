"""The wide (300-channel) attention blocks of IdGen in sampling, alone (issue 8, goal 1): the cuBLAS q/k/v
projection followed by `token_attention_pool`, whole or in row chunks whose q/k/v tile fits the GPU's L2 cache.

Unchunked, the bf16 (rows, 6,144) q/k/v tensor goes to memory and back (629 MB each way at 51,200 rows). In row
chunks of `c` rows the projection writes a (c, 6,144) workspace that the attention kernel reads next; the same
workspace serves every chunk, so if it fits in L2 (H100: 50 MB; 2,048 rows are 25 MB) its lines may be read
back from L2 and rewritten before they are ever evicted. Times every form as CUDA-graph replays (as sampling
runs it), microseconds per call, and the largest difference of each chunked form from the unchunked one.

    python benchmarks/bench_wide_attention.py --rows 51200 --chunks 1024,2048,4096,8192 --json $OUT/wide.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_token_attention import timed_us  # noqa: E402
from ofer.models import token_attention_kernel as tak  # noqa: E402

T, H, DH = 16, 4, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=51_200)
    ap.add_argument("--width", type=int, default=304, help="attention input channels (IdGen padded: 304)")
    ap.add_argument("--chunks", default="1024,2048,4096,8192", help="rows per chunk, comma-separated")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    bf = torch.bfloat16
    x = torch.nn.functional.normalize(torch.randn(args.rows, args.width, device="cuda"), dim=-1)
    x = x.mul(args.width**0.5).to(bf)
    wqkv = (torch.randn(T * 3 * H * DH, args.width, device="cuda") * args.width**-0.5).to(bf)
    w = torch.randn(T, device="cuda")
    n = T * 3 * H * DH

    def whole(x: torch.Tensor) -> torch.Tensor:
        return tak.token_attention_pool(torch.nn.functional.linear(x, wqkv), w, T, H, DH, bf)

    def gemm(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, wqkv)

    qkv_full = gemm(x)

    def pool(x: torch.Tensor) -> torch.Tensor:
        return tak.token_attention_pool(qkv_full, w, T, H, DH, bf)

    def chunked(c: int):  # noqa: ANN202
        buf = torch.empty(c, n, device="cuda", dtype=bf)
        out = torch.empty(args.rows, H * DH, device="cuda", dtype=bf)

        def run(x: torch.Tensor) -> torch.Tensor:
            for s in range(0, x.shape[0], c):
                e = min(s + c, x.shape[0])
                q = buf[: e - s]
                torch.mm(x[s:e], wqkv.t(), out=q)
                out[s:e] = tak.token_attention_pool(q, w, T, H, DH, bf)
            return out
        return run

    def gemm_chunked(c: int):  # noqa: ANN202
        buf = torch.empty(c, n, device="cuda", dtype=bf)

        def run(x: torch.Tensor) -> torch.Tensor:
            for s in range(0, x.shape[0], c):
                e = min(s + c, x.shape[0])
                torch.mm(x[s:e], wqkv.t(), out=buf[: e - s])
            return buf
        return run

    forms = {"projection + attention, whole": whole, "projection alone, whole": gemm,
             "attention alone, whole": pool}
    for c in (int(v) for v in args.chunks.split(",")):
        forms[f"projection + attention, chunks of {c}"] = chunked(c)
        forms[f"projection alone, chunks of {c}"] = gemm_chunked(c)
    ref = whole(x).float()
    out = {"device": torch.cuda.get_device_name(), "rows": args.rows, "width": args.width, "forms": []}
    for name, fn in forms.items():
        try:
            us = timed_us(fn, x, args.iters)
            row = {"form": name, "us_per_call": us}
            if name.startswith("projection + attention"):
                row["max_abs_diff"] = float((fn(x).float() - ref).abs().max())
        except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
            row = {"form": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        out["forms"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
