"""Ablation: IdGen with and without the prior skip (`GaussianDiffusion(prior_skip=...)`) after a short training.

Trains the paper-sized IdGen denoiser for `--steps` AdamW steps (batch `--batch` photos) on SYNTH_TRAIN's cached
pixel features, then samples 10 shapes for 24 held-out photos (DDIM-50) and reports the face-region error
(mean per-vertex distance, mm) of a sample, of the best of 10 and of the mean of the 10, and the std of the
sampled coefficients (the FLAME prior has 1). Needs the synthetic data and feature cache that
`python scripts/train_idgen.py` (or `make demo`) creates first.

    OMP_NUM_THREADS=2 python benchmarks/ablation_prior_skip.py --steps 600
"""
from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ofer  # noqa: E402
from ofer.data.datasets import MicaDataset  # noqa: E402
from ofer.diffusion import GaussianDiffusion  # noqa: E402
from ofer.flame import FLAME  # noqa: E402
from ofer.models.unet1d import Denoiser  # noqa: E402

ROOT = Path(ofer.__file__).resolve().parent.parent / "data"


def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    ds = MicaDataset(root=ROOT / "synthetic", name=name, n_images=1, inputs=(), sampling="first")
    feats = np.load(sorted(glob.glob(str(ROOT / "feature_cache" / name / "arcface*.npy")))[0])
    x, c = [], []
    for a in range(len(ds)):
        for i in ds.actor_image_ids(a):
            x.append(ds.params[a].shape)
            c.append(feats[i])
    return torch.tensor(np.array(x)).float(), torch.tensor(np.array(c)).float()


def run(prior_skip: bool, steps: int, batch: int, data: tuple, flame: FLAME) -> dict:
    (xtr, ctr), (xte, cte) = data
    torch.manual_seed(0)
    model = Denoiser(dim=300, cond_dim=512)
    diff = GaussianDiffusion(prior_skip=prior_skip)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    t0 = time.time()
    for _ in range(steps):
        idx = torch.randint(len(xtr), (batch,))
        loss = diff.training_losses(model, xtr[idx], ctr[idx])["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    face = flame.face_mask("face")
    with torch.no_grad():
        s = diff.sample(model, cte[:24], dim=300, num_samples=10, sampler="ddim", steps=50)
        v = flame.shape_vertices(s.reshape(-1, 300))[:, face].view(24, 10, -1, 3)
        g = flame.shape_vertices(xte[:24])[:, face]
        err = (v - g[:, None]).norm(dim=-1).mean(-1) * 1000
        mean_err = (v.mean(1) - g).norm(dim=-1).mean(-1) * 1000
    return {"prior_skip": prior_skip, "steps": steps, "sample_mm": err.mean().item(),
            "best_of_10_mm": err.min(1).values.mean().item(), "mean_of_10_mm": mean_err.mean().item(),
            "coef_std": s.std().item(), "train_s": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    flame_dir = ROOT / "synthetic" / "FLAME"
    flame = FLAME(flame_dir / "generic_model.pkl", masks_path=flame_dir / "FLAME_masks.pkl")
    data = (load("SYNTH_TRAIN"), load("SYNTH_TEST"))
    rows = [run(True, 0, args.batch, data, flame), run(True, args.steps, args.batch, data, flame),
            run(False, args.steps, args.batch, data, flame)]
    print(f"{'prior_skip':>10s} {'steps':>6s} {'sample mm':>10s} {'best of 10':>10s} {'mean of 10':>10s} {'coef std':>8s}")
    for r in rows:
        print(f"{str(r['prior_skip']):>10s} {r['steps']:6d} {r['sample_mm']:10.2f} {r['best_of_10_mm']:10.2f} "
              f"{r['mean_of_10_mm']:10.2f} {r['coef_std']:8.2f}")


if __name__ == "__main__":
    main()
