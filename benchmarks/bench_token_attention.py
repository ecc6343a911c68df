"""The 16-token attention after the q/k/v projection, alone (issue 8, goal 1): microseconds per call of each
form at `--rows` rows (bf16 q/k/v, as in a bf16 sampling step), and the largest error against a float64
reference on the first rows.

Forms: explicit math (permute + batched matmuls + softmax + token mix, eager and compiled), the fused-reduction
form compiled, and the Triton kernel of `ofer.models.token_attention_kernel` (the 2026-11-26 H200 run also timed
a first kernel version with CUDA-core products, since removed: 868 us).

    python benchmarks/bench_token_attention.py --rows 25600 --json $OUT/token_attention.json
    python benchmarks/bench_token_attention.py --rows 65536 --backward-launches 4x2x2x4,4x4x2x4,4x1x1x4 --json ...
    python benchmarks/bench_token_attention.py --rows 65536 --widths 10,25,53 --project-backward-launches 16x4,16x8
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ofer.models import token_attention_kernel as tak  # noqa: E402
from ofer.models.unet1d import TokenSelfAttention  # noqa: E402

T, H, DH = 16, 4, 32


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=25_600)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--launches", default="2x2x3x2",
                    help="comma list of the Triton kernel's launch shapes, rows per tile x tiles per program x "
                         "stages x warps (token_attention_kernel.LAUNCH)")
    ap.add_argument("--widths", default="",
                    help="comma list of attention input widths C: also time the cuBLAS projection + kernel against "
                         "the kernel with the projection inside (token_attention_project_pool)")
    ap.add_argument("--project-launches", default="32x4",
                    help="comma list of the projecting Triton kernel's launches, rows per program x warps")
    ap.add_argument("--gluon-launches", default="32x4",
                    help="comma list of the projecting Gluon kernel's launches (token_attention_kernel."
                         "PROJECT_GLUON_LAUNCH), rows per program x warps [x column chunks [x register cap]]; '' "
                         "to leave it out")
    ap.add_argument("--weight-fragments", default=None,
                    help="comma list of true,false: time each Gluon launch with its weights loaded as register-order "
                         "fragments or through shared memory (token_attention_kernel.PROJECT_WEIGHT_FRAGMENTS); "
                         "default: the module's")
    ap.add_argument("--project-backward-launches", default="",
                    help="with --widths: also time forward + backward (gradients of x, the projection weight and w) "
                         "of the cuBLAS projection + kernels against the projecting kernel with its backward, per "
                         "launch of the latter (rows per program x warps, token_attention_kernel."
                         "PROJECT_BACKWARD_LAUNCH)")
    ap.add_argument("--backward-launches", default="",
                    help="comma list of the backward kernel's launch shapes (token_attention_kernel.BACKWARD_LAUNCH): "
                         "also time the gradient of the pooled output w.r.t. q/k/v and w, kernel vs autograd of the "
                         "explicit math (eager and compiled)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    qkv = (torch.randn(args.rows, T * 3 * H * DH, device="cuda") * 2).to(torch.bfloat16)
    w = torch.randn(T, device="cuda")
    ref = tak.token_attention_pool_reference(qkv[:512], w, T, H, DH)
    att = TokenSelfAttention(8, heads=H, head_dim=DH, tokens=T).cuda()

    def math(x: torch.Tensor) -> torch.Tensor:
        return math_pool(x, w)

    def reduce(x: torch.Tensor) -> torch.Tensor:
        return att._pooled_by_reductions(x.view(-1, T, 3, H, DH), w).reshape(-1, H * DH)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return tak.token_attention_pool(x, w, T, H, DH)

    def launched(spec: str):  # noqa: ANN202
        tak.set_launch(spec)  # a malformed spec fails here, before any timing

        def run(x: torch.Tensor) -> torch.Tensor:
            tak.set_launch(spec)
            return kernel(x)
        return run

    forms = {"math eager": math, "math compiled": torch.compile(math), "reduce compiled": torch.compile(reduce)}
    forms.update({f"triton dot {spec}": launched(spec) for spec in args.launches.split(",")})
    out = {"device": torch.cuda.get_device_name(), "rows": args.rows, "forms": []}
    bytes_read = qkv.numel() * qkv.element_size()
    for name, fn in forms.items():
        try:
            with torch.no_grad():
                err = float((fn(qkv[:512]).double() - ref).abs().max())
            us = timed_us(fn, qkv, args.iters)
            row = {"form": name, "us_per_call": us, "read_TB_per_s": bytes_read / us / 1e6, "max_abs_err": err}
        except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
            row = {"form": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        out["forms"].append(row)
        print(json.dumps(row), flush=True)
    timed = [r for r in out["forms"] if r["form"].startswith("triton dot") and "us_per_call" in r]
    if timed:
        best = min(timed, key=lambda r: r["us_per_call"])
        out["best_launch"] = best["form"].split()[-1]
        print(f"fastest launch: {out['best_launch']} ({best['us_per_call']:.0f} us)")
    if args.widths:
        out["projection"] = project_rows(args, w)
    if args.backward_launches:
        out["backward"] = backward_rows(args, qkv, w)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


def math_pool(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The explicit math form: permuted q/k/v, batched matmuls, softmax, token mix with w."""
    q, k, v = x.view(-1, T, 3, H, DH).permute(2, 0, 3, 1, 4).unbind(0)
    a = (q @ k.transpose(-1, -2) * DH**-0.5).softmax(-1)
    return torch.einsum("bhtd,t->bhd", a.to(v.dtype) @ v, w.to(v.dtype)).reshape(-1, H * DH)


