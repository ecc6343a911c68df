"""Tests of the OFER denoiser (ofer.models.unet1d.Denoiser), built from the real Hydra configs."""

from __future__ import annotations

import io
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

from ofer.models.unet1d import Denoiser, FiLMResBlock, PaddedGroupNorm, RMSNorm, TokenSelfAttention

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"

# Parameter counts of the public OFER network (src/models/network/flameAttnNetwork.py, Unet with the paper
# configs), counting its 16 unregistered q/k/v projections per attention block, which its forward uses:
# registered 6,246,954 + 6 blocks x 16 x (dim x 384) = 12,452,394 (IdGen); 1,815,673 + ... = 3,161,209 (ExpGen).
PUBLIC_COUNTS = {"idgen": 12_452_394, "expgen": 3_161_209}


def build(name: str, **overrides) -> Denoiser:
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    return hydra.utils.instantiate(cfg, **overrides)


def randomize(net: Denoiser, seed: int = 0) -> Denoiser:
    """Give the zero-initialised layers random weights so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (net.film.weight, net.film.bias, net.out_proj.weight, net.out_proj.bias):
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    return net


def inputs(net: Denoiser, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, net.dim, generator=gen),
        torch.randint(0, 1000, (batch,), generator=gen),
        torch.randn(batch, net.cond_dim, generator=gen),
    )


@pytest.fixture(scope="module")
def idgen() -> Denoiser:
    torch.manual_seed(0)
    return randomize(build("idgen"))


@pytest.fixture(scope="module")
def expgen() -> Denoiser:
    torch.manual_seed(0)
    return randomize(build("expgen"))


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_parameter_count_matches_public_code(name: str) -> None:
    net = build(name)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - PUBLIC_COUNTS[name]) <= 0.05 * PUBLIC_COUNTS[name]
    assert n == PUBLIC_COUNTS[name]  # same structure: exactly equal


@pytest.mark.parametrize("name", ["idgen", "expgen"])
@pytest.mark.parametrize("batch", [1, 100])
def test_output_shape_and_batch_independence(name: str, batch: int, request) -> None:
    net = request.getfixturevalue(name)
    x, t, c = inputs(net, batch)
    with torch.no_grad():
        out = net(x, t, c)
        first = net(x[:1], t[:1], c[:1])
    assert out.shape == (batch, net.dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert out.abs().max() > 0
    torch.testing.assert_close(first, out[:1], rtol=1e-4, atol=1e-5)  # rows do not interact


def test_config_values_are_the_paper_settings(idgen: Denoiser, expgen: Denoiser) -> None:
    assert (idgen.dim, idgen.cond_dim, idgen.widths) == (300, 512, (300, 50, 10))
    assert (expgen.dim, expgen.cond_dim, expgen.widths) == (53, 1024, (53, 25, 10))


def test_attention_weights_are_registered_trained_and_saved(expgen: Denoiser) -> None:
    keys = expgen.state_dict().keys()
    qkv_keys = [k for k in keys if k.endswith("to_qkv.weight")]
    assert len(qkv_keys) == 6  # 2 down levels, middle, 2 up levels, final
    assert expgen.state_dict()["down_attn.0.to_qkv.weight"].shape == (16 * 3 * 4 * 32, 53)
    expgen.zero_grad()
    x, t, c = inputs(expgen, 8)
    expgen(x, t, c).square().mean().backward()
    for name, p in expgen.named_parameters():
        if "attn" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    expgen.zero_grad()


def test_save_load_round_trip_reproduces_outputs_exactly(expgen: Denoiser) -> None:
    buf = io.BytesIO()
    torch.save(expgen.state_dict(), buf)
    torch.manual_seed(123)  # a different random init: everything must come from the file
    fresh = build("expgen")
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))  # strict
    x, t, c = inputs(expgen, 5)
    with torch.no_grad():
        assert torch.equal(fresh(x, t, c), expgen(x, t, c))


def test_attention_switch_changes_parameters_and_outputs(expgen: Denoiser) -> None:
    no_attn = build("expgen", attention=False)
    n_on = sum(p.numel() for p in expgen.parameters())
    n_off = sum(p.numel() for p in no_attn.parameters())
    assert n_off < n_on and not any("attn" in k for k in no_attn.state_dict())
    shared = {k: v for k, v in expgen.state_dict().items() if "attn" not in k}
    no_attn.load_state_dict(shared)  # strict: every other weight is the same
    x, t, c = inputs(expgen, 4)
    with torch.no_grad():
        assert not torch.allclose(no_attn(x, t, c), expgen(x, t, c), atol=1e-4)


def test_output_depends_on_t_and_cond(idgen: Denoiser) -> None:
    x, t, c = inputs(idgen, 4)
    with torch.no_grad():
        base = idgen(x, t, c)
        assert not torch.allclose(base, idgen(x, (t + 500) % 1000, c), atol=1e-5)
        assert not torch.allclose(base, idgen(x, t, torch.roll(c, 1, dims=0)), atol=1e-5)


def test_zero_init_and_conditioning_after_training_steps() -> None:
    torch.manual_seed(0)
    net = build("expgen")
    x, t, c = inputs(net, 16)
    target = torch.randn(16, net.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(net(x, t, c), torch.zeros(16, net.dim))  # zero output layer

    def cond_grad() -> torch.Tensor:
        cc = c.clone().requires_grad_(True)
        (net(x, t, cc) - target).abs().mean().backward()
        net.zero_grad()
        return cc.grad

    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    grads = [cond_grad().abs().sum()]
    for _ in range(2):
        opt.zero_grad()
        (net(x, t, c) - target).abs().mean().backward()
        opt.step()
        grads.append(cond_grad().abs().sum())
    # Zero FiLM and zero output layer: step 1 can move only the output layer (all other gradients pass
    # through its zero weights); step 2 reaches the FiLM projection, and cond starts to matter.
    assert grads[0] == 0 and grads[1] == 0 and grads[2] > 0


def test_bf16_autocast_close_to_float32(expgen: Denoiser) -> None:
    x, t, c = inputs(expgen, 3)
    with torch.no_grad():
        ref = expgen(x, t, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = expgen(x, t, c)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert (out.float() - ref).norm() < 0.05 * ref.norm()


def test_variants_and_bad_arguments() -> None:
    net = Denoiser(dim=7, cond_dim=3, widths=(8, 4), blocks_per_level=1, groups=2, attn_tokens=4)
    x = torch.randn(2, 7)
    assert net(x, torch.tensor([0, 999]), torch.randn(2, 3)).shape == (2, 7)
    with pytest.raises(ValueError, match="groups"):
        Denoiser(dim=53, cond_dim=8, widths=(53, 25, 10), groups=2)
    with pytest.raises(ValueError, match="widths"):
        Denoiser(dim=53, cond_dim=8, widths=(53,))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 7\)"):
        net(torch.randn(2, 6), torch.tensor([0, 1]), torch.randn(2, 3))
    with pytest.raises(ValueError, match="cond"):
        net(x, torch.tensor([0, 1]), torch.randn(2, 4))


def test_cond_scale_is_a_constant_factor_on_the_condition() -> None:
    """cond_scale = s computes exactly the network with cond_scale = 1 fed s * cond (the same weights)."""
    torch.manual_seed(0)
    plain = randomize(Denoiser(dim=7, cond_dim=5, widths=(8, 4), blocks_per_level=1, attn_tokens=4, attn_head_dim=4))
    scaled = Denoiser(dim=7, cond_dim=5, widths=(8, 4), blocks_per_level=1, attn_tokens=4, attn_head_dim=4,
                      cond_scale=22.5)
    scaled.load_state_dict(plain.state_dict())
    x, t, c = inputs(plain, 3)
    c = torch.nn.functional.normalize(c, dim=-1)
    torch.testing.assert_close(scaled(x, t, c), plain(x, t, 22.5 * c), rtol=0, atol=0)
    assert not torch.allclose(scaled(x, t, c), plain(x, t, c))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="cond_scale"):
            Denoiser(dim=7, cond_dim=5, widths=(8, 4), cond_scale=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_autocast() -> None:
    device = torch.device("cuda")
    net = randomize(build("expgen")).to(device)
    x, t, c = (a.to(device) for a in inputs(net, 100))
    with torch.no_grad():
        ref = net(x, t, c)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x, t, c)
    assert torch.isfinite(out).all() and (out.float() - ref).norm() < 0.05 * ref.norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_norms_return_the_activation_dtype() -> None:
    """CUDA autocast computes GroupNorm and the RMS norm in float32; the blocks hand bf16 on (so the fused FiLM,
    SiLU and backward kernels move bf16, not float32) and stay as close to the float32 block as bf16 allows."""
    torch.manual_seed(0)
    device = torch.device("cuda")
    block, norm = FiLMResBlock(300, 300, groups=1).to(device), RMSNorm(300).to(device)
    x, scale, shift = (torch.randn(512, 300, device=device) for _ in range(3))
    with torch.no_grad():
        ref_block, ref_norm = block(x, 0.1 * scale, 0.1 * shift), norm(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            xb = x.bfloat16()
            out_block, out_norm = block(xb, 0.1 * scale.bfloat16(), 0.1 * shift.bfloat16()), norm(xb)
            assert block.norm1(block.lin1(xb)).dtype == torch.float32  # what autocast itself returns
    assert out_block.dtype == torch.bfloat16 and out_norm.dtype == torch.bfloat16
    assert (out_block.float() - ref_block).norm() < 0.02 * ref_block.norm()
    assert (out_norm.float() - ref_norm).norm() < 0.01 * ref_norm.norm()
    assert ref_block.dtype == torch.float32  # without autocast nothing is cast


def test_split_film_equals_the_joint_film_matmul(idgen: Denoiser) -> None:
    """forward = trunk(time_film + condition_film) must equal the public design's single FiLM matmul on
    SiLU(concat(time embedding, cond_scale * cond)), computed here directly from the module's `film` Linear."""
    from ofer.models.unet1d import sinusoidal_embedding

    net = randomize(idgen, seed=3).eval()
    x, cond = torch.randn(5, 300), torch.randn(5, 512)
    t = torch.tensor([0, 1, 250, 998, 999])
    t_emb = net.time_mlp(sinusoidal_embedding(t, net.time_dim))
    assert net.cond_scale == pytest.approx(512**0.5)  # the IdGen config's value
    joint = net.film(torch.nn.functional.silu(torch.cat((t_emb, net.cond_scale * cond), dim=-1)))
    split = net.time_film(t) + net.condition_film(cond)
    torch.testing.assert_close(split, joint, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(net.film_rows(t, cond), joint, atol=1e-5, rtol=1e-5)  # what forward uses
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, cond), net.trunk(x, joint), atol=1e-5, rtol=1e-5)
        # A sampler precomputes one time row per step and broadcasts it over the rows of that step.
        t_same = torch.full((5,), 500)
        torch.testing.assert_close(net(x, t_same, cond),
                                   net.trunk(x, net.time_film(t_same[:1]) + net.condition_film(cond)),
                                   atol=1e-5, rtol=1e-5)
    assert not torch.allclose(net.time_film(t[:1]), net.time_film(t[1:2]))  # the time part does depend on t


