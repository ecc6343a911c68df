"""The trained parameters of each AdamW param group as views of one flat buffer (``trainer.flat_params``).

PyTorch's multi-tensor kernels (fused AdamW, the gradient norm, clipping, the EMA's lerp) launch at most a few
dozen tensors at a time, one block per 65,536-element chunk: a paper-sized IdGen's 160 tensors make AdamW alone
5 under-filled launches (301 us per step on an H200, ~1.2 TB/s; BENCHMARKS.md). Over one buffer per group each is
one launch. The update is elementwise the same: AdamW over a group's buffer is AdamW over its parameters.

How it works: every parameter of a group becomes a view of the group's buffer (each at an offset aligned to
256 bytes, as a tensor of its own would be: Triton and inductor kernels assume 16-byte aligned pointers, and a
packed layout's odd offsets fail with "misaligned address"; the gaps are zeros, with zero gradients, so AdamW
keeps them zero). Backward still gives each parameter its own gradient; :meth:`FlatParameters.gather_grads` copies
them into the buffer's gradient (one multi-tensor copy) and makes each ``p.grad`` the view of it, so clipping
the buffer's gradient is what a reader of ``p.grad`` sees. Checkpoints keep the optimizer state per parameter
(:meth:`FlatParameters.per_parameter_state` / :meth:`FlatParameters.flat_state`), the format of AdamW over the
parameters, so a run resumes with either setting.

The one difference from AdamW over the parameters: a parameter without a gradient would be skipped there and
updated with a zero gradient here (weight decay, moment decay). :meth:`FlatParameters.gather_grads` refuses that
case with an error that names the parameter (use ``trainer.flat_params=false`` for such a model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

ALIGN_BYTES = 256  # each parameter's offset in its buffer: the caching allocator's alignment of a tensor of its own


class FlatParameters:
    """Turns the parameters of ``groups`` (AdamW param groups: dicts with ``params``) of ``model`` into views of
    one buffer per group, in place. The parameters of a group must share device and dtype (ValueError names them).

    Attributes:
        buffers: one ``nn.Parameter`` per group (shape: (n,)), its ``grad`` preallocated; give
            :meth:`optimizer_groups` to the optimizer.
        params, names: the groups' parameters in group order, and their names in ``model``.
    """

    def __init__(self, model: nn.Module, groups: Sequence[Mapping[str, Any]]) -> None:
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups = [dict(g) for g in groups]
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []
        self.buffers: list[nn.Parameter] = []
        self.layout: list[list[tuple[int, int]]] = []  # per group: (offset, numel) of each parameter
        self._grad_views: list[Tensor] = []
        for i, g in enumerate(self.groups):
            params = list(g["params"])
            kinds = {(p.device, p.dtype) for p in params}
            if len(kinds) > 1:
                raise ValueError(
                    f"trainer.flat_params: param group {i} mixes devices/dtypes "
                    f"{sorted(str(k) for k in kinds)} (parameters {[names.get(id(p), '?') for p in params][:8]}); "
                    "one flat buffer needs one of each. Set trainer.flat_params=false for this model")
            align = max(1, ALIGN_BYTES // params[0].element_size()) if params else 1
            spans, end = [], 0
            for p in params:
                spans.append((end, p.numel()))
                end += -(-p.numel() // align) * align
            ref = params[0] if params else torch.empty(0)
            flat = torch.zeros(end, device=ref.device, dtype=ref.dtype)
            _lay_out(params, spans, flat)
            buffer = nn.Parameter(flat)  # the parameters' storage
            buffer.grad = torch.zeros_like(flat)
            self._grad_views += [buffer.grad[o:o + n].view_as(p) for p, (o, n) in zip(params, spans, strict=True)]
            self.params += params
            self.names += [names.get(id(p), f"group {i} parameter {j}") for j, p in enumerate(params)]
            self.buffers.append(buffer)
            self.layout.append(spans)

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """The param groups with each group's buffer as its one parameter (options kept)."""
        return [{**g, "params": [b]} for g, b in zip(self.groups, self.buffers, strict=True)]

    def grads(self) -> list[Tensor]:
        """The buffers' gradients (one per group): what the gradient norm, clipping and AdamW read."""
        return [b.grad for b in self.buffers]

    def gather_grads(self) -> None:
        """Copy each parameter's gradient into its view of the buffer's gradient (one multi-tensor copy; none for a
        gradient that already is the view) and make ``p.grad`` that view. RuntimeError names a parameter that has
        no gradient (see the module docstring)."""
        dst, src = [], []
        for p, name, view in zip(self.params, self.names, self._grad_views, strict=True):
            if p.grad is None:
                raise RuntimeError(
                    f"trainer.flat_params: parameter {name!r} got no gradient in this step; AdamW over its group's "
                    "flat buffer would decay it, AdamW over the parameters skips it. Set trainer.flat_params=false "
                    "for a model with parameters that do not take part in every step")
            if p.grad.data_ptr() != view.data_ptr():
                dst.append(view)
                src.append(p.grad)
        if dst:
            torch._foreach_copy_(dst, src)
        for p, view in zip(self.params, self._grad_views, strict=True):
            if p.grad is not view:
                p.grad = view

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The parameters' gradients set to None, or zeroed in place (the buffers' gradients stay allocated)."""
        if set_to_none:
            for p in self.params:
                p.grad = None
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_zero_(grads)

    def views(self, module: nn.Module) -> list[tuple[Tensor, Tensor]]:
        """Give ``module`` (a copy of the model, e.g. the EMA's) the same layout: its parameters of the same names
        become views of copies of the buffers. Returns (its buffer, the model's buffer) per group."""
        own = dict(module.named_parameters())
        missing = [n for n in self.names if n not in own]
        if missing:
            raise KeyError(f"flat parameters: {missing[:8]} are missing from the module to lay out")
        pairs = []
        k = 0
        for buffer, spans in zip(self.buffers, self.layout, strict=True):
            flat = buffer.detach().clone()
            _lay_out([own[n] for n in self.names[k:k + len(spans)]], spans, flat)
            k += len(spans)
            pairs.append((flat, buffer.detach()))
        return pairs

    # ------------------------------------------------------------------ optimizer state per parameter

    def per_parameter_state(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The state dict of an optimizer over :meth:`optimizer_groups` as that of the same optimizer over the
        groups' parameters (parameter i = ``params[i]``): each buffer-sized state tensor cut into the parameters'
        shapes (copies), other entries (AdamW's ``step``) repeated per parameter."""
        out_state: dict[int, dict[str, Any]] = {}
        groups = []
        k = 0
        for g, spans in enumerate(self.layout):
            saved = state["param_groups"][g]
            ids = list(range(k, k + len(spans)))
            groups.append({**saved, "params": ids})
            buffer_state = state["state"].get(saved["params"][0])
            if buffer_state is not None:
                for i, (o, n) in zip(ids, spans, strict=True):
                    p = self.params[i]
                    out_state[i] = {key: (v[o:o + n].view_as(p).clone() if _is_flat(v, self.buffers[g]) else
                                          (v.clone() if isinstance(v, Tensor) else v))
                                    for key, v in buffer_state.items()}
            k += len(spans)
        return {"state": out_state, "param_groups": groups}

    def flat_state(self, state: Mapping[str, Any], where: str = "the checkpoint") -> dict[str, Any]:
        """The reverse of :meth:`per_parameter_state`: a per-parameter state dict (AdamW over the groups'
        parameters) for the optimizer over the buffers. ValueError (naming ``where``) when a state tensor does not
        have its parameter's size, or the parameters of one group differ in a non-tensor or scalar entry (such
        as AdamW's ``step``: one buffer has one step) or in which of them have state."""
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(self.buffers):
            raise ValueError(f"{where}: optimizer state has {len(saved_groups)} param groups, this run "
                             f"{len(self.buffers)}")
        out_state: dict[int, dict[str, Any]] = {}
        groups = []
        k = 0
        for g, (saved, spans, buffer) in enumerate(zip(saved_groups, self.layout, self.buffers, strict=True)):
            ids = list(saved["params"])
            if len(ids) != len(spans):
                raise ValueError(f"{where}: optimizer param group {g} has {len(ids)} parameters, this run "
                                 f"{len(spans)}")
            groups.append({**saved, "params": [g]})
            entries = [state["state"].get(i) for i in ids]
            have = [e is not None for e in entries]
            if any(have) and not all(have):
                raise ValueError(f"{where}: optimizer group {g} has state for some parameters and not for others "
                                 f"({self.names[k + have.index(False)]!r} has none); one flat buffer needs all or "
                                 "none. Resume with trainer.flat_params=false")
            if all(have) and entries:
                merged: dict[str, Any] = {}
                for key, first in entries[0].items():
                    if isinstance(first, Tensor) and first.dim() > 0:
                        flat = torch.zeros(buffer.numel(), dtype=first.dtype)
                        for j, (e, (o, n)) in enumerate(zip(entries, spans, strict=True)):
                            v = e[key]
                            if v.numel() != n:
                                raise ValueError(
                                    f"{where}: optimizer state {key!r} of parameter {self.names[k + j]!r} has shape "
                                    f"{tuple(v.shape)}, the parameter has shape {tuple(self.params[k + j].shape)}")
                            flat[o:o + n] = v.detach().reshape(-1).to("cpu", first.dtype)
                        merged[key] = flat
                    else:
                        values = [e[key] for e in entries]
                        if not all(_same(v, values[0]) for v in values):
                            raise ValueError(
                                f"{where}: optimizer state {key!r} differs between the parameters of group {g} "
                                f"(e.g. {self.names[k]!r}: {values[0]!r}); one flat buffer has one. Resume with "
                                "trainer.flat_params=false")
                        merged[key] = values[0].clone() if isinstance(values[0], Tensor) else values[0]
                out_state[g] = merged
            k += len(spans)
        return {"state": out_state, "param_groups": groups}


def _lay_out(params: Sequence[Tensor], spans: Sequence[tuple[int, int]], flat: Tensor) -> None:
    """Copy each parameter into ``flat`` at its (offset, numel) span and make it the view there."""
    with torch.no_grad():
        for p, (o, n) in zip(params, spans, strict=True):
            view = flat[o:o + n].view_as(p)
            view.copy_(p)
            p.data = view


def _is_flat(v: Any, buffer: Tensor) -> bool:
    return isinstance(v, Tensor) and v.dim() == 1 and v.numel() == buffer.numel()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b
