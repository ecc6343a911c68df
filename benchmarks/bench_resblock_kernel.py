"""The FiLM-block kernels (`ofer.models.resblock_kernel`) block by block, against the compiled PyTorch block
(issue 8, goal 1): microseconds per block at `--rows` rows, bf16 autocast, one FiLM row per `--samples` rows, each
timed as 20 calls replayed from one CUDA graph. The blocks are those of the padded IdGen and ExpGen copies that the
samplers run (widths 304/56/16 and 56/32/16; the up blocks with their concatenated input and skip Linear).
`--launches` sweeps the kernels' launch (rows x K chunk x warps x stages) for every width. `--norm-launches`
times the norm-only kernels (`film_norm_in` / `film_norm_out`, the 304-wide IdGen blocks inside torch.compile)
alone per `NORM_LAUNCH` (rows x warps), h read as the first half of a (rows, 608) matmul output as the up blocks
pass it, and skips the per-block table with `--models ''`.

    python benchmarks/bench_resblock_kernel.py --rows 51200 --launches 64x64x8x2,128x64x8x2 --json $OUT/rb.json
    python benchmarks/bench_resblock_kernel.py --rows 51200 --models '' --norm-launches 16x4,32x4,8x2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer import fast_sampling  # noqa: E402
from ofer.models import resblock_kernel as rk  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402

MODELS = {"idgen": dict(dim=300, cond_dim=512, widths=(300, 50, 10)),
          "expgen": dict(dim=53, cond_dim=1024, widths=(53, 25, 10))}


def graph_us(fn, iters: int = 20) -> float:
    """Microseconds per call of fn, from `iters` calls captured in one CUDA graph (median of 5 replays)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            fn()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    return sorted(times)[2]


def parse_launch(spec: str) -> dict:
    try:
        bm, bk, nw, st = (int(v) for v in spec.split("x"))
    except ValueError:
        raise SystemExit(f"--launches: {spec!r} is not rows x K chunk x warps x stages, e.g. 64x64x8x2") from None
    return {"block_rows": bm, "block_k": bk, "num_warps": nw, "stages": st}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=51_200)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--launches", default="", help="comma list of launches to sweep (default: the module's LAUNCH)")
    ap.add_argument("--models", default="idgen,expgen")
    ap.add_argument("--norm-launches", default="", help="comma list of NORM_LAUNCH rows x warps to time the "
                    "norm-only kernels with (304 wide)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": args.rows, "blocks": []}
    sweeps = [parse_launch(s) for s in args.launches.split(",") if s] or [None]
    if args.norm_launches:
        out["norm_kernels"] = norm_rows(args)
        if args.json:
            args.json.write_text(json.dumps(out, indent=1))
    for name in (m for m in args.models.split(",") if m):
        net = Denoiser(**MODELS[name])
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.05) if p.dim() > 1 else p.normal_(1.0, 0.2)
        net = net.padded().autocast_copy(torch.bfloat16).cuda().eval()
        blocks = {"down0": net.down_blocks[0][0], "up_last": net.up_blocks[-1][0], "down1": net.down_blocks[1][0],
                  "up_first": net.up_blocks[0][0], "mid": net.mid_block1}
        for bname, blk in blocks.items():
            k, n = blk.lin1.in_features, blk.lin1.out_features
            x = torch.randn(args.rows, k, device="cuda").to(torch.bfloat16)
            film = torch.randn(args.rows // args.samples, 2 * n, device="cuda") * 0.3
            scale, shift = film[:, :n], film[:, n:]

            def run() -> torch.Tensor:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    return blk(x, scale, shift)

            rk.ENABLED = False
            compiled = torch.compile(run, dynamic=False, options=dict(fast_sampling.COMPILE_OPTIONS) or None)
            row = {"model": name, "block": bname, "k": k, "n": n, "chunks": rk._column_chunks(n),
                   "compiled_torch_us": graph_us(compiled)}
            ref = compiled()
            rk.ENABLED = True
            row["kernels"] = []
            default = dict(rk._launch(n))
            for launch in sweeps:
                slot = rk._launch_key(n)
                saved = dict(rk.LAUNCH[slot])
                if launch is not None:
                    rk.LAUNCH[slot] = launch
                try:
                    err = float((run().float() - ref.float()).abs().max())
                    t_in = graph_us(lambda: rk.film_block_in(x, blk.lin1.weight, blk.lin1.bias, blk.norm1.weight,
                                                             blk.norm1.bias, scale, shift, blk.norm1.channels,
                                                             blk.norm1.eps))
                    t_all = graph_us(run)
                    entry = {"launch": launch or default, "in_us": t_in, "block_us": t_all,
                             "max_abs_diff_vs_compiled_torch": err}
                    for kname, h in rk.LAST_KERNELS.items():  # registers and spills of the compiled kernels
                        entry[f"{kname}_regs_spills"] = (getattr(h, "n_regs", None), getattr(h, "n_spills", None))
                except Exception as exc:  # noqa: BLE001 -- reported, the other launches go on
                    entry = {"launch": launch or default, "error": f"{type(exc).__name__}: {exc}"[:300]}
                finally:
                    rk.LAUNCH[slot] = saved
                row["kernels"].append(entry)
                print(json.dumps({**{k_: v for k_, v in row.items() if k_ != "kernels"}, **entry}), flush=True)
            out["blocks"].append(row)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=1))


def norm_rows(args: argparse.Namespace, n: int = 304, c: int = 300) -> list[dict]:
    """us per call of film_norm_in (h a row-strided half of a (rows, 2n) tensor) and film_norm_out (h contiguous,
    the skip the other half) per NORM_LAUNCH, bf16, one FiLM row per `--samples` rows."""
    hs = torch.randn(args.rows, 2 * n, device="cuda").to(torch.bfloat16)
    h2 = torch.randn(args.rows, n, device="cuda").to(torch.bfloat16)
    g, b = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    g[c:] = 0
    b[c:] = 0
    film = torch.randn(args.rows // args.samples, 2 * n, device="cuda") * 0.3
    scale, shift = film[:, :n], film[:, n:]
    saved, rows = dict(rk.NORM_LAUNCH), []
    for spec in args.norm_launches.split(","):
        try:
            bm, nw = (int(v) for v in spec.split("x"))
            rk.NORM_LAUNCH.update(block_rows=bm, num_warps=nw)
            row = {"norm_launch": spec,
                   "film_norm_in_us": graph_us(lambda: rk.film_norm_in(hs[:, :n], g, b, scale, shift, c, 1e-5)),
                   "film_norm_out_us": graph_us(lambda: rk.film_norm_out(h2, hs[:, n:], g, b, c, 1e-5))}
        except Exception as exc:  # noqa: BLE001 -- reported, the other launches go on
            row = {"norm_launch": spec, "error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            rk.NORM_LAUNCH.clear()
            rk.NORM_LAUNCH.update(saved)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
