"""Tests of the Triton token-attention kernel (ofer.models.token_attention_kernel) and of the Denoiser's
"triton" attention. The kernel runs here through Triton's CPU interpreter (Triton comes with torch's Linux
wheels, so this runs in CI too), and on CUDA in the GPU tests."""

from __future__ import annotations

import importlib.util
import itertools
import os
import tempfile
import textwrap

from pathlib import Path

import pytest
import torch

from ofer.models.unet1d import Denoiser
from tests._triton_interpreter import run_interpreted

HAS_TRITON = importlib.util.find_spec("triton") is not None


def small_net(seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    net = Denoiser(dim=12, cond_dim=6, widths=(12, 8, 4), time_dim=16)
    with torch.no_grad():  # give the zero-initialised layers signal
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.normal_(0.0, 0.05)
    return net.eval()


def paper_idgen(rows: int, gen: torch.Generator) -> tuple[Denoiser, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paper-sized IdGen on gen's device (FiLM and output layers given signal) and `rows` inputs x, t, cond
    drawn from gen."""
    dev = gen.device
    net = Denoiser(dim=300, cond_dim=512, widths=(300, 50, 10)).to(dev)
    with torch.no_grad():
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.normal_(0.0, 0.02)
    x = torch.randn(rows, 300, device=dev, generator=gen)
    t = torch.randint(0, 1000, (rows,), device=dev, generator=gen)
    c = torch.randn(rows, 512, device=dev, generator=gen)
    return net, x, t, c


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_projecting_kernel_matches_reference_in_the_interpreter() -> None:
    """The kernel with the q/k/v projection inside against the float64 formula on x @ wqkv.T: widths below, at
    and not a power of two (the zero-padded channels), row counts that leave the last block partly empty, two
    launches, 1-4 heads; then a Denoiser whose blocks are all narrow against PyTorch's SDPA, and one where
    PROJECT_MAX_WIDTH sends the widest blocks to the separate projection (both paths in one network)."""
    script = textwrap.dedent("""
        import torch
        from ofer.models import token_attention_kernel as tak
        from ofer.models.unet1d import Denoiser
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        for launch in ("16x4", "32x2"):
            tak.set_project_launch(launch)
            # widths padded on the host (10, 53, 25, 1) and read in place, masked from C to the padded width
            # (56, 24, 8: multiples of 8) or not (64, 16)
            for R, C, H, D in [(37, 10, 4, 32), (5, 53, 4, 32), (16, 25, 2, 16), (3, 64, 1, 32), (1, 1, 1, 16),
                               (9, 56, 4, 32), (7, 24, 2, 16), (4, 8, 1, 16), (33, 16, 4, 32)]:
                x = torch.randn(R, C)
                wqkv = torch.randn(16 * 3 * H * D, C) * C**-0.5
                w = torch.randn(16)
                out = tak.token_attention_project_pool(x, wqkv, w, 16, H, D)
                ref = tak.token_attention_pool_reference(x.double() @ wqkv.double().T, w, 16, H, D)
                assert out.dtype == torch.float32 and out.shape == (R, H * D)
                err = float((out.double() - ref).abs().max())
                assert err < 5e-5, (launch, R, C, H, D, err)
                # a bf16 output is the float32 one rounded once (what autocast's cast before to_out does); the
                # interpreter rounds toward zero where the GPU rounds to nearest (the GPU test asserts equality),
                # so here: within one bf16 step
                lo = tak.token_attention_project_pool(x, wqkv, w, 16, H, D, torch.bfloat16)
                assert lo.dtype == torch.bfloat16 and lo.shape == out.shape
                assert bool(((lo.float() - out).abs() <= out.abs() * 2**-7).all()), (launch, R, C)
            # a row-strided view of a multiple-of-8 width is read through a contiguous copy
            wide = torch.randn(6, 40)
            wqkv = torch.randn(16 * 3 * 4 * 32, 24) * 24**-0.5
            out = tak.token_attention_project_pool(wide[:, 8:32], wqkv, w, 16, 4, 32)
            ref = tak.token_attention_pool_reference(wide[:, 8:32].double() @ wqkv.double().T, w, 16, 4, 32)
            assert float((out.double() - ref).abs().max()) < 5e-5
        net = small_net()
        x, t, c = torch.randn(3, 12), torch.tensor([0, 500, 999]), torch.randn(3, 6)
        with torch.no_grad():
            ref = net.set_attention_impl("sdpa")(x, t, c)
            out = net.set_attention_impl("triton")(x, t, c)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.manual_seed(1)
        net = Denoiser(dim=80, cond_dim=6, widths=(80, 24, 8), time_dim=16)
        with torch.no_grad():
            for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
                p.normal_(0.0, 0.05)
        net.eval()
        x, t, c = torch.randn(5, 80), torch.tensor([0, 10, 500, 900, 999]), torch.randn(5, 6)
        tak.PROJECT_MAX_WIDTH = 32  # the 80-wide blocks project separately, the 24- and 8-wide ones in the kernel
        calls = []
        for name in ("token_attention_pool", "token_attention_project_pool"):
            orig = getattr(tak, name)
            setattr(tak, name, lambda *a, orig=orig, name=name: calls.append(name) or orig(*a))
        with torch.no_grad():
            ref = net.set_attention_impl("sdpa")(x, t, c)
            out = net.set_attention_impl("triton")(x, t, c)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert calls.count("token_attention_pool") == 3 and calls.count("token_attention_project_pool") == 3, calls
        import pytest
        with pytest.raises(ValueError, match="1 <= C <= 64"):
            tak.token_attention_project_pool(torch.zeros(2, 65), torch.zeros(6144, 65), torch.zeros(16), 16, 4, 32)
        with pytest.raises(ValueError, match="wqkv must be a contiguous \\(6144, 8\\) tensor"):
            tak.token_attention_project_pool(torch.zeros(2, 8), torch.zeros(6144, 9), torch.zeros(16), 16, 4, 32)
        with pytest.raises(ValueError, match="powers of two, tokens >= 16"):
            tak.token_attention_project_pool(torch.zeros(2, 8), torch.zeros(8 * 3 * 32, 8), torch.zeros(8), 8, 1, 32)
        with pytest.raises(ValueError, match="out_dtype must be None, torch.float32, torch.bfloat16 or torch.float16"):
            tak.token_attention_project_pool(torch.zeros(2, 8), torch.zeros(6144, 8), torch.zeros(16), 16, 4, 32,
                                             torch.int32)
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_prepared_projection_weight_is_used_only_for_its_layout_in_the_interpreter() -> None:
    """`token_attention_project_pool` with a prepared weight: used when its layout is the call's (a weight prepared
    from other values gives those values' output, so the test fails if it is ignored), laid out again from wqkv
    when the layout differs (a stale one), refused when its shape does not fit its layout. Inference copies
    prepare their narrow blocks (`Denoiser.autocast_copy`), compute the same function, and prepare again when a
    state dict is loaded (without that the copy would keep the old weights' projection) and when moved or cast;
    a model that is not an inference copy prepares nothing."""
    script = textwrap.dedent("""
        import pytest
        import torch
        from ofer.models import token_attention_kernel as tak
        from ofer.models.unet1d import TokenSelfAttention
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        for R, C, H, D in [(37, 10, 4, 32), (9, 56, 4, 32), (5, 16, 2, 16)]:
            x, w = torch.randn(R, C), torch.randn(16)
            wqkv, other = (torch.randn(16 * 3 * H * D, C) * C**-0.5 for _ in range(2))
            layout = tak.project_layout(C, 16, H, D, x.dtype, x.device)
            cp = max(16, 1 << (C - 1).bit_length())
            assert layout == [0, cp], layout  # the interpreter runs the Triton kernel: row-major blocks
            plain = tak.token_attention_project_pool(x, wqkv, w, 16, H, D)
            prep = tak.prepare_project_weight(wqkv, 16, H, D, layout)
            assert torch.equal(prep, tak._weight_blocks(wqkv, 16, H, D, cp))
            assert torch.equal(tak.token_attention_project_pool(x, wqkv, w, 16, H, D, None, prep, layout), plain)
            prep_other = tak.prepare_project_weight(other, 16, H, D, layout)
            used = tak.token_attention_project_pool(x, wqkv, w, 16, H, D, None, prep_other, layout)
            assert torch.equal(used, tak.token_attention_project_pool(x, other, w, 16, H, D))
            assert not torch.equal(used, plain)
            stale = [1, cp, 1, *range(12)]  # another layout: ignored, wqkv laid out here
            out = tak.token_attention_project_pool(x, wqkv, w, 16, H, D, None, prep_other, stale)
            assert torch.equal(out, plain)
            with pytest.raises(ValueError, match=f"prepared weight of layout \\[0, {cp}\\] must be"):
                tak.token_attention_project_pool(x, wqkv, w, 16, H, D, None, prep_other[:, :2], layout)
        net, other = small_net(0), small_net(1)
        copy = net.autocast_copy(torch.float32)
        blocks = [m for m in copy.modules() if isinstance(m, TokenSelfAttention)]
        assert blocks and all(m.qkv_prepared is not None and m.qkv_prepared_layout[0] == 0 for m in blocks)
        assert all(m.qkv_prepared is None for m in net.modules() if isinstance(m, TokenSelfAttention))
        x, t, c = torch.randn(3, 12), torch.tensor([0, 500, 999]), torch.randn(3, 6)
        with torch.no_grad():
            net.set_attention_impl("triton"), copy.set_attention_impl("triton"), other.set_attention_impl("triton")
            assert torch.equal(copy(x, t, c), net(x, t, c))
            copy.load_state_dict(other.state_dict())
            assert torch.equal(copy(x, t, c), other(x, t, c))
            for m in blocks:  # the test can fail: a stale prepared weight gives another output
                m.qkv_prepared = tak.prepare_project_weight(net.get_submodule(
                    [n for n, b in copy.named_modules() if b is m][0]).to_qkv.weight, m.tokens, m.heads,
                    m.head_dim, list(m.qkv_prepared_layout))
            assert not torch.equal(copy(x, t, c), other(x, t, c))
        # moved or cast, an inference copy prepares again: here the kernel did not project when it was made
        tak.PROJECT_MAX_WIDTH = 0
        late = net.autocast_copy(torch.float32)
        assert all(m.qkv_prepared is None for m in late.modules() if isinstance(m, TokenSelfAttention))
        tak.PROJECT_MAX_WIDTH = 64
        late = late.half()
        attn = [m for m in late.modules() if isinstance(m, TokenSelfAttention)]
        assert all(m.qkv_prepared is not None and m.qkv_prepared.dtype == torch.float16 for m in attn)
        for m in attn:
            assert torch.equal(m.qkv_prepared, tak.prepare_project_weight(m.to_qkv.weight, m.tokens, m.heads,
                                                                         m.head_dim, list(m.qkv_prepared_layout)))
        assert all(m.qkv_prepared is None and not m.keeps_prepared_projection
                   for m in net.half().modules() if isinstance(m, TokenSelfAttention))  # not an inference copy
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_attention_output_kernel_matches_float64_in_the_interpreter() -> None:
    """`attention_output` (x + pooled @ W.T + b in one kernel, then an optional tail) against float64: row counts
    that leave the last row block partly empty, output widths below, at and not a power of two (masked columns),
    several column blocks, input widths that are not a power of two (masked), a row-strided x and tail, no x, a
    tail copied exactly; fp16 inputs within one rounding of the output (the interpreter's bf16 products are wrong;
    the GPU test checks bf16); bad inputs refused with the argument named. Then an fp16-autocast Denoiser through
    the interpreter: its attention blocks end with the kernel (counted) and agree with the Linear + add form to
    fp16 precision; with CAT_OUTPUT the two up MLPs, the first up FiLM block of each level and the last up
    attention block also write the concatenation after them (five tails), with the same result; with gradients
    nothing takes the kernels and every FiLM block returns its own output; the trunk's switch for the tails
    (`Denoiser._cat_in_kernels`) is on only without gradients under fp16/bf16 autocast."""
    script = textwrap.dedent("""
        import pytest
        import torch
        from ofer.models import token_attention_kernel as tak
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        for M, K, N, bn, res, T in [(130, 128, 304, 64, True, 0), (7, 16, 56, 64, True, 0), (1, 32, 16, 16, True, 0),
                                    (64, 64, 10, 64, True, 0), (9, 16, 40, 16, True, 0), (70, 56, 304, 128, False, 304),
                                    (5, 128, 40, 16, True, 24), (3, 200, 8, 64, False, 0), (66, 4, 16, 64, False, 16)]:
            tak.OUTPUT_LAUNCH["block_cols"] = bn
            p, w, b = torch.randn(M, K), torch.randn(N, K) * K**-0.5, torch.randn(N)
            xs = torch.randn(M, N + 3)[:, 1:N + 1] if res else None  # a row-strided residual
            tail = torch.randn(M, T + 5)[:, 2:T + 2] if T else None
            out = tak.attention_output(p, w, b, xs, tail)
            ref = tak.attention_output_reference(p, w, b, xs, tail)
            assert out.dtype == torch.float32 and out.shape == (M, N + T)
            assert float((out.double() - ref).abs().max()) < 1e-5, (M, K, N)
            if T:
                assert torch.equal(out[:, N:], tail)
            half = (lambda v: None if v is None else v.half())
            lo = tak.attention_output(p.half(), w.half(), b, half(xs), half(tail))
            ref = tak.attention_output_reference(p.half(), w.half(), b, half(xs), half(tail))
            assert lo.dtype == torch.float16
            assert bool(((lo.double() - ref).abs() <= ref.abs() * 2**-10 + 1e-6).all()), (M, K, N)
        tak.OUTPUT_LAUNCH["block_cols"] = 64
        p, w, b, x = torch.randn(4, 32), torch.randn(8, 32), torch.randn(8), torch.randn(4, 8)
        with pytest.raises(ValueError, match="pooled must be a contiguous \\(M, K\\) tensor, 1 <= K <= 256"):
            tak.attention_output(torch.randn(4, 300), torch.randn(8, 300), b, x)
        with pytest.raises(ValueError, match="weight must be a contiguous \\(N, 32\\) tensor of pooled's dtype"):
            tak.attention_output(p, w.half(), b, x)
        with pytest.raises(ValueError, match="bias must be a float \\(8,\\) tensor"):
            tak.attention_output(p, w, b[:3], x)
        with pytest.raises(ValueError, match="x must be a \\(4, 8\\) tensor of pooled's dtype"):
            tak.attention_output(p, w, b, x.T.contiguous().T)
        with pytest.raises(ValueError, match="tail must be a \\(4, T\\) tensor of pooled's dtype"):
            tak.attention_output(p, w, b, x, torch.randn(5, 3))
        with pytest.raises(ValueError, match="tail must be a \\(4, T\\) tensor of pooled's dtype"):
            tak.attention_output(p, w, b, None, torch.randn(4, 3).half())
        net = small_net().set_attention_impl("triton")
        x, t, c = torch.randn(5, 12), torch.tensor([0, 10, 500, 900, 999]), torch.randn(5, 6)
        calls, block_tails = [], []
        orig = tak.attention_output
        tak.attention_output = lambda *a: calls.append(len(a) > 4 and a[4] is not None) or orig(*a)
        from ofer.models import resblock_kernel as rk
        orig_out = rk.film_block_out
        rk.film_block_out = lambda *a: block_tails.append(a[-1] is not None) or orig_out(*a)
        assert tak.CAT_OUTPUT  # on by default (measured on a GPU); first the trunk without tails
        tak.CAT_OUTPUT = False
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
            fused = net(x, t, c)
            n_fused = len(calls)
            tak.OUTPUT_KERNEL = False
            plain = net(x, t, c)
            assert n_fused == 6 and len(calls) == 6 and not any(calls), calls  # six attention blocks
            tak.OUTPUT_KERNEL = True
            assert block_tails and not any(block_tails)
            tak.CAT_OUTPUT = True
            calls.clear()
            block_tails.clear()
            cat = net(x, t, c)
            # six attention blocks and two up MLPs; tails: both up MLPs' skips and the last up block's r
            assert calls == [False, False, False, True, False, True, True, False], calls
            # eleven FiLM blocks; the first up block of each level writes the next skip after its output
            assert block_tails == [False] * 6 + [True, False, True, False, False], block_tails
        torch.testing.assert_close(fused.float(), plain.float(), atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(cat.float(), fused.float(), atol=5e-3, rtol=5e-3)
        calls.clear()
        xg = x.clone().requires_grad_()
        widths = []  # with gradients every FiLM block returns its own output (no tail appended): hooks see that
        from ofer.models.unet1d import Denoiser, FiLMResBlock
        hooks = [m.register_forward_hook(lambda m, i, o: widths.append((o.shape[1], m.lin2.out_features)))
                 for m in net.modules() if isinstance(m, FiLMResBlock)]
        with torch.autocast("cpu", dtype=torch.float16):
            net(xg, t, c).float().sum().backward()
        assert calls == [] and xg.grad is not None and bool(xg.grad.abs().sum() > 0)
        assert len(widths) == 11 and all(a == b for a, b in widths), widths
        for h in hooks:
            h.remove()
        # the trunk hands concatenations to the kernels only when sampling under low-precision autocast
        with torch.no_grad():
            with torch.autocast("cpu", dtype=torch.float16):
                assert Denoiser._cat_in_kernels(x)
                tak.CAT_OUTPUT = False
                assert not Denoiser._cat_in_kernels(x)
                tak.CAT_OUTPUT = True
            assert not Denoiser._cat_in_kernels(x)  # float32
        with torch.autocast("cpu", dtype=torch.float16):
            assert not Denoiser._cat_in_kernels(x)  # gradients on
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
@pytest.mark.parametrize("n,k,residual,tail", [(304, 128, True, 0), (56, 128, True, 0), (16, 128, True, 0),
                                                (304, 128, True, 304), (304, 56, False, 304), (56, 16, False, 56)])
def test_attention_output_kernel_compiles_for_sm90_with_the_installed_triton(n: int, k: int, residual: bool,
                                                                             tail: int) -> None:
    """`_attention_output_kernel` compiled ahead of time (no GPU needed) for sm_90 in bf16 with the launch that
    `attention_output` picks for n output columns from k input columns, with or without the residual and a tail
    (the attention blocks; the up MLPs' output Linear with its skip): it builds, multiplies with Hopper's wgmma and
    keeps no arrays in local memory, plain and as a launch with aligned pointers and strides (`tests/_triton_aot.py`),
    which fits an H100's shared memory. Catches a Triton API change before a user's GPU does."""
    from ofer.models import token_attention_kernel as tak
    from tests._triton_aot import compile_sm90

    bn = tak._output_block_cols(n)
    consts = {"K": k, "KP": tak._padded_width(k), "BM": tak.OUTPUT_LAUNCH["block_rows"], "BN": bn,
              "N_PROG": -(-n // bn), "T_PROG": -(-tail // bn), "HAS_X": residual}
    sig = {"p_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "x_ptr": "*bf16", "t_ptr": "*bf16",
           "out_ptr": "*bf16", "M": "i32", "N": "i32", "T": "i32", "stride_x": "i32", "stride_t": "i32",
           **{c: "constexpr" for c in consts}}
    for kernel in compile_sm90(tak._attention_output_kernel, sig, consts, tak.OUTPUT_LAUNCH["num_warps"]):
        ptx = kernel.asm["ptx"]
        assert "wgmma" in ptx  # 64 rows per warp group: Hopper's asynchronous MMA
        assert "st.local" not in ptx and "ld.local" not in ptx


def test_project_layout_follows_the_kernel_settings() -> None:
    """The layout key of a prepared to_qkv weight: the Gluon kernel's fragments (with the permutation of its launch)
    for bf16 on CUDA, row-major blocks for float32, the Triton kernel, or without fragments. No GPU needed: the
    layout is a function of static properties."""
    from ofer.models import token_attention_kernel as tak

    cuda = torch.device("cuda")
    saved = (tak.PROJECT_KERNEL, tak.PROJECT_WEIGHT_FRAGMENTS)
    try:
        assert tak.project_layout(56, 16, 4, 32, torch.float32, cuda) == [0, 64]
        assert tak.project_layout(16, 16, 4, 32, torch.bfloat16, torch.device("cpu")) == [0, 16]
        if tak.gluon is not None and not tak._INTERPRET:
            launch = tak.PROJECT_GLUON_LAUNCH[64]
            perm = tak._fragment_perm(64, 512 // launch["chunks"], launch["num_warps"])
            layout = tak.project_layout(56, 16, 4, 32, torch.bfloat16, cuda)
            assert layout == [1, 64, launch["chunks"], *perm]
            wqkv = torch.randn(6144, 56).bfloat16()
            assert torch.equal(tak.prepare_project_weight(wqkv, 16, 4, 32, layout),
                               tak._weight_fragments(wqkv, 16, 4, 32, 64, launch["chunks"], perm))
            tak.PROJECT_WEIGHT_FRAGMENTS = False
            assert tak.project_layout(56, 16, 4, 32, torch.bfloat16, cuda) == [0, 64]
            tak.PROJECT_WEIGHT_FRAGMENTS, tak.PROJECT_KERNEL = True, "triton"
            assert tak.project_layout(56, 16, 4, 32, torch.bfloat16, cuda) == [0, 64]
    finally:
        tak.PROJECT_KERNEL, tak.PROJECT_WEIGHT_FRAGMENTS = saved


def test_projecting_kernel_needs_a_backend_and_routes_by_width() -> None:
    from ofer.models import token_attention_kernel as tak

    if not tak.available(torch.zeros(1), 32):  # bad shapes are tested in the interpreter test
        with pytest.raises(RuntimeError, match="token_attention_project_pool needs Triton"):
            tak.token_attention_project_pool(torch.zeros(2, 8), torch.zeros(16 * 3 * 4 * 32, 8), torch.zeros(16),
                                             16, 4, 32)
    saved, saved_training = tak.PROJECT_MAX_WIDTH, tak.PROJECT_TRAINING_MAX_WIDTH
    try:  # a PROJECT_MAX_WIDTH above the kernel's widest launch neither routes nor admits wider inputs
        assert tak.projects(64) and not tak.projects(65) and not tak.projects(0)
        tak.PROJECT_MAX_WIDTH = 256
        assert tak.projects(64) and not tak.projects(65)
        tak.PROJECT_MAX_WIDTH = 32
        assert tak.projects(32) and not tak.projects(33)
        tak.PROJECT_MAX_WIDTH = 0
        assert not tak.projects(1)
        tak.PROJECT_MAX_WIDTH = 64  # with gradients (training) only up to PROJECT_TRAINING_MAX_WIDTH, 32 by default
        bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
        assert saved_training == 32 and tak.projects(32, bf16) and not tak.projects(33, bf16)
        assert tak.projects(32, fp16) and not tak.projects(1, fp32)  # float32 training: never
        tak.PROJECT_TRAINING_MAX_WIDTH = 0
        assert not tak.projects(1, bf16) and tak.projects(1)
        tak.PROJECT_TRAINING_MAX_WIDTH = 16
        assert tak.projects(16, bf16) and not tak.projects(17, bf16) and tak.projects(17)
        tak.PROJECT_TRAINING_MAX_WIDTH = 256
        assert tak.projects(64, bf16) and not tak.projects(65, bf16) and not tak.projects(64, fp32)
    finally:
        tak.PROJECT_MAX_WIDTH, tak.PROJECT_TRAINING_MAX_WIDTH = saved, saved_training


def test_set_project_launch_parses_and_rejects_bad_specs() -> None:
    from ofer.models import token_attention_kernel as tak

    saved = dict(tak.PROJECT_LAUNCH)
    try:
        assert tak.set_project_launch("64x8")[32] == {"block_rows": 64, "num_warps": 8}
        assert tak.set_project_launch("16x2", widths=(16,)) == {16: {"block_rows": 16, "num_warps": 2},
                                                                32: {"block_rows": 64, "num_warps": 8},
                                                                64: {"block_rows": 64, "num_warps": 8}}
        for bad in ("8x4", "24x4", "32", "32x0", "ax4", "16x4x1"):
            with pytest.raises(ValueError, match="rows x warps"):
                tak.set_project_launch(bad)
        assert tak.PROJECT_LAUNCH[64] == {"block_rows": 64, "num_warps": 8}
        saved_gluon = {k: dict(v) for k, v in tak.PROJECT_GLUON_LAUNCH.items()}
        try:
            assert tak.set_project_launch("16x8", kernel="gluon")[32] == {"block_rows": 16, "num_warps": 8,
                                                                           "chunks": 1, "maxnreg": 0}
            assert tak.set_project_launch("32x4x2x168", widths=(64,), kernel="gluon")[64] == {
                "block_rows": 32, "num_warps": 4, "chunks": 2, "maxnreg": 168}
            assert tak.PROJECT_GLUON_LAUNCH[16]["block_rows"] == 16
            assert tak.set_project_launch("32x4x2", widths=(32,), kernel="gluon")[32] == {
                "block_rows": 32, "num_warps": 4, "chunks": 2, "maxnreg": 0}  # no register cap unless given
            assert tak.PROJECT_LAUNCH[64] == {"block_rows": 64, "num_warps": 8}  # the Triton table untouched
            for bad in ("32x4x4", "32x4x0", "32x4x2x", "8x4x1"):
                with pytest.raises(ValueError, match="rows x warps"):
                    tak.set_project_launch(bad, kernel="gluon")
            with pytest.raises(ValueError, match="rows x warps"):
                tak.set_project_launch("32x4x2")  # chunks are the Gluon kernel's only
            with pytest.raises(ValueError, match="'triton' or 'gluon'"):
                tak.set_project_launch("16x4", kernel="cuda")
        finally:
            tak.PROJECT_GLUON_LAUNCH.update(saved_gluon)
    finally:
        tak.PROJECT_LAUNCH.clear()
        tak.PROJECT_LAUNCH.update(saved)


@pytest.mark.parametrize("c, cp, chunks, warps", [(16, 16, 1, 4), (24, 32, 1, 4), (56, 64, 2, 4), (10, 16, 1, 8),
                                                   (64, 64, 1, 8), (32, 32, 2, 2)])
def test_weight_fragments_invert_the_kernels_permutation(c: int, cp: int, chunks: int, warps: int) -> None:
    """`_weight_fragments` stores each (cp, cn) block of the to_qkv weight so that the Gluon kernel's reshape /
    permute / reshape of the flat fragment (done here in torch, the same index operations) gives the block back,
    for every head, q/k/v and column chunk: block (h, j, ci)[k, n] is the weight of input channel k (zero for
    k >= c) and output token * head_dim + channel = ci * cn + n, indexed here entry by entry from the to_qkv
    layout (token, q/k/v, head, channel); the same blocks as `_weight_blocks`. A block of a width that is not a
    power of two is refused."""
    from ofer.models import token_attention_kernel as tak

    T, H, DH = 16, 4, 32
    cn = T * DH // chunks
    perm = tak._fragment_perm(cp, cn, warps)
    assert sorted(perm) == list(range(len(perm))) and (1 << len(perm)) == cp * cn
    wqkv = torch.randn(T * 3 * H * DH, c)
    frags = tak._weight_fragments(wqkv, T, H, DH, cp, chunks, perm)
    assert frags.shape == (H, 3, chunks, cp * cn) and frags.is_contiguous()
    blocks = tak._weight_blocks(wqkv, T, H, DH, cp).reshape(H, 3, cp, T * DH)
    t, d = torch.arange(T * DH) // DH, torch.arange(T * DH) % DH
    for h in range(H):
        for j in range(3):
            expect = torch.zeros(cp, T * DH)
            expect[:c] = wqkv[((t * 3 + j) * H + h) * DH + d].T
            assert torch.equal(blocks[h, j], expect), (h, j)
            for ci in range(chunks):
                block = frags[h, j, ci].reshape([2] * len(perm)).permute(perm).reshape(cp, cn)
                assert torch.equal(block, expect[:, ci * cn:(ci + 1) * cn]), (h, j, ci)
    assert not torch.equal(frags[0, 0, 0], blocks[0, 0, :, :cn].reshape(-1))  # a real permutation
    with pytest.raises(ValueError, match="is not a B operand"):
        tak._fragment_perm(24, 512, 4)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
@pytest.mark.parametrize("kernel", ["pool", "pool_backward", "pool_H200", "pool_backward_H200", "project_16",
                                    "project_32", "project_64"])
def test_attention_kernels_compile_for_sm90_with_the_installed_triton(kernel: str) -> None:
    """The attention kernels after a separate projection (`token_attention_pool` and its backward, bf16 q/k/v, with
    `LAUNCH` / `BACKWARD_LAUNCH` and with the H200's `CARD_LAUNCHES` at 65,536 rows) and the Triton projecting kernel
    (`PROJECT_LAUNCH`, float32 inputs and the CPU interpreter's path) compiled ahead of time for sm_90, plain and as
    a launch with aligned pointers and integers (`tests/_triton_aot.py`): they build, keep no arrays in local memory
    and fit an H100's shared memory (the pool kernels pipeline their row blocks, `STAGES`; an H200 has the same
    228 KB per SM). Catches a Triton change or a launch setting that would break them before a GPU run does."""
    from ofer.models import token_attention_kernel as tak
    from tests._triton_aot import compile_sm90

    shape = {"T": 16, "H": 4, "DH": 32}
    if kernel.startswith("pool"):
        backward = kernel.startswith("pool_backward")
        launch = tak.BACKWARD_LAUNCH if backward else tak.LAUNCH
        if kernel.endswith("H200"):
            launch = tak.CARD_LAUNCHES["H200"]["backward" if backward else "forward"]
        _, meta = tak._launch_meta(launch, 65_536)
        warps = meta.pop("num_warps")
        fn = tak._token_attention_pool_bwd_kernel if backward else tak._token_attention_pool_kernel
        sig = {"qkv_ptr": "*bf16", "w_ptr": "*fp32",
               **({"g_ptr": "*bf16", "dqkv_ptr": "*bf16", "dw_ptr": "*fp32"} if backward else {"out_ptr": "*bf16"}),
               "R": "i32", "stride_row": "i32", "scale": "fp32", "n_prog_r": "i32"}
        consts = {**shape, **meta}
    else:
        cp = int(kernel.split("_")[1])
        launch = tak.PROJECT_LAUNCH[cp]
        warps, fn = launch["num_warps"], tak._project_pool_kernel
        sig = {"x_ptr": "*fp32", "wp_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": "*fp32", "R": "i32", "scale": "fp32"}
        consts = {**shape, "C": cp, "CP": cp, "BLOCK_R": launch["block_rows"]}
    sig.update({c: "constexpr" for c in consts})
    for compiled in compile_sm90(fn, sig, consts, warps):
        ptx = compiled.asm["ptx"]
        assert "st.local" not in ptx and "ld.local" not in ptx, kernel


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
@pytest.mark.parametrize("cp", [16, 32, 64])
def test_projecting_backward_compiles_for_sm90_with_the_installed_triton(cp: int) -> None:
    """`_project_pool_bwd_kernel` compiled ahead of time (no GPU needed) for sm_90 in bf16 with its launch, plain
    and as a launch with aligned pointers and a row count divisible by 16 (`tests/_triton_aot.py`; a compile without
    that once hid a form that asked for 434 KB of shared memory, commit 3712be2): it builds, multiplies with
    mma.sync, keeps no arrays in local memory, fits an H100's shared memory, and Triton's own ptxas allocates it
    without spilling. Catches a Triton change that would slow or break this kernel before a GPU run does."""
    import subprocess

    import triton

    from ofer.models import token_attention_kernel as tak
    from tests._triton_aot import compile_sm90

    launch = tak.PROJECT_BACKWARD_LAUNCH[cp]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    consts = {"T": 16, "H": 4, "DH": 32, "C": cp, "CP": cp, "BLOCK_R": launch["block_rows"]}
    sig = {"x_ptr": "*bf16", "wp_ptr": "*bf16", "w_ptr": "*fp32", "g_ptr": "*bf16", "dqkv_ptr": "*bf16",
           "dw_ptr": "*fp32", "R": "i32", "scale": "fp32", **{c: "constexpr" for c in consts}}
    for kernel in compile_sm90(tak._project_pool_bwd_kernel, sig, consts, launch["num_warps"]):
        ptx = kernel.asm["ptx"]
        assert "mma.sync" in ptx
        assert "st.local" not in ptx and "ld.local" not in ptx
        if not ptxas.is_file():
            continue
        src = Path(tempfile.mkdtemp()) / "bwd.ptx"
        src.write_text(ptx)
        info = subprocess.run([str(ptxas), "-v", "--gpu-name", "sm_90a", str(src), "-o", os.devnull],
                              capture_output=True, text=True, check=True).stderr
        assert "0 bytes spill stores, 0 bytes spill loads" in info, (cp, info)


@pytest.mark.parametrize("arch, cp, launch", [(90, 16, "32x4"), (90, 64, "32x4x2x168"), (80, 32, "32x4")])
def test_gluon_kernel_compiles_with_the_installed_triton(arch: int, cp: int, launch: str) -> None:
    """The Gluon projecting kernel compiled ahead of time (no GPU needed) for sm_90 / sm_80 with the installed
    Triton (the GPU tests run another Triton version): it builds, reads the staged q/k with ldmatrix, multiplies
    with mma.sync and keeps no arrays in local memory, plain and as a launch with aligned pointers and row count
    (`tests/_triton_aot.py`), which fits the card's shared memory; with weight fragments (the default) fewer
    shared-memory stores and ldmatrix loads than with the weights converted through shared memory (the fragments'
    conversion to the operand layout stays in registers). Catches a Gluon API change before a user's GPU does."""
    from ofer.models import token_attention_kernel as tak

    if tak.gluon is None:
        pytest.skip("Gluon not available in this Triton")
    from tests._triton_aot import compile_sm90

    saved = ({k: dict(v) for k, v in tak.PROJECT_GLUON_LAUNCH.items()}, tak.PROJECT_WEIGHT_FRAGMENTS)
    ptx = {}
    try:
        tak.set_project_launch(launch, widths=(cp,), kernel="gluon")
        for frag in (True, False):
            tak.PROJECT_WEIGHT_FRAGMENTS = frag
            # what token_attention_project_pool launches with, for an input read in place (56 of 64 channels) or not
            consts, opts = tak._gluon_launch_args(56 if cp == 64 else cp, cp, 16, 4, 32)
            sig = {"x_ptr": "*bf16", "wp_ptr": "*bf16", "w_ptr": "*fp32", "out_ptr": "*fp32", "R": "i32",
                   "scale": "fp32"}
            sig.update({k: "constexpr" for k in consts})
            ptx[frag] = [kernel.asm["ptx"] for kernel in compile_sm90(
                tak._project_pool_gluon_kernel, sig, consts, opts["num_warps"], arch=arch,
                options={k: v for k, v in opts.items() if k != "num_warps"})]
    finally:
        tak.PROJECT_GLUON_LAUNCH.update(saved[0])
        tak.PROJECT_WEIGHT_FRAGMENTS = saved[1]
    for code in ptx[True] + ptx[False]:
        assert "ldmatrix" in code and "mma.sync" in code
        assert "st.local" not in code and "ld.local" not in code
    for op in ("st.shared", "ldmatrix"):  # the specialized forms, as a real launch runs
        assert ptx[True][1].count(op) < ptx[False][1].count(op), op


@pytest.mark.parametrize("block_rows", [8, 16, 32, 64])
def test_gluon_staging_layout_is_a_bijection_without_bank_conflicts(block_rows: int) -> None:
    """The Gluon kernel's shared-memory layout of its (rows, 16, 32) 2-byte q/k tiles, checked from the listed
    bases alone: every (row, token, channel) gets exactly one offset, channels 0-7 of a chunk are contiguous, and
    the two access patterns hit 8 different 16-byte bank groups (offset // 8 mod 8): the 8 tokens of one row
    (ldmatrix of the score product) and the 8 rows of one token (stmatrix of the projection). A layout with
    rows or tokens plain (no XOR), as Triton's own choice was, fails the second or third check."""
    from ofer.models import token_attention_kernel as tak

    bases = tak._staging_bases(block_rows)
    assert len(bases) == (block_rows * 16 * 32).bit_length() - 1
    coord_of = {}
    for off in range(block_rows * 16 * 32):
        c = [0, 0, 0]
        for bit, b in enumerate(bases):
            if off >> bit & 1:
                c = [ci ^ bi for ci, bi in zip(c, b)]
        coord_of[off] = tuple(c)
    offset_of = {c: off for off, c in coord_of.items()}
    assert len(offset_of) == block_rows * 16 * 32  # a bijection onto the index set
    assert all(0 <= r < block_rows and 0 <= t < 16 and 0 <= d < 32 for r, t, d in offset_of)
    for (r, t, d), off in offset_of.items():
        if d % 8:
            assert off == offset_of[(r, t, d - d % 8)] + d % 8  # 16-byte chunks stay contiguous
    for r in range(block_rows):
        for d in range(0, 32, 8):
            for t0 in (0, 8):
                assert len({offset_of[(r, t0 + t, d)] // 8 % 8 for t in range(8)}) == 8, (r, d, t0)
    for t in range(16):
        for d in range(0, 32, 8):
            for r0 in range(0, block_rows, 8):
                assert len({offset_of[(r0 + r, t, d)] // 8 % 8 for r in range(8)}) == 8, (t, d, r0)
    with pytest.raises(ValueError, match="power of two >= 8"):
        tak._staging_bases(12)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_kernel_matches_reference_in_the_interpreter() -> None:
    """The kernel against an independent per-token float64 formula (odd row counts exercise the row mask, three
    attention shapes the stacking of 4, 8 and 2 rows per tile), and a whole Denoiser against PyTorch's SDPA."""
    script = textwrap.dedent("""
        import torch
        from ofer.models import token_attention_kernel as tak
        from ofer.models.token_attention_kernel import token_attention_pool, token_attention_pool_reference
        from ofer.models.unet1d import Denoiser
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        default = dict(tak.LAUNCH)
        # the default launch, one program per tile, and others (3 row blocks per program, the last ones past the
        # end; 1 or 2 rows per tile)
        for launch in (default, {"block_rows": 8, "tiles": 1, "stages": 1, "num_warps": 4},
                       {"block_rows": 1, "tiles": 3, "stages": 2, "num_warps": 2, "order": "row"},
                       {"block_rows": 2, "tiles": 2, "stages": 3, "num_warps": 1},
                       {"block_rows": 4, "tiles": 1, "stages": 1, "num_warps": 4, "order": "row"}):
            tak.LAUNCH.update(default)
            tak.LAUNCH.update(launch)
            for R, T, H, D in [(1, 16, 4, 32), (7, 16, 4, 32), (5, 16, 2, 16), (3, 32, 2, 16), (13, 16, 4, 32), (40, 16, 4, 32)]:
                qkv = torch.randn(R, T * 3 * H * D) * 2
                w = torch.randn(T)
                out = token_attention_pool(qkv, w, T, H, D)
                ref = token_attention_pool_reference(qkv, w, T, H, D)
                assert out.dtype == torch.float32 and out.shape == (R, H * D)
                err = float((out.double() - ref).abs().max())
                assert err < 5e-5, (launch, R, T, H, D, err)  # float32 scores and softmax
                # bf16 output: the float32 one rounded (toward zero in the interpreter, to nearest on the GPU)
                lo = token_attention_pool(qkv, w, T, H, D, torch.bfloat16)
                assert lo.dtype == torch.bfloat16 and bool(((lo.float() - out).abs() <= out.abs() * 2**-7).all())
        tak.LAUNCH.update(default)
        import pytest
        with pytest.raises(ValueError, match="tokens >= 16"):  # tl.dot needs 16 x 16 score tiles
            token_attention_pool(torch.zeros(2, 8 * 3 * 2 * 16), torch.zeros(8), 8, 2, 16)
        net8 = Denoiser(dim=12, cond_dim=6, widths=(12, 8), time_dim=16, attn_tokens=8, attn_head_dim=16)
        assert not any(m._kernel_shape for m in net8.modules() if hasattr(m, "_kernel_shape"))  # "auto": PyTorch
        tak.PROJECT_MAX_WIDTH = 0  # every block through the separate projection and this kernel (the projecting
        net = small_net()          # kernel's own test covers the default routing of this network)
        x, t, c = torch.randn(3, 12), torch.tensor([0, 500, 999]), torch.randn(3, 6)
        with torch.no_grad():
            ref = net.set_attention_impl("sdpa")(x, t, c)
            out = net.set_attention_impl("triton")(x, t, c)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        print("ok")
    """)
    run_interpreted(script)


def test_pytorch_fallback_of_the_op_matches_reference() -> None:
    """The ops' PyTorch paths (GPUs without bf16 tensor cores), forward and backward, against the float64
    per-token formula and its autograd."""
    from ofer.models.token_attention_kernel import _grads_torch, _pooled_torch, token_attention_pool_reference

    torch.manual_seed(1)
    for R, T, H, D in [(1, 16, 4, 32), (6, 8, 2, 16)]:
        qkv, w = torch.randn(R, T * 3 * H * D) * 2, torch.randn(T)
        out = _pooled_torch(qkv, w, T, H, D)
        assert out.dtype == torch.float32 and out.shape == (R, H * D)
        torch.testing.assert_close(out.double(), token_attention_pool_reference(qkv, w, T, H, D), atol=1e-5, rtol=1e-5)
        g = torch.randn(R, H * D)
        dqkv, dw = _grads_torch(qkv, w, g, T, H, D)
        q64, w64 = qkv.double().requires_grad_(), w.double().requires_grad_()
        rq, rw = torch.autograd.grad(token_attention_pool_reference(q64, w64, T, H, D), (q64, w64), g.double())
        assert dqkv.dtype == torch.float32 and dw.dtype == torch.float32
        torch.testing.assert_close(dqkv.double(), rq, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dw.double(), rw, atol=1e-5, rtol=1e-4)


def test_triton_attention_needs_a_backend() -> None:
    net = small_net().set_attention_impl("triton")
    x, t, c = torch.randn(2, 12), torch.tensor([1, 2]), torch.randn(2, 6)
    if os.environ.get("TRITON_INTERPRET") != "1":
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="needs Triton .* a CUDA tensor"):
                net(x, t, c)  # a CPU tensor without the interpreter
    # "auto" on the CPU: the PyTorch forms, with and without autograd
    net.set_attention_impl("auto")
    with torch.no_grad():
        ref = net.set_attention_impl("math")(x, t, c)
        torch.testing.assert_close(net.set_attention_impl("auto")(x, t, c), ref)
    net(x, t, c).sum().backward()


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_kernel_backward_matches_float64_autograd_in_the_interpreter() -> None:
    """The backward kernel (gradients w.r.t. q/k/v and the token-mix weights) against autograd through the
    independent float64 per-token formula, with partial row blocks and three launches; the op's autograd and
    fake-tensor registrations through torch.library.opcheck; and the gradients of every parameter of a small
    Denoiser trained with "triton" against "math". Checked to fail with the softmax-backward term r_t dropped
    and with dv taken from the unmixed attention weights."""
    script = textwrap.dedent("""
        import torch
        from ofer.models import token_attention_kernel as tak
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        default = dict(tak.BACKWARD_LAUNCH)
        for spec in ("default", "1x3x2x2:row", "4x1x1x4", "2x3x2x2"):
            if spec != "default":
                tak.set_launch(spec, backward=True)
            launch = dict(tak.BACKWARD_LAUNCH)
            for R, T, H, D in [(1, 16, 4, 32), (7, 16, 4, 32), (5, 16, 2, 16), (3, 32, 1, 16), (13, 16, 4, 32)]:
                qkv = (torch.randn(R, T * 3 * H * D) * 2).requires_grad_()
                w = torch.randn(T).requires_grad_()
                g = torch.randn(R, H * D)
                dqkv, dw = torch.autograd.grad(tak.token_attention_pool(qkv, w, T, H, D), (qkv, w), g)
                q64, w64 = qkv.detach().double().requires_grad_(), w.detach().double().requires_grad_()
                rq, rw = torch.autograd.grad(tak.token_attention_pool_reference(q64, w64, T, H, D), (q64, w64),
                                             g.double())
                assert dqkv.dtype == torch.float32 and dw.dtype == torch.float32
                eq = float((dqkv.double() - rq).abs().max() / rq.abs().max())
                ew = float((dw.double() - rw).abs().max() / rw.abs().max())
                assert eq < 1e-5 and ew < 1e-5, (launch, R, T, H, D, eq, ew)
        tak.BACKWARD_LAUNCH.update(default)
        # a bf16 gradient (as autocast training passes it) is read in place: the float32 copy's exact results
        qkv, w, g = torch.randn(7, 6144), torch.randn(16), torch.randn(7, 128).bfloat16()
        for a, b in zip(tak.token_attention_pool_backward(qkv, w, g, 16, 4, 32),
                        tak.token_attention_pool_backward(qkv, w, g.float(), 16, 4, 32)):
            assert torch.equal(a, b)
        # rows of a wider tensor (row stride 6,200): the gradient lands in the right columns
        wide = torch.randn(9, 6200, requires_grad=True)
        w = torch.randn(16, requires_grad=True)
        g = torch.randn(9, 128)
        (dwide,) = torch.autograd.grad(tak.token_attention_pool(wide[:, 56:], w, 16, 4, 32), (wide,), g)
        q64 = wide.detach()[:, 56:].double().requires_grad_()
        (rq,) = torch.autograd.grad(tak.token_attention_pool_reference(q64, w.detach(), 16, 4, 32), (q64,), g.double())
        assert float(dwide[:, :56].abs().max()) == 0
        assert float((dwide[:, 56:].double() - rq).abs().max() / rq.abs().max()) < 1e-5
        qkv, w = torch.randn(3, 6144, requires_grad=True), torch.randn(16, requires_grad=True)
        torch.library.opcheck(tak.token_attention_pool, (qkv, w, 16, 4, 32),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        grads = {}
        tak.PROJECT_MAX_WIDTH = 0  # every block through to_qkv and this kernel (the projecting one: its own test)
        for impl in ("math", "triton"):
            net = small_net().train()
            torch.manual_seed(1)
            x, t, c = torch.randn(6, 12), torch.tensor([0, 10, 300, 500, 900, 999]), torch.randn(6, 6)
            net.set_attention_impl(impl)(x, t, c).square().sum().backward()
            grads[impl] = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
        assert grads["math"].keys() == grads["triton"].keys() and len(grads["math"]) > 50
        for n, ref in grads["math"].items():
            torch.testing.assert_close(grads["triton"][n], ref, atol=1e-5, rtol=1e-4, msg=n)
        assert any(("to_qkv" in n or "token_mix" in n) and ref.abs().max() > 1e-4 for n, ref in grads["math"].items())
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_projecting_kernel_backward_matches_float64_autograd_in_the_interpreter() -> None:
    """The projecting kernel's backward (q/k/v recomputed from x; gradients w.r.t. x, the to_qkv weight and the
    token-mix weights) against autograd through the float64 formula on x @ wqkv.T, at padded widths 16/32/64, partial
    row blocks, two launches, 1-4 heads and 16 or 32 tokens; opcheck of the op's registrations; and that the
    Denoiser routes narrow blocks to it in training only up to PROJECT_TRAINING_MAX_WIDTH, with the gradients of
    the separate projection. Checked to fail with the softmax-backward term r_t dropped and with dk from the
    untransposed ds."""
    script = textwrap.dedent("""
        import torch
        from ofer.models import token_attention_kernel as tak
        from tests.test_token_attention_kernel import small_net
        torch.manual_seed(0)
        for launch in ("default", "32x4"):
            if launch != "default":
                for cp in tak.PROJECT_BACKWARD_LAUNCH:
                    tak.PROJECT_BACKWARD_LAUNCH[cp] = {"block_rows": 32, "num_warps": 4}
            for R, C, T, H, D in [(1, 10, 16, 4, 32), (21, 53, 16, 4, 32), (5, 3, 16, 2, 16), (40, 64, 16, 4, 32),
                                  (17, 25, 32, 1, 16)]:
                x = torch.randn(R, C).requires_grad_()
                wq = (torch.randn(T * 3 * H * D, C) * C**-0.5).requires_grad_()
                w = torch.randn(T).requires_grad_()
                g = torch.randn(R, H * D)
                dx, dwq, dw = torch.autograd.grad(tak.token_attention_project_pool(x, wq, w, T, H, D), (x, wq, w), g)
                x64, wq64, w64 = (v.detach().double().requires_grad_() for v in (x, wq, w))
                ref = tak.token_attention_pool_reference(x64 @ wq64.T, w64, T, H, D)
                for got, want in zip((dx, dwq, dw), torch.autograd.grad(ref, (x64, wq64, w64), g.double())):
                    assert got.dtype == torch.float32 and got.shape == want.shape
                    err = float((got.double() - want).abs().max() / want.abs().max())
                    assert err < 1e-5, (launch, R, C, T, H, D, err)
        x, wq, w, g = torch.randn(5, 20), torch.randn(6144, 20) * 0.2, torch.randn(16), torch.randn(5, 128).bfloat16()
        for a, b in zip(tak.token_attention_project_pool_backward(x, wq, w, g, 16, 4, 32),
                        tak.token_attention_project_pool_backward(x, wq, w, g.float(), 16, 4, 32)):
            assert torch.equal(a, b)  # a bf16 gradient is read in place, with the float32 copy's exact results
        x, wq, w = torch.randn(3, 20, requires_grad=True), torch.randn(6144, 20, requires_grad=True), torch.randn(16)
        torch.library.opcheck(tak.token_attention_project_pool, (x, wq, w.requires_grad_(), 16, 4, 32),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        calls = []  # routing: with PROJECT_TRAINING_MAX_WIDTH 0 the projecting kernel only without autograd
        tak.PROJECT_TRAINING_MAX_WIDTH = 0
        for name in ("token_attention_pool", "token_attention_project_pool"):
            op = getattr(tak, name)
            setattr(tak, name, lambda *a, _op=op, _n=name: calls.append(_n) or _op(*a))
        net = small_net().train().set_attention_impl("triton")
        x, t, c = torch.randn(6, 12), torch.tensor([0, 10, 300, 500, 900, 999]), torch.randn(6, 6)
        net(x, t, c).square().sum().backward()
        assert calls == ["token_attention_pool"] * 6, calls
        calls.clear()
        with torch.no_grad():
            net(x, t, c)
        assert calls == ["token_attention_project_pool"] * 6, calls
        # PROJECT_TRAINING_MAX_WIDTH routes training inputs up to that width to it too, under fp16/bf16 autocast
        # only, with gradients no further from the float32 ones than those of the separate projection
        ref = torch.cat([p.grad.flatten() for p in net.parameters()])  # float32, separate projection

        def grads(fp16):
            net.zero_grad(set_to_none=True)
            calls.clear()
            with torch.autocast("cpu", dtype=torch.float16, enabled=fp16):
                net(x, t, c).float().square().sum().backward()
            return torch.cat([p.grad.flatten() for p in net.parameters()])

        separate16 = grads(True)
        assert calls == ["token_attention_pool"] * 6, calls
        tak.PROJECT_TRAINING_MAX_WIDTH = 64
        assert (grads(False) - ref).abs().max() == 0 and calls == ["token_attention_pool"] * 6, calls  # float32
        projected16 = grads(True)
        assert calls == ["token_attention_project_pool"] * 6, calls
        err_sep, err_proj = float((separate16 - ref).norm()), float((projected16 - ref).norm())
        assert 0 < err_proj <= 1.5 * err_sep and err_proj < 1e-2 * float(ref.norm()), (err_proj, err_sep)
        print("ok")
    """)
    run_interpreted(script)


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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_projecting_kernel_on_cuda_matches_reference_and_the_separate_projection() -> None:
    """On CUDA, fp32 and bf16: the projecting kernel against the float64 formula, and a paper-sized IdGen (widths
    300, 50, 10: both paths) with the kernels against SDPA."""
    from ofer.models import token_attention_kernel as tak

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(16, device=dev, generator=gen)
    for c in (10, 25, 53, 64, 56, 16):  # 56 and 16: read in place (56 masked to 64)
        x = torch.randn(1000, c, device=dev, generator=gen)
        wqkv = torch.randn(6144, c, device=dev, generator=gen) * c**-0.5
        ref = tak.token_attention_pool_reference(x.double() @ wqkv.double().T, w, 16, 4, 32)
        out = tak.token_attention_project_pool(x, wqkv, w, 16, 4, 32)
        assert float((out.double() - ref).abs().max()) < 1e-4, c
        x16, w16 = x.bfloat16(), wqkv.bfloat16()
        ref16 = tak.token_attention_pool_reference(x16.double() @ w16.double().T, w, 16, 4, 32)
        sep = tak.token_attention_pool(torch.nn.functional.linear(x16, w16), w, 16, 4, 32)
        sep_lo = tak.token_attention_pool(torch.nn.functional.linear(x16, w16), w, 16, 4, 32, torch.bfloat16)
        assert int((sep_lo != sep.bfloat16()).sum()) <= sep.numel() // 1000, c  # rounded once, to nearest
        out16 = tak.token_attention_project_pool(x16, w16, w, 16, 4, 32)
        # bf16 q/k in both; the projecting kernel keeps v in float32, so it is no further from float64
        assert (out16.double() - ref16).norm() <= 1.05 * (sep.double() - ref16).norm() + 1e-6, c
        # the Gluon kernel (the default for bf16 when Gluon is there) and the Triton one: the same roundings,
        # so equal up to float32 summation order, for any row count (1000, 37: partial row blocks) and launch
        saved = (tak.PROJECT_KERNEL, {k: dict(v) for k, v in tak.PROJECT_GLUON_LAUNCH.items()},
                 tak.PROJECT_WEIGHT_FRAGMENTS)
        try:
            tak.PROJECT_KERNEL = "triton"
            tri16 = tak.token_attention_project_pool(x16, w16, w, 16, 4, 32)
            tri16_37 = tak.token_attention_project_pool(x16[:37], w16, w, 16, 4, 32)
            tak.PROJECT_KERNEL = "gluon"
            assert tak._gluon_projects(x16, 16, 32) == (tak.gluon is not None)
            for launch, frag in itertools.product(("32x4", "16x4", "64x8", "32x4x2", "32x4x2x168"), (True, False)):
                tak.set_project_launch(launch, kernel="gluon")
                tak.PROJECT_WEIGHT_FRAGMENTS = frag  # weights as register-order fragments, or through shared memory
                torch.testing.assert_close(tak.token_attention_project_pool(x16, w16, w, 16, 4, 32), tri16,
                                           atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(tak.token_attention_project_pool(x16[:37], w16, w, 16, 4, 32),
                                           tri16_37, atol=2e-5, rtol=1e-5)
            # a bf16 output is the float32 one rounded once to nearest: the kernel compiled for a bf16 output may
            # sum in another order, so a value at a rounding boundary may land one bf16 step away (1 in 128,000
            # on an H100), where rounding toward zero would move about half of them
            lo = tak.token_attention_project_pool(x16, w16, w, 16, 4, 32, torch.bfloat16)
            hi = tak.token_attention_project_pool(x16, w16, w, 16, 4, 32)
            assert lo.dtype == torch.bfloat16 and bool(((lo.float() - hi).abs() <= hi.abs() * 2**-7).all())
            assert int((lo != hi.bfloat16()).sum()) <= hi.numel() // 1000, c
            fp16 = tak.token_attention_project_pool(x.half(), wqkv.half(), w, 16, 4, 32)
            ref_h = tak.token_attention_pool_reference(x.half().double() @ wqkv.half().double().T, w, 16, 4, 32)
            assert float((fp16.double() - ref_h).abs().max()) < 0.05, c  # fp16 q/k rounding only
        finally:
            tak.PROJECT_KERNEL = saved[0]
            tak.PROJECT_GLUON_LAUNCH.update(saved[1])
            tak.PROJECT_WEIGHT_FRAGMENTS = saved[2]
        assert (out16 - tri16).abs().max() < 1e-4
        # a weight prepared in the kernel's layout (Gluon fragments here) is the one the kernel reads
        layout = tak.project_layout(c, 16, 4, 32, torch.bfloat16, dev)
        assert layout[0] == (1 if tak.gluon is not None else 0)
        prep = tak.prepare_project_weight(w16, 16, 4, 32, layout)
        assert torch.equal(tak.token_attention_project_pool(x16, w16, w, 16, 4, 32, None, prep, layout), out16)
        other = (torch.randn(6144, c, device=dev, generator=gen) * c**-0.5).bfloat16()
        used = tak.token_attention_project_pool(x16, w16, w, 16, 4, 32, None,
                                                tak.prepare_project_weight(other, 16, 4, 32, layout), layout)
        assert torch.equal(used, tak.token_attention_project_pool(x16, other, w, 16, 4, 32)), c
    net, x, t, c = paper_idgen(777, gen)
    net.eval()
    with torch.no_grad():
        ref = net.set_attention_impl("sdpa")(x, t, c)
        out = net.set_attention_impl("triton")(x, t, c)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_output_on_cuda_is_rounded_once() -> None:
    """On CUDA in bf16: `attention_output` is the float64 value x + pooled @ W.T + b rounded once (to nearest, so
    within half a bf16 step up to float32 summation), closer to it than the Linear + add form that rounds twice;
    the paper-sized widths (304, 56, 16 columns) and a row count with a partial row block. Without x and with a
    tail (IdGen's wide up MLP and its skip, CAT_OUTPUT): rounded once, the tail copied exactly."""
    from ofer.models import token_attention_kernel as tak

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    for m, n in ((51_237, 304), (1000, 56), (333, 16)):
        p = torch.randn(m, 128, device=dev, generator=gen).bfloat16()
        w = (torch.randn(n, 128, device=dev, generator=gen) * 128**-0.5).bfloat16()
        b = torch.randn(n, device=dev, generator=gen)
        x = torch.randn(m, n, device=dev, generator=gen).bfloat16()
        out = tak.attention_output(p, w, b, x)
        ref = tak.attention_output_reference(p, w, b, x)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        err = (out.double() - ref).abs()
        assert bool((err <= ref.abs() * 2**-8 * 1.01 + 1e-5).all()), (n, float(err.max()))
        two = x + torch.nn.functional.linear(p, w, b.bfloat16())
        assert err.norm() < (two.double() - ref).norm(), n
    # the up MLP's output Linear (56 input columns, masked to 64; no residual) with its skip as the tail
    p = torch.randn(51_237, 56, device=dev, generator=gen).bfloat16()
    w = (torch.randn(304, 56, device=dev, generator=gen) * 56**-0.5).bfloat16()
    b = torch.randn(304, device=dev, generator=gen).bfloat16()
    skip = torch.randn(51_237, 320, device=dev, generator=gen).bfloat16()[:, 8:312]  # row-strided
    out = tak.attention_output(p, w, b, None, skip)
    ref = tak.attention_output_reference(p, w, b, None, skip)
    assert out.shape == (51_237, 608) and torch.equal(out[:, 304:], skip)
    assert bool(((out.double() - ref).abs() <= ref.abs() * 2**-8 * 1.01 + 1e-5).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_backward_on_cuda_matches_float64_and_trains_like_math() -> None:
    """On CUDA: the backward kernels (after the projection, and the projecting one) in fp32 against float64
    autograd of the per-token formula; a paper-sized IdGen's parameter gradients under bf16 autocast with "triton"
    (the training default on CUDA) no further from the fp32 "math" gradients than bf16 "math" is, eager and
    compiled."""
    from ofer.models import token_attention_kernel as tak

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    qkv = (torch.randn(3001, 6144, device=dev, generator=gen) * 2).requires_grad_()
    w = torch.randn(16, device=dev, generator=gen).requires_grad_()
    g = torch.randn(3001, 128, device=dev, generator=gen)
    dqkv, dw = torch.autograd.grad(tak.token_attention_pool(qkv, w, 16, 4, 32), (qkv, w), g)
    q64, w64 = qkv.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rq, rw = torch.autograd.grad(tak.token_attention_pool_reference(q64, w64, 16, 4, 32), (q64, w64), g.double())
    assert float((dqkv.double() - rq).abs().max() / rq.abs().max()) < 1e-4
    assert float((dw.double() - rw).abs().max() / rw.abs().max()) < 1e-4
    # the projecting kernel's backward (53 channels, padded to 64; 25, padded to 32), fp32
    for c in (53, 25):
        x = torch.randn(3001, c, device=dev, generator=gen).requires_grad_()
        wq = (torch.randn(6144, c, device=dev, generator=gen) * c**-0.5).requires_grad_()
        got = torch.autograd.grad(tak.token_attention_project_pool(x, wq, w, 16, 4, 32), (x, wq, w), g)
        x64, wq64 = x.detach().double().requires_grad_(), wq.detach().double().requires_grad_()
        ref = tak.token_attention_pool_reference(x64 @ wq64.T, w64, 16, 4, 32)
        for a, b in zip(got, torch.autograd.grad(ref, (x64, wq64, w64), g.double())):
            assert float((a.double() - b).abs().max() / b.abs().max()) < 1e-4, c

    net, x, t, c = paper_idgen(2048, gen)

    def grads(impl: str, bf16: bool, compiled: bool = False) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        net.set_attention_impl(impl)
        fn = torch.compile(net) if compiled else net
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            fn(x, t, c).float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    ref = grads("math", False)
    math16 = (grads("math", True) - ref).norm()
    assert math16 > 0
    for compiled in (False, True):
        assert (grads("triton", True, compiled) - ref).norm() <= 1.5 * math16, compiled
    assert (grads("auto", True) - grads("triton", True)).abs().max() == 0  # "auto" trains with the kernel on CUDA


def test_current_launch_takes_the_cards_launch_unless_one_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """`current_launch` gives a CUDA device whose name contains a `CARD_LAUNCHES` key that card's launches, while
    `LAUNCH` / `BACKWARD_LAUNCH` hold their defaults; other cards, the CPU, a changed module launch and a launch
    chosen with `set_launch` (even one equal to the default: the benchmarks' baselines) use the module's. The card
    name is faked: no GPU needed."""
    from ofer.models import token_attention_kernel as tak

    names = {0: "NVIDIA H200", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(tak, "_card_name", lambda index: names[index])
    monkeypatch.setattr(tak, "_SET_LAUNCHES", set())
    monkeypatch.setattr(tak, "LAUNCH", dict(tak._DEFAULT_LAUNCHES["forward"]))
    monkeypatch.setattr(tak, "BACKWARD_LAUNCH", dict(tak._DEFAULT_LAUNCHES["backward"]))
    h200, h100 = torch.device("cuda", 0), torch.device("cuda", 1)
    card = tak.CARD_LAUNCHES["H200"]
    assert card["forward"] != tak.LAUNCH and card["backward"] != tak.BACKWARD_LAUNCH  # the test can tell them apart
    assert tak.current_launch(h200) == card["forward"]
    assert tak.current_launch(h200, backward=True) == card["backward"]
    assert tak.current_launch(h100) is tak.LAUNCH and tak.current_launch(h100, backward=True) is tak.BACKWARD_LAUNCH
    assert tak.current_launch(torch.device("cpu")) is tak.LAUNCH
    tak.LAUNCH["tiles"] = 8  # changed in place (as GPU tests sweeping launches do): used on every card
    assert tak.current_launch(h200) is tak.LAUNCH
    assert tak.current_launch(h200, backward=True) == card["backward"]  # the backward's still the card's
    tak.LAUNCH.update(tak._DEFAULT_LAUNCHES["forward"])
    assert tak.current_launch(h200) == card["forward"]
    tak.set_launch("4x2x2x4", backward=True)  # chosen explicitly, equal to the default: used on every card
    assert tak.current_launch(h200, backward=True) is tak.BACKWARD_LAUNCH == tak._DEFAULT_LAUNCHES["backward"]
    assert tak.current_launch(h200) == card["forward"]


def test_project_training_width_takes_the_cards_value_unless_one_was_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """`project_training_max_width` gives a CUDA device whose name contains a `CARD_PROJECT_TRAINING_MAX_WIDTH` key
    that card's width (H200: 16, so ExpGen's 25-channel blocks train with the separate projection there) while
    PROJECT_TRAINING_MAX_WIDTH holds its default; other cards, the CPU, no device, a changed module value and one set
    with `set_project_training_max_width` (even the default: the benchmarks' baselines) use the module's. `projects`
    routes training by it, sampling not at all; torch.compile traces the card's value as a constant (fullgraph).
    The card name is faked: no GPU needed."""
    from ofer.models import token_attention_kernel as tak

    names = {0: "NVIDIA H200", 1: "NVIDIA H100 80GB HBM3"}
    monkeypatch.setattr(tak, "_card_name", lambda index: names[index])
    monkeypatch.setattr(tak, "_SET_LAUNCHES", set())
    monkeypatch.setattr(tak, "PROJECT_TRAINING_MAX_WIDTH", tak._DEFAULT_PROJECT_TRAINING_MAX_WIDTH)
    h200, h100, bf16 = torch.device("cuda", 0), torch.device("cuda", 1), torch.bfloat16
    assert tak.CARD_PROJECT_TRAINING_MAX_WIDTH["H200"] == 16 and tak.PROJECT_TRAINING_MAX_WIDTH == 32
    assert tak.project_training_max_width(h200) == 16 and tak.project_training_max_width(h100) == 32
    assert tak.project_training_max_width(torch.device("cpu")) == tak.project_training_max_width() == 32
    assert tak.projects(16, bf16, h200) and not tak.projects(25, bf16, h200) and tak.projects(25, bf16, h100)
    assert tak.projects(25, None, h200) and tak.projects(25, bf16) and tak.projects(25, bf16, torch.device("cpu"))

    def route(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if tak.projects(25, bf16, torch.device("cuda", 0)) else x - 1

    assert torch.equal(torch.compile(route, fullgraph=True, backend="eager")(torch.zeros(2)), -torch.ones(2))
    tak.PROJECT_TRAINING_MAX_WIDTH = 64  # changed (as tests do): used on every card
    assert tak.project_training_max_width(h200) == 64 and tak.projects(56, bf16, h200)
    tak.PROJECT_TRAINING_MAX_WIDTH = 32
    assert tak.project_training_max_width(h200) == 16
    tak.set_project_training_max_width(32)  # set explicitly, equal to the default: used on every card
    assert tak.project_training_max_width(h200) == 32 and tak.projects(25, bf16, h200)
    for bad in (-1, 1.5, "16", True):
        with pytest.raises(ValueError, match=r"PROJECT_TRAINING_MAX_WIDTH .*expected an integer >= 0"):
            tak.set_project_training_max_width(bad)
    assert tak.PROJECT_TRAINING_MAX_WIDTH == 32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_card_training_width_routes_a_compiled_expgen_without_graph_breaks() -> None:
    """On CUDA: the card's training width (`project_training_max_width`, looked up by the card's real name) is what
    the CARD_PROJECT_TRAINING_MAX_WIDTH table gives; an ExpGen-sized Denoiser trains under bf16 autocast compiled
    with fullgraph=True (the card lookup costs no graph break), its gradients no further from the fp32 ones than
    1.5x the eager bf16 gradients are."""
    from ofer.models import token_attention_kernel as tak

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    table = tak.CARD_PROJECT_TRAINING_MAX_WIDTH
    want = next((w for k, w in table.items() if k in name), tak.PROJECT_TRAINING_MAX_WIDTH)
    assert tak.project_training_max_width(dev) == want
    gen = torch.Generator(device=dev).manual_seed(0)
    net = Denoiser(dim=53, cond_dim=1024, widths=(53, 25, 10)).to(dev).train()
    with torch.no_grad():
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.normal_(0.0, 0.02)
    x = torch.randn(2048, 53, device=dev, generator=gen)
    t = torch.randint(0, 1000, (2048,), device=dev, generator=gen)
    c = torch.randn(2048, 1024, device=dev, generator=gen)

    def grads(bf16: bool, compiled: bool) -> torch.Tensor:
        net.zero_grad(set_to_none=True)
        fn = torch.compile(net, fullgraph=True) if compiled else net
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            fn(x, t, c).float().square().mean().backward()
        return torch.cat([p.grad.flatten() for p in net.parameters()])

    ref = grads(False, False)
    eager16 = (grads(True, False) - ref).norm()
    assert 0 < (grads(True, True) - ref).norm() <= 1.5 * eager16


def test_set_launch_parses_and_rejects_bad_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    from ofer.models import token_attention_kernel as tak

    monkeypatch.setattr(tak, "_SET_LAUNCHES", set())
    saved, saved_bwd = dict(tak.LAUNCH), dict(tak.BACKWARD_LAUNCH)
    try:
        assert tak.set_launch("2x8x3x1:row") == {"block_rows": 2, "tiles": 8, "stages": 3, "num_warps": 1,
                                                  "order": "row"}
        for bad in ("4x4x2", "4x4x2x0", "4xax2x2", "4x4x2x2x1", "", "4x4x2x2:", "4x4x2x2:col", "4x4x2x2:row:row"):
            with pytest.raises(ValueError, match="rows x tiles x stages x warps"):
                tak.set_launch(bad)
        assert tak.LAUNCH == {"block_rows": 2, "tiles": 8, "stages": 3, "num_warps": 1,
                              "order": "row"}  # unchanged by bad specs
        assert tak.set_launch("1x2x1x4", backward=True) == {"block_rows": 1, "tiles": 2, "stages": 1, "num_warps": 4,
                                                            "order": "head"}  # no suffix: the default order
        assert tak.BACKWARD_LAUNCH["num_warps"] == 4 and tak.LAUNCH["num_warps"] == 1  # only the backward's
    finally:
        tak.LAUNCH.clear()
        tak.LAUNCH.update(saved)
        tak.BACKWARD_LAUNCH.clear()
        tak.BACKWARD_LAUNCH.update(saved_bwd)