def test_film_rows_gradients_equal_autograd_through_the_joint_matmul(idgen: Denoiser) -> None:
    """film_rows' own backward (input gradients only for the parts that need one) must give every parameter, and a
    condition that needs a gradient, autograd's gradients through the public design's joint FiLM Linear
    (`net.film` on the concatenation); with the condition as data, the same parameter gradients."""
    from ofer.models.unet1d import sinusoidal_embedding

    net = randomize(idgen, seed=6)
    x, t = torch.randn(4, 300), torch.tensor([3, 250, 600, 999])
    for cond_grad in (True, False):
        grads = []
        for joint in (False, True):
            net.zero_grad(set_to_none=True)
            cond = torch.randn(4, 512, generator=torch.Generator().manual_seed(1)).requires_grad_(cond_grad)
            if joint:
                t_emb = net.time_mlp(sinusoidal_embedding(t, net.time_dim))
                out = net.trunk(x, net.film(torch.nn.functional.silu(torch.cat((t_emb, net.cond_scale * cond), -1))))
            else:
                out = net(x, t, cond)
            out.square().sum().backward()
            grads.append({n: p.grad for n, p in net.named_parameters()} | ({"cond": cond.grad} if cond_grad else {}))
        assert grads[0].keys() == grads[1].keys()
        for n, ref in grads[1].items():
            torch.testing.assert_close(grads[0][n], ref, atol=1e-5 * float(ref.abs().max()), rtol=1e-4, msg=n)
        assert grads[1]["film.weight"].abs().max() > 0 and grads[1]["time_mlp.0.weight"].abs().max() > 0


