"""Reconstruction and diversity metrics for multi-hypothesis face reconstruction (CO-545 / ROF style).

Pure torch functions: batched, on whatever device and floating dtype the inputs have, no alignment. Vertex
inputs are meshes in one canonical frame (for OFER: neutral FLAME, `FLAME.shape_vertices(shape)`), and every
distance comes out in the units of the inputs: this project passes millimetres (`MM_PER_M * metres`).

The paper's definitions are not public in text we could read (see `ofer_method.md`, "Reported results"), so
these are ours, fixed here and kept stable:

* RMSE of one mesh:   sqrt(mean_{v in R} ||p_v - g_v||^2)                         (`vertex_rmse`)
* SE:                 RMSE of the selected (ranked) reconstruction                 (`se_rmse`)
* CSE:                min over the N samples of the RMSE (Diverse3D's "closest sample error")  (`cse_rmse`)
* STD-S:              mean_{v in R} sqrt(mean_n ||x_nv - xbar_v||^2), xbar_v = mean_n x_nv (ddof 0)  (`std_s`)
* ASD:                mean over pairs i<j of mean_{v in R} ||x_iv - x_jv||          (`asd`)
* ODE rate:           fraction of samples with ||beta||^2 > chi2.ppf(0.999, df=D)  (`ode_rate`)

Regions R ("masks") are given as vertex index tensors (K,) (long), or boolean tensors (V,) for one region
shared by the batch, or (B, V) for one region per image (the occluded part differs from image to image). A
region with no vertex gives NaN for that image (an unoccluded image has no occluded region); callers pool
with a NaN-aware mean and report how many images were defined.

Shapes: B images, N samples per image, V vertices, D shape coefficients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "vertex_rmse", "sample_rmse", "se_rmse", "cse_rmse", "ClosestSample", "std_s", "asd",
    "ode_threshold", "ode_rate", "project_to_shape_space", "ode_rate_vertices",
    "average_ranks", "spearman", "ranking_report", "DEFAULT_ODE_QUANTILE",
]

# Our choice: with coefficients drawn from the true prior N(0, I), exactly 0.1% exceed the threshold, so a
# rate near 0.001 means "as in-distribution as the prior itself".
DEFAULT_ODE_QUANTILE = 0.999


# ----------------------------------------------------------------------------------------------------
# Input checks and masks
# ----------------------------------------------------------------------------------------------------

def _check_points(name: str, x: Tensor, ndim: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[-1] != 3 or (ndim is not None and x.ndim != ndim):
        want = "(..., V, 3)" if ndim is None else {3: "(B, V, 3)", 4: "(B, N, V, 3)"}[ndim]
        raise ValueError(f"'{name}' must have shape {want}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"'{name}' must be a floating-point tensor, got {x.dtype}")


def _bool_mask(mask: Tensor | None, V: int, device: torch.device) -> Tensor | None:
    """A region as a boolean tensor (..., V) on `device`, or None for all vertices."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if mask.dtype == torch.bool:
        if mask.ndim == 0 or mask.shape[-1] != V:
            raise ValueError(f"boolean mask must have shape (V,) or (B, V) with V={V}, got {tuple(mask.shape)}")
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"mask must be vertex indices (long) or booleans, got dtype {mask.dtype}")
    if mask.ndim != 1:
        raise ValueError(f"an index mask must be 1-D (K,), got shape {tuple(mask.shape)}; "
                         "use a boolean (B, V) mask for per-image regions")
    if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= V):
        raise ValueError(f"mask indexes vertices outside [0, {V}): min {int(mask.min())}, max {int(mask.max())}")
    out = torch.zeros(V, dtype=torch.bool, device=device)
    out[mask.long()] = True
    return out


def _per_image_mask(mask: Tensor | None, B: int, V: int, device: torch.device) -> Tensor | None:
    """Region for per-sample quantities (B, N, V): (V,) or (B, V) -> (1 or B, 1, V)."""
    m = _bool_mask(mask, V, device)
    if m is None:
        return None
    if m.ndim == 1:
        return m.view(1, 1, V)
    if m.ndim == 2 and m.shape[0] in (1, B):
        return m.unsqueeze(1)
    raise ValueError(f"mask must have shape (V,) or (B, V) = ({B}, {V}), got {tuple(m.shape)}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over the last dim (V) restricted to `mask` (broadcastable to `values`); NaN where empty."""
    if mask is None:
        return values.mean(-1)
    m = mask.expand_as(values)
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)
    return total / m.sum(-1).to(values.dtype)  # 0/0 = NaN for an empty region


