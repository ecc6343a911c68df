"""FaRL image encoder: open_clip's ViT-B-16-quickgelu image tower with FaRL weights.

FaRL (Zheng et al., CVPR 2022) ships ``FaRL-Base-Patch16-LAIONFace20M-ep64.pth``, a dict
``{"state_dict": {...}}`` in OpenAI-CLIP key names: ``visual.*`` (the image tower), the text
tower (``transformer.*``, ``token_embedding.weight``, ``positional_embedding``, ``ln_final.*``,
``text_projection``), ``logit_scale``, and the masked-image-modelling head of FaRL's pre-training
under ``visual.`` (``visual.lm_transformer.*``, ``visual.ln_lm.*``, ``visual.lm_head.*``,
``visual.mask_token``). open_clip keeps OpenAI's names for its ``VisionTransformer``, so the
``visual.`` part maps one-to-one after stripping the prefix (open_clip's own OpenAI loader,
``build_model_from_openai_state_dict``, loads these names unchanged). We load that part with
``strict=True`` after dropping only the documented MIM keys, and report anything else.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from ofer.encoders.common import (
    WeightsMismatchError,
    load_state_strict,
    resolve_weights,
    torch_load_state,
    warn_random,
    weights_identity,
)

log = logging.getLogger(__name__)

OPEN_CLIP_MODEL = "ViT-B-16-quickgelu"
FREEZE_MODES = ("all", "none")
FARL_HOW_TO_GET = (
    "Download `FaRL-Base-Patch16-LAIONFace20M-ep64.pth` from the FaRL GitHub release "
    "(https://github.com/FacePerceiver/FaRL#pre-trained-backbones)."
)
# FaRL's masked-image-modelling head (used only in its pre-training); deliberately not loaded.
MIM_PREFIXES = ("lm_transformer.", "ln_lm.", "lm_head.")
MIM_KEYS = ("mask_token",)


def is_farl_mim_key(key: str) -> bool:
    """True for keys (``visual.`` already stripped) of FaRL's MIM pre-training head."""
    return key in MIM_KEYS or key.startswith(MIM_PREFIXES)


class _DropOpenClipRandomInitNotice(logging.Filter):
    """open_clip logs "Model initialized randomly" on the root logger when ``pretrained=None``;
    we load FaRL weights right after (or log our own warning for ``weights="random"``), so that
    notice would only mislead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


def build_open_clip_visual() -> nn.Module:
    """A randomly initialised open_clip ``ViT-B-16-quickgelu`` image tower; never downloads."""
    import open_clip  # deferred: importing open_clip takes seconds

    notice_filter = _DropOpenClipRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(notice_filter)
    try:
        model = open_clip.create_model(OPEN_CLIP_MODEL, pretrained=None, load_weights=False)
    finally:
        root.removeFilter(notice_filter)
    return model.visual


def visual_state_from_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``visual.`` part of an OpenAI-CLIP-format state dict, prefix stripped."""
    return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}


class FaRLEncoder(nn.Module):
    """FaRL ViT-B/16 image features.

    Args:
        weights: path to the FaRL checkpoint, or ``"random"`` (logged; ``is_random`` True).
        freeze: ``"all"`` (frozen; cached features) or ``"none"`` (fine-tuned, as the public
            OFER code does with lr 1e-4).
        seed: seed of the random initialisation when ``weights="random"``.

    ``forward``: images (B, 3, 224, 224), RGB, CLIP-normalised -> (B, 512), not normalised.
    """

    input_size = 224
    out_dim = 512
    slot = "farl"
    normalized = False
    synthetic_only = False

    def __init__(self, *, weights: str | Path | None, freeze: str = "all", seed: int = 0) -> None:
        super().__init__()
        if freeze not in FREEZE_MODES:
            raise ValueError(f"FaRLEncoder: unknown freeze {freeze!r}; allowed: {list(FREEZE_MODES)}")
        path = resolve_weights(
            weights,
            what="FaRL weights (FaRL-Base-Patch16-LAIONFace20M-ep64.pth)",
            config_key="paths.farl_weights",
            how_to_get=FARL_HOW_TO_GET,
        )
        self.freeze = freeze
        self.weights_path = path
        self.is_random = path is None
        self.name = "farl-vitb16"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.visual = build_open_clip_visual()
        if path is None:
            warn_random("FaRLEncoder")
        else:
            self.load_farl_weights(path)
        if freeze == "all":
            self.visual.requires_grad_(False)

    def load_farl_weights(self, path: str | Path) -> None:
        """Load the image tower from a FaRL (OpenAI-CLIP-format) checkpoint, strictly.

        Only the ``visual.`` keys are used; of those, only FaRL's MIM head is skipped. Any other
        missing or unexpected key, or shape mismatch, raises ``WeightsMismatchError``.
        """
        path = Path(path)
        state = torch_load_state(path)
        visual = visual_state_from_clip(state)
        if not visual:
            raise WeightsMismatchError(
                f"FaRL weights file {path} has no 'visual.*' keys (found e.g. {sorted(state)[:8]}); "
                f"expected an OpenAI-CLIP-format state dict such as FaRL-Base-Patch16-LAIONFace20M-ep64.pth"
            )
        ignored = sorted(k for k in visual if is_farl_mim_key(k))
        load_state_strict(self.visual, visual, source=path, ignore=is_farl_mim_key)
        self.weights_path = path
        self.is_random = False
        self.__dict__.pop("weights_id", None)
        log.info(
            "FaRLEncoder: loaded %d image-tower tensors from %s (ignored %d MIM-head keys and %d non-visual keys)",
            len(visual) - len(ignored), path, len(ignored), len(state) - len(visual),
        )

    def train(self, mode: bool = True) -> FaRLEncoder:
        """A frozen tower stays in eval mode."""
        super().train(mode)
        if mode and self.freeze == "all":
            self.visual.eval()
        return self

    @cached_property
    def weights_id(self) -> str:
        """Identity of the weights for cache keys: sha256 of the file, or of the random state."""
        return weights_identity(self.weights_path, self.visual)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, 224, 224) CLIP-normalised RGB -> (B, 512), not normalised."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"FaRLEncoder expects (B, 3, 224, 224) CLIP-normalised crops, got {tuple(images.shape)}"
            )
        return self.visual(images)
