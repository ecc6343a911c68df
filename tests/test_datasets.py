"""Dataset readers on tiny MICA/OFER/FaMoS layouts written to tmp_path, plus the synthetic generator's output."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ofer.data.datasets import (
    DatasetError,
    FamosDataset,
    FlameParamsError,
    MicaDataset,
    MixedDataset,
    build_dataset,
    load_flame_params,
    parse_flame_params,
)


def write_mica(
    root: Path,
    name: str,
    images_per_actor: dict[str, int],
    *,
    variant: str = "mica",
    farl: bool = True,
    jpg: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A tiny MICA-layout (or OFER-variant) dataset with random blobs; returns {actor: betas or shape}."""
    rng = np.random.default_rng(seed)
    params_folder = "FLAME_parameters" if variant == "mica" else "FLAME23_parameters"
    index, truth = {}, {}
    for actor, n in images_per_actor.items():
        pdir = root / name / params_folder / actor
        pdir.mkdir(parents=True, exist_ok=True)
        if variant == "mica":
            betas = rng.standard_normal(400).astype(np.float32)
            np.savez(pdir / "fit.npz", betas=betas, pose=rng.standard_normal(15).astype(np.float32))
            truth[actor] = betas
        else:
            shape = rng.standard_normal(300).astype(np.float32)
            np.savez(pdir / "fit.npz", shape=shape, exp=rng.standard_normal(50).astype(np.float32),
                     pose=rng.standard_normal(6).astype(np.float32))
            truth[actor] = shape
        images = []
        idir = root / name / "arcface_input" / actor
        idir.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            stem = f"img{k}"
            np.save(idir / f"{stem}.npy", rng.uniform(-1, 1, (3, 112, 112)).astype(np.float32))
            if farl:
                np.save(idir / f"{stem}_farl.npy", rng.standard_normal((3, 224, 224)).astype(np.float16))
            if jpg:
                Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(idir / f"{stem}.jpg", quality=95)
            images.append(f"{actor}/{stem}.jpg")
        index[actor] = (images, f"{actor}/fit.npz") if variant == "mica" else (f"{actor}/fit.npz", images)
    sub = root / "image_paths" if variant == "mica" else root / "image_paths" / "arcface23"
    sub.mkdir(parents=True, exist_ok=True)
    np.save(sub / f"{name}.npy", index, allow_pickle=True)
    return truth


def test_mica_items(tmp_path):
    truth = write_mica(tmp_path, "TINY", {"b_actor": 3, "a_actor": 5})
    ds = MicaDataset(root=tmp_path, name="TINY", n_images=4, inputs=("arcface", "farl"))
    assert ds.variant == "mica" and len(ds) == 2 and ds.actors == ["a_actor", "b_actor"]
    assert ds.total_images == 8
    torch.manual_seed(0)
    item = ds[0]
    betas = truth["a_actor"]
    np.testing.assert_array_equal(item["shape"].numpy(), betas[:300])
    np.testing.assert_array_equal(item["expression"].numpy(), betas[300:])
    fit = np.load(tmp_path / "TINY" / "FLAME_parameters" / "a_actor" / "fit.npz")
    np.testing.assert_array_equal(item["pose"].numpy(), fit["pose"])
    assert item["actor"] == "a_actor" and item["index"] == 0 and item["dataset"] == "TINY"
    assert item["arcface"].shape == (4, 3, 112, 112) and item["farl"].shape == (4, 3, 224, 224)
    assert item["farl"].dtype == torch.float32
    ids = item["image_ids"].numpy()
    assert len(set(ids.tolist())) == 4 and set(ids.tolist()) <= set(range(0, 5))  # 4 distinct of a_actor's 5
    for k, i in enumerate(ids):
        blob = np.load(tmp_path / "TINY" / "arcface_input" / ds.image_keys[i].replace(".jpg", ".npy"))
        np.testing.assert_array_equal(item["arcface"][k].numpy(), blob)
    # b_actor has 3 < 4 images: sampled with replacement, all from b_actor.
    ids_b = ds[1]["image_ids"].numpy()
    assert len(ids_b) == 4 and set(ids_b.tolist()) <= {5, 6, 7}
    first = MicaDataset(root=tmp_path, name="TINY", n_images=4, inputs=(), sampling="first")
    assert first[1]["image_ids"].tolist() == [5, 6, 7, 5] and "arcface" not in first[1]
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["arcface"].shape == (2, 4, 3, 112, 112) and batch["shape"].shape == (2, 300)
    assert batch["actor"] == ["a_actor", "b_actor"]


