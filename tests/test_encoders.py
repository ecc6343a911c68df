"""Encoders: arcface_torch key compatibility, forward semantics, freezing, FaRL loading, pixel encoder."""
from __future__ import annotations

import hashlib
import logging
import socket

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ofer.encoders import (
    ArcFaceEncoder,
    FaRLEncoder,
    MissingWeightsError,
    PixelEncoder,
    WeightsMismatchError,
    build_encoder,
    build_encoders,
    iresnet,
    iresnet50,
    iresnet100,
)


# ------------------------------------------------------------------------------------------------
# IResNet: key-for-key compatibility with arcface_torch
# ------------------------------------------------------------------------------------------------
def arcface_torch_expected_state(layers: list[int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of arcface_torch's IResNet state_dict, written out from its definition
    (recognition/arcface_torch/backbones/iresnet.py): every stage has stride 2, so block 0 of each
    stage has a downsample (conv1x1 + BN); fc is 512*7*7 -> 512; features is BatchNorm1d(512)."""
    exp: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, c: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            exp[f"{prefix}.{name}"] = (c,)
        exp[f"{prefix}.num_batches_tracked"] = ()

    exp["conv1.weight"] = (64, 3, 3, 3)
    bn("bn1", 64)
    exp["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            cin = inplanes if i == 0 else planes
            bn(f"{p}.bn1", cin)
            exp[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            bn(f"{p}.bn2", planes)
            exp[f"{p}.prelu.weight"] = (planes,)
            exp[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn3", planes)
            if i == 0:
                exp[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                bn(f"{p}.downsample.1", planes)
        inplanes = planes
    bn("bn2", 512)
    exp["fc.weight"] = (512, 512 * 7 * 7)
    exp["fc.bias"] = (512,)
    bn("features", 512)
    return exp


@pytest.mark.parametrize("factory,layers", [(iresnet50, [3, 4, 14, 3]), (iresnet100, [3, 13, 30, 3])])
def test_iresnet_state_dict_matches_arcface_torch(factory, layers):
    with torch.device("meta"):
        model = factory()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = arcface_torch_expected_state(layers)
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert got == expected


def _functional_iresnet(sd: dict[str, torch.Tensor], x: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """arcface_torch's IResNet forward in eval mode, written with torch.nn.functional on a state dict."""
    def bn(prefix, t):
        return F.batch_norm(t, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training=False, eps=1e-5)

    x = F.prelu(bn("bn1", F.conv2d(x, sd["conv1.weight"], padding=1)), sd["prelu.weight"])
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            stride = 2 if i == 0 else 1
            out = F.conv2d(bn(f"{p}.bn1", x), sd[f"{p}.conv1.weight"], padding=1)
            out = F.prelu(bn(f"{p}.bn2", out), sd[f"{p}.prelu.weight"])
            out = bn(f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1))
            identity = x if i else bn(f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=2))
            x = out + identity
    x = torch.flatten(bn("bn2", x), 1)
    x = F.linear(x, sd["fc.weight"], sd["fc.bias"])
    return bn("features", x)


def _randomize_stats(model: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif name.endswith(("running_mean", "bias")) or ("bn" in name and name.endswith("weight")) or "prelu" in name:
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def test_iresnet_forward_matches_functional_reference():
    layers = [2, 2, 2, 2]
    torch.manual_seed(0)
    model = iresnet("r18").eval()
    _randomize_stats(model)
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        ours = model(x)
        ref = _functional_iresnet(model.state_dict(), x, layers)
    assert ours.shape == (2, 512)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# ArcFaceEncoder
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def r18_file(tmp_path_factory):
    """A 'backbone.pth' of a randomly initialised arcface-style r18, with non-trivial BN statistics."""
    torch.manual_seed(1)
    model = iresnet("r18")
    _randomize_stats(model, seed=3)
    path = tmp_path_factory.mktemp("arcface") / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_arcface_loads_strict_and_normalises(r18_file):
    path, ref = r18_file
    enc = ArcFaceEncoder(weights=path, arch="r18", freeze="all").eval()
    x = torch.randn(3, 3, 112, 112)
    with torch.no_grad():
        got = enc(x)
        expected = F.normalize(ref(x), dim=-1)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3))
    assert not enc.is_random
    assert enc.weights_id == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_arcface_accepts_ddp_prefix_and_state_dict_wrapper(r18_file, tmp_path):
    path, ref = r18_file
    state = torch.load(path, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    enc = ArcFaceEncoder(weights=wrapped, arch="r18").eval()
    x = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), F.normalize(ref(x), dim=-1))