def test_compiled_film_rows_keep_the_autocast_dtype(idgen: Denoiser) -> None:
    """film_rows adds the bias after the matmul (where torch.compile fuses it into the readers). Under bf16 autocast
    the rows must stay bf16, compiled and eager, as the split form's are (a float32 bias would promote every block's
    FiLM, and the activations after it, to float32), and equal the split form up to bf16 rounding."""
    net = randomize(idgen, seed=5)
    t, cond = torch.tensor([0, 7, 500, 999]), torch.randn(4, 512)
    rows = torch.compile(net.film_rows, backend="aot_eager", dynamic=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rows(t, cond)
        split = net.time_film(t) + net.condition_film(cond)
        eager = net.film_rows(t, cond)
    assert got.dtype == split.dtype == eager.dtype == torch.bfloat16
    for out in (got, eager):
        torch.testing.assert_close(out.float(), split.float(), rtol=0.02, atol=0.02 * split.float().abs().max().item())



def test_trunk_gives_each_block_its_scale_then_its_shift(idgen: Denoiser, monkeypatch) -> None:
    """The FiLM rows' layout, which saved checkpoints depend on: block k of the forward order (down, mid, up,
    final) reads columns [o_k, o_k + w_k) as its scale and [o_k + w_k, o_k + 2 w_k) as its shift, where w_k is its
    output width and o_k the sum of the widths 2 w_j of the blocks before it. Checked by recording what each block
    receives; it fails if scale and shift trade places or the blocks read each other's columns."""
    net = randomize(idgen, seed=6).eval()
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = FiLMResBlock.forward

    def record(block, x, scale, shift, tail=None):
        seen.append((scale, shift))
        return real(block, x, scale, shift, tail)

    monkeypatch.setattr(FiLMResBlock, "forward", record)
    film = torch.randn(4, sum(net._film_sizes))
    with torch.no_grad():
        net.trunk(torch.randn(4, net.dim), film)
    blocks = [b for level in net.down_blocks for b in level] + [net.mid_block1, net.mid_block2]
    blocks += [b for level in net.up_blocks for b in level] + [net.final_block]
    assert len(seen) == len(blocks) == len(net._film_sizes)
    o = 0
    for (scale, shift), block in zip(seen, blocks):
        w = block.lin1.out_features
        torch.testing.assert_close(scale, film[:, o:o + w], atol=0, rtol=0)
        torch.testing.assert_close(shift, film[:, o + w:o + 2 * w], atol=0, rtol=0)
        o += 2 * w
    assert o == film.shape[1]


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_trunk_broadcasts_one_film_row_per_condition(name: str) -> None:
    """A FiLM tensor with one row per condition (G rows for G x N samples) must give the trunk of the same FiLM
    repeated for every sample (the definition, via repeat_interleave), in float32 and under bf16 autocast."""
    net = randomize(build(name), seed=4).eval()
    g, n = 3, 5
    x = torch.randn(g * n, net.dim)
    film = net.time_film(torch.tensor([400])) + net.condition_film(torch.randn(g, net.cond_dim))  # (G, F)
    with torch.no_grad():
        ref = net.trunk(x, film.repeat_interleave(n, dim=0))
        torch.testing.assert_close(net.trunk(x, film), ref, atol=1e-6, rtol=1e-6)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref16 = net.trunk(x, film.repeat_interleave(n, dim=0))
            torch.testing.assert_close(net.trunk(x, film), ref16, atol=0, rtol=0)
        # the test can fail: the conditions' FiLM rows differ, so the rows' order matters
        assert not torch.allclose(net.trunk(x, film.flip(0)), ref, atol=1e-3)
        for bad in (film[:2], film[:, :-1], film[0]):  # 2 does not divide 15 rows; a column short; 1-D
            with pytest.raises(ValueError, match=r"film must have shape \(G, \d+\) with G dividing the 15 rows"):
                net.trunk(x, bad)


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_padded_copy_computes_the_same_function(name: str) -> None:
    """Denoiser.padded rounds every width up to a multiple of 8 and must compute the same noise prediction as
    the original (float32, every parameter random, norm gains included), with its padding channels exactly
    zero after every block; GroupNorm statistics over the padding would break it (checked by a mutation)."""
    net = randomize(build(name), seed=5).eval()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.GroupNorm, RMSNorm)):
                for q in m.parameters():
                    q.copy_(1 + 0.3 * torch.randn(q.shape, generator=gen))
            if isinstance(m, torch.nn.Linear) and m.bias is not None:  # token_mix.bias, to_out.bias non-zero too
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    pad = net.padded()
    assert pad.widths == {"idgen": (304, 56, 16), "expgen": (56, 32, 16)}[name]
    assert all(isinstance(m, PaddedGroupNorm) for b in pad.modules() if isinstance(b, FiLMResBlock)
               for m in (b.norm1, b.norm2))
    x, t, cond = inputs(net, 6)
    outs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in pad.modules()
             if isinstance(m, (FiLMResBlock, TokenSelfAttention))]
    with torch.no_grad():
        ref = net(x, t, cond)
        torch.testing.assert_close(pad(x, t, cond), ref, atol=1e-5, rtol=1e-5)
        true_width = dict(zip(pad.widths, net.widths))
        for o in outs:  # the padding channels of every block's output are exactly zero
            w = true_width[o.shape[1]]
            assert o[:, w:].abs().max() == 0 and o[:, :w].abs().max() > 0
        for h in hooks:
            h.remove()
        # grouped FiLM rows work on the copy as on the original
        film = pad.time_film(t[:2]) + pad.condition_film(cond[:2])
        ref_film = net.time_film(t[:2]) + net.condition_film(cond[:2])
        torch.testing.assert_close(pad.trunk(x, film), net.trunk(x, ref_film), atol=1e-5, rtol=1e-5)
        # mutation: GroupNorm statistics over all padded channels give another function
        norms = [m for m in pad.modules() if isinstance(m, PaddedGroupNorm)]
        for m in norms:
            m.channels, m.true = m.padded, m.channels
        assert not torch.allclose(pad(x, t, cond), ref, atol=1e-3)
        for m in norms:
            m.channels = m.true
        torch.testing.assert_close(pad(x, t, cond), ref, atol=1e-5, rtol=1e-5)
    assert pad.is_padded and not net.is_padded
    with pytest.raises(ValueError, match="already is a padded copy"):
        pad.padded()  # its widths count padding channels: padding it again would normalise over them
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        net.padded(0)
    with pytest.raises(ValueError, match="needs groups=1"):
        Denoiser(dim=8, cond_dim=4, widths=(8, 4), groups=2).padded()


