"""Cumulative error curve of NoW distances (as the benchmark's `cumulative_errors.py`)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ofer.meshio import atomic_write

__all__ = ["cumulative_error", "plot_cumulative_errors"]


def cumulative_error(errors: np.ndarray, nbins: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative percentage of errors, as the official `cumulative_error`.

    OFER: `np.histogram(errors, bins=100000)`; x = left bin edges, y = 100 * cumsum / N.

    Args:
        errors: any shape, flattened (mm).

    Returns:
        x (nbins,) bin left edges in mm, y (nbins,) percentage of errors in bins up to and including x's bin.
    """
    errors = np.asarray(errors, dtype=np.float64).ravel()
    if errors.size == 0:
        raise ValueError("no errors to plot")
    values, base = np.histogram(errors, bins=nbins)
    cumulative = 100.0 * np.cumsum(values).astype(np.float64) / float(errors.shape[0])
    return base[:-1], cumulative


def plot_cumulative_errors(
    methods: Mapping[str, Sequence[np.ndarray] | np.ndarray],
    out_path: str | os.PathLike,
    *,
    x_max: float = 10.0,
) -> Path:
    """Plot one cumulative error curve per method (x: error 0..x_max mm, y: % of scan vertices) to a PNG.

    Args:
        methods: name -> per-image distance arrays (pooled) or one flat array.
        out_path: image file to write (suffix selects the format; written atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, dists in methods.items():
        if isinstance(dists, np.ndarray):
            flat = dists.ravel()
        else:
            flat = np.hstack(list(dists)) if len(dists) else np.zeros(0)
        if flat.size == 0:  # nothing scored: keep the (empty) axes so the file still exists
            continue
        x, y = cumulative_error(flat)
        ax.plot(x, y, label=f"{name} (median {np.median(flat):.2f} mm)")
    ax.set_xlim([0, x_max])
    ax.set_xticks(np.arange(0, x_max + 1e-9, 1.0))
    ax.set_ylim([0, 100])
    ax.set_yticks(np.arange(0, 101, 20.0))
    ax.set_xlabel("Error [mm]", fontsize=12)
    ax.set_ylabel("Percentage", fontsize=12)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    out_path = Path(out_path)
    buf = io.BytesIO()
    fig.savefig(buf, format=out_path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return atomic_write(out_path, buf.getvalue())
