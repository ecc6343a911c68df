"""CO-545-style scoring of multi-hypothesis identity predictions against per-image 3D ground truth.

The paper's CO-545 set (545 occluded images with 3D scans) is not public; this evaluates the same numbers
on any MICA-layout dataset whose images carry a ground-truth file, such as the synthetic sets of
`ofer.synthetic.dataset` (`<root>/<NAME>/arcface_input/<actor>/<stem>_gt.npz` with `shape (300,)` and
`occluded_vertices (V,)` bool).

Predictions (written by the reconstruction pipeline), one file per image, mirroring the image path:

    <predictions>/<actor>/<stem>.npz    shapes (N, 300) float   the N identity samples
                                        scores (N,) float       ranker scores (higher is better)
                                        best () int             index of the selected sample
                                        expressions (N, E), jaw (N, 3)   optional, checked but not scored

Everything is scored on neutral meshes (FLAME with zero expression and pose, `FLAME.shape_vertices`) in
millimetres, in the canonical FLAME frame without alignment, on the vertices of one FLAME_masks region
(`face` by default, the front face IdRank sees). Per image (see `ofer.eval.metrics` for the formulas):

    se_rmse          RMSE of the selected sample (`best`)
    cse_rmse         RMSE of the closest sample (min over samples) and its index `cse_index`
    mean_rmse        mean over samples of the RMSE (expected error of a random sample)
    meanshape_rmse   RMSE of the average mesh of the samples
    std_s_occluded   STD-S on region vertices that project into the occluder (NaN without occluder)
    std_s_visible    STD-S on the other region vertices
    asd              average pairwise sample distance on the region (NaN with one sample)
    ode_rate         fraction of samples with ||beta||^2 > chi2.ppf(0.999, 300)
    ranked_rmse, top1, spearman   how the scores rank the samples by RMSE (`metrics.ranking_report`)

Pooled: mean and median over the images where a value is defined, with the count. A missing or malformed
prediction (or ground-truth) file is reported with its path and the reason and the rest is scored.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch

from ofer.eval.metrics import (
    DEFAULT_ODE_QUANTILE, asd, cse_rmse, ode_rate, ode_threshold, ranking_report, sample_rmse, se_rmse, std_s,
    vertex_rmse,
)
from ofer.flame import FLAME, MM_PER_M
from ofer.io import SafeLoadError, safe_load_npy_object

__all__ = [
    "Prediction", "GroundTruth", "ImageEntry", "EvalFileError", "prediction_path", "load_prediction",
    "load_ground_truth", "dataset_images", "score_image", "evaluate_predictions", "evaluate_co545",
    "resolve_device", "PER_IMAGE_METRICS", "METRICS_FILE", "PER_IMAGE_FILE",
]

log = logging.getLogger(__name__)

METRICS_FILE = "co545_metrics.json"
PER_IMAGE_FILE = "co545_per_image.csv"
PER_IMAGE_METRICS = (
    "se_rmse", "cse_rmse", "mean_rmse", "meanshape_rmse", "std_s_occluded", "std_s_visible", "asd",
    "ode_rate", "ranked_rmse", "best_rmse", "top1", "spearman",
)
DEFINITIONS = {
    "units": "millimetres, neutral FLAME meshes (zero expression and pose), canonical frame, no alignment",
    "rmse": "sqrt(mean over region vertices of ||pred_v - gt_v||^2)",
    "se_rmse": "RMSE of the selected sample (the prediction's `best`)",
    "cse_rmse": "min over samples of the RMSE (closest sample error)",
    "mean_rmse": "mean over samples of the RMSE",
    "meanshape_rmse": "RMSE of the mean mesh of the samples",
    "std_s": "mean over region vertices of sqrt(mean_n ||x_nv - mean_n x_nv||^2) (ddof 0); occluded = region "
             "vertices projecting into the occluder, visible = the rest of the region",
    "asd": "mean over sample pairs i<j of mean over region vertices of ||x_iv - x_jv||",
    "ode_rate": "fraction of samples with ||beta||^2 > chi2.ppf(quantile, df=300)",
    "ranked_rmse": "RMSE of the argmax-score sample; best_rmse = min over samples (= cse_rmse)",
    "top1": "1 if the argmax-score sample has the smallest RMSE",
    "spearman": "Spearman correlation between -RMSE and scores over the samples of an image",
}


class EvalFileError(ValueError):
    """One prediction or ground-truth file is missing or malformed: `path` and `reason`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Prediction:
    """The samples of one image. shapes (N, D), scores (N,), best in [0, N); optional expressions (N, E), jaw (N, 3)."""

    shapes: np.ndarray
    scores: np.ndarray
    best: int
    expressions: np.ndarray | None = None
    jaw: np.ndarray | None = None


