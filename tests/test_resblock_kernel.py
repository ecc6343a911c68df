"""The FiLM-block kernels (`ofer.models.resblock_kernel`): against a float64 formula and the PyTorch block, in
Triton's CPU interpreter (here and in CI) and on a GPU in bf16 (marked gpu)."""
from __future__ import annotations

import textwrap

import pytest
import torch

from ofer.models import resblock_kernel as rk
from ofer.models import token_attention_kernel as tak
from ofer.models.unet1d import Denoiser, FiLMResBlock
from tests._triton_interpreter import run_interpreted

HAS_TRITON = rk.triton is not None


@pytest.mark.parametrize("n,chunks", [(16, (16, 0)), (10, (16, 0)), (32, (32, 0)), (56, (64, 0)), (64, (64, 0)),
                                      (300, (256, 64)), (304, (256, 64)), (600, (512, 128)), (1000, (1024, 0))])
def test_column_chunks_cover_the_width_with_powers_of_two(n, chunks) -> None:
    assert rk._column_chunks(n) == chunks
    na, nb = chunks
    assert na + nb >= n and na >= 16 and (nb == 0 or nb >= 16)


def test_blocks_on_the_cpu_run_their_pytorch_form(monkeypatch) -> None:
    """Without a CUDA tensor (and outside the interpreter) the kernels are never called."""
    monkeypatch.setattr(rk, "film_block_in", lambda *a: pytest.fail("kernel called on the CPU"))
    blk = FiLMResBlock(8, 8, groups=1).eval()
    with torch.no_grad():
        blk(torch.randn(4, 8), torch.zeros(4, 8), torch.zeros(4, 8))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_kernels_match_the_float64_block_in_the_interpreter() -> None:
    """Both kernels (float32, exact products in the interpreter) against `reference_block` in float64: widths of
    one and two column chunks, padded widths (zero columns past the true channels, statistics over the true
    ones), identity and Linear skips, grouped and per-row FiLM, row counts that leave the last program partly
    empty, FiLM groups spanning several programs; the same for the norm-only kernels (`film_norm_in` /
    `film_norm_out`) after the Linears as PyTorch matmuls. Then FiLMResBlock and a whole padded Denoiser trunk
    through the kernels against their PyTorch forms (`ENABLED = False`), counting the kernel calls, and the errors
    for bad inputs."""
    script = textwrap.dedent("""
        import pytest, torch
        from ofer.models import resblock_kernel as rk
        from ofer.models.unet1d import Denoiser, FiLMResBlock
        from tests.test_resblock_kernel import trunk_net
        torch.manual_seed(0)
        for i, (M, K, N, C, G, skip) in enumerate([(37, 304, 304, 300, 37, False), (70, 608, 304, 300, 7, True),
                                    (33, 56, 56, 50, 3, False), (20, 32, 16, 10, 4, True), (5, 16, 16, 16, 1, False),
                                    (129, 24, 24, 24, 3, False),
                                    # FiLM groups of more rows than a program's
                                    (300, 56, 56, 50, 3, False), (256, 32, 16, 10, 2, True),
                                    (200, 304, 304, 300, 2, False)]):
            x = torch.randn(M, K)
            lin = lambda n, k: (torch.randn(n, k) * k**-0.5, torch.randn(n) * 0.1)
            (w1, b1), (w2, b2) = lin(N, K), lin(N, N)
            ws, bs = lin(N, K) if skip else (None, None)
            g1, be1, g2, be2 = torch.randn(N), torch.randn(N) * 0.1, torch.randn(N), torch.randn(N) * 0.1
            for v in (w1, b1, w2, b2, g1, be1, g2, be2) + ((ws, bs) if skip else ()):
                v[C:] = 0  # a padded copy: zero rows past the true channels
            w2[:, C:] = 0
            if not skip:
                x[:, C:] = 0  # the block's input is a padded activation too
            film = torch.randn(G, 3 * N) * 0.3  # a wider tensor: scale and shift are strided views
            scale, shift = film[:, :N], film[:, N:2 * N]
            a = rk.film_block_in(x, w1, b1, g1, be1, scale, shift, C, 1e-5)
            out = rk.film_block_out(a, x, w2, b2, g2, be2, ws, bs, C, 1e-5)
            ref = rk.reference_block(x, w1, b1, g1, be1, scale, shift, w2, b2, g2, be2, ws, bs, C, 1e-5)
            # the norm-only kernels (wide blocks inside torch.compile) after the Linears as PyTorch matmuls; every
            # other case reads h and the skip as the halves of one (M, 2N) tensor (row stride 2N), as a block
            # with a skip Linear passes them
            h1, sk = x @ w1.T + b1, (x if not skip else x @ ws.T + bs)
            if i % 2:
                hs = torch.cat((h1, sk), 1)
                h1, sk = hs[:, :N], hs[:, N:]
            a2 = rk.film_norm_in(h1, g1, be1, scale, shift, C, 1e-5)
            out2 = rk.film_norm_out(a2 @ w2.T + b2, sk, g2, be2, C, 1e-5)
            for o in (out, out2):
                assert o.dtype == torch.float32 and o.shape == (M, N)
                err = float((o.double() - ref).abs().max())
                assert err < 2e-5, (M, K, N, C, G, skip, err)
                assert C == N or float(o[:, C:].abs().max()) == 0.0  # the padding stays exactly zero
            # with a row-strided tail: the same output, then the tail copied (the up path's concatenation)
            tail = torch.randn(M, N + 8)[:, 3:N + 3]
            out_t = rk.film_block_out(a, x, w2, b2, g2, be2, ws, bs, C, 1e-5, tail)
            out2_t = rk.film_norm_out(a2 @ w2.T + b2, sk, g2, be2, C, 1e-5, tail)
            for o, o_t in ((out, out_t), (out2, out2_t)):
                assert o_t.shape == (M, 2 * N) and torch.equal(o_t[:, :N], o) and torch.equal(o_t[:, N:], tail)

        # FiLMResBlock through the kernels against its PyTorch form, padded (one) and plain (the other)
        net = trunk_net()
        calls = []
        orig = rk.film_block_in
        rk.film_block_in = lambda *a: calls.append(a[0].shape) or orig(*a)
        for model in (net, net.padded()):  # plain, then padded (30/20/10 -> 32/24/16)
            x = torch.randn(12, 30)
            with torch.no_grad():  # one FiLM row per 4 rows
                f = model.time_film(torch.arange(3) * 300) + model.condition_film(torch.randn(3, 6))
                n0 = len(calls)
                out = model.trunk(x, f)
                assert len(calls) - n0 == 11, len(calls) - n0  # every FiLM block of the trunk
                rk.ENABLED = False
                ref = model.trunk(x, f)
                rk.ENABLED = True
                assert len(calls) - n0 == 11
            torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
            assert (out - model.trunk(x + 0.1, f)).abs().max() > 1e-3  # the comparison can fail
        with torch.no_grad(), torch.enable_grad():
            blk = FiLMResBlock(8, 8, groups=1)
            x = torch.randn(4, 8, requires_grad=True)
            n0 = len(calls)
            blk(x, torch.zeros(4, 8), torch.zeros(4, 8)).sum().backward()  # autograd: the PyTorch form
            assert len(calls) == n0 and x.grad is not None
            blk = FiLMResBlock(8, 8, groups=2).eval()
            with torch.no_grad():
                blk(torch.randn(4, 8), torch.zeros(4, 8), torch.zeros(4, 8))  # two groups: the PyTorch form
            assert len(calls) == n0

        x, w, v = torch.zeros(4, 8), torch.zeros(8, 8), torch.zeros(8)
        with pytest.raises(ValueError, match="G dividing the 4 rows"):
            orig(x, w, v, v, v, torch.zeros(3, 8), torch.zeros(3, 8), 8, 1e-5)
        with pytest.raises(ValueError, match="weight must be a contiguous \\\\(N, 8\\\\) tensor of x's dtype"):
            orig(x, w.double(), v, v, v, torch.zeros(4, 8), torch.zeros(4, 8), 8, 1e-5)
        with pytest.raises(ValueError, match="channels=9 must be in \\\\[1, 8\\\\]"):
            orig(x, w, v, v, v, torch.zeros(4, 8), torch.zeros(4, 8), 9, 1e-5)
        with pytest.raises(ValueError, match="b1 must be a contiguous \\\\(8,\\\\) vector"):
            orig(x, w, torch.zeros(7), v, v, torch.zeros(4, 8), torch.zeros(4, 8), 8, 1e-5)
        with pytest.raises(ValueError, match="without a skip Linear x must have the block's 8 columns"):
            rk.film_block_out(x, torch.zeros(4, 16), w, v, v, v, None, None, 8, 1e-5)
        with pytest.raises(ValueError, match="film_block_out: tail must be a \\(4, 8\\) tensor of torch.float32"):
            rk.film_block_out(x, x, w, v, v, v, None, None, 8, 1e-5, torch.zeros(4, 9))
        with pytest.raises(ValueError, match="film_norm_out: tail must be a \\(4, 8\\) tensor of torch.float32"):
            rk.film_norm_out(x, x, v, v, 8, 1e-5, torch.zeros(4, 8).half())
        print("ok")
    """)
    run_interpreted(script)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
