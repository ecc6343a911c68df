"""Steps per second of the training loop itself (`ofer.training.train`), with and without `trainer.cuda_graph`.

`bench_training.py` times a bare step (forward, backward, AdamW); this script runs the real loop around it:
the deterministic sampler and DataLoader, the per-step stats vector and its one host sync, clipping, AdamW,
EMA, the LR schedule, logging. The data are cached features already on the GPU, as with the feature cache:
each dataset item is a block of `--rows-per-item` rows of (target, condition) in one device tensor, gathered
by the batch's indices inside the loss (so the loss depends on the batch through its tensors only, as
`trainer.cuda_graph` requires). Paper-sized IdGen / ExpGen denoisers with our default attention, bf16,
`trainer.compile=true`. Time per step = wall time between the ends of steps `--warmup` and `--steps` - 1,
each step ending with its host sync (the last step also writes the final checkpoint, so it is left out); MFU as
in bench_training.py (6 x parameters x rows / time / measured bf16 GEMM rate). Job `idrank`: the IdRank task on
cached candidate pools (`--rank-batch` images of `--candidates` candidates per step, FLAME decoding inside the loss),
samples = candidates; `--compile-scope none,model,loss` compares eager with both compile scopes.

    python benchmarks/bench_trainer.py --json $OUT/trainer.json
    python benchmarks/bench_trainer.py --jobs idrank --graph false --compile-scope none,model,loss
    python benchmarks/bench_trainer.py --cpu --rows-per-item 8 --items-per-step 4 --steps 7 --warmup 3  # smoke

Under `torchrun --nproc_per_node=W` every row trains on W processes with `--items-per-step` and `--items` per
process (trainer.batch_size is global, so W times those), each `--grad-sync` value a row (auto, the default: what
the trainer picks, flat with flat params; flat: one all-reduce per flat gradient buffer, the one-process step
otherwise, CUDA graphs included; ddp: DistributedDataParallel around the model, compiled alone, no CUDA graphs, so
`--graph false` there), and each `--grad-sync-dtype` value (float32, the default, or bfloat16:
trainer.grad_sync_dtype, the gradients all-reduced in bf16); samples/s count all processes, and rank 0 prints and
writes the JSON. Goal 5 (scaling over one GPU at equal per-GPU batch) is the first command against the second, in
one call (`--graph false` in both times the steps without CUDA graphs):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_trainer.py --jobs idgen,expgen --graph true \
        --json $OUT/trainer_x2.json
    CUDA_VISIBLE_DEVICES=0 python benchmarks/bench_trainer.py --jobs idgen,expgen --graph true \
        --json $OUT/trainer_x1.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_training import (SHAPES, add_min_reductions, comma_choices, count, gemm_tflops,  # noqa: E402
                                       project_training_widths, set_min_reductions, set_project_training)
from ofer import reduction_launch  # noqa: E402
from ofer.jobs import training_copy  # noqa: E402
from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.fast_sampling import LOSS_SCOPE_OPTIONS, parse_key_values  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402
from ofer.flame import FLAME  # noqa: E402
from ofer.models.ranker import IdRanker  # noqa: E402
from ofer.synthetic.assets import ensure_synthetic_flame  # noqa: E402
from ofer.tasks.ranker import RankerTask  # noqa: E402
from ofer.training import train  # noqa: E402
from ofer.training.config import GRAD_SYNC_DTYPES, REDUCTION_LAUNCHES, TrainerConfig  # noqa: E402


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, int]:
        return {"index": i}


class BlockTask:
    """A generator job on cached rows: item i is rows [i * R, (i + 1) * R) of device tensors (x0, cond)."""

    num_timesteps = 1000

    def __init__(self, kind: str, items: int, rows_per_item: int, device: str, pad: bool = False) -> None:
        dim, cond, widths = SHAPES[kind]
        torch.manual_seed(0)
        self.name = kind
        model = Denoiser(dim=dim, cond_dim=cond, widths=widths)
        self.params = count(model)  # the paper network's parameters (the padding's zeros do no model work)
        self.model = training_copy(model, pad, device)  # as train_generator's pad_widths
        self.diffusion = GaussianDiffusion().to(device)
        self.x0 = torch.randn(items, rows_per_item, dim, device=device)
        self.cond = torch.randn(items, rows_per_item, cond, device=device)
        self.items = items

    def param_groups(self) -> list[dict]:
        return [{"params": list(self.model.parameters())}]

    def train_dataset(self) -> _Indices:
        return _Indices(self.items)

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        idx = batch["index"]
        x0 = self.x0[idx].flatten(0, 1)
        cond = self.cond[idx].flatten(0, 1)
        return self.diffusion.training_losses(model, x0, cond)


class PoolTask(RankerTask):
    """The IdRank job (`ofer.tasks.ranker.RankerTask`: FLAME decoding of the candidates, ranking targets, the
    ranker, the ListNet loss) on cached candidate pools already on the device: item i is pool i (N candidate shape
    vectors), its ground-truth shape and the two image features. The paper-sized IdRanker (59.5 M parameters: the
    licensed FLAME's 1,785 `face` vertices; the synthetic FLAME's mask has fewer, so a sorted random 1,785 of its
    vertices stand in) with our default input standardisation."""

    def __init__(self, items: int, candidates: int, device: str, flame_dir: str) -> None:
        torch.manual_seed(0)
        paths = ensure_synthetic_flame(flame_dir)
        flame = FLAME(paths.flame_model, masks_path=paths.masks)
        faces = 1785
        face = torch.randperm(flame.v_template.shape[0])[:faces].sort().values
        flame.face_mask = lambda name: face  # the task reads the `face` mask through this
        self.pools = {"candidates": torch.randn(items, candidates, 300) * 0.5, "shape": torch.randn(items, 300) * 0.5,
                      "arcface_feat": torch.randn(items, 512), "farl_feat": torch.randn(items, 512)}
        model = IdRanker(num_face_vertices=faces, input_norm=True)
        super().__init__(model=model, flame=flame, dataset=[{"candidates": c} for c in self.pools["candidates"]])
        self.model.to(device)
        self.pools = {k: v.to(device) for k, v in self.pools.items()}
        self.params = count(model)
        self.items = items

    def train_dataset(self) -> _Indices:
        return _Indices(self.items)

    def loss(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        return super().loss(model, {k: v[batch["index"]] for k, v in self.pools.items()})


def sync_label(row: dict) -> str:
    """How a row's processes synced, for the table: e.g. 'flat x2', 'flat bf16 x2', 'none x1'."""
    dtype = " bf16" if row.get("grad_sync_dtype") == "bfloat16" else ""
    return f"{row['grad_sync']}{dtype} x{row['world_size']}"


