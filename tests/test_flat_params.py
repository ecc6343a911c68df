"""trainer.flat_params (ofer/training/flat.py): AdamW, clipping and EMA over one buffer per param group against
the same over the parameter tensors (PyTorch's AdamW, clip_grad_norm_, a hand-written average)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ofer.training.ema import EMA
from ofer.training.flat import ALIGN_BYTES, FlatParameters


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # odd sizes (7*5, 5, 3*7, 3, ...): packed end to end, most parameters would start at unaligned offsets
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1))


def _groups(model: nn.Module) -> list[dict]:
    ps = list(model.parameters())
    return [{"params": ps[:3], "lr": 1e-2, "weight_decay": 0.1}, {"params": ps[3:], "lr": 3e-3}]


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
    return ((model(x) - y) ** 2).mean()


def test_parameters_become_aligned_views_of_one_buffer_per_group() -> None:
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat = FlatParameters(model, _groups(model))
    assert len(flat.buffers) == 2
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=0)  # values kept
        group = 0 if n.startswith(("0.", "2.weight")) else 1
        assert p.untyped_storage().data_ptr() == flat.buffers[group].untyped_storage().data_ptr(), n
        # as aligned as a tensor of its own (the buffer's start is the allocator's: 64 B on the CPU, 512 on CUDA)
        assert (p.data_ptr() - flat.buffers[group].data_ptr()) % ALIGN_BYTES == 0, n
    # the gaps between parameters are zeros: 35+7+21 -> 64+64+64 floats, 3+3+1 -> 64+64+64
    assert [b.numel() for b in flat.buffers] == [192, 192]
    assert float(flat.buffers[0].detach().abs().sum()) == pytest.approx(
        sum(float(before[n].abs().sum()) for n in ("0.weight", "0.bias", "2.weight")), rel=1e-6)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_adamw_clip_and_ema_over_buffers_equal_them_over_the_parameters(clip: float | None) -> None:
    """Five steps with two param groups (their own lr, weight decay): weights, moments and EMA match PyTorch's AdamW,
    clip_grad_norm_ and an EMA over the parameter tensors."""
    ref, model = _model(), _model()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3, betas=(0.9, 0.99))
    ref_ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
    flat = FlatParameters(model, _groups(model))
    opt = torch.optim.AdamW(flat.optimizer_groups(), lr=1e-3, betas=(0.9, 0.99))
    ema = EMA(model, 0.8, flat)
    for step in range(5):
        ref_opt.zero_grad()
        _loss(ref, step).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        ref_opt.step()
        for n, p in ref.named_parameters():
            ref_ema[n] = 0.8 * ref_ema[n] + 0.2 * p.detach()

        flat.zero_grad()
        _loss(model, step).backward()
        flat.gather_grads()
        if clip:
            norm = torch.nn.utils.get_total_norm(flat.grads())
            torch.nn.utils.clip_grads_with_norm_(flat.buffers, clip, norm)
        opt.step()
        ema.update(model)
    torch.testing.assert_close(dict(model.named_parameters()), dict(ref.named_parameters()), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dict(ema.module.named_parameters()), ref_ema, rtol=1e-6, atol=1e-7)
    ours = flat.per_parameter_state(opt.state_dict())
    theirs = ref_opt.state_dict()
    torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-6, atol=1e-9)
    assert ours["param_groups"] == theirs["param_groups"]
    # the gaps stayed zero (zero gradient, zero weight: AdamW and weight decay keep them zero)
    kept = sum(p.numel() for p in model.parameters())
    assert int((torch.cat([b.detach() for b in flat.buffers]) != 0).sum()) <= kept


def test_gradients_are_views_so_clipping_the_buffer_clips_what_readers_see() -> None:
    model = _model()
    flat = FlatParameters(model, _groups(model))
    _loss(model, 0).backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    flat.gather_grads()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, raw[n], rtol=0, atol=0)
    for b in flat.buffers:
        b.grad.mul_(0.5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, raw[n] * 0.5, rtol=0, atol=0)
    # a second backward without clearing accumulates into the views; gather then copies nothing
    flat.zero_grad(set_to_none=False)
    _loss(model, 0).backward()
    flat.gather_grads()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, raw[n], rtol=1e-6, atol=1e-7)


def test_a_parameter_without_a_gradient_is_an_error_that_names_it() -> None:
    model = _model()
    flat = FlatParameters(model, _groups(model))
    model[4].bias.requires_grad_(False)  # takes no part in the backward
    _loss(model, 0).backward()
    with pytest.raises(RuntimeError, match=r"parameter '4.bias' got no gradient.*trainer.flat_params=false"):
        flat.gather_grads()


def test_a_group_that_mixes_dtypes_is_an_error() -> None:
    model = _model()
    model[4].double()
    with pytest.raises(ValueError, match=r"param group 1 mixes devices/dtypes.*trainer.flat_params=false"):
        FlatParameters(model, _groups(model))


def test_checkpoint_state_moves_between_flat_and_per_parameter_optimizers() -> None:
    """A per-parameter AdamW state (PyTorch's format) loads into the flat optimizer, and training goes on as the
    per-parameter optimizer does; and back."""
    ref = _model()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3)
    for step in range(3):
        ref_opt.zero_grad()
        _loss(ref, step).backward()
        ref_opt.step()
    model = copy.deepcopy(ref)
    flat = FlatParameters(model, _groups(model))
    opt = torch.optim.AdamW(flat.optimizer_groups(), lr=1e-3)
    opt.load_state_dict(flat.flat_state(ref_opt.state_dict()))
    for step in range(3, 6):
        ref_opt.zero_grad()
        _loss(ref, step).backward()
        ref_opt.step()
        flat.zero_grad()
        _loss(model, step).backward()
        flat.gather_grads()
        opt.step()
    torch.testing.assert_close(dict(model.named_parameters()), dict(ref.named_parameters()), rtol=1e-6, atol=1e-7)
    back = _model(1)
    back_opt = torch.optim.AdamW(_groups(back), lr=1e-3)
    back_opt.load_state_dict(flat.per_parameter_state(opt.state_dict()))
    torch.testing.assert_close(back_opt.state_dict()["state"], ref_opt.state_dict()["state"], rtol=1e-6, atol=1e-9)


def test_flat_state_refuses_what_one_buffer_cannot_hold() -> None:
    ref = _model()
    ref_opt = torch.optim.AdamW(_groups(ref), lr=1e-3)
    _loss(ref, 0).backward()
    ref_opt.step()
    model = _model()
    flat = FlatParameters(model, _groups(model))
    state = copy.deepcopy(ref_opt.state_dict())  # state_dict() shares the live per-parameter dicts
    state["state"][1]["step"] = torch.tensor(7.0)  # parameter 1 ('0.bias') took other steps than its group
    with pytest.raises(ValueError, match=r"ckpt.pt: optimizer state 'step' differs between the parameters of group 0"):
        flat.flat_state(state, where="ckpt.pt")
    state = copy.deepcopy(ref_opt.state_dict())  # state_dict() shares the live per-parameter dicts
    state["state"][4]["exp_avg"] = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'exp_avg' of parameter '4.weight' has shape \(5,\), the parameter has "
                                         r"shape \(1, 3\)"):
        flat.flat_state(state)
    state = copy.deepcopy(ref_opt.state_dict())  # state_dict() shares the live per-parameter dicts
    del state["state"][5]
    with pytest.raises(ValueError, match=r"group 1 has state for some parameters and not for others \('4.bias'"):
        flat.flat_state(state)
