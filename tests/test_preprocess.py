"""Preprocessing on the real photos shipped inside insightface (loaded from site-packages, never copied
into the repo): alignment identity, crops against skimage, colour conventions, detector policies."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ofer.data.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    Detections,
    DetectorUnavailableError,
    ImageReadError,
    InsightFaceDetector,
    NoFaceError,
    Preprocessor,
    arcface_blob,
    box_from_kps,
    farl_crop_image,
    farl_from_face_image,
    kps_from_box,
    load_image,
    load_now_box,
    preprocess_image,
    run_preprocess,
    run_preprocess_from_config,
)

IMAGES = Path(__import__("insightface").__file__).parent / "data" / "images"
TOM = IMAGES / "Tom_Hanks_54745.png"  # an aligned 112x112 face
T1 = IMAGES / "t1.jpg"  # a group photo, 1280x886
# A face in t1 (the man in the red shirt, centre right), located by eye on the photo.
T1_BOX = np.array([745.0, 320.0, 870.0, 460.0])


def arcface_template() -> np.ndarray:
    from insightface.utils.face_align import arcface_dst

    return arcface_dst.astype(np.float64)


def test_photos_are_where_we_expect():
    assert TOM.is_file() and T1.is_file()
    assert load_image(TOM).shape == (112, 112, 3) and load_image(T1).shape == (886, 1280, 3)


def test_aligned_face_passes_through_arcface_alignment_unchanged():
    rgb = cv2.cvtColor(cv2.imread(str(TOM)), cv2.COLOR_BGR2RGB)
    res = preprocess_image(TOM, kps=arcface_template())
    assert res.arcface.shape == (3, 112, 112) and res.arcface.dtype == np.float32
    expected = (rgb.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)
    np.testing.assert_allclose(res.arcface, expected, atol=1e-5)
    assert res.arcface.min() >= -1.0 and res.arcface.max() <= 1.0
    # RGB order, explicitly: channel 0 is red.
    np.testing.assert_allclose(res.arcface[0], rgb[:, :, 0] / 127.5 - 1.0, atol=1e-5)
    np.testing.assert_allclose(box_from_kps(arcface_template()), [0, 0, 112, 112], atol=1e-3)
    assert res.farl.shape == (3, 224, 224) and res.kps.shape == (5, 2) and res.box.shape == (4,)
    assert res.source == str(TOM)


def test_color_order_is_explicit_for_arrays():
    rgb = load_image(T1)
    bgr = cv2.imread(str(T1))
    np.testing.assert_array_equal(load_image(bgr, color_order="bgr"), rgb)
    np.testing.assert_array_equal(load_image(rgb, color_order="rgb"), rgb)
    with pytest.raises(ValueError, match="color_order"):
        load_image(bgr)
    with pytest.raises(ImageReadError, match="uint8"):
        load_image(rgb.astype(np.float32), color_order="rgb")
    kps = kps_from_box(T1_BOX)
    a = preprocess_image(bgr, color_order="bgr", kps=kps)
    b = preprocess_image(T1, kps=kps)
    np.testing.assert_array_equal(a.arcface, b.arcface)
    np.testing.assert_array_equal(a.farl, b.farl)


def test_grayscale_and_rgba_are_converted(tmp_path):
    rgb = load_image(TOM)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.concatenate([rgb, np.full((112, 112, 1), 77, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    g = load_image(tmp_path / "gray.png")
    assert g.shape == (112, 112, 3) and all(np.array_equal(g[:, :, c], gray) for c in range(3))
    np.testing.assert_array_equal(load_image(tmp_path / "rgba.png"), rgb)  # alpha dropped
    np.testing.assert_array_equal(load_image(gray), np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(load_image(rgba, color_order="rgb"), rgb)


def test_unreadable_files_name_the_file(tmp_path):
    truncated = tmp_path / "truncated.jpg"
    data = T1.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"truncated\.jpg"):
        load_image(truncated)
    junk = tmp_path / "notes.jpg"
    junk.write_text("not an image")
    with pytest.raises(ImageReadError, match=r"notes\.jpg"):
        load_image(junk)
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(sixteen)
    with pytest.raises(ImageReadError, match=r"deep\.png.*16-bit"):
        load_image(sixteen)


def _ofer_reference_farl_crop(img: np.ndarray, box: np.ndarray) -> np.ndarray:
    """OFER's scripts/arcface_process.py FaRL crop, with skimage (an independent warp)."""
    from skimage.transform import estimate_transform, warp

    left, top, right, bottom = box
    old_size = (right - left + bottom - top) / 2
    center = np.array([right - (right - left) / 2.0, bottom - (bottom - top) / 2.0])
    size = int(old_size * 1.6)
    src = np.array([[center[0] - size / 2, center[1] - size / 2], [center[0] - size / 2, center[1] + size / 2],
                    [center[0] + size / 2, center[1] - size / 2]])
    dst = np.array([[0, 0], [0, 223], [223, 0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tform = estimate_transform("similarity", src, dst)
    return warp(img / 255.0, tform.inverse, output_shape=(224, 224)) * 255.0


@pytest.mark.parametrize("box", [T1_BOX, np.array([0.0, 400.0, 150.0, 560.0])])  # the second crosses the border
def test_farl_crop_matches_ofer_reference(box):
    img = load_image(T1)
    ours = farl_crop_image(img, box)
    ref = _ofer_reference_farl_crop(img, box)
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - ref).max() < 0.05  # in 0..255 units
    res = preprocess_image(T1, box=box, kps_from_box=True)
    expected = ((ref / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(res.farl, expected, atol=1e-3)
    np.testing.assert_array_equal(res.box, box.astype(np.float32))


def test_box_path_with_template_landmarks_is_a_pure_scale_crop():
    from skimage.transform import SimilarityTransform, warp

    img = load_image(T1)
    res = preprocess_image(T1, box=T1_BOX, kps_from_box=True)
    side = ((T1_BOX[2] - T1_BOX[0]) + (T1_BOX[3] - T1_BOX[1])) / 2
    # Independent: the template placed in the box's square maps that square onto the 112 crop.
    np.testing.assert_allclose(res.kps, (T1_BOX[:2] + (T1_BOX[2:] - T1_BOX[:2]) / 2 - side / 2)
                               + arcface_template() * side / 112, atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        tform = SimilarityTransform()
        tform.estimate(res.kps.astype(np.float64), arcface_template())
    assert abs(tform.rotation) < 1e-6 and abs(tform.scale - 112 / side) < 1e-6
    ref = warp(img / 255.0, tform.inverse, output_shape=(112, 112)) * 255.0
    ours = (res.arcface.transpose(1, 2, 0) + 1.0) * 127.5
    assert np.abs(ours - ref).max() <= 1.0 + 1e-3  # norm_crop rounds to uint8
    np.testing.assert_allclose(box_from_kps(res.kps), [T1_BOX[0] + (T1_BOX[2] - T1_BOX[0] - side) / 2,
                                                       T1_BOX[1] + (T1_BOX[3] - T1_BOX[1] - side) / 2,
                                                       T1_BOX[0] + (T1_BOX[2] - T1_BOX[0] + side) / 2,
                                                       T1_BOX[1] + (T1_BOX[3] - T1_BOX[1] + side) / 2], atol=1e-2)


def test_landmark_path_on_a_rotated_face():
    # A similarity of the template (rotated 20 degrees, scaled, moved) as landmarks: the blob is the
    # inverse warp, checked against skimage.
    from skimage.transform import SimilarityTransform, warp

    img = load_image(T1)
    t = SimilarityTransform(scale=1.2, rotation=np.deg2rad(20), translation=(760, 300))
    kps = t(arcface_template())
    blob = arcface_blob(img, kps)
    ref = warp(img / 255.0, t, output_shape=(112, 112)) * 255.0
    assert np.abs((blob.transpose(1, 2, 0) + 1.0) * 127.5 - ref).max() <= 1.0 + 1e-3


def test_box_without_landmarks_needs_a_detector_or_explicit_template():
    with pytest.raises(DetectorUnavailableError, match="kps_from_box"):
        preprocess_image(T1, box=T1_BOX)
    with pytest.raises(DetectorUnavailableError, match="no landmarks given and no face detector"):
        preprocess_image(T1)
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        preprocess_image(T1, kps=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="x2 > x1"):
        preprocess_image(T1, box=[10, 10, 5, 20], kps_from_box=True)


def test_missing_detector_pack_says_what_to_place_where_and_downloads_nothing(tmp_path):
    det = InsightFaceDetector(root=tmp_path / "insightface")  # cheap: nothing is loaded yet
    with pytest.raises(DetectorUnavailableError) as err:
        det.detect(load_image(TOM))
    msg = str(err.value)
    assert str(tmp_path / "insightface" / "models" / "antelopev2") in msg
    for needle in ("scrfd_10g_bnkps.onnx", "paths.insightface_root", "Nothing is downloaded"):
        assert needle in msg
    assert list(tmp_path.iterdir()) == []  # no folder created, nothing fetched
    pre = Preprocessor(detector=det)
    with pytest.raises(DetectorUnavailableError, match="antelopev2"):
        pre(T1)
    # A nested unzip (models/antelopev2/antelopev2/*.onnx) is found without loading anything.
    nested = tmp_path / "insightface" / "models" / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    (nested / "glintr100.onnx").write_bytes(b"")
    with pytest.raises(DetectorUnavailableError, match="glintr100.onnx"):
        det.find_model_file()
    (nested / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    assert det.find_model_file() == nested / "scrfd_10g_bnkps.onnx"


class FakeDetector:
    """Returns fixed faces: template landmarks in each box."""

    def __init__(self, boxes):
        self.boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)

    def detect(self, img_rgb):
        kps = np.stack([kps_from_box(b) for b in self.boxes]) if len(self.boxes) else np.zeros((0, 5, 2))
        return Detections(boxes=self.boxes, scores=np.full(len(self.boxes), 0.9), kps=kps)


SMALL_CENTRAL = [600.0, 400.0, 680.0, 480.0]  # nearest the centre (640, 443)
LARGE_EDGE = [1050.0, 230.0, 1250.0, 430.0]


def test_multi_face_policies(caplog):
    faces = FakeDetector([LARGE_EDGE, T1_BOX, SMALL_CENTRAL])
    res = Preprocessor(detector=faces, multi_face="largest")(T1)
    np.testing.assert_allclose(res.box, LARGE_EDGE)
    assert res.n_faces == 3
    res = Preprocessor(detector=faces, multi_face="central")(T1)
    np.testing.assert_allclose(res.box, SMALL_CENTRAL)
    pre = Preprocessor(detector=faces, multi_face="skip")
    with caplog.at_level(logging.WARNING):
        assert pre(T1, source="t1") is None
    assert "3 faces" in pre.skipped["t1"] and any("t1" in r.getMessage() for r in caplog.records)
    with pytest.raises(NoFaceError, match="3 faces"):
        Preprocessor(detector=faces, multi_face="error")(T1)
    with pytest.raises(ValueError, match="allowed|one of"):
        Preprocessor(multi_face="biggest")


def test_no_face_and_box_matching(caplog):
    pre = Preprocessor(detector=FakeDetector([]))
    with caplog.at_level(logging.WARNING):
        assert pre(T1, source="empty") is None
    assert pre.skipped == {"empty": "the detector found no face"}
    with pytest.raises(NoFaceError, match="no face"):
        Preprocessor(detector=FakeDetector([]), no_face="error")(T1)
    # A given box picks the overlapping detection's landmarks and keeps the given box for FaRL.
    faces = FakeDetector([LARGE_EDGE, T1_BOX + 4.0])
    res = Preprocessor(detector=faces)(T1, box=T1_BOX)
    np.testing.assert_allclose(res.kps, kps_from_box(T1_BOX + 4.0), atol=1e-4)
    np.testing.assert_allclose(res.box, T1_BOX)
    pre = Preprocessor(detector=faces)
    assert pre(T1, box=[10.0, 10.0, 60.0, 60.0], source="nomatch") is None
    assert "IoU" in pre.skipped["nomatch"]


def test_farl_from_face_image_is_clip_preprocessing():
    from torchvision import transforms as T

    img = load_image(T1)[200:500, 600:1000]  # 300 x 400, not square
    clip = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                      T.Normalize(CLIP_MEAN, CLIP_STD)])
    expected = clip(Image.fromarray(img)).numpy()
    got = farl_from_face_image(img)
    assert got.shape == (3, 224, 224)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    crop = np.clip(np.rint(farl_crop_image(load_image(T1), T1_BOX)), 0, 255).astype(np.uint8)
    expected224 = clip(Image.fromarray(crop)).numpy()  # a 224 crop passes unchanged
    np.testing.assert_allclose(farl_from_face_image(crop), expected224, atol=1e-5)


def _make_folder(tmp_path: Path) -> Path:
    src = tmp_path / "photos"
    (src / "actorA").mkdir(parents=True)
    Image.fromarray(load_image(TOM)).save(src / "actorA" / "tom.png")
    Image.fromarray(load_image(T1)).save(src / "actorA" / "group.jpg", quality=95)
    return src


def test_run_preprocess_writes_the_mica_layout(tmp_path):
    src = _make_folder(tmp_path)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"actorA/tom.png": {"kps": arcface_template().tolist()},
                               "actorA/group.jpg": {"box": T1_BOX.tolist()}}))
    out = tmp_path / "arcface_input"
    report = run_preprocess(input_dir=src, output_dir=out, annotations=ann, kps_from_box=True)
    assert sorted(report["processed"]) == ["actorA/group.jpg", "actorA/tom.png"] and not report["skipped"]
    blob = np.load(out / "actorA" / "tom.npy")
    farl = np.load(out / "actorA" / "tom_farl.npy")
    direct = preprocess_image(src / "actorA" / "tom.png", kps=arcface_template())
    np.testing.assert_array_equal(blob, direct.arcface)
    np.testing.assert_array_equal(farl, direct.farl)
    crop = load_image(out / "actorA" / "group.jpg")  # the 224 FaRL crop image (OFER's arcface_input jpg)
    assert crop.shape == (224, 224, 3)
    assert np.abs(farl_from_face_image(crop) - np.load(out / "actorA" / "group_farl.npy")).mean() < 0.05  # jpeg
    saved = json.loads((out / "preprocess_report.json").read_text())
    np.testing.assert_allclose(saved["processed"]["actorA/group.jpg"]["box"], T1_BOX)


