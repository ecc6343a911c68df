"""Exponential moving average of a module's weights (evaluation and sampling use it by default)."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ofer.training.flat import FlatParameters


class EMA:
    """``ema = decay * ema + (1 - decay) * param`` after every optimizer step.

    Only trainable floating-point parameters are averaged; frozen parameters and buffers (e.g.
    GroupNorm has none, BatchNorm running stats do) are copied as they are, because an average of
    a value that does not train is the value itself. The averaged copy lives in :attr:`module`
    (eval mode, no gradients) on the same device as the source. No warm-up of the decay: the
    average starts at the initial weights (our choice, as DiT; OFER's public code has no EMA).

    With ``flat`` (the model's :class:`~ofer.training.flat.FlatParameters`, trainer.flat_params) the averaged
    copy's parameters are laid out the same way and the average is one lerp per param group's buffer.
    """

    def __init__(self, model: nn.Module, decay: float, flat: FlatParameters | None = None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.num_updates = 0
        self._flat_pairs = flat.views(self.module) if flat is not None else []
        self._flat_names = set(flat.names) if flat is not None else set()

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
        src = dict(model.named_parameters())
        averaged, sources, copied = [], [], []
        for name, ema_p in self.module.named_parameters():
            if name not in src:
                raise KeyError(f"EMA: parameter {name!r} is missing from the model being averaged")
            p = src[name]
            if name in self._flat_names:  # averaged through its buffer
                continue
            if p.requires_grad and p.is_floating_point():
                averaged.append(ema_p)
                sources.append(p.detach())
            else:
                copied.append((ema_p, p.detach()))
        src_buffers = dict(model.named_buffers())
        for name, ema_b in self.module.named_buffers():
            copied.append((ema_b, src_buffers[name]))
        return averaged, sources, copied

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (same architecture, not the DDP wrapper) in."""
        averaged, sources, copied = self._pairs(model)
        averaged += [ema for ema, _ in self._flat_pairs]
        sources += [src for _, src in self._flat_pairs]
        if averaged:
            torch._foreach_lerp_(averaged, sources, 1.0 - self.decay)
        if copied:  # one multi-tensor copy, not one kernel per tensor (a padded IdGen has 28 mask buffers)
            torch._foreach_copy_([dst for dst, _ in copied], [src for _, src in copied])
        self.num_updates += 1

    def state_dict(self) -> dict[str, Tensor]:
        """The averaged module's ``state_dict`` (loadable into a fresh model of the same class)."""
        return self.module.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
