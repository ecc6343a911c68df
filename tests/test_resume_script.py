"""`scripts/train_idgen.py` survives SIGKILL: right after a checkpoint and in the middle of a checkpoint write,
a restart with the same run dir ends with the weights of an uninterrupted run (CPU, 1e-6)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ofer
from ofer.training.checkpoint import PAUSE_ENV, PAUSE_MARKER, load_checkpoint

REPO = Path(ofer.__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory, synthetic_flame, flame):
    from ofer.synthetic.dataset import write_mica_dataset

    r = tmp_path_factory.mktemp("resume_data")
    (r / "FLAME").symlink_to(synthetic_flame.flame_model.parent)
    write_mica_dataset(r, "SYNTH_TRAIN", flame, actors=4, images_per_actor=2, seed=1, workers=1)
    write_mica_dataset(r, "SYNTH_TEST", flame, actors=2, images_per_actor=1, seed=2, workers=1)
    write_mica_dataset(r, "SYNTH_ID_TRAIN", flame, actors=4, images_per_actor=2, seed=5, workers=1)
    write_mica_dataset(r, "SYNTH_ID_TEST", flame, actors=2, images_per_actor=1, seed=6, workers=1)
    return r


def _cmd(root: Path, run_dir: Path) -> list[str]:
    return [sys.executable, str(REPO / "scripts" / "train_idgen.py"), f"paths.synthetic_dir={root}",
            f"paths.data_dir={root}", "synthetic.ensure=false", "device=cpu", "trainer.max_steps=8",
            "trainer.ckpt_every=2", "trainer.batch_size=2", "trainer.progress=false", "trainer.warmup_steps=0",
            "eval.num_items=1", "eval.num_samples=2", "eval.sampling.steps=2", f"hydra.run.dir={run_dir}"]


def _env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.update(extra)
    return env


def _final(run_dir: Path) -> dict:
    ck = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert ck["step"] == 8
    return {"model": ck["model"], "ema": ck["ema"]}


def _assert_same(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], atol=1e-6, rtol=0, msg=f"{part}.{k}")


def test_kill_after_checkpoint_and_mid_write(root, tmp_path):
    ref_dir = tmp_path / "ref"
    subprocess.run(_cmd(root, ref_dir), env=_env(), check=True, capture_output=True, timeout=600)
    ref = _final(ref_dir)

    # 1) SIGKILL right after the step-4 checkpoint.
    run = tmp_path / "killed"
    p = subprocess.Popen(_cmd(root, run), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        last = run / "checkpoints" / "last.pt"
        try:
            if last.is_file() and load_checkpoint(last)["step"] >= 4:
                break
        except Exception:  # being replaced right now
            pass
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] < 8  # really interrupted
    subprocess.run(_cmd(root, run), env=_env(), check=True, capture_output=True, timeout=600)
    _assert_same(_final(run), ref)

    # 2) SIGKILL while the step-6 checkpoint is half written: the temp file is never loaded.
    run2 = tmp_path / "killed_mid_write"
    # The writer sleeps 300 s after its first bytes (the kill comes at once; a slow or loaded machine must not
    # let it finish). Its stderr is kept: a run that never pauses fails with its exit code and output.
    p = subprocess.Popen(_cmd(root, run2), env=_env(**{PAUSE_ENV: "6:300"}), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    seen, half_written = [], None
    for line in p.stderr:
        seen.append(line)
        if PAUSE_MARKER in line:
            half_written = Path(line.split(PAUSE_MARKER, 1)[1].strip())
            break
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    if half_written is None:
        logs = "".join(f"\n--- {f.name}:\n{f.read_text()[-3000:]}" for f in sorted(run2.glob("*.log")))
        pytest.fail(f"the run never paused in its step-6 checkpoint write (exit code {p.returncode}); its stderr "
                    f"ended with:\n{''.join(seen[-40:]) or '(nothing)'}{logs}")
    files = sorted(f.name for f in (run2 / "checkpoints").iterdir())
    assert half_written.parent == run2 / "checkpoints" and ".tmp-" in half_written.name, half_written
    assert half_written.is_file(), f"{half_written.name} is gone after the kill; the directory holds {files}"
    assert load_checkpoint(run2 / "checkpoints" / "last.pt")["step"] == 4
    r = subprocess.run(_cmd(root, run2), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same(_final(run2), ref)
