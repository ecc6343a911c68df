"""CUDA-graph sampling reproduces the eager sampler (GPU only)."""
from __future__ import annotations

import pytest
import torch

from ofer.diffusion import GaussianDiffusion
from ofer.fast_sampling import (COMPILE_OPTIONS, LOSS_SCOPE_OPTIONS, GraphedSampler, parse_compile_options,
                                parse_key_values)
from ofer.models.unet1d import Denoiser


def test_needs_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedSampler(GaussianDiffusion(), Denoiser(dim=3, cond_dim=2, widths=(3, 2)), rows=2, dim=3, cond_dim=2,
                       device="cpu")


def test_num_samples_must_divide_the_rows():
    model = Denoiser(dim=3, cond_dim=2, widths=(3, 2))
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"num_samples={bad} must be >= 1 and divide rows=8"):
            GraphedSampler(GaussianDiffusion(), model, rows=8, dim=3, cond_dim=2, num_samples=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("opts,compile,grouped,pad", [({"sampler": "ddim", "steps": 30}, False, False, False),
                                                      ({"sampler": "dpmpp", "steps": 12}, False, False, True),
                                                      ({"sampler": "ddim", "steps": 30}, True, False, False),
                                                      ({"sampler": "ddpm", "steps": None}, False, True, True),
                                                      ({"sampler": "ddim", "steps": 30}, True, True, True),
                                                      ({"sampler": "ddpm", "steps": None}, True, True, True)])
def test_graphed_equals_eager(opts, compile, grouped, pad):
    """Compiled stochastic steps draw their noise inside the compiled update; built with inductor's
    `fallback_random` they draw it as the eager loop does (the same numbers), so the samples match."""
    torch.manual_seed(0)
    model = Denoiser(dim=53, cond_dim=16, widths=(53, 25, 10)).cuda().eval()
    for p in model.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    diff = GaussianDiffusion().cuda()
    cond = torch.randn(4, 16, device="cuda")
    x_T = torch.randn(4, 8, 53, device="cuda")
    stochastic = opts["sampler"] == "ddpm"
    torch.manual_seed(1)  # the same per-step noise for both when the sampler draws any
    eager = diff.sample(model, cond, dim=53, num_samples=8, x_T=x_T, **opts)
    with torch._inductor.config.patch(fallback_random=True):  # compiled while building (its warm-up steps)
        graphed = GraphedSampler(diff, model, rows=32, dim=53, cond_dim=16, bf16=False, chunk=7, compile=compile,
                                 num_samples=8 if grouped else None, pad_widths=pad, **opts)
    assert graphed.cfilm.shape[0] == (4 if grouped else 32)  # one FiLM row per condition, or per sample
    assert graphed.model.widths == ((56, 32, 16) if pad else (53, 25, 10))  # sampled through Denoiser.padded()
    torch.manual_seed(1)
    out = graphed(cond, num_samples=8, x_T=x_T)
    torch.testing.assert_close(out, eager, atol=2e-4 * (5 if stochastic else 1), rtol=1e-4)
    if grouped:
        with pytest.raises(ValueError, match="built for num_samples=8 per condition, got num_samples=4"):
            GraphedSampler.__call__(graphed, torch.randn(8, 16, device="cuda"), num_samples=4)
    torch.manual_seed(1)
    out2 = graphed(cond, num_samples=8, x_T=x_T)  # replay is repeatable
    torch.testing.assert_close(out2, out, atol=0, rtol=0)
    # The test can fail: other starting noise gives other samples.
    assert (graphed(cond, num_samples=8, x_T=x_T + 1).sub(eager)).abs().max() > 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_stochastic_steps_draw_fresh_standard_normal_noise(bf16):
    """Compiled, the noise is drawn inside the update's kernel. A new Denoiser predicts eps = 0 exactly (its output
    layer starts at zero), so each DDIM (eta = 1) step is x <- c_i x + s_i z_i (c_i = P + Q W_CUR A of the plan),
    and from x_T ~ N(0, 1) the samples are N(0, v), v = prod c^2 + sum_i s_i^2 prod_{j > i} c_j^2 (float64 from the
    plan). Noise repeated in every step would give prod c^2 + (sum_i s_i prod_{j > i} c_j)^2, 4x more here; noise
    shared by all rows would move the column means of the noise part; the same noise in every call would make
    two calls from one x_T equal."""
    from ofer.diffusion import A, P, Q, S, W_CUR

    torch.manual_seed(0)
    model = Denoiser(dim=53, cond_dim=16, widths=(53, 25, 10)).cuda().eval()
    diff = GaussianDiffusion().cuda()
    rows = 4096
    sampler = GraphedSampler(diff, model, rows=rows, dim=53, cond_dim=16, sampler="ddim", steps=20, eta=1.0,
                             bf16=bf16, chunk=7, compile=True, num_samples=rows // 4)
    coeffs = sampler.plan.coeffs.double().cpu()
    c, s = coeffs[:, P] + coeffs[:, Q] * coeffs[:, W_CUR] * coeffs[:, A], coeffs[:, S]
    v, amp, prod = 1.0, 0.0, 1.0
    for ci, si in zip(c.tolist(), s.tolist()):
        v, amp, prod = ci * ci * v + si * si, ci * amp + si, prod * ci
    assert prod**2 + amp**2 > 2 * v  # the test tells fresh noise from repeated noise
    cond = torch.randn(4, 16, device="cuda")
    x_T = torch.randn(4, rows // 4, 53, device="cuda")
    out = sampler(cond, num_samples=rows // 4, x_T=x_T).double()
    var = float(out.var())
    assert abs(var - v) < 0.03 * v, (var, v)  # 217k values: the estimate's relative std is 0.3%
    assert abs(float(out.mean())) < 5 * (v / out.numel()) ** 0.5
    part = (out - prod * x_T.double()).reshape(rows, 53)  # the noise's part, variance v - prod^2
    col = part.mean(0)
    assert float(col.abs().max()) < 5 * ((v - prod**2) / rows) ** 0.5, col.abs().max()
    again = sampler(cond, num_samples=rows // 4, x_T=x_T).double()
    assert float((again - out).abs().mean()) > 0.5 * (v - prod**2) ** 0.5


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_runs_a_model_without_the_split_film_methods(compile):
    """Any noise predictor model(x, t, cond) works: it runs whole in every step (compile applies to a trunk only)."""

    class Plain(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x, t, cond):  # noqa: ANN001, ANN201
            return self.inner(x, t, cond)

    torch.manual_seed(0)
    model = Plain(Denoiser(dim=53, cond_dim=16, widths=(53, 25, 10))).cuda().eval()
    diff = GaussianDiffusion().cuda()
    cond = torch.randn(2, 16, device="cuda")
    x_T = torch.randn(2, 4, 53, device="cuda")
    eager = diff.sample(model, cond, dim=53, num_samples=4, x_T=x_T, sampler="ddim", steps=10)
    graphed = GraphedSampler(diff, model, rows=8, dim=53, cond_dim=16, bf16=False, compile=compile, sampler="ddim",
                             steps=10)
    assert not graphed.split_film and graphed.trunk is None
    torch.testing.assert_close(graphed(cond, num_samples=4, x_T=x_T), eager, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["COMPILE_OPTIONS", "LOSS_SCOPE_OPTIONS"])
def test_compile_options_are_options_of_the_installed_inductor(name: str):
    """Every key of COMPILE_OPTIONS and LOSS_SCOPE_OPTIONS (dotted keys name a sub-config, e.g.
    triton.mix_order_reduction) is an option of this torch's inductor with a value of the option's type: torch.compile
    rejects unknown keys only when it compiles, deep inside a training or sampling run."""
    import torch._inductor.config as inductor_config

    for key, value in {"COMPILE_OPTIONS": COMPILE_OPTIONS, "LOSS_SCOPE_OPTIONS": LOSS_SCOPE_OPTIONS}[name].items():
        node = inductor_config
        for part in key.split("."):
            assert hasattr(node, part), f"{name} key {key!r}: torch {torch.__version__}'s inductor has no {part!r}"
            node = getattr(node, part)
        assert type(node) is type(value), f"{name}[{key!r}] = {value!r}, inductor's default is {node!r}"


def test_parse_compile_options():
    assert parse_compile_options("none") == {}
    assert parse_compile_options("default") == COMPILE_OPTIONS
    assert parse_compile_options("default") is not COMPILE_OPTIONS  # a copy: callers may edit it
    # as the trainer compiles its loss scope: both dicts, the loss scope's keys added
    assert parse_compile_options("default", loss_scope=True) == {**COMPILE_OPTIONS, **LOSS_SCOPE_OPTIONS}
    assert set(LOSS_SCOPE_OPTIONS) - set(COMPILE_OPTIONS)
    assert parse_compile_options("none", loss_scope=True) == {}
    assert parse_compile_options("force_shape_pad=true", loss_scope=True) == {"force_shape_pad": True}  # as given
    assert parse_compile_options("force_shape_pad=true,padding_stride_threshold=256,x=0.5,y=False") == {
        "force_shape_pad": True, "padding_stride_threshold": 256, "x": 0.5, "y": False}
    # the defaults with some keys changed or added
    assert parse_compile_options("default,force_shape_pad=false,max_autotune_gemm=true", loss_scope=True) == {
        **COMPILE_OPTIONS, **LOSS_SCOPE_OPTIONS, "force_shape_pad": False, "max_autotune_gemm": True}
    with pytest.raises(ValueError, match=r"--inductor 'x': expected key=value.*e.g. default,max_autotune_gemm=true"):
        parse_compile_options("default,x")
    for bad in ("force_shape_pad", "=1", "a=1,b"):
        with pytest.raises(ValueError, match="expected key=value"):
            parse_compile_options(bad)
    with pytest.raises(ValueError, match="'x' must be an integer, a float, true or false"):
        parse_compile_options("x=abc")
    with pytest.raises(ValueError, match=r"--ddp-kwargs 'b': expected key=value\[,key=value\], e.g. b=1"):
        parse_key_values("b", "--ddp-kwargs", "b=1")  # the shared parser names the option it parses
