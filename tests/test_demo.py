"""`make demo` end to end, shortened: `scripts/demo.py` as a user runs it, with tiny datasets and a few steps
per stage, must produce every stage's output under one folder and a complete, finite results table."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _list(items: list[str]) -> str:
    return "[" + ",".join(f'"{x}"' for x in items) + "]"


def test_demo_script_end_to_end_shortened(synthetic_flame, tmp_path):
    root = tmp_path / "synthetic"
    root.mkdir()
    (root / "FLAME").symlink_to(synthetic_flame.flame_model.parent)
    out = tmp_path / "demo_out"
    quiet = ["trainer.progress=false", "trainer.log_every=1", "trainer.ckpt_every=2"]
    gen = ["eval.num_items=2", "eval.num_samples=3", "eval.sampling.steps=3", "trainer.warmup_steps=0"]
    cmd = [
        sys.executable, str(REPO / "scripts" / "demo.py"), "device=cpu", f"paths.synthetic_dir={root}",
        f"paths.data_dir={root}", f"hydra.run.dir={out}",
        "steps.idgen=3", "steps.expgen=3", "steps.idrank=2", "steps.baseline=3",
        "pool.num_candidates=3", "pool.steps=2", "num_samples=3", "sampling_steps=2",
        "now.subjects=1", "now.images_per_challenge=1",
        "+datasets.SYNTH_TRAIN={actors:4,images_per_actor:2}", "+datasets.SYNTH_TEST={actors:2,images_per_actor:1}",
        "+datasets.SYNTHEXP_TRAIN={actors:6}", "+datasets.SYNTHEXP_TEST={actors:2}",
        "+datasets.SYNTH_ID_TRAIN={actors:4,images_per_actor:2}", "+datasets.SYNTH_ID_TEST={actors:2,images_per_actor:1}",
        "extra_overrides.train_idgen=" + _list(["trainer.batch_size=2", *gen, *quiet]),
        "extra_overrides.train_expgen=" + _list(["trainer.batch_size=4", *gen, *quiet]),
        "extra_overrides.train_baseline=" + _list(["trainer.batch_size=2", *quiet]),
        "extra_overrides.train_idrank=" + _list(["trainer.batch_size=2", *quiet]),
        "extra_overrides.reconstruct=" + _list(["batch_size=2", "output.contact_sheet=true"]),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"all files under {out}" in proc.stdout  # the folder is named at the end

    res = json.loads((out / "demo_results.json").read_text())
    now, ident = res["now"], res["identity_mm"]
    n_images = len((root / "NoW_synthetic" / "imagepathsvalidation.txt").read_text().split())
    assert now["num_images"] == n_images > 0 and now["num_missing"] == 0 and now["num_failed"] == 0
    for value in [now["median"], now["mean"], now["std"], *(v for k, v in ident.items() if k != "images")]:
        assert math.isfinite(value)
    assert ident["images"] == n_images
    assert ident["best_of_n"] <= ident["ranked"] + 1e-9 and ident["best_of_n"] <= ident["average"] + 1e-9
    # every stage wrote into the one output folder
    for stage in ("train_idgen", "train_expgen", "train_baseline", "train_idrank"):
        assert (out / stage / "checkpoints" / "last.pt").is_file(), stage
    assert (out / "eval_now" / "now_metrics.json").is_file()
    sheets = list((out / "reconstruct").rglob("contact_sheet.png"))
    assert len(sheets) == n_images


def test_demo_dataset_sizes_default_and_changes():
    """The default config (`datasets: {}`) gives the built-in sizes; a change touches only its dataset; a
    misspelt name is an error naming it."""
    import pytest
    from omegaconf import OmegaConf

    from ofer.synthetic.make import DEFAULT_DATASETS, dataset_sizes

    assert dataset_sizes(OmegaConf.create({}), allow_new=False) == DEFAULT_DATASETS
    assert dataset_sizes(None, allow_new=False) == DEFAULT_DATASETS
    changed = dataset_sizes(OmegaConf.create({"SYNTH_TRAIN": {"actors": 4}}), allow_new=False)
    assert changed["SYNTH_TRAIN"] == {**DEFAULT_DATASETS["SYNTH_TRAIN"], "actors": 4}
    assert changed["SYNTH_TEST"] == DEFAULT_DATASETS["SYNTH_TEST"]
    with pytest.raises(ValueError, match="SYNTH_TRIAN"):
        dataset_sizes(OmegaConf.create({"SYNTH_TRIAN": {"actors": 4}}), allow_new=False)
    # make_synthetic adds new named datasets instead
    added = dataset_sizes({"STUDY_X": {"actors": 2}}, allow_new=True)
    assert added["STUDY_X"] == {"actors": 2} and added["SYNTH_TRAIN"] == DEFAULT_DATASETS["SYNTH_TRAIN"]
