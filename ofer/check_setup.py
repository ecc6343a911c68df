"""`scripts/check_setup.py`: what of the user's licensed files is present, missing or malformed, file by file.

Each check reads the file through the same loader the jobs use, so "ok" means the jobs will accept it.
Exit code: 0 when nothing is malformed (missing optional files are fine), 1 otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

__all__ = ["Check", "check_setup", "format_report"]

OK, MISSING, MALFORMED = "ok", "missing", "MALFORMED"


@dataclass
class Check:
    what: str
    path: str
    status: str
    detail: str = ""


def _file_check(what: str, path: Any, load: Callable[[Path], str]) -> Check:
    if path is None or str(path) in ("", "???", "None"):
        return Check(what, "(not set)", MISSING, "set the config key (see data/README.md)")
    p = Path(str(path)).expanduser()
    if not p.exists():
        return Check(what, str(p), MISSING, "see data/README.md for where to get it")
    try:
        return Check(what, str(p), OK, load(p))
    except Exception as err:  # report every problem, never stop at the first one
        return Check(what, str(p), MALFORMED, f"{type(err).__name__}: {err}"[:300])


def _flame(p: Path) -> str:
    from ofer.flame import load_flame_model

    m = load_flame_model(p)
    return f"{m['v_template'].shape[0]} vertices, {m['shapedirs'].shape[-1]} shape+expression components"


def _landmarks(p: Path) -> str:
    from ofer.flame import load_landmark_embedding

    idx, _, ids = load_landmark_embedding(p)
    return f"{len(ids)} landmarks"


def _masks(p: Path) -> str:
    from ofer.flame import load_masks

    m = load_masks(p)
    return f"{len(m)} regions, face: {len(m['face'])} vertices"


def _arcface(p: Path) -> str:
    from ofer.encoders import ArcFaceEncoder

    ArcFaceEncoder(weights=p, arch="r100", freeze="all")
    return "iresnet100 loads with strict=True"


def _farl(p: Path) -> str:
    from ofer.encoders import FaRLEncoder

    FaRLEncoder(weights=p)
    return "ViT-B/16 image tower loads (all keys matched)"


def _detector(p: Path) -> str:
    onnx = sorted(p.glob("*.onnx"))
    if not any(o.name.startswith(("scrfd", "det_")) for o in onnx):
        raise FileNotFoundError(f"no scrfd_*.onnx / det_*.onnx in {p}; found {[o.name for o in onnx]}")
    return f"{len(onnx)} onnx models"


def _dataset(index: Path) -> str:
    from ofer.data.datasets import MicaDataset

    ds = MicaDataset(root=index.parent.parent, name=index.stem, inputs=("arcface",), n_images=1)
    return f"{len(ds)} actors, {ds.total_images} images"


def _now(root: Path) -> str:
    lists = sorted(root.glob("imagepaths*.txt"))
    if not lists:
        raise FileNotFoundError(f"no imagepaths<split>.txt in {root}")
    scans = sorted((root / "scans").glob("*/*.obj"))
    pps = sorted((root / "scans_lmks_onlypp").glob("*/*.pp"))
    if not scans or not pps:
        raise FileNotFoundError(f"{root}: scans/<subject>/*.obj ({len(scans)}) and scans_lmks_onlypp/<subject>/*.pp "
                                f"({len(pps)}) are both needed")
    n = sum(len(f.read_text().split()) for f in lists)
    return f"{n} images in {[f.name for f in lists]}, {len(scans)} scans"


def check_setup(cfg: Any) -> list[Check]:
    paths = cfg.paths
    get = lambda key: paths.get(key) if hasattr(paths, "get") else getattr(paths, key, None)  # noqa: E731

    def opt(key: str) -> Any:
        try:
            return get(key)
        except Exception:  # a mandatory ??? value counts as unset here
            return None

    checks = [
        _file_check("FLAME model", opt("flame_model"), _flame),
        _file_check("FLAME landmark embedding", opt("flame_landmarks"), _landmarks),
        _file_check("FLAME masks", opt("flame_masks"), _masks),
        _file_check("ArcFace weights", opt("arcface_weights"), _arcface),
        _file_check("FaRL weights", opt("farl_weights"), _farl),
        _file_check("insightface detector pack", Path(str(opt("insightface_root"))) / "models" / str(cfg.detector_pack),
                    _detector),
    ]
    data_root = Path(str(cfg.data_root))
    indices = sorted((data_root / "image_paths").glob("*.npy")) if data_root.is_dir() else []
    if not indices:
        checks.append(Check("datasets (MICA layout)", str(data_root / "image_paths"), MISSING,
                            "no image_paths/<DATASET>.npy index found"))
    for index in indices:
        checks.append(_file_check(f"dataset {index.stem}", index, _dataset))
    checks.append(_file_check("NoW benchmark", cfg.now_root, _now))
    return checks


def format_report(checks: list[Check]) -> str:
    w = max(len(c.what) for c in checks)
    lines = [f"{c.what:<{w}}  {c.status:<9}  {c.path}" + (f"\n{'':<{w}}  {'':<9}  {c.detail}" if c.detail else "")
             for c in checks]
    bad = sum(c.status == MALFORMED for c in checks)
    missing = sum(c.status == MISSING for c in checks)
    lines.append(f"{len(checks) - bad - missing} ok, {missing} missing, {bad} malformed")
    return "\n".join(lines)
