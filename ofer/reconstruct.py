"""`scripts/reconstruct.py`: images (a file, a folder or a .txt list) -> OFER hypotheses on disk.

Per image `<out>/<relative path without suffix>/`: `neutral.obj` (+ `.npy` 7 NoW landmarks, mm),
`expression_XXX.obj`, `hypotheses.npz`, `contact_sheet.png`; with `output.now_dir`, NoW's submission layout
too. Failures (unreadable image, no face, ...) are listed with their reason in `summary.json` and the rest
continue; images whose `hypotheses.npz` exists are skipped on a rerun, so a crash loses nothing written.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ofer.config import build_flame
from ofer.data.features import resolve_device
from ofer.data.preprocess import InsightFaceDetector, Preprocessor, load_image
from ofer.encoders import build_encoder
from ofer.outputs import write_reconstruction
from ofer.pipeline import build_pipeline

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
__all__ = ["list_images", "reconstruct", "reconstruct_images"]


def list_images(spec: str | Path) -> tuple[list[Path], Path]:
    """Images named by a file, a folder (recursive) or a .txt list (one path a line, relative to the list's
    folder). Returns the paths and the base folder that output names are relative to."""
    p = Path(spec)
    if p.is_dir():
        imgs = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and not q.name.startswith("."))
        if not imgs:
            raise FileNotFoundError(f"{p}: folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return imgs, p
    if p.suffix.lower() == ".txt" and p.is_file():
        lines = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
        if not lines:
            raise ValueError(f"{p}: image list is empty")
        return [(p.parent / ln) if not Path(ln).is_absolute() else Path(ln) for ln in lines], p.parent
    if p.is_file():
        return [p], p.parent
    raise FileNotFoundError(f"input {p}: no such image, folder or .txt list")


def _rel_name(path: Path, base: Path) -> str:
    try:
        rel = path.resolve().relative_to(base.resolve())
    except ValueError:
        rel = Path(path.name)
    return str(rel.with_suffix(""))


def reconstruct(cfg: DictConfig) -> dict[str, Any]:
    """`scripts/reconstruct.py`: the images named by `cfg.input` (an image, a folder or a .txt list)."""
    images, base = list_images(cfg.input)
    return reconstruct_images(cfg, images, base)


def reconstruct_images(cfg: DictConfig, images: list[Path], base: Path) -> dict[str, Any]:
    """Reconstruct `images` with the `configs/reconstruct.yaml` settings (`cfg.input` unused), each into
    `<output.dir>/<its path relative to base, without suffix>/`; returns the summary written to summary.json."""
    device = str(resolve_device(cfg.device))
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.output.dir)
    annotations: dict[str, Any] = {}
    if cfg.preprocess.get("annotations"):
        annotations = json.loads(Path(cfg.preprocess.annotations).read_text())
    flame = build_flame(cfg.paths)
    pipeline = build_pipeline(cfg.pipeline, flame, device=device)
    encoders = {s: build_encoder(cfg.encoders[s], slot=s).to(device).eval() for s in ("arcface", "farl")}
    random_encoders = any(getattr(e, "is_random", False) for e in encoders.values())
    synthetic_encoders = any(getattr(e, "synthetic_only", False) for e in encoders.values())
    if random_encoders:
        log.warning("encoders with RANDOM weights: the reconstructions carry no information about the images")
    detector = None
    if cfg.preprocess.get("detector", True):
        detector = InsightFaceDetector(root=cfg.paths.insightface_root, pack=cfg.preprocess.pack,
                                       device="cuda" if device.startswith("cuda") else "cpu")
    pre = Preprocessor(detector=detector, multi_face=cfg.preprocess.multi_face, no_face=cfg.preprocess.no_face,
                       kps_from_box=bool(cfg.preprocess.kps_from_box))
    failures: list[dict[str, str]] = []
    done = skipped = 0
    todo = []
    for img in images:
        name = _rel_name(img, base)
        if cfg.output.skip_existing and (out_dir / name / "hypotheses.npz").is_file():
            skipped += 1
            continue
        todo.append((img, name))
    t0 = time.perf_counter()
    bs = int(cfg.batch_size)
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for start in range(0, len(todo), bs):
        chunk = todo[start:start + bs]
        prepped = []
        for img, name in chunk:
            ann = annotations.get(name) or annotations.get(str(Path(name).with_suffix(img.suffix))) or {}
            try:
                rgb = load_image(img)
                p = pre(rgb, color_order="rgb", kps=ann.get("kps"), box=ann.get("box"))
                if p is None:
                    raise ValueError(pre.skipped.get(str(img), "no face found"))
                prepped.append((name, img, rgb, p))
            except Exception as err:  # one bad image never stops the others; listed in summary.json
                log.error("%s: %s", img, err)
                failures.append({"path": str(img), "reason": f"{type(err).__name__}: {err}"})
        if not prepped:
            continue
        with torch.no_grad():
            arc = torch.from_numpy(np.stack([p.arcface for _, _, _, p in prepped])).to(device)
            farl = torch.from_numpy(np.stack([p.farl for _, _, _, p in prepped])).to(device)
            f_arc, f_farl = encoders["arcface"](arc), encoders["farl"](farl)
            h = pipeline(f_arc, f_farl, generator=g)
        for i, (name, img, rgb, p) in enumerate(prepped):
            try:
                write_reconstruction(
                    pipeline, h, i, out_dir / name, mesh_format=cfg.output.mesh_format,
                    max_expression_meshes=cfg.output.max_expression_meshes,
                    now_dir=cfg.output.get("now_dir"), now_name=str(Path(name).with_suffix(img.suffix)),
                    sheet=bool(cfg.output.contact_sheet), image=p.farl_image,
                    extra={"random_encoders": random_encoders, "synthetic_encoders": synthetic_encoders,
                           "source": str(img), "arcface_feature": f_arc[i].float().cpu().numpy(),
                           "farl_feature": f_farl[i].float().cpu().numpy()})
                done += 1
            except Exception as err:
                log.error("%s: writing outputs failed: %s", img, err)
                failures.append({"path": str(img), "reason": f"{type(err).__name__}: {err}"})
    seconds = time.perf_counter() - t0
    summary = {"images": len(images), "reconstructed": done, "skipped_existing": skipped, "failed": len(failures),
               "failures": failures, "seconds": seconds, "random_encoders": random_encoders,
               "synthetic_encoders": synthetic_encoders, "device": device, "num_samples": pipeline.num_samples,
               "id_sampling": pipeline.id_sampling, "exp_sampling": pipeline.exp_sampling, **pipeline.meta}
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1, default=str))
    os.replace(tmp, out_dir / "summary.json")
    print(f"reconstructed {done} of {len(images)} images ({skipped} already done, {len(failures)} failed) "
          f"in {seconds:.1f} s -> {out_dir}")
    return summary
