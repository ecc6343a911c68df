"""Dataset readers: MICA layout (and OFER's FLAME2023 variant), FaMoS expression fits, a mixer.

MICA layout (the de-facto standard; our synthetic generator writes it too)::

    <root>/image_paths/<NAME>.npy                 pickled dict: actor -> (image paths, npz path)
    <root>/<NAME>/FLAME_parameters/<actor>/*.npz  betas (400 = 300 shape + 100 expression), pose (15)
    <root>/<NAME>/arcface_input/<actor>/<img>.jpg image (a face crop)
    <root>/<NAME>/arcface_input/<actor>/<img>.npy ArcFace blob (3, 112, 112) in [-1, 1], RGB
    <root>/<NAME>/arcface_input/<actor>/<img>_farl.npy  FaRL crop (3, 224, 224) [ours; optional]

OFER's variant (# OFER: src/datasets/base_dataset_flame23.py): index under
``image_paths/arcface23/<NAME>.npy`` with the pair order reversed (npz path, image paths), FLAME2023
files under ``FLAME23_parameters/`` with ``shape`` (300), optionally ``exp`` (50 or 100) and ``pose``
or separate ``jaw``/``rot``/``neck``/``eye``. The variant is detected from the index content.

FaMoS expression fits (for ExpGen)::

    <root>/<NAME>/flame_params/<subject>/<sequence>.npy   pickled dict of per-frame arrays:
        flame_shape (T, 300), flame_expr (T, 100), flame_pose (T, 15), flame_trans (T, 3), frame_id (T,)

(``.npz`` and ``.pkl`` with the same or the OFER key names are read too), with preprocessed
blobs under ``<root>/<NAME>/arcface_input/`` located by a configurable template.

Items are dicts: ``shape (300,)``, ``expression (100,)``, ``pose (15,)`` float32 tensors, ``actor``
(str), ``index`` (int), ``dataset`` (str), ``image_ids (K,)`` (int64, rows of the dataset's flat
image list, which the feature cache uses), and per requested input ``arcface (K, 3, 112, 112)``
and/or ``farl (K, 3, 224, 224)``. The full FLAME pose order is global, neck, jaw, left eye, right
eye (axis-angle, 3 each); the jaw is ``pose[6:9]``.

Pickled files (the index, FaMoS ``.npy``/``.pkl``) are read with ``ofer.io``'s restricted
unpickler, which only rebuilds plain containers, strings, numbers and numpy arrays.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

log = logging.getLogger(__name__)

N_SHAPE = 300
N_EXPR = 100
N_POSE = 15
ARCFACE_SHAPE = (3, 112, 112)
FARL_SHAPE = (3, 224, 224)
INPUT_SLOTS = ("arcface", "farl")
INPUT_SHAPES = {"arcface": ARCFACE_SHAPE, "farl": FARL_SHAPE}
FARL_SUFFIX = "_farl.npy"
VARIANTS = ("auto", "mica", "ofer")
SAMPLING = ("random", "first")
DEFAULT_PARAMS_FOLDER = {"mica": "FLAME_parameters", "ofer": "FLAME23_parameters"}
_MAX_LISTED = 1000  # problems listed in one error; the count is always given


class DatasetError(ValueError):
    """A dataset on disk is inconsistent with its index (all problems listed at once)."""


class FlameParamsError(ValueError):
    """A FLAME parameter file lacks keys or has wrong sizes."""


# --------------------------------------------------------------------------------------------
# Safe reading of pickled files (ofer.io's restricted unpickler: plain data only, no code runs)
# --------------------------------------------------------------------------------------------
def load_pickled_npy(path: str | Path) -> Any:
    """A ``.npy`` file; object arrays (``np.save`` of a dict) go through ``ofer.io``'s restricted
    unpickler and come back as the Python object."""
    from ofer.io import safe_load_npy_object

    return safe_load_npy_object(path)


def load_pickle(path: str | Path) -> Any:
    """A ``.pkl`` read with ``ofer.io``'s restricted unpickler."""
    from ofer.io import safe_load_pickle

    return safe_load_pickle(path)


def npy_header_shape(path: str | Path) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of a ``.npy`` file from its header, without reading the data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    return tuple(shape), dtype


