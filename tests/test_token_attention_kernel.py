"""Tests of the Triton token-attention kernel (ofer.models.token_attention_kernel) and of the Denoiser's
"triton" attention. The kernel runs here through Triton's CPU interpreter (Triton comes with torch's Linux
wheels, so this runs in CI too), and on CUDA in the GPU tests."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ofer.models.unet1d import Denoiser

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


def small_net(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = Denoiser(dim=12, cond_dim=6, widths=(12, 8, 4), time_dim=16)
    with torch.no_grad():  # give the zero-initialised layers signal
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.normal_(0.0, 0.05)
    return net.eval()


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_kernel_matches_reference_in_the_interpreter() -> None:
    """The kernel against an independent per-token float64 formula (odd row counts exercise the row mask, three
    attention shapes the stacking of 4, 8 and 2 rows per tile), and a whole Denoiser against PyTorch's SDPA."""
    script = textwrap.dedent("""
        import torch
        from ofer.models import token_attention_kernel as tak
        from ofer.models.token_attention_kernel import token_attention_pool, token_attention_pool_reference
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        default = dict(tak.LAUNCH)
        # the default launch, one program per tile, and others (3 row blocks per program, the last ones past the
        # end; 1 or 2 rows per tile)
        for launch in (default, {"block_rows": None, "tiles": 1, "stages": 1, "num_warps": 4},
                       {"block_rows": 1, "tiles": 3, "stages": 2, "num_warps": 2},
                       {"block_rows": 2, "tiles": 2, "stages": 3, "num_warps": 1}):
            tak.LAUNCH.update(launch)
            for R, T, H, D in [(1, 16, 4, 32), (7, 16, 4, 32), (5, 8, 2, 16), (3, 32, 2, 16), (13, 16, 4, 32), (40, 16, 4, 32)]:
                qkv = torch.randn(R, T * 3 * H * D) * 2
                w = torch.randn(T)
                out = token_attention_pool(qkv, w, T, H, D)
                ref = token_attention_pool_reference(qkv, w, T, H, D)
                assert out.dtype == torch.float32 and out.shape == (R, H * D)
                err = float((out.double() - ref).abs().max())
                assert err < 5e-5, (launch, R, T, H, D, err)  # float32 scores and softmax
        tak.LAUNCH.update(default)
        net = small_net()
        x, t, c = torch.randn(3, 12), torch.tensor([0, 500, 999]), torch.randn(3, 6)
        with torch.no_grad():
            ref = net.set_attention_impl("sdpa")(x, t, c)
            out = net.set_attention_impl("triton")(x, t, c)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_pytorch_fallback_of_the_op_matches_reference() -> None:
    """The op's PyTorch path (GPUs without bf16 tensor cores) against the float64 per-token formula."""
    from ofer.models.token_attention_kernel import _pooled_torch, token_attention_pool_reference

    torch.manual_seed(1)
    for R, T, H, D in [(1, 16, 4, 32), (6, 8, 2, 16)]:
        qkv, w = torch.randn(R, T * 3 * H * D) * 2, torch.randn(T)
        out = _pooled_torch(qkv, w, T, H, D)
        assert out.dtype == torch.float32 and out.shape == (R, H * D)
        torch.testing.assert_close(out.double(), token_attention_pool_reference(qkv, w, T, H, D), atol=1e-5, rtol=1e-5)


def test_triton_attention_refuses_autograd_and_missing_backend() -> None:
    net = small_net().set_attention_impl("triton")
    x, t, c = torch.randn(2, 12), torch.tensor([1, 2]), torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="inference-only"):
        net(x, t, c)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with torch.no_grad(), pytest.raises(RuntimeError, match="needs Triton .* a CUDA tensor"):
            net(x, t, c)  # a CPU tensor without the interpreter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_attention_on_cuda_matches_sdpa_and_is_the_auto_choice() -> None:
    dev = torch.device("cuda")
    net = Denoiser(dim=53, cond_dim=1024, widths=(53, 25, 10)).to(dev).eval()
    with torch.no_grad():
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.normal_(0.0, 0.02)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(1001, 53, device=dev, generator=gen)
    t = torch.randint(0, 1000, (1001,), device=dev, generator=gen)
    c = torch.randn(1001, 1024, device=dev, generator=gen)
    with torch.no_grad():
        ref = net.set_attention_impl("sdpa")(x, t, c)
        out = net.set_attention_impl("triton")(x, t, c)
        auto = net.set_attention_impl("auto")(x, t, c)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref16 = net.set_attention_impl("math")(x, t, c).float()
            out16 = net.set_attention_impl("triton")(x, t, c).float()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(auto, out)  # "auto" runs the kernel without autograd on CUDA
    # bf16: both differ from fp32 by rounding; the kernel (fp32 softmax on bf16 q/k/v) no more than "math"
    assert (out16 - ref).norm() <= 1.5 * (ref16 - ref).norm() + 1e-6


def test_set_launch_parses_and_rejects_bad_specs() -> None:
    from ofer.models import token_attention_kernel as tak

    saved = dict(tak.LAUNCH)
    try:
        assert tak.set_launch("2x8x3x1") == {"block_rows": 2, "tiles": 8, "stages": 3, "num_warps": 1}
        for bad in ("4x4x2", "4x4x2x0", "4xax2x2", "4x4x2x2x1", ""):
            with pytest.raises(ValueError, match="rows x tiles x stages x warps"):
                tak.set_launch(bad)
        assert tak.LAUNCH == {"block_rows": 2, "tiles": 8, "stages": 3, "num_warps": 1}  # unchanged by bad specs
    finally:
        tak.LAUNCH.clear()
        tak.LAUNCH.update(saved)