def test_arcface_reports_every_mismatch(r18_file, tmp_path):
    path, _ = r18_file
    state = torch.load(path, weights_only=True)
    del state["layer2.1.conv1.weight"]
    state["head.extra"] = torch.zeros(3)
    state["fc.bias"] = torch.zeros(7)
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(WeightsMismatchError) as err:
        ArcFaceEncoder(weights=bad, arch="r18")
    msg = str(err.value)
    assert str(bad) in msg and "layer2.1.conv1.weight" in msg and "head.extra" in msg
    assert "fc.bias: file (7,) vs network (512,)" in msg
    with pytest.raises(WeightsMismatchError, match="missing keys"):  # an r18 file is not an r50
        ArcFaceEncoder(weights=path, arch="r50")


@pytest.mark.parametrize("weights", [None, "???", "", "/nonexistent/backbone.pth"])
def test_arcface_missing_weights_says_what_where_and_which_key(weights):
    with pytest.raises(MissingWeightsError) as err:
        ArcFaceEncoder(weights=weights)
    msg = str(err.value)
    for needle in ("backbone.pth", "arcface_torch", "Glint360K", "paths.arcface_weights", "weights=random"):
        assert needle in msg
    if weights and weights.startswith("/"):
        assert weights in msg


def test_arcface_random_is_explicit_logged_and_seeded(caplog):
    with caplog.at_level(logging.WARNING):
        a = ArcFaceEncoder(weights="random", arch="r18", seed=7)
    assert a.is_random
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in caplog.records)
    b = ArcFaceEncoder(weights="random", arch="r18", seed=7)
    c = ArcFaceEncoder(weights="random", arch="r18", seed=8)
    assert a.weights_id == b.weights_id != c.weights_id
    assert a.weights_id.startswith("random:")


def test_arcface_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match="allowed"):
        ArcFaceEncoder(weights="random", freeze="layer3")
    with pytest.raises(ValueError, match="allowed"):
        ArcFaceEncoder(weights="random", arch="r101")
    enc = ArcFaceEncoder(weights="random", arch="r18")
    with pytest.raises(ValueError, match=r"\(B, 3, 112, 112\)"):
        enc(torch.zeros(1, 3, 224, 224))


def test_arcface_freeze_layer4_trains_only_the_head_and_works_at_batch_1():
    enc = ArcFaceEncoder(weights="random", arch="r18", freeze="layer4")
    bb = enc.backbone
    for name in ("conv1", "bn1", "prelu", "layer1", "layer2", "layer3"):
        assert not any(p.requires_grad for p in getattr(bb, name).parameters()), name
    for name in ("layer4", "bn2", "fc"):
        assert all(p.requires_grad for p in getattr(bb, name).parameters()), name
    assert bb.features.bias.requires_grad and not bb.features.weight.requires_grad

    enc.train()
    assert bb.layer4.training and bb.bn2.training
    assert not bb.layer1.training and not bb.layer3[0].bn1.training and not bb.features.training
    frozen_mean = bb.layer3[0].bn1.running_mean.clone()
    head_mean = bb.layer4[0].bn1.running_mean.clone()
    features_mean = bb.features.running_mean.clone()
    out = enc(torch.randn(1, 3, 112, 112))  # batch of one, train mode
    out[0, 0].backward()
    assert out.shape == (1, 512)
    assert bb.layer4[1].conv2.weight.grad is not None and bb.fc.weight.grad is not None
    assert bb.layer3[1].conv2.weight.grad is None
    torch.testing.assert_close(bb.layer3[0].bn1.running_mean, frozen_mean)
    torch.testing.assert_close(bb.features.running_mean, features_mean)
    assert not torch.equal(bb.layer4[0].bn1.running_mean, head_mean)  # the trainable part does train