def test_run_preprocess_errors_and_skips(tmp_path):
    src = _make_folder(tmp_path)
    (src / "actorA" / "broken.jpg").write_bytes(T1.read_bytes()[:5000])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"actorA/tom.png": {"kps": arcface_template().tolist()},
                               "actorA/group.jpg": {"box": T1_BOX.tolist()},
                               "actorA/broken.jpg": {"box": T1_BOX.tolist()}}))
    with pytest.raises(ImageReadError, match=r"broken\.jpg"):
        run_preprocess(input_dir=src, output_dir=tmp_path / "o1", annotations=ann, kps_from_box=True)
    report = run_preprocess(input_dir=src, output_dir=tmp_path / "o2", annotations=ann, kps_from_box=True,
                            unreadable="skip")
    assert list(report["unreadable"]) == ["actorA/broken.jpg"] and len(report["processed"]) == 2
    # No landmarks and no detector: a clear error, not a silent skip.
    with pytest.raises(DetectorUnavailableError):
        run_preprocess(input_dir=src, output_dir=tmp_path / "o3", unreadable="skip")
    bad_ann = tmp_path / "bad.json"
    bad_ann.write_text(json.dumps({"actorA/ghost.jpg": {"box": [0, 0, 1, 1]}}))
    with pytest.raises(ValueError, match="ghost.jpg"):
        run_preprocess(input_dir=src, output_dir=tmp_path / "o4", annotations=bad_ann)


