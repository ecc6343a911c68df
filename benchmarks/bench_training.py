"""Training throughput of IdGen / ExpGen / IdRank steps from cached features (issue 8, goals 4 and 5).

A step = forward + backward + AdamW update of the paper-sized networks (the data already on the GPU, as with
the feature cache; loading is not timed). Rows: the public code's setting (fp32, batch 64 rows) as the
baseline, and ours (bf16 autocast, large batches). Model FLOP utilisation = 6 x parameters x rows per step /
time / the bf16 GEMM rate measured in the same run. IdRank: a step from cached candidate pools vs the
public code's way (sample 100 candidates x DDPM-1000 for every image of the batch, then the step).
With torchrun (WORLD_SIZE > 1) the step runs under DDP with the same per-GPU batch; rank 0 reports.

    python benchmarks/bench_training.py --json $OUT/train.json
    torchrun --nproc_per_node=2 benchmarks/bench_training.py --ddp-only --json $OUT/train_ddp.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.fast_sampling import parse_compile_options, parse_key_values  # noqa: E402
from ofer.jobs import training_copy  # noqa: E402
from ofer.models import token_attention_kernel as tak  # noqa: E402
from ofer.models.ranker import IdRanker  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402
from ofer.training.flat import FlatParameters  # noqa: E402
from ofer.training.config import REDUCTION_LAUNCHES  # noqa: E402
from ofer.ranking import listnet_loss, ranking_targets  # noqa: E402
from ofer import reduction_launch  # noqa: E402
from ofer.reduction_launch import one_row_per_warp  # noqa: E402


DEVICE = "cuda"
# Paper-sized denoisers per job: (data dim, condition dim, U-Net widths)
SHAPES = {"idgen": (300, 512, (300, 50, 10)), "expgen": (53, 1024, (53, 25, 10))}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def gemm_tflops() -> float:
    """Measured matmul rate: bf16 8192^3 on CUDA, fp32 2048^3 on the CPU."""
    n, dt = (8192, torch.bfloat16) if DEVICE == "cuda" else (2048, torch.float32)
    a = torch.randn(n, n, device=DEVICE, dtype=dt)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    reps = 20 if DEVICE == "cuda" else 5
    for _ in range(reps):
        a @ a
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def time_steps(step, n: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t) / n


def build_model(kind: str, impl: str, pad: bool) -> tuple[torch.nn.Module, int]:
    """The paper-sized denoiser (with `pad` its padded copy, as train_generator's pad_widths=true) and the parameter
    count of the paper's network, which the MFU counts (the padding's zero parameters do no model work)."""
    dim, cond, widths = SHAPES[kind]
    model = Denoiser(dim=dim, cond_dim=cond, widths=widths).set_attention_impl(impl)
    params = count(model)
    return training_copy(model, pad, DEVICE).to(DEVICE), params


def per_row_losses(diff: GaussianDiffusion, model: torch.nn.Module, x0: torch.Tensor, c: torch.Tensor,
                   compile_loss: bool, inductor: dict | None):
    """The step's per-row denoising losses as a function of no arguments; with `compile_loss` the whole function
    compiled as trainer.compile_scope=loss (static shapes, random draws ATen's through `fallback_random`)."""
    def losses() -> torch.Tensor:
        return diff.training_losses(model, x0, c)["loss"]

    if compile_loss:
        return torch.compile(losses, dynamic=False, options={**(inductor or {}), "fallback_random": True})
    return losses


def generator_step(kind: str, rows: int, bf16: bool, ddp: bool, compile: bool = False, impl: str = "auto",
                   inductor: dict | None = None, ddp_kwargs: dict | None = None, pad: bool = False,
                   scope: str = "model"):
    """One step as launched by eager PyTorch (no CUDA graph); with `compile`, the model (`scope` model) or, in one
    process, the whole loss around it (`scope` loss, random draws ATen's) compiled as trainer.compile_scope."""
    dim, cond, widths = SHAPES[kind]
    model, params = build_model(kind, impl, pad)
    opt_params = list(model.parameters())
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()],
                                                          **(ddp_kwargs or {}))
    if compile and (ddp or scope == "model"):  # as trainer.compile=true: fuses the element-wise kernels
        model = torch.compile(model, options=inductor or None)
    diff = GaussianDiffusion().to(DEVICE)
    opt = torch.optim.AdamW(opt_params, lr=1e-3, weight_decay=1e-4, fused=DEVICE == "cuda")
    x0 = torch.randn(rows, dim, device=DEVICE)
    c = torch.randn(rows, cond, device=DEVICE)

    losses = per_row_losses(diff, model, x0, c, compile and scope == "loss" and not ddp, inductor)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and DEVICE == "cuda"):
            loss = losses().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, params