@dataclass
class GroundTruth:
    """Ground truth of one image: shape (D,), occluded (V,) bool, occluder name ("none" when unoccluded)."""

    shape: np.ndarray
    occluded: np.ndarray
    occluder: str


@dataclass
class ImageEntry:
    """One dataset image: `image` its path relative to `<root>/<NAME>/arcface_input/`, `gt` its `_gt.npz`."""

    actor: str
    image: str
    gt: Path


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------

def prediction_path(predictions: str | Path, image: str) -> Path:
    """`<predictions>/<actor>/<stem>.npz` for the image `<actor>/<stem>.<ext>` (the image path, mirrored)."""
    rel = PurePosixPath(image)
    return Path(predictions).joinpath(*rel.parent.parts, f"{rel.stem}.npz")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise EvalFileError(path, "missing file")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise EvalFileError(path, f"not a readable .npz ({type(err).__name__}: {err})") from None


def _real_array(path: Path, data: dict[str, np.ndarray], key: str, shape: tuple[int | None, ...],
                want: str) -> np.ndarray:
    if key not in data:
        raise EvalFileError(path, f"missing key '{key}' (expected {want}); found {sorted(data)}")
    arr = data[key]
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise EvalFileError(path, f"key '{key}' has dtype {arr.dtype}, expected a real number array {want}")
    if arr.ndim != len(shape) or any(s is not None and s != f for s, f in zip(shape, arr.shape)):
        raise EvalFileError(path, f"key '{key}' has shape {arr.shape}, expected {want}")
    if not np.isfinite(arr).all():
        raise EvalFileError(path, f"key '{key}' contains NaN or inf")
    return arr


def load_prediction(path: str | Path, *, n_shape: int = 300) -> Prediction:
    """Read and check one prediction file; raises `EvalFileError(path, reason)`."""
    path = Path(path)
    data = _read_npz(path)
    shapes = _real_array(path, data, "shapes", (None, n_shape), f"(N, {n_shape})")
    N = shapes.shape[0]
    if N < 1:
        raise EvalFileError(path, "key 'shapes' holds no sample (N = 0)")
    scores = _real_array(path, data, "scores", (N,), f"({N},) to match shapes")
    best_arr = _real_array(path, data, "best", (), "an integer scalar")
    if not np.issubdtype(best_arr.dtype, np.integer) and float(best_arr) != int(best_arr):
        raise EvalFileError(path, f"key 'best' is {best_arr!r}, expected an integer")
    best = int(best_arr)
    if not 0 <= best < N:
        raise EvalFileError(path, f"key 'best' is {best}, expected an index in [0, {N})")
    expressions = jaw = None
    if "expressions" in data:
        expressions = _real_array(path, data, "expressions", (N, None), f"({N}, E)")
    if "jaw" in data:
        jaw = _real_array(path, data, "jaw", (N, 3), f"({N}, 3)")
    return Prediction(shapes=shapes.astype(np.float64), scores=scores.astype(np.float64), best=best,
                      expressions=expressions, jaw=jaw)


def load_ground_truth(path: str | Path, *, n_shape: int = 300, num_vertices: int) -> GroundTruth:
    """Read one `<stem>_gt.npz` (`ofer.synthetic.dataset`); raises `EvalFileError(path, reason)`."""
    path = Path(path)
    data = _read_npz(path)
    shape = _real_array(path, data, "shape", (n_shape,), f"({n_shape},)")
    if "occluded_vertices" not in data:
        raise EvalFileError(path, f"missing key 'occluded_vertices' (expected ({num_vertices},) bool); "
                                  f"found {sorted(data)}")
    occ = data["occluded_vertices"]
    if occ.dtype != np.bool_ or occ.shape != (num_vertices,):
        raise EvalFileError(path, f"key 'occluded_vertices' has shape {occ.shape} dtype {occ.dtype}, expected "
                                  f"({num_vertices},) bool (one flag per vertex of this FLAME model)")
    occluder = str(data["occluder"]) if "occluder" in data else "unknown"
    return GroundTruth(shape=shape.astype(np.float64), occluded=occ, occluder=occluder)