# ----------------------------------------------------------------------------------------------------
# Errors against ground truth
# ----------------------------------------------------------------------------------------------------

def vertex_rmse(pred: Tensor, gt: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """Per-vertex RMSE, no alignment: sqrt(mean_{v in mask} ||pred_v - gt_v||^2).

    pred, gt: (..., V, 3), same shape (broadcastable leading dims), same units (mm here).
    mask: vertex indices (K,), or booleans (V,) or broadcastable to (..., V); None = all vertices.
    Returns (...) in the units of the inputs; NaN where the mask selects no vertex.
    """
    _check_points("pred", pred)
    _check_points("gt", gt)
    if pred.shape[-2] != gt.shape[-2]:
        raise ValueError(f"'pred' has {pred.shape[-2]} vertices and 'gt' {gt.shape[-2]}; they must match")
    sq = ((pred - gt) ** 2).sum(-1)  # (..., V)
    return _masked_mean(sq, _bool_mask(mask, pred.shape[-2], pred.device)).sqrt()


def sample_rmse(samples: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """RMSE of every sample: samples (B, N, V, 3), gt (B, V, 3), mask (K,) / (V,) / (B, V) -> (B, N)."""
    _check_points("samples", samples, 4)
    _check_points("gt", gt, 3)
    B, N, V, _ = samples.shape
    if gt.shape != (B, V, 3):
        raise ValueError(f"'gt' must have shape (B, V, 3) = ({B}, {V}, 3) to match samples, got {tuple(gt.shape)}")
    sq = ((samples - gt.unsqueeze(1)) ** 2).sum(-1)  # (B, N, V)
    return _masked_mean(sq, _per_image_mask(mask, B, V, samples.device)).sqrt()


def se_rmse(selected: Tensor, gt: Tensor, mask: Tensor | None = None) -> Tensor:
    """SE ("selected error"): RMSE of the selected reconstruction. selected, gt (B, V, 3) -> (B,)."""
    _check_points("selected", selected, 3)
    _check_points("gt", gt, 3)
    if selected.shape != gt.shape:
        raise ValueError(f"'selected' {tuple(selected.shape)} and 'gt' {tuple(gt.shape)} must have the same shape")
    return vertex_rmse(selected, gt, mask=mask)


class ClosestSample(NamedTuple):
    """CSE result: `rmse` (B,) the smallest sample RMSE, `index` (B,) long, the sample that attains it."""

    rmse: Tensor
    index: Tensor


def cse_rmse(samples: Tensor, gt: Tensor, mask: Tensor | None = None) -> ClosestSample:
    """CSE ("closest sample error", Diverse3D): min over the N samples of the RMSE.

    samples (B, N, V, 3), gt (B, V, 3), mask (K,) / (V,) / (B, V). Returns (rmse (B,), index (B,)); the
    first minimiser on ties. An image whose region is empty gets NaN (index 0).
    """
    err = sample_rmse(samples, gt, mask)  # (B, N)
    filled = torch.nan_to_num(err, nan=float("inf"))
    index = filled.argmin(dim=1)
    return ClosestSample(rmse=err.gather(1, index[:, None])[:, 0], index=index)


# ----------------------------------------------------------------------------------------------------
# Diversity (no ground truth needed)
# ----------------------------------------------------------------------------------------------------

def std_s(samples: Tensor, region_mask: Tensor | None = None) -> Tensor:
    """STD-S: mean over region vertices of the per-vertex standard deviation across samples.

    Per-vertex std (ours, ddof 0): sigma_v = sqrt(mean_n ||x_nv - xbar_v||^2), xbar_v = mean_n x_nv, i.e.
    the RMS distance of the samples from their mean position (sqrt of the trace of the 3x3 covariance).
    Two samples at +-d from a point give sigma = d. Call it once with the occluded region and once with
    the visible one to get both numbers.

    samples (B, N, V, 3); region_mask (K,) / (V,) / (B, V). Returns (B,) in input units; NaN for an empty
    region.
    """
    _check_points("samples", samples, 4)
    B, N, V, _ = samples.shape
    mean = samples.mean(dim=1, keepdim=True)  # (B, 1, V, 3)
    sigma = ((samples - mean) ** 2).sum(-1).mean(dim=1).sqrt()  # (B, V)
    m = _per_image_mask(region_mask, B, V, samples.device)
    return _masked_mean(sigma, None if m is None else m[:, 0])


def asd(samples: Tensor, mask: Tensor | None = None) -> Tensor:
    """ASD: average pairwise sample distance, mean over pairs i<j of mean_{v in mask} ||x_iv - x_jv||.

    samples (B, N, V, 3) with N >= 2; mask (K,) / (V,) / (B, V). Returns (B,) in input units; NaN for an
    empty region. Two samples at +-d from a point give 2d. Memory stays O(B N V): one row of pairs at a time.
    """
    _check_points("samples", samples, 4)
    B, N, V, _ = samples.shape
    if N < 2:
        raise ValueError(f"ASD needs at least 2 samples per image, got N={N}")
    m = _per_image_mask(mask, B, V, samples.device)
    total = samples.new_zeros(B)
    for i in range(N - 1):
        d = (samples[:, i + 1:] - samples[:, i:i + 1]).norm(dim=-1)  # (B, N-i-1, V)
        total = total + _masked_mean(d, m).sum(dim=1)
    return total / (N * (N - 1) / 2)


# ----------------------------------------------------------------------------------------------------
# Out-of-distribution rate
# ----------------------------------------------------------------------------------------------------

def ode_threshold(dim: int = 300, quantile: float = DEFAULT_ODE_QUANTILE) -> float:
    """chi2.ppf(quantile, df=dim): the squared norm that a fraction 1 - quantile of N(0, I_dim) draws exceed.
    For dim=300, quantile=0.999 this is about 381.4."""
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    from scipy.stats import chi2

    return float(chi2.ppf(quantile, df=dim))


def ode_rate(shapes: Tensor, *, threshold: float | None = None) -> Tensor:
    """ODE rate: fraction of samples whose shape coefficients are unlikely under the FLAME prior N(0, I).

    FLAME's shape basis is scaled so that the prior of the coefficients is N(0, I_D); the squared
    Mahalanobis norm is then ||beta||^2 ~ chi2(D). A sample is out of distribution when ||beta||^2 >
    threshold, by default chi2.ppf(0.999, df=D) (= 381.4 for D = 300): samples from the true prior
    exceed it 0.1% of the time, samples from N(0, 2I) almost always.

    shapes (..., N, D) -> (...) fractions in [0, 1].
    """
    if not isinstance(shapes, Tensor) or shapes.ndim < 2 or not shapes.is_floating_point():
        raise ValueError(f"'shapes' must be a floating tensor (..., N, D), got "
                         f"{tuple(shapes.shape) if isinstance(shapes, Tensor) else type(shapes).__name__}")
    if threshold is None:
        threshold = ode_threshold(shapes.shape[-1])
    return ((shapes ** 2).sum(-1) > threshold).to(shapes.dtype).mean(-1)


def project_to_shape_space(vertices: Tensor, *, template: Tensor, shapedirs: Tensor,
                           mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Least-squares FLAME shape coefficients of meshes that may not come from FLAME coefficients.

    vertices (..., V, 3); template (V, 3); shapedirs (V, 3, K) (FLAME's, whose coefficient prior is
    N(0, I)); mask: vertices used for the fit. Returns (coefficients (..., K), RMS residual (...) of the
    fitted vertices, in input units). Vertices and basis must be in the same units (scale both to mm).
    """
    _check_points("vertices", vertices)
    V = vertices.shape[-2]
    if template.shape != (V, 3) or shapedirs.ndim != 3 or shapedirs.shape[:2] != (V, 3):
        raise ValueError(f"template must be ({V}, 3) and shapedirs ({V}, 3, K); got {tuple(template.shape)} "
                         f"and {tuple(shapedirs.shape)}")
    m = _bool_mask(mask, V, vertices.device)
    if m is not None and m.ndim != 1:
        raise ValueError("project_to_shape_space takes one region for all meshes: mask (K,) or (V,)")
    idx = torch.arange(V, device=vertices.device) if m is None else m.nonzero()[:, 0]
    K = shapedirs.shape[-1]
    basis = shapedirs[idx].to(vertices).reshape(-1, K)  # (3M, K)
    if basis.shape[0] < K:
        raise ValueError(f"the mask keeps {idx.numel()} vertices ({basis.shape[0]} numbers), fewer than the {K} "
                         "coefficients to fit")
    disp = (vertices[..., idx, :] - template[idx].to(vertices)).flatten(-2)  # (..., 3M)
    coeffs = disp @ torch.linalg.pinv(basis).T  # (..., K)
    residual = (disp - coeffs @ basis.T).reshape(*disp.shape[:-1], -1, 3)
    return coeffs, (residual ** 2).sum(-1).mean(-1).sqrt()


def ode_rate_vertices(vertices: Tensor, *, template: Tensor, shapedirs: Tensor, mask: Tensor | None = None,
                      threshold: float | None = None) -> Tensor:
    """Vertex-space ODE rate, for methods that output meshes: the coefficients are fitted by least squares
    (`project_to_shape_space`) and scored as in `ode_rate`. The part of a mesh outside FLAME's shape space
    (the residual) is not counted. vertices (..., N, V, 3) -> (...)."""
    coeffs, _ = project_to_shape_space(vertices, template=template, shapedirs=shapedirs, mask=mask)
    return ode_rate(coeffs, threshold=threshold)


# ----------------------------------------------------------------------------------------------------
# Ranking diagnostics (IdRank)
# ----------------------------------------------------------------------------------------------------

def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim, ties given the average of the ranks they span: (..., N) -> float64."""
    x = x.to(torch.float64)
    sorted_x, _ = x.sort(dim=-1)
    below = torch.searchsorted(sorted_x.contiguous(), x.contiguous(), side="left")  # elements < x
    up_to = torch.searchsorted(sorted_x.contiguous(), x.contiguous(), side="right")  # elements <= x
    return (below + up_to + 1).to(torch.float64) / 2


def spearman(x: Tensor, y: Tensor) -> Tensor:
    """Spearman rank correlation along the last dim (Pearson correlation of average ranks): (..., N) x2 ->
    (...) float64; NaN where either input is constant (as scipy.stats.spearmanr)."""
    if x.shape != y.shape or x.ndim < 1:
        raise ValueError(f"x {tuple(x.shape)} and y {tuple(y.shape)} must have the same shape (..., N)")
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise ValueError("spearman: inputs contain NaN or inf")
    rx, ry = average_ranks(x), average_ranks(y)
    rx = rx - rx.mean(-1, keepdim=True)
    ry = ry - ry.mean(-1, keepdim=True)
    den = ((rx ** 2).sum(-1) * (ry ** 2).sum(-1)).sqrt()
    num = (rx * ry).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def ranking_report(errors: Tensor, scores: Tensor) -> dict[str, float]:
    """How well the scores rank the candidates, averaged over B images.

    errors (B, N): error of each candidate (lower is better); scores (B, N): ranker output (higher is
    better). Returns floats:
      ranked   error of the argmax-score candidate (first on ties)
      mean     mean error over the candidates
      random   expected error of a uniformly random candidate (= mean, by linearity; the paper's baseline)
      best     oracle: the smallest error (the paper's "ideal min")
      gap      ranked - best
      top1     fraction of images whose ranked candidate has the smallest error
      spearman mean over images of the Spearman correlation between -errors and scores (images with
               constant errors or scores are left out; `spearman_images` counts the rest)
      images   B
    """
    if errors.ndim != 2 or errors.shape != scores.shape:
        raise ValueError(f"errors and scores must both be (B, N); got {tuple(errors.shape)} and {tuple(scores.shape)}")
    if errors.shape[1] < 1:
        raise ValueError("ranking_report needs at least one candidate per image")
    errors = errors.to(torch.float64)
    if not (torch.isfinite(errors).all() and torch.isfinite(scores).all()):
        raise ValueError("ranking_report: errors or scores contain NaN or inf")
    pick = scores.argmax(dim=1, keepdim=True)
    ranked = errors.gather(1, pick)[:, 0]
    best = errors.min(dim=1).values
    rho = spearman(-errors, scores.to(torch.float64))
    defined = ~torch.isnan(rho)
    return {
        "ranked": float(ranked.mean()),
        "mean": float(errors.mean()),
        "random": float(errors.mean(dim=1).mean()),
        "best": float(best.mean()),
        "gap": float((ranked - best).mean()),
        "top1": float((ranked <= best).to(torch.float64).mean()),
        "spearman": float(rho[defined].mean()) if bool(defined.any()) else float("nan"),
        "spearman_images": int(defined.sum()),
        "images": int(errors.shape[0]),
    }
