"""check_setup on a deliberately incomplete and partly broken data folder."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


import ofer

REPO = Path(ofer.__file__).resolve().parent.parent


def test_incomplete_data_folder(tmp_path, synthetic_flame, flame):
    from ofer.synthetic.dataset import write_mica_dataset

    data = tmp_path / "data"
    (data / "FLAME").mkdir(parents=True)
    shutil.copy(synthetic_flame.flame_model, data / "FLAME" / "generic_model.pkl")  # present and fine
    (data / "FLAME" / "FLAME_masks.pkl").write_bytes(b"\x80\x04garbage")  # malformed
    # landmark embedding: missing. A dataset with one image deleted: malformed, named.
    write_mica_dataset(data / "datasets", "TINY", flame, actors=2, images_per_actor=1, workers=1)
    victim = next((data / "datasets" / "TINY" / "arcface_input").rglob("*.npy"))
    victim.unlink()
    (data / "weights").mkdir()
    (data / "weights" / "arcface.pth").write_bytes(b"not a checkpoint")
    cmd = [sys.executable, str(REPO / "scripts" / "check_setup.py"), f"paths.data_dir={data}",
           f"paths.flame_model={data / 'FLAME' / 'generic_model.pkl'}",
           f"paths.flame_landmarks={data / 'FLAME' / 'landmark_embedding.npy'}",
           f"paths.flame_masks={data / 'FLAME' / 'FLAME_masks.pkl'}",
           f"paths.arcface_weights={data / 'weights' / 'arcface.pth'}", f"paths.insightface_root={tmp_path / 'if'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    out = r.stdout
    assert r.returncode == 1, r.stderr[-2000:]
    lines = {ln.split("  ")[0].strip(): ln for ln in out.splitlines() if "  " in ln}
    assert " ok " in lines["FLAME model"] and "5042 vertices" in out
    assert "missing" in lines["FLAME landmark embedding"]
    assert "MALFORMED" in lines["FLAME masks"]
    assert "MALFORMED" in lines["ArcFace weights"]
    assert "missing" in lines["FaRL weights"]
    assert "MALFORMED" in lines["dataset TINY"] and victim.name in out
    assert "missing" in lines["NoW benchmark"] and "missing" in lines["insightface detector pack"]
    assert out.strip().splitlines()[-1].startswith("1 ok, 4 missing, 3 malformed")
