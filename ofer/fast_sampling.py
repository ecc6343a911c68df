"""Sampling with CUDA graphs: the same update as `GaussianDiffusion.sample`, replayed without launch overhead.

The denoisers are small (12.5 M and 3.2 M parameters), so an eager sampling step is launch-bound (~7 ms on an
H100 whatever the batch). We capture `chunk` consecutive steps (model forward under optional bf16 autocast +
`denoise_step`) into one CUDA graph per chunk, for a fixed number of rows, and replay them; all graphs of
a sampler share one memory pool. Results equal the eager loop run with the same noise (up to kernel choice);
the per-step noise comes from the default CUDA generator (seed it with `torch.manual_seed`). With `compile=True`
the noise is drawn inside the compiled update (see `GraphedSampler._step_eager`): the same distribution and
seeding, other numbers than the eager loop's.

For our `Denoiser` the FiLM parameters are split (`Denoiser.time_film` + `condition_film`): the time part of
every step is computed once when the sampler is built (the plan's timesteps are fixed), the condition part
once per call, and each step only runs `Denoiser.trunk`. Built with `num_samples=N`, the condition part has
one row per condition instead of one per sample (`Denoiser.trunk` broadcasts it over each condition's N
rows): at 51,200 rows of IdGen the per-row float32 FiLM tensor is 0.7 GB, and adding the time part to it was
an extra 1.4 GB of memory traffic per step. With `compile=True` the whole step (trunk, noise prediction and
the sampler update) is one compiled function, so the update's element-wise arithmetic is fused too. The
sampler reads the model's weights when it is built (and samples a `Denoiser` through its `padded()` copy,
whose widths are multiples of 8, and in bf16 through its `autocast_copy()`, whose trunk weights are stored in
bf16 instead of being cast in every step): build a new one after changing them.
"""
from __future__ import annotations

import torch
from torch import nn

from ofer.diffusion import GaussianDiffusion, denoise_step
from ofer.models.unet1d import paddable

__all__ = ["COMPILE_OPTIONS", "LOSS_SCOPE_OPTIONS", "PAD_WIDTHS", "GraphedSampler", "parse_compile_options",
           "parse_key_values"]

# Inductor options of the compiled trunk (`torch.compile(..., options=COMPILE_OPTIONS)`). force_shape_pad: pad
# every matmul operand to aligned sizes (IdGen's 300 channels are not a multiple of 8, so cuBLAS ran them with
# sm80 kernels); measured on an H200 at 51,200 rows: IdGen step 7.55 -> 7.15 ms, ExpGen 3.52 -> 3.42 ms
# (`benchmarks/bench_denoiser_step.py --inductor`, BENCHMARKS.md). comprehensive_padding=False: no padded row
# strides for intermediate tensors; in training the FiLM matmul's (rows, 3,440) output got a 3,456 stride, and
# cuBLAS's addmm copied it twice (0.9 ms of a 27 ms IdGen step); same run on an H200, 65,536 rows: IdGen
# training step 27.28 -> 26.51 ms, ExpGen 15.79 -> 15.80, sampling steps unchanged (7.155 / 7.157 ms IdGen).
# triton.mix_order_reduction=False: in backward graphs, compute a norm's per-row gradient and its gain's column
# sums in separate kernels instead of one "mix-order" kernel per norm (which also left 28 partial column sums per
# IdGen step to ATen); sampling graphs have no gradient column sums (not timed alone; the pipeline with it and the
# H200's attention launches ran 1.011x the code before both on an H200, "Session of 2026-11-29, seventh"). H100,
# 65,536 rows, compiled loss in one CUDA graph, two calls: IdGen training step 24.09 -> 23.91 and 24.09 -> 23.90 ms,
# ExpGen 15.02 -> 15.02 ms (BENCHMARKS.md, "Session of 2026-11-28"). Module-level so the benchmarks can compare.
COMPILE_OPTIONS: dict = {"force_shape_pad": True, "comprehensive_padding": False, "triton.mix_order_reduction": False}
# Options the trainer adds to COMPILE_OPTIONS where it compiles the task's whole loss (trainer.compile_scope=loss,
# one process). combo_kernels limited to pointwise kernels: inductor runs independent pointwise kernels of one
# graph side by side as one launch (an IdGen training step has about 600 kernels, half of them under 6 us, such as
# the per-step bf16 casts of the weights under autocast). Same function: pointwise kernels are only grouped. H200,
# 65,536 rows, compiled loss in one CUDA graph: IdGen training step 21.24-21.30 -> 21.05 ms (BENCHMARKS.md,
# "Session of 2026-11-28, third"). Without the pointwise limit (H100): 23.94 -> 39.40 ms ("second").
LOSS_SCOPE_OPTIONS: dict = {"combo_kernels": True, "combo_kernels_pointwise_only": True}