def dataset_images(root: str | Path, name: str) -> list[ImageEntry]:
    """The images of the MICA-layout dataset `<root>/<name>` from its index `<root>/image_paths/<name>.npy`
    (actor -> (image paths, npz path); the public OFER code's reversed pair order is accepted too)."""
    root = Path(root)
    index_path = root / "image_paths" / f"{name}.npy"
    if not index_path.is_file():
        raise FileNotFoundError(f"dataset index not found: {index_path} (co545.root={root}, co545.dataset={name}); "
                                "write a synthetic set with `python scripts/make_synthetic.py`")
    try:
        index = safe_load_npy_object(index_path)
    except SafeLoadError as err:
        raise ValueError(f"cannot read dataset index: {err}") from None
    if not isinstance(index, dict) or not index:
        raise ValueError(f"{index_path}: expected a non-empty dict actor -> (image paths, npz path), "
                         f"found {type(index).__name__}")
    image_dir = root / name / "arcface_input"
    entries = []
    for actor, pair in index.items():
        if isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], str):
            images = pair[0]
        elif isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str):
            images = pair[1]  # public OFER order: (npz path, image paths)
        else:
            raise ValueError(f"{index_path}: entry '{actor}' is {type(pair).__name__} {pair!r:.80}, expected a "
                             "pair (list of image paths, npz path)")
        if isinstance(images, str) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{index_path}: entry '{actor}' has image paths {images!r:.80}, expected a list of str")
        for image in images:
            rel = PurePosixPath(image)
            gt = image_dir.joinpath(*rel.parent.parts, f"{rel.stem}_gt.npz")
            entries.append(ImageEntry(actor=str(actor), image=str(image), gt=gt))
    return entries


def resolve_device(device: str) -> torch.device:
    """`auto` -> cuda when available, else cpu; anything else must be a valid, available torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available; use device=auto or device=cpu")
    return dev


# ----------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def score_image(flame: FLAME, pred: Prediction, gt: GroundTruth, *, region: torch.Tensor,
                threshold: float) -> dict[str, float]:
    """All per-image numbers (mm) for one prediction. `region`: vertex indices (K,) on FLAME's device."""
    dev, dt = flame.v_template.device, flame.v_template.dtype
    shapes = torch.as_tensor(pred.shapes, dtype=dt, device=dev)
    samples = (flame.shape_vertices(shapes) * MM_PER_M)[None]  # (1, N, V, 3)
    target = flame.shape_vertices(torch.as_tensor(gt.shape[None], dtype=dt, device=dev)) * MM_PER_M  # (1, V, 3)
    V = samples.shape[2]
    in_region = torch.zeros(V, dtype=torch.bool, device=dev)
    in_region[region] = True
    occluded = torch.as_tensor(gt.occluded, device=dev) & in_region
    visible = in_region & ~occluded

    errors = sample_rmse(samples, target, in_region)  # (1, N)
    closest = cse_rmse(samples, target, in_region)
    scores = torch.as_tensor(pred.scores, dtype=torch.float64, device=dev)[None]
    rank = ranking_report(errors, scores)
    N = samples.shape[1]
    return {
        "samples": N,
        "best": pred.best,
        "best_is_argmax": int(pred.best == int(scores.argmax())),
        "se_rmse": float(se_rmse(samples[:, pred.best], target, in_region)[0]),
        "cse_rmse": float(closest.rmse[0]),
        "cse_index": int(closest.index[0]),
        "mean_rmse": float(errors.mean()),
        "meanshape_rmse": float(vertex_rmse(samples.mean(dim=1), target, mask=in_region)[0]),
        "std_s_occluded": float(std_s(samples, occluded[None])[0]),
        "std_s_visible": float(std_s(samples, visible[None])[0]),
        "occluded_vertices": int(occluded.sum()),
        "visible_vertices": int(visible.sum()),
        "asd": float(asd(samples, in_region)[0]) if N >= 2 else float("nan"),
        "ode_rate": float(ode_rate(shapes.to(torch.float64)[None], threshold=threshold)[0]),
        "ranked_rmse": rank["ranked"],
        "best_rmse": rank["best"],
        "top1": rank["top1"],
        "spearman": rank["spearman"],
    }


