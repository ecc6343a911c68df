"""`scripts/eval_now.py` in model mode, end to end on CPU: tiny IdGen/IdRank checkpoints (trained a few steps on
a tiny synthetic set, as tests/test_jobs.py does), the synthetic NoW bench with one corrupted photo, then one
command that reconstructs, scores and runs the shape-pool ablation. Checked against folder-mode scoring of the
same predictions (an independent run of the scorer) and against the ablation's definitions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import ofer
from ofer.meshio import load_mesh, save_mesh
from ofer.synthetic.dataset import write_mica_dataset

REPO = Path(ofer.__file__).resolve().parent.parent
CONFIGS = str(REPO / "configs")
pytestmark = pytest.mark.slow


def _compose(name: str, root: Path, run_dir: Path, *extra: str):
    overrides = [f"paths.synthetic_dir={root}", f"paths.data_dir={root}", f"paths.output_dir={run_dir}",
                 "device=cpu", *extra]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, synthetic_flame, flame):
    """(data root, IdGen checkpoint, IdRank run dir): small networks, 2 IdGen steps, 1 IdRank step on pools of 3
    candidates (checkpoints describe their networks, so the pipeline rebuilds these sizes)."""
    from ofer.jobs import train_generator, train_idrank

    root = tmp_path_factory.mktemp("synth")
    (root / "FLAME").symlink_to(synthetic_flame.flame_model.parent)
    write_mica_dataset(root, "SYNTH_TRAIN", flame, actors=3, images_per_actor=1, seed=1)
    write_mica_dataset(root, "SYNTH_TEST", flame, actors=2, images_per_actor=1, seed=2)
    write_mica_dataset(root, "SYNTH_ID_TRAIN", flame, actors=3, images_per_actor=1, seed=5)
    write_mica_dataset(root, "SYNTH_ID_TEST", flame, actors=2, images_per_actor=1, seed=6)
    idgen = root / "idgen"
    train_generator(_compose("train_idgen", root, idgen, "synthetic.ensure=false", "data.n_images=1",
                             "model.widths=[300,32,8]", "model.time_dim=64",
                             "trainer.max_steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
                             "trainer.progress=false", "eval.num_items=1", "eval.num_samples=2",
                             "eval.sampling.steps=2"), run_dir=idgen)
    ckpt = idgen / "checkpoints" / "last.pt"
    idrank = root / "idrank"
    train_idrank(_compose("train_idrank", root, idrank, f"idgen_ckpt={ckpt}", "synthetic.ensure=false",
                          "model.widths=[64,32,16,8]",
                          "trainer.max_steps=1", "trainer.batch_size=2", "trainer.progress=false",
                          "pool.num_candidates=3", "pool.sampling.steps=2", f"pool.dir={idrank / 'pools'}"),
                 run_dir=idrank)
    return root, ckpt, idrank


@pytest.fixture(scope="module")
def now_bench(tmp_path_factory, flame):
    """The synthetic NoW bench, one subject x 4 challenges: the occlusion photo is corrupted, and so is the
    selfie's NoW face box."""
    from ofer.synthetic.now_bench import write_synthetic_now

    root = write_synthetic_now(tmp_path_factory.mktemp("now") / "NoW", flame, subjects=1, images_per_challenge=1)
    # Ours, for speed: every 4th scan vertex (the scorer reads scan vertices only); refinement cost ~ scan size.
    scan = next((root / "scans").rglob("*.obj"))
    save_mesh(scan, load_mesh(scan, require_faces=False)[0][::4], np.zeros((0, 3), dtype=np.int64))
    lines = (root / "imagepathsvalidation.txt").read_text().split()
    bad_photo = next(line for line in lines if "/multiview_occlusions/" in line)
    (root / "final_release_version" / "iphone_pictures" / bad_photo).write_bytes(b"\xff\xd8 not a jpeg")
    bad_box = next(line for line in lines if "/selfie/" in line)
    box_file = root / "final_release_version" / "detected_face" / Path(bad_box).with_suffix(".npy")
    assert box_file.is_file()
    box_file.write_bytes(b"\x93NUMPY garbage")
    return root, lines, bad_photo, box_file


