"""benchmarks/bench_training.py's pieces that run on the CPU: `flat_adamw`, the `--optimizer flat` rows' AdamW over
one buffer of all parameters (the graphed rows themselves need CUDA)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _bench_training():
    spec = importlib.util.spec_from_file_location("bench_training", ROOT / "benchmarks" / "bench_training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.SiLU(), nn.LayerNorm(10), nn.Linear(10, 3))


def test_flat_adamw_updates_like_adamw_over_the_parameters() -> None:
    """Three steps of `flat_adamw` (the gradients gathered into the buffer's, one AdamW over the buffer) give the
    weights of AdamW over the parameter tensors, and the model's parameters are views of the buffer, so the update
    reaches the forward. Fails without the gather (only weight decay would act) or without the views (the model
    would not move)."""
    bench = _bench_training()
    start, ref, flat = _model(), _model(), _model()
    options = {"lr": 1e-2, "betas": (0.9, 0.99), "weight_decay": 0.1, "foreach": False}
    opt_ref = torch.optim.AdamW(ref.parameters(), **options)
    opt_flat, gather = bench.flat_adamw(flat, **options)
    (buffer,) = opt_flat.param_groups[0]["params"]
    assert buffer.numel() == sum(p.numel() for p in flat.parameters())
    x = torch.randn(16, 6)
    for step in range(3):
        for model, opt, collect in ((ref, opt_ref, None), (flat, opt_flat, gather)):
            model.zero_grad(set_to_none=True)  # the parameters' gradients; the buffer keeps its own
            model(x + step).square().mean().backward()
            if collect is not None:
                collect()
            opt.step()
    for (name, a), b, s in zip(ref.named_parameters(), flat.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)
        assert (a - s).abs().max() > 1e-3, name  # it trained
        assert b.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr(), name