# GraphedSampler's default for `pad_widths`: sample with `Denoiser.padded()` (widths rounded up to multiples of 8,
# the same function), so no 300-wide matmul needs a padding copy. Module-level so the benchmarks can compare.
PAD_WIDTHS = True


def parse_compile_options(spec: str, *, loss_scope: bool = False) -> dict:
    """Inductor options from "key=value,key=value" (values: integers, floats, true/false); "default" -> the
    module's `COMPILE_OPTIONS` (with `loss_scope`, plus `LOSS_SCOPE_OPTIONS`, as the trainer compiles its
    compile_scope=loss), "none" -> {} (inductor's own defaults), "default,key=value,..." -> the defaults with
    those keys set. For the benchmarks' --inductor."""
    if spec in ("default", "none"):
        return {**COMPILE_OPTIONS, **(LOSS_SCOPE_OPTIONS if loss_scope else {})} if spec == "default" else {}
    if spec.startswith("default,"):
        return {**parse_compile_options("default", loss_scope=loss_scope),
                **parse_key_values(spec[len("default,"):], "--inductor", "default,max_autotune_gemm=true")}
    return parse_key_values(spec, "--inductor", "padding_stride_threshold=256")


def parse_key_values(spec: str, option: str, example: str) -> dict:
    """Keyword arguments from "key=value,key=value" (values: integers, floats, true/false), for a benchmark's
    command-line `option` (named in the errors, with `example`)."""
    opts = {}
    for item in spec.split(","):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} {spec!r}: expected key=value[,key=value], e.g. {example}")
        low = val.lower()
        if low in ("true", "false"):
            opts[key] = low == "true"
            continue
        try:
            opts[key] = float(val) if "." in val else int(val)
        except ValueError:
            raise ValueError(f"{option} {spec!r}: value of {key!r} must be an integer, a float, true or false, "
                             f"got {val!r}") from None
    return opts