def test_norm_kernel_blocks_match_their_pytorch_form_in_the_interpreter() -> None:
    """The norm-only kernels (`film_norm_in` / `film_norm_out`: the block's kernels reading each Linear's output
    instead of computing it, for wide blocks inside torch.compile; against the float64 block in the test above):
    `FiLMResBlock._norm_kernel_forward` against the block's PyTorch form for every block of a plain and a padded
    Denoiser, and inside torch.compile on 80-wide blocks with and without a skip Linear (wider than
    COMPILED_MAX_WIDTH: the norm kernels are called, and with NORM_KERNELS off they are not; with a tail and
    CAT_OUTPUT the last one writes the concatenation after the output); the errors for bad inputs."""
    script = textwrap.dedent("""
        import pytest, torch
        from ofer.models import resblock_kernel as rk
        from ofer.models import token_attention_kernel as tak
        from ofer.models.unet1d import FiLMResBlock
        from tests.test_resblock_kernel import trunk_net
        net = trunk_net()
        for model in (net, net.padded()):
            blocks = [m for m in model.modules() if isinstance(m, FiLMResBlock)]
            with torch.no_grad():
                for blk in blocks:
                    n = blk.lin1.out_features
                    xin = torch.randn(12, blk.lin1.in_features)
                    sc, sh = torch.randn(3, n) * 0.3, torch.randn(3, n) * 0.3
                    if hasattr(blk.norm1, "channels") and isinstance(blk.skip, torch.nn.Identity):
                        xin[:, blk.norm1.channels:] = 0  # padded: the residual stream's padding is zero
                    got = blk._norm_kernel_forward(xin, sc, sh, torch.float32)
                    rk.ENABLED = False
                    ref = blk(xin, sc, sh)
                    rk.ENABLED = True
                    torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
                    assert (got - blk._norm_kernel_forward(xin + 0.1, sc, sh, torch.float32)).abs().max() > 1e-3

        # inside torch.compile: 80-wide blocks (identity skip, and a skip Linear from 160 channels: one matmul for
        # lin1 and the skip) take the norm kernels, or inductor's with NORM_KERNELS off
        calls = []
        for name in ("film_norm_in", "film_norm_out", "film_block_in"):
            orig = getattr(rk, name)
            setattr(rk, name, lambda *a, orig=orig, name=name: calls.append(
                name + ("+tail" if name == "film_norm_out" and a[-1] is not None else "")) or orig(*a))
        for k in (80, 160):
            torch.manual_seed(2)
            blk = FiLMResBlock(k, 80, groups=1).eval()
            with torch.no_grad():
                for p in blk.parameters():
                    p.normal_(0.0, 0.2) if p.dim() > 1 else p.normal_(0.5, 0.3)
            x, sc, sh = torch.randn(6, k), torch.randn(2, 80) * 0.3, torch.randn(2, 80) * 0.3
            with torch.no_grad():
                rk.ENABLED = False
                ref = blk(x, sc, sh)
                rk.ENABLED = True
                for on in (True, False):
                    rk.NORM_KERNELS = on
                    torch._dynamo.reset()
                    calls.clear()
                    out = torch.compile(blk, backend="eager", fullgraph=True)(x, sc, sh)
                    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
                    assert calls == (["film_norm_in", "film_norm_out"] if on else []), (k, on, calls)
                # with a tail and CAT_OUTPUT: the last kernel writes the concatenation; without: a separate cat
                tail = torch.randn(10, 90)[:6, 5:85]
                rk.NORM_KERNELS = True
                for cat in (True, False):
                    tak.CAT_OUTPUT = cat
                    torch._dynamo.reset()
                    calls.clear()
                    out = torch.compile(blk, backend="eager", fullgraph=True)(x, sc, sh, tail)
                    torch.testing.assert_close(out, torch.cat((ref, tail), -1), atol=2e-5, rtol=2e-5)
                    assert calls == ["film_norm_in", "film_norm_out+tail" if cat else "film_norm_out"], calls
                tak.CAT_OUTPUT = False
        rk.NORM_KERNELS = True

        h, v = torch.zeros(4, 8), torch.zeros(8)
        with pytest.raises(ValueError, match="G dividing the 4 rows"):
            rk.film_norm_in(h, v, v, torch.zeros(3, 8), torch.zeros(3, 8), 8, 1e-5)
        with pytest.raises(ValueError, match="h must be a \\(rows, N\\) tensor with contiguous columns"):
            rk.film_norm_in(torch.zeros(8, 4).T, v, v, torch.zeros(4, 8), torch.zeros(4, 8), 8, 1e-5)
        with pytest.raises(ValueError, match="h must be a \\(rows, N\\) tensor contiguous"):
            rk.film_norm_out(torch.zeros(4, 16)[:, :8], h, v, v, 8, 1e-5)
        with pytest.raises(ValueError, match="channels=9 must be in \\[1, 8\\]"):
            rk.film_norm_out(h, h, v, v, 9, 1e-5)
        with pytest.raises(ValueError, match="skip must be a \\(4, 8\\) tensor of h's dtype .* contiguous columns"):
            rk.film_norm_out(h, torch.zeros(4, 8, dtype=torch.float64), v, v, 8, 1e-5)
        with pytest.raises(ValueError, match="skip must be a \\(4, 8\\) tensor of h's dtype .* contiguous columns"):
            rk.film_norm_out(h, torch.zeros(8, 4).T, v, v, 8, 1e-5)
        with pytest.raises(ValueError, match="g2 must be a contiguous \\(8,\\) vector"):
            rk.film_norm_out(h, h, torch.zeros(7), v, 8, 1e-5)
        print("ok")
    """)
    run_interpreted(script)


