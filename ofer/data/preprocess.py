"""Face preprocessing: an image -> the ArcFace blob (3, 112, 112) and the FaRL crop (3, 224, 224).

Conventions (explicit, because the public OFER code mixes BGR and RGB):

* Images are handled as uint8 RGB arrays (H, W, 3). Files are decoded with Pillow (EXIF
  orientation applied, as cv2.imread does); arrays must say their channel order.
* ArcFace: ``insightface.utils.face_align.norm_crop(img, kps, 112)`` (similarity to the arcface
  5-point template), then (x - 127.5) / 127.5 -> float32 (3, 112, 112) in [-1, 1], RGB.
  This equals MICA's ``cv2.dnn.blobFromImages(..., 1/127.5, mean 127.5, swapRB=True)`` on BGR.
* FaRL: a square of side 1.6 x (box width + height) / 2 around the face-box centre, warped to
  224 x 224 (bilinear, black outside), then CLIP mean/std -> float32 (3, 224, 224), RGB.
  # OFER: scripts/arcface_process.py (scale 1.6, corners -> (0, 0), (0, 223), (223, 0)).

Where the 5 points and the box come from:

* 5 landmarks given: used as is; without a box, the box is the image of the 112 x 112 ArcFace
  crop square in the photo (``box_from_kps``). [ours] This is somewhat larger than a detector's
  box; when mixing with detector-based data, give boxes too.
* Only a box given (e.g. NoW's ``detected_face``): the SCRFD detector finds the faces and the
  detection overlapping the box most (IoU >= ``min_box_iou``) gives the 5 points; the given box
  is kept for the FaRL crop. Without a detector this is an error, unless ``kps_from_box=True``
  explicitly places the ArcFace template in the box (``kps_from_box``; approximate, our choice).
* Nothing given: the detector is required. Several faces: ``multi_face`` = ``"largest"``
  (box area), ``"central"`` (box centre nearest the image centre), ``"skip"`` or ``"error"``.
  No face: ``no_face`` = ``"skip"`` (recorded in ``Preprocessor.skipped`` and logged) or
  ``"error"``.

The detector is insightface's SCRFD from the user's ``antelopev2`` pack under
``<insightface_root>/models/antelopev2/``; we check the files ourselves and never let
insightface download anything.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

log = logging.getLogger(__name__)

ARCFACE_SIZE = 112
FARL_SIZE = 224
FARL_BOX_SCALE = 1.6  # OFER: scripts/arcface_process.py `scale = 1.6`
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Bumped whenever the produced blobs/crops change; part of feature-cache keys.
PREPROCESS_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MULTI_FACE_POLICIES = ("largest", "central", "skip", "error")
NO_FACE_POLICIES = ("skip", "error")
COLOR_ORDERS = ("rgb", "bgr")
# insightface's arcface 5-point template in the 112 x 112 crop: left eye, right eye, nose,
# left mouth corner, right mouth corner (x, y).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)
DEFAULT_DETECTOR_PACK = "antelopev2"


class ImageReadError(ValueError):
    """An image file is missing, truncated, unreadable or in an unsupported format."""


class DetectorUnavailableError(FileNotFoundError):
    """The face detector is needed but its model files are not where they should be."""


class NoFaceError(RuntimeError):
    """No usable face (raised only with ``no_face="error"`` / ``multi_face="error"``)."""


@dataclass(frozen=True)
class Preprocessed:
    """Encoder inputs of one face.

    arcface: (3, 112, 112) float32 in [-1, 1], RGB.
    farl: (3, 224, 224) float32, CLIP-normalised RGB.
    kps: (5, 2) float32 landmarks in source-image pixels.
    box: (4,) float32 face box (x1, y1, x2, y2) in source-image pixels.
    source: file path, or a caller-given name for arrays.
    n_faces: faces found by the detector (0 when landmarks were given).
    farl_image: (224, 224, 3) uint8 RGB, the FaRL crop as an image (for saving/inspection).
    """

    arcface: np.ndarray
    farl: np.ndarray
    kps: np.ndarray
    box: np.ndarray
    source: str
    n_faces: int = 0
    farl_image: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Detections:
    """Detector output. boxes: (N, 4) x1 y1 x2 y2; scores: (N,); kps: (N, 5, 2)."""

    boxes: np.ndarray
    scores: np.ndarray
    kps: np.ndarray

    def __len__(self) -> int:
        return int(self.boxes.shape[0])


class FaceDetector(Protocol):
    """Anything with ``detect(img_rgb (H, W, 3) uint8) -> Detections``."""

    def detect(self, img_rgb: np.ndarray) -> Detections: ...


# --------------------------------------------------------------------------------------------
# Reading images
# --------------------------------------------------------------------------------------------
def _pil_to_rgb(im: Any, source: str) -> np.ndarray:
    mode = im.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        raise ImageReadError(
            f"{source}: unsupported pixel mode {mode!r} (16-bit/float image); convert it to 8-bit RGB first"
        )
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        # Alpha is dropped, as cv2.imread(IMREAD_COLOR) does in insightface-based pipelines.
        im = im.convert("RGBA")
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def load_image(image: str | Path | np.ndarray, *, color_order: str | None = None) -> np.ndarray:
    """Read an image as a uint8 RGB array (H, W, 3).

    Args:
        image: a file path, or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
        color_order: ``"rgb"`` or ``"bgr"``; required for 3/4-channel arrays (cv2 gives BGR),
            ignored for files (decoded as RGB).

    Grayscale is replicated to 3 channels; alpha is dropped.

    Raises:
        ImageReadError: naming the file for missing, truncated or undecodable files.
    """
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image, color_order)
    from PIL import Image, ImageOps

    path = Path(image)
    if not path.is_file():
        raise ImageReadError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decodes fully: truncated files raise here (unless a library set LOAD_TRUNCATED_IMAGES)
            im = ImageOps.exif_transpose(im)
            return _pil_to_rgb(im, str(path))
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc


def _array_to_rgb(arr: np.ndarray, color_order: str | None) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise ImageReadError(f"image array must be uint8 (0..255), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ImageReadError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[2] == 1:
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2))
    if color_order not in COLOR_ORDERS:
        raise ValueError(f"color_order must be one of {list(COLOR_ORDERS)} for a color array, got {color_order!r}")
    arr = arr[:, :, :3]
    if color_order == "bgr":
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr)


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def _check_kps(kps: Any) -> np.ndarray:
    kps = np.asarray(kps, dtype=np.float64)
    if kps.shape != (5, 2) or not np.all(np.isfinite(kps)):
        raise ValueError(f"landmarks must be a finite (5, 2) array (eyes, nose, mouth corners), got shape {kps.shape}")
    return kps


def _check_box(box: Any) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"face box must be finite (x1, y1, x2, y2) with x2 > x1 and y2 > y1, got {box}")
    return box


def arcface_alignment(kps: np.ndarray, size: int = ARCFACE_SIZE) -> np.ndarray:
    """(2, 3) similarity taking the 5 landmarks to insightface's arcface template (norm_crop's)."""
    from insightface.utils import face_align

    with warnings.catch_warnings():
        # insightface calls skimage's SimilarityTransform.estimate, deprecated in skimage 0.26.
        warnings.filterwarnings("ignore", message=".*`estimate` is deprecated.*", category=FutureWarning)
        return face_align.estimate_norm(_check_kps(kps).astype(np.float32), size)


def arcface_blob(img_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The ArcFace input: (3, 112, 112) float32 in [-1, 1], RGB.

    ``insightface.utils.face_align.norm_crop(img, kps, 112)``, then (x - 127.5) / 127.5.
    """
    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*`estimate` is deprecated.*", category=FutureWarning)
        crop = face_align.norm_crop(img_rgb, _check_kps(kps).astype(np.float32), ARCFACE_SIZE)
    return ((crop.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1).copy()


def box_from_kps(kps: np.ndarray) -> np.ndarray:
    """Face box (4,) = the square that the ArcFace alignment maps onto the 112 x 112 crop.

    [ours] Used for the FaRL crop when landmarks are given without a box.
    """
    m = arcface_alignment(kps).astype(np.float64)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    center = np.linalg.solve(m[:, :2], np.array([ARCFACE_SIZE / 2, ARCFACE_SIZE / 2]) - m[:, 2])
    half = ARCFACE_SIZE / scale / 2
    return np.array([center[0] - half, center[1] - half, center[0] + half, center[1] + half])


def kps_from_box(box: np.ndarray) -> np.ndarray:
    """Approximate 5 landmarks (5, 2): the ArcFace template placed in the box's square.

    [ours] The inverse of ``box_from_kps`` for an upright face; used only with
    ``kps_from_box=True`` when a box is known and no detector is available.
    """
    box = _check_box(box)
    side = ((box[2] - box[0]) + (box[3] - box[1])) / 2
    center = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])
    return center + (ARCFACE_TEMPLATE - ARCFACE_SIZE / 2) * (side / ARCFACE_SIZE)