def _random_gains(net: Denoiser, seed: int) -> Denoiser:
    """Norm gains and biases away from 1 and 0, Linear biases non-zero, so every parameter carries signal."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.GroupNorm, RMSNorm)):
                for q in m.parameters():
                    q.copy_(1 + 0.3 * torch.randn(q.shape, generator=gen))
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return net


def _padding_mask(pad: Denoiser, name: str, p: torch.Tensor) -> torch.Tensor:
    """1 on the positions of `p` that `pad.unpad` keeps (its true channels), 0 on its padding."""
    numbers = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[pad.unpad({name: numbers})[name].flatten().long()] = True
    return mask.view(p.shape)


@pytest.mark.parametrize("name", ["idgen", "expgen"])
def test_padded_copy_trains_like_the_original(name: str) -> None:
    """Training through `Denoiser.padded()` is training the original model (float64, against the original model
    trained side by side, an independent network without padding): the copy's gradients on the true channels
    equal the original's, every padding parameter gets an exactly zero gradient and stays exactly zero under
    AdamW with weight decay, and `unpad` of the trained copy's state dict loads strictly into a fresh unpadded
    model that equals the trained original. Fails if the GroupNorm statistics' gradient reaches the padding
    (tried: the statistics summed over all padded channels, with the padding's share taken out)."""
    from ofer.diffusion import GaussianDiffusion

    net = _random_gains(randomize(build(name), seed=5), seed=6).double().train()
    pad = net.padded()
    assert pad.training and pad.original_config == net.config and net.original_config == net.config
    diff = GaussianDiffusion()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=1e-2) for m in (net, pad)]
    gen = torch.Generator().manual_seed(7)
    for step in range(3):
        x0 = torch.randn(12, net.dim, generator=gen, dtype=torch.float64)
        cond = torch.randn(12, net.cond_dim, generator=gen, dtype=torch.float64)
        t = torch.randint(0, 1000, (12,), generator=gen)
        noise = torch.randn(12, net.dim, generator=gen, dtype=torch.float64)
        for model, opt in zip((net, pad), opts):
            opt.zero_grad()
            diff.training_losses(model, x0, cond, t=t, noise=noise)["loss"].mean().backward()
        grads = {n: p.grad for n, p in pad.named_parameters()}
        true_grads = pad.unpad(grads)
        for n, p in net.named_parameters():
            torch.testing.assert_close(true_grads[n], p.grad, atol=1e-10, rtol=1e-8, msg=lambda m: f"{n}: {m}")
        for n, g in grads.items():  # the padding's gradient is exactly zero
            assert g[~_padding_mask(pad, n, g)].abs().sum() == 0, f"step {step}: {n}"
        for opt in opts:
            opt.step()
    for n, p in pad.named_parameters():  # and the padding itself stays exactly zero
        assert p.detach()[~_padding_mask(pad, n, p)].abs().sum() == 0, n
    fresh = Denoiser(**pad.original_config).double()
    fresh.load_state_dict(pad.unpad(pad.state_dict()))  # strict
    for (n, a), b in zip(fresh.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"{n}: {m}")
    with pytest.raises(ValueError, match="not a padded"):
        net.unpad(net.state_dict())


