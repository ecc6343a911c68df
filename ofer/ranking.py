"""IdRank training helpers: soft ranking targets, the ListNet loss, and cached candidate pools.

Targets and loss (OFER public code, `flameparamrank_model.py::compute_Softmaxlistnetloss`): for image b and
candidate i, the error e_bi is the mean L1 vertex error in millimetres between the candidate's and the ground
truth's front-face vertices (mean over vertices and x, y, z of |cand - gt|, i.e. the per-vertex L1 distance
divided by 3); the target is softmax_i(-e_bi / T) with T = 1; the loss is the cross-entropy of
softmax(logits) against that soft target (ListNet, top-1 probability form).

Candidate pools: the public code draws 100 fresh 1000-step IdGen samples for every training image at every
IdRank step. IdGen is frozen while IdRank trains, so we draw each image's candidates once (`generate_pools`),
store them with the hash of the IdGen checkpoint that made them (`save_pool`), and refuse a pool made by
another checkpoint (`load_pool(expect_hash=...)`); `ensure_pool` regenerates on request. This trades the
public code's endless fresh candidates for a fixed set per image (regenerate a pool, e.g. with another seed,
to refresh them).

Pool file: one uncompressed .npz written atomically (temp file + rename) holding `shapes` (I, N, D) float32,
`keys` (I,) unicode image keys, and `meta` (a JSON string: format version, IdGen checkpoint hash, sampler
settings, sizes). Everything loads with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ofer.io import file_sha256  # re-exported: pools are keyed by the IdGen checkpoint's hash

__all__ = [
    "ranking_targets", "listnet_loss", "ranking_metrics", "file_sha256", "generate_pools", "CandidatePool",
    "PoolError", "StalePoolError", "save_pool", "load_pool", "ensure_pool", "PoolDataset", "POOL_FORMAT_VERSION",
]

POOL_FORMAT_VERSION = 1
_REFRESH = ("never", "stale", "always")


# ----------------------------------------------------------------------------------------------------
# Targets and loss
# ----------------------------------------------------------------------------------------------------

def ranking_targets(cand_mm: Tensor, gt_mm: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-candidate errors and the soft ranking target.

    Args:
        cand_mm: candidates' front-face vertices, shape (B, N, Vf, 3), millimetres.
        gt_mm: ground-truth front-face vertices, shape (B, Vf, 3), millimetres.
        temperature: T > 0 of the target softmax (OFER: 1). Smaller T puts more mass on the best candidate
            (T -> 0: one-hot at the smallest error); larger T flattens it (T -> inf: uniform).

    Returns:
        errors (B, N): mean over the Vf vertices and the 3 coordinates of |cand - gt|, in mm (no alignment).
        target (B, N): softmax over the N candidates of -errors / T; rows sum to 1.
        Both are detached (the target is data, not a function of the network).
    """
    if cand_mm.ndim != 4 or cand_mm.shape[-1] != 3:
        raise ValueError(f"ranking_targets: cand_mm must have shape (B, N, Vf, 3), got {tuple(cand_mm.shape)}")
    B, N, Vf, _ = cand_mm.shape
    if gt_mm.shape != (B, Vf, 3):
        raise ValueError(f"ranking_targets: gt_mm must have shape ({B}, {Vf}, 3) to match cand_mm "
                         f"{tuple(cand_mm.shape)}, got {tuple(gt_mm.shape)}")
    if not (temperature > 0 and math.isfinite(temperature)):  # math: a Python test, no branch on a tensor when compiled
        raise ValueError(f"ranking_targets: temperature must be a finite number > 0, got {temperature}")
    with torch.no_grad():
        errors = (cand_mm - gt_mm.unsqueeze(1)).abs().mean(dim=(-2, -1))  # (B, N)
        target = torch.softmax(-errors / temperature, dim=-1)
    return errors, target