def farl_crop_transform(box: np.ndarray, *, scale: float = FARL_BOX_SCALE, size: int = FARL_SIZE) -> np.ndarray:
    """(2, 3) affine map from image pixels to the FaRL crop.

    # OFER: scripts/arcface_process.py: side = int(scale * (w + h) / 2) around the box centre;
    # the square's corners go to (0, 0), (0, size-1), (size-1, 0).
    """
    box = _check_box(box)
    side = int(((box[2] - box[0]) + (box[3] - box[1])) / 2 * scale)
    if side < 1:
        raise ValueError(f"face box {box} is too small for a FaRL crop")
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    s = (size - 1) / side
    return np.array([[s, 0.0, -s * (cx - side / 2)], [0.0, s, -s * (cy - side / 2)]])


def farl_crop_image(
    img_rgb: np.ndarray, box: np.ndarray, *, scale: float = FARL_BOX_SCALE, size: int = FARL_SIZE
) -> np.ndarray:
    """The FaRL face crop as float32 RGB (size, size, 3) in [0, 255] (bilinear, black outside)."""
    m = farl_crop_transform(box, scale=scale, size=size)
    return cv2.warpAffine(
        img_rgb.astype(np.float32), m, (size, size), flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0),
    )


def farl_normalize(crop_rgb: np.ndarray) -> np.ndarray:
    """(S, S, 3) RGB in [0, 255] -> (3, S, S) float32 CLIP-normalised."""
    x = crop_rgb.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return x.transpose(2, 0, 1).copy()


