"""IdRank targets and ListNet loss against hand-computed values; candidate pools: batched generation, storage
round trip, staleness and key checks, atomic writes, the dataset wrapper."""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ofer.ranking as ranking
from ofer.ranking import (
    CandidatePool, PoolDataset, PoolError, StalePoolError, ensure_pool, file_sha256, generate_pools, listnet_loss,
    load_pool, ranking_metrics, ranking_targets, save_pool,
)

# ----------------------------------------------------------------------------------------------------
# Targets and loss
# ----------------------------------------------------------------------------------------------------


def _three_candidates() -> tuple[torch.Tensor, torch.Tensor]:
    """gt = 0 on 2 vertices; candidate errors (mean of |.| over 2 x 3 numbers): 1, 2, 0.5 mm."""
    gt = torch.zeros(1, 2, 3, dtype=torch.float64)
    c0 = torch.ones(2, 3)  # 6 / 6 = 1
    c1 = torch.tensor([[2.0, -2.0, 2.0], [-2.0, 2.0, 2.0]])  # signs must not cancel: 12 / 6 = 2
    c2 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -3.0]])  # 3 / 6 = 0.5
    return torch.stack([c0, c1, c2])[None].double(), gt


def test_ranking_targets_hand_computed():
    cand, gt = _three_candidates()
    errors, target = ranking_targets(cand, gt)
    torch.testing.assert_close(errors, torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64))
    # softmax(-[1, 2, 0.5]): e^-1 = 0.3678794, e^-2 = 0.1353353, e^-0.5 = 0.6065307, sum = 1.1097454;
    # 0.3678794 / 1.1097454 = 0.3314990 etc.
    torch.testing.assert_close(target, torch.tensor([[0.3314990, 0.1219517, 0.5465494]], dtype=torch.float64),
                               atol=1e-6, rtol=0)
    # shifting gt and candidates together changes nothing (errors are differences)
    errors2, _ = ranking_targets(cand + 7.0, gt + 7.0)
    torch.testing.assert_close(errors2, errors)


def test_ranking_targets_temperature():
    cand, gt = _three_candidates()
    _, t_half = ranking_targets(cand, gt, temperature=0.5)
    # softmax(-[2, 4, 1]) = [e^-2, e^-4, e^-1] / sum
    e = [math.exp(-2), math.exp(-4), math.exp(-1)]
    torch.testing.assert_close(t_half[0], torch.tensor([x / sum(e) for x in e], dtype=torch.float64))
    best = []
    for T in (100.0, 1.0, 0.5, 0.1, 0.01):
        _, t = ranking_targets(cand, gt, temperature=T)
        torch.testing.assert_close(t.sum(-1), torch.ones(1, dtype=torch.float64))
        best.append(float(t[0, 2]))
    assert all(a < b for a, b in zip(best, best[1:]))  # colder -> more mass on the best candidate
    assert best[0] < 1 / 3 + 0.01 and best[-1] > 0.999  # hot: ~uniform; cold: ~one-hot at argmin
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            ranking_targets(cand, gt, temperature=bad)


def test_ranking_targets_shape_errors_and_detached():
    cand = torch.zeros(2, 4, 5, 3, requires_grad=True)
    errors, target = ranking_targets(cand, torch.ones(2, 5, 3))
    assert not errors.requires_grad and not target.requires_grad
    torch.testing.assert_close(errors, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"gt_mm must have shape \(2, 5, 3\)"):
        ranking_targets(cand, torch.ones(2, 6, 3))