def world_size() -> int:
    """Processes of this run (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(kind: str, graph: bool, args: argparse.Namespace, device: str, pad: bool = False,
        scope: str = "auto", flat: bool = True, sync: str = "auto", sync_dtype: str = "float32") -> dict:
    world = world_size()
    with tempfile.TemporaryDirectory() as flame_dir:
        task = (PoolTask(args.items * world, args.candidates, device, flame_dir) if kind == "idrank"
                else BlockTask(kind, args.items * world, args.rows_per_item, device, pad))
    params = task.params
    per_process = args.rank_batch if kind == "idrank" else args.items_per_step
    cfg = {"max_steps": args.steps, "batch_size": per_process * world,
           "ckpt_every": None, "log_every": 10 ** 6, "lr_scheduler": "constant", "precision": "bf16",
           "compile": device == "cuda" and scope != "none", "cuda_graph": graph,
           "compile_scope": "auto" if scope == "none" else scope, "progress": False, "seed": 0, "flat_params": flat,
           "reduction_launch": args.reduction_launch, "grad_sync": sync, "grad_sync_dtype": sync_dtype}
    # what the trainer resolves auto to in this run (grad_sync: only where several processes sync)
    resolved = TrainerConfig.from_mapping(cfg)
    scope = scope if scope == "none" else resolved.compile_scope_for(world > 1)
    sync = resolved.grad_sync_mode if world > 1 else "none"
    flat = resolved.flat_params_for(world > 1)  # off under DDP, whatever was asked
    ends: dict[int, float] = {}
    prof = None

    def on_step_end(step: int) -> None:
        nonlocal prof
        ends[step] = time.perf_counter()
        if args.profile and step == args.warmup:  # profile the next 3 steps (CPU and CUDA activity)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda"
                                                            else [])
            prof = torch.profiler.profile(activities=acts, record_shapes=bool(args.trace))
            prof.__enter__()
        elif prof is not None and step == args.warmup + 3:
            prof.__exit__(None, None, None)
            if args.trace:
                args.trace.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(args.trace / f"trainer_{kind}_graph{int(graph)}_{scope}.json"))
            for key in ("cpu_time_total", "cuda_time_total" if device == "cuda" else "self_cpu_time_total"):
                print(f"--- {kind}, cuda_graph={graph}: steps {args.warmup + 1}-{args.warmup + 3}, by {key}\n"
                      + prof.key_averages().table(sort_by=key, row_limit=25), flush=True)
            prof = None

    with tempfile.TemporaryDirectory() as run_dir:
        train(task, cfg, run_dir=run_dir, device=device, resolved_config={"model": {"kind": kind}, "trainer": cfg},
              on_step_end=on_step_end)
        log = Path(run_dir) / "metrics.jsonl"  # written by rank 0 only (other ranks: no events)
        records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    events = [r.get("event") for r in records]
    relaunched = [r.get("kernels") for r in records if r.get("event") == "reduction_relaunched"]
    # up to the second-last step: the last one ends with the final checkpoint (on_step_end runs after it)
    s = (ends[args.steps - 1] - ends[args.warmup]) / (args.steps - 1 - args.warmup)
    # each timed step's own duration (the step's stats read back is a host sync, so these follow the GPU): tells a
    # few slow steps (host hiccups, an epoch's new iterator) from a slower process
    each = sorted(ends[i + 1] - ends[i] for i in range(args.warmup, args.steps - 1))
    rows = args.rank_batch * args.candidates if kind == "idrank" else args.items_per_step * args.rows_per_item
    return {"job": kind, "cuda_graph": graph, "pad_widths": pad, "compile_scope": scope, "flat_params": flat,
            "world_size": world, "grad_sync": sync, "grad_sync_dtype": sync_dtype if world > 1 else "none",
            "rows_per_step": rows,  # per process
            "s_per_step": s, "s_per_step_median": each[len(each) // 2], "s_per_step_min": each[0],
            "s_per_step_max": each[-1],
            "samples_per_s": rows * world / s, "params": params,
            "events": sorted({e for e in events
                              if e and e.startswith(("cuda_graph", "reduction_launch", "flat_params"))}),
            "reduction_launch": args.reduction_launch, "min_reductions": reduction_launch.MIN_REDUCTIONS,
            "relaunched_kernels": relaunched[0] if relaunched else None}


def inductor_extra(spec: str | None) -> dict:
    """The inductor options that --inductor adds to the trainer's: none for None or 'default', the keys of
    'default,key=value,...' or of 'key=value,...' (the same here); ValueError names the option and the form."""
    if not spec or spec == "default":
        return {}
    body = spec[len("default,"):] if spec.startswith("default,") else spec
    return parse_key_values(body, "--inductor", "default,max_autotune_pointwise=true")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", default="idgen,expgen", help="comma list of idgen, expgen, idrank")
    ap.add_argument("--candidates", type=int, default=100, help="idrank: candidates per pool (OFER: 100)")
    ap.add_argument("--rank-batch", type=int, default=8, help="idrank: trainer.batch_size in images (OFER: 8)")
    ap.add_argument("--rows-per-item", type=int, default=1024)
    ap.add_argument("--items-per-step", type=int, default=64, help="trainer.batch_size (65,536 rows by default)")
    ap.add_argument("--items", type=int, default=128, help="dataset items (2 steps per epoch by default)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps not timed (compilation, graph capture at step 3)")
    ap.add_argument("--cpu", action="store_true", help="smoke run on the CPU (fp32, no compile, no graphs)")
    ap.add_argument("--graph", default="false,true", help="trainer.cuda_graph values to run (comma list)")
    ap.add_argument("--pad-widths", default="true", help="pad_widths values of the generator jobs to run (comma list "
                    "of true/false; true: the padded copy, the default of train_generator on CUDA)")
    ap.add_argument("--project-training", default=None, metavar="WIDTHS",
                    help="comma list of token_attention_kernel.PROJECT_TRAINING_MAX_WIDTH values to run (the widest "
                         "attention input trained through the projecting kernel; 0: none); default: the module's, "
                         "which on a card in CARD_PROJECT_TRAINING_MAX_WIDTH is that card's (H200: 16)")
    ap.add_argument("--compile-scope", default="auto",
                    help="comma list of trainer.compile_scope values to run (auto, the default: what the trainer "
                         "picks, loss except under DDP; model: the network compiled; loss: the task's whole loss "
                         "around it, q_sample and the L1 loss included; none: trainer.compile=false, eager); rows "
                         "name the scope auto resolved to")
    ap.add_argument("--flat-params", default="true", metavar="true|false|false,true",
                    help="trainer.flat_params values to run (comma list; true, the default: AdamW, clipping and EMA "
                         "over one buffer per param group; rows record what the trainer used: false under DDP)")
    ap.add_argument("--profile", action="store_true",
                    help="print the profiler tables (CPU and CUDA) of 3 steps after --warmup (those steps are timed "
                         "too: use the timings of a run without it)")
    ap.add_argument("--trace", type=Path, default=None, metavar="DIR",
                    help="with --profile: also record input shapes and write a Chrome trace of the 3 profiled steps "
                         "per row to DIR (read it with trace_kernels.py, which also shows where the GPU waits)")
    ap.add_argument("--inductor", default=None, metavar="default[,KEY=VALUE,...]",
                    help="inductor options of the compiled loss: 'default' (the trainer's own) or "
                         "'default,key=value,...' (those with these keys set, merged into "
                         "fast_sampling.LOSS_SCOPE_OPTIONS in this process), as bench_training.py reads them, e.g. "
                         "default,max_autotune_pointwise=true; 'key=value,...' alone is read as "
                         "'default,key=value,...' here (the trainer's options cannot be replaced whole)")
    ap.add_argument("--reduction-launch", default="one_row", choices=REDUCTION_LAUNCHES,
                    help="trainer.reduction_launch (one_row, the default: inductor's 257-512-column norm reductions "
                         "with >= 3 reductions one row per warp); compare in separate processes with fresh "
                         "TORCHINDUCTOR_CACHE_DIRs")
    ap.add_argument("--grad-sync", default="auto", metavar="auto|ddp|flat|ddp,flat",
                    help="under torchrun: trainer.grad_sync values to run (auto, the default: the trainer's pick, "
                         "flat with flat params; ddp: DistributedDataParallel; flat: one all-reduce per flat gradient "
                         "buffer, with the whole loss compiled as in one process); rows name the mode auto resolved "
                         "to; one process: ignored, one row, grad_sync 'none'")
    ap.add_argument("--grad-sync-dtype", default="float32", metavar="float32|bfloat16|float32,bfloat16",
                    help="under torchrun: trainer.grad_sync_dtype values to run (the dtype the gradients are "
                         "all-reduced in); one process: ignored, one row, grad_sync_dtype 'none'")
    add_min_reductions(ap)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.trace and not args.profile:
        ap.error("--trace needs --profile")
    if not 0 < args.warmup < args.steps - 1:
        ap.error(f"need 0 < --warmup < --steps - 1, got {args.warmup} and {args.steps}")
    set_min_reductions(ap, args)
    device = "cpu" if args.cpu else "cuda"
    world, rank = world_size(), int(os.environ.get("RANK", "0"))
    if world > 1:
        if device == "cuda":  # this process's GPU, before the tasks put their data on "cuda"
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # one process group for all rows, which the loop uses as it finds it (a group created again after
        # destroy_process_group can read the last one's stale addresses from torchrun's store)
        torch.distributed.init_process_group("gloo" if device == "cpu" else "nccl")
    peak = gemm_tflops() if device == "cuda" else None  # bf16 8192^3, as bench_training.py
    try:
        pads = [v == "true" for v in comma_choices(args.pad_widths, ("true", "false"), "--pad-widths")]
        widths = project_training_widths(args.project_training)
        scopes = comma_choices(args.compile_scope, ("auto", "model", "loss", "none"), "--compile-scope")
        jobs = comma_choices(args.jobs, ("idgen", "expgen", "idrank"), "--jobs")
        flats = [v == "true" for v in comma_choices(args.flat_params, ("true", "false"), "--flat-params")]
        extra = inductor_extra(args.inductor)
        syncs = comma_choices(args.grad_sync, ("auto", "ddp", "flat"), "--grad-sync")
        syncs = syncs if world > 1 else ["auto"]  # one process: nothing to sync, one row
        sync_dtypes = comma_choices(args.grad_sync_dtype, GRAD_SYNC_DTYPES, "--grad-sync-dtype")
        sync_dtypes = sync_dtypes if world > 1 else ["float32"]
    except ValueError as exc:
        ap.error(str(exc))
    LOSS_SCOPE_OPTIONS.update(extra)  # the trainer reads this dict when it compiles the loss
    rows = []
    for kind in jobs:
        graphs = (False,) if args.cpu else tuple(v == "true" for v in args.graph.split(","))
        for graph, pad, ptw, scope, flat, sync, sync_dtype in (
                (g, p, w, c, f, y, d) for g in graphs for p in pads for w in widths for c in scopes for f in flats
                for y in syncs for d in sync_dtypes):
            ptw = set_project_training(ptw, device)
            try:
                row = run(kind, graph, args, device, pad, scope, flat, sync, sync_dtype)
                row["project_training_max_width"] = ptw
                row["inductor_extra"] = extra
                if peak and kind != "idrank":  # IdRank: no MFU (its rows are candidates, its cost FLAME too)
                    row["mfu"] = 6 * row["params"] * row["rows_per_step"] / row["s_per_step"] / (peak * 1e12)
            except Exception as exc:  # noqa: BLE001 -- reported, the other rows go on
                row = {"job": kind, "cuda_graph": graph, "pad_widths": pad, "project_training_max_width": ptw,
                       "compile_scope": scope, "flat_params": flat, "world_size": world, "grad_sync": sync,
                       "grad_sync_dtype": sync_dtype, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank != 0:
        return
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {name}  bf16 GEMM {peak or 0:.0f} TFLOP/s")
    print(f"{'job':8} {'cuda_graph':>10} {'pad':>5} {'proj':>4} {'scope':>5} {'flat':>5} {'sync':>14} {'ms/step':>9} "
          f"{'samples/s':>12} {'MFU':>6} {'median':>7} {'min':>7} {'max':>7}")
    for r in rows:
        head = (f"{r['job']:8} {str(r['cuda_graph']):>10} {str(r['pad_widths']):>5} "
                f"{r['project_training_max_width']:>4} {r['compile_scope']:>5} {str(r['flat_params']):>5} "
                f"{sync_label(r):>14}")
        if "error" in r:
            print(f"{head} error: {r['error'][:200]}")
        else:
            mfu = f"{100 * r['mfu']:5.1f}%" if "mfu" in r else "     -"
            spread = " ".join(f"{r[k] * 1e3:7.2f}" for k in ("s_per_step_median", "s_per_step_min", "s_per_step_max"))
            print(f"{head} {r['s_per_step'] * 1e3:9.2f} {r['samples_per_s']:12,.0f} {mfu} {spread}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": name, "bf16_gemm_tflops": peak, "args": vars(args) | {
            "json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
