"""On-disk cache of frozen-encoder features, and a dataset wrapper that serves them.

With frozen encoders every image is encoded once (batched, on the GPU when available, bf16
optional) instead of at every step. Layout, per dataset::

    <cache_dir>/<dataset name>/<slot>__<encoder name>__<key digest>.npy   (N, 512) float32
    <cache_dir>/<dataset name>/<slot>__<encoder name>__<key digest>.json  manifest

The key is (slot, encoder name, weights id = sha256 of the weights file or a digest of random/
pixel weights, the dataset's input spec = preprocessing settings). The manifest records the key,
the image list and a fingerprint (path, size, mtime) of every input file. Loading re-checks all of
it and raises ``StaleCacheError`` on any difference (other key, image count or names, missing or
modified inputs): a stale cache is never used silently.

Datasets used here implement the image-source interface of ``ofer.data.datasets``: ``name``,
``image_keys``, ``input_file(i, slot)``, ``load_input(i, slot)``, ``input_spec(slot)``, and items
with ``image_ids (K,)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_LISTED = 1000  # paths listed in one error; the count is always given


class StaleCacheError(RuntimeError):
    """A feature cache is missing, for another key, or out of date with the dataset."""


@dataclass(frozen=True)
class CacheKey:
    """What the cached features depend on."""

    slot: str
    encoder: str
    weights: str
    inputs: str  # canonical JSON of the dataset's input spec for the slot

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = json.loads(self.inputs)
        return d


def cache_key(dataset: Any, encoder: nn.Module, *, slot: str) -> CacheKey:
    """The key of ``encoder``'s features of ``dataset``'s ``slot`` inputs."""
    enc_slot = getattr(encoder, "slot", None)
    if enc_slot != slot:
        raise ValueError(f"encoder {getattr(encoder, 'name', type(encoder).__name__)} fills slot {enc_slot!r}, not {slot!r}")
    spec = json.dumps(dataset.input_spec(slot), sort_keys=True)
    return CacheKey(slot=slot, encoder=str(encoder.name), weights=str(encoder.weights_id), inputs=spec)


def cache_paths(cache_dir: str | Path, dataset_name: str, key: CacheKey) -> tuple[Path, Path]:
    """(features .npy, manifest .json) for a key."""
    stem = f"{key.slot}__{key.encoder}__{key.digest()}"
    folder = Path(cache_dir).expanduser() / dataset_name
    return folder / f"{stem}.npy", folder / f"{stem}.json"


def input_fingerprints(dataset: Any, slot: str) -> tuple[list[list[Any]], list[str]]:
    """([[input file, size, mtime_ns], ...] over all images, missing files (absolute))."""
    # Paths relative to the dataset root, so a dataset moved with its cache (mtimes kept, e.g.
    # rsync -a) stays valid.
    root = Path(getattr(dataset, "root", "/"))
    rows: list[list[Any]] = []
    missing: list[str] = []
    for i in range(len(dataset.image_keys)):
        path = Path(dataset.input_file(i, slot))
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            missing.append(str(path))
            rows.append([name, -1, -1])
            continue
        rows.append([name, int(st.st_size), int(st.st_mtime_ns)])
    return rows, missing


def _atomic_write_bytes(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


class _Inputs(Dataset):
    def __init__(self, dataset: Any, slot: str) -> None:
        self.dataset, self.slot = dataset, slot

    def __len__(self) -> int:
        return len(self.dataset.image_keys)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.dataset.load_input(i, self.slot))


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def precompute_features(
    dataset: Any,
    encoder: nn.Module,
    *,
    cache_dir: str | Path,
    slot: str | None = None,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    bf16: bool = False,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Encode every image of ``dataset`` once and write the cache; returns the .npy path.

    Args:
        dataset: an image source (``MicaDataset``/``FamosDataset``).
        encoder: a frozen encoder (run in eval mode, no gradients).
        slot: ``"arcface"``/``"farl"``; defaults to ``encoder.slot``.
        bf16: autocast to bfloat16 (features are stored as float32; the precision is recorded).
        overwrite: recompute even when a valid cache exists.

    A valid existing cache is kept (logged) unless ``overwrite``; a stale one is recomputed
    (logged). The encoder is moved to ``device`` and left there, in its original train/eval mode.
    """
    slot = slot or encoder.slot
    key = cache_key(dataset, encoder, slot=slot)
    feat_path, manifest_path = cache_paths(cache_dir, dataset.name, key)
    if not overwrite and manifest_path.exists():
        try:
            load_features(dataset, encoder, slot=slot, cache_dir=cache_dir)
            log.info("feature cache %s is up to date; not recomputed", feat_path)
            return feat_path
        except StaleCacheError as exc:
            log.warning("recomputing stale feature cache: %s", exc)
    files, missing = input_fingerprints(dataset, slot)
    if missing:
        raise StaleCacheError(f"{dataset.name}: {len(missing)} input files missing, cannot compute features: {missing[:_LISTED]}")
    n = len(files)
    dev = resolve_device(device)
    was_training = encoder.training
    encoder.eval().to(dev)
    out = np.empty((n, int(encoder.out_dim)), dtype=np.float32)
    loader = DataLoader(_Inputs(dataset, slot), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=dev.type == "cuda")
    t0, done = time.time(), 0
    with torch.inference_mode(), torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bf16):
        for batch in loader:
            feats = encoder(batch.to(dev, non_blocking=True)).float().cpu().numpy()
            out[done:done + len(feats)] = feats
            done += len(feats)
    encoder.train(was_training)
    if done != n:
        raise RuntimeError(f"encoded {done} images, expected {n}")
    log.info("encoded %d %s inputs of %s with %s in %.1fs on %s", n, slot, dataset.name, encoder.name, time.time() - t0, dev)
    feat_path.parent.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": CACHE_FORMAT_VERSION,
        "key": key.as_dict(),
        "digest": key.digest(),
        "dataset": dataset.name,
        "count": n,
        "dim": int(out.shape[1]),
        "precision": "bf16" if bf16 else "fp32",
        "is_random": bool(getattr(encoder, "is_random", False)),
        "synthetic_only": bool(getattr(encoder, "synthetic_only", False)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "image_keys": list(dataset.image_keys),
        "files": files,
    }
    # Features first, manifest last: a crash in between leaves no manifest, i.e. no valid cache.
    if manifest_path.exists():
        manifest_path.unlink()
    _atomic_write_bytes(feat_path, lambda f: np.save(f, out))
    _atomic_write_bytes(manifest_path, lambda f: f.write(json.dumps(manifest).encode()))
    return feat_path


