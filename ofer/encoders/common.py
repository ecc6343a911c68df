"""Shared helpers of the image encoders: resolving weight files, strict loading, digests.

Pretrained files are never downloaded. A missing file is an error that names the file, where
to get it and which config key to set; ``weights="random"`` is the only way to get a random
network, and it is logged and recorded (``encoder.is_random``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ofer.io import file_sha256  # noqa: F401  (re-exported for the encoders)

log = logging.getLogger(__name__)

RANDOM = "random"

# Values that mean "the user did not set the path" (``???`` is OmegaConf's MISSING marker; it
# only reaches us as a string when a config was resolved with ``throw_on_missing=False``).
_UNSET = (None, "", "???", "null", "None")


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file is unset or absent."""


class WeightsMismatchError(RuntimeError):
    """A weights file does not match the network key-for-key and shape-for-shape."""


def resolve_weights(weights: str | Path | None, *, what: str, config_key: str, how_to_get: str) -> Path | None:
    """Turn a ``weights`` argument into an existing file path, or ``None`` for ``"random"``.

    Args:
        weights: a path, ``"random"``, or an unset value (``None``, ``"???"``, ``""``).
        what: human name of the file, e.g. ``"ArcFace iresnet100 backbone.pth"``.
        config_key: the config key to set, e.g. ``"paths.arcface_weights"``.
        how_to_get: one sentence saying where to download the file.

    Raises:
        MissingWeightsError: when unset, missing, or a directory.
    """
    if isinstance(weights, str) and weights.strip().lower() == RANDOM:
        return None
    hint = (
        f"{how_to_get} Then set `{config_key}=/path/to/file` (Hydra override) or pass "
        f"`weights=/path/to/file`. For tests or the synthetic demo only, `weights=random` "
        f"builds a deliberately random network. Nothing is downloaded automatically."
    )
    if weights is None or (isinstance(weights, str) and weights.strip() in _UNSET):
        raise MissingWeightsError(f"{what}: no weights file given (got {weights!r}). {hint}")
    path = Path(weights).expanduser()
    if not path.exists():
        raise MissingWeightsError(f"{what}: file not found: {path}. {hint}")
    if not path.is_file():
        raise MissingWeightsError(f"{what}: {path} is not a file. {hint}")
    return path


def torch_load_state(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True`` and unwrap common containers.

    Accepts a plain state dict, ``{"state_dict": ...}`` and DDP's ``module.`` prefix.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # re-raised with the file name; torch's message is kept
        raise WeightsMismatchError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise WeightsMismatchError(
            f"weights file {path} does not hold a state dict (got {type(obj).__name__}); expected a "
            f"mapping of parameter names to tensors, possibly under 'state_dict'"
        )
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_state_strict(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str | Path,
    ignore: Callable[[str], bool] | None = None,
) -> None:
    """``module.load_state_dict(state, strict=True)`` with a readable report of every mismatch.

    Args:
        module: the network to fill.
        state: the state dict read from ``source``.
        source: file name used in the error message.
        ignore: keys of ``state`` for which this returns True are dropped before comparing
            (documented, deliberate exclusions such as FaRL's masked-image-modelling head).

    Raises:
        WeightsMismatchError: listing missing keys, unexpected keys and shape mismatches.
    """
    if ignore is not None:
        state = {k: v for k, v in state.items() if not ignore(k)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state[k].shape)} vs network {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        parts = [f"weights file {source} does not match {type(module).__name__}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_listing(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches: {_listing(wrong)}")
        raise WeightsMismatchError("\n  ".join(parts))
    module.load_state_dict(state, strict=True)


def state_digest(module: nn.Module) -> str:
    """Hex sha256 of a module's state (names, shapes, dtypes and values), CPU float bytes.

    Identifies random or synthetic weights in feature-cache keys: two networks with the same
    digest produce the same features.
    """
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def warn_random(what: str) -> None:
    """Log the one WARNING that every deliberately random encoder emits."""
    log.warning(
        "%s uses RANDOM weights (weights='random'): its features carry no face information. "
        "Use this only for tests and the synthetic demo; outputs record is_random=True.",
        what,
    )


def weights_identity(weights_path: str | Path | None, module: nn.Module) -> str:
    """Identity of an encoder's weights for cache keys: sha256 of the file, or a digest of the random state."""
    if weights_path is not None:
        return "sha256:" + file_sha256(weights_path)
    return "random:" + state_digest(module)[:16]
