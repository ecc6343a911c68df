"""IdRank: the network that scores N candidate identities (FLAME shapes) of one image.

OFER (public code `src/models/network/rank_network.py`, `layers.py::ScaleShiftGNMLPLayerRank`,
`flameparamrank_model.py::decode`). Each candidate i of an image is its neutral FLAME mesh (zero expression
and pose) restricted to the front-face vertices, in millimetres: S_i (Vf, 3). With M the mean of the N
candidates of the same image, candidate i is presented as the flattened concatenation

    [M, S_i - M]  (2 * Vf * 3 numbers; 10,710 for the 1785 face vertices of the public code)

and an MLP with widths [2*Vf*3, 4096, 1024, 256, 64, 1] maps it to one logit. Every layer is modulated by
the image context ctx = ArcFace (+) FaRL (1024-d):

    hidden: h = GroupNorm(8)(SELU(W x + b)) * sigmoid(W_s ctx + b_s) + W_t ctx
    last:   z = (W x + b) * sigmoid(W_s ctx + b_s) + W_t ctx

(W_t has no bias, as in the public code.) The logits of the N candidates go through a softmax over the
candidates (in the loss, `ofer.ranking.listnet_loss`); the best-scored candidate is the identity.

Behaviour to know:
* Logits are comparable within one image only. M is the mean of the candidates handed in, so the input of
  candidate i, and its logit, depend on which other candidates are present and on N. A network trained
  with N = 100 and run with N = 20 sees noisier means and smaller residual spreads than in training (the
  residual's scale shrinks slightly with N); argmax selection stays meaningful, but absolute logits and the
  softmax sharpness shift. Keep N at inference equal to training when possible.
* N = 1 works: M = S_1, the residual half is zero, and the softmax over a single candidate is 1 whatever
  the logit.
* The final layer's shift W_t ctx adds the same number to all N logits of an image, and sigmoid(W_s ctx + b_s)
  multiplies them all by the same positive factor: the first is invisible to the softmax (a no-op kept so
  the structure and state dict match the public code), the second acts as a per-image temperature.
* The context vector is whatever the caller concatenates. The public code builds it as cat(FaRL, ArcFace)
  (FaRL first); this order matters only when loading its weights.

Deviations from the public code (ours, on purpose):
* GroupNorm is applied for every batch size; the public layer skips it when the flattened batch has one row
  (B * N == 1), which changes the function at N = 1, B = 1.
* The first Linear acts on [M, R] as W_M M + W_R R: the mean half is computed once per image instead of once
  per candidate, and the (B*N, 2*Vf*3) concatenation is never materialised. Same function, ~2x fewer FLOPs in
  the largest layer. `ranker_input` builds the explicit concatenation as a reference.
* The context projections run once per image (B rows) and are broadcast over the N candidates instead of
  tiling the context N times.
* Weights are initialised in one named method (`initialize_weights`); the values are PyTorch's Linear and
  GroupNorm defaults, which is what the public code trains from.
* Optional input standardisation (`input_norm=True`, off by default = the public function): the network sees
  [(M - C) / s_M, R / s_R] instead of [M, R], with C the mean face of the training candidates and s_M, s_R
  the RMS of the two halves over them (`fit_input_normalization`; stored as buffers in the checkpoint).
  Without it, the first layer's pre-activation is dominated by M in mm (the same for all N candidates of an
  image: head coordinates of ~100 mm against residuals of ~1-3 mm), the per-row GroupNorm then divides the
  residual's contribution away, and the logits of one image start out nearly equal: a short run barely ranks.
* Scoring straight from shape coefficients (`ShapeRanker`, what `OferPipeline` ranks with): at zero expression
  and pose the face vertices are affine in the coefficients, S_i = T + D beta_i (mm), so M = T + D beta_bar and
  S_i - M = D (beta_i - beta_bar), and the first pre-activation is
  [W_M (T - C) / s_M + b] + (W_M D / s_M) beta_bar + (W_R D / s_R) (beta_i - beta_bar).
  The three terms are folded in float64 (again whenever the weights change); per candidate that leaves a
  (w0, n_shape) matmul instead of a (w0, Vf*3) one, and no FLAME decode (the public code decodes all B*N
  candidates). The same function in exact arithmetic; in float32 it rounds less (no ~100 mm coordinates are
  formed and subtracted). Inference only: no gradient reaches the first Linear.

Shapes: B images, N candidates per image, Vf front-face vertices, C ctx_dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ofer.flame import FLAME, MM_PER_M

__all__ = ["IdRanker", "RankLayer", "ShapeRanker", "candidate_vertices", "ranker_input"]


def candidate_vertices(flame: FLAME, shapes: Tensor, face_idx: Tensor, *, check: bool = True) -> Tensor:
    """Front-face vertices of N candidate shapes per image, in millimetres.

    One FLAME call over all B*N rows, with zero expression and pose (`FLAME.shape_vertices`: at zero pose
    skinning is the identity, so it is skipped).

    Args:
        flame: FLAME layer (metres).
        shapes: FLAME shape coefficients, shape (B, N, flame.n_shape).
        face_idx: vertex indices (Vf,) of the front face, e.g. `flame.face_mask("face")` (OFER: 1785 of 5023
            in the public code; the `face` region of FLAME_masks has 1787).
        check: False where the caller has checked `face_idx` with `check_face_idx` already (`RankerTask` does
            once): the check reads its range back to the host, a sync per call on a GPU and a graph break in a
            compiled loss.

    Returns:
        vertices, shape (B, N, Vf, 3), millimetres.
    """
    if shapes.ndim != 3 or shapes.shape[-1] != flame.n_shape:
        raise ValueError(f"candidate_vertices: shapes must have shape (B, N, {flame.n_shape}), "
                         f"got {tuple(shapes.shape)}")
    if check:
        check_face_idx("candidate_vertices", flame, face_idx)
    B, N, _ = shapes.shape
    # Only the face rows: the same numbers as decoding all V vertices and then indexing, without the
    # (B*N, V, 3) intermediate (6 GB for 1,024 images x 100 candidates).
    face = flame.shape_vertices(shapes.reshape(B * N, -1), vertex_ids=face_idx)  # (B*N, Vf, 3) metres
    return (face * MM_PER_M).view(B, N, face_idx.numel(), 3)


def check_face_idx(caller: str, flame: FLAME, face_idx: Tensor) -> None:
    """ValueError naming `caller` unless `face_idx` is a non-empty 1-D integer tensor of FLAME vertex indices."""
    if face_idx.ndim != 1 or face_idx.dtype not in (torch.int64, torch.int32) or face_idx.numel() == 0:
        raise ValueError(f"{caller}: face_idx must be a non-empty 1-D integer tensor, got dtype "
                         f"{face_idx.dtype} and shape {tuple(face_idx.shape)}")
    V = flame.num_vertices
    lo, hi = int(face_idx.min()), int(face_idx.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"{caller}: face_idx spans [{lo}, {hi}], outside the {V} FLAME vertices")


def ranker_input(face_vertices_mm: Tensor) -> Tensor:
    """The explicit IdRank input of the public code: per candidate the flattened concat(M, S_i - M).

    Args:
        face_vertices_mm: candidates S, shape (B, N, Vf, 3).

    Returns:
        shape (B, N, 2 * Vf * 3): [M (Vf*3, vertex-major, xyz inner), S_i - M (same layout)].
    """
    B, N, Vf, _ = face_vertices_mm.shape
    mean = face_vertices_mm.mean(dim=1, keepdim=True)  # (B, 1, Vf, 3)
    both = torch.cat([mean.expand(B, N, Vf, 3), face_vertices_mm - mean], dim=2)  # (B, N, 2Vf, 3)
    return both.reshape(B, N, 2 * Vf * 3)


class RankLayer(nn.Module):
    """One context-modulated layer (OFER `ScaleShiftGNMLPLayerRank`).

    Hidden (groups given): GroupNorm(SELU(mlp(x))) * sigmoid(scale(ctx)) + shift(ctx).
    Last (groups None): mlp(x) * sigmoid(scale(ctx)) + shift(ctx).
    GroupNorm acts on each candidate row separately (statistics over the channels of one row).
    Submodule names (mlp, scale, shift, gn) follow the public code so its weights map by key prefix.
    """

    def __init__(self, dim_in: int, dim_out: int, ctx_dim: int, *, groups: int | None) -> None:
        super().__init__()
        self.mlp = nn.Linear(dim_in, dim_out)
        self.scale = nn.Linear(ctx_dim, dim_out)
        self.shift = nn.Linear(ctx_dim, dim_out, bias=False)  # OFER: shift has no bias
        self.gn = nn.GroupNorm(groups, dim_out) if groups is not None else None

    def modulate(self, h: Tensor, ctx: Tensor) -> Tensor:
        """Everything after the Linear: h (B, N, dim_out) pre-activation, ctx (B, C) -> (B, N, dim_out)."""
        if self.gn is not None:
            B, N, D = h.shape
            h = self.gn(F.selu(h).reshape(B * N, D)).view(B, N, D)  # per-row statistics
        scale = torch.sigmoid(self.scale(ctx)).unsqueeze(1)  # (B, 1, dim_out)
        shift = self.shift(ctx).unsqueeze(1)  # (B, 1, dim_out)
        return h * scale + shift

    def forward(self, x: Tensor, ctx: Tensor) -> Tensor:
        """x: (B, N, dim_in), ctx: (B, C) -> (B, N, dim_out)."""
        return self.modulate(self.mlp(x), ctx)


class IdRanker(nn.Module):
    """IdRank scorer: `forward(face_vertices_mm (B,N,Vf,3), ctx (B,C)) -> logits (B,N)`.

    Paper settings: num_face_vertices = number of front-face vertices (OFER public code: 1785; the `face`
    region of FLAME_masks: 1787), ctx_dim = 1024 (ArcFace (+) FaRL), widths (4096, 1024, 256, 64), groups 8.
    59,505,986 parameters at 1785 vertices (59,555,138 at 1787).

    Args:
        num_face_vertices: Vf, vertices per candidate.
        ctx_dim: size C of the image context vector.
        widths: hidden widths; a final Linear to one logit follows.
        groups: GroupNorm groups of every hidden layer; must divide every width.
        input_norm: standardise the two input halves (see the module notes); fit with
            `fit_input_normalization` before training. Off: the public code's input.
    """

    def __init__(
        self,
        *,
        num_face_vertices: int,
        ctx_dim: int = 1024,
        widths: Sequence[int] = (4096, 1024, 256, 64),
        groups: int = 8,
        input_norm: bool = False,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if num_face_vertices < 1:
            raise ValueError(f"IdRanker: num_face_vertices must be >= 1, got {num_face_vertices}")
        if ctx_dim < 1:
            raise ValueError(f"IdRanker: ctx_dim must be >= 1, got {ctx_dim}")
        if len(widths) < 1 or min(widths) < 1:
            raise ValueError(f"IdRanker: widths must list >= 1 positive hidden widths (e.g. [4096, 1024, 256, 64]), "
                             f"got {list(widths)}")
        if groups < 1 or any(w % groups for w in widths):
            raise ValueError(f"IdRanker: groups={groups} must be >= 1 and divide every width in {list(widths)}")
        self.num_face_vertices, self.ctx_dim, self.widths, self.groups = num_face_vertices, ctx_dim, widths, groups
        self.in_dim = 2 * num_face_vertices * 3
        dims = (self.in_dim, *widths)
        layers = [RankLayer(a, b, ctx_dim, groups=groups) for a, b in zip(dims[:-1], dims[1:])]
        layers.append(RankLayer(widths[-1], 1, ctx_dim, groups=None))
        self.layers = nn.ModuleList(layers)
        self.input_norm = bool(input_norm)
        # Identity until fitted (and always without input_norm): centre C (Vf,3) mm, scales (s_M, s_R) mm.
        self.register_buffer("input_center", torch.zeros(num_face_vertices, 3))
        self.register_buffer("input_scale", torch.ones(2))
        self.initialize_weights()

    @torch.no_grad()
    def fit_input_normalization(self, face_vertices_mm: Tensor) -> None:
        """Set C, s_M, s_R from training candidates (K, N, Vf, 3) in mm: C = mean over images of the candidate
        mean M, s_M = RMS of M - C, s_R = RMS of the residuals S_i - M. No-op unless `input_norm`."""
        if not self.input_norm:
            return
        x = face_vertices_mm.to(self.input_center.dtype)
        if x.ndim != 4 or x.shape[2:] != (self.num_face_vertices, 3) or x.shape[0] < 2 or x.shape[1] < 2:
            raise ValueError(f"fit_input_normalization: candidates must have shape (K >= 2, N >= 2, "
                             f"{self.num_face_vertices}, 3), got {tuple(x.shape)}")
        mean = x.mean(dim=1)  # (K, Vf, 3)
        center = mean.mean(dim=0)
        s_m = (mean - center).pow(2).mean().sqrt()
        s_r = (x - mean.unsqueeze(1)).pow(2).mean().sqrt()
        if not (torch.isfinite(s_m) and torch.isfinite(s_r) and s_m > 0 and s_r > 0):
            raise ValueError(f"fit_input_normalization: degenerate candidates (RMS of M - C {float(s_m):.3g} mm, "
                             f"of the residuals {float(s_r):.3g} mm): identical or non-finite shapes?")
        self.input_center.copy_(center)
        self.input_scale.copy_(torch.stack([s_m, s_r]))

    def initialize_weights(self) -> None:
        """PyTorch's defaults, stated explicitly (the public code trains from them, and with its 1e-6
        learning rate the network stays close to its initialisation, so the init is part of the method):
        Linear weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)); GroupNorm weight 1, bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)
                nn.init.uniform_(module.weight, -bound, bound)  # = kaiming_uniform_(a=sqrt(5))
                if module.bias is not None:
                    nn.init.uniform_(module.bias, -bound, bound)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def extra_repr(self) -> str:
        return (f"num_face_vertices={self.num_face_vertices}, ctx_dim={self.ctx_dim}, "
                f"widths={list(self.widths)}, groups={self.groups}, input_norm={self.input_norm}")

    def forward(self, face_vertices_mm: Tensor, ctx: Tensor) -> Tensor:
        """Score N candidates per image.

        Args:
            face_vertices_mm: candidates' front-face vertices S, shape (B, N, Vf, 3), millimetres
                (`candidate_vertices`). Any N >= 1.
            ctx: image context, shape (B, ctx_dim).

        Returns:
            logits, shape (B, N); softmax over dim 1 gives the candidate probabilities.
        """
        x = face_vertices_mm
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[2] != self.num_face_vertices or x.shape[1] < 1:
            raise ValueError(f"IdRanker: face_vertices_mm must have shape (B, N >= 1, {self.num_face_vertices}, 3), "
                             f"got {tuple(x.shape)}")
        B, N = x.shape[:2]
        if ctx.shape != (B, self.ctx_dim):
            raise ValueError(f"IdRanker: ctx must have shape ({B}, {self.ctx_dim}), got {tuple(ctx.shape)}")
        mean = x.mean(dim=1)  # (B, Vf, 3)
        resid = x - mean.unsqueeze(1)  # (B, N, Vf, 3)
        if self.input_norm:
            mean = (mean - self.input_center) / self.input_scale[0]
            resid = resid / self.input_scale[1]
        first = self.layers[0]
        half = self.in_dim // 2
        # Linear on concat(M, R) = W_M M + W_R R + b, with the M term computed once per image.
        h = F.linear(resid.reshape(B, N, half), first.mlp.weight[:, half:])  # (B, N, w0)
        h = h + F.linear(mean.reshape(B, half), first.mlp.weight[:, :half], first.mlp.bias).unsqueeze(1)
        return self.logits_from_preactivation(h, ctx)

    def logits_from_preactivation(self, h: Tensor, ctx: Tensor) -> Tensor:
        """Everything after the first Linear: h (B, N, widths[0]) its pre-activation W [M', R'] + b, ctx (B, C)
        -> logits (B, N). Shared by `forward` and `ShapeRanker`."""
        h = self.layers[0].modulate(h, ctx)
        for layer in self.layers[1:]:
            h = layer(h, ctx)
        return h.squeeze(-1)  # (B, N)