def test_model_mode_end_to_end(tiny_model, now_bench, tmp_path: Path) -> None:
    from ofer.eval.now_model import run_eval_now

    data, idgen_ckpt, idrank_dir = tiny_model
    root, lines, bad, bad_box = now_bench
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    cmd = [sys.executable, str(REPO / "scripts" / "eval_now.py"), f"now.root={root}",
           f"model.idgen_ckpt={idgen_ckpt}", f"model.idrank_ckpt={idrank_dir}", "model.num_samples=3",
           "model.id_sampling.steps=2", "ablation.num_candidates=2", "device=cpu", f"paths.synthetic_dir={data}",
           f"paths.data_dir={data}", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    # The corrupted photo and box file fail (exit code 1, listed with path and reason); the others complete.
    assert proc.returncode == 1, log
    assert "Traceback" not in log
    pictures = root / "final_release_version" / "iphone_pictures"
    assert f"FAILED to reconstruct {pictures / bad}: ImageReadError" in proc.stdout
    assert f"FAILED to reconstruct {bad_box}: SafeLoadError" in proc.stdout
    summary = json.loads((out / "reconstruct" / "summary.json").read_text())
    assert summary["reconstructed"] == 2 and summary["failed"] == 1
    assert summary["failures"][0]["path"] == str(pictures / bad)
    assert "ImageReadError" in summary["failures"][0]["reason"]
    good = [line for line in lines if "/multiview_neutral/" in line or "/multiview_expressions/" in line]
    for line in good:  # the official submission layout
        stem = out / "predictions" / Path(line).with_suffix("")
        assert stem.with_suffix(".obj").is_file() and np.load(stem.with_suffix(".npy")).shape == (7, 3)
    assert not list((out / "predictions").rglob("*occlusions*")) and not list((out / "predictions").rglob("selfie"))

    # Folder mode on the same predictions, in process: the same metrics file and distances.
    metrics = json.loads((out / "now_metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["missing"] == [ln for ln in lines if ln not in good]
    assert metrics["num_failed"] == 0
    folder = tmp_path / "folder"
    res = run_eval_now(_compose("eval_now", data, folder, f"now.root={root}",
                                f"now.predictions={out / 'predictions'}"), out_dir=folder)
    assert res.num_failed == 0 and res.ablation is None
    assert json.loads((folder / "now_metrics.json").read_text()) == metrics
    dist = np.load(out / "RECON_computed_distances.npy", allow_pickle=True).item()["computed_distances"]
    ref = np.load(folder / "RECON_computed_distances.npy", allow_pickle=True).item()["computed_distances"]
    assert len(dist) == len(ref) == 2 and all(np.array_equal(a, b) for a, b in zip(dist, ref))

    # The ablation: its columns, and each one recomputed from the per-image means (every column of an image
    # pools the same n_i cropped scan vertices, so pooled means are n_i-weighted means of per-image means).
    abl = json.loads((out / "ablation.json").read_text())
    cols = abl["columns"]
    assert set(cols) == {"ranked", "average", "best_of_n", "random_flame", "random_flame_best_of_n"}
    assert abl["num_images"] == 2 and abl["num_candidates"] == 2 and abl["failures"] == []
    for key in ("median", "mean", "std"):
        assert cols["ranked"][key] == pytest.approx(metrics[key], abs=1e-12)  # the submission itself
    n = np.array([len(d) for d in dist], dtype=float)
    per = abl["per_image"]
    assert [p["image"] for p in per] == good
    for p, d in zip(per, dist):
        h = np.load(out / "reconstruct" / Path(p["image"]).with_suffix("") / "hypotheses.npz")
        assert p["best"] == int(h["best"]) and p["indices"][:2] == [0, 1] and p["best"] in p["indices"]
        cm = np.array(p["candidate_means"])
        # IdRank's pick scored as a candidate reproduces the submission's score of that image.
        assert cm[p["indices"].index(p["best"])] == pytest.approx(p["ranked_mean"], abs=1e-6)
        assert p["ranked_mean"] == pytest.approx(float(d.mean()), abs=1e-12)
        assert cm.min() <= p["ranked_mean"] + 1e-6 and cm.min() <= cm[:2].mean()  # ideal min, per image
        assert len(p["random_flame_means"]) == 2
    w = n / n.sum()
    cand = [np.array(p["candidate_means"]) for p in per]
    prior = [np.array(p["random_flame_means"]) for p in per]
    assert cols["average"]["mean"] == pytest.approx(sum(wi * c[:2].mean() for wi, c in zip(w, cand)), abs=1e-9)
    assert cols["best_of_n"]["mean"] == pytest.approx(sum(wi * c.min() for wi, c in zip(w, cand)), abs=1e-9)
    assert cols["random_flame"]["mean"] == pytest.approx(sum(wi * r.mean() for wi, r in zip(w, prior)), abs=1e-9)
    assert cols["best_of_n"]["mean"] <= cols["ranked"]["mean"] + 1e-6
    assert cols["best_of_n"]["mean"] <= cols["average"]["mean"]
    assert cols["random_flame_best_of_n"]["mean"] <= cols["random_flame"]["mean"]
    assert "NoW shape-pool ablation" in proc.stdout and "best_of_n" in proc.stdout


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["now.predictions=/x", "model.idgen_ckpt=/a", "model.idrank_ckpt=/b"],
         r"now.predictions=/x and model.idgen_ckpt, model.idrank_ckpt are both set"),
        ([], r"nothing to score: set now.predictions=.* or model.idgen_ckpt="),
        (["model.idgen_ckpt=/a"], r"model mode needs model.idrank_ckpt"),
    ],
)
def test_mode_errors_name_the_keys(overrides, message, tmp_path: Path) -> None:
    from ofer.eval.now_model import run_eval_now

    cfg = _compose("eval_now", tmp_path, tmp_path, f"now.root={tmp_path}", *overrides)
    with pytest.raises(ValueError, match=message):
        run_eval_now(cfg, out_dir=tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_ablation_columns_by_hand() -> None:
    """Two images of 2 and 4 vertices, k = 2 candidates (+ the ranked one, index 5, for the second image)."""
    from ofer.eval.now_model import ImageScores, ablation_columns

    a = ImageScores("s/c/a.jpg", ranked=np.array([1.0, 3.0]), best=1, indices=[0, 1],
                    candidates=np.array([[2.0, 2.5], [1.0, 3.0]]), prior=np.array([[5.0, 7.0], [4.0, 4.0]]))
    b = ImageScores("s/c/b.jpg", ranked=np.array([1.0, 1.0, 1.0, 1.0]), best=5, indices=[0, 1, 5],
                    candidates=np.array([[3.0, 3.0, 3.0, 3.0], [2.0, 2.0, 2.0, 6.0], [1.0, 1.0, 1.0, 1.0]]),
                    prior=np.array([[6.0, 6.0, 6.0, 6.0], [8.0, 8.0, 8.0, 8.0]]))
    cols = ablation_columns([a, b], k=2)
    sd = np.std
    ref = {  # pooled over the 6 vertices; average: the mean of the statistics of slot 0 and of slot 1
        "ranked": [1.0, 8 / 6, sd([1, 3, 1, 1, 1, 1])],
        "average": [(3.0 + 2.0) / 2, (16.5 / 6 + 16 / 6) / 2, (sd([2, 2.5, 3, 3, 3, 3]) + sd([1, 3, 2, 2, 2, 6])) / 2],
        "best_of_n": [1.0, 8 / 6, sd([1, 3, 1, 1, 1, 1])],  # a: slot 1 (mean 2 < 2.25); b: the ranked one
        "random_flame": [(6.0 + 8.0) / 2, (36 / 6 + 40 / 6) / 2, (sd([5, 7, 6, 6, 6, 6]) + sd([4, 4, 8, 8, 8, 8])) / 2],
        "random_flame_best_of_n": [6.0, 32 / 6, sd([4, 4, 6, 6, 6, 6])],
    }
    assert set(cols) == set(ref)
    for name, (median, mean, std) in ref.items():
        assert [cols[name][key] for key in ("median", "mean", "std")] == pytest.approx([median, mean, std]), name
    assert ablation_columns([], k=2) == {}