def listnet_loss(logits: Tensor, target: Tensor) -> Tensor:
    """ListNet loss: cross-entropy of softmax(logits) against a target distribution over candidates.

    loss_b = -sum_i target_bi * log_softmax(logits_b)_i. Its minimum over logits is the target's entropy,
    reached when logits = log(target) + any per-row constant (e.g. -errors / T). The gradient with respect to
    logit i is softmax_i - target_i.

    Args:
        logits: shape (B, N).
        target: shape (B, N), rows on the probability simplex.

    Returns:
        per-image loss, shape (B,).
    """
    if logits.ndim != 2 or target.shape != logits.shape:
        raise ValueError(f"listnet_loss: logits and target must both have shape (B, N); got logits "
                         f"{tuple(logits.shape)}, target {tuple(target.shape)}")
    return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1)


def ranking_metrics(logits: Tensor, errors: Tensor) -> dict[str, Tensor]:
    """Per-image ranking quality, for logging and evaluation.

    Args:
        logits: shape (B, N).
        errors: shape (B, N), e.g. from `ranking_targets`.

    Returns:
        dict of (B,) tensors: `chosen_error` (error of the argmax-logit candidate, what IdRank outputs),
        `best_error` (smallest error, the oracle), `mean_error` (average candidate), `top1` (1.0 where the
        chosen candidate is the best one), `regret` (chosen minus best).
    """
    if logits.ndim != 2 or errors.shape != logits.shape:
        raise ValueError(f"ranking_metrics: logits and errors must both have shape (B, N); got "
                         f"{tuple(logits.shape)} and {tuple(errors.shape)}")
    errors = errors.detach()
    chosen = errors.gather(1, logits.detach().argmax(dim=1, keepdim=True)).squeeze(1)
    best = errors.min(dim=1).values
    return {"chosen_error": chosen, "best_error": best, "mean_error": errors.mean(dim=1),
            "top1": (chosen <= best).to(errors.dtype), "regret": chosen - best}


# ----------------------------------------------------------------------------------------------------
# Pool generation
# ----------------------------------------------------------------------------------------------------

SampleFn = Callable[..., Tensor]