def test_now_boxes_and_the_hydra_config(tmp_path):
    from hydra import compose, initialize_config_dir

    import ofer

    src = _make_folder(tmp_path)
    boxes = tmp_path / "detected_face" / "actorA"
    boxes.mkdir(parents=True)
    np.save(boxes / "group.npy", {"left": 745.0, "top": 320.0, "right": 870.0, "bottom": 460.0}, allow_pickle=True)
    np.save(boxes / "tom.npy", {"left": 0.0, "top": 0.0, "right": 112.0, "bottom": 112.0}, allow_pickle=True)
    np.testing.assert_allclose(load_now_box(boxes / "group.npy"), T1_BOX)
    out = tmp_path / "out"
    with initialize_config_dir(config_dir=str(ofer.REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("preprocess", overrides=[f"input_dir={src}", f"output_dir={out}", "detector.enabled=false",
                                               f"boxes_dir={tmp_path / 'detected_face'}", "kps_from_box=true"])
    report = run_preprocess_from_config(cfg)
    np.testing.assert_allclose(report["processed"]["actorA/group.jpg"]["box"], T1_BOX)
    assert (out / "actorA" / "group.npy").is_file() and (out / "actorA" / "tom_farl.npy").is_file()
    assert report["settings"]["farl_box_scale"] == 1.6