def test_listnet_loss_hand_computed_and_against_cross_entropy():
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    target = torch.tensor([[0.25, 0.25, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    loss = listnet_loss(logits, target)
    # row 0: -sum t log(1/3) = log 3; row 1: -log(e / (e + 2))
    expected = torch.tensor([math.log(3.0), math.log((math.e + 2) / math.e)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g, dtype=torch.float64)
    target = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(listnet_loss(logits, target), F.cross_entropy(logits, target, reduction="none"))
    with pytest.raises(ValueError, match="listnet_loss"):
        listnet_loss(logits, target[:, :3])


def test_listnet_minimum_is_target_entropy_at_minus_errors_over_t():
    g = torch.Generator().manual_seed(1)
    cand = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    gt = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    for T in (1.0, 0.3):
        errors, target = ranking_targets(cand, gt, temperature=T)
        entropy = -(target * target.log()).sum(-1)
        best = listnet_loss(-errors / T, target)
        torch.testing.assert_close(best, entropy)
        torch.testing.assert_close(listnet_loss(-errors / T + 5.0, target), entropy)  # per-row shift invariant
        for _ in range(5):
            other = -errors / T + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)
            assert (listnet_loss(other, target) > entropy).all()  # Gibbs' inequality


def test_listnet_gradient_raises_best_candidate():
    cand, gt = _three_candidates()
    _, target = ranking_targets(cand, gt)
    logits = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    listnet_loss(logits, target).sum().backward()
    torch.testing.assert_close(logits.grad, torch.full((1, 3), 1 / 3, dtype=torch.float64) - target)
    assert logits.grad[0, 2] < 0 and logits.grad[0, 1] > 0  # descent raises the best (index 2), lowers the worst
    with torch.no_grad():
        stepped = logits - 1.0 * logits.grad
    assert torch.softmax(stepped, -1)[0, 2] > 1 / 3


def test_ranking_metrics_hand_case():
    errors = torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, 2.0]])
    logits = torch.tensor([[0.0, 1.0, 0.5], [0.0, 9.0, 1.0]])  # picks 2.0 (wrong), then 1.0 (right)
    m = ranking_metrics(logits, errors)
    torch.testing.assert_close(m["chosen_error"], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(m["best_error"], torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(m["mean_error"], torch.tensor([3.5 / 3, 2.0]))
    torch.testing.assert_close(m["top1"], torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(m["regret"], torch.tensor([1.5, 0.0]))


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------


class FakeSampler:
    """Returns candidate j of the image with condition c as (c[0] + 0.01 j) repeated D times; records calls."""

    def __init__(self, dim: int = 5) -> None:
        self.dim = dim
        self.calls: list[tuple[int, object]] = []

    def __call__(self, cond: torch.Tensor, *, num_samples: int, generator: torch.Generator | None = None):
        self.calls.append((cond.shape[0], generator))
        j = torch.arange(num_samples, dtype=torch.float32) * 0.01
        return (cond[:, :1, None] + j[None, :, None]).expand(-1, -1, self.dim).clone().double()


def test_generate_pools_batches_in_order():
    conds = torch.arange(7, dtype=torch.float32)[:, None].expand(7, 3).clone()
    fake = FakeSampler()
    g = torch.Generator()
    pool = generate_pools(fake, conds, num_candidates=4, batch_images=3, generator=g)
    assert [c[0] for c in fake.calls] == [3, 3, 1]
    assert all(c[1] is g for c in fake.calls)
    assert pool.shape == (7, 4, 5) and pool.dtype == torch.float32 and pool.device.type == "cpu"
    expected = torch.arange(7, dtype=torch.float32)[:, None] + 0.01 * torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(pool[..., 0], expected)
    # one batch gives the same pool
    torch.testing.assert_close(generate_pools(FakeSampler(), conds, num_candidates=4, batch_images=100), pool)
    # without a generator the keyword is not passed (closures need not accept it)
    generate_pools(lambda c, num_samples: torch.zeros(c.shape[0], num_samples, 2), conds, num_candidates=2)


def test_generate_pools_checks_sampler_output():
    conds = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"returned shape \(2, 3, 5\) for images \[0, 2\), expected \(2, 4, D\)"):
        generate_pools(lambda c, num_samples: torch.zeros(c.shape[0], 3, 5), conds, num_candidates=4, batch_images=2)
    with pytest.raises(ValueError, match="NaN"):
        generate_pools(lambda c, num_samples: torch.full((c.shape[0], num_samples, 2), float("nan")), conds,
                       num_candidates=2)
    with pytest.raises(ValueError, match="num_images"):
        generate_pools(FakeSampler(), torch.zeros(3), num_candidates=2)


def test_generate_pools_with_the_real_sampler():
    from ofer.diffusion import GaussianDiffusion
    from ofer.models.unet1d import Denoiser

    torch.manual_seed(0)
    model = Denoiser(dim=300, cond_dim=8, widths=(16, 8), time_dim=16, attention=False, groups=1).eval()
    diffusion = GaussianDiffusion(num_steps=20)
    conds = torch.randn(5, 8)
    sample_fn = functools.partial(diffusion.sample, model, dim=300, sampler="ddim", steps=3)
    pool = generate_pools(sample_fn, conds, num_candidates=6, batch_images=8,
                          generator=torch.Generator().manual_seed(3))
    direct = diffusion.sample(model, conds, dim=300, num_samples=6, sampler="ddim", steps=3,
                              generator=torch.Generator().manual_seed(3))
    assert pool.shape == (5, 6, 300)
    torch.testing.assert_close(pool, direct)


# ----------------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------------

KEYS = ["FLORENCE/a/001.jpg", "FLORENCE/a/002.jpg", "STIRLING/b/x.png"]
SAMPLER = {"sampler": "ddpm", "steps": None, "eta": 0.0}


def _shapes(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, 300, generator=torch.Generator().manual_seed(seed))


def test_file_sha256_known_vector(tmp_path):
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    # FIPS 180-2 test vector
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    big = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(3_000_001)
    big.write_bytes(data)
    assert file_sha256(big, chunk_bytes=65536) == hashlib.sha256(data).hexdigest()
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        file_sha256(tmp_path / "missing.pt")


def test_pool_round_trip(tmp_path):
    shapes = _shapes()
    path = save_pool(tmp_path / "pools" / "train.npz", shapes, idgen_checkpoint_hash="aa11", image_keys=KEYS,
                     sampler=SAMPLER)
    assert path.is_file() and list(path.parent.iterdir()) == [path]  # no temp file left
    pool = load_pool(path, expect_hash="aa11", expect_keys=KEYS[::-1])
    assert pool.image_keys == KEYS and pool.idgen_checkpoint_hash == "aa11" and pool.sampler == SAMPLER
    assert pool.shapes.dtype == torch.float32 and pool.num_candidates == 4 and len(pool) == 3
    torch.testing.assert_close(pool.shapes, shapes)
    torch.testing.assert_close(pool.candidates("STIRLING/b/x.png"), shapes[2])
    # the file is plain arrays: readable without pickle
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == ["keys", "meta", "shapes"]


def test_stale_hash_names_both(tmp_path):
    path = save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="old1234", image_keys=KEYS, sampler=SAMPLER)
    with pytest.raises(StalePoolError, match=r"sha256 old1234.*current checkpoint is sha256 new5678"):
        load_pool(path, expect_hash="new5678")
    assert load_pool(path).idgen_checkpoint_hash == "old1234"  # no expectation, no check


def test_key_mismatch_names_missing(tmp_path):
    path = save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="h", image_keys=KEYS, sampler=SAMPLER)
    load_pool(path, expect_keys=KEYS[:2])  # a subset is fine
    with pytest.raises(StalePoolError, match=r"lacks 1 of the 3 expected image keys \(e.g. \['NOW/c/1.jpg'\]\)"):
        load_pool(path, expect_keys=KEYS[:2] + ["NOW/c/1.jpg"])
    with pytest.raises(KeyError, match="NOW/c/1.jpg"):
        load_pool(path).candidates("NOW/c/1.jpg")


