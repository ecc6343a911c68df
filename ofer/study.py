"""`scripts/study_synthetic.py`: does the training code learn what the paper claims?

On synthetic data whose ground truth is known and where occluders really hide part of the face:
train IdGen and IdRank (the same jobs as the scripts), then on held-out photos report the paper's identity
ablation -- error of the ranked sample, average over samples, best of N ("ideal min"), the mean of the samples
and random FLAME shapes -- for several N and samplers (DDPM-1000 vs DDIM / DPM-Solver++ at few steps), and the
diversity of the samples (STD-S) on occluded vs visible face vertices.

Errors: mean per-vertex Euclidean distance (mm) on the FLAME `face` region between neutral meshes, no
alignment (the synthetic photos and ground truth share FLAME's canonical frame).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from ofer.config import build_flame
from ofer.data.features import resolve_device
from ofer.eval.metrics import std_s
from ofer.flame import MM_PER_M
from ofer.models.ranker import candidate_vertices

log = logging.getLogger(__name__)


def _job_cfg(name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    from hydra import compose

    cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        if "pool" in cfg:
            cfg.pool.dir = str(run_dir / "pools")
    return cfg


@torch.no_grad()
def identity_ablation(*, idgen: Any, diffusion: Any, ranker: Any, flame: Any, items: list[dict], gt_dir: Path,
                      samplers: list[dict], Ns: list[int], device: str, chunk: int = 50, seed: int = 0) -> list[dict]:
    """Rows of the ablation table, one per (sampler, N)."""
    face = flame.face_mask("face")
    arc = torch.stack([it["arcface_feat"] for it in items]).to(device)
    ctx = torch.cat([arc, torch.stack([it["farl_feat"] for it in items]).to(device)], dim=-1)
    gt_shape = torch.stack([it["shape"] for it in items]).to(device)
    occluded = []
    for it in items:
        g = np.load(gt_dir / it["key"].split("/", 1)[1].replace(".jpg", "_gt.npz"))
        occluded.append(torch.from_numpy(g["occluded_vertices"]))
    occluded = torch.stack(occluded).to(device)[:, face]  # (B,Vf)
    nmax = max(Ns)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for opts in samplers:
        t0 = time.perf_counter()
        errs, scores, spread_occ, spread_vis = [], [], [], []
        rand_err, meanshape = [], []
        for s in range(0, len(items), chunk):
            sl = slice(s, s + chunk)
            shapes = diffusion.sample(idgen, arc[sl], dim=300, num_samples=nmax, generator=gen, **opts)
            cand = candidate_vertices(flame, shapes, face)  # (b,N,Vf,3) mm
            gt = flame.shape_vertices(gt_shape[sl])[:, face] * MM_PER_M
            errs.append((cand - gt[:, None]).norm(dim=-1).mean(-1))  # (b,N)
            scores.append({n: ranker(cand[:, :n], ctx[sl]).float() for n in Ns})
            occ = occluded[sl]
            spread_occ.append(std_s(cand, occ))
            spread_vis.append(std_s(cand, ~occ))
            rnd = candidate_vertices(flame, torch.randn(shapes.shape, generator=gen, device=device), face)
            rand_err.append((rnd - gt[:, None]).norm(dim=-1).mean(-1).mean(1))
            meanshape.append({n: (candidate_vertices(flame, shapes[:, :n].mean(1, keepdim=True), face)[:, 0] - gt)
                              .norm(dim=-1).mean(-1) for n in Ns})
        seconds = time.perf_counter() - t0
        err = torch.cat(errs)
        for n in Ns:
            sc = torch.cat([d[n] for d in scores])
            e = err[:, :n]
            ranked = e.gather(1, sc.argmax(1, keepdim=True)).squeeze(1)
            rows.append({
                "sampler": opts.get("sampler"), "steps": opts.get("steps") or 1000, "N": n,
                "ranked": ranked.mean().item(), "average": e.mean().item(), "best_of_n": e.min(1).values.mean().item(),
                "mean_of_samples": torch.cat([d[n] for d in meanshape]).mean().item(),
                "random_flame": torch.cat(rand_err).mean().item(),
                "std_s_occluded": torch.nanmean(torch.cat(spread_occ)).item(),
                "std_s_visible": torch.nanmean(torch.cat(spread_vis)).item(),
                "images": len(items), "sampling_seconds": seconds,
            })
    return rows


@torch.no_grad()
def single_answer_errors(*, regressor: Any, flame: Any, items: list[dict], device: str) -> dict[str, float]:
    """Errors of the one-answer references on the same photos: the deterministic MICA-style regressor
    (ArcFace -> 300 coefficients) and the FLAME mean shape (all coefficients zero)."""
    face = flame.face_mask("face")
    arc = torch.stack([it["arcface_feat"] for it in items]).to(device)
    gt = flame.shape_vertices(torch.stack([it["shape"] for it in items]).to(device))[:, face]
    pred = flame.shape_vertices(regressor(arc).float())[:, face]
    template = flame.shape_vertices(torch.zeros(1, flame.n_shape, device=device))[:, face]
    err = lambda v: ((v - gt).norm(dim=-1).mean(-1) * MM_PER_M).mean().item()  # noqa: E731
    return {"baseline": err(pred), "mean_shape": err(template)}


def _markdown(rows: list[dict]) -> str:
    head = ("| sampler | steps | N | ranked | average | best of N | mean of samples | random FLAME | baseline |"
            " mean shape | STD-S occluded | STD-S visible |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    body = [f"| {r['sampler']} | {r['steps']} | {r['N']} | {r['ranked']:.3f} | {r['average']:.3f} | "
            f"{r['best_of_n']:.3f} | {r['mean_of_samples']:.3f} | {r['random_flame']:.3f} | "
            f"{r['baseline']:.3f} | {r['mean_shape']:.3f} | "
            f"{r['std_s_occluded']:.3f} | {r['std_s_visible']:.3f} |" for r in rows]
    return "\n".join([head, *body])


def run_study(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from ofer.jobs import image_feature_dataset, train_baseline, train_generator, train_idrank
    from ofer.training import load_model_from_checkpoint
    from ofer.pipeline import load_generator, load_ranker
    from ofer.synthetic.make import ensure_datasets

    t0 = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    device = str(resolve_device(cfg.device))
    flame = build_flame(cfg.paths).to(device)
    synth = Path(cfg.paths.synthetic_dir)
    sets = {"STUDY_TRAIN": dict(cfg.data.train), "STUDY_TEST": dict(cfg.data.test)}
    ensure_datasets(synth, flame.cpu(), sets)
    flame.to(device)
    common = [f"device={device}", f"seed={cfg.seed}", "synthetic.ensure=false", "trainer.progress=false"] + [
        f"paths.{k}={cfg.paths[k]}" for k in ("root", "synthetic_dir", "data_dir")]
    data = ["data.datasets.synthetic.name=STUDY_TRAIN", "eval_data.datasets.synthetic.name=STUDY_TEST"]
    print(f"[study] output folder: {out} (device {device})")
    idgen_dir = out / "train_idgen"
    idgen_res = train_generator(_job_cfg("train_idgen", common + data + list(cfg.idgen_overrides), idgen_dir),
                                run_dir=idgen_dir)
    rank_dir = out / "train_idrank"
    rank_res = train_idrank(_job_cfg("train_idrank", common + data + [f"idgen_ckpt={idgen_res.checkpoint}"]
                                     + list(cfg.idrank_overrides), rank_dir), run_dir=rank_dir)
    base_dir = out / "train_baseline"
    base_res = train_baseline(_job_cfg("train_baseline", common + data + list(cfg.baseline_overrides), base_dir),
                              run_dir=base_dir)
    regressor = load_model_from_checkpoint(base_res.checkpoint, lambda c: instantiate(OmegaConf.create(c).model))
    idgen, diffusion, _ = load_generator(idgen_res.checkpoint, kind="idgen", device=device)
    ranker, _ = load_ranker(rank_res.checkpoint, device=device)
    fcfg = _job_cfg("train_idrank", common + data + [f"idgen_ckpt={idgen_res.checkpoint}"], rank_dir)
    test = image_feature_dataset(fcfg, fcfg.eval_data, ["arcface", "farl"], device)
    n = min(int(cfg.eval.num_images), len(test))
    items = [test[i] for i in range(n)]
    samplers = [OmegaConf.to_container(s, resolve=True) for s in cfg.eval.samplers]
    rows = identity_ablation(idgen=idgen, diffusion=diffusion, ranker=ranker, flame=flame, items=items,
                             gt_dir=synth / "STUDY_TEST" / "arcface_input", samplers=samplers,
                             Ns=list(cfg.eval.Ns), device=device, seed=int(cfg.seed))
    fixed = single_answer_errors(regressor=regressor.to(device).eval(), flame=flame, items=items, device=device)
    for r in rows:
        r.update(fixed)
    table = _markdown(rows)
    result = {"rows": rows, "idgen_heldout": idgen_res.metrics, "idrank_heldout": rank_res.metrics,
              "baseline_heldout": base_res.metrics,
              "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "seconds": time.perf_counter() - t0, "config": OmegaConf.to_container(cfg, resolve=True)}
    (out / "study_results.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "study_table.md").write_text(table + "\n")
    _plot(rows, out / "study_error_vs_N.png")
    print(table)
    print(f"[study] {result['seconds'] / 60:.1f} min; results in {out}")
    return result


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("ranked", "-o"), ("average", "--s"), ("best_of_n", ":^")):
        for sampler in dict.fromkeys((r["sampler"], r["steps"]) for r in rows):
            rr = [r for r in rows if (r["sampler"], r["steps"]) == sampler]
            ax.plot([r["N"] for r in rr], [r[key] for r in rr], style, label=f"{key} {sampler[0]}-{sampler[1]}")
    ax.axhline(rows[0]["random_flame"], color="gray", lw=1, label="random FLAME")
    ax.set_xlabel("N samples")
    ax.set_ylabel("face error (mm)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
