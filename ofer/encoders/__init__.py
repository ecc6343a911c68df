"""Image encoders: ArcFace (identity), FaRL (appearance/expression), and a synthetic stand-in.

Every encoder is an ``nn.Module`` with ``forward(images) -> (B, 512)`` and these attributes:
``name`` (str), ``slot`` (``"arcface"`` or ``"farl"``: which preprocessed input it takes),
``input_size`` (112 or 224), ``out_dim`` (512), ``normalized`` (unit-norm output),
``is_random`` (deliberately random weights), ``synthetic_only`` and ``weights_id`` (a string
that identifies the weights, used in feature-cache keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ofer.encoders.arcface import ArcFaceEncoder
from ofer.encoders.common import MissingWeightsError, WeightsMismatchError
from ofer.encoders.farl import FaRLEncoder
from ofer.encoders.iresnet import IResNet, iresnet, iresnet50, iresnet100
from ofer.encoders.pixel import PixelEncoder

__all__ = [
    "ArcFaceEncoder",
    "ENCODER_NAMES",
    "FaRLEncoder",
    "IResNet",
    "MissingWeightsError",
    "PixelEncoder",
    "WeightsMismatchError",
    "build_encoder",
    "build_encoders",
    "iresnet",
    "iresnet50",
    "iresnet100",
]

ENCODER_NAMES = ("arcface", "farl", "pixel")
_NATIVE_SLOT = {"arcface": "arcface", "farl": "farl"}


def _to_dict(cfg: Any) -> dict[str, Any]:
    from omegaconf import Container, DictConfig, OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    if isinstance(cfg, DictConfig):
        out: dict[str, Any] = {}
        for key in cfg:
            try:
                value = cfg[key]
            except (MissingMandatoryValue, InterpolationToMissingValueError):
                # `???` itself or an interpolation to it (e.g. ${paths.arcface_weights}): the
                # encoder turns it into an error that says which file and where to get it.
                value = "???"
            out[str(key)] = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
        return out
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"encoder config must be a mapping, got {type(cfg).__name__}")


def build_encoder(cfg: Mapping[str, Any] | Any, *, slot: str | None = None) -> nn.Module:
    """Build an encoder from a ``configs/encoder/*.yaml`` node.

    Args:
        cfg: mapping with ``name`` in ``{"arcface", "farl", "pixel"}`` and that encoder's
            keyword arguments (``weights``, ``arch``, ``freeze``, ``slot``, ...).
        slot: the slot being filled (``"arcface"`` or ``"farl"``). Required for ``pixel``
            unless the config sets ``slot``; checked against the encoder for the others.

    An unset weights path (``???``) reaches the encoder as ``"???"`` and raises its
    ``MissingWeightsError`` (which names the file, where to get it and the config key).
    """
    kwargs = _to_dict(cfg)
    name = kwargs.pop("name", None)
    if name not in ENCODER_NAMES:
        raise ValueError(f"encoder config: unknown name {name!r}; allowed: {list(ENCODER_NAMES)}")
    cfg_slot = kwargs.pop("slot", None)
    if name == "pixel":
        chosen = slot or cfg_slot
        if chosen is None:
            raise ValueError("encoder config 'pixel' needs a slot ('arcface' or 'farl'): pass slot= or set encoder.slot")
        if slot is not None and cfg_slot is not None and slot != cfg_slot:
            raise ValueError(f"pixel encoder config has slot={cfg_slot!r} but is built for slot {slot!r}")
        return PixelEncoder(slot=chosen, **kwargs)
    native = _NATIVE_SLOT[name]
    for requested in (slot, cfg_slot):
        if requested is not None and requested != native:
            raise ValueError(f"encoder {name!r} fills the {native!r} slot, not {requested!r}")
    if name == "arcface":
        return ArcFaceEncoder(**kwargs)
    return FaRLEncoder(**kwargs)


def build_encoders(cfg: Mapping[str, Any] | Any, slots: tuple[str, ...] = ("arcface", "farl")) -> dict[str, nn.Module]:
    """Build ``{slot: encoder}`` from a node with one encoder config per slot (``cfg.arcface``, ``cfg.farl``)."""
    nodes = _to_dict(cfg)
    missing = [s for s in slots if s not in nodes]
    if missing:
        raise KeyError(f"encoders config lacks slots {missing}; has {sorted(nodes)}")
    return {s: build_encoder(nodes[s], slot=s) for s in slots}
