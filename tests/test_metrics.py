"""Metrics: closed-form cases, numpy/scipy references, masks, batch size 1, devices, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr

from ofer.eval.metrics import (
    asd, average_ranks, cse_rmse, ode_rate, ode_rate_vertices, ode_threshold, project_to_shape_space,
    ranking_report, sample_rmse, se_rmse, spearman, std_s, vertex_rmse,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# RMSE, SE, CSE
# ------------------------------------------------------------------------------------------------

def test_translation_gives_its_length():
    g = _gen()
    gt = 100 * torch.randn(4, 50, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0], [1.0, 2.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    pred = gt + t[:, None, :]
    expected = torch.tensor([5.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(vertex_rmse(pred, gt), expected)
    torch.testing.assert_close(se_rmse(pred, gt, torch.arange(10, 30)), expected)
    torch.testing.assert_close(vertex_rmse(pred, gt, mask=torch.tensor([7])), expected)


def test_rmse_matches_numpy_with_masks():
    rng = np.random.default_rng(1)
    p, q = rng.normal(size=(3, 40, 3)), rng.normal(size=(3, 40, 3))
    idx = np.array([0, 5, 6, 7, 39])
    sq = ((p - q) ** 2).sum(-1)
    want_idx = np.sqrt(sq[:, idx].mean(1))
    got = vertex_rmse(torch.from_numpy(p), torch.from_numpy(q), mask=torch.from_numpy(idx))
    np.testing.assert_allclose(got.numpy(), want_idx, rtol=1e-12)
    boolean = np.zeros(40, bool)
    boolean[idx] = True
    got_bool = vertex_rmse(torch.from_numpy(p), torch.from_numpy(q), mask=torch.from_numpy(boolean))
    np.testing.assert_allclose(got_bool.numpy(), want_idx, rtol=1e-12)
    # One region per image.
    per_image = rng.uniform(size=(3, 40)) < 0.3
    want = [np.sqrt(sq[b, per_image[b]].mean()) for b in range(3)]
    got = vertex_rmse(torch.from_numpy(p), torch.from_numpy(q), mask=torch.from_numpy(per_image))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    # No mask: all vertices.
    np.testing.assert_allclose(vertex_rmse(torch.from_numpy(p), torch.from_numpy(q)).numpy(),
                               np.sqrt(sq.mean(1)), rtol=1e-12)


def test_empty_region_is_nan_and_others_unaffected():
    gt = torch.zeros(2, 5, 3)
    pred = torch.ones(2, 5, 3)
    mask = torch.tensor([[True, False, False, False, False], [False] * 5])
    out = vertex_rmse(pred, gt, mask=mask)
    assert out[0].item() == pytest.approx(3 ** 0.5)
    assert torch.isnan(out[1])


def test_cse_picks_the_closest_sample():
    g = _gen(2)
    B, N, V = 3, 6, 30
    gt = torch.randn(B, V, 3, generator=g, dtype=torch.float64)
    offsets = torch.tensor([[5.0, 3.0, 0.5, 4.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                            [9.0, 8.0, 7.0, 6.0, 5.0, 0.25]], dtype=torch.float64)
    direction = torch.randn(B, N, 1, 3, generator=g, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    samples = gt[:, None] + offsets[..., None, None] * direction  # each sample translated by its offset
    res = cse_rmse(samples, gt)
    assert res.index.tolist() == [2, 0, 5]
    torch.testing.assert_close(res.rmse, torch.tensor([0.5, 1.0, 0.25], dtype=torch.float64))
    torch.testing.assert_close(sample_rmse(samples, gt), offsets)
    # Unpacks like a tuple.
    rmse, index = res
    assert index.dtype == torch.long and rmse.shape == (B,)


def test_cse_depends_on_the_region():
    V = 10
    gt = torch.zeros(1, V, 3)
    exact_on_front = torch.zeros(V, 3)
    exact_on_front[5:, 0] = 10.0  # perfect on vertices 0..4, far elsewhere
    uniform = torch.full((V, 3), 0.0)
    uniform[:, 1] = 1.0  # 1 everywhere
    samples = torch.stack([uniform, exact_on_front])[None]  # (1, 2, V, 3)
    assert cse_rmse(samples, gt).index.item() == 0
    front = cse_rmse(samples, gt, torch.arange(5))
    assert front.index.item() == 1 and front.rmse.item() == 0.0
    per_image = torch.zeros(1, V, dtype=torch.bool)
    per_image[0, :5] = True
    assert cse_rmse(samples, gt, per_image).index.item() == 1


# ------------------------------------------------------------------------------------------------
# STD-S and ASD
# ------------------------------------------------------------------------------------------------

def test_identical_samples_have_no_spread():
    x = torch.randn(2, 1, 20, 3, generator=_gen(3)).expand(2, 7, 20, 3)
    torch.testing.assert_close(std_s(x, torch.arange(20)), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(asd(x), torch.zeros(2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_two_samples_at_plus_minus_d(axis):
    d = 2.5
    centre = torch.randn(1, 1, 15, 3, generator=_gen(axis), dtype=torch.float64)
    step = torch.zeros(3, dtype=torch.float64)
    step[axis] = d
    x = torch.cat([centre + step, centre - step], dim=1)  # (1, 2, 15, 3)
    torch.testing.assert_close(std_s(x), torch.tensor([d], dtype=torch.float64))
    torch.testing.assert_close(asd(x), torch.tensor([2 * d], dtype=torch.float64))
    torch.testing.assert_close(asd(x, torch.tensor([0, 3])), torch.tensor([2 * d], dtype=torch.float64))


def test_std_s_and_asd_match_numpy_scipy():
    rng = np.random.default_rng(4)
    B, N, V = 2, 9, 25
    x = rng.normal(size=(B, N, V, 3)) * rng.uniform(0.1, 3.0, size=(1, 1, V, 1))
    region = rng.uniform(size=(B, V)) < 0.5
    sigma = np.sqrt(np.var(x, axis=1, ddof=0).sum(-1))  # (B, V): sqrt of the covariance trace
    want_std = [sigma[b, region[b]].mean() for b in range(B)]
    got_std = std_s(torch.from_numpy(x), torch.from_numpy(region))
    np.testing.assert_allclose(got_std.numpy(), want_std, rtol=1e-12)
    # ASD: mean over vertices of the mean pairwise distance (the two means commute).
    want_asd = [np.mean([pdist(x[b, :, v]).mean() for v in np.flatnonzero(region[b])]) for b in range(B)]
    got_asd = asd(torch.from_numpy(x), torch.from_numpy(region))
    np.testing.assert_allclose(got_asd.numpy(), want_asd, rtol=1e-12)
    # Occluded / visible split: complementary regions, both computed.
    vis = std_s(torch.from_numpy(x), torch.from_numpy(~region))
    np.testing.assert_allclose(vis.numpy(), [sigma[b, ~region[b]].mean() for b in range(B)], rtol=1e-12)


def test_std_s_empty_region_is_nan():
    x = torch.randn(2, 3, 4, 3, generator=_gen(5))
    region = torch.tensor([[True, True, False, False], [False] * 4])
    out = std_s(x, region)
    assert torch.isfinite(out[0]) and torch.isnan(out[1])


def test_batch_size_one_keeps_the_batch_dim():
    x = torch.randn(1, 4, 10, 3, generator=_gen(6))
    gt = torch.randn(1, 10, 3, generator=_gen(7))
    assert std_s(x).shape == (1,)
    assert asd(x).shape == (1,)
    assert cse_rmse(x, gt).rmse.shape == (1,)
    assert se_rmse(x[:, 0], gt).shape == (1,)
    assert ode_rate(torch.randn(1, 4, 300, generator=_gen(8))).shape == (1,)
    assert ranking_report(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]]))["images"] == 1


def test_bad_input_is_named():
    x = torch.zeros(2, 3, 10, 3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        asd(x[:, :1])
    with pytest.raises(ValueError, match=r"'samples' must have shape \(B, N, V, 3\)"):
        std_s(torch.zeros(3, 10, 3))
    with pytest.raises(ValueError, match="outside"):
        std_s(x, torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"'gt' must have shape"):
        cse_rmse(x, torch.zeros(2, 9, 3))
    with pytest.raises(ValueError, match=r"\(B, V\) = \(2, 10\)"):
        std_s(x, torch.ones(3, 10, dtype=torch.bool))
    with pytest.raises(TypeError, match="indices"):
        std_s(x, torch.ones(10))


# ------------------------------------------------------------------------------------------------
# ODE rate
# ------------------------------------------------------------------------------------------------

def test_ode_threshold_against_wilson_hilferty():
    # Wilson-Hilferty: chi2_k quantile ~ k (1 - 2/(9k) + z sqrt(2/(9k)))^3, accurate to ~0.1% at k = 300.
    k, z = 300, 3.090232306167813  # z = Phi^-1(0.999)
    approx = k * (1 - 2 / (9 * k) + z * (2 / (9 * k)) ** 0.5) ** 3
    assert ode_threshold(300) == pytest.approx(approx, rel=2e-3)
    assert ode_threshold(300) == pytest.approx(381.43, abs=0.01)


def test_ode_rate_counts_norms_above_threshold():
    thr = ode_threshold(300)
    shapes = torch.zeros(1, 4, 300, dtype=torch.float64)
    shapes[0, 0, 0] = (thr + 1) ** 0.5
    shapes[0, 1, 7] = (thr - 1) ** 0.5
    shapes[0, 2, :] = ((thr + 0.5) / 300) ** 0.5
    assert ode_rate(shapes).item() == pytest.approx(0.5)
    assert ode_rate(shapes, threshold=0.5).item() == pytest.approx(0.75)


@pytest.mark.parametrize("scale,expected,tol,chunks", [(1.0, 0.001, 4e-4, 8), (2.0, 1.0, 1e-4, 1)])
def test_ode_rate_under_the_prior_and_a_wider_one(scale, expected, tol, chunks):
    g = _gen(9)
    rates = [ode_rate(scale ** 0.5 * torch.randn(10, 1000, 300, generator=g, dtype=torch.float64)).mean()
             for _ in range(chunks)]  # 80k samples at scale 1: binomial std of the rate at 0.001 is 1.1e-4
    assert float(torch.stack(rates).mean()) == pytest.approx(expected, abs=tol)


def test_vertex_space_ode_recovers_the_coefficients():
    g = _gen(10)
    V, K = 60, 20
    basis = torch.randn(V, 3, K, generator=g, dtype=torch.float64)
    template = torch.randn(V, 3, generator=g, dtype=torch.float64)
    beta = torch.randn(3, 50, K, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1.5, 3.0])[:, None, None]
    verts = template + torch.einsum("bnk,vck->bnvc", beta, basis)
    coeffs, resid = project_to_shape_space(verts, template=template, shapedirs=basis)
    torch.testing.assert_close(coeffs, beta)
    assert float(resid.abs().max()) < 1e-9
    torch.testing.assert_close(ode_rate_vertices(verts, template=template, shapedirs=basis), ode_rate(beta))
    # A fit on a region recovers the same coefficients; an off-space offset shows up as residual.
    region = torch.arange(0, V, 2)
    coeffs_region, _ = project_to_shape_space(verts, template=template, shapedirs=basis, mask=region)
    torch.testing.assert_close(coeffs_region, beta)
    null = torch.linalg.svd(basis.reshape(-1, K), full_matrices=True).U[:, K].reshape(V, 3)
    _, resid = project_to_shape_space(verts + 2.0 * null, template=template, shapedirs=basis)
    torch.testing.assert_close(resid, torch.full_like(resid, 2.0 / V ** 0.5))
    with pytest.raises(ValueError, match="fewer than"):
        project_to_shape_space(verts, template=template, shapedirs=basis, mask=torch.arange(3))


# ------------------------------------------------------------------------------------------------
# Ranking
# ------------------------------------------------------------------------------------------------

def test_average_ranks_and_spearman_against_scipy():
    rng = np.random.default_rng(11)
    x = rng.integers(0, 5, size=(6, 12)).astype(float)  # many ties
    y = rng.integers(0, 4, size=(6, 12)).astype(float) + 0.1 * x
    from scipy.stats import rankdata

    np.testing.assert_allclose(average_ranks(torch.from_numpy(x)).numpy(), rankdata(x, axis=1))
    got = spearman(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = [spearmanr(x[b], y[b]).statistic for b in range(6)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    z = rng.normal(size=(3, 40))
    w = z + rng.normal(size=(3, 40))
    np.testing.assert_allclose(spearman(torch.from_numpy(z), torch.from_numpy(w)).numpy(),
                               [spearmanr(z[b], w[b]).statistic for b in range(3)], rtol=1e-12)
    const = spearman(torch.ones(1, 5), torch.arange(5.0)[None])
    assert torch.isnan(const).all()


def test_ranking_report_by_hand():
    errors = torch.tensor([[3.0, 1.0, 2.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.0, 1.0, 0.5, 0.2]])
    r = ranking_report(errors, scores)
    assert r["ranked"] == pytest.approx((1.0 + 2.0) / 2)
    assert r["mean"] == pytest.approx(2.5) and r["random"] == pytest.approx(2.5)
    assert r["best"] == pytest.approx(1.0)
    assert r["gap"] == pytest.approx(0.5)
    assert r["top1"] == pytest.approx(0.5)
    # Image 0: scores rank the candidates exactly as -errors -> 1. Image 1: by hand, ranks of -errors
    # (4,3,2,1) and of scores (1,4,3,2): d = (3,-1,-1,-1), rho = 1 - 6*12/(4*15) = -0.2.
    assert r["spearman"] == pytest.approx((1.0 - 0.2) / 2)
    assert r["spearman_images"] == 2 and r["images"] == 2
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        ranking_report(errors, scores[:, :3])


# ------------------------------------------------------------------------------------------------
# Devices and dtypes
# ------------------------------------------------------------------------------------------------

def _run_all(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = _gen(12)
    x = torch.randn(2, 5, 30, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    gt = torch.randn(2, 30, 3, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    region = (torch.rand(2, 30, generator=g) < 0.5).to(device)
    return {
        "rmse": vertex_rmse(x[:, 0], gt, mask=region), "cse": cse_rmse(x, gt, region).rmse,
        "std": std_s(x, region), "asd": asd(x, torch.arange(10, device=device)),
        "ode": ode_rate(torch.randn(2, 5, 300, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)),
    }


def test_outputs_keep_device_and_dtype():
    for name, v in _run_all(torch.device("cpu"), torch.float32).items():
        assert v.dtype == torch.float32 and v.device.type == "cpu", name


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cpu = _run_all(torch.device("cpu"), torch.float64)
    gpu = _run_all(torch.device("cuda"), torch.float64)
    for k in cpu:
        assert gpu[k].device.type == "cuda"
        torch.testing.assert_close(gpu[k].cpu(), cpu[k], msg=k)