def test_arcface_freeze_all_is_eval_even_in_train_mode(r18_file):
    path, _ = r18_file
    enc = ArcFaceEncoder(weights=path, arch="r18", freeze="all")
    assert not any(p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        train_out = enc.train()(x)
        eval_out = enc.eval()(x)
    torch.testing.assert_close(train_out, eval_out)


def test_arcface_freeze_none_batch_1_train():
    enc = ArcFaceEncoder(weights="random", arch="r18", freeze="none").train()
    out = enc(torch.randn(1, 3, 112, 112))
    out.sum().backward()
    assert enc.backbone.conv1.weight.grad is not None
    assert not enc.backbone.features.training


# ------------------------------------------------------------------------------------------------
# FaRLEncoder
# ------------------------------------------------------------------------------------------------
MIM_JUNK = {
    "visual.lm_transformer.resblocks.0.attn.in_proj_weight": (2304, 768),
    "visual.ln_lm.weight": (768,),
    "visual.lm_head.weight": (8192, 768),
    "visual.mask_token": (768,),
}


@pytest.fixture(scope="module")
def farl_checkpoint(tmp_path_factory):
    """A fake FaRL file: a random open_clip CLIP state dict (OpenAI key names: visual.*, text tower,
    logit_scale) plus FaRL's MIM-head keys, saved as {"state_dict": ...}; and that open_clip model."""
    import open_clip

    torch.manual_seed(123)
    ref = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None).eval()
    state = dict(ref.state_dict())
    assert "token_embedding.weight" in state and "visual.proj" in state  # OpenAI-format names
    for k, shape in MIM_JUNK.items():
        state[k] = torch.randn(shape)
    path = tmp_path_factory.mktemp("farl") / "FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
    torch.save({"state_dict": state}, path)
    return path, ref