def _describe_other_caches(folder: Path, slot: str) -> str:
    others = []
    for m in sorted(folder.glob(f"{slot}__*.json")):
        try:
            k = json.loads(m.read_text()).get("key", {})
            others.append(f"{m.name}: encoder={k.get('encoder')} weights={k.get('weights')} inputs={k.get('inputs')}")
        except (OSError, json.JSONDecodeError):
            others.append(f"{m.name}: unreadable manifest")
    return ("; caches present for other keys: " + " | ".join(others)) if others else "; no cache for this slot exists there"


def load_features(
    dataset: Any, encoder: nn.Module, *, slot: str | None = None, cache_dir: str | Path, check_files: bool = True
) -> np.ndarray:
    """Cached features (N, D) of ``dataset`` for ``encoder``, after checking they are current.

    Args:
        check_files: compare size/mtime of every input file with the manifest.

    Raises:
        StaleCacheError: missing cache, other key, different image list or count, missing or
            modified input files, or a malformed features file.
    """
    slot = slot or encoder.slot
    key = cache_key(dataset, encoder, slot=slot)
    feat_path, manifest_path = cache_paths(cache_dir, dataset.name, key)
    fix = (" Recompute with scripts/precompute_features.py (overwrite=true), or call "
           "ofer.data.features.precompute_features(..., overwrite=True).")
    if not manifest_path.exists() or not feat_path.exists():
        raise StaleCacheError(
            f"no feature cache for dataset {dataset.name}, slot {slot}, encoder {key.encoder}, weights {key.weights} "
            f"(expected {manifest_path})" + _describe_other_caches(manifest_path.parent, slot) + "." + fix
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StaleCacheError(f"unreadable cache manifest {manifest_path}: {exc}.{fix}") from exc
    if manifest.get("format_version") != CACHE_FORMAT_VERSION:
        raise StaleCacheError(f"{manifest_path}: cache format {manifest.get('format_version')}, expected {CACHE_FORMAT_VERSION}.{fix}")
    if manifest.get("key") != key.as_dict():
        raise StaleCacheError(f"{manifest_path}: key {manifest.get('key')} differs from the expected {key.as_dict()}.{fix}")
    cached_keys = manifest.get("image_keys", [])
    keys = list(dataset.image_keys)
    if len(cached_keys) != len(keys):
        raise StaleCacheError(
            f"{manifest_path}: cache has {len(cached_keys)} images, dataset {dataset.name} has {len(keys)}.{fix}")
    diff = [f"#{i}: cache {a!r} vs dataset {b!r}" for i, (a, b) in enumerate(zip(cached_keys, keys)) if a != b]
    if diff:
        raise StaleCacheError(f"{manifest_path}: {len(diff)} image names differ from the dataset: {diff[:_LISTED]}.{fix}")
    if check_files:
        files, missing = input_fingerprints(dataset, slot)
        if missing:
            raise StaleCacheError(f"{manifest_path}: {len(missing)} input files are missing now: {missing[:_LISTED]}.{fix}")
        changed = [f[0] for f, g in zip(files, manifest.get("files", [])) if f != g]
        if changed or len(manifest.get("files", [])) != len(files):
            raise StaleCacheError(
                f"{manifest_path}: {len(changed)} input files changed (size or modification time) since the cache "
                f"was written: {changed[:_LISTED]}.{fix}")
    try:
        feats = np.load(feat_path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StaleCacheError(f"cannot read cached features {feat_path}: {exc}.{fix}") from exc
    if feats.shape != (len(keys), manifest.get("dim")) or feats.dtype != np.float32:
        raise StaleCacheError(
            f"{feat_path}: features {feats.shape} {feats.dtype}, expected ({len(keys)}, {manifest.get('dim')}) float32.{fix}")
    return feats


class CachedFeatureDataset(Dataset):
    """Serves cached features instead of images.

    Args:
        dataset: a dataset built with ``inputs=()`` whose items carry ``image_ids (K,)``.
        features: ``{slot: (N, D) array}`` over the dataset's flat image list.

    Items are the wrapped dataset's items plus ``<slot>_feat (K, D)`` float32 per slot.
    """

    def __init__(self, dataset: Any, features: Mapping[str, np.ndarray]) -> None:
        if getattr(dataset, "inputs", ()):
            raise ValueError(
                f"{dataset.name}: build the wrapped dataset with inputs=() (it loads {list(dataset.inputs)} images otherwise)")
        n = len(dataset.image_keys)
        for slot, arr in features.items():
            if arr.ndim != 2 or arr.shape[0] != n:
                raise StaleCacheError(f"{dataset.name}: {slot} features have shape {arr.shape}, expected ({n}, D)")
        self.dataset = dataset
        self.features = dict(features)
        self.name = dataset.name

    @property
    def image_keys(self) -> list[str]:
        return self.dataset.image_keys

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        ids = item["image_ids"].numpy()
        for slot, arr in self.features.items():
            item[f"{slot}_feat"] = torch.from_numpy(np.asarray(arr[ids], dtype=np.float32))
        return item


def run_precompute(cfg: Mapping[str, Any] | Any) -> list[Path]:
    """Entry point of ``scripts/precompute_features.py`` (``configs/precompute_features.yaml``).

    Encodes every dataset of ``cfg.data`` with the encoders of ``cfg.encoders`` for ``cfg.slots``.
    """
    from ofer.data.datasets import build_dataset_from_config
    from ofer.encoders import build_encoder

    from omegaconf import DictConfig, OmegaConf

    slots: Sequence[str] = list(cfg["slots"])
    data = cfg["data"]
    entries = data["datasets"]
    encoders = {slot: build_encoder(cfg["encoders"][slot], slot=slot) for slot in slots}
    written: list[Path] = []
    for key in sorted(entries):
        entry = entries[key]
        if isinstance(entry, DictConfig):
            entry = OmegaConf.to_container(entry, resolve=True)
        ds = build_dataset_from_config(entry, inputs=(), key=key)
        for slot in slots:
            written.append(precompute_features(
                ds, encoders[slot], cache_dir=cfg["cache_dir"], slot=slot, batch_size=int(cfg["batch_size"]),
                device=cfg["device"], bf16=bool(cfg["bf16"]), num_workers=int(cfg["num_workers"]),
                overwrite=bool(cfg["overwrite"]),
            ))
    return written