class ShapeRanker(nn.Module):
    """IdRank scored straight from FLAME shape coefficients: `forward(shapes (B,N,n_shape), ctx (B,C)) -> logits
    (B,N)`, the same function as `ranker(candidate_vertices(flame, shapes, face_idx), ctx)` (see the module notes).

    The ranker's first Linear is folded with FLAME's face rows into three buffers, computed in float64 and
    stored in the ranker's weight dtype and device:

        mean_weight  = W_M D / s_M                      (w0, n_shape)
        mean_bias    = W_M (T - C) / s_M + b            (w0,)
        resid_weight = W_R D / s_R                      (w0, n_shape)

    (C = 0, s = 1 without input_norm). Everything after the pre-activation runs the ranker's own layers
    (`IdRanker.logits_from_preactivation`). The ranker and FLAME are held, not copied.

    The fold is made on the first call and again whenever a tensor it reads has changed since: the first
    Linear's weight and bias, `input_center`, `input_scale` (and the `input_norm` flag), FLAME's `v_template` and
    `shapedirs`. A change is a new tensor, device or dtype, or an in-place write (`load_state_dict`, optimizer
    steps, `.to` all count). Writes through `.data`, and in-place writes to inference tensors, bypass the
    version counter and are not seen: call `refold()` after them.

    Inference only: the folded weights are constants, so no gradient would reach the first Linear; a call with
    gradients enabled while that layer requires them raises (gradients with respect to shapes and ctx are fine).

    Args:
        ranker: the IdRank network.
        flame: FLAME layer (metres); its `n_shape` shape directions are folded.
        face_idx: vertex indices (Vf,) of the front face, as for `candidate_vertices`; Vf must equal
            `ranker.num_face_vertices`.
    """

    def __init__(self, ranker: IdRanker, flame: FLAME, face_idx: Tensor) -> None:
        super().__init__()
        if not isinstance(ranker, IdRanker):
            raise TypeError(f"ShapeRanker: ranker must be an IdRanker, got {type(ranker).__name__}")
        check_face_idx("ShapeRanker", flame, face_idx)
        if face_idx.numel() != ranker.num_face_vertices:
            raise ValueError(f"ShapeRanker: face_idx has {face_idx.numel()} vertices, the ranker expects "
                             f"num_face_vertices={ranker.num_face_vertices}")
        self.ranker, self.flame, self.n_shape = ranker, flame, flame.n_shape
        self.register_buffer("face_idx", face_idx.detach().to(torch.long).clone(), persistent=False)
        for name in ("mean_weight", "mean_bias", "resid_weight"):  # derived: filled by `refold`, never saved
            self.register_buffer(name, None, persistent=False)
        self._folded_from: tuple | None = None

    def extra_repr(self) -> str:
        return f"num_face_vertices={self.face_idx.numel()}, n_shape={self.n_shape}"

    def _source_key(self) -> tuple:
        """Identity, place and version of every tensor the fold reads (cheap: no data is touched)."""
        ranker, lin = self.ranker, self.ranker.layers[0].mlp
        tensors = (lin.weight, lin.bias, ranker.input_center, ranker.input_scale, self.flame.v_template,
                   self.flame.shapedirs)
        # Inference tensors keep no version counter.
        return (ranker.input_norm, *((id(t), t.data_ptr(), t.device, t.dtype, -1 if t.is_inference() else t._version)
                                     for t in tensors))

    @torch.no_grad()
    def refold(self) -> None:
        """Fold the ranker's current first Linear with FLAME's face rows (done by `forward` when needed)."""
        ranker, flame, K = self.ranker, self.flame, self.n_shape
        lin = ranker.layers[0].mlp
        dev = lin.weight.device
        # float64 where the weights live (the CPU for MPS, which has no float64); autocast off, so a call
        # from inside a bf16 region folds exactly.
        work = torch.device("cpu") if dev.type == "mps" else dev
        f64 = {"device": work, "dtype": torch.float64}
        idx = self.face_idx.to(flame.v_template.device)
        T = flame.v_template[idx].to(**f64).reshape(-1) * MM_PER_M  # (Vf*3,) vertex-major, xyz inner (ranker_input)
        D = flame.shapedirs[idx, :, :K].to(**f64).reshape(-1, K) * MM_PER_M  # (Vf*3, K), rows as T
        half = ranker.in_dim // 2
        w = lin.weight.to(**f64)
        w_m, w_r = w[:, :half], w[:, half:]  # (w0, Vf*3) each: the M and the R half of the input
        center, s_m, s_r = torch.zeros_like(T), torch.ones((), **f64), torch.ones((), **f64)
        if ranker.input_norm:
            center = ranker.input_center.to(**f64).reshape(-1)
            s_m, s_r = ranker.input_scale.to(**f64).unbind()
        with torch.autocast(work.type, enabled=False):
            mean_weight = (w_m @ D) / s_m
            mean_bias = w_m @ ((T - center) / s_m) + lin.bias.to(**f64)
            resid_weight = (w_r @ D) / s_r
        out = {"device": dev, "dtype": lin.weight.dtype}
        self.mean_weight, self.mean_bias = mean_weight.to(**out), mean_bias.to(**out)
        self.resid_weight = resid_weight.to(**out)
        self.face_idx = idx
        self._folded_from = self._source_key()

    def _check_shapes(self, shapes: Tensor) -> int:
        if shapes.ndim != 3 or shapes.shape[1] < 1 or shapes.shape[2] != self.n_shape:
            raise ValueError(f"ShapeRanker: shapes must have shape (B, N >= 1, {self.n_shape}), "
                             f"got {tuple(shapes.shape)}")
        return shapes.shape[0]

    def fold(self) -> None:
        """Refold if a tensor the fold reads has changed since the last fold (a cheap check; `forward` calls it)."""
        if self._folded_from != self._source_key():
            self.refold()

    def _check_inference(self) -> None:
        lin = self.ranker.layers[0].mlp
        if torch.is_grad_enabled() and (lin.weight.requires_grad or lin.bias.requires_grad):
            raise RuntimeError("ShapeRanker is inference-only (its folded first layer passes no gradient to the "
                               "ranker's): call it under torch.no_grad() or torch.inference_mode(), or score "
                               "candidate_vertices with the IdRanker to train")

    def first_preactivation(self, shapes: Tensor) -> Tensor:
        """The ranker's first-layer pre-activation W [M', R'] + b of the decoded candidates, from their shapes.

        Args:
            shapes: FLAME shape coefficients, shape (B, N >= 1, flame.n_shape).

        Returns:
            shape (B, N, ranker.widths[0]), in the ranker's weight dtype.
        """
        self._check_shapes(shapes)
        self._check_inference()
        self.fold()
        return self._preactivation(shapes)

    def _preactivation(self, shapes: Tensor) -> Tensor:
        beta = shapes.to(self.mean_weight.dtype)
        mean = beta.mean(dim=1)  # (B, K): beta_bar, M = T + D beta_bar
        h = F.linear(beta - mean.unsqueeze(1), self.resid_weight)  # (B, N, w0): W_R R'
        return h + F.linear(mean, self.mean_weight, self.mean_bias).unsqueeze(1)  # + W_M M' + b, once per image

    def folded_logits(self, shapes: Tensor, ctx: Tensor) -> Tensor:
        """`forward` without its input checks and refold check: tensor work only, so `torch.compile` fuses it
        into few kernels (`OferPipeline` with `compile`). Call `fold()` first; inputs as for `forward`."""
        return self.ranker.logits_from_preactivation(self._preactivation(shapes), ctx)

    def check_inputs(self, shapes: Tensor, ctx: Tensor) -> None:
        """The input checks of `forward` (shapes (B, N >= 1, n_shape), ctx (B, ctx_dim), inference only)."""
        B = self._check_shapes(shapes)
        if ctx.shape != (B, self.ranker.ctx_dim):
            raise ValueError(f"ShapeRanker: ctx must have shape ({B}, {self.ranker.ctx_dim}), got {tuple(ctx.shape)}")
        self._check_inference()

    def forward(self, shapes: Tensor, ctx: Tensor) -> Tensor:
        """Score N candidate shapes per image.

        Args:
            shapes: FLAME shape coefficients, shape (B, N >= 1, flame.n_shape).
            ctx: image context, shape (B, ranker.ctx_dim).

        Returns:
            logits, shape (B, N): those of `ranker(candidate_vertices(flame, shapes, face_idx), ctx)`.
        """
        self.check_inputs(shapes, ctx)
        self.fold()
        return self.folded_logits(shapes, ctx)
