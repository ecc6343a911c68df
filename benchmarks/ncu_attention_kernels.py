"""Launch each Triton attention kernel twice at sampling size, for Nsight Compute (issue 8).

The projecting kernel (`token_attention_project_pool`) at 10, 25 and 53 input channels (padded to 16, 32, 64)
and the kernel after a separate projection (`token_attention_pool`), bf16, `--rows` rows, random inputs. Run it
under ncu; the report of 2026-11-26 (one H100) is `docs/bench/ncu_attention_kernels_h100.txt`:

    ncu --set full -k regex:"_project_pool_kernel|_token_attention_pool_kernel" --launch-count 8 \\
        python benchmarks/ncu_attention_kernels.py --project-kernel triton > ncu.txt

With `--project-kernel gluon` (the default) the projecting calls run `_project_pool_gluon_kernel`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer.models import token_attention_kernel as tak  # noqa: E402

T, H, DH = 16, 4, 32


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=51_200)
    ap.add_argument("--widths", default="10,25,53", help="input channels of the projecting kernel's calls")
    ap.add_argument("--project-kernel", choices=("gluon", "triton"), default=None,
                    help="token_attention_kernel.PROJECT_KERNEL (default: the module's, gluon; its kernel is "
                         "_project_pool_gluon_kernel)")
    args = ap.parse_args()
    if args.project_kernel:
        tak.PROJECT_KERNEL = args.project_kernel
    if not torch.cuda.is_available():
        raise SystemExit("ncu_attention_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    w = torch.randn(T, device="cuda")
    for c in (int(v) for v in args.widths.split(",")):
        x = torch.randn(args.rows, c, device="cuda", dtype=torch.bfloat16)
        wqkv = torch.randn(T * 3 * H * DH, c, device="cuda", dtype=torch.bfloat16) * c**-0.5
        for _ in range(2):
            tak.token_attention_project_pool(x, wqkv, w, T, H, DH)
    qkv = torch.randn(args.rows, T * 3 * H * DH, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        tak.token_attention_pool(qkv, w, T, H, DH)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
