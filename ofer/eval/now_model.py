"""`scripts/eval_now.py`: score a folder of NoW predictions, or a model in one command.

Model mode (`model.idgen_ckpt` + `model.idrank_ckpt`): reconstruct the image list's photos with OFER
(`ofer.reconstruct.reconstruct_images`, the pipeline and face settings of `configs/reconstruct.yaml`) into the
NoW submission layout `<out>/predictions/`, score that folder exactly as folder mode does, then score the shape
pool behind each submission with the same scorer: the paper's identity ablation on NoW (ranked / average over
samples / best of N / random FLAME; definitions in `configs/eval_now.yaml` and `ablation_columns`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ofer.eval.now import (
    ImageFailure, NowReport, align_prediction, load_scan, pooled_stats, read_image_list, refine_alignment,
    resolve_device, scan_folders, score_now_from_config,
)
from ofer.flame import FLAME, MM_PER_M
from ofer.meshio import atomic_write
from ofer.outputs import HYPOTHESES_FILE

__all__ = ["EvalNowResult", "ImageScores", "eval_mode", "now_annotations", "score_shapes", "ablation_columns",
           "run_ablation", "run_eval_now"]

log = logging.getLogger(__name__)

CHECKPOINT_KEYS = ("idgen_ckpt", "idrank_ckpt", "expgen_ckpt")
PICTURES = Path("final_release_version") / "iphone_pictures"
BOXES = Path("final_release_version") / "detected_face"
SYNTHETIC_ANNOTATIONS = "ofer_annotations.json"  # written by ofer/synthetic/now_bench.py


@dataclass
class EvalNowResult:
    """What `run_eval_now` did: the NoW report, and in model mode the reconstruction summary and ablation."""

    report: NowReport
    reconstruction: dict | None = None
    ablation: dict | None = None

    @property
    def num_failed(self) -> int:
        """Images that failed anywhere (scoring, reconstruction, ablation): the script exits 1 when > 0."""
        n = self.report.num_failed
        n += len(self.reconstruction["failures"]) if self.reconstruction else 0
        n += len(self.ablation["failures"]) if self.ablation else 0
        return n


def eval_mode(cfg: DictConfig) -> str:
    """'folder' (`now.predictions`) or 'model' (`model.*_ckpt`); anything else is an error naming the keys."""
    given = [k for k in CHECKPOINT_KEYS if cfg.model.get(k) is not None]
    has_predictions = cfg.now.get("predictions") is not None
    if has_predictions and given:
        raise ValueError(
            f"eval_now: now.predictions={cfg.now.predictions} and {', '.join('model.' + k for k in given)} are both "
            "set: give now.predictions to score a folder of predictions, or the model checkpoints to reconstruct "
            "and score the benchmark's photos, not both")
    if has_predictions:
        return "folder"
    if not given:
        raise ValueError(
            "eval_now: nothing to score: set now.predictions=<folder of predicted meshes>, or "
            "model.idgen_ckpt=<ckpt or run dir> model.idrank_ckpt=<ckpt or run dir> [model.expgen_ckpt=...] to "
            "reconstruct the benchmark's photos first")
    missing = [f"model.{k}" for k in ("idgen_ckpt", "idrank_ckpt") if cfg.model.get(k) is None]
    if missing:
        raise ValueError(f"eval_now: model mode needs {' and '.join(missing)} too (given: "
                         f"{', '.join('model.' + k for k in given)})")
    return "model"


def run_eval_now(cfg: DictConfig, out_dir: str | os.PathLike | None = None) -> EvalNowResult:
    """Entry point of `scripts/eval_now.py`; writes into `out_dir`, by default the Hydra run dir."""
    mode = eval_mode(cfg)
    if out_dir is None:
        from hydra.core.hydra_config import HydraConfig

        out_dir = HydraConfig.get().runtime.output_dir
    out = Path(out_dir)
    if mode == "folder":
        return EvalNowResult(score_now_from_config(cfg, out))
    summary = _reconstruct(cfg, out)
    report = score_now_from_config(cfg, out, predictions=out / "predictions")
    ablation = run_ablation(cfg, report, out / "reconstruct", out) if cfg.ablation.enabled else None
    for f in summary["failures"]:
        print(f"  FAILED to reconstruct {f['path']}: {f['reason']}")
    return EvalNowResult(report, summary, ablation)


# ----------------------------------------------------------------------------------------------------
# model mode: reconstruction
# ----------------------------------------------------------------------------------------------------


def _name(line: str) -> str:
    """An image-list line's name in `reconstruct`'s outputs and annotations: the line without suffix."""
    return str(Path(line).with_suffix(""))


def now_annotations(root: str | os.PathLike, lines: list[str],
                    annotations: str | os.PathLike | None) -> tuple[dict[str, dict], dict[str, dict[str, str]]]:
    """Per image (key: `_name(line)`) what locates the face: NoW's `detected_face` box where the benchmark has
    one, then the entries of `annotations` (landmarks and/or box; default `<root>/ofer_annotations.json` where
    present) on top. Also returns, by the same key, the images whose box file is unreadable as
    `{"path", "reason"}` failures."""
    from ofer.data.preprocess import load_now_box

    root = Path(root)
    out: dict[str, dict] = {}
    failures: dict[str, dict[str, str]] = {}
    for line in lines:
        box_file = root / BOXES / f"{_name(line)}.npy"
        if box_file.is_file():
            try:
                out[_name(line)] = {"box": load_now_box(box_file).tolist()}
            except (OSError, ValueError) as err:
                log.error("%s: %s", box_file, err)
                failures[_name(line)] = {"path": str(box_file), "reason": f"{type(err).__name__}: {err}"}
    if annotations is None and (root / SYNTHETIC_ANNOTATIONS).is_file():
        annotations = root / SYNTHETIC_ANNOTATIONS
        log.info("face landmarks and boxes from %s", annotations)
    if annotations is not None:
        extra = json.loads(Path(annotations).read_text())
        for line in lines:
            entry = extra.get(_name(line)) or extra.get(line)
            if entry:
                out[_name(line)] = {**out.get(_name(line), {}), **entry}
    return out, failures


def _reconstruct_config(cfg: DictConfig, out: Path, annotations: Path) -> DictConfig:
    """The `configs/reconstruct.yaml`-shaped config of model mode: `model` is the pipeline block, and the
    paths, encoders, face settings, seed and device are eval_now's; outputs go under `out`. Only the neutral
    shape matters to NoW, so no expression meshes and no contact sheets are written."""
    pipeline = OmegaConf.masked_copy(cfg.model, [k for k in cfg.model if k != "batch_size"])
    rc = OmegaConf.create({
        "paths": cfg.paths, "encoders": cfg.encoders, "pipeline": pipeline, "preprocess": cfg.preprocess,
        "seed": cfg.seed, "device": cfg.device, "batch_size": cfg.model.batch_size,
        "output": {"dir": str(out / "reconstruct"), "mesh_format": "obj", "max_expression_meshes": 0,
                   "contact_sheet": False, "now_dir": str(out / "predictions"), "skip_existing": True},
    })
    rc.preprocess.annotations = str(annotations)
    return rc


def _reconstruct(cfg: DictConfig, out: Path) -> dict[str, Any]:
    """Reconstruct the listed photos into `<out>/reconstruct/` and `<out>/predictions/`; reconstruct's summary,
    whose `failures` also list the images left out for an unreadable box file."""
    from ofer.reconstruct import reconstruct_images

    c = cfg.now
    root = Path(c.root)
    _, entries = read_image_list(root, split=c.split, imgs_list=c.imgs_list, challenge=c.challenge or None)
    lines = [e[0] for e in entries]
    ann, bad_boxes = now_annotations(root, lines, cfg.preprocess.annotations)
    lines = [line for line in lines if _name(line) not in bad_boxes]
    ann_path = atomic_write(out / "now_annotations.json", (json.dumps(ann) + "\n").encode())
    pictures = root / PICTURES
    print(f"NoW model mode: reconstructing {len(lines)} photos of {pictures} ({len(ann)} with a box or landmarks)")
    summary = reconstruct_images(_reconstruct_config(cfg, out, ann_path), [pictures / line for line in lines],
                                 pictures)
    summary["failures"] = list(bad_boxes.values()) + summary["failures"]
    return summary


# ----------------------------------------------------------------------------------------------------
# model mode: the shape-pool ablation
# ----------------------------------------------------------------------------------------------------


@dataclass
class ImageScores:
    """NoW distances of one image's submission and shape pool, each (n,) over the same cropped scan vertices.

    ranked: the submission's distances (n,). best: index of the ranked candidate in hypotheses.npz.
    indices: candidate indices scored (the first K, then `best` when it is not among them).
    candidates: (len(indices), n) their distances. prior: (K, n) distances of K random FLAME shapes.
    """

    image: str
    ranked: np.ndarray = field(repr=False)
    best: int
    indices: list[int]
    candidates: np.ndarray = field(repr=False)
    prior: np.ndarray = field(repr=False)


def score_shapes(
    flame: FLAME, shapes: torch.Tensor, scan_points: np.ndarray, scan_lmks: np.ndarray, *, metrical: bool = False,
    unit: str = "mm", device: str | torch.device = "cpu", backend: str = "auto", batch_size: int = 16,
    max_pairs: int | None = None, compile: bool = False, triton: bool = False,
) -> list[np.ndarray]:
    """NoW distances of neutral FLAME shapes against one cropped scan, as the submission is scored.

    Each shape is decoded alone (`flame(shape[None])`, as `OferPipeline.decode` writes the submission, so the
    ranked candidate reproduces the submitted mesh) to a mesh and its 7 NoW landmarks in mm (float64, as
    written to the `.obj`/`.npy`), aligned by the landmark similarity and refined like any prediction.

    Args:
        shapes: (M, n_shape) coefficients.
        scan_points: (n, 3) cropped scan vertices; scan_lmks: (7, 3) scan landmarks.
        batch_size: meshes refined together.
        max_pairs, compile, triton: as `refine_alignment` (torch backend: memory, the compiled closest-point
            search, the Triton search kernel).

    Returns:
        M arrays (n,) float64 of distances (mm).

    Raises:
        ValueError: a mesh whose alignment or refinement fails (degenerate landmarks, non-finite values).
    """
    faces = flame.faces.cpu().numpy()
    aligned = []
    with torch.no_grad():
        for k in range(shapes.shape[0]):
            o = flame(shapes[k:k + 1].to(flame.v_template.device))
            verts = o.vertices[0].double().cpu().numpy() * MM_PER_M
            lmks = o.now_landmarks()[0].double().cpu().numpy() * MM_PER_M
            aligned.append(align_prediction(scan_lmks, verts, lmks, metrical=metrical, unit=unit))
    out: list[np.ndarray] = []
    for s in range(0, len(aligned), batch_size):
        chunk = aligned[s:s + batch_size]
        res = refine_alignment([scan_points] * len(chunk), chunk, [faces] * len(chunk), metrical=metrical,
                               device=device, backend=backend, max_pairs=max_pairs, compile=compile,
                               triton=triton)
        bad = next((f for f in res.failure if f), None)
        if bad:
            raise ValueError(bad)
        out += res.distances
    return out


def _stats_dict(arrays: list[np.ndarray]) -> dict[str, float]:
    median, mean, std = pooled_stats(arrays)
    return {"median": median, "mean": mean, "std": std}


def _mean_of_slots(rows: list[np.ndarray], k: int) -> dict[str, float]:
    """Mean over slots j < k of the pooled statistics of `row[j]` of every image."""
    stats = [_stats_dict([r[j] for r in rows]) for j in range(k)]
    return {key: float(np.mean([s[key] for s in stats])) for key in ("median", "mean", "std")}


def _best_rows(rows: list[np.ndarray]) -> list[np.ndarray]:
    """Per image the row with the lowest mean distance (the "ideal min" pick)."""
    return [r[int(np.argmin(r.mean(axis=1)))] for r in rows]


def ablation_columns(images: list[ImageScores], k: int) -> dict[str, dict[str, float]]:
    """Pooled median / mean / std (mm) of each ablation column over `images` (see configs/eval_now.yaml).

    ranked: the submissions. average: mean over j < k of the statistics of every image's j-th candidate (the
    expected score of submitting a random sample). best_of_n: per image the scored candidate with the lowest
    mean distance. random_flame, random_flame_best_of_n: the same two for the prior shapes. Every image
    contributes the same vertices to every column, so the pooled mean of best_of_n is <= that of average and,
    the ranked candidate being among the scored ones, <= that of ranked up to float rounding (it is scored again,
    in another batch of the refinement: ~1e-8 mm). No images: no columns.
    """
    if not images:
        return {}
    cands = [im.candidates for im in images]
    prior = [im.prior for im in images]
    return {
        "ranked": _stats_dict([im.ranked for im in images]),
        "average": _mean_of_slots(cands, k),
        "best_of_n": _stats_dict(_best_rows(cands)),
        "random_flame": _mean_of_slots(prior, k),
        "random_flame_best_of_n": _stats_dict(_best_rows(prior)),
    }


def _score_image(flame: FLAME, hyp_path: Path, ranked: np.ndarray, scan: tuple[np.ndarray, np.ndarray], k: int,
                 rng: np.random.Generator, line: str, opts: dict) -> ImageScores:
    """Score the first k candidates of `hyp_path` (+ the ranked one) and k prior shapes against `scan`."""
    with np.load(hyp_path) as h:
        shapes, best = torch.from_numpy(h["shapes"]).float(), int(h["best"])
    if shapes.shape[0] < k:
        raise ValueError(f"{hyp_path} holds {shapes.shape[0]} candidates, fewer than the {k} to score (an older run?)")
    indices = list(range(k)) + ([best] if best >= k else [])
    prior = torch.from_numpy(rng.standard_normal((k, shapes.shape[1]))).float()
    d = score_shapes(flame, torch.cat([shapes[indices], prior]), *scan, **opts)
    return ImageScores(image=line, ranked=ranked, best=best, indices=indices,
                       candidates=np.stack(d[:len(indices)]), prior=np.stack(d[len(indices):]))


def run_ablation(cfg: DictConfig, report: NowReport, recon_dir: Path, out: Path) -> dict:
    """The shape-pool ablation of every image scored in `report`; writes `<out>/ablation.json`, prints a table."""
    from ofer.config import build_flame

    c = cfg.now
    scan_dir, lmk_dir = scan_folders(c.root, c.gt_mesh_folder, c.gt_lmk_folder)
    dev = resolve_device(cfg.device)
    flame = build_flame(cfg.paths).to(dev)
    num_samples = int(cfg.model.num_samples)
    k = min(int(cfg.ablation.num_candidates), num_samples)
    if k < 1:
        raise ValueError(f"ablation.num_candidates={cfg.ablation.num_candidates}: expected >= 1")
    opts = {"metrical": bool(c.metrical), "unit": c.unit, "device": dev, "backend": c.backend,
            "batch_size": int(c.batch_size), "max_pairs": None if c.max_pairs is None else int(c.max_pairs),
            "compile": bool(c.get("compile", False)), "triton": bool(c.get("triton", False))}
    rng = np.random.default_rng(int(cfg.ablation.seed))
    scans: dict[str, tuple[np.ndarray, np.ndarray] | ImageFailure] = {}
    images: list[ImageScores] = []
    failures: list[ImageFailure] = []
    for n, (line, ranked) in enumerate(zip(report.images, report.distances)):
        subject = line.split("/")[-3]
        if subject not in scans:
            scans[subject] = load_scan(scan_dir, lmk_dir, subject, line)
        hyp = recon_dir / _name(line) / HYPOTHESES_FILE
        scan = scans[subject]
        if isinstance(scan, ImageFailure):
            failures.append(ImageFailure(line, scan.path, scan.reason))
            continue
        try:
            images.append(_score_image(flame, hyp, ranked, scan, k, rng, line, opts))
        except (OSError, KeyError, ValueError) as exc:  # listed in ablation.json; the other images go on
            failures.append(ImageFailure(line, str(hyp), f"{type(exc).__name__}: {exc}"))
            log.error("ablation: %s (%s): %s", line, hyp, exc)
        log.info("ablation: %d / %d images", n + 1, len(report.images))
    result = {
        "columns": ablation_columns(images, k),
        "num_images": len(images), "num_candidates": k, "num_samples": num_samples, "seed": int(cfg.ablation.seed),
        "split": c.split, "challenge": c.challenge, "metrical": bool(c.metrical),
        "failures": [asdict(f) for f in failures],
        "per_image": [{"image": im.image, "best": im.best, "indices": im.indices,
                       "ranked_mean": float(im.ranked.mean()),
                       "candidate_means": im.candidates.mean(axis=1).tolist(),
                       "random_flame_means": im.prior.mean(axis=1).tolist()} for im in images],
    }
    atomic_write(out / "ablation.json", (json.dumps(result, indent=1) + "\n").encode())
    _print_ablation(result)
    return result


def _print_ablation(r: dict) -> None:
    lines = [f"NoW shape-pool ablation ({r['split']}, {r['num_images']} images, first {r['num_candidates']} of "
             f"{r['num_samples']} candidates; mm):", f"  {'column':<24} {'median':>8} {'mean':>8} {'std':>8}"]
    if not r["columns"]:
        lines.append("  no image scored")
    for name, st in r["columns"].items():
        lines.append(f"  {name:<24} {st['median']:8.4f} {st['mean']:8.4f} {st['std']:8.4f}")
    for f in r["failures"]:
        lines.append(f"  FAILED {f['image']}: {f['path']}: {f['reason']}")
    print("\n".join(lines))
