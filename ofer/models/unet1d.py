"""The OFER denoiser: a "1D U-Net" over the channels of a FLAME parameter vector.

OFER treats a parameter vector (B, D) as a signal of length 1 with D channels, so every kernel-size-1
convolution of the public code is a Linear layer. We write it as such on (B, C) tensors: no fake length
dimension, no `squeeze()` that breaks at batch size 1.

Structure (OFER public code, `src/models/network/flameAttnNetwork.py`, `Unet`), for widths [w0, w1, ..., wL]:

    x (B, D) -> input projection -> r (B, w0)
    down level l (w_l -> w_{l+1}): ResBlock(w_l) x blocks_per_level (a skip after each; attention after the
        last one, before its skip), then an MLP Linear(w_l, w_l)-SiLU-Linear(w_l, w_{l+1})
    middle: ResBlock(wL), attention, ResBlock(wL)
    up level l (w_{l+1} -> w_l): MLP Linear(w_{l+1}, w_{l+1})-SiLU-Linear(w_{l+1}, w_l), then
        ResBlock(2 w_l -> w_l) x blocks_per_level, each fed concat(x, skip), then attention
    final: ResBlock(concat(x, r): 2 w0 -> w0), attention, Linear(w0, D) -> predicted noise (B, D)

Conditioning (time and image feature) enters only through FiLM in the ResBlocks, never by attention.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ofer.models import resblock_kernel, token_attention_kernel

__all__ = ["ATTENTION_IMPLS", "Denoiser", "FiLMResBlock", "PaddedGroupNorm", "TokenSelfAttention", "RMSNorm",
           "sinusoidal_embedding"]

ATTENTION_IMPLS = ("auto", "math", "reduce", "sdpa", "triton")


def sinusoidal_embedding(t: torch.Tensor, dim: int, *, theta: float = 10000.0) -> torch.Tensor:
    """Transformer-style sinusoidal embedding of diffusion timesteps.

    Args:
        t: timesteps, shape (B,), any real or integer dtype.
        dim: embedding size (even).
        theta: largest wavelength factor.

    Returns:
        (B, dim) float32: [sin(t f_0..f_{h-1}), cos(t f_0..f_{h-1})], f_i = theta^(-i / (h - 1)), h = dim / 2.
    """
    # OFER: `SinusoidalPosEmb` of the public code (frequencies spaced by log(theta) / (half - 1)).
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(theta) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # (B, half)
    return torch.cat((args.sin(), args.cos()), dim=-1)


class RMSNorm(nn.Module):
    """RMS normalisation over the channel dimension with a learned gain (public code's `RMSNorm`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C) -> (B, C) in x's dtype (the norm itself in float32 under autocast, see FiLMResBlock)."""
        return (F.normalize(x, dim=-1) * self.gain * self.scale).to(x.dtype)


class TokenSelfAttention(nn.Module):
    """Pre-norm residual self-attention over `tokens` learned projections of one vector.

    OFER's attention: the (B, C) vector is projected by `tokens` separate maps into `tokens` query/key/value
    triples (the public code keeps these 16 maps in a plain Python list, so they are neither trained nor saved
    and are re-drawn at random on every load). Here the maps are one registered Linear(C, tokens * 3 * H * Dh)
    that yields all tokens in one matmul; its weight is, row block by row block, exactly the stack of the 16
    public maps. The H-head attention output (B, H, T, Dh) is mapped back to C channels per token and the
    tokens are mixed into one vector by a learned Linear(T, 1), as in the public code.
    """

    def __init__(self, dim: int, *, heads: int, head_dim: int, tokens: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.tokens = heads, head_dim, tokens
        self.impl = "auto"  # see Denoiser.set_attention_impl
        # the Triton kernels take power-of-two token counts (>= 16) and head sizes ("auto" uses PyTorch otherwise)
        self._kernel_shape = not (tokens & (tokens - 1) or head_dim & (head_dim - 1)) and tokens >= 16
        hidden = heads * head_dim
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Linear(dim, tokens * 3 * hidden, bias=False)
        self.to_out = nn.Linear(hidden, dim)
        self.token_mix = nn.Linear(tokens, 1)
        self.register_buffer("bias_mask", None, persistent=False)  # Denoiser.padded: 0 on the padding channels
        # to_qkv's weight as the projecting kernel reads it, and that layout (`prepare_projection`; inference copies)
        self.register_buffer("qkv_prepared", None, persistent=False)
        self.qkv_prepared_layout: tuple[int, ...] | None = None
        self.keeps_prepared_projection = False  # set by prepare_projection: prepare again on load, move or cast
        self.register_load_state_dict_post_hook(_reprepare_projection)

    def forward(self, x: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C) -> x + attention(norm(x)), (B, C); with tail (B, C'): that output followed by tail,
        (B, C + C') (`Denoiser.trunk`: the last attention block's output and the input projection, written by the
        output kernel when `token_attention_kernel.CAT_OUTPUT` is on)."""
        b = x.shape[0]
        xn = self.norm(x)
        w = self.token_mix.weight[0]  # (T,)
        impl = self.impl
        grad = torch.is_grad_enabled() and (xn.requires_grad or w.requires_grad or self.to_qkv.weight.requires_grad)
        if impl == "auto":  # measured choices, see Denoiser.set_attention_impl
            if xn.is_cuda and self._kernel_shape and token_attention_kernel.available(xn, self.head_dim):
                impl = "triton"
            elif torch.compiler.is_compiling() and not grad:
                impl = "reduce"
            else:
                impl = "math"
        # to_out per token followed by the token mix is linear in the attention output o, so mix the T tokens
        # first (a T-times smaller matmul): sum_t w_t (W o_t + b) + c = W (sum_t w_t o_t) + b sum_t w_t + c.
        # The kernels return the pooled output in the autocast dtype when autocast is on: the float32 value
        # rounded to nearest once, as the cast in front of to_out would, without that cast's extra kernel.
        dev = xn.device.type
        low = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        # training: the autocast dtype decides (without autocast it counts as float32 training)
        if (impl == "triton" and self.tokens >= 16
                and token_attention_kernel.projects(xn.shape[1], (low or torch.float32) if grad else None,
                                                    xn.device)):
            # Narrow input: the projection runs inside the kernel, so the (B, T * 3 * H * Dh) q/k/v tensor (384x
            # wider than a 16-channel input) is never written and read back. Same dtype as the Linear would use.
            # In training only in bf16/fp16 up to `project_training_max_width` (32; 16 on an H200) channels: its
            # backward recomputes q/k/v per 16 rows, re-reading the projection weights each time, and at 56
            # channels it is slower than the separate projection (H100, BENCHMARKS.md "ninth").
            dt = low or xn.dtype
            layout = self.qkv_prepared_layout
            pooled = token_attention_kernel.token_attention_project_pool(
                xn.to(dt).contiguous(), self.to_qkv.weight.to(dt).contiguous(), w, self.tokens, self.heads,
                self.head_dim, low, self.qkv_prepared, None if layout is None else list(layout))
        elif impl == "triton":
            pooled = token_attention_kernel.token_attention_pool(self.to_qkv(xn), w, self.tokens, self.heads,
                                                                 self.head_dim, low)
        elif impl == "reduce":
            qkv = self.to_qkv(xn)
            pooled = self._pooled_by_reductions(qkv.view(b, self.tokens, 3, self.heads, self.head_dim), w)
        else:
            qkv = self.to_qkv(xn)
            q, k, v = qkv.view(b, self.tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            if impl == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh); scale Dh^-0.5 as the public code
            else:
                w_att = (q @ k.transpose(-1, -2) * self.head_dim**-0.5).softmax(dim=-1)  # (B, H, T, T)
                o = w_att.to(v.dtype) @ v
            pooled = torch.einsum("bhtd,t->bhd", o, w.to(o.dtype))
        bias = self.to_out.bias * self.token_mix.weight.sum() + self.token_mix.bias
        if self.bias_mask is not None:  # keep a padded copy's padding channels at exactly zero
            bias = bias * self.bias_mask
        pooled = pooled.reshape(b, self.heads * self.head_dim)
        wout = self.to_out.weight
        if (impl == "triton" and token_attention_kernel.OUTPUT_KERNEL and low is not None and x.dtype == low
                and pooled.dtype == low and x.stride(1) == 1 and not (torch.is_grad_enabled() and any(
                    t.requires_grad for t in (x, pooled, bias, wout)))):
            # sampling in bf16/fp16: the output Linear, its bias and the residual add as one kernel (rounded once),
            # which also writes the tail after it when CAT_OUTPUT is on
            fuse = tail is not None and _fusable_tail(tail, low)
            out = token_attention_kernel.attention_output(pooled.contiguous(), wout.to(low).contiguous(), bias, x,
                                                          tail if fuse else None)
            if fuse or tail is None:
                return out
        else:
            out = x + F.linear(pooled, wout, bias)
        return out if tail is None else torch.cat((out, tail), dim=-1)

    @torch.no_grad()
    def prepare_projection(self) -> None:
        """Store to_qkv's weight in the layout that the projecting kernel (`token_attention_project_pool`) reads
        for this block's input width, under the kernel's current settings and for the weight's dtype and device,
        so that sampling calls do not lay it out again in every step (one to three small copies per call, 2.6%
        of a compiled ExpGen step on an H100). For inference copies (`Denoiser.autocast_copy`), whose weights do
        not change afterwards: loading a state dict prepares it again, but an in-place change of
        `to_qkv.weight` is not seen (prepare again after one). A call whose settings, dtype or device differ
        from the prepared layout lays out the weight itself, as without it. Nothing is stored where the kernel
        does not project (wide inputs, other attention shapes, no Triton or CPU without the interpreter); moving or
        casting the module (`.cuda()`, `.to(...)`, `.half()`) prepares it again for the new device and dtype."""
        self.keeps_prepared_projection = True
        wq = self.to_qkv.weight
        if not (self._kernel_shape and token_attention_kernel.projects(wq.shape[1])
                and token_attention_kernel.available(wq, self.head_dim)):
            self.qkv_prepared, self.qkv_prepared_layout = None, None
            return
        layout = token_attention_kernel.project_layout(wq.shape[1], self.tokens, self.heads, self.head_dim,
                                                       wq.dtype, wq.device)
        self.qkv_prepared = token_attention_kernel.prepare_project_weight(wq.detach().contiguous(), self.tokens,
                                                                          self.heads, self.head_dim, layout)
        self.qkv_prepared_layout = tuple(layout)

    def _apply(self, fn: Any, recurse: bool = True) -> "TokenSelfAttention":
        out = super()._apply(fn, recurse)
        if self.keeps_prepared_projection:  # a moved or cast inference copy: its kernel's layout may differ now
            self.prepare_projection()
        return out

    def _pooled_by_reductions(self, qkv: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_t w_t attention(q, k, v)_t written as broadcast products and sums over (B, T, 3, H, Dh) views.

        The token mix moves in front of the value product: sum_t w_t sum_u a_tu v_u = sum_u c_u v_u with
        c_u = sum_t w_t a_tu. Under torch.compile every sum becomes one fused reduction kernel that reads q, k, v
        where they lie, instead of three permuting copies and two batched 16 x 16 matmuls (which cuBLAS runs
        at a fraction of the memory bandwidth: 45% of an IdGen sampling step on an H200, BENCHMARKS.md). In
        eager mode the products are materialised (T*T*H*Dh floats per row), so "auto" uses it only when
        compiling for sampling without the Triton kernel. Accumulates in float32. Returns (B, H, Dh).
        """
        q, k, v = (qkv[:, :, i].float() for i in range(3))  # (B, T, H, Dh) views
        scores = (q[:, :, None] * k[:, None]).sum(-1) * self.head_dim**-0.5  # (B, T, U, H)
        att = scores.softmax(dim=2)
        c = (att * w.float()[None, :, None, None]).sum(1)  # (B, U, H)
        return (c[..., None] * v).sum(1)  # (B, H, Dh)


def _reprepare_projection(module: TokenSelfAttention, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: a prepared projection weight follows newly loaded weights."""
    if module.keeps_prepared_projection:
        module.prepare_projection()


class PaddedGroupNorm(nn.Module):
    """GroupNorm with one group over the first `channels` of a (B, padded) tensor whose other channels are zero
    (a `Denoiser.padded` copy): the statistics are those of the true channels, the padding stays zero
    (zero weight and bias there). Computes in float32 and returns float32, as nn.GroupNorm under autocast.

    The statistics are sums over all padded channels of values multiplied by a 0/1 mask of the true ones, so no
    gradient reaches the padding channels through them: trained through a padded copy, every padding weight,
    bias, gain and FiLM row gets an exactly zero gradient and stays zero under AdamW (see `Denoiser.padded`).
    Masked full-width sums rather than a slice of the true channels: the reductions then run over the same
    padded rows as the normalisation, and torch.compile fuses statistics and normalisation into one kernel that
    reads its input once (with the slice it made a separate statistics kernel per norm, BENCHMARKS.md)."""

    def __init__(self, channels: int, padded: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels, self.padded, self.eps = channels, padded, eps
        self.weight = nn.Parameter(torch.zeros(padded))
        self.bias = nn.Parameter(torch.zeros(padded))
        self.register_buffer("mask", (torch.arange(padded) < channels).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        mask = self.mask.to(xf.dtype)
        mean = (xf * mask).sum(-1, keepdim=True) / self.channels
        var = ((xf - mean) * mask).square().sum(-1, keepdim=True) / self.channels
        return (xf - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


class FiLMResBlock(nn.Module):
    """Residual block: Linear -> GroupNorm -> FiLM -> SiLU -> Linear -> GroupNorm -> SiLU, plus a skip.

    OFER: `ResnetBlock` of the public code; FiLM (x * (1 + scale) + shift) acts in the first of the two
    layers only, and the skip is a Linear when the width changes. The FiLM projection itself lives in
    `Denoiser.film` (one fused matmul for all blocks); this block receives its (scale, shift).
    """

    def __init__(self, dim_in: int, dim_out: int, *, groups: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim_in, dim_out)
        self.norm1 = nn.GroupNorm(groups, dim_out)
        self.lin2 = nn.Linear(dim_out, dim_out)
        self.norm2 = nn.GroupNorm(groups, dim_out)
        self.skip = nn.Linear(dim_in, dim_out) if dim_in != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                tail: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, dim_in); scale, shift: (B, dim_out), or (G, dim_out) with G dividing B, where row g modulates
        the B / G consecutive rows g * B / G, ..., (g + 1) * B / G - 1 (samples of one condition) -> (B, dim_out);
        with tail (B, dim_out): the output followed by tail, (B, 2 dim_out) (`Denoiser.trunk` with
        `token_attention_kernel.CAT_OUTPUT`: the kernel paths write both in their last kernel).

        In sampling on CUDA under bf16/fp16 autocast with one norm group, each half of the block is one Triton
        kernel (`ofer.models.resblock_kernel`, same function and roundings; switch: `resblock_kernel.ENABLED`).
        Inside torch.compile that holds for blocks of at most `resblock_kernel.COMPILED_MAX_WIDTH` channels; wider
        ones keep cuBLAS for the Linears and run each norm with what surrounds it as one kernel
        (`resblock_kernel.film_norm_in` / `film_norm_out`; switch: `resblock_kernel.NORM_KERNELS`)."""
        dt = self._kernel_dtype(x, scale)
        if dt is not None:
            fuse = (tail is not None and tail.shape == (x.shape[0], self.lin1.out_features)
                    and _fusable_tail(tail, dt))
            if torch.compiler.is_compiling() and self.lin1.out_features > resblock_kernel.COMPILED_MAX_WIDTH:
                out = self._norm_kernel_forward(x.to(dt), scale, shift, dt, tail if fuse else None)
            else:
                out = self._kernel_forward(x.to(dt), scale, shift, dt, tail if fuse else None)
            return out if fuse or tail is None else torch.cat((out, tail), dim=-1)
        out = self._torch_forward(x, scale, shift)
        return out if tail is None else torch.cat((out, tail), dim=-1)

    def _torch_forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """forward() in PyTorch (training, CPU, kernels off)."""
        h = self.lin1(x)
        # Under autocast GroupNorm computes (and returns) float32; its output goes back to the Linear's dtype
        # (bf16), so FiLM, SiLU and every tensor of the backward stay bf16 like the rest of the trunk instead of
        # float32 (half the memory traffic of these fused kernels); the residual stream is then bf16 too. Without
        # autocast this is a no-op.
        hn = self.norm1(h).to(h.dtype)
        if scale.shape[0] != h.shape[0]:  # grouped FiLM rows: broadcast over each group's views, nothing copied
            g = scale.shape[0]
            hn = hn.view(g, -1, hn.shape[1]) * (1 + scale[:, None]) + shift[:, None]
            h = F.silu(hn.view(h.shape))
        else:
            h = F.silu(hn * (1 + scale) + shift)
        h = self.lin2(h)
        h = F.silu(self.norm2(h).to(h.dtype))
        return h + self.skip(x)

    def _kernel_dtype(self, x: torch.Tensor, scale: torch.Tensor) -> torch.dtype | None:
        """The compute dtype of the kernel path, or None where the block runs its PyTorch form: kernels switched
        off or unavailable, a block wider than `resblock_kernel.COMPILED_MAX_WIDTH` inside torch.compile with
        `resblock_kernel.NORM_KERNELS` off (on: the caller runs `_norm_kernel_forward` there), a
        gradient needed, a norm with several groups or no affine, or (on CUDA) no bf16/fp16 autocast. Static
        properties only (torch.compile traces it without a graph break)."""
        if not (resblock_kernel.ENABLED and resblock_kernel.available(x)):
            return None
        if (torch.compiler.is_compiling() and self.lin1.out_features > resblock_kernel.COMPILED_MAX_WIDTH
                and not resblock_kernel.NORM_KERNELS):
            return None  # inductor's kernels around cuBLAS (measured, see COMPILED_MAX_WIDTH and NORM_KERNELS)
        if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad or self.lin1.weight.requires_grad):
            return None
        for norm in (self.norm1, self.norm2):
            if not isinstance(norm, PaddedGroupNorm) and (norm.num_groups != 1 or norm.weight is None):
                return None
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        if x.is_cuda and dt not in (torch.bfloat16, torch.float16):
            return None
        return dt

    def _kernel_operands(self, scale: torch.Tensor,
                         shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """What both kernel paths pass the kernels: scale and shift in float32 with contiguous columns and one
        row stride, and the true widths of norm1 and norm2."""
        if scale.stride(1) != 1 or shift.stride() != scale.stride():
            scale, shift = scale.contiguous(), shift.contiguous()
        c1, c2 = (n.channels if isinstance(n, PaddedGroupNorm) else n.num_channels for n in (self.norm1, self.norm2))
        return scale.float(), shift.float(), c1, c2

    def _kernel_forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dt: torch.dtype,
                        tail: torch.Tensor | None = None) -> torch.Tensor:
        """forward() as two Triton kernels (`resblock_kernel.film_block_in` / `film_block_out`) computing in dt; the
        second also writes the tail after the output."""
        if x.stride(1) != 1:
            x = x.contiguous()
        scale, shift, c1, c2 = self._kernel_operands(scale, shift)
        n1, n2 = self.norm1, self.norm2
        a = resblock_kernel.film_block_in(
            x, self.lin1.weight.to(dt).contiguous(), self.lin1.bias.to(dt), n1.weight.float(), n1.bias.float(),
            scale, shift, c1, n1.eps)
        skip = self.skip if isinstance(self.skip, nn.Linear) else None
        return resblock_kernel.film_block_out(
            a, x, self.lin2.weight.to(dt).contiguous(), self.lin2.bias.to(dt), n2.weight.float(), n2.bias.float(),
            None if skip is None else skip.weight.to(dt).contiguous(), None if skip is None else skip.bias.to(dt),
            c2, n2.eps, tail)

    def _norm_kernel_forward(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dt: torch.dtype,
                             tail: torch.Tensor | None = None) -> torch.Tensor:
        """forward() with the Linears as matmuls in dt (cuBLAS) and each norm, with the FiLM and SiLU or the SiLU
        and the residual add around it, as one Triton kernel (`resblock_kernel.film_norm_in` / `film_norm_out`):
        the same function and roundings as `_kernel_forward`. A skip Linear reads the same input as lin1, so the
        two are one matmul with both weights stacked (the input, twice as wide as the output in these blocks,
        read once; the kernels take the two halves of its output as row-strided views). The last kernel also
        writes the tail after the output."""
        scale, shift, c1, c2 = self._kernel_operands(scale, shift)
        n1, n2 = self.norm1, self.norm2
        if isinstance(self.skip, nn.Linear):
            n = self.lin1.out_features
            w = torch.cat((self.lin1.weight, self.skip.weight)).to(dt)
            hs = F.linear(x, w, torch.cat((self.lin1.bias, self.skip.bias)).to(dt))
            h, skip = hs[:, :n], hs[:, n:]
        else:
            h, skip = F.linear(x, self.lin1.weight.to(dt), self.lin1.bias.to(dt)), x
        a = resblock_kernel.film_norm_in(h, n1.weight.float(), n1.bias.float(), scale, shift, c1, n1.eps)
        h = F.linear(a, self.lin2.weight.to(dt), self.lin2.bias.to(dt))
        if skip.stride(1) != 1:
            skip = skip.contiguous()
        return resblock_kernel.film_norm_out(h, skip, n2.weight.float(), n2.bias.float(), c2, n2.eps, tail)


def paddable(model: nn.Module) -> bool:
    """Whether `model.padded()` applies: a model with the method and one norm group (`config["groups"] == 1`) that
    is not itself a padded copy. GraphedSampler and the generator jobs' `pad_widths` pad exactly these."""
    return (callable(getattr(model, "padded", None)) and getattr(model, "config", {}).get("groups") == 1
            and not getattr(model, "is_padded", False))


def _true_positions(ix: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """An index of a padded parameter's true entries (rows, or rows x columns) from `Denoiser._true_index`, for
    reading them (`p[pos]`, the original shape) or writing them (`p[pos] = original`)."""
    ix = tuple(i.to(device) for i in ix)
    return ix if len(ix) == 1 else (ix[0][:, None], ix[1][None, :])


def _state_dict_to_original(module: "Denoiser", state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State-dict post-hook of `Denoiser.padded(original_state_dict=True)`: the original model's layout."""
    ours = {name: state_dict[prefix + name] for name in module._true_index if prefix + name in state_dict}
    for name, v in module.unpad(ours).items():
        state_dict[prefix + name] = v


def _state_dict_from_original(module: "Denoiser", state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook of `Denoiser.padded(original_state_dict=True)`: entries in the original model's shapes get
    their zero padding back; entries of the padded shapes (or of neither shape: load_state_dict then reports a
    size mismatch naming the key) pass unchanged."""
    own = dict(module.named_parameters())
    for name, ix in module._true_index.items():
        key, p = prefix + name, own.get(name)
        v = state_dict.get(key)
        if p is None or not isinstance(v, torch.Tensor) or v.shape != tuple(len(i) for i in ix):
            continue
        full = torch.zeros(p.shape, dtype=v.dtype, device=v.device)
        full[_true_positions(ix, v.device)] = v
        state_dict[key] = full


def _fusable_tail(tail: torch.Tensor, low: torch.dtype) -> bool:
    """Whether `token_attention_kernel.attention_output` may write `tail` after its output: CAT_OUTPUT on, tail in
    the compute dtype with contiguous columns, no gradient needed for it (static properties only)."""
    return (token_attention_kernel.CAT_OUTPUT and tail.dtype == low and tail.stride(1) == 1
            and not (torch.is_grad_enabled() and tail.requires_grad))


class _JointLinear(torch.autograd.Function):
    """`F.linear(torch.cat((a, b), -1), w)` (no bias) whose backward computes the input gradient only for the
    parts that need one: autograd through the cat would multiply the gradient by all of w and slice, and for the
    FiLM matmul the condition's part (half of IdGen's columns, two thirds of ExpGen's) is data. a, b and w in one
    dtype (the caller casts them as autocast would)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        h = torch.cat((a, b), dim=-1)
        ctx.save_for_backward(h, w)
        ctx.split = a.shape[-1]
        return F.linear(h, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, w = ctx.saved_tensors
        k = ctx.split
        da = grad @ w[:, :k] if ctx.needs_input_grad[0] else None
        db = grad @ w[:, k:] if ctx.needs_input_grad[1] else None
        dw = grad.transpose(0, 1) @ h if ctx.needs_input_grad[2] else None
        return da, db, dw


def _width_mlp(dim_in: int, dim_out: int) -> nn.Sequential:
    # OFER: `Downsample` / `Upsample` of the public code: Linear(in, in) -> SiLU -> Linear(in, out).
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.SiLU(), nn.Linear(dim_in, dim_out))


class Denoiser(nn.Module):
    """OFER's noise predictor eps(x_t, t, cond) for IdGen (D=300) and ExpGen (D=53).

    Paper settings: IdGen dim=300, widths (300, 50, 10), cond_dim=512 (ArcFace); ExpGen dim=53,
    widths (53, 25, 10), cond_dim=1024 (ArcFace (+) FaRL). With attention both have the parameter counts
    of the public code including its 16 unregistered projections: 12,452,394 and 3,161,209.

    Args:
        dim: size D of the parameter vector.
        cond_dim: size of the conditioning vector.
        widths: channel widths of the U-Net levels, widest first.
        time_dim: size of the sinusoidal time embedding and of its MLP.
        attention: use the token self-attention blocks (OFER: on). Off gives a pure FiLM-MLP U-Net.
        attn_heads, attn_head_dim, attn_tokens: attention shape (OFER: 4 heads x 32 over 16 tokens).
        groups: GroupNorm groups (OFER: 1, i.e. normalise over all channels); must divide every width.
        blocks_per_level: ResBlocks per down and per up level (OFER: 2).
        cond_scale: constant factor on the condition before the FiLM (OFER: 1). An L2-normalised 512-d ArcFace
            feature has entries of ~0.04 against ~0.5 for the time embedding, so under Adam (equal step size
            per weight) the condition's FiLM weights move the output ~20x slower than the time weights;
            sqrt(cond_dim) gives the condition unit RMS. The same function class, reparametrised.
    """

    def __init__(
        self,
        *,
        dim: int,
        cond_dim: int,
        widths: Sequence[int] = (300, 50, 10),
        time_dim: int = 512,
        attention: bool = True,
        attn_heads: int = 4,
        attn_head_dim: int = 32,
        attn_tokens: int = 16,
        groups: int = 1,
        blocks_per_level: int = 2,
        cond_scale: float = 1.0,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if dim < 1 or cond_dim < 1:
            raise ValueError(f"Denoiser: dim and cond_dim must be >= 1, got dim={dim}, cond_dim={cond_dim}")
        if len(widths) < 2 or min(widths) < 1:
            raise ValueError(f"Denoiser: widths must list >= 2 positive widths (e.g. [300, 50, 10]), got {widths}")
        if groups < 1 or any(w % groups for w in widths):
            raise ValueError(f"Denoiser: groups={groups} must be >= 1 and divide every width in {widths}")
        if time_dim < 4 or time_dim % 2:
            raise ValueError(f"Denoiser: time_dim must be an even number >= 4, got {time_dim}")
        if blocks_per_level < 1:
            raise ValueError(f"Denoiser: blocks_per_level must be >= 1, got {blocks_per_level}")
        if not (math.isfinite(cond_scale) and cond_scale > 0):
            raise ValueError(f"Denoiser: cond_scale must be a finite number > 0, got {cond_scale}")
        if attention and min(attn_heads, attn_head_dim, attn_tokens) < 1:
            raise ValueError(
                f"Denoiser: attn_heads, attn_head_dim, attn_tokens must be >= 1, got "
                f"{attn_heads}, {attn_head_dim}, {attn_tokens}"
            )
        self.dim, self.cond_dim, self.widths, self.time_dim = dim, cond_dim, widths, time_dim
        self.config = dict(dim=dim, cond_dim=cond_dim, widths=widths, time_dim=time_dim, attention=attention,
                           attn_heads=attn_heads, attn_head_dim=attn_head_dim, attn_tokens=attn_tokens,
                           groups=groups, blocks_per_level=blocks_per_level, cond_scale=cond_scale)
        self.cond_scale = float(cond_scale)

        def attn(w: int) -> nn.Module:
            if not attention:
                return nn.Identity()
            return TokenSelfAttention(w, heads=attn_heads, head_dim=attn_head_dim, tokens=attn_tokens)

        # OFER: sinusoidal 512 -> Linear -> GELU -> Linear.
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, time_dim), nn.GELU(), nn.Linear(time_dim, time_dim))
        self.in_proj = nn.Linear(dim, widths[0])

        film_widths: list[int] = []  # output width of every FiLM'd block, in forward order

        def block(w_in: int, w_out: int) -> FiLMResBlock:
            film_widths.append(w_out)
            return FiLMResBlock(w_in, w_out, groups=groups)

        levels = list(zip(widths[:-1], widths[1:]))
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.down_mlp = nn.ModuleList()
        for w_in, w_out in levels:
            self.down_blocks.append(nn.ModuleList([block(w_in, w_in) for _ in range(blocks_per_level)]))
            self.down_attn.append(attn(w_in))
            self.down_mlp.append(_width_mlp(w_in, w_out))
        w_mid = widths[-1]
        self.mid_block1 = block(w_mid, w_mid)
        self.mid_attn = attn(w_mid)
        self.mid_block2 = block(w_mid, w_mid)
        self.up_mlp = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        for w_shallow, w_deep in reversed(levels):
            self.up_mlp.append(_width_mlp(w_deep, w_shallow))
            self.up_blocks.append(nn.ModuleList([block(2 * w_shallow, w_shallow) for _ in range(blocks_per_level)]))
            self.up_attn.append(attn(w_shallow))
        self.final_block = block(2 * widths[0], widths[0])
        self.final_attn = attn(widths[0])
        self.out_proj = nn.Linear(widths[0], dim)

        # Our choice: the FiLM maps of all blocks are one Linear (same parameters as one per block, as in the
        # public code) so a forward does one matmul for all (scale, shift) pairs instead of one per block.
        # Its input is SiLU(concat(time embedding, cond)) (OFER: SiLU -> Linear on that concat).
        self._film_sizes = [2 * w for w in film_widths]
        self.film = nn.Linear(time_dim + cond_dim, sum(self._film_sizes))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """(Re-)initialise all weights.

        Linear layers keep PyTorch's default init (as the public code) and GroupNorm/RMSNorm start at unit
        gain. Two special cases (DiT's adaLN-Zero recipe, our choice):
        * the FiLM projection is zero, so every block starts unmodulated (scale + 1 = 1, shift = 0): time and
          image feature are phased in by training instead of multiplying activations by random gains at step 0;
        * the output layer is zero, so the first prediction is eps = 0 and training starts from the trivial
          predictor instead of a random one whose error feeds back through the whole sampler.
        Consequence: at initialisation the gradient reaching everything before the output layer (and the
        gradient w.r.t. cond) is exactly zero; the first optimiser step moves only the output layer, the
        second one reaches the rest of the network.
        """
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.gain)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predict the noise in x.

        Args:
            x: noisy parameters x_t, shape (B, dim).
            t: integer timesteps, shape (B,), int64.
            cond: conditioning feature, shape (B, cond_dim).

        Returns:
            predicted noise, shape (B, dim).
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"Denoiser.forward: x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"Denoiser.forward: t must have shape ({b},), got {tuple(t.shape)}")
        if cond.shape != (b, self.cond_dim):
            raise ValueError(f"Denoiser.forward: cond must have shape ({b}, {self.cond_dim}), got {tuple(cond.shape)}")

        return self.trunk(x, self.film_rows(t, cond))

    def film_rows(self, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Every block's (scale, shift) for each row, `time_film(t) + condition_film(cond)`, as the public design's
        single FiLM matmul on concat(SiLU(time embedding), SiLU(cond)): (B,), (B, cond_dim) -> (B, F).

        One matmul of depth time_dim + cond_dim writes the (B, F) rows once, where the split form writes two and
        its readers read both; its backward (`_JointLinear`) multiplies the gradient only by the weight columns of
        inputs that need one (the time part; the condition is data). The bias is added after the matmul, where
        torch.compile fuses it into the kernels that read the rows. With inductor's default options the rows get
        a padded stride (IdGen's 3,552 bf16 values, 7,104 bytes, padded to 7,168: a multiple of 128), and ATen
        fuses a bias into cuBLAS only for contiguous outputs: it first copied the bias into all B rows (0.37 ms of
        a 25 ms IdGen step on an H100, BENCHMARKS.md "twelfth"). The trainer's options keep the rows contiguous;
        there the separate add costs nothing either."""
        w = self.film.weight
        t_emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(w.dtype))  # (B, time_dim)
        c = cond.to(w.dtype)
        if self.cond_scale != 1.0:
            c = c * self.cond_scale
        dev = t_emb.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype  # as F.linear would
        y = _JointLinear.apply(F.silu(t_emb).to(dt), F.silu(c).to(dt), w.to(dt))
        return y + self.film.bias.to(y.dtype)

    # The FiLM input is SiLU(concat(time embedding, cond)) = concat(SiLU(time), SiLU(cond)), so the FiLM matmul
    # splits exactly into a time part and a condition part: film = W_t SiLU(t_emb) + W_c SiLU(cond) + b. A
    # sampler computes the condition part once per chain and the time part once per step (one row), instead
    # of both for every row at every step: a third of IdGen's and half of ExpGen's per-step FLOPs.
    def set_attention_impl(self, impl: str) -> "Denoiser":
        """Kernel of the 16-token attention; every choice computes the same function:

        * "auto" (default), the fastest measured choice: "triton" on CUDA when Triton is installed (sampling and
          training); otherwise "reduce" inside torch.compile without autograd, else "math";
        * "math": explicit matmul-softmax-matmul on permuted (B, H, T, Dh) copies;
        * "reduce": broadcast products and sums over views of the q/k/v tensor, with the token mix applied to
          the attention weights before the value product; one fused kernel per reduction when compiled
          (eager: memory-hungry, T*T*H*Dh floats per row);
        * "triton": one Triton kernel after the q/k/v projection (`ofer.models.token_attention_kernel`), and
          for inputs of at most `token_attention_kernel.PROJECT_MAX_WIDTH` (64) channels one kernel that also does
          the projection (sampling only: with autograd every block takes the separate projection; both ops have
          Triton backwards, but the projecting one's made training slower); sampling in bf16/fp16 also ends each
          block with `token_attention_kernel.attention_output` (output map, bias and residual add in one
          kernel, rounded once);
        * "sdpa": PyTorch's fused attention.
        Measured on an H200 at 25,600 rows, ms per DDIM sampling step IdGen / ExpGen (BENCHMARKS.md): eager
        math 15.7 / 11.6, eager triton 8.1 / 4.2; compiled math 9.3 / 7.3, compiled reduce 6.6-7.0 / 4.9-5.0,
        compiled triton 4.4 / 2.7 (at 51,200 rows, with the projection inside the kernel for the narrow blocks:
        7.46 / 3.61 instead of 7.78 / 4.16). Compiled bf16 training of IdGen at 65,536 rows: "triton" 2.18 M
        samples/s, "math" 1.04 M (same run), "reduce" 0.86 M (another run). SDPA dispatches to cuDNN's flash
        kernel, which takes 57% of an eager IdGen step for these 16-token sequences and fails in backward at
        65,536 rows and inside CUDA-graph capture.
        Returns self."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {list(ATTENTION_IMPLS)}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, TokenSelfAttention):
                m.impl = impl
        return self

    def time_film(self, t: torch.Tensor) -> torch.Tensor:
        """Time part of every block's (scale, shift): (B,) timesteps -> (B, F)."""
        t_emb = self.time_mlp(sinusoidal_embedding(t, self.time_dim).to(self.film.weight.dtype))  # (B, time_dim)
        return F.linear(F.silu(t_emb), self.film.weight[:, : self.time_dim])

    def condition_film(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition part (with the bias) of every block's (scale, shift): (B, cond_dim) -> (B, F)."""
        w = self.film.weight[:, self.time_dim:]
        c = cond.to(w.dtype)
        if self.cond_scale != 1.0:
            c = c * self.cond_scale
        return F.linear(F.silu(c), w, self.film.bias)

    def trunk(self, x: torch.Tensor, film: torch.Tensor) -> torch.Tensor:
        """The U-Net given the summed FiLM parameters `time_film(t) + condition_film(cond)`: (B, dim), (B, F)
        -> predicted noise (B, dim).

        `film` may also have G rows with G dividing B: row g then applies to the B / G consecutive rows
        g * B / G, ..., (g + 1) * B / G - 1 of x, the layout of `num_samples` samples per condition. A sampler
        passes one FiLM row per condition instead of one per sample: at 51,200 rows of IdGen a per-row float32
        FiLM tensor (rows, 3,440) is 0.7 GB, read by every step.
        """
        if film.ndim != 2 or film.shape[1] != sum(self._film_sizes) or film.shape[0] < 1 or x.shape[0] % film.shape[0]:
            raise ValueError(f"Denoiser.trunk: film must have shape (G, {sum(self._film_sizes)}) with G dividing "
                             f"the {x.shape[0]} rows of x, got {tuple(film.shape)}")
        # every block's scale and shift, (B, w_out) each, in one split: its backward is one concatenation of all
        # the pieces, which inductor writes piece by piece from the kernels computing them; a split per block
        # then a chunk into scale and shift made each block's backward a two-input pointwise cat of its own
        films = iter(film.split([s // 2 for s in self._film_sizes for _ in range(2)], dim=-1))
        cat_in_kernels = self._cat_in_kernels(x)

        def run(block: FiLMResBlock, h: torch.Tensor, tail: torch.Tensor | None = None) -> torch.Tensor:
            scale, shift = next(films), next(films)
            if tail is None:
                return block(h, scale, shift)
            if cat_in_kernels:
                return block(h, scale, shift, tail)  # the block's output followed by tail, written by its kernel
            return torch.cat((block(h, scale, shift), tail), dim=-1)

        h = self.in_proj(x)
        r = h
        skips: list[torch.Tensor] = []
        for blocks, attn, down in zip(self.down_blocks, self.down_attn, self.down_mlp):
            for i, blk in enumerate(blocks):
                h = run(blk, h)
                if i == len(blocks) - 1:
                    h = attn(h)
                skips.append(h)
            h = down(h)
        h = run(self.mid_block1, h)
        h = self.mid_attn(h)
        h = run(self.mid_block2, h)
        last = len(self.up_mlp) - 1
        for i, (up, blocks, attn) in enumerate(zip(self.up_mlp, self.up_blocks, self.up_attn)):
            h = self._up_concat(up, h, skips.pop(), cat_in_kernels)
            for j, blk in enumerate(blocks):  # each block's output with the next skip: the next block's input
                h = run(blk, h, skips.pop() if j + 1 < len(blocks) else None)
            if i < last:
                h = attn(h)
            elif cat_in_kernels and isinstance(attn, TokenSelfAttention):
                h = attn(h, r)  # its output followed by r: the final block's input
            else:
                h = torch.cat((attn(h), r), dim=-1)
        h = run(self.final_block, h)
        h = self.final_attn(h)
        return self.out_proj(h)

    @staticmethod
    def _cat_in_kernels(x: torch.Tensor) -> bool:
        """Whether the trunk hands the up path's concatenations to the kernels before them
        (`token_attention_kernel.CAT_OUTPUT`): only where those can write them, sampling (no gradient) under
        bf16/fp16 autocast with the kernels available. In training, in float32 and without the kernels every
        module returns its own output, so forward hooks see what they always saw. Static properties only (traced
        by torch.compile without a graph break)."""
        dev = x.device.type
        return (token_attention_kernel.CAT_OUTPUT and not torch.is_grad_enabled() and torch.is_autocast_enabled(dev)
                and torch.get_autocast_dtype(dev) in (torch.bfloat16, torch.float16)
                and token_attention_kernel.available(x))

    @staticmethod
    def _up_concat(up: nn.Module, h: torch.Tensor, skip: torch.Tensor, fuse: bool) -> torch.Tensor:
        """torch.cat((up(h), skip), -1), the first up block's input. With `fuse` (the trunk's `_cat_in_kernels`:
        sampling in bf16/fp16 with `token_attention_kernel.CAT_OUTPUT` on) the up MLP's output Linear writes both
        halves in one kernel (`attention_output` without a residual, the skip as its tail; the Linear's function
        and rounding)."""
        low = torch.get_autocast_dtype(h.device.type) if fuse else None
        if not (fuse and isinstance(up, nn.Sequential) and len(up) == 3 and isinstance(up[2], nn.Linear)
                and up[2].bias is not None and up[2].in_features <= 256 and _fusable_tail(skip, low)):
            return torch.cat((up(h), skip), dim=-1)
        a, lin = up[1](up[0](h)), up[2]
        if a.dtype != low:
            return torch.cat((lin(a), skip), dim=-1)
        return token_attention_kernel.attention_output(a.contiguous(), lin.weight.to(low).contiguous(),
                                                       lin.bias.to(low), None, skip)

    @torch.no_grad()
    def autocast_copy(self, dtype: torch.dtype = torch.bfloat16) -> "Denoiser":
        """An inference copy whose trunk Linear layers hold their weights and biases in `dtype`, for sampling under
        autocast to `dtype`: there it computes exactly this model's function (autocast casts these tensors to
        `dtype` anyway), without a cast of every weight in every step (~80 small kernels per compiled IdGen step).

        Left as they are: the FiLM and time MLP (`time_film` / `condition_film` run outside autocast), the token
        mix, the attention output bias (computed in float32 from the token mix before autocast casts it) and every
        norm parameter (norms compute in float32). Outside autocast the copy's trunk raises a dtype error.
        The narrow attention blocks also keep their q/k/v weight in the projecting kernel's layout
        (`TokenSelfAttention.prepare_projection`): do not change the copy's weights in place (load a state dict,
        or make a new copy)."""
        new = copy.deepcopy(self)
        for name, m in new.named_modules():
            if not isinstance(m, nn.Linear) or name.split(".")[0] in ("film", "time_mlp") or name.endswith("token_mix"):
                continue
            m.weight.data = m.weight.data.to(dtype)
            if m.bias is not None and not name.endswith("to_out"):
                m.bias.data = m.bias.data.to(dtype)
        for m in new.modules():
            if isinstance(m, TokenSelfAttention):
                m.prepare_projection()
        return new

    @property
    def is_padded(self) -> bool:
        """Whether this is a `padded()` copy (its widths include zero padding channels)."""
        return any(isinstance(m, PaddedGroupNorm) for m in self.modules())

    @torch.no_grad()
    def padded(self, multiple: int = 8, *, original_state_dict: bool = False) -> "Denoiser":
        """A copy of this denoiser (for sampling and training) whose channel widths are rounded up to multiples of
        `multiple`, computing the same function (`widths` (300, 50, 10) -> (304, 56, 16); x and the output keep
        `dim`).

        The copy's extra channels are zero everywhere: their weight rows and columns, biases, FiLM rows, norm
        gains are zero, its GroupNorms (`PaddedGroupNorm`) take the statistics of the true channels, the RMS norm
        keeps the true sqrt(width) (zeros do not change an L2 norm), and the attention output bias is masked.
        Why: a 300-channel bf16 row is 600 bytes, not a multiple of 16, so under torch.compile every matmul of
        the 300-wide layers got a padding copy of its input and the element-wise kernels misaligned rows.
        The copy is detached from this model's parameters; one GroupNorm group required. It can also be trained:
        every padding parameter then gets an exactly zero gradient (the norms' statistics read the true channels
        only), so under AdamW (decoupled weight decay) it stays zero and the copy keeps computing the function
        of an unpadded model; `unpad` cuts its state dict (or gradients, optimizer moments) back to the original
        shapes. With `original_state_dict` (for training) the copy's `state_dict()` is already in the original
        layout, so checkpoints and EMA weights load into the unpadded model, and its `load_state_dict` takes the
        original layout (zero padding added) as well as its own."""
        if multiple < 1:
            raise ValueError(f"Denoiser.padded: multiple must be >= 1, got {multiple}")
        if self.config["groups"] != 1:
            raise ValueError(f"Denoiser.padded: needs groups=1 (OFER's setting), this model has "
                             f"groups={self.config['groups']}")
        if self.is_padded:
            raise ValueError("Denoiser.padded: this model already is a padded copy (its widths count padding "
                             "channels); pad the original model instead")

        def up(w: int) -> int:
            return -(-w // multiple) * multiple

        def idx(*parts: int) -> torch.Tensor:  # positions of the true channels of concatenated padded parts
            out, off = [], 0
            for w in parts:
                out.append(torch.arange(w) + off)
                off += up(w)
            return torch.cat(out)

        true: dict[nn.Module, dict[str, tuple[torch.Tensor, ...]]] = {}  # module -> parameter -> true positions

        def lin(new: nn.Linear, old: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
            rows = torch.arange(new.out_features) if rows is None else rows  # None: all, unpadded
            cols = torch.arange(new.in_features) if cols is None else cols
            true[new] = {"weight": (rows, cols), "bias": (rows,)}
            new.weight.zero_()
            new.weight[rows[:, None], cols[None, :]] = old.weight.detach().cpu()
            if old.bias is not None:
                new.bias.zero_()
                new.bias[rows] = old.bias.detach().cpu()

        def norm(old: nn.GroupNorm, w: int) -> PaddedGroupNorm:
            n = PaddedGroupNorm(w, up(w), eps=old.eps).to(dtype)
            true[n] = {"weight": (idx(w),), "bias": (idx(w),)}
            n.weight[idx(w)] = old.weight.detach().cpu()
            n.bias[idx(w)] = old.bias.detach().cpu()
            return n

        def block(new: FiLMResBlock, old: FiLMResBlock, parts: tuple[int, ...], w: int) -> None:
            lin(new.lin1, old.lin1, idx(w), idx(*parts))
            lin(new.lin2, old.lin2, idx(w), idx(w))
            if isinstance(old.skip, nn.Linear):
                lin(new.skip, old.skip, idx(w), idx(*parts))
            new.norm1, new.norm2 = norm(old.norm1, w), norm(old.norm2, w)

        def attn(new: nn.Module, old: nn.Module, w: int) -> None:
            if not isinstance(old, TokenSelfAttention):
                return
            new.norm.gain.zero_()
            new.norm.gain[idx(w)] = old.norm.gain.detach().cpu()
            true[new.norm] = {"gain": (idx(w),)}
            new.norm.scale = old.norm.scale  # the true sqrt(width)
            lin(new.to_qkv, old.to_qkv, None, idx(w))
            lin(new.to_out, old.to_out, idx(w), None)
            new.token_mix.load_state_dict(old.token_mix.state_dict())
            mask = torch.zeros(up(w))
            mask[idx(w)] = 1
            new.bias_mask = mask
            new.impl = old.impl

        dtype = self.film.weight.dtype
        new = Denoiser(**{**self.config, "widths": tuple(up(w) for w in self.widths)}).to(dtype)
        new._original_config = dict(self.config)
        new.time_mlp.load_state_dict(self.time_mlp.state_dict())
        w0 = self.widths[0]
        lin(new.in_proj, self.in_proj, idx(w0), None)
        lin(new.out_proj, self.out_proj, None, idx(w0))
        levels = list(zip(self.widths[:-1], self.widths[1:]))
        for lvl, (wi, wo) in enumerate(levels):
            for nb, ob in zip(new.down_blocks[lvl], self.down_blocks[lvl]):
                block(nb, ob, (wi,), wi)
            attn(new.down_attn[lvl], self.down_attn[lvl], wi)
            lin(new.down_mlp[lvl][0], self.down_mlp[lvl][0], idx(wi), idx(wi))
            lin(new.down_mlp[lvl][2], self.down_mlp[lvl][2], idx(wo), idx(wi))
        wm = self.widths[-1]
        block(new.mid_block1, self.mid_block1, (wm,), wm)
        attn(new.mid_attn, self.mid_attn, wm)
        block(new.mid_block2, self.mid_block2, (wm,), wm)
        for j, (ws, wd) in enumerate(reversed(levels)):
            lin(new.up_mlp[j][0], self.up_mlp[j][0], idx(wd), idx(wd))
            lin(new.up_mlp[j][2], self.up_mlp[j][2], idx(ws), idx(wd))
            for nb, ob in zip(new.up_blocks[j], self.up_blocks[j]):
                block(nb, ob, (ws, ws), ws)
            attn(new.up_attn[j], self.up_attn[j], ws)
        block(new.final_block, self.final_block, (w0, w0), w0)
        attn(new.final_attn, self.final_attn, w0)
        rows, off = [], 0  # every block's (scale, shift) rows, each half padded
        for size in self._film_sizes:
            w = size // 2
            rows += [torch.arange(w) + off, torch.arange(w) + off + up(w)]
            off += 2 * up(w)
        lin(new.film, self.film, torch.cat(rows), None)
        new._true_index = {f"{name}.{p}" if name else p: ix for name, m in new.named_modules()
                           for p, ix in true.get(m, {}).items() if getattr(m, p, None) is not None}
        if original_state_dict:
            new.register_state_dict_post_hook(_state_dict_to_original)
            new.register_load_state_dict_pre_hook(_state_dict_from_original)
        p = self.film.weight
        return new.to(device=p.device, dtype=p.dtype).train(self.training)

    def unpad(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """From a `padded()` copy: its state dict, or any dict of tensors shaped like its parameters (gradients,
        optimizer moments), cut back to the original model's shapes (the true channels; copies). Entries of
        unpadded parameters (time MLP, token mix, ...) are copied unchanged. `Denoiser(**config).load_state_dict(
        pad.unpad(pad.state_dict()))` restores the original model exactly."""
        index = getattr(self, "_true_index", None)
        if index is None:
            raise ValueError("Denoiser.unpad: this model is not a padded() copy")
        out = {}
        for name, v in tensors.items():
            ix = index.get(name)
            if ix is not None:
                v = v[_true_positions(ix, v.device)]
            out[name] = v.detach().clone()
        return out

    @property
    def original_config(self) -> dict:
        """The constructor arguments of the model this one was padded from (its own config if not padded)."""
        return dict(getattr(self, "_original_config", self.config))