def test_ofer_variant_is_detected_from_the_index(tmp_path):
    truth = write_mica(tmp_path, "OFERSET", {"x": 2}, variant="ofer")
    ds = MicaDataset(root=tmp_path, name="OFERSET", n_images=2)
    assert ds.variant == "ofer" and ds.params_dir.name == "FLAME23_parameters"
    item = ds[0]
    fit = np.load(tmp_path / "OFERSET" / "FLAME23_parameters" / "x" / "fit.npz")
    np.testing.assert_array_equal(item["shape"].numpy(), truth["x"])
    np.testing.assert_array_equal(item["expression"].numpy()[:50], fit["exp"])
    assert not item["expression"][50:].any()  # 50 FLAME2023 expressions, zero-padded to 100
    pose = item["pose"].numpy()
    np.testing.assert_array_equal(pose[0:3], fit["pose"][:3])  # 6-d OFER pose = (global, jaw)
    np.testing.assert_array_equal(pose[6:9], fit["pose"][3:])
    assert not pose[3:6].any() and not pose[9:].any()
    with pytest.raises(DatasetError, match="pair order"):
        MicaDataset(root=tmp_path, name="OFERSET", variant="mica")


def test_all_missing_files_are_reported_at_once(tmp_path):
    write_mica(tmp_path, "HOLES", {"a": 2, "b": 2, "c": 1})
    gone = [tmp_path / "HOLES" / "arcface_input" / "a" / "img1.npy",
            tmp_path / "HOLES" / "arcface_input" / "c" / "img0_farl.npy",
            tmp_path / "HOLES" / "FLAME_parameters" / "b" / "fit.npz"]
    for p in gone:
        p.unlink()
    with pytest.raises(DatasetError) as err:
        MicaDataset(root=tmp_path, name="HOLES", inputs=("arcface", "farl"))
    msg = str(err.value)
    assert "missing files (3)" in msg
    for p in gone:
        assert str(p) in msg
    assert "img0.jpg" in msg  # the FaRL fallback image is named too
    with pytest.raises(DatasetError, match="index file not found"):
        MicaDataset(root=tmp_path, name="NOPE")


def test_npz_without_betas_names_file_and_keys(tmp_path):
    write_mica(tmp_path, "NOBETAS", {"a": 1})
    path = tmp_path / "NOBETAS" / "FLAME_parameters" / "a" / "fit.npz"
    np.savez(path, beta=np.zeros(400), pose=np.zeros(15))
    with pytest.raises(DatasetError) as err:
        MicaDataset(root=tmp_path, name="NOBETAS")
    assert str(path) in str(err.value) and "'betas'" in str(err.value) and "['beta', 'pose']" in str(err.value)
    with pytest.raises(FlameParamsError, match="keys found"):
        load_flame_params(path)


def test_wrong_blob_shape_names_file_and_shapes(tmp_path):
    write_mica(tmp_path, "SHAPES", {"a": 2})
    bad = tmp_path / "SHAPES" / "arcface_input" / "a" / "img1.npy"
    np.save(bad, np.zeros((112, 112, 3), np.float32))
    with pytest.raises(DatasetError) as err:
        MicaDataset(root=tmp_path, name="SHAPES")
    assert f"{bad}: shape (112, 112, 3), expected (3, 112, 112)" in str(err.value)
    lazy = MicaDataset(root=tmp_path, name="SHAPES", n_images=2, check_blobs=False, sampling="first")
    with pytest.raises(DatasetError, match=r"img1\.npy has shape \(112, 112, 3\), expected \(3, 112, 112\)"):
        lazy[0]