@pytest.fixture(scope="module")
def farl_random():
    """FaRLEncoder(weights="random") and the log records of its construction."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        enc = FaRLEncoder(weights="random", freeze="none")
    finally:
        root.removeHandler(handler)
    return enc, records


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_farl_equals_open_clip_visual_tower(farl_checkpoint, no_network):
    import open_clip

    path, ref = farl_checkpoint
    enc = FaRLEncoder(weights=path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        got = enc(x)
        expected = ref.visual(x)
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not enc.is_random and not any(p.requires_grad for p in enc.parameters())  # freeze="all" default
    # open_clip's own checkpoint loader reads the same file to the same tower: scramble the reference
    # tower, reload it with open_clip.load_checkpoint, compare again.
    with torch.no_grad():
        for p in ref.visual.parameters():
            p.normal_()
    incompatible = open_clip.load_checkpoint(ref, str(path), strict=False)
    assert sorted(incompatible.unexpected_keys) == sorted(MIM_JUNK) and not incompatible.missing_keys
    with torch.no_grad():
        torch.testing.assert_close(got, ref.visual(x), rtol=0, atol=1e-5)


def test_farl_random_is_logged_and_flagged(farl_random):
    enc, records = farl_random
    assert enc.is_random and enc.weights_id.startswith("random:")
    assert any(r.levelno == logging.WARNING and "RANDOM" in r.getMessage() for r in records)
    assert not any("Model initialized randomly" in r.getMessage() for r in records)  # open_clip's notice is dropped
    assert all(p.requires_grad for p in enc.parameters())  # freeze="none"
    with pytest.raises(ValueError, match=r"\(B, 3, 224, 224\)"):
        enc(torch.zeros(1, 3, 112, 112))


def test_farl_reports_unexpected_and_missing_visual_keys(farl_random, farl_checkpoint, tmp_path):
    enc, _ = farl_random
    path, ref = farl_checkpoint
    state = {"visual." + k: v for k, v in ref.visual.state_dict().items()}
    del state["visual.ln_post.weight"]
    state["visual.adapter.weight"] = torch.zeros(2)
    state["visual.mask_token"] = torch.zeros(768)  # FaRL's MIM key: deliberately ignored
    state["text_only_junk"] = torch.zeros(1)  # outside visual.: not the image tower's business
    bad = tmp_path / "bad_farl.pth"
    torch.save({"state_dict": state}, bad)
    before = enc.visual.conv1.weight.clone()
    with pytest.raises(WeightsMismatchError) as err:
        enc.load_farl_weights(bad)
    msg = str(err.value)
    assert "1 missing keys: ln_post.weight" in msg and "1 unexpected keys: adapter.weight" in msg and str(bad) in msg
    assert "text_only_junk" not in msg and "mask_token" not in msg
    assert enc.is_random and torch.equal(enc.visual.conv1.weight, before)  # nothing half-loaded
    torch.save({"state_dict": {"transformer.x": torch.zeros(1)}}, bad)
    with pytest.raises(WeightsMismatchError, match="no 'visual.\\*' keys"):
        enc.load_farl_weights(bad)


@pytest.mark.parametrize("weights", [None, "???", "/nowhere/FaRL.pth"])
def test_farl_missing_weights_message(weights):
    with pytest.raises(MissingWeightsError) as err:
        FaRLEncoder(weights=weights)
    msg = str(err.value)
    for needle in ("FaRL-Base-Patch16-LAIONFace20M-ep64.pth", "github.com/FacePerceiver/FaRL", "paths.farl_weights"):
        assert needle in msg


# ------------------------------------------------------------------------------------------------
# PixelEncoder and build_encoder
# ------------------------------------------------------------------------------------------------
def test_pixel_projection_is_orthonormal_and_fixed():
    a, b = PixelEncoder(slot="arcface"), PixelEncoder(slot="arcface")
    q = a.projection.double()
    torch.testing.assert_close(q.T @ q, torch.eye(256, dtype=torch.float64), atol=1e-6, rtol=0)
    assert torch.equal(a.projection, b.projection) and a.weights_id == b.weights_id
    f = PixelEncoder(slot="farl")
    assert not torch.allclose(a.projection, f.projection) and a.weights_id != f.weights_id


def _standardised(v: np.ndarray) -> np.ndarray:
    v = v - v.mean()
    return v / np.sqrt((v ** 2).mean())


def test_pixel_encoder_matches_cv2_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
    enc = PixelEncoder(slot="arcface")
    blob = torch.from_numpy(((img.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1))[None]
    gray = cv2.cvtColor(img.astype(np.float32) / 255.0, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(gray, (16, 16), interpolation=cv2.INTER_AREA).reshape(-1)
    ref = _standardised(thumb) @ enc.projection.numpy().T
    ref = ref / np.linalg.norm(ref)
    np.testing.assert_allclose(enc(blob)[0].numpy(), ref, atol=1e-5)
    # The former map (contrast="none"): thumbnail minus 0.5.
    old = PixelEncoder(slot="arcface", contrast="none")
    ref_old = (thumb - 0.5) @ old.projection.numpy().T
    np.testing.assert_allclose(old(blob)[0].numpy(), ref_old / np.linalg.norm(ref_old), atol=1e-5)

    # FaRL slot: CLIP-normalised 224 input, same thumbnail pipeline, not L2-normalised: an isometry of the
    # standardised thumbnail, whose norm is grid = 16.
    img224 = cv2.resize(img, (224, 224), interpolation=cv2.INTER_NEAREST)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    farl_in = torch.from_numpy(((img224 / 255.0 - mean) / std).astype(np.float32).transpose(2, 0, 1))[None]
    fenc = PixelEncoder(slot="farl")
    out = fenc(farl_in)[0].numpy()
    gray224 = cv2.cvtColor(img224.astype(np.float32) / 255.0, cv2.COLOR_RGB2GRAY)
    thumb224 = _standardised(cv2.resize(gray224, (16, 16), interpolation=cv2.INTER_AREA).reshape(-1))
    np.testing.assert_allclose(out, thumb224 @ fenc.projection.numpy().T, atol=1e-4)
    assert abs(np.linalg.norm(out) - 16.0) < 1e-3
    with pytest.raises(ValueError, match="224"):
        fenc(blob)


def test_pixel_encoder_hand_made_image_and_options():
    # Left half black, right half white: every standardised thumbnail cell is -1 or +1 (mean 0.5, std 0.5).
    img = torch.full((1, 3, 112, 112), -1.0)
    img[..., 56:] = 1.0
    enc = PixelEncoder(slot="arcface")
    cells = torch.tensor([-1.0] * 8 + [1.0] * 8).repeat(16)
    torch.testing.assert_close(enc.centred(img)[0], cells)
    torch.testing.assert_close(enc(img)[0], enc.projection @ cells / 16.0, atol=1e-6, rtol=0)
    # A constant image has no pattern: zero feature, not NaN.
    assert torch.equal(enc(torch.full((1, 3, 112, 112), 0.3))[0], torch.zeros(512))
    assert enc.weights_id != PixelEncoder(slot="arcface", contrast="none").weights_id  # caches invalidate
    with pytest.raises(ValueError, match="allowed.*standardize"):
        PixelEncoder(slot="arcface", contrast="equalize")


def test_pixel_encoder_separates_identities_under_lighting():
    """Two faces (fixed smooth patterns), each photographed under two exposures a * img + b: the standardised map
    gives the same feature to both photos of a face and keeps the faces apart; the former map (thumbnail - 0.5)
    puts the two photos of a face further apart than two different faces under the same light."""
    gen = torch.Generator().manual_seed(0)
    faces = F.interpolate(torch.rand(2, 1, 8, 8, generator=gen), size=112, mode="bilinear", align_corners=False)
    lights = [(0.5, 0.1), (0.9, 0.05)]  # (gain, offset) in [0, 1] intensity; stays inside [0, 1]
    photos = torch.stack([(a * faces[i] + b).expand(3, -1, -1) for i in range(2) for a, b in lights]) * 2 - 1
    for contrast, same_smaller in (("standardize", True), ("none", False)):
        f = PixelEncoder(slot="arcface", contrast=contrast)(photos)  # face0@light0, face0@light1, face1@..
        same = max((f[0] - f[1]).norm(), (f[2] - f[3]).norm())
        other = min((f[0] - f[2]).norm(), (f[1] - f[3]).norm())
        assert bool(same < other) == same_smaller, (contrast, same.item(), other.item())
        if contrast == "standardize":
            assert same < 1e-5 and other > 0.3


def test_build_encoder_from_real_configs():
    from hydra import compose, initialize_config_dir

    import ofer

    with initialize_config_dir(config_dir=str(ofer.REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose("precompute_features")
        with pytest.raises(MissingWeightsError, match="paths.arcface_weights"):
            build_encoder(cfg.encoders.arcface, slot="arcface")  # paths.arcface_weights is ??? by default
        cfg = compose("precompute_features", overrides=["encoders.arcface.weights=random", "encoders.arcface.arch=r18",
                                                        "encoder@encoders.farl=pixel"])
        encs = build_encoders(cfg.encoders)
    assert isinstance(encs["arcface"], ArcFaceEncoder) and encs["arcface"].is_random and encs["arcface"].arch == "r18"
    assert encs["arcface"].freeze == "layer4"
    assert isinstance(encs["farl"], PixelEncoder) and encs["farl"].slot == "farl"
    with pytest.raises(ValueError, match="fills the 'arcface' slot"):
        build_encoder({"name": "arcface", "weights": "random"}, slot="farl")
    with pytest.raises(ValueError, match="allowed"):
        build_encoder({"name": "dino"}, slot="farl")
    with pytest.raises(ValueError, match="needs a slot"):
        build_encoder({"name": "pixel"})