def test_save_pool_validates(tmp_path):
    with pytest.raises(PoolError, match="2 image keys for 3 images"):
        save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="h", image_keys=KEYS[:2], sampler=SAMPLER)
    with pytest.raises(PoolError, match="duplicate"):
        save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="h", image_keys=[KEYS[0]] * 3, sampler=SAMPLER)
    with pytest.raises(PoolError, match="idgen_checkpoint_hash"):
        save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="", image_keys=KEYS, sampler=SAMPLER)
    with pytest.raises(PoolError, match="JSON"):
        save_pool(tmp_path / "p.npz", _shapes(), idgen_checkpoint_hash="h", image_keys=KEYS, sampler={"x": object()})
    with pytest.raises(PoolError, match="NaN"):
        save_pool(tmp_path / "p.npz", torch.full((3, 4, 300), float("nan")), idgen_checkpoint_hash="h",
                  image_keys=KEYS, sampler=SAMPLER)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    real_savez = np.savez

    def failing_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial zip")  # some bytes reach the disk, then the write fails
        raise OSError(28, "No space left on device")

    path = tmp_path / "p.npz"
    monkeypatch.setattr(ranking.np, "savez", failing_savez)
    with pytest.raises(OSError, match="No space left"):
        save_pool(path, _shapes(), idgen_checkpoint_hash="h1", image_keys=KEYS, sampler=SAMPLER)
    assert list(tmp_path.iterdir()) == []
    # an existing pool survives a failed overwrite untouched
    monkeypatch.setattr(ranking.np, "savez", real_savez)
    save_pool(path, _shapes(seed=1), idgen_checkpoint_hash="h1", image_keys=KEYS, sampler=SAMPLER)
    monkeypatch.setattr(ranking.np, "savez", failing_savez)
    with pytest.raises(OSError):
        save_pool(path, _shapes(seed=2), idgen_checkpoint_hash="h2", image_keys=KEYS, sampler=SAMPLER)
    assert list(tmp_path.iterdir()) == [path]
    pool = load_pool(path, expect_hash="h1")
    torch.testing.assert_close(pool.shapes, _shapes(seed=1))