class GraphedSampler:
    """`GraphedSampler(diffusion, model, rows=M, dim=D, cond_dim=C, sampler=..., steps=...)(cond (B,C), num_samples=N)`
    with B*N == M rows. Build once per (model, shape, sampler); CUDA only. Pass `num_samples=N` when building
    for one FiLM row per condition (then every call must use that N). With `pad_widths` (default `PAD_WIDTHS`)
    a `Denoiser` with one GroupNorm group samples through its `padded()` copy."""

    def __init__(self, diffusion: GaussianDiffusion, model: nn.Module, *, rows: int, dim: int, cond_dim: int,
                 sampler: str = "ddpm", steps: int | None = None, eta: float = 0.0,
                 timestep_spacing: str = "trailing", bf16: bool = True, chunk: int = 50,
                 device: str | torch.device = "cuda", compile: bool = False, num_samples: int | None = None,
                 pad_widths: bool | None = None) -> None:
        if num_samples is not None and (num_samples < 1 or rows % num_samples):
            raise ValueError(f"GraphedSampler: num_samples={num_samples} must be >= 1 and divide rows={rows}")
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError("GraphedSampler needs a CUDA device; use GaussianDiffusion.sample on the CPU")
        pad_widths = PAD_WIDTHS if pad_widths is None else pad_widths
        if pad_widths and paddable(model):
            model = model.padded()  # a copy computing the same function with aligned widths
        if bf16 and callable(getattr(model, "autocast_copy", None)):
            model = model.autocast_copy(torch.bfloat16)  # trunk weights cast once, not in every step
        self.model, self.diffusion, self.rows, self.dim, self.bf16 = model, diffusion, rows, dim, bf16
        self.num_samples = num_samples
        self.plan = diffusion.plan(sampler, steps=steps, eta=eta, timestep_spacing=timestep_spacing, device=device)
        n = int(self.plan.timesteps.shape[0])
        self.x = torch.zeros(rows, dim, device=device)
        self.split_film = all(hasattr(model, a) for a in ("time_film", "condition_film", "trunk"))
        # the per-row condition, read only by a model without the split-FiLM methods
        self.cond = torch.zeros(0 if self.split_film else rows, cond_dim, device=device)
        # the previous step's clean-sample estimate, kept only for multistep solvers (dpmpp): ddpm and ddim steps
        # have W_PREV = 0 and would read and write it for nothing (2 x 61 MB per IdGen step at 51,200 rows)
        self.x0_prev = torch.zeros(rows, dim, device=device) if self.plan.multistep else None
        # one tensor per step (no views into a shared buffer: a compiled step sees the same layout every time)
        self.t = [self.plan.timesteps[i].expand(rows).contiguous() for i in range(n)]
        self.coeffs = [self.plan.coeffs[i].clone() for i in range(n)]
        self.trunk = None  # a model without the split-FiLM methods runs whole (and uncompiled) in every step
        self._step = self._step_eager
        if self.split_film:
            self.trunk = model.trunk
            with torch.no_grad():
                tfilm = model.time_film(self.plan.timesteps.to(device)).float()  # (n, F), one row per step
            self.tfilm = [tfilm[i].clone() for i in range(n)]
            groups = rows // num_samples if num_samples else rows
            self.cfilm = torch.zeros(groups, tfilm.shape[1], device=device)
            if compile:
                # torch.compile fuses the many small element-wise kernels (norms, FiLM, SiLU, the update) of a
                # step; the compiled kernels are then captured in our graphs like eager ones.
                self._step = torch.compile(self._step_eager, dynamic=False, options=dict(COMPILE_OPTIONS) or None)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        pool = None
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            self._run(range(min(2, n)))  # warm-up (cuBLAS handles, autotuning, compilation) outside capture
        torch.cuda.current_stream(device).wait_stream(stream)
        for start in range(0, n, chunk):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool), torch.no_grad():
                self._run(range(start, min(start + chunk, n)))
            pool = g.pool()
            self.graphs.append(g)

    def _run(self, steps: range) -> None:
        for i in steps:
            # This step's FiLM rows, one kernel outside the compiled step: inside it, inductor recomputed the sum
            # in front of every FiLM block kernel (11-14 small kernels per step instead of one).
            film = self.cfilm + self.tfilm[i] if self.split_film else None  # (conditions or rows, F)
            self._step(self.x, self.x0_prev, film, self.t[i], self.coeffs[i])

    def _step_eager(self, x: torch.Tensor, x0_prev: torch.Tensor | None, film: torch.Tensor | None,
                    t: torch.Tensor, coeffs: torch.Tensor) -> None:
        """One step in place on x and x0_prev (None: a sampler without multistep terms): the noise prediction (the
        trunk on this step's FiLM when the model has the split-FiLM methods, else the whole model) and
        `denoise_step`, with fresh standard normal noise for stochastic plans. Compiled, inductor draws that noise
        inside the update's kernel (Philox, seeded from the default CUDA generator) instead of writing it to
        memory and reading it back: other numbers than the eager step's `torch.randn_like`, the same
        distribution (`torch._inductor.config.fallback_random = True` while building gives the eager stream)."""
        if film is None:
            model = self.model
        else:
            model = lambda x_, t_, cond_: self.trunk(x_, film)  # noqa: E731 -- the trunk ignores t and cond
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            eps = self.diffusion.predict_noise(model, x, t, self.cond)
        noise = torch.randn_like(x) if self.plan.stochastic else None
        x_new, x0_new = denoise_step(x, eps.float(), x0_prev, coeffs, noise)
        x.copy_(x_new)
        if x0_prev is not None:
            x0_prev.copy_(x0_new)

    @torch.no_grad()
    def __call__(self, cond: torch.Tensor, *, num_samples: int, x_T: torch.Tensor | None = None) -> torch.Tensor:
        b = cond.shape[0]
        if b * num_samples != self.rows:
            raise ValueError(f"GraphedSampler built for {self.rows} rows, got {b} x {num_samples}")
        if self.num_samples is not None and num_samples != self.num_samples:
            raise ValueError(f"GraphedSampler built for num_samples={self.num_samples} per condition, got "
                             f"num_samples={num_samples}")
        if self.split_film:
            grouped = self.num_samples is not None  # one FiLM row per condition (else one per sample)
            self.cfilm.copy_(self.model.condition_film(cond if grouped else cond.repeat_interleave(num_samples, 0))
                             .float())
        else:
            self.cond.copy_(cond.repeat_interleave(num_samples, dim=0))
        if x_T is None:
            self.x.normal_()
        else:
            self.x.copy_(x_T.reshape(self.rows, self.dim))
        if self.x0_prev is not None:
            self.x0_prev.zero_()
        for g in self.graphs:
            g.replay()
        return self.x.clone().view(b, num_samples, self.dim)
