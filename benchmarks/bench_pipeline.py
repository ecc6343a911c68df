"""Full OFER inference throughput from cached features (issue 8, goals 1 and 2).

Paper setting: IdGen 100 samples x DDPM-1000, FLAME decode of the 100 candidates, IdRank, ExpGen 100 x
DDPM-1000, with the paper-sized denoisers (12.45 M / 3.16 M parameters) and IdRank MLP. Random weights (the
cost does not depend on them). Rows:
  * baseline: our pipeline run like the public code's demo: eager, fp32, one image at a time, every candidate
    decoded to face vertices before IdRank (`fold_ranker=False`);
  * ours: many images per call, bf16 autocast, CUDA-graph sampling (`pipeline.fast`; one FiLM row per image,
    aligned widths unless `--pad-widths false`), with `--compile` also torch.compile'd sampling steps
    (`pipeline.compile`); IdRank scores the shape coefficients through its
    folded first layer (`pipeline.fold_ranker`, no decode) unless `--no-fold-ranker`;
  * fast samplers: DDIM-50, DDIM-25 and DPM-Solver++-25 on the same fast path.
The floor is 100 x (1000 x 2 x 12.45 M + 1000 x 2 x 3.16 M) FLOP per image at the bf16 GEMM rate measured in
this run. Prints a table and writes JSON (--json).

    python benchmarks/bench_pipeline.py --batch 256 --compile --json $OUT/pipeline.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import ofer  # noqa: E402,F401
from ofer import fast_sampling  # noqa: E402
from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.flame import FLAME  # noqa: E402
from ofer.models import resblock_kernel  # noqa: E402
from ofer.models import token_attention_kernel as tak  # noqa: E402
from ofer.models.ranker import IdRanker  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402
from ofer.pipeline import OferPipeline  # noqa: E402
from ofer.synthetic.assets import ensure_synthetic_flame  # noqa: E402


def gemm_tflops(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192 ** 3 * n / (time.perf_counter() - t) / 1e12


def build(device: str, flame: FLAME, *, fast: bool, sampler: dict, compile: bool = False,
          fold_ranker: bool = True) -> OferPipeline:
    torch.manual_seed(0)
    # The baseline attends with explicit per-step math as the public code does; ours with the default "auto"
    # (the Triton kernel when sampling on CUDA).
    attention = "auto" if fast else "math"
    idgen = Denoiser(dim=300, cond_dim=512, widths=(300, 50, 10)).set_attention_impl(attention)
    expgen = Denoiser(dim=53, cond_dim=1024, widths=(53, 25, 10)).set_attention_impl(attention)
    for m in (idgen, expgen):  # non-zero output layers so the samples move (cost is the same)
        for p in m.parameters():
            if p.dim() > 1 and p.abs().sum() == 0:
                torch.nn.init.normal_(p, std=1e-3)
    ranker = IdRanker(num_face_vertices=len(flame.face_mask("face")))
    diff = GaussianDiffusion()
    return OferPipeline(flame=flame, idgen=idgen.eval(), id_diffusion=diff, expgen=expgen.eval(),
                        exp_diffusion=GaussianDiffusion(), ranker=ranker.eval(), id_sampling=sampler,
                        exp_sampling=sampler, num_samples=100, fast=fast, compile=compile,
                        fold_ranker=fold_ranker).to(device)


def run(pipe: OferPipeline, batch: int, repeats: int, device: str) -> tuple[float, float]:
    """Seconds of the first call (includes CUDA-graph capture) and the mean of `repeats` timed calls."""
    arc = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1)
    farl = torch.randn(batch, 512, device=device)
    torch.cuda.synchronize()
    t = time.perf_counter()
    pipe(arc, farl)  # warm-up (and CUDA-graph capture)
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(repeats):
        h = pipe(arc, farl)
    torch.cuda.synchronize()
    assert torch.isfinite(h.shapes).all() and torch.isfinite(h.scores).all()
    return first, (time.perf_counter() - t) / repeats


def stage_seconds(pipe: OferPipeline, batch: int, device: str) -> dict[str, float]:
    """One call of the pipeline with each stage timed on its own (`OferPipeline.forward(stage_seconds=...)`;
    after `run`, so graphs and compilation are warm): IdGen sampling, FLAME decode of the candidates (~0 with the
    folded ranker, which decodes nothing), IdRank, ExpGen sampling."""
    arc = torch.nn.functional.normalize(torch.randn(batch, 512, device=device), dim=-1)
    out: dict[str, float] = {}
    pipe(arc, torch.randn(batch, 512, device=device), stage_seconds=out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256, help="images per pipeline call on the fast path")
    ap.add_argument("--fast-batch", type=int, default=1024, help="images per call for DDIM/DPM++ rows")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the sampling steps on the fast path")
    ap.add_argument("--no-fold-ranker", action="store_true",
                    help="on the fast path, decode every candidate to face vertices and rank those (the baseline's "
                         "path) instead of ranking the shape coefficients through the folded first layer")
    ap.add_argument("--attention-launch", default=None,
                    help="launch shape of the Triton attention kernel, rows per tile x tiles per program x stages x "
                         "warps (default: the module's)")
    ap.add_argument("--project-kernel", choices=("gluon", "triton"), default=None,
                    help="token_attention_kernel.PROJECT_KERNEL: the projecting attention kernel for bf16 sampling "
                         "(default: the module's, gluon)")
    ap.add_argument("--project-max-width", type=int, default=None,
                    help="widest attention input whose q/k/v projection runs inside the Triton kernel (0: never; "
                         "default: the module's token_attention_kernel.PROJECT_MAX_WIDTH)")
    ap.add_argument("--inductor", default="default",
                    help="inductor options of the compiled steps: 'default' (fast_sampling.COMPILE_OPTIONS), 'none' "
                         "(inductor's defaults), 'default,key=value,...' (the defaults with these keys set) or "
                         "key=value,...")
    ap.add_argument("--pad-widths", choices=("true", "false"), default=None,
                    help="fast_sampling.PAD_WIDTHS: sample through Denoiser.padded() (widths rounded up to multiples "
                         "of 8; default: the module's, true)")
    ap.add_argument("--resblock-kernel", choices=("true", "false"), default=None,
                    help="resblock_kernel.ENABLED: FiLM blocks through the Triton kernels in sampling (default: the "
                         "module's, true)")
    ap.add_argument("--cat-output", choices=("true", "false"), default=None,
                    help="token_attention_kernel.CAT_OUTPUT: the up path's output kernels also write the "
                         "concatenation after them (default: the module's)")
    ap.add_argument("--settings", default="ddpm1000,ddim50,ddim25,dpmpp25",
                    help="comma list of the fast-path rows to run: ddpm1000, ddim50, ddim25, dpmpp25")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    settings = args.settings.split(",")
    unknown = set(settings) - {"ddpm1000", "ddim50", "ddim25", "dpmpp25"}
    if unknown:
        ap.error(f"--settings: unknown {sorted(unknown)}; expected ddpm1000, ddim50, ddim25, dpmpp25")
    if args.attention_launch:
        tak.set_launch(args.attention_launch)
    if args.project_max_width is not None:
        tak.PROJECT_MAX_WIDTH = args.project_max_width
    if args.project_kernel is not None:
        tak.PROJECT_KERNEL = args.project_kernel
    fast_sampling.COMPILE_OPTIONS = fast_sampling.parse_compile_options(args.inductor)
    if args.pad_widths is not None:
        fast_sampling.PAD_WIDTHS = args.pad_widths == "true"
    if args.resblock_kernel is not None:
        resblock_kernel.ENABLED = args.resblock_kernel == "true"
    if args.cat_output is not None:
        tak.CAT_OUTPUT = args.cat_output == "true"
    device = "cuda"
    assert torch.cuda.is_available(), "this benchmark needs a GPU"
    assets = ensure_synthetic_flame(Path(tempfile.mkdtemp()))
    flame = FLAME(assets.flame_model, masks_path=assets.masks).to(device)
    tflops = gemm_tflops(device)
    flop_per_image = 100 * (1000 * 2 * 12.45e6 + 1000 * 2 * 3.16e6)
    floor_ips = tflops * 1e12 / flop_per_image
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_gemm_tflops": tflops,
           "floor_images_per_s": floor_ips, "attention_launch": dict(tak.current_launch(torch.device(device))),
           "project_max_width": tak.PROJECT_MAX_WIDTH, "project_kernel": tak.PROJECT_KERNEL,
           "project_launch": dict(tak.PROJECT_LAUNCH),
           "project_gluon_launch": {k: dict(v) for k, v in tak.PROJECT_GLUON_LAUNCH.items()},
           "inductor": fast_sampling.COMPILE_OPTIONS, "pad_widths": fast_sampling.PAD_WIDTHS,
           "resblock_kernel": resblock_kernel.ENABLED, "cat_output": getattr(tak, "CAT_OUTPUT", None),
           "fold_ranker": not args.no_fold_ranker, "rows": []}
    print(f"device: {out['device']}  torch {torch.__version__}  bf16 GEMM {tflops:.0f} TFLOP/s  "
          f"floor (paper setting) {floor_ips:.0f} images/s", flush=True)
    ddpm = {"sampler": "ddpm"}
    specs = [] if args.skip_baseline else [("baseline: eager fp32, 1 image/call, DDPM-1000", False, ddpm, 1, 1)]
    tag = "CUDA graphs + bf16" + (" + compile" if args.compile else "")
    if "ddpm1000" in settings:
        specs += [(f"ours: {tag}, DDPM-1000", True, ddpm, args.batch, args.repeats)]
    specs += [(f"ours: {tag}, {label}", True, opts, args.fast_batch, args.repeats)
              for key, label, opts in (("ddim50", "DDIM-50", {"sampler": "ddim", "steps": 50}),
                                       ("ddim25", "DDIM-25", {"sampler": "ddim", "steps": 25}),
                                       ("dpmpp25", "DPM++-25", {"sampler": "dpmpp", "steps": 25}))
              if key in settings]
    for name, fast, sampler, batch, repeats in specs:  # one failing row (e.g. out of memory) keeps the others
        fold = fast and not args.no_fold_ranker
        try:
            pipe = build(device, flame, fast=fast, sampler=sampler, compile=fast and args.compile, fold_ranker=fold)
            first, s = run(pipe, batch, repeats, device)
            row = {"name": name, "batch": batch, "fold_ranker": fold, "first_call_s": first, "s_per_call": s,
                   "images_per_s": batch / s}
            if fast:
                row["stage_s"] = stage_seconds(pipe, batch, device)
        except Exception as exc:  # noqa: BLE001 -- reported in the table and the JSON
            row = {"name": name, "batch": batch, "fold_ranker": fold, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            pipe = None
            torch.cuda.empty_cache()
        out["rows"].append(row)
        base = out["rows"][0].get("images_per_s") if not args.skip_baseline else None
        if "images_per_s" in row:
            row["speedup_vs_baseline"] = row["images_per_s"] / base if base else None
            row["fraction_of_floor"] = row["images_per_s"] / floor_ips if "DDPM" in name else None
        print(f"{name:52s} {row}", flush=True)
        if args.json:  # after every row, so a run cut short keeps what it measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{'setting':52s} {'batch':>6s} {'s/call':>8s} {'img/s':>9s} {'vs base':>8s} {'of floor':>8s}")
    for r in out["rows"]:
        if "error" in r:
            print(f"{r['name']:52s} {r['batch']:6d} FAILED {r['error']}")
            continue
        print(f"{r['name']:52s} {r['batch']:6d} {r['s_per_call']:8.3f} {r['images_per_s']:9.1f} "
              f"{(r['speedup_vs_baseline'] or float('nan')):8.1f} {(r['fraction_of_floor'] or float('nan')):8.2f}")
        if "stage_s" in r:
            print("    stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in r["stage_s"].items()))


if __name__ == "__main__":
    main()