def graphed_generator_step(kind: str, rows: int, compile: bool = False, impl: str = "math",
                           inductor: dict | None = None, pad: bool = False, scope: str = "model",
                           optimizer: str = "per-tensor"):
    """The same bf16 step captured whole (forward, backward, fused AdamW) into one CUDA graph and replayed:
    no Python or launch overhead per step. Timesteps and noise are drawn inside the graph (CUDA RNG), the
    batch is copied into static buffers before each replay, as a training loop would. With `compile`, the
    model (`scope` model) or the whole loss around it (`scope` loss: q_sample and the L1 loss too, random draws
    ATen's) is torch.compile'd first, as trainer.compile_scope (compiled during the warm-up steps, then its kernels
    captured). Static shapes, as the trainer: the jobs share the denoiser's code. `optimizer` "flat": AdamW over
    one buffer of all parameters (`FlatParameters`, as trainer.flat_params=true), else over the parameter tensors."""
    dim, cond, widths = SHAPES[kind]
    # Default: explicit attention math (cuDNN's fused attention backward fails inside graph capture, seen on an
    # H200); our Triton kernels ('auto' in training) can be captured.
    model, params = build_model(kind, impl, pad)
    adamw = {"lr": 1e-3, "weight_decay": 1e-4, "fused": True, "capturable": True}
    if optimizer == "flat":  # as trainer.flat_params=true
        flat = FlatParameters(model, [{"params": list(model.parameters())}])
        opt, gather = torch.optim.AdamW(flat.optimizer_groups(), **adamw), flat.gather_grads
    else:
        opt, gather = torch.optim.AdamW(model.parameters(), **adamw), None
    training_model = model
    if compile and scope == "model":
        model = torch.compile(model, dynamic=False, options=inductor or None)
    diff = GaussianDiffusion().to(DEVICE)
    x0 = torch.randn(rows, dim, device=DEVICE)
    c = torch.randn(rows, cond, device=DEVICE)
    batch_x0, batch_c = x0.clone(), c.clone()  # what the loader delivers each step

    losses = per_row_losses(diff, model, x0, c, compile and scope == "loss", inductor)

    def body() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = losses().mean()
        loss.backward()
        if gather is not None:
            gather()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside capture (allocates grads and optimizer state)
            training_model.zero_grad(set_to_none=True)
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    training_model.zero_grad(set_to_none=True)  # the parameters' (a flat optimizer's buffer keeps its gradient)
    with torch.cuda.graph(graph):
        static_loss = body()

    def step() -> None:
        x0.copy_(batch_x0, non_blocking=True)
        c.copy_(batch_c, non_blocking=True)
        graph.replay()

    step()
    sync()
    assert torch.isfinite(static_loss).item(), "graphed step produced a non-finite loss"
    return step, params