def _pool(values: list[float]) -> dict[str, Any]:
    finite = np.array([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return {"mean": None, "median": None, "images": 0}
    return {"mean": float(finite.mean()), "median": float(np.median(finite)), "images": int(finite.size)}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def evaluate_predictions(*, root: str | Path, dataset: str, predictions: str | Path, flame: FLAME,
                         out_dir: str | Path, region: str = "face",
                         ode_quantile: float = DEFAULT_ODE_QUANTILE) -> dict[str, Any]:
    """Score every image of `<root>/<dataset>` against `<predictions>/<actor>/<stem>.npz`; write
    `co545_metrics.json` and `co545_per_image.csv` into `out_dir`; return the JSON content. Runs on the
    device of `flame`. Missing or malformed files are listed under `failures` (path, reason)."""
    predictions = Path(predictions)
    if not predictions.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {predictions} (co545.predictions)")
    entries = dataset_images(root, dataset)
    face = flame.face_mask(region)
    threshold = ode_threshold(flame.n_shape, ode_quantile)

    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for entry in entries:
        pred_file = prediction_path(predictions, entry.image)
        try:
            gt = load_ground_truth(entry.gt, n_shape=flame.n_shape, num_vertices=flame.num_vertices)
            pred = load_prediction(pred_file, n_shape=flame.n_shape)
        except EvalFileError as err:
            log.warning("skipping %s: %s", entry.image, err)
            failures.append({"image": entry.image, "path": err.path, "reason": err.reason})
            continue
        numbers = score_image(flame, pred, gt, region=face, threshold=threshold)
        rows.append({"image": entry.image, "actor": entry.actor, "occluder": gt.occluder, **numbers})

    expected = {prediction_path(predictions, e.image).resolve() for e in entries}
    unexpected = sorted(str(p) for p in predictions.rglob("*.npz") if p.resolve() not in expected)
    if unexpected and len(failures) == len(entries):
        log.warning("no prediction matched the dataset, but %d other .npz files are there (e.g. %s); expected "
                    "<predictions>/<actor>/<stem>.npz", len(unexpected), unexpected[0])

    by_occluder: dict[str, dict[str, Any]] = {}
    for occ in sorted({r["occluder"] for r in rows}):
        sel = [r for r in rows if r["occluder"] == occ]
        by_occluder[occ] = {m: _pool([r[m] for r in sel])["mean"]
                            for m in ("se_rmse", "cse_rmse", "std_s_occluded", "std_s_visible")}
        by_occluder[occ]["images"] = len(sel)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / PER_IMAGE_FILE
    columns = ["image", "actor", "occluder", "samples", "best", "best_is_argmax", "cse_index",
               "occluded_vertices", "visible_vertices", *PER_IMAGE_METRICS]
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="raise")
        writer.writeheader()
        writer.writerows(rows)

    summary = {
        "dataset": dataset, "root": str(root), "predictions": str(predictions),
        "region": region, "region_vertices": int(face.numel()),
        "images": len(entries), "scored": len(rows), "failed": len(failures), "failures": failures,
        "unexpected_predictions": len(unexpected), "unexpected_examples": unexpected[:10],
        "ode_quantile": ode_quantile, "ode_threshold": threshold,
        "best_is_argmax": sum(r["best_is_argmax"] for r in rows),
        "metrics": {m: _pool([float(r[m]) for r in rows]) for m in PER_IMAGE_METRICS},
        "by_occluder": by_occluder,
        "definitions": DEFINITIONS,
        "files": {"metrics": str(out_dir / METRICS_FILE), "per_image": str(csv_path)},
    }
    summary = _json_safe(summary)
    tmp = out_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    tmp.replace(out_dir / METRICS_FILE)
    return summary


def evaluate_co545(cfg: Any) -> dict[str, Any]:
    """Entry point of `scripts/eval_co545.py` (config `configs/eval_co545.yaml`); returns the summary."""
    from ofer.config import build_flame

    c = cfg.co545
    root, dataset, predictions = Path(c.root), str(c.dataset), Path(c.predictions)  # fail early on `???`
    if not predictions.is_dir():
        raise FileNotFoundError(f"predictions folder not found: {predictions} (co545.predictions)")
    dataset_images(root, dataset)  # a missing index fails before FLAME is built
    device = resolve_device(str(cfg.device))
    # float64: CSE values are ~0.1 mm on coordinates of ~100 mm; cheap at one image at a time.
    flame = build_flame(cfg.paths, landmarks=False, dtype=torch.float64).to(device)
    summary = evaluate_predictions(
        root=root, dataset=dataset, predictions=predictions, flame=flame,
        out_dir=cfg.paths.output_dir, region=str(c.get("region", "face")),
        ode_quantile=float(c.get("ode_quantile", DEFAULT_ODE_QUANTILE)),
    )
    m = summary["metrics"]

    def fmt(name: str) -> str:
        v = m[name]["mean"]
        return "n/a" if v is None else f"{v:.4f}"

    log.info("CO-545 %s: %d/%d images scored, %d failed", summary["dataset"], summary["scored"],
             summary["images"], summary["failed"])
    for name in ("se_rmse", "cse_rmse", "mean_rmse", "std_s_occluded", "std_s_visible", "asd", "ode_rate"):
        log.info("  %-16s %s", name, fmt(name))
    for f in summary["failures"]:
        log.error("  failed: %s (%s)", f["path"], f["reason"])
    log.info("wrote %s", summary["files"]["metrics"])
    return summary