def generate_pools(
    sample_fn: SampleFn,
    conds: Tensor,
    *,
    num_candidates: int = 100,
    batch_images: int = 256,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw `num_candidates` candidates for each of `num_images` conditioning vectors, in batches.

    `sample_fn(cond_batch (b, C), num_samples=N, generator=generator) -> (b, N, D)` is called once per batch
    of `batch_images` consecutive rows of `conds`, in order; its keyword names are those of
    `GaussianDiffusion.sample`, so `functools.partial(diffusion.sample, ema_model, dim=300, **sampling_cfg)`
    is a valid sample_fn. (`generator` is only passed when given.) The same generator serves all batches, so
    for a fixed seed the pool also depends on `batch_images`.

    Args:
        sample_fn: the sampler closure (put the model in eval mode yourself).
        conds: conditioning vectors, shape (num_images, C); batches are sliced from it as given (same device).
        num_candidates: N, candidates per image (OFER: 100).
        batch_images: images per sample_fn call (each call samples batch_images * N vectors).
        generator: RNG handed to sample_fn.

    Returns:
        candidates, shape (num_images, N, D), float32 on the CPU; row i belongs to conds[i].
    """
    if conds.ndim != 2 or conds.shape[0] < 1:
        raise ValueError(f"generate_pools: conds must have shape (num_images >= 1, C), got {tuple(conds.shape)}")
    if num_candidates < 1 or batch_images < 1:
        raise ValueError(f"generate_pools: num_candidates and batch_images must be >= 1, got {num_candidates} "
                         f"and {batch_images}")
    kwargs: dict[str, Any] = {"num_samples": num_candidates}
    if generator is not None:
        kwargs["generator"] = generator
    out: list[Tensor] = []
    dim: int | None = None
    with torch.no_grad():
        for start in range(0, conds.shape[0], batch_images):
            batch = conds[start:start + batch_images]
            samples = sample_fn(batch, **kwargs)
            b = batch.shape[0]
            bad_dim = dim is not None and samples.ndim == 3 and samples.shape[2] != dim
            if samples.ndim != 3 or samples.shape[:2] != (b, num_candidates) or bad_dim:
                want = f"({b}, {num_candidates}, {dim if dim is not None else 'D'})"
                raise ValueError(f"generate_pools: sample_fn returned shape {tuple(samples.shape)} for images "
                                 f"[{start}, {start + b}), expected {want}")
            dim = samples.shape[2]
            out.append(samples.detach().to(device="cpu", dtype=torch.float32))
    pool = torch.cat(out, dim=0)
    if not bool(torch.isfinite(pool).all()):
        bad = torch.nonzero(~torch.isfinite(pool).reshape(pool.shape[0], -1).all(dim=1)).flatten()[:5].tolist()
        raise ValueError(f"generate_pools: sample_fn produced NaN/inf candidates (first images: {bad})")
    return pool


# ----------------------------------------------------------------------------------------------------
# Pool storage
# ----------------------------------------------------------------------------------------------------

class PoolError(ValueError):
    """A candidate pool file is missing, malformed or does not fit; the message names the file."""


class StalePoolError(PoolError):
    """The pool was made by another IdGen checkpoint / sampler, or lacks images the caller needs."""


@dataclass
class CandidatePool:
    """Cached IdGen candidates: `shapes[i]` (N, D) are the candidates of image `image_keys[i]`."""

    shapes: Tensor  # (I, N, D) float32, CPU
    image_keys: list[str]
    idgen_checkpoint_hash: str
    sampler: dict[str, Any]
    path: str = ""
    _rows: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self._rows:
            self._rows = {k: i for i, k in enumerate(self.image_keys)}

    @property
    def num_candidates(self) -> int:
        return int(self.shapes.shape[1])

    def __len__(self) -> int:
        return len(self.image_keys)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def candidates(self, key: str) -> Tensor:
        """The (N, D) candidates of one image."""
        row = self._rows.get(key)
        if row is None:
            raise KeyError(f"candidate pool {self.path or '<in memory>'} has no image key {key!r} "
                           f"({len(self)} keys, e.g. {self.image_keys[:3]}); regenerate the pool for this dataset")
        return self.shapes[row]


def _check_keys(image_keys: Sequence[str], num_images: int, where: str) -> list[str]:
    keys = list(image_keys)
    if len(keys) != num_images:
        raise PoolError(f"{where}: {len(keys)} image keys for {num_images} images")
    bad = [k for k in keys if not isinstance(k, str) or not k]
    if bad:
        raise PoolError(f"{where}: image keys must be non-empty strings, got {bad[:3]!r}")
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        dup = [k for k in keys if k in seen or seen.add(k)]
        raise PoolError(f"{where}: duplicate image keys {dup[:3]!r}")
    return keys


def save_pool(
    path: str | os.PathLike,
    shapes: Tensor | np.ndarray,
    *,
    idgen_checkpoint_hash: str,
    image_keys: Sequence[str],
    sampler: Mapping[str, Any],
) -> Path:
    """Write a candidate pool atomically (a temp file in the same folder, fsync, rename).

    On any failure nothing is left at `path` except the previous file, if there was one.

    Args:
        path: destination (.npz by convention).
        shapes: candidates, shape (num_images, N, D).
        idgen_checkpoint_hash: `file_sha256` of the IdGen checkpoint that generated them.
        image_keys: one unique key per image (e.g. the image path relative to the dataset root).
        sampler: the sampler settings used (JSON-serialisable), stored for the record and for staleness checks.

    Returns:
        the path written.
    """
    path = Path(path)
    arr = shapes.detach().cpu().numpy() if isinstance(shapes, Tensor) else np.asarray(shapes)
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise PoolError(f"save_pool {path}: shapes must have shape (num_images, N, D), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise PoolError(f"save_pool {path}: shapes contain NaN or inf")
    keys = _check_keys(image_keys, arr.shape[0], f"save_pool {path}")
    if not isinstance(idgen_checkpoint_hash, str) or not idgen_checkpoint_hash:
        raise PoolError(f"save_pool {path}: idgen_checkpoint_hash must be a non-empty string, got "
                        f"{idgen_checkpoint_hash!r}")
    meta = {
        "format_version": POOL_FORMAT_VERSION,
        "idgen_checkpoint_hash": idgen_checkpoint_hash,
        "sampler": dict(sampler),
        "num_images": int(arr.shape[0]),
        "num_candidates": int(arr.shape[1]),
        "dim": int(arr.shape[2]),
    }
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as err:
        raise PoolError(f"save_pool {path}: sampler settings must be JSON-serialisable ({err})") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, shapes=arr, keys=np.asarray(keys, dtype=np.str_), meta=np.asarray(meta_json))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_pool(
    path: str | os.PathLike,
    *,
    expect_hash: str | None = None,
    expect_keys: Sequence[str] | None = None,
) -> CandidatePool:
    """Read a pool written by `save_pool` and check it still fits.

    Args:
        path: the pool file.
        expect_hash: SHA-256 of the current IdGen checkpoint; a different stored hash means the pool was made
            by another checkpoint: StalePoolError naming both hashes.
        expect_keys: image keys the caller needs; each must be in the pool (extra pool keys are allowed):
            StalePoolError naming the missing keys.

    Returns:
        the pool (shapes as a CPU float32 tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"candidate pool not found: {path}; generate it with ofer.ranking.ensure_pool "
                                "(or generate_pools + save_pool)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("shapes", "keys", "meta") if k not in z.files]
            if missing:
                raise PoolError(f"candidate pool {path}: missing entries {missing}; found {sorted(z.files)}")
            shapes = np.asarray(z["shapes"])
            keys = [str(k) for k in z["keys"].tolist()]
            meta = json.loads(str(z["meta"]))
    except PoolError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise PoolError(f"cannot read candidate pool {path}: {err}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != POOL_FORMAT_VERSION:
        found = meta.get("format_version") if isinstance(meta, dict) else type(meta).__name__
        raise PoolError(f"candidate pool {path}: format_version {found!r}, expected {POOL_FORMAT_VERSION}")
    if shapes.ndim != 3 or shapes.dtype != np.float32:
        raise PoolError(f"candidate pool {path}: 'shapes' must be float32 (I, N, D), got {shapes.dtype} {shapes.shape}")
    keys = _check_keys(keys, shapes.shape[0], f"candidate pool {path}")
    stored = meta.get("idgen_checkpoint_hash")
    if expect_hash is not None and stored != expect_hash:
        raise StalePoolError(
            f"candidate pool {path} is stale: it was generated by IdGen checkpoint sha256 {stored}, but the "
            f"current checkpoint is sha256 {expect_hash}; regenerate it (ensure_pool(..., refresh='stale'))"
        )
    pool = CandidatePool(shapes=torch.from_numpy(shapes), image_keys=keys, idgen_checkpoint_hash=str(stored),
                         sampler=dict(meta.get("sampler", {})), path=str(path))
    if expect_keys is not None:
        absent = [k for k in expect_keys if k not in pool]
        if absent:
            raise StalePoolError(
                f"candidate pool {path} lacks {len(absent)} of the {len(list(expect_keys))} expected image keys "
                f"(e.g. {absent[:3]!r}); the pool has {len(keys)} keys (e.g. {keys[:3]!r}); regenerate it for "
                "this dataset"
            )
    return pool


def ensure_pool(
    path: str | os.PathLike,
    *,
    sample_fn: SampleFn,
    conds: Tensor | Callable[[], Tensor],
    image_keys: Sequence[str],
    idgen_checkpoint: str | os.PathLike,
    sampler: Mapping[str, Any],
    num_candidates: int = 100,
    batch_images: int = 256,
    generator: torch.Generator | None = None,
    refresh: str = "never",
) -> CandidatePool:
    """Load the pool at `path`, or generate and save it.

    A pool is current when its IdGen checkpoint hash, sampler settings and candidate count match and it holds
    every key of `image_keys`. A missing file is always generated.

    Args:
        refresh: "never": a non-current pool raises StalePoolError; "stale": a non-current pool is
            regenerated; "always": regenerate unconditionally (fresh candidates).
        conds: (num_images, C) conditioning rows in the order of `image_keys`, or a callable returning them
            (only called when generating, so computing features is skipped for a current pool).
        Others: see `generate_pools` and `save_pool`; `idgen_checkpoint` is the checkpoint file to hash.
    """
    if refresh not in _REFRESH:
        raise ValueError(f"ensure_pool: refresh={refresh!r}; allowed: {list(_REFRESH)}")
    path = Path(path)
    digest = file_sha256(idgen_checkpoint)
    sampler = dict(sampler)
    if path.is_file() and refresh != "always":
        try:
            pool = load_pool(path, expect_hash=digest, expect_keys=image_keys)
            # A JSON round trip normalises tuples to lists before comparing.
            if json.loads(json.dumps(sampler)) != pool.sampler or pool.num_candidates != num_candidates:
                raise StalePoolError(
                    f"candidate pool {path} is stale: made with sampler {pool.sampler} and {pool.num_candidates} "
                    f"candidates, asked for sampler {sampler} and {num_candidates}"
                )
            return pool
        except StalePoolError:
            if refresh == "never":
                raise
    cond_rows = conds() if callable(conds) else conds
    keys = list(image_keys)
    if cond_rows.ndim != 2 or cond_rows.shape[0] != len(keys):
        raise ValueError(f"ensure_pool: conds must have shape ({len(keys)}, C), one row per image key, got "
                         f"{tuple(cond_rows.shape)}")
    shapes = generate_pools(sample_fn, cond_rows, num_candidates=num_candidates, batch_images=batch_images,
                            generator=generator)
    save_pool(path, shapes, idgen_checkpoint_hash=digest, image_keys=keys, sampler=sampler)
    return load_pool(path, expect_hash=digest, expect_keys=keys)


class PoolDataset(torch.utils.data.Dataset):
    """A dataset wrapper that adds each item's cached candidates.

    `item = base_dataset[i]` must be a mapping (e.g. with `shape (300,)` ground truth and `arcface`/`farl`
    features or images); the result is a new dict with everything of `item` plus
    `candidates`: (N, D) float32, the pool row of `key_fn(item)`.

    Args:
        pool: a `CandidatePool` or the path of a pool file (loaded with `expect_hash`).
        base_dataset: map-style dataset of dict items.
        key_fn: item -> image key used when the pool was generated.
        expect_hash: see `load_pool` (only used when `pool` is a path).
        candidates_key: name of the added entry.
    """

    def __init__(
        self,
        pool: CandidatePool | str | os.PathLike,
        base_dataset: torch.utils.data.Dataset,
        key_fn: Callable[[Mapping[str, Any]], str],
        *,
        expect_hash: str | None = None,
        candidates_key: str = "candidates",
    ) -> None:
        self.pool = pool if isinstance(pool, CandidatePool) else load_pool(pool, expect_hash=expect_hash)
        self.base = base_dataset
        self.key_fn = key_fn
        self.candidates_key = candidates_key

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"PoolDataset: base dataset item {index} is a {type(item).__name__}, expected a dict")
        if self.candidates_key in item:
            raise KeyError(f"PoolDataset: base dataset item {index} already has a '{self.candidates_key}' entry; "
                           "pass another candidates_key")
        out = dict(item)
        out[self.candidates_key] = self.pool.candidates(self.key_fn(item))
        return out