@pytest.mark.parametrize("impl", ["math", "reduce", "auto"])
def test_attention_impls_equal_sdpa(expgen: Denoiser, impl: str) -> None:
    """Every attention kernel computes PyTorch's scaled_dot_product_attention (an independent implementation),
    forward and backward; "reduce" also mixes the tokens before the value product, so this checks that
    reordering too."""
    net = randomize(expgen, seed=5).train()
    x, t, c = inputs(net, 6)
    out_ref = net.set_attention_impl("sdpa")(x, t, c)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), list(net.parameters()))
    out = net.set_attention_impl(impl)(x, t, c)
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    net.set_attention_impl("auto")
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'auto', 'math', 'reduce', 'sdpa'"):
        net.set_attention_impl("flash")


@pytest.mark.parametrize("pad", [False, True])
def test_autocast_copy_computes_exactly_the_same_function(pad) -> None:
    """Denoiser.autocast_copy (the samplers' bf16 trunk weights): under bf16 autocast bit-equal to the model, whole
    and through the trunk with one FiLM row per condition; the FiLM, time MLP, token mix, attention output bias and
    norms stay float32 and the original is untouched. Casting the attention output bias as well changes the
    output (the comparison can fail)."""
    torch.manual_seed(0)
    model = Denoiser(dim=300, cond_dim=512, widths=(300, 50, 10)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05) if p.dim() > 1 else p.normal_(0.5, 0.2)
    if pad:
        model = model.padded()
    copy = model.autocast_copy(torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert copy.down_blocks[0][0].lin1.weight.dtype == copy.out_proj.bias.dtype == torch.bfloat16
    for p in (copy.film.weight, copy.time_mlp[0].weight, copy.down_attn[0].token_mix.weight,
              copy.down_attn[0].to_out.bias, copy.down_attn[0].norm.gain, copy.down_blocks[0][0].norm1.weight):
        assert p.dtype == torch.float32
    x, t, cond = torch.randn(6, 300), torch.randint(0, 1000, (6,)), torch.randn(3, 512)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, t, cond.repeat_interleave(2, 0))
        assert torch.equal(copy(x, t, cond.repeat_interleave(2, 0)), ref)
        film = model.time_film(t[:3]) + model.condition_film(cond)  # one row per condition
        assert torch.equal(copy.trunk(x, film), model.trunk(x, film))
        for m in copy.modules():
            if hasattr(m, "to_out"):
                m.to_out.bias.data = m.to_out.bias.data.to(torch.bfloat16)
        assert not torch.equal(copy(x, t, cond.repeat_interleave(2, 0)), ref)
