"""Shared fixtures. Tests run offline: no hub, no wandb; generated assets go to a per-session temp dir."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic_flame(tmp_path_factory):
    """The synthetic FLAME files (FLAME2020 format with chumpy objects), generated once per session."""
    from ofer.synthetic import ensure_synthetic_flame

    return ensure_synthetic_flame(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def flame(synthetic_flame):
    from ofer.flame import FLAME

    return FLAME(synthetic_flame.flame_model, landmark_path=synthetic_flame.landmarks,
                 masks_path=synthetic_flame.masks)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
