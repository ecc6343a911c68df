"""CO-545-style evaluation end to end on a tiny synthetic dataset, checked against a numpy/scipy hand
computation from the FLAME model arrays; bad and missing predictions are reported while the rest is scored."""
from __future__ import annotations

import csv
import json
import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chi2, spearmanr

from ofer.eval.co545 import (
    METRICS_FILE, PER_IMAGE_FILE, EvalFileError, dataset_images, evaluate_predictions, load_prediction,
    prediction_path, resolve_device,
)
from ofer.flame import load_flame_model, load_masks

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 5
SIGMAS = np.array([0.5, 0.1, 1.0, 2.0, 0.3])  # per-sample noise on the true shape coefficients


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, flame):
    from ofer.synthetic.dataset import write_mica_dataset

    root = tmp_path_factory.mktemp("co545")
    write_mica_dataset(root, "T", flame, actors=3, images_per_actor=2, seed=2)  # seed 2: some photos occluded, some not
    return root


def _write_predictions(root: Path, out: Path, seed: int = 0) -> dict[str, dict]:
    """GT shape plus noise as N samples per image, random scores, `best` varying per image."""
    rng = np.random.default_rng(seed)
    preds = {}
    for i, e in enumerate(dataset_images(root, "T")):
        gt = np.load(e.gt)
        order = rng.permutation(N_SAMPLES)
        shapes = gt["shape"][None] + SIGMAS[order, None] * rng.standard_normal((N_SAMPLES, 300))
        scores = rng.normal(size=N_SAMPLES)
        p = prediction_path(out, e.image)
        p.parent.mkdir(parents=True, exist_ok=True)
        np.savez(p, shapes=shapes.astype(np.float32), scores=scores, best=np.int64(i % N_SAMPLES),
                 expressions=np.zeros((N_SAMPLES, 100)), jaw=np.zeros((N_SAMPLES, 3)))
        preds[e.image] = {"shapes": shapes.astype(np.float32).astype(np.float64), "scores": scores,
                          "best": i % N_SAMPLES, "gt": gt["shape"], "occluded": gt["occluded_vertices"]}
    return preds


@pytest.fixture(scope="module")
def face_model(synthetic_flame) -> dict[str, np.ndarray]:
    """The FLAME arrays restricted to the `face` region, read from the model file (not through ofer.FLAME)."""
    model = load_flame_model(synthetic_flame.flame_model)
    face = load_masks(synthetic_flame.masks)["face"]
    return {"face": face, "v_template": model["v_template"][face], "shapedirs": model["shapedirs"][face, :, :300]}


def _by_hand(fm: dict, p: dict) -> dict[str, float]:
    """The metric definitions written out in numpy/scipy, straight from the FLAME arrays (face vertices)."""
    def verts(beta):  # neutral FLAME in mm
        return 1000.0 * (fm["v_template"] + np.einsum("vck,...k->...vc", fm["shapedirs"], beta))

    P, G = verts(p["shapes"]), verts(p["gt"])  # (N, F, 3), (F, 3)
    rmse = np.sqrt(((P - G) ** 2).sum(-1).mean(-1))
    sigma = np.sqrt(P.var(axis=0).sum(-1))  # (F,)
    occ = p["occluded"][fm["face"]]
    i, j = np.triu_indices(P.shape[0], k=1)
    return {
        "se_rmse": rmse[p["best"]], "cse_rmse": rmse.min(), "cse_index": int(rmse.argmin()), "mean_rmse": rmse.mean(),
        "meanshape_rmse": np.sqrt(((P.mean(0) - G) ** 2).sum(-1).mean()),
        "std_s_occluded": sigma[occ].mean() if occ.any() else float("nan"), "std_s_visible": sigma[~occ].mean(),
        "asd": np.linalg.norm(P[i] - P[j], axis=-1).mean(),
        "ode_rate": np.mean((p["shapes"] ** 2).sum(1) > chi2.ppf(0.999, 300)),
        "spearman": spearmanr(-rmse, p["scores"]).statistic, "ranked_rmse": rmse[np.argmax(p["scores"])],
        "occluded_vertices": int(occ.sum()),
    }


