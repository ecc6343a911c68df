"""One sampling step of the paper-sized denoisers, variant by variant (issue 8, goal 1): where the time goes.

Each variant samples DDIM-`--steps` with `GraphedSampler` (CUDA graphs, bf16 autocast, split FiLM) at
`--rows` rows (256 images x `--samples` 100 hypotheses by default, one FiLM row per image) and reports the
time per step, rows x steps per second, and the achieved rate in the paper's FLOP count (2 x parameters per
row and step). Variants: the attention kernel (`--impls`: PyTorch SDPA, explicit math, the compiled reduction
form, the Triton kernel that "auto" picks for sampling on CUDA) and `torch.compile` of the step (trunk and
sampler update; fuses the element-wise kernels). Kernel tables from torch.profiler of one whole step
(`--profile`: eager with SDPA; `--profile-compiled`: compiled with the default kernels).

    python benchmarks/bench_denoiser_step.py --rows 25600 --json $OUT/denoiser_step.json --profile
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer import fast_sampling  # noqa: E402
from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.fast_sampling import GraphedSampler  # noqa: E402
from ofer.models import resblock_kernel  # noqa: E402
from ofer.models import token_attention_kernel as tak  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402

MODELS = {"idgen": dict(dim=300, cond_dim=512, widths=(300, 50, 10)),
          "expgen": dict(dim=53, cond_dim=1024, widths=(53, 25, 10))}


def build(name: str, impl: str) -> Denoiser:
    torch.manual_seed(0)
    m = Denoiser(**MODELS[name])
    for p in m.parameters():  # non-zero output / FiLM layers so activations are realistic
        if p.dim() > 1 and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=1e-3)
    return m.set_attention_impl(impl).cuda().eval()


def time_variant(name: str, impl: str, compile: bool, rows: int, steps: int, repeats: int, samples: int = 1,
                 eta: float = 0.0) -> dict:
    model = build(name, impl)
    params = sum(p.numel() for p in model.parameters())
    cond = torch.randn(rows // samples, model.cond_dim, device="cuda")
    t0 = time.perf_counter()
    sampler = GraphedSampler(GaussianDiffusion().cuda(), model, rows=rows, dim=model.dim, cond_dim=model.cond_dim,
                             sampler="ddim", steps=steps, eta=eta, compile=compile, num_samples=samples)
    out = sampler(cond, num_samples=samples)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = sampler(cond, num_samples=samples)
    torch.cuda.synchronize()
    step_s = (time.perf_counter() - t0) / repeats / steps
    assert torch.isfinite(out).all()
    return {"model": name, "attention": impl, "compile": compile, "rows": rows, "samples": samples, "eta": eta,
            "build_s": build_s, "ms_per_step": step_s * 1e3, "row_steps_per_s": rows / step_s,
            "paper_tflops": 2 * params * rows / step_s / 1e12}


def profile_step(name: str, impl: str, rows: int, compiled: bool = False, samples: int = 1,
                 row_limit: int = 24, trace: Path | None = None) -> str:
    """Kernel table of one whole sampling step as the samplers run it (`GraphedSampler`'s step, run eagerly
    under the profiler instead of from its graph): the trunk, the noise prediction and a stochastic update
    (DDIM with eta = 1, the arithmetic of a DDPM step), with `samples` samples per condition. With `trace`, also
    writes a Chrome trace (CPU ops with shapes and Python frames) there, for `trace_kernels.py`."""
    model = build(name, impl)
    sampler = GraphedSampler(GaussianDiffusion().cuda(), model, rows=rows, dim=model.dim, cond_dim=model.cond_dim,
                             sampler="ddim", steps=2, eta=1.0, compile=compiled, num_samples=samples)
    sampler(torch.randn(rows // samples, model.cond_dim, device="cuda"), num_samples=samples)  # sets the FiLM
    with torch.no_grad():
        for _ in range(3):
            sampler._run(range(1))
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if trace else [])
        with torch.profiler.profile(activities=acts, record_shapes=bool(trace), with_stack=bool(trace)) as prof:
            sampler._run(range(1))
            torch.cuda.synchronize()
    if trace:
        trace.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace))
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=row_limit)


def bools(ap: argparse.ArgumentParser, spec: str | None, option: str, default: bool | None) -> list:
    """The values of a "true,false" comma-list option, or [default] without one (argparse error otherwise)."""
    if not spec:
        return [default]
    if set(spec.split(",")) - {"true", "false"}:
        ap.error(f"{option} {spec!r}: expected a comma list of true, false")
    return [v == "true" for v in spec.split(",")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=25_600)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=100,
                    help="samples per condition (OFER: 100); the sampler keeps one FiLM row per condition")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--impls", default="math,reduce,triton",
                    help="attention kernels (Denoiser.set_attention_impl); sampling 'auto' = 'triton' on CUDA")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-compiled", action="store_true",
                    help="kernel table of one compiled step with the default ('auto') attention")
    ap.add_argument("--only-profile", action="store_true")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR",
                    help="with --profile-compiled: also write Chrome traces there (for trace_kernels.py)")
    ap.add_argument("--output-kernel", default=None,
                    help="comma list of true/false: token_attention_kernel.OUTPUT_KERNEL (the attention's output "
                         "Linear and residual add as one kernel) for the timed rows")
    ap.add_argument("--cat-output", default=None,
                    help="comma list of true/false: token_attention_kernel.CAT_OUTPUT (the up path's output kernels "
                         "also write the concatenation after them) for the timed rows and --profile-compiled")
    ap.add_argument("--blas", default=None,
                    help="comma list of cublas, cublaslt: torch.backends.cuda.preferred_blas_library for the timed "
                         "rows (the GEMMs inductor leaves to aten; default: torch's choice)")
    ap.add_argument("--eta", type=float, default=0.0,
                    help="DDIM eta of the timed sampling (1: stochastic steps, the arithmetic of DDPM)")
    ap.add_argument("--profile-rows", type=int, default=24, help="kernels listed per profile table")
    ap.add_argument("--project-max-widths", default=None,
                    help="comma list of token_attention_kernel.PROJECT_MAX_WIDTH values to time the triton rows with "
                         "(0: the projection never inside the kernel); default: the module's")
    ap.add_argument("--project-kernels", default=None,
                    help="comma list of token_attention_kernel.PROJECT_KERNEL values ('gluon', 'triton') to time the "
                         "triton rows (and --profile-compiled) with; default: the module's")
    ap.add_argument("--pad-widths", default=None,
                    help="comma list of fast_sampling.PAD_WIDTHS values ('true', 'false': sample through "
                         "Denoiser.padded() or not) to time the compiled rows (and --profile-compiled) with; "
                         "default: the module's")
    ap.add_argument("--resblock-kernel", default=None,
                    help="comma list of true,false: FiLM blocks through the Triton kernels (resblock_kernel.ENABLED; "
                         "default: the module's)")
    ap.add_argument("--norm-kernels", default=None,
                    help="comma list of true,false: inside torch.compile, the norms of blocks wider than "
                         "resblock_kernel.COMPILED_MAX_WIDTH as Triton kernels around cuBLAS (resblock_kernel."
                         "NORM_KERNELS) or inductor's; default: the module's")
    ap.add_argument("--inductor", action="append", default=None,
                    help="inductor options of the compiled rows: 'default' (fast_sampling.COMPILE_OPTIONS), 'none' "
                         "(inductor's defaults), 'default,key=value,...' (the defaults with these keys set) or "
                         "'key=value,...'; repeat to compare (--inductor none --inductor default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    blas_libs = args.blas.split(",") if args.blas else [None]
    if set(blas_libs) - {None, "cublas", "cublaslt"}:
        ap.error(f"--blas {args.blas!r}: expected a comma list of cublas, cublaslt")
    inductor = [fast_sampling.parse_compile_options(s) for s in (args.inductor or ["default"])]
    default_pad = fast_sampling.PAD_WIDTHS
    pads = bools(ap, args.pad_widths, "--pad-widths", default_pad)
    rbs = bools(ap, args.resblock_kernel, "--resblock-kernel", resblock_kernel.ENABLED)
    nks = bools(ap, args.norm_kernels, "--norm-kernels", resblock_kernel.NORM_KERNELS)
    oks = bools(ap, args.output_kernel, "--output-kernel", getattr(tak, "OUTPUT_KERNEL", None))
    cats = bools(ap, args.cat_output, "--cat-output", getattr(tak, "CAT_OUTPUT", None))
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    if args.profile:
        for name in MODELS:
            table = profile_step(name, "sdpa", args.rows, samples=args.samples, row_limit=args.profile_rows)
            print(f"--- {name}, eager, sdpa: one step's CUDA kernels\n{table}", flush=True)
    widths = [int(v) for v in args.project_max_widths.split(",")] if args.project_max_widths else [None]
    kernels = args.project_kernels.split(",") if args.project_kernels else [tak.PROJECT_KERNEL]
    default_width = tak.PROJECT_MAX_WIDTH
    if args.profile_compiled:
        for name in MODELS:
            for width, kernel in ((wd, k) for wd in widths for k in kernels):
                for opts, pad, rb, nk, cat in ((o, p, r, n, c) for o in inductor for p in pads for r in rbs
                                               for n in nks for c in cats):
                    resblock_kernel.ENABLED, resblock_kernel.NORM_KERNELS = rb, nk
                    if cat is not None:
                        tak.CAT_OUTPUT = cat
                    tak.PROJECT_MAX_WIDTH = default_width if width is None else width
                    tak.PROJECT_KERNEL = kernel
                    fast_sampling.COMPILE_OPTIONS = opts
                    fast_sampling.PAD_WIDTHS = pad
                    trace = (args.trace / f"step_{name}_{width}_{kernel}_{pad}_{rb}_{nk}_{cat}.json" if args.trace
                             else None)
                    table = profile_step(name, "auto", args.rows, compiled=True, samples=args.samples,
                                         row_limit=args.profile_rows, trace=trace)
                    print(f"--- {name}, compiled, auto attention, PROJECT_MAX_WIDTH {tak.PROJECT_MAX_WIDTH}, "
                          f"projecting kernel {kernel}, inductor {opts or 'default'}, padded widths {pad}, resblock "
                          f"kernel {rb}, norm kernels {nk}, cat output {cat}: one step's CUDA kernels\n{table}",
                          flush=True)
    if args.only_profile:
        return
    impls = args.impls.split(",")
    variants = [(impl, False, {}, default_pad) for impl in impls if impl in ("math", "sdpa", "triton")]  # eager
    if not args.no_compile:  # "reduce" is huge
        variants += [(impl, True, opts, pad) for impl in impls for opts in inductor for pad in pads]
    variants = [(*v, rb, nk) for v in variants for rb in rbs for nk in (nks if v[1] else nks[:1])]
    for name, ok, cat, blas in ((n, o, c, b) for n in MODELS for o in oks for c in cats for b in blas_libs):
        if ok is not None:
            tak.OUTPUT_KERNEL = ok
        if cat is not None:
            tak.CAT_OUTPUT = cat
        if blas is not None:
            torch.backends.cuda.preferred_blas_library(blas)
        triton_runs = [(wd, k) for wd in widths for k in kernels]
        runs = [(v, r) for v in variants for r in (triton_runs if v[0] == "triton" else [(None, kernels[0])])]
        for (impl, comp, opts, pad, rb, nk), (width, kernel) in runs:
            resblock_kernel.ENABLED, resblock_kernel.NORM_KERNELS = rb, nk
            tak.PROJECT_MAX_WIDTH = default_width if width is None else width
            tak.PROJECT_KERNEL = kernel
            fast_sampling.COMPILE_OPTIONS = opts
            fast_sampling.PAD_WIDTHS = pad
            try:
                row = time_variant(name, impl, comp, args.rows, args.steps, args.repeats, args.samples, args.eta)
            except Exception as exc:  # noqa: BLE001 -- reported, the other variants go on
                row = {"model": name, "attention": impl, "compile": comp, "error": f"{type(exc).__name__}: {exc}"[:400]}
            if impl == "triton":
                row["project_max_width"] = tak.PROJECT_MAX_WIDTH
                row["project_kernel"] = kernel
            row["pad_widths"] = pad
            row["resblock_kernel"] = rb
            row["output_kernel"] = ok
            row["cat_output"] = cat
            row["blas"] = str(torch.backends.cuda.preferred_blas_library())
            if comp:
                row["inductor"] = opts
                row["norm_kernels"] = nk
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