def comma_choices(value: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """The values of a comma-list option, each one of ``allowed``; ValueError names the option and the choices."""
    values = value.split(",")
    if set(values) - set(allowed):
        raise ValueError(f"{option} {value!r}: expected a comma list of {', '.join(allowed)}")
    return values


def project_training_widths(value: str | None) -> list[int | None]:
    """The values of a --project-training option (comma list of integers; None: [None], the module's setting, which
    on a CUDA card may be the card's default, see token_attention_kernel.project_training_max_width); ValueError
    names the option and what it expected."""
    if not value:
        return [None]
    items = value.split(",")
    if not all(v.strip().isdigit() for v in items):
        raise ValueError(f"--project-training {value!r}: expected a comma list of integers >= 0")
    return [int(v) for v in items]


def set_project_training(width: int | None, device: str) -> int:
    """token_attention_kernel.PROJECT_TRAINING_MAX_WIDTH for the next row (None: leave the module's setting); a
    change drops torch.compile's caches (the compiled forward read the old value). Returns the width in use on
    `device` (the card's default where none was set), which the rows record."""
    dev = torch.device(device)
    if width is not None and tak.project_training_max_width(dev) != width:
        tak.set_project_training_max_width(width)
        torch._dynamo.reset()
    return tak.project_training_max_width(dev)


def add_min_reductions(ap: argparse.ArgumentParser) -> None:
    """--min-reductions N (benchmark-only): the relaunch rule's threshold in this process; `set_min_reductions`
    applies it after parsing."""
    ap.add_argument("--min-reductions", type=int, default=None, metavar="N",
                    help="with --reduction-launch one_row: relaunch kernels with >= N reductions (sets "
                         "ofer.reduction_launch.MIN_REDUCTIONS in this process; default: the module's, 3; 0 is the "
                         "rule before the reduction count, every 257-512-column kernel)")


def set_min_reductions(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--min-reductions: the fewest reductions per kernel that reduction_launch relaunches, in this process."""
    if args.min_reductions is None:
        return
    if args.min_reductions < 0:
        ap.error(f"--min-reductions must be >= 0, got {args.min_reductions}")
    if args.reduction_launch != "one_row":
        ap.error("--min-reductions needs --reduction-launch one_row")
    reduction_launch.MIN_REDUCTIONS = args.min_reductions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--ddp-only", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also rows with torch.compile'd models (CUDA)")
    ap.add_argument("--compile-impls", default="auto",
                    help="attention kernels of the compiled rows (training 'auto' = 'triton' on CUDA), e.g. auto,math")
    ap.add_argument("--inductor", action="append", default=None,
                    help="inductor options of the compiled rows: 'default' (as the trainer compiles: "
                         "fast_sampling.COMPILE_OPTIONS, plus LOSS_SCOPE_OPTIONS for --compile-scope loss), 'none' "
                         "(inductor's defaults), 'default,key=value,...' (those with these keys set) or "
                         "'key=value,...' (used as given); repeat to compare")
    ap.add_argument("--no-idrank", action="store_true", help="skip the IdRank rows (re-sampling takes minutes)")
    ap.add_argument("--no-graph", action="store_true", help="skip the whole-step CUDA-graph rows (with --compile: "
                    "eager and compiled steps captured whole)")
    ap.add_argument("--graph-only", action="store_true", help="only the whole-step CUDA-graph rows (with --compile: "
                    "only the compiled steps captured whole)")
    ap.add_argument("--cpu", action="store_true", help="CPU rows only: fp32 IdGen/ExpGen steps at --rows")
    ap.add_argument("--profile", default=None, metavar="IMPLS",
                    help="only print the CUDA kernel table of one compiled bf16 step per job at the first --rows, "
                         "for each attention kernel of this comma list (e.g. auto,triton), compiled as the first "
                         "--compile-scope value")
    ap.add_argument("--attention-launch", default=None, metavar="SPEC",
                    help="the attention kernel's forward launch (token_attention_kernel.set_launch), e.g. 2x4x2x2:row")
    ap.add_argument("--backward-launch", default=None, metavar="SPEC",
                    help="the backward kernel's launch (token_attention_kernel.BACKWARD_LAUNCH), e.g. 4x2x2x4")
    ap.add_argument("--project-max-width", type=int, default=None,
                    help="widest attention input whose q/k/v projection runs inside the Triton kernels (0: never; "
                         "default: token_attention_kernel.PROJECT_MAX_WIDTH)")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR",
                    help="with --profile: also record CPU ops with input shapes and write a Chrome trace per job to "
                         "DIR (which op launched which kernel)")
    ap.add_argument("--optimize-ddp", default=None, choices=("true", "false"),
                    help="torch._dynamo.config.optimize_ddp for the compiled DDP rows (default: torch's, true, as the "
                         "trainer runs)")
    ap.add_argument("--ddp-kwargs", default="gradient_as_bucket_view=true", metavar="KEY=VALUE,...",
                    help="keyword arguments of DistributedDataParallel for the DDP rows, e.g. bucket_cap_mb=100; "
                         "default: gradient_as_bucket_view=true, as the trainer runs (trainer."
                         "ddp_gradient_as_bucket_view); '' for torch's defaults")
    ap.add_argument("--project-training", default=None, metavar="WIDTHS",
                    help="comma list of token_attention_kernel.PROJECT_TRAINING_MAX_WIDTH values: every generator "
                         "row for each (0: training projects q/k/v with cuBLAS; 64: bf16 attention inputs of up to "
                         "64 channels project inside the kernels, forward and backward); default: the module's, which "
                         "on a card in CARD_PROJECT_TRAINING_MAX_WIDTH is that card's (H200: 16); rows record it")
    ap.add_argument("--jobs", default="idgen,expgen", help="comma list of the generator jobs to time")
    ap.add_argument("--compile-scope", default="loss", metavar="model|loss|model,loss",
                    help="what the compiled CUDA-graph rows compile (trainer.compile_scope): the model, or the whole "
                         "loss around it (the trainer's default in one process); every such row for each value")
    ap.add_argument("--pad-widths", default="false", metavar="false|true|false,true",
                    help="train the denoisers' padded() copies (widths rounded up to multiples of 8; the same "
                         "function, zero gradients on the padding): every generator row for each value given")
    ap.add_argument("--optimizer", default="per-tensor", metavar="per-tensor|flat|per-tensor,flat",
                    help="AdamW of the graphed rows: over the parameter tensors (trainer.flat_params=false), or over "
                         "one flat buffer of all parameters (FlatParameters, trainer.flat_params=true: one launch); "
                         "every graphed row for each value")
    ap.add_argument("--reduction-launch", default="one_row", choices=REDUCTION_LAUNCHES,
                    help="compiled rows: inductor's 257-512-column persistent reductions with >= 3 reductions one "
                         "row per warp (ofer/reduction_launch.py, the trainer's default; those kernels compiled in "
                         "this process) or inductor's own launch; compare in separate processes with fresh "
                         "TORCHINDUCTOR_CACHE_DIRs (compiled kernels are cached by their code, not their launch)")
    add_min_reductions(ap)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    set_min_reductions(ap, args)
    try:
        ddp_kwargs = parse_key_values(args.ddp_kwargs, "--ddp-kwargs", "bucket_cap_mb=100") if args.ddp_kwargs else {}
    except ValueError as exc:
        ap.error(str(exc))
    try:
        pads = [v == "true" for v in comma_choices(args.pad_widths, ("true", "false"), "--pad-widths")]
        project_training = project_training_widths(args.project_training)
        jobs = comma_choices(args.jobs, ("idgen", "expgen"), "--jobs")
        scopes = comma_choices(args.compile_scope, ("model", "loss"), "--compile-scope")
        optimizers = comma_choices(args.optimizer, ("per-tensor", "flat"), "--optimizer")
        for spec in args.inductor or []:
            parse_compile_options(spec)  # a malformed spec fails here, before any timing
    except ValueError as exc:
        ap.error(str(exc))
    if args.optimize_ddp is not None:
        torch._dynamo.config.optimize_ddp = args.optimize_ddp == "true"
    if args.attention_launch:
        tak.set_launch(args.attention_launch)
    if args.backward_launch:
        tak.set_launch(args.backward_launch, backward=True)
    if args.project_max_width is not None:
        tak.PROJECT_MAX_WIDTH = args.project_max_width
    if args.profile:
        for impl, kind, pad, ptw in ((i, k, p, w) for i in args.profile.split(",") for k in jobs for p in pads
                                     for w in project_training):
            ptw = set_project_training(ptw, "cuda")  # profiles run on the GPU
            step, _ = generator_step(kind, args.rows[0], True, False, compile=True, impl=impl,
                                     inductor=parse_compile_options("default", loss_scope=scopes[0] == "loss"),
                                     pad=pad, scope=scopes[0])
            time_steps(step, n=2, warmup=5)
            acts = [torch.profiler.ProfilerActivity.CUDA]
            acts += [torch.profiler.ProfilerActivity.CPU] if args.trace else []
            with torch.profiler.profile(activities=acts, record_shapes=bool(args.trace)) as prof:
                step()
                sync()
            if args.trace:
                args.trace.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(args.trace / f"train_{kind}_{impl}_pad{int(pad)}_pt{ptw}.json"))
            print(f"--- {kind}, {args.rows[0]} rows, bf16 + compile, attention {impl}, pad_widths {pad}, "
                  f"project_training_max_width {ptw}: one step's CUDA kernels\n"
                  + prof.key_averages().table(sort_by="cuda_time_total", row_limit=45), flush=True)
        return
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ddp = world > 1
    if ddp:
        dist.init_process_group("nccl")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if ddp else 0
    peak = gemm_tflops()
    if rank == 0:
        print(f"matmul rate {peak:.1f} TFLOP/s", flush=True)
    rows_out = []
    # as the trainer (trainer.reduction_launch); open until the process ends, so every compiled row is under it
    launch_stack = contextlib.ExitStack()  # held by this frame: the patch must outlive every row
    relaunched = (launch_stack.enter_context(one_row_per_warp())
                  if args.compile and not args.cpu and args.reduction_launch == "one_row" else None)
    configs = [] if args.ddp_only else [(k, 64, False, False) for k in jobs]
    configs += [(k, r, not args.cpu, False) for k in jobs for r in args.rows]
    configs = [(*c, "auto", {}) for c in configs]
    if args.compile:
        configs += [(k, r, True, True, impl, opts) for impl in args.compile_impls.split(",")
                    for opts in (parse_compile_options(s) for s in args.inductor or ["default"])
                    for k in jobs for r in args.rows]
    configs = [(*c, pad, ptw) for c in configs for pad in pads for ptw in project_training]
    if args.graph_only:
        if args.no_graph or args.cpu or ddp:
            ap.error("--graph-only: the graph rows run on one GPU, without --no-graph or --cpu")
        configs = []
    for kind, rows, bf16, comp, impl, opts, pad, ptw in configs:
        ptw = set_project_training(ptw, DEVICE)
        step, params = generator_step(kind, rows, bf16, ddp, compile=comp, impl=impl, inductor=opts,
                                      ddp_kwargs=ddp_kwargs, pad=pad)
        s = time_steps(step, warmup=5 if comp else 3)
        mfu = 6 * params * rows / s / (peak * 1e12)
        rows_out.append({"job": kind, "rows_per_gpu": rows, "attention": impl, "pad_widths": pad,
                         "precision": ("bf16" if bf16 else "fp32") + (" + compile" if comp else ""),
                         "world_size": world, "s_per_step": s, "samples_per_s": rows * world / s, "mfu": mfu,
                         **({"inductor": opts} if comp else {}),
                         "attention_launch": dict(tak.current_launch(torch.device(DEVICE))),
                         "backward_launch": dict(tak.current_launch(torch.device(DEVICE), backward=True)),
                         "project_max_width": tak.PROJECT_MAX_WIDTH,
                         "project_training_max_width": ptw,
                         "optimize_ddp": torch._dynamo.config.optimize_ddp,
                         **({"ddp_kwargs": ddp_kwargs} if ddp else {})})
        if rank == 0:
            print(json.dumps(rows_out[-1]), flush=True)
    if not ddp and not args.cpu and not args.no_graph:
        # eager steps with explicit attention math; with --compile also the compiled steps (attention 'auto', the
        # inductor options of each --inductor) captured whole
        graphs = [] if args.graph_only and args.compile else [(False, "math", "none")]
        if args.compile:
            graphs += [(True, "auto", s) for s in args.inductor or ["default"]]
        for comp, impl, spec in graphs:
            for kind, rows, pad, ptw, scope, optim in ((k, r, p, w, c, o) for k in jobs for r in args.rows
                                                       for p in pads for w in project_training
                                                       for c in (scopes if comp else ["model"])
                                                       for o in optimizers):
                    # "default": the trainer's options for this scope (compile_scope=loss adds LOSS_SCOPE_OPTIONS)
                    opts = parse_compile_options(spec, loss_scope=scope == "loss") if comp else {}
                    label = (f"bf16 + compile ({scope}) + CUDA graph" if comp else "bf16 + CUDA graph")
                    ptw = set_project_training(ptw, DEVICE)
                    try:
                        step, params = graphed_generator_step(kind, rows, compile=comp, impl=impl, inductor=opts,
                                                              pad=pad, scope=scope, optimizer=optim)
                        s = time_steps(step)
                    except Exception as exc:  # noqa: BLE001 -- reported, the other rows go on
                        rows_out.append({"job": kind, "rows_per_gpu": rows, "precision": label, "attention": impl,
                                         "pad_widths": pad, "project_training_max_width": ptw, "optimizer": optim,
                                         "error": f"{type(exc).__name__}: {exc}"})
                        print(json.dumps(rows_out[-1]), flush=True)
                        continue
                    rows_out.append({"job": kind, "rows_per_gpu": rows, "precision": label, "attention": impl,
                                     "pad_widths": pad, "project_training_max_width": ptw, "optimizer": optim,
                                     "world_size": 1,
                                     "s_per_step": s, "samples_per_s": rows / s,
                                     "mfu": 6 * params * rows / s / (peak * 1e12),
                                     **({"inductor": opts} if comp else {})})
                    print(json.dumps(rows_out[-1]), flush=True)
    if not args.ddp_only and not args.cpu and not args.no_idrank:
        # IdRank: cached pools vs re-sampling the candidates every step (the public code).
        torch.manual_seed(0)
        V = 1785
        ranker = IdRanker(num_face_vertices=V).cuda()
        opt = torch.optim.AdamW(ranker.parameters(), lr=1e-6, fused=True)
        cand = torch.randn(8, 100, V, 3, device="cuda") * 2 + 50
        gt = torch.randn(8, V, 3, device="cuda") + 50
        ctx = torch.randn(8, 1024, device="cuda")

        def rank_step() -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                errors, target = ranking_targets(cand, gt)
                loss = listnet_loss(ranker(cand, ctx), target).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        s_pool = time_steps(rank_step)
        idgen = Denoiser(dim=300, cond_dim=512).cuda().eval()
        diff = GaussianDiffusion().cuda()
        arc = torch.randn(8, 512, device="cuda")

        def resample_step() -> None:  # the public way: 100 x DDPM-1000 for the 8 images, every step
            diff.sample(idgen, arc, dim=300, num_samples=100)
            rank_step()

        s_resample = time_steps(resample_step, n=1, warmup=1)
        rows_out.append({"job": "idrank", "mode": "cached pools", "images_per_s": 8 / s_pool, "s_per_step": s_pool})
        rows_out.append({"job": "idrank", "mode": "re-sample every step (public code)", "images_per_s": 8 / s_resample,
                         "s_per_step": s_resample})
    if rank == 0:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
        print(f"device: {name} x{world}  matmul {peak:.2f} TFLOP/s")
        launch = {"reduction_launch": args.reduction_launch if args.compile else None,
                  "min_reductions": reduction_launch.MIN_REDUCTIONS,
                  "relaunched_kernels": None if relaunched is None else [vars(r) for r in relaunched]}
        print(f"reduction launch: {launch['reduction_launch']}, kernels relaunched: "
              f"{None if relaunched is None else len(relaunched)}")
        for r in rows_out:
            print(json.dumps(r))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"device": name, "world_size": world, "bf16_gemm_tflops": peak,
                                             **launch, "rows": rows_out}, indent=1))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
