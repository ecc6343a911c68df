"""Shared fixtures. Tests run offline: no hub, no wandb; generated assets go to a per-session temp dir."""
from __future__ import annotations

import os
import shutil
import tempfile

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


def pytest_report_header(config):
    # The suite writes paper-size checkpoints (200-480 MB each) under the temp dir; a full disk shows up as a
    # CheckpointWriteError naming "No space left on device", and this line says how much room the run started with.
    where = config.option.basetemp or tempfile.gettempdir()
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    return f"temp dir {where}: {free / 1e9:.1f} GB free (a full run needs about 4 GB at its peak)"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