def trunk_net() -> Denoiser:
    """A small Denoiser (widths 30/20/10) in eval mode with every parameter random (seed 1): the interpreter
    tests' trunk."""
    torch.manual_seed(1)
    net = Denoiser(dim=30, cond_dim=6, widths=(30, 20, 10), time_dim=16)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.normal_(0.5, 0.3)
    return net.eval()


def _idgen_block(rows: int, groups: int, device: str) -> tuple[FiLMResBlock, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 300-wide IdGen up block (600 -> 300, skip Linear) of a padded copy, random weights, and its inputs."""
    torch.manual_seed(0)
    net = Denoiser(dim=300, cond_dim=512, widths=(300, 50, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.normal_(1.0, 0.2)
    blk = net.padded().up_blocks[-1][0].to(device).eval()
    x = torch.zeros(rows, 608, device=device)
    x[:, :300], x[:, 304:604] = torch.randn(rows, 300, device=device), torch.randn(rows, 300, device=device)
    film = torch.zeros(groups, 608, device=device)
    film[:, :300], film[:, 304:604] = torch.randn(groups, 300) * 0.3, torch.randn(groups, 300) * 0.3
    return blk, x, film[:, :304], film[:, 304:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda_in_bf16_are_as_close_to_float64_as_the_pytorch_block() -> None:
    """bf16 autocast on a GPU: the kernel path's error against the float64 block is at most the PyTorch block's
    (plus a bf16 unit), on a padded 300-wide block with a skip Linear, 100 samples per FiLM row; the padding
    channels stay zero."""
    blk, x, scale, shift = _idgen_block(4100, 41, "cuda")
    with torch.no_grad():
        ref = rk.reference_block(x, blk.lin1.weight, blk.lin1.bias, blk.norm1.weight, blk.norm1.bias, scale, shift,
                                 blk.lin2.weight, blk.lin2.bias, blk.norm2.weight, blk.norm2.bias, blk.skip.weight,
                                 blk.skip.bias, 300, blk.norm1.eps)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = blk(x, scale, shift)
            rk.ENABLED = False
            try:
                eager = blk(x, scale, shift)
            finally:
                rk.ENABLED = True
    assert out.dtype == eager.dtype == torch.bfloat16
    err_k = float((out.double() - ref).abs().max())
    err_e = float((eager.double() - ref).abs().max())
    scale_ref = float(ref.abs().max())
    assert err_k <= 1.5 * err_e + 2 ** -8 * scale_ref, (err_k, err_e, scale_ref)
    assert float(out[:, 300:].abs().max()) == 0.0
    assert float((out.double() - ref).abs().mean()) < 2 * float((eager.double() - ref).abs().mean()) + 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_graphed_bf16_sampling_with_the_kernels_tracks_float32(compile) -> None:
    """DDIM-25 of a padded IdGen-sized denoiser in bf16 from CUDA graphs: with the kernels its distance to the
    float32 samples is at most 1.5x that of the PyTorch blocks (same noise), and the kernels are called."""
    from ofer.diffusion import GaussianDiffusion
    from ofer.fast_sampling import GraphedSampler

    torch.manual_seed(0)
    model = Denoiser(dim=300, cond_dim=512, widths=(300, 50, 10)).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.03)
    diff = GaussianDiffusion().cuda()
    cond = torch.randn(8, 512, device="cuda")
    x_T = torch.randn(8, 100, 300, device="cuda")
    outs, cat_default = {}, tak.CAT_OUTPUT
    for name, bf16, enabled, cat in (("fp32", False, True, False), ("kernel", True, True, False),
                                     ("torch", True, False, False), ("cat", True, True, True)):
        rk.ENABLED, tak.CAT_OUTPUT = enabled, cat
        try:
            s = GraphedSampler(diff, model, rows=800, dim=300, cond_dim=512, sampler="ddim", steps=25, bf16=bf16,
                               compile=compile, num_samples=100)
            outs[name] = s(cond, num_samples=100, x_T=x_T).float()
        finally:
            rk.ENABLED, tak.CAT_OUTPUT = True, cat_default
    d_kernel, d_torch, d_cat = (float((outs[k] - outs["fp32"]).norm() / outs["fp32"].norm())
                                for k in ("kernel", "torch", "cat"))
    assert d_kernel <= 1.5 * d_torch + 1e-3, (d_kernel, d_torch)
    assert d_cat <= 1.5 * d_torch + 1e-3, (d_cat, d_torch)
    assert float((outs["kernel"] - outs["torch"]).abs().max()) > 0  # the kernel path really ran


@pytest.mark.skipif(not HAS_TRITON, reason="Triton not installed; covered by the GPU tests")
@pytest.mark.parametrize("n,skip,tail", [(304, False, False), (304, True, False), (56, True, False),
                                         (16, False, False), (304, False, True), (56, False, True)])  # IdGen blocks
def test_kernels_compile_for_sm90_with_the_installed_triton(n, skip, tail) -> None:
    """Both kernels compiled ahead of time (no GPU needed) for sm_90 with their launch from `LAUNCH`, the output
    kernel with or without a tail (the up path's concatenation, `CAT_OUTPUT`): they build,
    multiply with Hopper's wgmma (a launch of fewer than 64 rows per warp group falls back to mma.sync) and keep
    no arrays in local memory, plain and as a launch with aligned pointers and strides (`tests/_triton_aot.py`:
    it pipelines the K loop through shared memory, which must fit an H100). Catches a Triton API change before a
    user's GPU does (the GPU tests run another Triton version). Register spills happen later, in ptxas:
    bench_resblock_kernel.py reports them."""
    from tests._triton_aot import compile_sm90

    na, nb = rk._column_chunks(n)
    launch = rk._launch(n)
    consts = {"BM": launch["block_rows"], "BK": launch["block_k"], "NA": na, "NB": nb, "STAGES": launch["stages"],
              "PRECISION": "tf32", "GEMM": True}
    ints = {name: "i32" for name in ("M", "K", "N", "C", "sx")}
    sig_in = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "g_ptr": "*fp32", "be_ptr": "*fp32",
              "sc_ptr": "*fp32", "sh_ptr": "*fp32", "out_ptr": "*bf16", **ints, "sf": "i32", "rows_per_group": "i32",
              "eps": "fp32", **{c: "constexpr" for c in consts}}
    sig_out = {"a_ptr": "*bf16", "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "g_ptr": "*fp32",
               "be_ptr": "*fp32", "ws_ptr": "*bf16", "bs_ptr": "*bf16", "out_ptr": "*bf16", **ints, "eps": "fp32",
               "t_ptr": "*bf16", "st": "i32", **{c: "constexpr" for c in consts}, "SKIP_LINEAR": "constexpr",
               "TAIL": "constexpr"}
    for fn, sig, cs in ((rk._film_block_in_kernel, sig_in, consts),
                        (rk._film_block_out_kernel, sig_out, {**consts, "SKIP_LINEAR": skip, "TAIL": tail})):
        for kernel in compile_sm90(fn, sig, cs, launch["num_warps"]):
            ptx = kernel.asm["ptx"]
            assert "wgmma" in ptx, fn
            assert "st.local" not in ptx and "ld.local" not in ptx, fn
    # the norm-only forms (film_norm_in / film_norm_out) with their launch: no matmul, no local memory
    consts.update(BM=rk.NORM_LAUNCH["block_rows"], GEMM=False)
    for fn, sig, cs in ((rk._film_block_in_kernel, sig_in, consts),
                        (rk._film_block_out_kernel, sig_out, {**consts, "SKIP_LINEAR": False, "TAIL": tail})):
        for kernel in compile_sm90(fn, sig, cs, rk.NORM_LAUNCH["num_warps"]):
            ptx = kernel.asm["ptx"]
            assert "wgmma" not in ptx and "mma.sync" not in ptx, fn
            assert "st.local" not in ptx and "ld.local" not in ptx, fn