def farl_from_face_image(img_rgb: np.ndarray, *, size: int = FARL_SIZE) -> np.ndarray:
    """FaRL input from an image that already is a face crop (MICA/OFER ``arcface_input`` jpgs).

    CLIP's preprocessing: resize the shorter side to ``size`` (bicubic), centre crop, normalise.
    # OFER: base_dataset_flame23.py applies CLIP's preprocess to the arcface_input image.
    An image that is already size x size passes through unchanged.
    """
    from PIL import Image

    h, w = img_rgb.shape[:2]
    if (h, w) != (size, size):
        # Sizes and offsets rounded as torchvision's Resize(size) + CenterCrop(size) (CLIP's transform).
        if w <= h:
            nw, nh = size, int(size * h / w)
        else:
            nw, nh = int(size * w / h), size
        if (nw, nh) != (w, h):
            img_rgb = np.asarray(Image.fromarray(img_rgb).resize((nw, nh), Image.BICUBIC))
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        img_rgb = img_rgb[top:top + size, left:left + size]
    return farl_normalize(img_rgb)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (N, 4) -> (N,)."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-12)


# --------------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------------
class InsightFaceDetector:
    """insightface SCRFD (5-point) detector from a user-provided model pack; never downloads.

    Args:
        root: the insightface root (``~/.insightface`` by default; config ``paths.insightface_root``).
        pack: the model pack folder under ``<root>/models/`` (``antelopev2``).
        det_size: detector input side (640).
        det_thresh: score threshold (0.5, insightface's default).
        device: ``"cpu"`` or ``"cuda"`` (onnxruntime provider).

    The model is located and loaded on the first ``detect`` call, so a pipeline whose images
    all have landmarks never needs the pack.
    """

    def __init__(
        self,
        *,
        root: str | Path = "~/.insightface",
        pack: str = DEFAULT_DETECTOR_PACK,
        det_size: int = 640,
        det_thresh: float = 0.5,
        device: str = "cpu",
    ) -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"InsightFaceDetector: device must be 'cpu' or 'cuda', got {device!r}")
        self.root = Path(root).expanduser()
        self.pack = pack
        self.det_size = int(det_size)
        self.det_thresh = float(det_thresh)
        self.device = device
        self._model: Any = None

    @property
    def pack_dir(self) -> Path:
        return self.root / "models" / self.pack

    def find_model_file(self) -> Path:
        """The SCRFD .onnx of the pack (``scrfd_*.onnx`` or ``det_*.onnx``).

        Raises:
            DetectorUnavailableError: saying what to place where.
        """
        # Some unzip tools nest the pack one level deeper (models/antelopev2/antelopev2/).
        candidates: list[Path] = []
        for folder in (self.pack_dir, self.pack_dir / self.pack):
            if folder.is_dir():
                candidates += sorted(p for p in folder.glob("*.onnx") if p.name.startswith(("scrfd", "det_")))
        if candidates:
            return candidates[0]
        found = sorted(p.name for p in self.pack_dir.glob("*")) if self.pack_dir.is_dir() else []
        raise DetectorUnavailableError(
            f"face detector not found: no SCRFD model (scrfd_*.onnx / det_*.onnx) in {self.pack_dir}"
            + (f" (it contains: {found})" if found else " (folder missing)")
            + f". Place the insightface '{self.pack}' model pack there, unzipped (for antelopev2: "
            f"scrfd_10g_bnkps.onnx, glintr100.onnx, 2d106det.onnx, 1k3d68.onnx, genderage.onnx), i.e. "
            f"{self.pack_dir}/scrfd_10g_bnkps.onnx; or set `paths.insightface_root` to the folder that "
            f"contains models/{self.pack}/; or give 5-point landmarks (or a box with kps_from_box=true) "
            f"so no detector is needed. Nothing is downloaded automatically."
        )

    def _load(self) -> Any:
        if self._model is None:
            model_file = self.find_model_file()
            from insightface.model_zoo import get_model

            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if self.device == "cuda" else ["CPUExecutionProvider"]
            # An absolute existing .onnx path: insightface loads it and does not download.
            model = get_model(str(model_file.resolve()), providers=providers, download=False)
            if model is None or not hasattr(model, "detect"):
                raise DetectorUnavailableError(f"{model_file} is not an SCRFD detector model")
            model.prepare(0 if self.device == "cuda" else -1, input_size=(self.det_size, self.det_size),
                          det_thresh=self.det_thresh)
            self._model = model
            log.info("face detector loaded from %s", model_file)
        return self._model

    def detect(self, img_rgb: np.ndarray) -> Detections:
        """img_rgb (H, W, 3) uint8 -> all faces above the threshold."""
        model = self._load()
        det, kpss = model.detect(np.ascontiguousarray(img_rgb[:, :, ::-1]), max_num=0)  # SCRFD takes BGR
        if kpss is None:
            raise DetectorUnavailableError(f"detector {model.model_file} gives no 5-point landmarks; use a *_kps/bnkps model")
        det = np.asarray(det, dtype=np.float64).reshape(-1, 5)
        return Detections(boxes=det[:, :4], scores=det[:, 4], kps=np.asarray(kpss, dtype=np.float64).reshape(-1, 5, 2))


