"""IdRank scorer: structure and size of the public code, an explicit reference forward, per-candidate
GroupNorm, N = 1 / B = 1, candidate decoding against the full FLAME forward, config composition, and scoring
straight from shape coefficients (ShapeRanker) against decoding then scoring."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ofer.flame import FLAME, MM_PER_M
from ofer.models.ranker import IdRanker, RankLayer, ShapeRanker, candidate_vertices, ranker_input
from ofer.ranking import listnet_loss, ranking_metrics, ranking_targets

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _small(vf: int = 7, ctx: int = 6, widths=(16, 8), groups: int = 4, seed: int = 0,
           input_norm: bool = False) -> IdRanker:
    torch.manual_seed(seed)
    model = IdRanker(num_face_vertices=vf, ctx_dim=ctx, widths=widths, groups=groups, input_norm=input_norm).double()
    # Non-trivial GroupNorm affine parameters, so a wrong gamma/beta placement shows.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _reference_logits(model: IdRanker, verts: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """The public code's computation written out naively: explicit [M, S - M] rows, the context tiled once
    per candidate row, GroupNorm by hand (biased variance, eps 1e-5) over the channels of each row."""
    B, N = verts.shape[:2]
    rows = ranker_input(verts).reshape(B * N, -1)
    ctx_rows = ctx.repeat_interleave(N, dim=0)  # row b*N + j <- ctx[b], as torch.tile in the public code
    x = rows
    for layer in model.layers:
        z = x @ layer.mlp.weight.T + layer.mlp.bias
        if layer.gn is not None:
            z = F.selu(z)
            G = layer.gn.num_groups
            zg = z.reshape(z.shape[0], G, -1)
            mu = zg.mean(dim=-1, keepdim=True)
            var = ((zg - mu) ** 2).mean(dim=-1, keepdim=True)
            z = ((zg - mu) / torch.sqrt(var + 1e-5)).reshape(z.shape) * layer.gn.weight + layer.gn.bias
        scale = torch.sigmoid(ctx_rows @ layer.scale.weight.T + layer.scale.bias)
        shift = ctx_rows @ layer.shift.weight.T
        x = z * scale + shift
    return x.reshape(B, N)


# ----------------------------------------------------------------------------------------------------
# Structure
# ----------------------------------------------------------------------------------------------------

def test_parameter_count_matches_public_idrank():
    # Hand count of the public code's layers for Vf = 1785 (input 10710): each ScaleShiftGNMLPLayerRank has
    # mlp Linear(in, out), scale Linear(1024, out), shift Linear(1024, out, bias=False), GroupNorm(8, out)
    # (hidden layers only).
    dims = [10710, 4096, 1024, 256, 64, 1]
    expected = 0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        expected += a * b + b + 1024 * b + b + 1024 * b
        if i < 4:
            expected += 2 * b
    assert expected == 59_505_986
    with torch.device("meta"):
        model = IdRanker(num_face_vertices=1785)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.in_dim == 10710
    names = {n for n, _ in model.named_parameters()}
    # Public key layout (ranklayers.i.{mlp,scale,shift,gn}) up to the prefix; shift has no bias.
    assert {"layers.0.mlp.weight", "layers.0.scale.bias", "layers.0.shift.weight", "layers.0.gn.weight",
            "layers.4.mlp.bias"} <= names
    assert "layers.0.shift.bias" not in names and "layers.4.gn.weight" not in names


def test_initialize_weights_is_pytorch_default_and_seeded():
    a, b = _small(seed=3), _small(seed=3)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    model = IdRanker(num_face_vertices=5, ctx_dim=4, widths=(8,), groups=2)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            bound = 1 / math.sqrt(m.in_features)
            assert m.weight.abs().max() <= bound
            # U(-bound, bound) has std bound / sqrt(3); catches an init that leaves zeros or ignores fan-in
            assert m.weight.std() > 0.3 * bound


@pytest.mark.parametrize("bad", [dict(groups=3), dict(widths=()), dict(num_face_vertices=0), dict(ctx_dim=0)])
def test_bad_construction_names_the_value(bad):
    kw = dict(num_face_vertices=5, ctx_dim=4, widths=(8, 4), groups=2) | bad
    with pytest.raises(ValueError, match="IdRanker"):
        IdRanker(**kw)


# ----------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("B,N", [(3, 5), (1, 1), (1, 4), (2, 1)])
def test_forward_matches_naive_reference(B, N):
    model = _small()
    g = torch.Generator().manual_seed(B * 10 + N)
    # mm-scale inputs: a shared face of ~100 mm plus mm-sized per-candidate differences
    verts = 100 * torch.randn(B, 1, 7, 3, generator=g, dtype=torch.float64) + torch.randn(
        B, N, 7, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(B, 6, generator=g, dtype=torch.float64)
    logits = model(verts, ctx)
    assert logits.shape == (B, N)
    torch.testing.assert_close(logits, _reference_logits(model, verts, ctx), rtol=1e-10, atol=1e-10)


def test_ranker_input_layout():
    verts = torch.arange(2 * 3 * 2 * 3, dtype=torch.float64).reshape(2, 3, 2, 3)  # B=2, N=3, Vf=2
    x = ranker_input(verts)
    assert x.shape == (2, 3, 12)
    mean0 = verts[0].mean(dim=0)  # (2, 3)
    # candidate 1 of image 0: [M flattened vertex-major, S_1 - M flattened]
    expected = torch.cat([mean0.reshape(-1), (verts[0, 1] - mean0).reshape(-1)])
    torch.testing.assert_close(x[0, 1], expected)


def test_groupnorm_is_per_candidate_row():
    torch.manual_seed(0)
    layer = RankLayer(10, 8, 3, groups=2).double()
    # rows of different scales (kept moderate: SELU saturates at -1.76 for large negative inputs)
    x = torch.randn(2, 4, 10, dtype=torch.float64) * torch.tensor([1.0, 3.0, 0.3, 2.0], dtype=torch.float64)[:, None]
    ctx = torch.randn(2, 3, dtype=torch.float64)
    full = layer(x, ctx)
    for b in range(2):
        for j in range(4):
            alone = layer(x[b:b + 1, j:j + 1], ctx[b:b + 1])  # a batch of one row: GroupNorm still applied
            torch.testing.assert_close(full[b, j], alone[0, 0])
    # with gamma = 1, beta = 0 and no context modulation, each row's groups are standardised
    with torch.no_grad():
        layer.scale.weight.zero_()
        layer.scale.bias.fill_(50.0)  # sigmoid -> 1
        layer.shift.weight.zero_()
    h = layer(x, ctx).reshape(8, 2, 4)
    torch.testing.assert_close(h.mean(-1), torch.zeros(8, 2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(h.var(-1, unbiased=False), torch.ones(8, 2, dtype=torch.float64), atol=1e-3, rtol=0)


def test_images_do_not_interact_and_candidates_permute():
    model = _small()
    g = torch.Generator().manual_seed(1)
    verts = 50 * torch.randn(3, 6, 7, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(3, 6, generator=g, dtype=torch.float64)
    logits = model(verts, ctx)
    for b in range(3):
        torch.testing.assert_close(model(verts[b:b + 1], ctx[b:b + 1])[0], logits[b])
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    torch.testing.assert_close(model(verts[:, perm], ctx), logits[:, perm])


def test_single_candidate_sees_zero_residual_and_softmax_one():
    model = _small()
    g = torch.Generator().manual_seed(2)
    verts = 80 * torch.randn(2, 1, 7, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 6, generator=g, dtype=torch.float64)
    logits = model(verts, ctx)
    assert logits.shape == (2, 1) and torch.isfinite(logits).all()
    x = ranker_input(verts)
    assert torch.count_nonzero(x[..., 21:]) == 0  # residual half
    torch.testing.assert_close(torch.softmax(logits, dim=1), torch.ones(2, 1, dtype=torch.float64))
    # Two identical candidates: same M, zero residuals -> the same logit as N = 1
    torch.testing.assert_close(model(verts.expand(2, 2, 7, 3), ctx), logits.expand(2, 2))


def test_context_changes_scores():
    model = _small()
    g = torch.Generator().manual_seed(4)
    verts = 20 * torch.randn(1, 5, 7, 3, generator=g, dtype=torch.float64)
    a = model(verts, torch.randn(1, 6, generator=g, dtype=torch.float64))
    b = model(verts, torch.randn(1, 6, generator=g, dtype=torch.float64))
    assert (a - b).abs().max() > 1e-3


def test_bad_inputs_are_named():
    model = _small()
    with pytest.raises(ValueError, match=r"face_vertices_mm must have shape \(B, N >= 1, 7, 3\)"):
        model(torch.zeros(1, 2, 8, 3, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"ctx must have shape \(2, 6\)"):
        model(torch.zeros(2, 2, 7, 3, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="N >= 1"):
        model(torch.zeros(1, 0, 7, 3, dtype=torch.float64), torch.zeros(1, 6, dtype=torch.float64))


def test_learns_to_rank_toy_problem():
    """The network plus ListNet loss can learn a ranking: the context encodes the ground truth, candidates
    are noisy copies of it, and after training the chosen candidate beats a random one on held-out data."""
    vf, n = 4, 8
    torch.manual_seed(0)
    model = IdRanker(num_face_vertices=vf, ctx_dim=vf * 3, widths=(64, 32), groups=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(size: int, gen: torch.Generator):
        gt = 10 * torch.randn(size, vf, 3, generator=gen)
        noise_scale = 3 * torch.rand(size, n, 1, 1, generator=gen)
        cand = gt.unsqueeze(1) + torch.randn(size, n, vf, 3, generator=gen) * noise_scale
        return cand, gt, gt.reshape(size, -1) / 10

    g = torch.Generator().manual_seed(1)
    for _ in range(150):
        cand, gt, ctx = batch(64, g)
        _, target = ranking_targets(cand, gt)
        loss = listnet_loss(model(cand, ctx), target).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    cand, gt, ctx = batch(512, torch.Generator().manual_seed(2))
    errors, _ = ranking_targets(cand, gt)
    with torch.no_grad():
        m = ranking_metrics(model(cand, ctx), errors)
    # chance: chosen = mean_error; top1 = 1/8. The candidate noise scale alone orders the errors here.
    assert m["chosen_error"].mean() < 0.6 * m["mean_error"].mean()
    assert m["top1"].mean() > 0.4


# ----------------------------------------------------------------------------------------------------
# Candidate decoding and config
# ----------------------------------------------------------------------------------------------------

def test_candidate_vertices_match_full_flame_forward(flame):
    face_idx = flame.face_mask("face")
    g = torch.Generator().manual_seed(0)
    shapes = torch.randn(2, 3, 300, generator=g)
    verts = candidate_vertices(flame, shapes, face_idx)
    assert verts.shape == (2, 3, face_idx.numel(), 3)
    # independent path: FLAME forward with full LBS at zero pose and expression, one shape at a time
    for b in range(2):
        for j in range(3):
            ref = flame(shapes[b, j:j + 1]).vertices[0, face_idx] * MM_PER_M
            torch.testing.assert_close(verts[b, j], ref, rtol=1e-5, atol=1e-3)
    # a pure template (zero shape) gives the template in mm
    zero = candidate_vertices(flame, torch.zeros(1, 1, 300), face_idx)
    torch.testing.assert_close(zero[0, 0], flame.v_template[face_idx] * 1000.0)


def test_candidate_vertices_bad_input(flame):
    idx = flame.face_mask("face")
    with pytest.raises(ValueError, match=r"\(B, N, 300\)"):
        candidate_vertices(flame, torch.zeros(2, 300), idx)
    with pytest.raises(ValueError, match="outside the"):
        candidate_vertices(flame, torch.zeros(1, 1, 300), torch.tensor([0, flame.num_vertices]))


def test_config_composes_and_scores_flame_candidates(flame):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    face_idx = flame.face_mask("face")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(overrides=["+model=idrank"])
        small = compose(overrides=["+model=idrank", "model.widths=[32,16]"])
    assert cfg.model.widths == [4096, 1024, 256, 64] and cfg.model.groups == 8 and cfg.model.ctx_dim == 1024
    with torch.device("meta"):
        full = instantiate(cfg.model, num_face_vertices=1785)
    assert sum(p.numel() for p in full.parameters()) == 59_505_986
    torch.manual_seed(0)
    model = instantiate(small.model, num_face_vertices=face_idx.numel())
    shapes = torch.randn(2, 5, 300)
    logits = model(candidate_vertices(flame, shapes, face_idx), torch.randn(2, 1024))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


def test_input_normalization_fit_and_forward():
    """input_norm: the fitted centre/scales equal hand-computed statistics, and the forward equals the naive
    public computation applied to the explicitly standardised rows [(M - C) / s_M, (S - M) / s_R]."""
    torch.manual_seed(1)
    model = IdRanker(num_face_vertices=7, ctx_dim=6, widths=(16, 8), groups=4, input_norm=True).double()
    g = torch.Generator().manual_seed(7)
    train = 100 + 3 * torch.randn(5, 4, 7, 3, generator=g, dtype=torch.float64)
    model.fit_input_normalization(train)
    means = train.mean(1)  # (5,7,3): per-image candidate mean M
    center = means.mean(0)
    s_m = ((means - center) ** 2).mean().sqrt()
    s_r = ((train - means[:, None]) ** 2).mean().sqrt()
    torch.testing.assert_close(model.input_center.double(), center.to(model.input_center.dtype).double())
    torch.testing.assert_close(model.input_scale.double(), torch.stack([s_m, s_r]).double(), rtol=1e-6, atol=0)
    verts = 100 + 3 * torch.randn(2, 4, 7, 3, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 6, generator=g, dtype=torch.float64)
    m = verts.mean(1, keepdim=True)
    # Standardised rows, then the naive reference (an un-normalised model with the same layers)
    std = (m - center) / s_m + (verts - m) / s_r  # mean of std over N is (M - C)/s_M, residual is R/s_R
    ref_model = IdRanker(num_face_vertices=7, ctx_dim=6, widths=(16, 8), groups=4).double()
    ref_model.layers.load_state_dict(model.layers.state_dict())
    torch.testing.assert_close(model(verts, ctx), _reference_logits(ref_model, std, ctx), rtol=1e-6, atol=1e-6)
    # The state dict carries the fitted statistics (a checkpoint reproduces the ranker).
    clone = IdRanker(num_face_vertices=7, ctx_dim=6, widths=(16, 8), groups=4, input_norm=True).double()
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(verts, ctx), model(verts, ctx))
    # Off (the public input): fitting is a no-op and the buffers stay the identity.
    off = _small()
    off.fit_input_normalization(train)
    assert off.input_center.abs().max() == 0 and torch.equal(off.input_scale, torch.ones(2, dtype=off.input_scale.dtype))
    with pytest.raises(ValueError, match="degenerate"):
        model.fit_input_normalization(torch.ones(3, 2, 7, 3))


# ----------------------------------------------------------------------------------------------------
# Scoring from shape coefficients (ShapeRanker)
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[300, 40], ids=["n_shape300", "n_shape40"])
def flame64(request, synthetic_flame):
    """A float64 FLAME; with n_shape=40 only the first 40 of the 300 shape directions are used."""
    return FLAME(synthetic_flame.flame_model, masks_path=synthetic_flame.masks, n_shape=request.param, n_exp=10,
                 dtype=torch.float64)


def _folded_setup(flame: FLAME, *, input_norm: bool, seed: int = 0) -> tuple[IdRanker, Tensor]:
    """A small float64 ranker over the synthetic face mask; with input_norm, fitted on random candidates."""
    face_idx = flame.face_mask("face")
    ranker = _small(vf=face_idx.numel(), input_norm=input_norm, seed=seed)
    if input_norm:
        g = torch.Generator().manual_seed(100 + seed)
        ranker.fit_input_normalization(
            candidate_vertices(flame, torch.randn(4, 6, flame.n_shape, generator=g, dtype=torch.float64), face_idx))
        assert ranker.input_center.abs().max() > 1 and not torch.equal(ranker.input_scale, torch.ones(2).double())
    return ranker.requires_grad_(False), face_idx


@pytest.mark.parametrize("input_norm", [False, True], ids=["raw", "input_norm"])
@pytest.mark.parametrize("B,N", [(3, 5), (2, 1), (1, 1)])
def test_shape_ranker_equals_decode_then_score(flame64, input_norm, B, N):
    ranker, face_idx = _folded_setup(flame64, input_norm=input_norm)
    folded = ShapeRanker(ranker, flame64, face_idx)
    g = torch.Generator().manual_seed(B * 10 + N)
    shapes = torch.randn(B, N, flame64.n_shape, generator=g, dtype=torch.float64)
    ctx = torch.randn(B, 6, generator=g, dtype=torch.float64)
    got = folded(shapes, ctx)
    want = ranker(candidate_vertices(flame64, shapes, face_idx), ctx)
    assert got.shape == (B, N) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if N > 1:
        # Within an image the logits differ by little without input_norm (the mean term dominates; see the
        # module notes), so compare the differences on their own scale too: a wrong residual term shows there.
        spread = float((want.max(dim=1).values - want.min(dim=1).values).min())
        assert spread > 1e-8
        centred = (lambda z: z - z.mean(dim=1, keepdim=True))
        torch.testing.assert_close(centred(got), centred(want), rtol=0, atol=1e-6 * spread)
    assert folded.mean_weight.shape == (16, flame64.n_shape) and folded.mean_bias.shape == (16,)


@pytest.mark.parametrize("input_norm", [False, True], ids=["raw", "input_norm"])
def test_shape_ranker_first_layer_is_the_explicit_linear(flame64, input_norm):
    """Independent of the ranker's forward and of candidate_vertices: decode with FLAME's full forward (LBS at
    zero pose), build the public code's rows [M, S_i - M] with ranker_input, standardise them by hand, apply the
    first Linear as one matmul."""
    ranker, face_idx = _folded_setup(flame64, input_norm=input_norm, seed=1)
    folded = ShapeRanker(ranker, flame64, face_idx)
    B, N = 2, 4
    shapes = torch.randn(B, N, flame64.n_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    verts = flame64(shapes.reshape(B * N, -1)).vertices[:, face_idx].reshape(B, N, -1, 3) * MM_PER_M
    x = ranker_input(verts)  # (B, N, 2*Vf*3)
    if input_norm:
        half = x.shape[-1] // 2
        s_m, s_r = ranker.input_scale
        x = torch.cat([(x[..., :half] - ranker.input_center.reshape(-1)) / s_m, x[..., half:] / s_r], dim=-1)
    lin = ranker.layers[0].mlp
    want = x @ lin.weight.T + lin.bias  # (B, N, 16)
    got = folded.first_preactivation(shapes)
    assert got.shape == (B, N, 16)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9 * float(want.abs().max()))
    # not vacuous: the candidates of an image have different pre-activations
    assert (want - want.mean(dim=1, keepdim=True)).abs().max() > 1e-3 * want.abs().max()


def test_shape_ranker_refolds_when_the_source_changes(synthetic_flame):
    """The fold follows in-place writes to the ranker (load_state_dict, a refitted normalisation), the input_norm
    flag and a dtype change."""
    flame64 = FLAME(synthetic_flame.flame_model, masks_path=synthetic_flame.masks, dtype=torch.float64)
    ranker, face_idx = _folded_setup(flame64, input_norm=True)
    folded = ShapeRanker(ranker, flame64, face_idx)
    g = torch.Generator().manual_seed(3)
    shapes = torch.randn(2, 5, 300, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 6, generator=g, dtype=torch.float64)

    def check(rtol: float = 1e-9) -> Tensor:
        got = folded(shapes.to(ranker.input_scale.dtype), ctx.to(ranker.input_scale.dtype))
        want = ranker(candidate_vertices(flame64, shapes.to(flame64.v_template.dtype), face_idx), ctx.to(got.dtype))
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol)
        return got

    before = check()
    other, _ = _folded_setup(flame64, input_norm=True, seed=7)
    ranker.load_state_dict(other.state_dict())  # in-place copies
    after = check()
    assert (after - before).abs().max() > 1e-3
    ranker.fit_input_normalization(candidate_vertices(flame64, 3 * torch.randn(3, 4, 300, dtype=torch.float64),
                                                      face_idx))
    check()
    ranker.input_norm = False
    check()
    folded.float()  # the ranker and FLAME with it
    assert check(rtol=1e-4).dtype == torch.float32 and folded.resid_weight.dtype == torch.float32


def test_shape_ranker_gradients_and_inference_only(flame):
    face_idx = flame.face_mask("face")
    torch.manual_seed(0)
    ranker = IdRanker(num_face_vertices=face_idx.numel(), ctx_dim=6, widths=(16, 8), groups=4)
    folded = ShapeRanker(ranker, flame, face_idx)
    shapes = torch.randn(2, 3, 300, requires_grad=True)
    ctx = torch.randn(2, 6)
    with pytest.raises(RuntimeError, match="inference-only"):
        folded(shapes, ctx)
    with torch.no_grad():
        assert folded(shapes, ctx).shape == (2, 3)
    # Without gradients for the ranker, those with respect to the shapes are the decoded path's.
    ranker.requires_grad_(False)
    (grad,) = torch.autograd.grad(folded(shapes, ctx).square().sum(), shapes)
    (want,) = torch.autograd.grad(ranker(candidate_vertices(flame, shapes, face_idx), ctx).square().sum(), shapes)
    assert grad.abs().max() > 0
    torch.testing.assert_close(grad, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))


def test_shape_ranker_bad_inputs_are_named(flame):
    face_idx = flame.face_mask("face")
    ranker = IdRanker(num_face_vertices=face_idx.numel(), ctx_dim=6, widths=(8,), groups=2).requires_grad_(False)
    with pytest.raises(TypeError, match="ShapeRanker: ranker must be an IdRanker, got Linear"):
        ShapeRanker(torch.nn.Linear(3, 1), flame, face_idx)
    with pytest.raises(ValueError, match=f"ShapeRanker: face_idx has 3 vertices, the ranker expects "
                                         f"num_face_vertices={face_idx.numel()}"):
        ShapeRanker(ranker, flame, face_idx[:3])
    with pytest.raises(ValueError, match="ShapeRanker: face_idx spans"):
        ShapeRanker(ranker, flame, face_idx.clone().fill_(flame.num_vertices))
    with pytest.raises(ValueError, match="ShapeRanker: face_idx must be a non-empty 1-D integer tensor"):
        ShapeRanker(ranker, flame, face_idx.float())
    folded = ShapeRanker(ranker, flame, face_idx)
    ctx = torch.zeros(2, 6)
    for bad in (torch.zeros(2, 300), torch.zeros(2, 3, 299), torch.zeros(2, 0, 300)):
        with pytest.raises(ValueError, match=r"ShapeRanker: shapes must have shape \(B, N >= 1, 300\), got "
                                             + re.escape(str(tuple(bad.shape)))):
            folded(bad, ctx)
    with pytest.raises(ValueError, match=r"ShapeRanker: ctx must have shape \(2, 6\), got \(2, 5\)"):
        folded(torch.zeros(2, 3, 300), torch.zeros(2, 5))