def test_unreadable_pool_names_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PoolError, match="bad.npz"):
        load_pool(bad)
    other = tmp_path / "other.npz"
    np.savez(other, shapes=np.zeros((1, 2, 3), np.float32))
    with pytest.raises(PoolError, match=r"missing entries \['keys', 'meta'\]"):
        load_pool(other)
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        load_pool(tmp_path / "nothere.npz")


# ----------------------------------------------------------------------------------------------------
# ensure_pool and the dataset wrapper
# ----------------------------------------------------------------------------------------------------


def test_ensure_pool_generates_reuses_and_refreshes(tmp_path):
    ckpt = tmp_path / "idgen.pt"
    ckpt.write_bytes(b"weights v1")
    path = tmp_path / "pool.npz"
    fake = FakeSampler(dim=300)
    feature_calls = []

    def conds():
        feature_calls.append(1)
        return torch.arange(3, dtype=torch.float32)[:, None].expand(3, 2).clone()

    kw = dict(sample_fn=fake, conds=conds, image_keys=KEYS, idgen_checkpoint=ckpt, sampler=SAMPLER, num_candidates=4)
    pool = ensure_pool(path, **kw)
    assert len(fake.calls) == 1 and len(feature_calls) == 1
    assert pool.idgen_checkpoint_hash == hashlib.sha256(b"weights v1").hexdigest()
    torch.testing.assert_close(pool.candidates(KEYS[1])[:, 0], 1 + 0.01 * torch.arange(4, dtype=torch.float32))
    ensure_pool(path, **kw)  # current: loaded, nothing sampled, features not computed
    assert len(fake.calls) == 1 and len(feature_calls) == 1
    ensure_pool(path, **kw, refresh="always")
    assert len(fake.calls) == 2
    with pytest.raises(StalePoolError, match="sampler"):
        ensure_pool(path, **(kw | {"sampler": {"sampler": "ddim", "steps": 50}}))
    with pytest.raises(StalePoolError, match="4 candidates"):
        ensure_pool(path, **(kw | {"num_candidates": 8}))
    ckpt.write_bytes(b"weights v2")  # IdGen retrained: the pool is stale
    with pytest.raises(StalePoolError, match="stale"):
        ensure_pool(path, **kw)
    pool = ensure_pool(path, **kw, refresh="stale")
    assert len(fake.calls) == 3 and pool.idgen_checkpoint_hash == hashlib.sha256(b"weights v2").hexdigest()
    with pytest.raises(ValueError, match="refresh"):
        ensure_pool(path, **kw, refresh="sometimes")


def test_pool_dataset_adds_candidates(tmp_path):
    shapes = _shapes()
    path = save_pool(tmp_path / "p.npz", shapes, idgen_checkpoint_hash="h", image_keys=KEYS, sampler=SAMPLER)
    base = [{"key": k, "shape": torch.full((300,), float(i)), "arcface": torch.zeros(512)}
            for i, k in enumerate(reversed(KEYS))]
    ds = PoolDataset(path, base, key_fn=lambda item: item["key"], expect_hash="h")
    assert len(ds) == 3
    item = ds[0]
    assert item["key"] == KEYS[2] and item["arcface"].shape == (512,) and float(item["shape"][0]) == 0.0
    torch.testing.assert_close(item["candidates"], shapes[2])
    assert "candidates" not in base[0]  # the base item is not modified
    batch = torch.utils.data.default_collate([ds[i] for i in range(3)])
    assert batch["candidates"].shape == (3, 4, 300)
    with pytest.raises(StalePoolError):
        PoolDataset(path, base, key_fn=lambda item: item["key"], expect_hash="other")
    pool = load_pool(path)
    assert isinstance(pool, CandidatePool)
    with pytest.raises(KeyError, match="no image key 'missing'"):
        PoolDataset(pool, [{"key": "missing"}], key_fn=lambda item: item["key"])[0]
    with pytest.raises(KeyError, match="already has a 'candidates'"):
        PoolDataset(pool, [{"key": KEYS[0], "candidates": 1}], key_fn=lambda item: item["key"])[0]
    with pytest.raises(TypeError, match="expected a dict"):
        PoolDataset(pool, [(1, 2)], key_fn=lambda item: "x")[0]
