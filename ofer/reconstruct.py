"""`scripts/reconstruct.py`: images (a file, a folder or a .txt list) -> OFER hypotheses on disk.

Per image `<out>/<relative path without suffix>/`: `neutral.obj` (+ `.npy` 7 NoW landmarks, mm),
`expression_XXX.obj`, `hypotheses.npz`, `contact_sheet.png`; with `output.now_dir`, NoW's submission layout
too. Failures (unreadable image, no face, ...) are listed with their reason in `summary.json` and the rest
continue. Outputs are written as each batch finishes, `hypotheses.npz` last and atomically; images whose
`hypotheses.npz` is complete are skipped on a rerun, so a crash loses at most the batch in flight. After
every batch one log line gives images done / failed and the resident memory, so a leak shows while it runs
(tests/test_load.py runs thousands of images and asserts that memory stays flat and a SIGKILL loses nothing).
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
from ofer.outputs import HYPOTHESES_FILE, is_complete, write_reconstruction
from ofer.pipeline import build_pipeline

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
__all__ = ["list_images", "reconstruct", "reconstruct_images", "resident_memory_mb"]


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
    """`path` relative to `base`, without suffix: the image's output folder and annotation key. Symlinks are
    not followed first (a folder of links to photos elsewhere keeps its own layout), then they are."""
    for p, b in ((Path(os.path.abspath(path)), Path(os.path.abspath(base))), (path.resolve(), base.resolve())):
        try:
            return str(p.relative_to(b).with_suffix(""))
        except ValueError:
            continue
    return str(Path(path.name).with_suffix(""))


def resident_memory_mb() -> float | None:
    """This process's resident set size (MB) from /proc/self/status (Linux); None where that is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024  # reported in kB
    except OSError:
        pass
    return None


def _pending(images: list[Path], base: Path, out_dir: Path, skip_existing: bool) -> tuple[list[tuple[Path, str]], int]:
    """(image, output name) pairs still to do and how many are skipped as already complete. A folder whose
    `hypotheses.npz` is missing or damaged (a crash mid-image) is redone."""
    todo, skipped = [], 0
    for img in images:
        name = _rel_name(img, base)
        if skip_existing and is_complete(out_dir / name):
            skipped += 1
            continue
        if skip_existing and (out_dir / name / HYPOTHESES_FILE).exists():
            log.warning("%s: %s is damaged; reconstructing again", img, out_dir / name / HYPOTHESES_FILE)
        todo.append((img, name))
    return todo, skipped


def _prepare(chunk: list[tuple[Path, str]], annotations: dict[str, Any], pre: Preprocessor,
             failures: list[dict[str, str]]) -> list[tuple[str, Path, Any]]:
    """(name, image, preprocessed) for the images of `chunk` that load and show a face; the others are
    appended to `failures` with their reason (one bad image never stops the others)."""
    prepped = []
    for img, name in chunk:
        ann = annotations.get(name) or annotations.get(str(Path(name).with_suffix(img.suffix))) or {}
        try:
            p = pre(load_image(img), color_order="rgb", kps=ann.get("kps"), box=ann.get("box"))
            if p is None:
                raise ValueError(pre.skipped.get(str(img), "no face found"))
            prepped.append((name, img, p))
        except Exception as err:  # listed in summary.json
            log.error("%s: %s", img, err)
            failures.append({"path": str(img), "reason": f"{type(err).__name__}: {err}"})
    return prepped


def _log_batch(batch: int, batches: int, done: int, failed: int, seconds: float) -> None:
    """One line per batch: progress, speed and resident memory (a growing RSS is a leak; tests/test_load.py
    parses this line)."""
    rss = resident_memory_mb()
    log.info("batch %d/%d: %d reconstructed, %d failed, %.1f images/s, RSS %s MB", batch, batches, done, failed,
             (done + failed) / max(seconds, 1e-9), "?" if rss is None else f"{rss:.1f}")


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
    done = 0
    todo, skipped = _pending(images, base, out_dir, bool(cfg.output.skip_existing))
    t0 = time.perf_counter()
    bs = int(cfg.batch_size)
    batches = -(-len(todo) // bs)
    log.info("%d images: %d to reconstruct in %d batches of %d, %d already done", len(images), len(todo), batches,
             bs, skipped)
    g = torch.Generator(device=device).manual_seed(int(cfg.seed))
    for batch, start in enumerate(range(0, len(todo), bs), 1):
        prepped = _prepare(todo[start:start + bs], annotations, pre, failures)
        if prepped:
            with torch.no_grad():
                arc = torch.from_numpy(np.stack([p.arcface for _, _, p in prepped])).to(device)
                farl = torch.from_numpy(np.stack([p.farl for _, _, p in prepped])).to(device)
                f_arc, f_farl = encoders["arcface"](arc), encoders["farl"](farl)
                h = pipeline(f_arc, f_farl, generator=g)
        for i, (name, img, p) in enumerate(prepped):
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
        _log_batch(batch, batches, done, len(failures), time.perf_counter() - t0)
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