def timed_us(fn, x: torch.Tensor, iters: int, repeats: int = 3) -> float:  # noqa: ANN001
    """GPU microseconds per call of fn(x): `iters` calls captured in one CUDA graph (as sampling runs them, so
    the host's launch time does not count), the best of `repeats` replays; eager launches if the capture fails
    (e.g. the compiled forms). A single eager window, as before 2026-11-26 (sixth), measured the host for the
    projecting op too (its operand padding launches a few small kernels per call), which may be why one launch
    took 230 us in one run and 535 us in another."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        torch.cuda.synchronize()
        graph = None
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(iters):
                    fn(x)
        except Exception:  # noqa: BLE001 -- not capturable: time eager launches
            graph = None
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            if graph is not None:
                graph.replay()
            else:
                for _ in range(iters):
                    fn(x)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / iters * 1e3)
    return best


def backward_rows(args: argparse.Namespace, qkv: torch.Tensor, w: torch.Tensor) -> list[dict]:
    """The backward alone (us per call): d pooled -> (d qkv, d w). Autograd through the explicit math (eager and
    compiled; forward included, as autograd needs it) against the backward kernel per launch (no forward: it
    recomputes what it needs). Error: largest |d qkv| difference from float64 autograd of the per-token formula
    on the first 512 rows, relative to the largest reference entry."""
    g = torch.randn(qkv.shape[0], H * DH, device="cuda")
    q64, w64 = qkv[:512].double().requires_grad_(), w.double().requires_grad_()
    ref = torch.autograd.grad(tak.token_attention_pool_reference(q64, w64, T, H, DH), q64, g[:512].double())[0]
    wg = w.detach().requires_grad_()

    def math_grad(fn):  # noqa: ANN001, ANN202
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                xx = x.detach().requires_grad_()
                out = fn(xx, wg)
                return torch.autograd.grad(out, xx, g[: x.shape[0]].to(out.dtype))[0]
        return run

    forms = {"backward: math autograd eager": math_grad(math_pool),
             "backward: math autograd compiled": math_grad(torch.compile(math_pool))}
    for spec in args.backward_launches.split(","):
        tak.set_launch(spec, backward=True)  # a malformed spec fails here, before any timing

        def kernel_bwd(x: torch.Tensor, spec: str = spec) -> torch.Tensor:
            tak.set_launch(spec, backward=True)
            return tak.token_attention_pool_backward(x, w, g[: x.shape[0]], T, H, DH)[0]
        forms[f"backward kernel {spec}"] = kernel_bwd
    rows = []
    for name, fn in forms.items():
        try:
            err = float((fn(qkv[:512]).double() - ref).abs().max() / ref.abs().max())
            row = {"form": name, "us_per_call": timed_us(fn, qkv, args.iters), "max_rel_err": err}
        except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
            row = {"form": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def project_rows(args: argparse.Namespace, w: torch.Tensor) -> list[dict]:
    """Per input width: normalised input (rows, C) bf16 -> pooled attention, (a) the bf16 cuBLAS projection to
    (rows, 6,144) followed by the kernel, (b) the kernels with the projection inside (Triton, Gluon), per launch."""
    rows = []
    saved, saved_kernel, saved_frag = dict(tak.PROJECT_LAUNCH), tak.PROJECT_KERNEL, tak.PROJECT_WEIGHT_FRAGMENTS
    frags = [v == "true" for v in args.weight_fragments.split(",")] if args.weight_fragments else [saved_frag]
    saved_gluon = {k: dict(v) for k, v in tak.PROJECT_GLUON_LAUNCH.items()}
    for c in (int(v) for v in args.widths.split(",")):
        x = torch.nn.functional.normalize(torch.randn(args.rows, c, device="cuda"), dim=-1).mul(c**0.5)
        x = x.to(torch.bfloat16)
        wqkv = (torch.randn(T * 3 * H * DH, c, device="cuda") * c**-0.5).to(torch.bfloat16)
        ref = tak.token_attention_pool_reference(x[:512].double() @ wqkv.double().T, w, T, H, DH)

        def separate(xx: torch.Tensor) -> torch.Tensor:
            return tak.token_attention_pool(torch.nn.functional.linear(xx, wqkv), w, T, H, DH)

        def separate_aligned(xx: torch.Tensor) -> torch.Tensor:  # K padded to a multiple of 8 for cuBLAS
            pad = -c % 8
            return tak.token_attention_pool(torch.nn.functional.linear(torch.nn.functional.pad(xx, (0, pad)),
                                                                       torch.nn.functional.pad(wqkv, (0, pad))),
                                            w, T, H, DH)

        forms = {"projection + kernel": separate, "projection (K padded to 8) + kernel": separate_aligned}
        specs = [("triton", s, saved_frag) for s in args.project_launches.split(",") if s]
        specs += [("gluon", s, f) for s in args.gluon_launches.split(",") if s for f in frags]
        for kernel, spec, frag in specs:
            def fused(xx: torch.Tensor, spec: str = spec, kernel: str = kernel, frag: bool = frag) -> torch.Tensor:
                tak.set_project_launch(spec, kernel=kernel)
                tak.PROJECT_KERNEL = kernel
                tak.PROJECT_WEIGHT_FRAGMENTS = frag
                return tak.token_attention_project_pool(xx, wqkv, w, T, H, DH)
            name = f"projecting kernel {spec}" if kernel == "triton" else f"projecting Gluon kernel {spec}"
            forms[name + (f", weight fragments {frag}" if kernel == "gluon" and len(frags) > 1 else "")] = fused
        for name, fn in forms.items():
            try:
                with torch.no_grad():
                    err = float((fn(x[:512]).double() - ref).abs().max())
                row = {"width": c, "form": name, "us_per_call": timed_us(fn, x, args.iters), "max_abs_err": err}
            except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
                row = {"width": c, "form": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.project_backward_launches:
            rows += project_backward_rows(args, x, wqkv, w)
    tak.PROJECT_LAUNCH.update(saved)
    tak.PROJECT_GLUON_LAUNCH.update(saved_gluon)
    tak.PROJECT_KERNEL = saved_kernel
    tak.PROJECT_WEIGHT_FRAGMENTS = saved_frag
    return rows


def project_backward_rows(args: argparse.Namespace, x: torch.Tensor, wqkv: torch.Tensor, w: torch.Tensor) -> list[dict]:
    """Forward + backward (us per call) of the pooled attention of input x: the cuBLAS projection + the kernel after
    it (autograd: the backward kernel, then the projection's two matmuls) against the projecting kernel, whose
    backward recomputes q/k/v and writes only their gradient, per backward launch. Error: the largest |dx|
    difference from float64 autograd on the first 512 rows, relative to the largest reference entry."""
    c = x.shape[1]
    g = torch.randn(x.shape[0], H * DH, device="cuda")
    x64, wq64 = x[:512].double().requires_grad_(), wqkv.double()
    ref = torch.autograd.grad(tak.token_attention_pool_reference(x64 @ wq64.T, w, T, H, DH), x64, g[:512].double())[0]
    wq = wqkv.detach().requires_grad_()

    def grad_of(pooled):  # noqa: ANN001, ANN202
        def run(xx: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                xg = xx.detach().requires_grad_()
                return torch.autograd.grad(pooled(xg), (xg, wq), g[: xx.shape[0]])[0]
        return run

    forms = {"fwd+bwd: projection + kernel": grad_of(
        lambda xx: tak.token_attention_pool(torch.nn.functional.linear(xx, wq), w, T, H, DH))}
    for spec in args.project_backward_launches.split(","):
        rows_, warps = (int(v) for v in spec.split("x"))

        def fused(xx: torch.Tensor, rows_: int = rows_, warps: int = warps) -> torch.Tensor:
            for cp in tak.PROJECT_BACKWARD_LAUNCH:
                tak.PROJECT_BACKWARD_LAUNCH[cp] = {"block_rows": rows_, "num_warps": warps}
            return grad_of(lambda xg: tak.token_attention_project_pool(xg, wq, w, T, H, DH))(xx)
        forms[f"fwd+bwd: projecting kernel, backward {spec}"] = fused
    rows = []
    for name, fn in forms.items():
        try:
            err = float((fn(x[:512]).double() - ref).abs().max() / ref.abs().max())
            row = {"width": c, "form": name, "us_per_call": timed_us(fn, x, args.iters), "max_rel_err": err}
        except Exception as exc:  # noqa: BLE001 -- reported, the other forms go on
            row = {"width": c, "form": name, "error": f"{type(exc).__name__}: {exc}"[:400]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
