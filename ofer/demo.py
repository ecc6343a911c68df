"""`make demo` / `scripts/demo.py`: the whole method end to end on the built-in synthetic data.

1. synthetic FLAME head, MICA-layout training/test sets and a NoW-layout benchmark (data/synthetic/);
2. train IdGen, ExpGen and IdRank briefly on the shared loop (from the feature cache);
3. reconstruct the benchmark's photos (meshes, NoW submission layout, contact sheets);
4. score them with the NoW scorer, and the identity hypotheses against the known ground truth
   (ranked / average over samples / best of N / random FLAME);
5. print a short results table. Everything lands under one folder, named at the end.
The jobs are the same functions the scripts call, composed from the same configs with overrides.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose
from omegaconf import DictConfig, OmegaConf, open_dict

from ofer.config import build_flame
from ofer.data.features import resolve_device
from ofer.flame import MM_PER_M

log = logging.getLogger(__name__)


def _compose(name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _identity_report(out_dir: Path, truth: dict[str, list[float]], flame: Any, rng: np.random.Generator,
                     baseline: Any = None) -> dict:
    """Neutral-shape errors on the `face` region (mean per-vertex L2, mm, no alignment) against the
    benchmark's known identities: ranked, average over samples, mean-of-samples shape, best of N, random FLAME,
    and the deterministic baseline's single answer (from the same photo's ArcFace feature)."""
    face = flame.face_mask("face")
    rows: dict[str, list[float]] = {"ranked": [], "average": [], "best_of_n": [], "random_flame": [],
                                    "mean_shape": [], "baseline": []}
    for npz in sorted(out_dir.rglob("hypotheses.npz")):
        subject = npz.parent.relative_to(out_dir).parts[0]
        if subject not in truth:
            continue
        h = np.load(npz)
        shapes = torch.from_numpy(h["shapes"]).float()
        gt = flame.shape_vertices(torch.tensor([truth[subject]], dtype=torch.float32))[0, face]
        cand = flame.shape_vertices(shapes)[:, face]
        err = (cand - gt).norm(dim=-1).mean(-1) * MM_PER_M  # (N,)
        rand = torch.from_numpy(rng.standard_normal(shapes.shape)).float()
        err_rand = (flame.shape_vertices(rand)[:, face] - gt).norm(dim=-1).mean(-1) * MM_PER_M
        mean_shape = flame.shape_vertices(shapes.mean(0, keepdim=True))[0, face]
        rows["ranked"].append(float(err[int(h["best"])]))
        rows["average"].append(float(err.mean()))
        rows["best_of_n"].append(float(err.min()))
        rows["random_flame"].append(float(err_rand.mean()))
        rows["mean_shape"].append(float(((mean_shape - gt).norm(dim=-1).mean()) * MM_PER_M))
        if baseline is not None:
            with torch.no_grad():
                pred = baseline(torch.from_numpy(h["meta_arcface_feature"]).float()[None])
            rows["baseline"].append(float((flame.shape_vertices(pred)[0, face] - gt).norm(dim=-1).mean() * MM_PER_M))
    return {k: float(np.mean(v)) if v else float("nan") for k, v in rows.items()} | {"images": len(rows["ranked"])}


def run_demo(cfg: DictConfig) -> dict[str, Any]:
    from ofer.eval.now import score_now
    from ofer.jobs import train_baseline, train_generator, train_idrank
    from ofer.training import load_model_from_checkpoint
    from ofer.reconstruct import reconstruct
    from ofer.synthetic.make import dataset_sizes, ensure_datasets
    from ofer.synthetic.now_bench import ensure_synthetic_now

    t0 = time.perf_counter()
    out = Path(cfg.paths.output_dir)
    device = str(resolve_device(cfg.device))
    print(f"[demo] output folder: {out}  (device: {device})")
    flame = build_flame(cfg.paths)
    synth = Path(cfg.paths.synthetic_dir)
    ensure_datasets(synth, flame, dataset_sizes(cfg.get("datasets"), allow_new=False))
    now_root = ensure_synthetic_now(synth / "NoW_synthetic", flame, subjects=int(cfg.now.subjects),
                                    images_per_challenge=int(cfg.now.images_per_challenge))
    timings = {"data": time.perf_counter() - t0}
    common = [f"device={device}", f"seed={cfg.seed}"] + [f"paths.{k}={cfg.paths[k]}"
                                                          for k in ("root", "synthetic_dir", "data_dir")]

    def job(name: str, fn: Any, extra: list[str]) -> Any:
        t = time.perf_counter()
        run_dir = out / name
        extra = extra + list((cfg.get("extra_overrides") or {}).get(name) or [])
        overrides = common + extra
        print(f"[demo] {name}: python scripts/{name}.py " + " ".join(extra))
        c = _compose(name, overrides, run_dir)
        with open_dict(c):
            if "pool" in c:
                c.pool.dir = str(run_dir / "pools")
            if "output" in c:
                c.output.dir = str(run_dir)
        res = fn(c, run_dir=run_dir) if name.startswith("train") else fn(c)
        timings[name] = time.perf_counter() - t
        return res

    steps = cfg.steps
    idgen = job("train_idgen", train_generator, [f"trainer.max_steps={steps.idgen}"])
    expgen = job("train_expgen", train_generator, [f"trainer.max_steps={steps.expgen}"])
    base = job("train_baseline", train_baseline, [f"trainer.max_steps={steps.baseline}"])
    idrank = job("train_idrank", train_idrank, [
        f"idgen_ckpt={idgen.checkpoint}", f"trainer.max_steps={steps.idrank}", f"trainer.lr={cfg.idrank_lr}",
        f"pool.num_candidates={cfg.pool.num_candidates}", f"pool.sampling.steps={cfg.pool.steps}"])
    recon_dir = out / "reconstruct"
    now_pred = recon_dir / "now_predictions"
    summary = job("reconstruct", reconstruct, [
        f"input={now_root / 'final_release_version' / 'iphone_pictures'}",
        f"pipeline.idgen_ckpt={idgen.checkpoint}", f"pipeline.expgen_ckpt={expgen.checkpoint}",
        f"pipeline.idrank_ckpt={idrank.checkpoint}", f"pipeline.num_samples={cfg.num_samples}",
        f"pipeline.id_sampling.steps={cfg.sampling_steps}", f"pipeline.exp_sampling.steps={cfg.sampling_steps}",
        f"preprocess.annotations={now_root / 'ofer_annotations.json'}", "preprocess.detector=false",
        f"output.now_dir={now_pred}", "output.max_expression_meshes=4"])
    t = time.perf_counter()
    report = score_now(now_root, now_pred, device=device, out_dir=out / "eval_now")
    timings["eval_now"] = time.perf_counter() - t
    truth = json.loads((now_root / "ofer_ground_truth.json").read_text())["shapes"]
    from hydra.utils import instantiate

    regressor = load_model_from_checkpoint(base.checkpoint, lambda c: instantiate(OmegaConf.create(c).model))
    ident = _identity_report(recon_dir, truth, flame, np.random.default_rng(int(cfg.seed)), regressor)
    metrics = json.loads((out / "eval_now" / "now_metrics.json").read_text())
    result = {"now": {k: metrics.get(k) for k in ("median", "mean", "std", "num_images", "num_missing", "num_failed")},
              "identity_mm": ident, "idrank_heldout": {k: v for k, v in idrank.metrics.items() if k.startswith("eval")},
              "idgen_heldout": {k: v for k, v in idgen.metrics.items() if k.startswith("eval")},
              "reconstruct": {k: summary[k] for k in ("images", "reconstructed", "failed", "seconds")},
              "timings_s": timings, "total_s": time.perf_counter() - t0, "output": str(out), "device": device}
    (out / "demo_results.json").write_text(json.dumps(result, indent=1, default=float))
    _print_table(result, out, report)
    return result


def _print_table(r: dict, out: Path, report: Any) -> None:
    n = r["now"]
    i = r["identity_mm"]
    lines = [
        "",
        "=" * 72,
        f"OFER demo on synthetic data ({r['device']}, {r['total_s'] / 60:.1f} min) -- all files under {out}",
        "-" * 72,
        f"NoW-style scan-to-mesh error (synthetic NoW, {n['num_images']} images): "
        f"median {n['median']:.3f}  mean {n['mean']:.3f}  std {n['std']:.3f} mm",
        f"Identity error on the face region, {i['images']} photos (mm, lower is better):",
        f"  ranked (IdRank pick) {i['ranked']:7.3f}   average over samples {i['average']:7.3f}",
        f"  best of N (oracle)   {i['best_of_n']:7.3f}   random FLAME         {i['random_flame']:7.3f}",
        f"  mean of the samples  {i['mean_shape']:7.3f}   deterministic baseline {i['baseline']:7.3f}",
        f"Contact sheets: {out / 'reconstruct'}/<subject>/<challenge>/<image>/contact_sheet.png",
        "=" * 72,
    ]
    print("\n".join(lines))
