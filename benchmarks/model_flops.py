"""FLOPs per row of the OFER denoisers, counted by PyTorch, against the count that the MFU uses (issue 8, goal 4).

`bench_training.py` and `bench_trainer.py` report MFU as 6 x parameters x rows per step over the measured bf16 GEMM
rate: the usual count for a network of Linear layers, 2 FLOPs per parameter per row forward and 4 backward. OFER's
token attention also multiplies activations with activations (scores q k^T and the weighted values, 16 tokens x 4
heads x 32 channels in each of its 6 blocks), work with no parameters that this count leaves out, as PaLM's MFU
definition does not. This script runs one forward of each configured denoiser on the CPU with the attention written
out as matmuls (`impl="math"`, the model's definition) under `torch.utils.flop_counter.FlopCounterMode`, splits the
counted FLOPs into parameter matmuls (mm, addmm) and activation matmuls (bmm, einsum), and prints both MFU counts
per row of a training step:

    params_6n        6 x parameters                       (what the reported MFU uses)
    with_attention   6 x parameters + 3 x the bmm FLOPs   (forward + backward of the attention's own products)

so that a measured MFU converts as mfu x with_attention / params_6n. The closed form of the attention's products is
checked in `tests/test_model_flops.py`. No GPU needed:

    python benchmarks/model_flops.py --json $OUT/model_flops.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from ofer.models.unet1d import Denoiser

ROOT = Path(__file__).resolve().parent.parent
JOBS = ("idgen", "expgen")
PARAM_MATMULS = ("aten.mm", "aten.addmm")


def model_config(job: str) -> dict:
    """configs/model/<job>.yaml as Denoiser keyword arguments."""
    path = ROOT / "configs" / "model" / f"{job}.yaml"
    if not path.is_file():
        raise SystemExit(f"model_flops: no model config {path} (jobs: {', '.join(JOBS)})")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    target = cfg.pop("_target_", None)
    if target != "ofer.models.unet1d.Denoiser":
        raise SystemExit(f"model_flops: {path} builds {target!r}, expected ofer.models.unet1d.Denoiser")
    return cfg


def count(job: str, rows: int = 4) -> dict:
    """One forward of `rows` rows under FlopCounterMode; FLOPs per row by kind, and the two training counts."""
    cfg = model_config(job)
    torch.manual_seed(0)
    model = Denoiser(**cfg).set_attention_impl("math").eval()
    params = sum(p.numel() for p in model.parameters())
    x, cond = torch.randn(rows, cfg["dim"]), torch.randn(rows, cfg["cond_dim"])
    t = torch.randint(0, 1000, (rows,))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, cond)
    by_op = {str(k): v / rows for k, v in counter.get_flop_counts()["Global"].items()}
    linear = sum(v for k, v in by_op.items() if k in PARAM_MATMULS)
    activation = sum(v for k, v in by_op.items() if k not in PARAM_MATMULS)
    return {
        "job": job, "params": params, "forward_by_op": by_op,
        "forward_param_matmuls": linear, "forward_activation_matmuls": activation, "forward_2n": 2 * params,
        "params_6n": 6 * params, "with_attention": 6 * params + 3 * activation,
        "ratio": (6 * params + 3 * activation) / (6 * params),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default=",".join(JOBS), help="comma list of idgen, expgen")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    bad = [j for j in jobs if j not in JOBS]
    if bad or not jobs:
        raise SystemExit(f"model_flops: --jobs {args.jobs!r}: expected a comma list of {', '.join(JOBS)}")
    rows = [count(j) for j in jobs]
    print(f"{'job':8} {'params':>11} {'fwd 2N':>12} {'fwd mm':>12} {'fwd bmm':>10} {'train 6N':>12} "
          f"{'with attention':>15} {'ratio':>7}")
    for r in rows:
        print(f"{r['job']:8} {r['params']:>11,} {r['forward_2n']:>12,.0f} {r['forward_param_matmuls']:>12,.0f} "
              f"{r['forward_activation_matmuls']:>10,.0f} {r['params_6n']:>12,.0f} {r['with_attention']:>15,.0f} "
              f"{r['ratio']:>7.4f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