# --------------------------------------------------------------------------------------------
# The preprocessor
# --------------------------------------------------------------------------------------------
@dataclass
class Preprocessor:
    """Turns photos into encoder inputs with explicit face-selection policies.

    Attributes:
        detector: a ``FaceDetector`` (e.g. ``InsightFaceDetector``) or None (landmarks needed).
        multi_face: ``"largest"`` | ``"central"`` | ``"skip"`` | ``"error"``.
        no_face: ``"skip"`` | ``"error"``.
        kps_from_box: allow template landmarks from a box when no detector is available.
        farl_box_scale: FaRL crop side / face-box size (OFER: 1.6).
        min_box_iou: detections matched to a given box need at least this IoU.
        skipped: ``{source: reason}`` of every image skipped so far (never silent: also logged).
    """

    detector: FaceDetector | None = None
    multi_face: str = "largest"
    no_face: str = "skip"
    kps_from_box: bool = False
    farl_box_scale: float = FARL_BOX_SCALE
    min_box_iou: float = 0.3
    skipped: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.multi_face not in MULTI_FACE_POLICIES:
            raise ValueError(f"multi_face must be one of {list(MULTI_FACE_POLICIES)}, got {self.multi_face!r}")
        if self.no_face not in NO_FACE_POLICIES:
            raise ValueError(f"no_face must be one of {list(NO_FACE_POLICIES)}, got {self.no_face!r}")
        if not self.farl_box_scale > 0:
            raise ValueError(f"farl_box_scale must be > 0, got {self.farl_box_scale}")

    def settings(self) -> dict[str, Any]:
        """The settings that shape the produced inputs (for manifests and cache keys)."""
        return {
            "version": PREPROCESS_VERSION,
            "arcface_size": ARCFACE_SIZE,
            "farl_size": FARL_SIZE,
            "farl_box_scale": float(self.farl_box_scale),
            "kps_from_box": bool(self.kps_from_box),
            "multi_face": self.multi_face,
        }

    def _skip(self, source: str, reason: str) -> None:
        self.skipped[source] = reason
        log.warning("skipped %s: %s", source, reason)

    def _choose(self, dets: Detections, img_shape: tuple[int, ...], box: np.ndarray | None, source: str) -> int | None:
        if len(dets) == 0:
            return self._no_face(source, "the detector found no face")
        if box is not None:
            iou = box_iou(box, dets.boxes)
            best = int(np.argmax(iou))
            if iou[best] < self.min_box_iou:
                return self._no_face(
                    source, f"no detection overlaps the given box {np.round(box, 1).tolist()} "
                            f"(best IoU {iou[best]:.2f} < {self.min_box_iou})")
            return best
        if len(dets) == 1:
            return 0
        if self.multi_face == "skip":
            self._skip(source, f"{len(dets)} faces found and multi_face='skip'")
            return None
        if self.multi_face == "error":
            raise NoFaceError(f"{source}: {len(dets)} faces found and multi_face='error'")
        b = dets.boxes
        if self.multi_face == "largest":
            return int(np.argmax((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])))
        centers = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
        img_center = np.array([img_shape[1] / 2, img_shape[0] / 2])
        return int(np.argmin(((centers - img_center) ** 2).sum(axis=1)))

    def _no_face(self, source: str, reason: str) -> int | None:
        if self.no_face == "error":
            raise NoFaceError(f"{source}: {reason}")
        self._skip(source, reason)
        return None

    def __call__(
        self,
        image: str | Path | np.ndarray,
        *,
        color_order: str | None = None,
        kps: np.ndarray | Sequence[Sequence[float]] | None = None,
        box: np.ndarray | Sequence[float] | None = None,
        source: str | None = None,
    ) -> Preprocessed | None:
        """Preprocess one image; None when it is skipped by policy (see ``skipped``).

        Args:
            image: file path or uint8 array (see ``load_image``).
            color_order: ``"rgb"``/``"bgr"`` for color arrays.
            kps: known 5-point landmarks (5, 2) in image pixels.
            box: known face box (x1, y1, x2, y2) in image pixels.
            source: name recorded in the result (defaults to the path, or ``"<array>"``).
        """
        if source is None:
            source = str(image) if not isinstance(image, np.ndarray) else "<array>"
        img = load_image(image, color_order=color_order)
        box_arr = None if box is None else _check_box(box)
        n_faces = 0
        if kps is not None:
            kps_arr = _check_kps(kps)
        elif self.detector is not None:
            dets = self.detector.detect(img)
            n_faces = len(dets)
            idx = self._choose(dets, img.shape, box_arr, source)
            if idx is None:
                return None
            kps_arr = dets.kps[idx]
            if box_arr is None:
                box_arr = dets.boxes[idx]
        elif box_arr is not None and self.kps_from_box:
            kps_arr = kps_from_box(box_arr)
        elif box_arr is not None:
            raise DetectorUnavailableError(
                f"{source}: a face box was given but no 5-point landmarks and no detector. Provide the "
                f"insightface detector (antelopev2 pack, see InsightFaceDetector), give landmarks, or set "
                f"kps_from_box=true to place the ArcFace template in the box (approximate alignment)."
            )
        else:
            raise DetectorUnavailableError(
                f"{source}: no landmarks given and no face detector configured; pass kps=(5, 2) landmarks "
                f"or a detector (InsightFaceDetector with the antelopev2 pack)."
            )
        if box_arr is None:
            box_arr = box_from_kps(kps_arr)
        crop = farl_crop_image(img, box_arr, scale=self.farl_box_scale)
        return Preprocessed(
            arcface=arcface_blob(img, kps_arr),
            farl=farl_normalize(crop),
            kps=kps_arr.astype(np.float32),
            box=box_arr.astype(np.float32),
            source=source,
            n_faces=n_faces,
            farl_image=np.clip(np.rint(crop), 0, 255).astype(np.uint8),
        )