def _check_against_hand(out_dir: Path, preds: dict, face_model: dict, scored: set[str]) -> None:
    with open(out_dir / PER_IMAGE_FILE) as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh)}
    assert set(rows) == scored
    hand = {img: _by_hand(face_model, preds[img]) for img in scored}
    for img, want in hand.items():
        for key, value in want.items():
            got = float(rows[img][key])
            if np.isnan(value):
                assert np.isnan(got), (img, key)
            else:
                assert got == pytest.approx(value, rel=1e-6, abs=1e-9), (img, key)
    summary = json.loads((out_dir / METRICS_FILE).read_text())
    for key in ("se_rmse", "cse_rmse", "mean_rmse", "std_s_occluded", "std_s_visible", "asd", "ode_rate"):
        vals = np.array([hand[i][key] for i in scored], dtype=float)
        vals = vals[np.isfinite(vals)]
        assert summary["metrics"][key]["mean"] == pytest.approx(vals.mean(), rel=1e-6), key
        assert summary["metrics"][key]["median"] == pytest.approx(np.median(vals), rel=1e-6), key
        assert summary["metrics"][key]["images"] == vals.size


def _overrides(root: Path, preds: Path, synthetic_flame) -> list[str]:
    return [f"co545.root={root}", "co545.dataset=T", f"co545.predictions={preds}", "device=cpu",
            f"paths.flame_model={synthetic_flame.flame_model}", f"paths.flame_masks={synthetic_flame.masks}",
            f"paths.flame_landmarks={synthetic_flame.landmarks}"]