def test_farl_input_falls_back_to_the_image(tmp_path):
    from ofer.data.preprocess import farl_from_face_image, load_image

    write_mica(tmp_path, "NOFARL", {"a": 2}, farl=False, jpg=True)
    ds = MicaDataset(root=tmp_path, name="NOFARL", n_images=2, inputs=("farl",), sampling="first")
    item = ds[0]
    jpg = tmp_path / "NOFARL" / "arcface_input" / "a" / "img1.jpg"
    np.testing.assert_allclose(item["farl"][1].numpy(), farl_from_face_image(load_image(jpg)))
    assert "CLIP-preprocessed image" in ds.input_spec("farl")["file"]
    with pytest.raises(DatasetError, match="img0_farl.npy"):
        MicaDataset(root=tmp_path, name="NOFARL", inputs=("farl",), farl_from_image=False)
    jpg.unlink()
    with pytest.raises(DatasetError, match=r"img1_farl\.npy \(nor its image .*img1\.jpg\)"):
        MicaDataset(root=tmp_path, name="NOFARL", inputs=("farl",))


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_index_loading_never_executes_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    (tmp_path / "image_paths").mkdir()
    arr = np.empty((), dtype=object)
    arr[()] = {"a": (["a/x.jpg"], "a/fit.npz"), "boom": evil}
    with open(tmp_path / "image_paths" / "EVIL.npy", "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=True)
    with pytest.raises(Exception, match="refusing"):
        MicaDataset(root=tmp_path, name="EVIL")
    assert not marker.exists()


def test_parse_flame_params_pose_conventions():
    rng = np.random.default_rng(1)
    full = rng.standard_normal(15).astype(np.float32)
    p = parse_flame_params({"betas": np.zeros((1, 400)), "pose": full[None]}, source="f")
    np.testing.assert_array_equal(p.pose, full)
    p = parse_flame_params({"shape": np.ones(100), "pose": full[3:]}, source="f")  # 12 = neck, jaw, eyes
    np.testing.assert_array_equal(p.pose[3:], full[3:])
    assert p.shape.shape == (300,) and p.shape[:100].all() and not p.shape[100:].any()
    p = parse_flame_params({"shape": np.zeros(300), "jaw": full[6:9], "rot": full[:3], "eye": full[9:],
                            "neck": full[3:6]}, source="f")
    np.testing.assert_array_equal(p.pose, full)
    p = parse_flame_params({"shape": np.zeros(300), "pose": full, "jaw_pose": full[6:9]}, source="f")
    np.testing.assert_array_equal(p.pose, full)  # consistent duplicates are fine
    with pytest.raises(FlameParamsError, match="disagrees"):
        parse_flame_params({"shape": np.zeros(300), "pose": full, "jaw": full[6:9] + 1}, source="f")
    with pytest.raises(FlameParamsError, match="expected 15"):
        parse_flame_params({"shape": np.zeros(300), "pose": np.zeros(9)}, source="f")
    with pytest.raises(FlameParamsError, match="'betas' has 401"):
        parse_flame_params({"betas": np.zeros(401)}, source="f")
    with pytest.raises(FlameParamsError, match="at most 100"):
        parse_flame_params({"shape": np.zeros(300), "exp": np.zeros(120)}, source="f")
    with pytest.raises(FlameParamsError, match="one parameter set"):
        parse_flame_params({"shape": np.zeros((3, 300))}, source="f")
    with pytest.raises(FlameParamsError, match="non-finite"):
        parse_flame_params({"betas": np.full(400, np.nan)}, source="f")


def write_famos(root: Path, *, frames: int = 5, blobs_for: int | None = None) -> dict:
    """FaMoS-style sequences: one .npy dict (FaMoS names) and one .npz (OFER names, 50 exp)."""
    rng = np.random.default_rng(3)
    pdir = root / "FAMOS" / "flame_params"
    (pdir / "subj1").mkdir(parents=True)
    (pdir / "subj2").mkdir(parents=True)
    seq1 = {"flame_shape": rng.standard_normal((frames, 300)), "flame_expr": rng.standard_normal((frames, 100)),
            "flame_pose": rng.standard_normal((frames, 15)), "flame_trans": np.zeros((frames, 3)),
            "frame_id": np.arange(10, 10 + frames)}
    np.save(pdir / "subj1" / "anger.npy", seq1, allow_pickle=True)
    seq2 = {"shape": rng.standard_normal(300), "exp": rng.standard_normal((frames, 50)),
            "jaw": rng.standard_normal((frames, 3))}
    np.savez(pdir / "subj2" / "smile.npz", **seq2)
    blob_frames = []
    for subj, seq, fids in (("subj1", "anger", seq1["frame_id"]), ("subj2", "smile", np.arange(frames))):
        for fid in fids[: blobs_for if blobs_for is not None else frames]:
            d = root / "FAMOS" / "arcface_input" / subj / seq
            d.mkdir(parents=True, exist_ok=True)
            np.save(d / f"{fid:06d}.npy", rng.uniform(-1, 1, (3, 112, 112)).astype(np.float32))
            blob_frames.append((subj, seq, int(fid)))
    return {"seq1": seq1, "seq2": seq2, "blobs": blob_frames}


def test_famos_frames(tmp_path):
    data = write_famos(tmp_path)
    tmpl = "{subject}/{sequence}/{frame:06d}.jpg"
    ds = FamosDataset(root=tmp_path, image_template=tmpl, inputs=("arcface",))
    assert len(ds) == 10 and ds.total_images == 10
    item = ds[2]
    assert (item["actor"], item["sequence"], item["frame"]) == ("subj1", "anger", 12)
    np.testing.assert_allclose(item["expression"].numpy(), data["seq1"]["flame_expr"][2], rtol=1e-6)
    np.testing.assert_allclose(item["pose"].numpy(), data["seq1"]["flame_pose"][2], rtol=1e-6)
    np.testing.assert_allclose(item["shape"].numpy(), data["seq1"]["flame_shape"][2], rtol=1e-6)
    assert item["arcface"].shape == (1, 3, 112, 112)
    np.testing.assert_array_equal(item["arcface"][0].numpy(),
                                  np.load(tmp_path / "FAMOS" / "arcface_input" / "subj1" / "anger" / "000012.npy"))
    item = ds[7]  # subj2/smile frame 2: 50 expressions, separate jaw, shared shape
    np.testing.assert_allclose(item["expression"].numpy()[:50], data["seq2"]["exp"][2], rtol=1e-6)
    assert not item["expression"][50:].any()
    np.testing.assert_allclose(item["pose"].numpy()[6:9], data["seq2"]["jaw"][2], rtol=1e-6)
    np.testing.assert_allclose(item["shape"].numpy(), data["seq2"]["shape"], rtol=1e-6)
    strided = FamosDataset(root=tmp_path, frame_stride=2)
    assert [f[2] for f in strided.frames[:3]] == [10, 12, 14] and "image_ids" not in strided[0]
    assert len(FamosDataset(root=tmp_path, subjects=["subj2"])) == 5


def test_famos_missing_images_error_or_drop(tmp_path):
    write_famos(tmp_path, blobs_for=3)
    tmpl = "{subject}/{sequence}/{frame:06d}.jpg"
    with pytest.raises(DatasetError) as err:
        FamosDataset(root=tmp_path, image_template=tmpl, inputs=("arcface",))
    assert "missing files (4)" in str(err.value) and "000013.npy" in str(err.value)
    ds = FamosDataset(root=tmp_path, image_template=tmpl, inputs=("arcface",), missing_images="drop")
    assert len(ds) == 6 and all(fr[2] in (10, 11, 12, 0, 1, 2) for fr in ds.frames)
    with pytest.raises(ValueError, match="image_template"):
        FamosDataset(root=tmp_path, inputs=("arcface",))


def test_build_dataset_from_composed_configs(tmp_path):
    from hydra import compose, initialize_config_dir

    import ofer

    write_mica(tmp_path, "STIRLING", {"s1": 2, "s2": 3, "s3": 2}, seed=1)
    write_mica(tmp_path, "FLORENCE", {"f1": 4}, seed=2)
    with initialize_config_dir(config_dir=str(ofer.REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("precompute_features", overrides=["data=[stirling,florence]", f"paths.data_dir={tmp_path}",
                                                        "data.n_images=2", "data.datasets.florence.weight=3.0"])
    mixed = build_dataset(cfg.data, inputs=("arcface",))
    assert isinstance(mixed, MixedDataset) and mixed.names == ["FLORENCE", "STIRLING"] and len(mixed) == 4
    batch = next(iter(DataLoader(mixed, batch_size=4)))
    assert batch["arcface"].shape == (4, 2, 3, 112, 112) and batch["dataset"] == ["FLORENCE"] + ["STIRLING"] * 3
    w = mixed.sample_weights()
    # FLORENCE (1 actor, weight 3) vs STIRLING (3 actors, weight 1): drawn 3:1 overall.
    assert w is not None and abs(float(w[:1].sum() / w[1:].sum()) - 3.0) < 1e-9
    with pytest.raises(ValueError, match="format"):
        build_dataset({"datasets": {"x": {"format": "coco", "name": "X", "root": str(tmp_path)}}})
    with pytest.raises(TypeError, match="data.datasets.x"):
        build_dataset({"datasets": {"x": {"format": "mica", "name": "STIRLING", "root": str(tmp_path), "k": 4}}})


def test_reads_the_synthetic_generator_output(tmp_path, flame):
    from ofer.synthetic.dataset import write_mica_dataset

    write_mica_dataset(tmp_path, "SYN", flame, actors=2, images_per_actor=2, seed=0, image_size=112)
    write_mica_dataset(tmp_path, "SYNEXP", flame, actors=2, images_per_actor=1, mode="frame", seed=1, image_size=112)
    ds = MicaDataset(root=tmp_path, name="SYN", n_images=2, inputs=("arcface", "farl"))
    item = ds[0]
    gt = np.load(tmp_path / "SYN" / "arcface_input" / ds.image_keys[int(item["image_ids"][0])].replace(".jpg", "_gt.npz"))
    np.testing.assert_allclose(item["shape"].numpy(), gt["shape"], rtol=1e-6, atol=1e-6)
    assert item["arcface"].shape == (2, 3, 112, 112) and item["farl"].dtype == torch.float32
    exp = MicaDataset(root=tmp_path, name="SYNEXP", n_images=1, inputs=())
    item = exp[1]
    gt = np.load(tmp_path / "SYNEXP" / "arcface_input" / exp.image_keys[1].replace(".jpg", "_gt.npz"))
    np.testing.assert_allclose(item["expression"].numpy()[: flame.n_exp], gt["expression"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(item["pose"].numpy(), gt["pose"], rtol=1e-6, atol=1e-6)