def preprocess_image(
    image: str | Path | np.ndarray,
    *,
    color_order: str | None = None,
    kps: Any = None,
    box: Any = None,
    detector: FaceDetector | None = None,
    multi_face: str = "largest",
    no_face: str = "skip",
    kps_from_box: bool = False,
) -> Preprocessed | None:
    """One-shot ``Preprocessor(...)(image, ...)``."""
    pre = Preprocessor(detector=detector, multi_face=multi_face, no_face=no_face, kps_from_box=kps_from_box)
    return pre(image, color_order=color_order, kps=kps, box=box)


# --------------------------------------------------------------------------------------------
# Folder processing (scripts/preprocess.py)
# --------------------------------------------------------------------------------------------
def _load_annotations(path: str | Path | None) -> dict[str, dict[str, Any]]:
    """JSON ``{"relative/path.jpg": {"kps": [[x, y] x5], "box": [x1, y1, x2, y2]}}``."""
    if path is None:
        return {}
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read annotations file {p}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"annotations file {p}: expected a JSON object relative_path -> {{'kps': ..., 'box': ...}}")
    return data


def load_now_box(path: str | Path) -> np.ndarray:
    """A NoW ``detected_face`` .npy (a pickled dict with left/top/right/bottom) -> box (4,)."""
    from ofer.io import safe_load_npy_object

    data = safe_load_npy_object(path)
    if isinstance(data, np.ndarray) and data.dtype == object and data.shape == ():
        data = data.item()
    if not isinstance(data, Mapping) or not {"left", "top", "right", "bottom"} <= set(data):
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{path}: expected a dict with left/top/right/bottom (NoW detected_face), found {keys}")
    return _check_box([float(data["left"]), float(data["top"]), float(data["right"]), float(data["bottom"])])