def _run_script(monkeypatch, argv: list[str]) -> tuple[int, str]:
    """Run scripts/eval_co545.py in this process (a subprocess would re-import torch: ~10 s on 2 busy
    cores) and return its exit code and the text of the job log Hydra writes into the run dir."""
    run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
    monkeypatch.setattr(sys, "argv", argv)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    code = 0
    try:
        runpy.run_path(str(REPO / "scripts" / "eval_co545.py"), run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        for h in root.handlers:
            if h not in saved[0]:
                h.close()
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
    log_file = run_dir / "eval_co545.log"
    return code, log_file.read_text() if log_file.is_file() else ""


def test_end_to_end_matches_hand_computation(tmp_path, dataset, synthetic_flame, face_model):
    from hydra import compose, initialize_config_dir

    from ofer.eval.co545 import evaluate_co545

    preds = _write_predictions(dataset, tmp_path / "pred")
    # The data must exercise both branches: images with and without occluded face vertices.
    n_occ = [int(p["occluded"].sum()) for p in preds.values()]
    assert min(n_occ) == 0 and max(n_occ) > 0
    out = tmp_path / "run"
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose("eval_co545", overrides=[*_overrides(dataset, tmp_path / "pred", synthetic_flame),
                                               f"paths.output_dir={out}"])
    summary = evaluate_co545(cfg)
    assert summary["images"] == 6 and summary["scored"] == 6 and summary["failed"] == 0
    assert summary["unexpected_predictions"] == 0
    assert summary["region_vertices"] == len(load_masks(synthetic_flame.masks)["face"])
    _check_against_hand(out, preds, face_model, set(preds))
    # Sanity of the synthetic setup: the closest sample is the least noisy one.
    with open(out / PER_IMAGE_FILE) as fh:
        for row in csv.DictReader(fh):
            p = preds[row["image"]]
            noise = np.linalg.norm(p["shapes"] - p["gt"], axis=1)
            assert int(row["cse_index"]) == int(np.argmin(noise))


def test_bad_predictions_are_reported_and_the_rest_scored(tmp_path, monkeypatch, dataset, synthetic_flame,
                                                          face_model):
    preds = _write_predictions(dataset, tmp_path / "pred", seed=1)
    images = sorted(preds)
    corrupt, missing, wrong = images[1], images[4], images[5]
    prediction_path(tmp_path / "pred", corrupt).write_bytes(b"PK\x03\x04 definitely not a zip archive")
    prediction_path(tmp_path / "pred", missing).unlink()
    np.savez(prediction_path(tmp_path / "pred", wrong), shapes=np.zeros((3, 100)), scores=np.zeros(3), best=0)
    out = tmp_path / "run"
    argv = ["scripts/eval_co545.py", *_overrides(dataset, tmp_path / "pred", synthetic_flame), f"hydra.run.dir={out}"]
    code, log_text = _run_script(monkeypatch, argv)
    assert code == 1, log_text
    summary = json.loads((out / METRICS_FILE).read_text())
    assert summary["scored"] == 3 and summary["failed"] == 3
    reasons = {f["image"]: f for f in summary["failures"]}
    assert reasons[missing]["reason"] == "missing file"
    assert reasons[missing]["path"] == str(prediction_path(tmp_path / "pred", missing))
    assert "not a readable .npz" in reasons[corrupt]["reason"]
    assert "key 'shapes' has shape (3, 100), expected (N, 300)" in reasons[wrong]["reason"]
    assert str(prediction_path(tmp_path / "pred", corrupt)) in log_text
    _check_against_hand(out, preds, face_model, set(images) - {corrupt, missing, wrong})


@pytest.mark.parametrize("content,reason", [
    ({"scores": np.zeros(4), "best": 0}, "missing key 'shapes'"),
    ({"shapes": np.zeros((4, 300)), "best": 0}, "missing key 'scores'"),
    ({"shapes": np.zeros((4, 300)), "scores": np.zeros(3), "best": 0}, r"'scores' has shape \(3,\), expected \(4,\)"),
    ({"shapes": np.zeros((4, 300)), "scores": np.zeros(4), "best": 4}, r"'best' is 4, expected an index in \[0, 4\)"),
    ({"shapes": np.zeros((4, 300)), "scores": np.zeros(4), "best": 1.5}, "'best' is .*expected an integer"),
    ({"shapes": np.full((4, 300), np.nan), "scores": np.zeros(4), "best": 0}, "'shapes' contains NaN"),
    ({"shapes": np.zeros((0, 300)), "scores": np.zeros(0), "best": 0}, "no sample"),
    ({"shapes": np.zeros((4, 300)), "scores": np.zeros(4), "best": 0, "jaw": np.zeros((4, 2))},
     r"'jaw' has shape \(4, 2\), expected \(4, 3\)"),
])
def test_load_prediction_names_key_and_expectation(tmp_path, content, reason):
    path = tmp_path / "a" / "img00.npz"
    path.parent.mkdir()
    np.savez(path, **content)
    with pytest.raises(EvalFileError, match=reason) as info:
        load_prediction(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_load_prediction_reads_a_valid_file(tmp_path):
    path = tmp_path / "p.npz"
    np.savez(path, shapes=np.ones((2, 300), np.float32), scores=np.array([0.2, 0.7]), best=np.int32(1))
    pred = load_prediction(path)
    assert pred.shapes.shape == (2, 300) and pred.shapes.dtype == np.float64
    assert pred.best == 1 and pred.expressions is None and pred.jaw is None


def test_prediction_path_mirrors_the_image_path(tmp_path):
    assert prediction_path(tmp_path, "actor00003/img01.jpg") == tmp_path / "actor00003" / "img01.npz"
    assert prediction_path(tmp_path, "x.png") == tmp_path / "x.npz"


def test_dataset_index_in_both_pair_orders(tmp_path):
    (tmp_path / "image_paths").mkdir()
    np.save(tmp_path / "image_paths" / "A.npy", {"s1": (["s1/a.jpg", "s1/b.jpg"], "s1/id.npz")}, allow_pickle=True)
    np.save(tmp_path / "image_paths" / "B.npy", {"s1": ("s1/id.npz", ["s1/a.jpg"])}, allow_pickle=True)
    a = dataset_images(tmp_path, "A")
    assert [e.image for e in a] == ["s1/a.jpg", "s1/b.jpg"]
    assert a[1].gt == tmp_path / "A" / "arcface_input" / "s1" / "b_gt.npz"
    assert [e.image for e in dataset_images(tmp_path, "B")] == ["s1/a.jpg"]
    np.save(tmp_path / "image_paths" / "C.npy", {"s1": ["only one thing"]}, allow_pickle=True)
    with pytest.raises(ValueError, match="entry 's1'.*expected a pair"):
        dataset_images(tmp_path, "C")
    with pytest.raises(FileNotFoundError, match=r"D\.npy.*co545\.dataset=D"):
        dataset_images(tmp_path, "D")


def test_missing_predictions_folder_is_named(tmp_path, dataset, flame):
    with pytest.raises(FileNotFoundError, match="co545.predictions"):
        evaluate_predictions(root=dataset, dataset="T", predictions=tmp_path / "nope", flame=flame,
                             out_dir=tmp_path / "out")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device='bogus'"):
        resolve_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path, dataset, synthetic_flame):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from ofer.flame import FLAME

    _write_predictions(dataset, tmp_path / "pred")
    results = {}
    for dev in ("cpu", "cuda"):
        fl = FLAME(synthetic_flame.flame_model, masks_path=synthetic_flame.masks, dtype=torch.float64).to(dev)
        results[dev] = evaluate_predictions(root=dataset, dataset="T", predictions=tmp_path / "pred", flame=fl,
                                            out_dir=tmp_path / dev)["metrics"]
    for key, pooled in results["cpu"].items():
        for stat in ("mean", "median"):
            if pooled[stat] is None:
                assert results["cuda"][key][stat] is None
            else:
                assert results["cuda"][key][stat] == pytest.approx(pooled[stat], rel=1e-9, abs=1e-12), key
