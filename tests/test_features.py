"""Feature cache: round trip on a tiny MICA-layout dataset, stale-cache detection, the cached dataset."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from ofer.data.datasets import MicaDataset, build_dataset
from ofer.data.features import (
    CachedFeatureDataset,
    StaleCacheError,
    cache_paths,
    cache_key,
    load_features,
    precompute_features,
    run_precompute,
)
from ofer.encoders import ArcFaceEncoder, PixelEncoder
from test_datasets import write_mica


@pytest.fixture
def tiny(tmp_path):
    write_mica(tmp_path / "data", "TINY", {"a": 3, "b": 2, "c": 4})
    return tmp_path / "data", tmp_path / "cache"


def _direct(ds: MicaDataset, enc: torch.nn.Module, slot: str) -> np.ndarray:
    """Each image encoded on its own, straight from its file (no batching, no cache)."""
    rows = []
    with torch.no_grad():
        for i in range(ds.total_images):
            x = torch.from_numpy(np.load(ds.input_file(i, slot)).astype(np.float32))[None]
            rows.append(enc(x)[0].numpy())
    return np.stack(rows)


def test_round_trip_and_cached_items(tiny):
    root, cache = tiny
    ds = MicaDataset(root=root, name="TINY", n_images=2, inputs=())
    encs = {"arcface": PixelEncoder(slot="arcface"), "farl": PixelEncoder(slot="farl")}
    for slot, enc in encs.items():
        path = precompute_features(ds, enc, cache_dir=cache, batch_size=4, device="cpu")
        feats = load_features(ds, enc, cache_dir=cache)
        assert path.parent == cache / "TINY" and feats.shape == (9, 512) and feats.dtype == np.float32
        np.testing.assert_allclose(feats, _direct(ds, enc, slot), atol=1e-5)
        manifest = json.loads(path.with_suffix(".json").read_text())
        assert manifest["count"] == 9 and manifest["image_keys"] == ds.image_keys
        assert manifest["key"]["weights"] == enc.weights_id and manifest["precision"] == "fp32"
    cached = CachedFeatureDataset(ds, {s: load_features(ds, e, cache_dir=cache) for s, e in encs.items()})
    with_images = MicaDataset(root=root, name="TINY", n_images=2, inputs=("arcface", "farl"))
    torch.manual_seed(5)
    item = cached[2]
    torch.manual_seed(5)
    ref = with_images[2]
    assert torch.equal(item["image_ids"], ref["image_ids"])  # same sampling, same images
    assert item["arcface_feat"].shape == (2, 512) and "arcface" not in item
    with torch.no_grad():
        torch.testing.assert_close(item["arcface_feat"], encs["arcface"](ref["arcface"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(item["farl_feat"], encs["farl"](ref["farl"]), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="inputs=\\(\\)"):
        CachedFeatureDataset(with_images, {})


def test_valid_cache_is_reused_and_overwrite_recomputes(tiny):
    root, cache = tiny
    ds = MicaDataset(root=root, name="TINY", inputs=())
    enc = PixelEncoder(slot="arcface")
    path = precompute_features(ds, enc, cache_dir=cache, device="cpu")
    stamp = path.stat().st_mtime_ns
    precompute_features(ds, enc, cache_dir=cache, device="cpu")
    assert path.stat().st_mtime_ns == stamp
    os.utime(path, ns=(1, 1))
    precompute_features(ds, enc, cache_dir=cache, device="cpu", overwrite=True)
    assert path.stat().st_mtime_ns != 1


def test_other_encoder_weights_are_a_miss_not_a_hit(tiny):
    root, cache = tiny
    ds = MicaDataset(root=root, name="TINY", inputs=())
    precompute_features(ds, PixelEncoder(slot="arcface"), cache_dir=cache, device="cpu")
    with pytest.raises(StaleCacheError) as err:
        load_features(ds, PixelEncoder(slot="arcface", seed=5), cache_dir=cache)
    msg = str(err.value)
    assert "no feature cache" in msg and "caches present for other keys" in msg and "pixel:seed20250001" in msg
    with pytest.raises(StaleCacheError, match="no cache for this slot"):
        load_features(ds, PixelEncoder(slot="farl"), cache_dir=cache)


def test_stale_caches_are_detected(tiny):
    root, cache = tiny
    enc = PixelEncoder(slot="arcface")
    ds = MicaDataset(root=root, name="TINY", inputs=())
    precompute_features(ds, enc, cache_dir=cache, device="cpu")
    load_features(ds, enc, cache_dir=cache)

    # A modified input (same size, new mtime).
    blob = root / "TINY" / "arcface_input" / "b" / "img1.npy"
    np.save(blob, np.zeros((3, 112, 112), np.float32))
    os.utime(blob, ns=(10**18, 10**18))
    with pytest.raises(StaleCacheError, match=r"1 input files changed.*b/img1\.npy"):
        load_features(ds, enc, cache_dir=cache)
    precompute_features(ds, enc, cache_dir=cache, device="cpu")  # stale -> recomputed

    # A missing input.
    blob.unlink()
    with pytest.raises(StaleCacheError, match=r"missing now.*b/img1\.npy"):
        load_features(ds, enc, cache_dir=cache)

    # One more image in the index: different count.
    np.save(blob, np.zeros((3, 112, 112), np.float32))
    index_path = root / "image_paths" / "TINY.npy"
    index = np.load(index_path, allow_pickle=True).item()
    np.save(root / "TINY" / "arcface_input" / "c" / "img9.npy", np.zeros((3, 112, 112), np.float32))
    index["c"] = (index["c"][0] + ["c/img9.jpg"], index["c"][1])
    np.save(index_path, index, allow_pickle=True)
    grown = MicaDataset(root=root, name="TINY", inputs=())
    with pytest.raises(StaleCacheError, match="cache has 9 images, dataset TINY has 10"):
        load_features(grown, enc, cache_dir=cache)

    # Same count, other names.
    index["c"] = (index["c"][0][:-1], index["c"][1])
    index["a"] = (["a/img0.jpg", "a/img1.jpg", "c/img9.jpg"], index["a"][1])
    np.save(index_path, index, allow_pickle=True)
    renamed = MicaDataset(root=root, name="TINY", inputs=())
    with pytest.raises(StaleCacheError, match="image names differ"):
        load_features(renamed, enc, cache_dir=cache)

    # A truncated features file.
    feat_path, manifest_path = cache_paths(cache, "TINY", cache_key(ds, enc, slot="arcface"))
    precompute_features(renamed, enc, cache_dir=cache, device="cpu")
    np.save(feat_path, np.zeros((3, 512), np.float32))
    with pytest.raises(StaleCacheError, match=r"features \(3, 512\)"):
        load_features(renamed, enc, cache_dir=cache)
    with pytest.raises(ValueError, match="slot 'arcface', not 'farl'"):
        load_features(renamed, enc, slot="farl", cache_dir=cache)


def test_real_encoder_key_uses_the_weights_file_hash(tiny, tmp_path):
    root, cache = tiny
    ds = MicaDataset(root=root, name="TINY", inputs=())
    weights = tmp_path / "backbone.pth"
    torch.save(ArcFaceEncoder(weights="random", arch="r18", seed=3).backbone.state_dict(), weights)
    enc = ArcFaceEncoder(weights=weights, arch="r18")
    key = cache_key(ds, enc, slot="arcface")
    assert key.weights == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    path = precompute_features(ds, enc, cache_dir=cache, batch_size=5, device="cpu")
    feats = load_features(ds, enc, cache_dir=cache)
    np.testing.assert_allclose(feats, _direct(ds, enc.eval(), "arcface"), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    assert path.name.startswith("arcface__arcface-r18__")


def test_build_dataset_serves_cached_features_and_the_script_entry(tiny):
    from hydra import compose, initialize_config_dir

    import ofer

    root, cache = tiny
    with initialize_config_dir(config_dir=str(ofer.REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("precompute_features", overrides=[
            "data=synthetic", f"paths.synthetic_dir={root}", "data.datasets.synthetic.name=TINY", "data.n_images=3",
            "encoder@encoders.arcface=pixel", "encoder@encoders.farl=pixel", f"cache_dir={cache}", "device=cpu"])
    written = run_precompute(cfg)
    assert [p.name.split("__")[0] for p in written] == ["arcface", "farl"]
    encs = {"arcface": PixelEncoder(slot="arcface"), "farl": PixelEncoder(slot="farl")}
    mixed = build_dataset(cfg.data, inputs=("arcface", "farl"), encoders=encs, cache_dir=cache)
    item = mixed[0]
    assert item["arcface_feat"].shape == (3, 512) and item["farl_feat"].shape == (3, 512) and "arcface" not in item
    with pytest.raises(StaleCacheError, match="no feature cache"):
        build_dataset(cfg.data, inputs=("arcface",), encoders={"arcface": PixelEncoder(slot="arcface", seed=1)},
                      cache_dir=cache)
    with pytest.raises(ValueError, match="both encoders and cache_dir"):
        build_dataset(cfg.data, cache_dir=cache)


@pytest.mark.gpu
def test_gpu_bf16_features_match_cpu_fp32(tiny):
    root, cache = tiny
    ds = MicaDataset(root=root, name="TINY", inputs=())
    enc = ArcFaceEncoder(weights="random", arch="r18", seed=0)
    precompute_features(ds, enc, cache_dir=cache / "cpu", device="cpu")
    ref = np.asarray(load_features(ds, enc, cache_dir=cache / "cpu"))
    precompute_features(ds, enc, cache_dir=cache / "gpu", device="cuda", bf16=True)
    got = np.asarray(load_features(ds, enc, cache_dir=cache / "gpu"))
    manifest = next((cache / "gpu" / "TINY").glob("*.json"))
    assert json.loads(manifest.read_text())["precision"] == "bf16"
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98 and not np.array_equal(got, ref)