def _save_npy_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def run_preprocess(
    *,
    input_dir: str | Path,
    output_dir: str | Path,
    annotations: str | Path | None = None,
    boxes_dir: str | Path | None = None,
    detector: FaceDetector | None = None,
    multi_face: str = "largest",
    no_face: str = "skip",
    kps_from_box: bool = False,
    farl_box_scale: float = FARL_BOX_SCALE,
    unreadable: str = "raise",
    write_crops: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Preprocess every image under ``input_dir`` into the MICA ``arcface_input`` layout.

    For ``input_dir/<rel>/<stem>.<ext>`` it writes ``output_dir/<rel>/<stem>.npy`` (ArcFace blob),
    ``<stem>_farl.npy`` (FaRL crop) and, with ``write_crops``, ``<stem>.jpg`` (the 224 FaRL crop
    image, as OFER's arcface_input jpgs; never over the input image itself). A report
    ``preprocess_report.json`` in ``output_dir`` lists landmarks/boxes used and every skipped
    image with its reason.

    Args:
        annotations: optional JSON of known landmarks/boxes per relative path.
        boxes_dir: optional NoW-style folder of ``<rel stem>.npy`` box dicts.
        detector: face detector for images without landmarks.
        unreadable: ``"raise"`` (default) or ``"skip"`` for undecodable files (always reported).
    """
    if unreadable not in ("raise", "skip"):
        raise ValueError(f"unreadable must be 'raise' or 'skip', got {unreadable!r}")
    src_root, dst_root = Path(input_dir).expanduser(), Path(output_dir).expanduser()
    if not src_root.is_dir():
        raise FileNotFoundError(f"input_dir {src_root} is not a folder")
    ann = _load_annotations(annotations)
    pre = Preprocessor(detector=detector, multi_face=multi_face, no_face=no_face,
                       kps_from_box=kps_from_box, farl_box_scale=farl_box_scale)
    images = sorted(p for p in src_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {src_root}")
    unknown = sorted(set(ann) - {p.relative_to(src_root).as_posix() for p in images})
    if unknown:
        raise ValueError(f"annotations {annotations} name {len(unknown)} images not under {src_root}: {unknown[:10]}")
    processed: dict[str, Any] = {}
    unreadable_files: dict[str, str] = {}
    for n, path in enumerate(images):
        rel = path.relative_to(src_root)
        key = rel.as_posix()
        out_stem = dst_root / rel.with_suffix("")
        blob_path = out_stem.with_suffix(".npy")
        farl_path = out_stem.with_name(out_stem.name + "_farl.npy")
        if not overwrite and blob_path.exists() and farl_path.exists():
            continue
        entry = ann.get(key, {})
        box = entry.get("box")
        if box is None and boxes_dir is not None:
            box_file = Path(boxes_dir) / rel.with_suffix(".npy")
            if box_file.exists():
                box = load_now_box(box_file)
        try:
            res = pre(path, kps=entry.get("kps"), box=box, source=key)
        except ImageReadError as exc:
            if unreadable == "raise":
                raise
            unreadable_files[key] = str(exc)
            log.error("unreadable image skipped: %s", exc)
            continue
        if res is None:
            continue
        out_stem.parent.mkdir(parents=True, exist_ok=True)
        _save_npy_atomic(blob_path, res.arcface)
        _save_npy_atomic(farl_path, res.farl)
        crop_path = out_stem.with_suffix(".jpg")
        if write_crops and crop_path.resolve() != path.resolve():
            from PIL import Image

            Image.fromarray(res.farl_image).save(crop_path, quality=95)
        processed[key] = {"kps": res.kps.tolist(), "box": res.box.tolist(), "n_faces": res.n_faces}
        if (n + 1) % 500 == 0:
            log.info("preprocessed %d / %d images", n + 1, len(images))
    report = {
        "settings": pre.settings(),
        "input_dir": str(src_root),
        "processed": processed,
        "skipped": dict(pre.skipped),
        "unreadable": unreadable_files,
    }
    dst_root.mkdir(parents=True, exist_ok=True)
    (dst_root / "preprocess_report.json").write_text(json.dumps(report, indent=1))
    n_skip = len(pre.skipped) + len(unreadable_files)
    log.info("preprocessed %d images into %s; %d skipped (see preprocess_report.json)", len(processed), dst_root, n_skip)
    if n_skip:
        log.warning("skipped images: %s", sorted(list(pre.skipped) + list(unreadable_files)))
    return report


def run_preprocess_from_config(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """Entry point of ``scripts/preprocess.py`` (``configs/preprocess.yaml``)."""
    det_cfg = cfg["detector"]
    detector = None
    if det_cfg is not None and det_cfg.get("enabled", True):
        detector = InsightFaceDetector(
            root=det_cfg["root"], pack=det_cfg.get("pack", DEFAULT_DETECTOR_PACK),
            det_size=det_cfg.get("det_size", 640), det_thresh=det_cfg.get("det_thresh", 0.5),
            device=det_cfg.get("device", "cpu"),
        )
    return run_preprocess(
        input_dir=cfg["input_dir"], output_dir=cfg["output_dir"],
        annotations=cfg.get("annotations"), boxes_dir=cfg.get("boxes_dir"), detector=detector,
        multi_face=cfg.get("multi_face", "largest"), no_face=cfg.get("no_face", "skip"),
        kps_from_box=bool(cfg.get("kps_from_box", False)),
        farl_box_scale=float(cfg.get("farl_box_scale", FARL_BOX_SCALE)),
        unreadable=cfg.get("unreadable", "raise"), write_crops=bool(cfg.get("write_crops", True)),
        overwrite=bool(cfg.get("overwrite", False)),
    )