def load_param_file(path: str | Path) -> dict[str, np.ndarray]:
    """A FLAME parameter file as ``{key: array}``: ``.npz``, ``.npy`` (pickled dict) or ``.pkl``."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        data = load_pickled_npy(path) if suffix == ".npy" else load_pickle(path) if suffix == ".pkl" else None
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise FlameParamsError(f"cannot read FLAME parameters {path}: {type(exc).__name__}: {exc}") from exc
    if data is None:
        raise FlameParamsError(f"{path}: unsupported FLAME parameter file type {suffix!r} (expected .npz, .npy or .pkl)")
    if not isinstance(data, Mapping):
        raise FlameParamsError(f"{path}: expected a dict of arrays, found {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


# --------------------------------------------------------------------------------------------
# FLAME parameter parsing
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FlameParams:
    """FLAME coefficients. shape: (..., 300); expression: (..., 100); pose: (..., 15)."""

    shape: np.ndarray
    expression: np.ndarray
    pose: np.ndarray


_SHAPE_KEYS = ("shape", "shape_params", "flame_shape")
_EXPR_KEYS = ("exp", "expression", "expression_params", "flame_expr")
_FULL_POSE_KEYS = ("pose", "flame_pose", "pose_params", "full_pose", "fullpose")
# Separate pose parts -> slice of the 15-d full pose (global, neck, jaw, left eye, right eye).
_POSE_PART_KEYS: dict[str, tuple[tuple[str, ...], slice]] = {
    "global": (("rot", "global_pose", "global_orient", "root_pose", "rot_params"), slice(0, 3)),
    "neck": (("neck", "neck_pose", "neck_params"), slice(3, 6)),
    "jaw": (("jaw", "jaw_pose", "jaw_params"), slice(6, 9)),
    "eyes": (("eye", "eyes", "eye_pose", "eye_params"), slice(9, 15)),
    "leye": (("leye_pose",), slice(9, 12)),
    "reye": (("reye_pose",), slice(12, 15)),
}


def _first(arrays: Mapping[str, np.ndarray], keys: Iterable[str]) -> tuple[str | None, np.ndarray | None]:
    for k in keys:
        if k in arrays:
            return k, arrays[k]
    return None, None


def _rows(value: Any, key: str, source: str, n_rows: int | None) -> np.ndarray:
    """A parameter as float (T, n); 1-D values are one row (broadcast to T when T is given)."""
    arr = np.asarray(value)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise FlameParamsError(f"{source}: key {key!r} is not numeric (dtype {arr.dtype})")
    arr = arr.astype(np.float32)
    if arr.ndim == 0:
        raise FlameParamsError(f"{source}: key {key!r} is a scalar, expected a vector")
    if arr.ndim == 1:
        arr = arr[None]
    elif arr.ndim > 2:
        raise FlameParamsError(f"{source}: key {key!r} has shape {arr.shape}, expected (n,) or (T, n)")
    if n_rows is not None and arr.shape[0] != n_rows:
        if arr.shape[0] != 1:
            raise FlameParamsError(f"{source}: key {key!r} has {arr.shape[0]} rows, expected {n_rows} (one per frame)")
        arr = np.repeat(arr, n_rows, axis=0)
    return arr


def _pad(arr: np.ndarray, width: int, key: str, source: str) -> np.ndarray:
    if arr.shape[1] > width:
        raise FlameParamsError(f"{source}: key {key!r} has {arr.shape[1]} coefficients, at most {width} supported")
    if arr.shape[1] < width:
        # Unused FLAME components are zero; FLAME2023 fits often have 50 expressions.
        arr = np.concatenate([arr, np.zeros((arr.shape[0], width - arr.shape[1]), np.float32)], axis=1)
    return arr


def _pose(arrays: Mapping[str, np.ndarray], n_rows: int, source: str) -> np.ndarray:
    pose = np.zeros((n_rows, N_POSE), np.float32)
    set_mask = np.zeros(N_POSE, bool)
    key, full = _first(arrays, _FULL_POSE_KEYS)
    if full is not None:
        full = _rows(full, key, source, n_rows)
        width = full.shape[1]
        if width == 15:
            pose[:] = full  # global, neck, jaw, left eye, right eye (FLAME / FaMoS flame_pose)
            set_mask[:] = True
        elif width == 12:
            # neck, jaw, eyes. # OFER: base_dataset_flame23.py TEMPEH branch: neck [:3], jaw [3:6], eyes [6:]
            pose[:, 3:] = full
            set_mask[3:] = True
        elif width == 6:
            # global, jaw. # OFER: src/models/flame.py `pose_params = [rot_params; jaw_params]`
            pose[:, 0:3], pose[:, 6:9] = full[:, :3], full[:, 3:]
            set_mask[0:3] = set_mask[6:9] = True
        else:
            raise FlameParamsError(
                f"{source}: key {key!r} has {width} values per row; expected 15 (global, neck, jaw, eyes), "
                f"12 (neck, jaw, eyes) or 6 (global, jaw)"
            )
    for part, (names, sl) in _POSE_PART_KEYS.items():
        pkey, value = _first(arrays, names)
        if value is None:
            continue
        value = _rows(value, pkey, source, n_rows)
        if value.shape[1] != sl.stop - sl.start:
            raise FlameParamsError(f"{source}: key {pkey!r} has {value.shape[1]} values, expected {sl.stop - sl.start} ({part})")
        if set_mask[sl].all() and not np.allclose(pose[:, sl], value, atol=1e-6):
            raise FlameParamsError(f"{source}: {pkey!r} disagrees with the {part} part of {key!r}")
        pose[:, sl] = value
        set_mask[sl] = True
    return pose


def parse_flame_params(arrays: Mapping[str, Any], *, source: str, frames: bool = False) -> FlameParams:
    """Read FLAME coefficients from MICA (``betas``) or FLAME2023/OFER/FaMoS key names.

    Args:
        arrays: the file's content (key -> array).
        source: file name for error messages.
        frames: per-frame arrays (FaMoS); the result has a leading (T,) axis. Otherwise one
            parameter set per file and the result is (300,), (100,), (15,).

    Raises:
        FlameParamsError: naming the file and the keys found.
    """
    keys = sorted(arrays)
    ekey, expr = _first(arrays, _EXPR_KEYS)
    n_rows = None
    if frames:
        if expr is None:
            raise FlameParamsError(f"{source}: no per-frame expression ({'/'.join(_EXPR_KEYS)}); keys found: {keys}")
        n_rows = _rows(expr, ekey, source, None).shape[0]
    if "betas" in arrays:
        betas = _rows(arrays["betas"], "betas", source, n_rows)
        if not N_SHAPE <= betas.shape[1] <= N_SHAPE + N_EXPR:
            raise FlameParamsError(
                f"{source}: 'betas' has {betas.shape[1]} values, expected {N_SHAPE + N_EXPR} (300 shape + 100 expression)"
            )
        shape = betas[:, :N_SHAPE]
        expression = _pad(betas[:, N_SHAPE:], N_EXPR, "betas", source)
        if expr is not None:
            raise FlameParamsError(f"{source}: both 'betas' and {ekey!r} present; expression is ambiguous")
    else:
        skey, shape_v = _first(arrays, _SHAPE_KEYS)
        if shape_v is None:
            raise FlameParamsError(
                f"{source}: no FLAME shape: expected 'betas' (MICA: 300 shape + 100 expression) or 'shape' "
                f"(FLAME2023/OFER; 'flame_shape' for FaMoS); keys found: {keys}"
            )
        shape = _pad(_rows(shape_v, skey, source, n_rows), N_SHAPE, skey, source)
        n = shape.shape[0]
        expression = (
            np.zeros((n, N_EXPR), np.float32) if expr is None else _pad(_rows(expr, ekey, source, n_rows or n), N_EXPR, ekey, source)
        )
    n = shape.shape[0]
    if not frames and n != 1:
        raise FlameParamsError(f"{source}: expected one parameter set, found {n} rows (per-frame file? use the FaMoS reader)")
    pose = _pose(arrays, n, source)
    for name, arr in (("shape", shape), ("expression", expression), ("pose", pose)):
        if not np.all(np.isfinite(arr)):
            raise FlameParamsError(f"{source}: non-finite values in {name}")
    if frames:
        return FlameParams(shape=shape, expression=expression, pose=pose)
    return FlameParams(shape=shape[0], expression=expression[0], pose=pose[0])


def load_flame_params(path: str | Path) -> FlameParams:
    """One FLAME parameter set from a MICA/OFER ``.npz`` (or ``.npy``/``.pkl`` dict)."""
    return parse_flame_params(load_param_file(path), source=str(path))


# --------------------------------------------------------------------------------------------
# Image inputs shared by the readers
# --------------------------------------------------------------------------------------------
def blob_path_for(image_path: Path) -> Path:
    """``<dir>/<stem>.npy`` beside an image (MICA's ArcFace blob)."""
    return image_path.with_suffix(".npy")


def farl_path_for(image_path: Path) -> Path:
    """``<dir>/<stem>_farl.npy`` beside an image (our FaRL crop)."""
    return image_path.with_name(image_path.stem + FARL_SUFFIX)


def load_blob(path: Path, expected: tuple[int, ...]) -> np.ndarray:
    """A float blob of the expected shape (error names file, shape found and expected)."""
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read blob {path}: {type(exc).__name__}: {exc}") from exc
    if tuple(arr.shape) != tuple(expected):
        raise DatasetError(f"blob {path} has shape {tuple(arr.shape)}, expected {tuple(expected)}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise DatasetError(f"blob {path} has dtype {arr.dtype}, expected float")
    return arr.astype(np.float32, copy=False)


def _format_problems(title: str, groups: Mapping[str, list[str]]) -> str:
    lines = [title]
    for label, items in groups.items():
        if not items:
            continue
        lines.append(f"{label} ({len(items)}):")
        lines += [f"  {x}" for x in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
            lines.append(f"  ... and {len(items) - _MAX_LISTED} more")
    return "\n".join(lines)


def _check_inputs(inputs: Sequence[str]) -> tuple[str, ...]:
    inputs = tuple(inputs)
    bad = [s for s in inputs if s not in INPUT_SLOTS]
    if bad:
        raise ValueError(f"unknown inputs {bad}; allowed: {list(INPUT_SLOTS)}")
    return inputs


class _ImageInputs:
    """Locates and loads the encoder inputs of a flat list of images.

    Per image: the ArcFace blob ``<stem>.npy``; the FaRL input from ``<stem>_farl.npy`` or, when
    absent and ``farl_from_image``, from the image itself (a face crop) by CLIP preprocessing.
    """

    def __init__(self, image_dir: Path, image_keys: list[str], *, farl_from_image: bool) -> None:
        self.image_dir = image_dir
        self.image_keys = image_keys
        self.farl_from_image = farl_from_image

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.image_keys[i]

    def input_file(self, i: int, slot: str) -> Path:
        """The file that feeds ``slot`` for image ``i``."""
        img = self.image_path(i)
        if slot == "arcface":
            return blob_path_for(img)
        farl = farl_path_for(img)
        if farl.exists() or not self.farl_from_image or img.suffix.lower() == ".npy":
            return farl
        return img

    def load(self, i: int, slot: str) -> np.ndarray:
        """(3, S, S) float32 input of image ``i`` for ``slot``."""
        path = self.input_file(i, slot)
        if path.suffix.lower() == ".npy":
            return load_blob(path, INPUT_SHAPES[slot])
        from ofer.data.preprocess import farl_from_face_image, load_image

        return farl_from_face_image(load_image(path))

    def validate(self, inputs: Sequence[str], *, check_shapes: bool) -> tuple[list[str], list[str]]:
        """(missing files, wrong-shape blobs) for the requested inputs over all images."""
        missing: list[str] = []
        wrong: list[str] = []
        for i in range(len(self.image_keys)):
            for slot in inputs:
                path = self.input_file(i, slot)
                if not path.exists():
                    if slot == "farl" and path == self.image_path(i):
                        missing.append(f"{farl_path_for(path)} (nor its image {path})")
                    else:
                        missing.append(str(path))
                elif check_shapes and path.suffix.lower() == ".npy":
                    try:
                        shape, _ = npy_header_shape(path)
                    except (OSError, ValueError) as exc:
                        wrong.append(f"{path}: unreadable header ({exc})")
                        continue
                    if shape != INPUT_SHAPES[slot]:
                        wrong.append(f"{path}: shape {shape}, expected {INPUT_SHAPES[slot]}")
        return missing, wrong

    def spec(self, slot: str) -> dict[str, Any]:
        """How the inputs of ``slot`` are produced (part of feature-cache keys)."""
        from ofer.data import preprocess as pp

        if slot == "arcface":
            return {"slot": "arcface", "file": "<stem>.npy", "shape": list(ARCFACE_SHAPE), "range": [-1, 1],
                    "color": "RGB", "preprocess_version": pp.PREPROCESS_VERSION}
        return {"slot": "farl", "file": "<stem>_farl.npy" + (" or CLIP-preprocessed image" if self.farl_from_image else ""),
                "shape": list(FARL_SHAPE), "mean": list(pp.CLIP_MEAN), "std": list(pp.CLIP_STD),
                "box_scale": pp.FARL_BOX_SCALE, "color": "RGB", "preprocess_version": pp.PREPROCESS_VERSION}


def _stack_inputs(source: _ImageInputs, ids: np.ndarray, inputs: Sequence[str]) -> dict[str, torch.Tensor]:
    return {slot: torch.from_numpy(np.stack([source.load(int(i), slot) for i in ids])) for slot in inputs}


# --------------------------------------------------------------------------------------------
# MICA layout
# --------------------------------------------------------------------------------------------
def _as_path_list(value: Any) -> list[str] | None:
    if isinstance(value, (str, bytes)):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        items = list(np.asarray(value, dtype=object).reshape(-1)) if isinstance(value, np.ndarray) else list(value)
        if all(isinstance(x, (str, np.str_)) for x in items):
            return [str(x) for x in items]
    return None


def parse_index(index: Any, *, source: str, variant: str = "auto") -> tuple[str, dict[str, tuple[list[str], str]]]:
    """Normalise a MICA/OFER index to ``(variant, {actor: (image paths, params path)})``.

    MICA stores ``actor -> (images, npz)``, OFER ``actor -> (npz, images)``; ``auto`` decides
    from the content and rejects files that mix the two.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if not isinstance(index, Mapping) or not index:
        raise DatasetError(f"{source}: expected a non-empty dict actor -> (images, params), found {type(index).__name__}")
    seen: set[str] = set()
    out: dict[str, tuple[list[str], str]] = {}
    bad: list[str] = []
    for actor, value in index.items():
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            bad.append(f"{actor!r}: expected a pair, found {type(value).__name__}")
            continue
        a, b = value
        if _as_path_list(a) is not None and isinstance(b, (str, np.str_)):
            seen.add("mica")
            out[str(actor)] = (_as_path_list(a), str(b))  # type: ignore[arg-type]
        elif isinstance(a, (str, np.str_)) and _as_path_list(b) is not None:
            seen.add("ofer")
            out[str(actor)] = (_as_path_list(b), str(a))  # type: ignore[arg-type]
        else:
            bad.append(f"{actor!r}: expected (list of image paths, params path) or the reverse, found "
                       f"({type(a).__name__}, {type(b).__name__})")
    if bad:
        raise DatasetError(_format_problems(f"{source}: malformed index entries", {"entries": bad}))
    if len(seen) > 1:
        raise DatasetError(f"{source}: index mixes MICA (images, params) and OFER (params, images) pair orders")
    found = seen.pop()
    if variant != "auto" and variant != found:
        raise DatasetError(f"{source}: configured variant {variant!r} but the index has the {found!r} pair order")
    return found, out


class MicaDataset(Dataset):
    """MICA-layout 2D-3D pairs; one item = one actor with K images (identity-balanced, as MICA).

    Args:
        root: the folder holding ``image_paths/`` and the dataset folders.
        name: dataset folder / index name, e.g. ``"STIRLING"``.
        n_images: K images per item. OFER/MICA: 4.
        inputs: image inputs to load per item: subset of ``("arcface", "farl")``; ``()`` for
            parameters and ``image_ids`` only (cached features, see ``ofer.data.features``).
        variant: ``"auto"``, ``"mica"`` or ``"ofer"`` (index pair order; checked against content).
        index: explicit index file; default ``<root>/image_paths/<name>.npy`` then
            ``<root>/image_paths/arcface23/<name>.npy``.
        params_folder: default ``FLAME_parameters`` (MICA) / ``FLAME23_parameters`` (OFER).
        image_folder: ``arcface_input``.
        sampling: ``"random"`` (K distinct images when the actor has K, else with replacement;
            torch RNG, so DataLoader seeding applies) or ``"first"`` (the first K, cycling).
        farl_from_image: without ``<stem>_farl.npy``, build the FaRL input from the image.
        check_blobs: read every blob header at construction to check its shape.

    Construction checks every file the requested inputs need and every parameter file, and
    raises one ``DatasetError`` listing all problems.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        name: str,
        n_images: int = 4,
        inputs: Sequence[str] = ("arcface",),
        variant: str = "auto",
        index: str | Path | None = None,
        params_folder: str | None = None,
        image_folder: str = "arcface_input",
        sampling: str = "random",
        farl_from_image: bool = True,
        check_blobs: bool = True,
    ) -> None:
        if int(n_images) < 1:
            raise ValueError(f"{name}: n_images must be >= 1, got {n_images}")
        if sampling not in SAMPLING:
            raise ValueError(f"{name}: sampling must be one of {list(SAMPLING)}, got {sampling!r}")
        self.root = Path(root).expanduser()
        self.name = str(name)
        self.n_images = int(n_images)
        self.inputs = _check_inputs(inputs)
        self.sampling = sampling
        index_path = self._find_index(index)
        self.variant, entries = parse_index(load_pickled_npy(index_path), source=str(index_path), variant=variant)
        self.index_path = index_path
        folder = DEFAULT_PARAMS_FOLDER[self.variant] if params_folder is None else params_folder
        self.params_dir = self.root / self.name / folder
        image_dir = self.root / self.name / image_folder

        self.actors = sorted(entries)
        image_keys: list[str] = []
        starts = [0]
        params: list[FlameParams] = []
        missing: list[str] = []
        bad_params: list[str] = []
        empty: list[str] = []
        for actor in self.actors:
            images, params_rel = entries[actor]
            if not images:
                empty.append(actor)
            image_keys += images
            starts.append(len(image_keys))
            p = self.params_dir / params_rel
            if not p.exists():
                missing.append(str(p))
                params.append(None)  # type: ignore[arg-type]
                continue
            try:
                params.append(load_flame_params(p))
            except FlameParamsError as exc:
                bad_params.append(str(exc))
                params.append(None)  # type: ignore[arg-type]
        self.source = _ImageInputs(image_dir, image_keys, farl_from_image=farl_from_image)
        miss_img, wrong = self.source.validate(self.inputs, check_shapes=check_blobs)
        missing += miss_img
        if missing or bad_params or wrong or empty:
            raise DatasetError(_format_problems(
                f"dataset {self.name} (index {index_path}) is inconsistent:",
                {"missing files": missing, "bad FLAME parameter files": bad_params,
                 "blobs with a wrong shape": wrong, "actors without images": empty},
            ))
        self.params = params
        self._starts = np.asarray(starts, dtype=np.int64)
        log.info("dataset %s: %d actors, %d images (%s layout)", self.name, len(self.actors), len(image_keys), self.variant)

    def _find_index(self, index: str | Path | None) -> Path:
        if index is not None:
            candidates = [Path(index).expanduser()]
        else:
            candidates = [self.root / "image_paths" / f"{self.name}.npy",
                          self.root / "image_paths" / "arcface23" / f"{self.name}.npy"]
        for c in candidates:
            if c.is_file():
                return c
        raise DatasetError(f"dataset {self.name}: index file not found; looked for {[str(c) for c in candidates]}")

    # -- the image-source interface used by the feature cache --------------------------------
    @property
    def image_keys(self) -> list[str]:
        """Flat list of image paths (relative to the image folder), actor by actor."""
        return self.source.image_keys

    @property
    def total_images(self) -> int:
        return len(self.source.image_keys)

    def input_file(self, i: int, slot: str) -> Path:
        return self.source.input_file(i, slot)

    def load_input(self, i: int, slot: str) -> np.ndarray:
        return self.source.load(i, slot)

    def input_spec(self, slot: str) -> dict[str, Any]:
        return self.source.spec(slot)

    # -- items ---------------------------------------------------------------------------------
    def actor_image_ids(self, index: int) -> np.ndarray:
        """Flat image ids (n,) of actor ``index``."""
        return np.arange(self._starts[index], self._starts[index + 1])

    def _sample(self, index: int) -> np.ndarray:
        ids = self.actor_image_ids(index)
        k, n = self.n_images, len(ids)
        if self.sampling == "first":
            return ids[np.arange(k) % n]
        if n >= k:
            pick = torch.randperm(n)[:k].numpy()
        else:
            pick = torch.randint(n, (k,)).numpy()
        return ids[pick]

    def __len__(self) -> int:
        return len(self.actors)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        ids = self._sample(index)
        p = self.params[index]
        item: dict[str, Any] = {
            "shape": torch.from_numpy(p.shape.copy()),
            "expression": torch.from_numpy(p.expression.copy()),
            "pose": torch.from_numpy(p.pose.copy()),
            "actor": self.actors[index],
            "index": index,
            "dataset": self.name,
            "image_ids": torch.from_numpy(ids.astype(np.int64)),
        }
        item.update(_stack_inputs(self.source, ids, self.inputs))
        return item


# --------------------------------------------------------------------------------------------
# FaMoS expression fits
# --------------------------------------------------------------------------------------------
class FamosDataset(Dataset):
    """FaMoS/TEMPEH-style per-frame FLAME fits (ExpGen data); one item = one frame.

    Args:
        root: folder holding ``<name>/``.
        name: dataset folder, ``"FAMOS"``.
        params_folder: ``flame_params`` (``<subject>/<sequence>.{npy,npz,pkl}``).
        image_folder: folder of preprocessed inputs, ``arcface_input``.
        image_template: path of a frame's image (or its ``.npy`` blob) relative to the image
            folder, with fields ``subject``, ``sequence``, ``frame`` (int) and ``camera``;
            ``None`` for parameters only (no images).
        camera: camera name for the template.
        inputs: image inputs per item (needs a template).
        frame_stride: keep every n-th frame.
        subjects: optional list of subjects to keep.
        missing_images: ``"error"`` (list them all) or ``"drop"`` (drop those frames, logged).
        farl_from_image / check_blobs: as in ``MicaDataset``.

    Items carry ``sequence`` (str) and ``frame`` (int) besides the common keys; ``arcface``/
    ``farl`` have K = 1. With a template and no ``inputs`` (cached features), a frame counts as
    having an image when its ArcFace blob exists.
    """

    def __init__(
        self,
        *,
        root: str | Path,
        name: str = "FAMOS",
        params_folder: str = "flame_params",
        image_folder: str = "arcface_input",
        image_template: str | None = None,
        camera: str = "26_C",
        inputs: Sequence[str] = (),
        frame_stride: int = 1,
        subjects: Sequence[str] | None = None,
        missing_images: str = "error",
        farl_from_image: bool = True,
        check_blobs: bool = True,
    ) -> None:
        if missing_images not in ("error", "drop"):
            raise ValueError(f"{name}: missing_images must be 'error' or 'drop', got {missing_images!r}")
        if int(frame_stride) < 1:
            raise ValueError(f"{name}: frame_stride must be >= 1, got {frame_stride}")
        self.inputs = _check_inputs(inputs)
        if self.inputs and image_template is None:
            raise ValueError(f"{name}: inputs {list(self.inputs)} need an image_template")
        self.root = Path(root).expanduser()
        self.name = str(name)
        self.params_dir = self.root / self.name / params_folder
        if not self.params_dir.is_dir():
            raise DatasetError(f"dataset {self.name}: parameter folder {self.params_dir} not found")
        files = sorted(p for p in self.params_dir.glob("*/*") if p.suffix.lower() in (".npy", ".npz", ".pkl"))
        if subjects is not None:
            keep = {str(s) for s in subjects}
            files = [f for f in files if f.parent.name in keep]
        if not files:
            raise DatasetError(f"dataset {self.name}: no <subject>/<sequence>.npy|npz|pkl files under {self.params_dir}")

        shapes, exprs, poses = [], [], []
        frames: list[tuple[str, str, int]] = []
        bad: list[str] = []
        for f in files:
            try:
                arrays = load_param_file(f)
                seq = parse_flame_params(arrays, source=str(f), frames=True)
            except FlameParamsError as exc:
                bad.append(str(exc))
                continue
            n = seq.expression.shape[0]
            _, fid = _first(arrays, ("frame_id", "frame_ids", "frames"))
            frame_ids = np.arange(n) if fid is None else np.asarray(fid).reshape(-1).astype(np.int64)
            if frame_ids.shape[0] != n:
                bad.append(f"{f}: {frame_ids.shape[0]} frame ids for {n} frames")
                continue
            keep_rows = np.arange(0, n, int(frame_stride))
            shapes.append(seq.shape[keep_rows])
            exprs.append(seq.expression[keep_rows])
            poses.append(seq.pose[keep_rows])
            frames += [(f.parent.name, f.stem, int(frame_ids[r])) for r in keep_rows]
        if bad:
            raise DatasetError(_format_problems(f"dataset {self.name}: bad FLAME sequence files", {"files": bad}))
        shape, expr, pose = np.concatenate(shapes), np.concatenate(exprs), np.concatenate(poses)

        self.image_template = image_template
        self.camera = camera
        if image_template is not None:
            keys = [image_template.format(subject=s, sequence=q, frame=fr, camera=camera) for s, q, fr in frames]
            source = _ImageInputs(self.root / self.name / image_folder, keys, farl_from_image=farl_from_image)
            needed = self.inputs or ("arcface",)
            missing, wrong = source.validate(needed, check_shapes=check_blobs)
            if missing and missing_images == "drop":
                present = np.array([all(source.input_file(i, s).exists() for s in needed) for i in range(len(keys))])
                log.warning("dataset %s: dropping %d of %d frames without images", self.name, int((~present).sum()), len(keys))
                shape, expr, pose = shape[present], expr[present], pose[present]
                frames = [fr for fr, ok in zip(frames, present) if ok]
                keys = [k for k, ok in zip(keys, present) if ok]
                source = _ImageInputs(source.image_dir, keys, farl_from_image=farl_from_image)
                missing = []
            if missing or wrong:
                raise DatasetError(_format_problems(
                    f"dataset {self.name}: images missing or malformed (template {image_template!r})",
                    {"missing files": missing, "blobs with a wrong shape": wrong},
                ))
            self.source: _ImageInputs | None = source
        else:
            self.source = None
        if not frames:
            raise DatasetError(f"dataset {self.name}: no frames left")
        self.shape, self.expression, self.pose = shape, expr, pose
        self.frames = frames
        log.info("dataset %s: %d frames from %d sequences", self.name, len(frames), len(files))

    @property
    def image_keys(self) -> list[str]:
        if self.source is None:
            raise DatasetError(f"dataset {self.name} has no images (image_template is unset)")
        return self.source.image_keys

    @property
    def total_images(self) -> int:
        return 0 if self.source is None else len(self.source.image_keys)

    def input_file(self, i: int, slot: str) -> Path:
        return self.image_source().input_file(i, slot)

    def load_input(self, i: int, slot: str) -> np.ndarray:
        return self.image_source().load(i, slot)

    def input_spec(self, slot: str) -> dict[str, Any]:
        return self.image_source().spec(slot)

    def image_source(self) -> _ImageInputs:
        if self.source is None:
            raise DatasetError(f"dataset {self.name} has no images (image_template is unset)")
        return self.source

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.name}: index {index} out of range [0, {len(self)})")
        subject, sequence, frame = self.frames[index]
        item: dict[str, Any] = {
            "shape": torch.from_numpy(self.shape[index].copy()),
            "expression": torch.from_numpy(self.expression[index].copy()),
            "pose": torch.from_numpy(self.pose[index].copy()),
            "actor": subject,
            "sequence": sequence,
            "frame": frame,
            "index": index,
            "dataset": self.name,
        }
        if self.source is not None:
            ids = np.array([index])
            item["image_ids"] = torch.from_numpy(ids)
            item.update(_stack_inputs(self.source, ids, self.inputs))
        return item


# --------------------------------------------------------------------------------------------
# Mixing and building
# --------------------------------------------------------------------------------------------
class MixedDataset(ConcatDataset):
    """Several datasets as one; items stay per-actor, so uniform sampling is identity-balanced.

    Args:
        datasets: the datasets (all items must have the same keys to be batched together).
        weights: optional per-dataset sampling weights; see ``sample_weights``.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float] | None = None) -> None:
        if not datasets:
            raise ValueError("MixedDataset needs at least one dataset")
        super().__init__(list(datasets))
        self.names = [getattr(d, "name", f"dataset{i}") for i, d in enumerate(datasets)]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"duplicate dataset names {self.names}")
        w = [1.0] * len(datasets) if weights is None else [float(x) for x in weights]
        if len(w) != len(datasets) or any(x < 0 for x in w) or sum(w) <= 0:
            raise ValueError(f"weights must be {len(datasets)} non-negative numbers with a positive sum, got {weights}")
        self.weights = w

    def sample_weights(self) -> torch.Tensor | None:
        """Per-item weights for ``WeightedRandomSampler`` so dataset d is drawn with probability
        weight_d / sum(weights) (uniform over its actors); None when all weights are 1 (plain
        shuffling is then identity-balanced already)."""
        if all(x == 1.0 for x in self.weights):
            return None
        parts = [torch.full((len(d),), w / len(d), dtype=torch.float64) for d, w in zip(self.datasets, self.weights)]
        return torch.cat(parts)


DATASET_FORMATS = ("mica", "ofer", "auto", "famos")


def build_dataset_from_config(
    cfg: Mapping[str, Any], *, inputs: Sequence[str] = ("arcface",), key: str = "<dataset>"
) -> Dataset:
    """One dataset from a ``configs/data/*.yaml`` entry (``format`` + constructor arguments)."""
    kwargs = {k: v for k, v in dict(cfg).items() if k not in ("format", "weight")}
    fmt = cfg.get("format", "auto")
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"data.datasets.{key}.format: unknown {fmt!r}; allowed: {list(DATASET_FORMATS)}")
    try:
        if fmt == "famos":
            return FamosDataset(inputs=inputs, **kwargs)
        return MicaDataset(variant=fmt, inputs=inputs, **kwargs)
    except TypeError as exc:
        raise TypeError(f"data.datasets.{key}: {exc}") from exc


def build_dataset(
    cfg: Mapping[str, Any] | Any,
    *,
    inputs: Sequence[str] = ("arcface",),
    encoders: Mapping[str, torch.nn.Module] | None = None,
    cache_dir: str | Path | None = None,
) -> MixedDataset:
    """The mixer over ``cfg.datasets`` (a ``data`` config node).

    Args:
        cfg: node with ``datasets: {key: {format, name, root, ...}}``.
        inputs: image inputs per item (``"arcface"``, ``"farl"``).
        encoders / cache_dir: when given (frozen encoders), the datasets serve cached features
            ``<slot>_feat (K, 512)`` for every slot in ``inputs`` instead of images; a missing or
            stale cache is an error (``ofer.data.features``).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    entries = cfg.get("datasets") if isinstance(cfg, Mapping) else None
    if not entries:
        raise ValueError("data config has no 'datasets' entries (select e.g. data=[stirling,florence])")
    use_cache = encoders is not None or cache_dir is not None
    if use_cache and (encoders is None or cache_dir is None):
        raise ValueError("cached features need both encoders and cache_dir")
    datasets: list[Dataset] = []
    weights: list[float] = []
    for key in sorted(entries):
        entry = entries[key]
        ds = build_dataset_from_config(entry, inputs=() if use_cache else inputs, key=key)
        if use_cache:
            from ofer.data.features import CachedFeatureDataset, load_features

            feats = {slot: load_features(ds, encoders[slot], slot=slot, cache_dir=cache_dir) for slot in inputs}
            ds = CachedFeatureDataset(ds, feats)
        datasets.append(ds)
        weights.append(float(entry.get("weight", 1.0)))
    return MixedDataset(datasets, weights)
