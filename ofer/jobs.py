"""Assembly of the training jobs from their Hydra configs (the scripts in `scripts/` only call these).

Data flow with frozen encoders (the default, and what a sweep wants): every dataset image is encoded once
into the feature cache (`ofer.data.features`), and the jobs train from `<slot>_feat` vectors.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ofer.config import build_flame
from ofer.data.datasets import build_dataset_from_config
from ofer.data.features import StaleCacheError, load_features, precompute_features, resolve_device
from ofer.encoders import build_encoder
from ofer.models.unet1d import paddable
from ofer.tasks.generator import GeneratorTask
from ofer.training import seed_everything, train

log = logging.getLogger(__name__)

__all__ = ["ensure_synthetic_data", "cached_features", "feature_dataset", "image_feature_dataset", "train_generator",
           "training_copy", "train_idrank", "train_baseline", "run_dir_of"]


def run_dir_of(cfg: DictConfig) -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.output_dir)


def _entries(data_cfg: Any) -> dict[str, dict]:
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_container(data_cfg, resolve=True)
    return dict(data_cfg.get("datasets") or {})


def ensure_synthetic_data(paths: Any, *data_cfgs: Any) -> None:
    """Render the synthetic datasets that these data configs read from `paths.synthetic_dir`, if absent."""
    from ofer.synthetic.make import DEFAULT_DATASETS, ensure_datasets

    synth = Path(paths.synthetic_dir).resolve()
    wanted = {}
    for data_cfg in data_cfgs:
        for entry in _entries(data_cfg).values():
            if Path(entry.get("root", "")).resolve() == synth and entry.get("name") in DEFAULT_DATASETS:
                wanted[entry["name"]] = DEFAULT_DATASETS[entry["name"]]
    if wanted:
        flame = build_flame(paths)
        ensure_datasets(synth, flame, wanted)


def cached_features(data_cfg: Any, encoders: dict[str, torch.nn.Module], *, cache_dir: str | Path, device: str,
                    precompute_missing: bool, batch_size: int = 256) -> list[tuple[Any, dict[str, Any], float]]:
    """Every dataset of `data_cfg` (built once, inputs=()) with its cached features per slot, (re)computing a
    missing or stale cache when allowed. Returns (dataset, {slot: (N, D) array}, sampling weight) per entry."""
    out = []
    for key, entry in sorted(_entries(data_cfg).items()):
        ds = build_dataset_from_config(entry, inputs=(), key=key)
        feats = {}
        for slot, enc in encoders.items():
            try:
                feats[slot] = load_features(ds, enc, slot=slot, cache_dir=cache_dir)
            except StaleCacheError as err:
                if not precompute_missing:
                    raise
                log.info("feature cache of %s/%s: %s -> computing it", key, slot, str(err).split(".")[0])
                precompute_features(ds, enc, slot=slot, cache_dir=cache_dir, device=device, batch_size=batch_size,
                                    overwrite=True)
                feats[slot] = load_features(ds, enc, slot=slot, cache_dir=cache_dir)
        out.append((ds, feats, float(entry.get("weight", 1.0))))
    return out


def _cached(cfg: DictConfig, data_cfg: Any, slots: list[str], device: str) -> list[tuple[Any, dict, float]]:
    encoders = {s: build_encoder(cfg.encoders[s], slot=s) for s in slots}
    return cached_features(data_cfg, encoders, cache_dir=cfg.features.cache_dir, device=device,
                           precompute_missing=bool(cfg.features.precompute_missing),
                           batch_size=int(cfg.features.batch_size))


def feature_dataset(cfg: DictConfig, data_cfg: Any, slots: list[str], device: str) -> torch.utils.data.Dataset:
    """The mixer over `data_cfg` serving cached `<slot>_feat` features, computing the cache when allowed."""
    from ofer.data.datasets import MixedDataset
    from ofer.data.features import CachedFeatureDataset

    parts = _cached(cfg, data_cfg, slots, device)
    return MixedDataset([CachedFeatureDataset(ds, feats) for ds, feats, _ in parts], [w for _, _, w in parts])


def _device(cfg: DictConfig) -> str:
    return str(resolve_device(cfg.device))


def training_copy(model: torch.nn.Module, pad_widths: Any, device: str) -> torch.nn.Module:
    """The denoiser to train: its `padded(original_state_dict=True)` copy (widths rounded up to multiples of 8;
    the same function and the same training, zero gradients on the padding; checkpoints in the original layout)
    or the model itself. `pad_widths`: "auto" pads on CUDA when the model can be padded (a `Denoiser` with one
    norm group), true pads (an error if it cannot), false never. On an H100 a compiled bf16 IdGen step at
    65,536 rows took 27.2 instead of 29.0 ms padded, an eager one 58.7 instead of 79.6 ms (BENCHMARKS.md)."""
    setting = str(pad_widths).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"pad_widths must be auto, true or false, got {pad_widths!r}")
    can = paddable(model)
    if setting == "true" and not can:
        raise ValueError(f"pad_widths=true: only a Denoiser with groups=1 that is not already a padded copy can be "
                         f"padded, got {type(model).__name__} with groups={getattr(model, 'config', {}).get('groups')}"
                         f"{' (already padded)' if getattr(model, 'is_padded', False) else ''}; set pad_widths=false "
                         f"(or auto)")
    if setting == "true" or (setting == "auto" and can and str(device).startswith("cuda")):
        pad = model.padded(original_state_dict=True)
        log.info("training the padded copy of the denoiser (widths %s -> %s)", model.widths, pad.widths)
        return pad
    return model


def train_generator(cfg: DictConfig, *, run_dir: str | Path | None = None) -> Any:
    """IdGen (`job=idgen`) or ExpGen (`job=expgen`) training on the shared loop."""
    device = _device(cfg)
    seed_everything(int(cfg.seed))
    if cfg.get("synthetic", {}).get("ensure", True):
        ensure_synthetic_data(cfg.paths, cfg.data, cfg.get("eval_data"))
    slots = list(cfg.cond_slots)
    train_ds = feature_dataset(cfg, cfg.data, slots, device)
    eval_ds = feature_dataset(cfg, cfg.eval_data, slots, device) if cfg.get("eval_data") else None
    # Seed again right before the weights are drawn: building the data may or may not consume random numbers
    # (e.g. when the feature cache has to be computed first), and the initial weights must not depend on it.
    seed_everything(int(cfg.seed))
    model = training_copy(instantiate(cfg.model), cfg.get("pad_widths", "auto"), device)
    diffusion = instantiate(cfg.diffusion)
    flame = build_flame(cfg.paths)
    encoders_meta = {s: OmegaConf.to_container(cfg.encoders[s], resolve=True) for s in slots}
    task = GeneratorTask(
        name=str(cfg.job), model=model, diffusion=diffusion, dataset=train_ds, target=str(cfg.target),
        cond_keys=[f"{s}_feat" for s in slots], lr=float(cfg.trainer.lr), eval_dataset=eval_ds, flame=flame,
        eval_items=int(cfg.eval.num_items), eval_samples=int(cfg.eval.num_samples),
        eval_sampling=OmegaConf.to_container(cfg.eval.sampling, resolve=True),
        describe={"encoders": encoders_meta, "random_encoders": any(e.get("weights") == "random"
                                                                     for e in encoders_meta.values())},
    )
    diffusion.to(device)
    result = train(task, cfg.trainer, run_dir=Path(run_dir) if run_dir else run_dir_of(cfg), device=device,
                   resolved_config=OmegaConf.to_container(cfg, resolve=True), logger_cfg=cfg.logger)
    log.info("done: step %d, checkpoint %s, metrics %s", result.step, result.checkpoint, result.metrics)
    print(f"checkpoint: {result.checkpoint}")
    if result.metrics:
        print("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.metrics.items())))
    return result


def image_feature_dataset(cfg: DictConfig, data_cfg: Any, slots: list[str], device: str) -> Any:
    """Per-image items (`shape`, `<slot>_feat`, `key`) over every dataset of `data_cfg` (MICA layout)."""
    from torch.utils.data import ConcatDataset

    from ofer.tasks.ranker import ImageFeatureDataset

    parts = [ImageFeatureDataset(ds, feats) for ds, feats, _ in _cached(cfg, data_cfg, slots, device)]
    out = ConcatDataset(parts)
    out.keys = [k for p in parts for k in p.keys]  # type: ignore[attr-defined]
    return out


def _pool(cfg: DictConfig, ds: Any, name: str, idgen: torch.nn.Module, diffusion: Any, device: str) -> Any:
    """The stored candidate pool of `ds` (generated with the IdGen EMA weights when absent or stale)."""
    import functools

    from ofer.ranking import PoolDataset, ensure_pool
    from ofer.training.checkpoint import resolve_checkpoint_path

    sampling = OmegaConf.to_container(cfg.pool.sampling, resolve=True)
    sample_fn = functools.partial(diffusion.sample, idgen, dim=300, **sampling)

    def conds() -> torch.Tensor:
        return torch.stack([ds[i]["arcface_feat"] for i in range(len(ds))]).to(device)

    pool = ensure_pool(Path(cfg.pool.dir) / f"{name}.npz", sample_fn=sample_fn, conds=conds, image_keys=ds.keys,
                       idgen_checkpoint=resolve_checkpoint_path(cfg.idgen_ckpt), sampler=sampling, num_candidates=int(cfg.pool.num_candidates),
                       batch_images=int(cfg.pool.batch_images),
                       generator=torch.Generator(device=device).manual_seed(int(cfg.seed)), refresh=str(cfg.pool.refresh))
    return PoolDataset(pool, ds, key_fn=lambda item: item["key"])


def train_idrank(cfg: DictConfig, *, run_dir: str | Path | None = None) -> Any:
    """IdRank on stored candidate pools of a trained IdGen (`idgen_ckpt=...`)."""
    from ofer.pipeline import load_generator
    from ofer.tasks.ranker import RankerTask

    device = _device(cfg)
    seed_everything(int(cfg.seed))
    if cfg.get("synthetic", {}).get("ensure", True):
        ensure_synthetic_data(cfg.paths, cfg.data, cfg.get("eval_data"))
    idgen, diffusion, info = load_generator(cfg.idgen_ckpt, kind="idgen", device=device)
    flame = build_flame(cfg.paths)
    slots = ["arcface", "farl"]
    train_ds = _pool(cfg, image_feature_dataset(cfg, cfg.data, slots, device), "train", idgen, diffusion, device)
    eval_ds = None
    if cfg.get("eval_data"):
        eval_ds = _pool(cfg, image_feature_dataset(cfg, cfg.eval_data, slots, device), "eval", idgen, diffusion, device)
    del idgen
    cfg = cfg.copy()
    OmegaConf.set_struct(cfg, False)
    cfg.model.num_face_vertices = int(len(flame.face_mask("face")))  # stored in the checkpoint's config
    seed_everything(int(cfg.seed))  # initial weights independent of what building the data consumed
    model = instantiate(cfg.model)
    task = RankerTask(model=model, flame=flame, dataset=train_ds, lr=float(cfg.trainer.lr),
                      temperature=float(cfg.temperature), eval_dataset=eval_ds,
                      describe={"idgen_sha256": info["sha256"], "idgen_ckpt": info["path"]})
    result = train(task, cfg.trainer, run_dir=Path(run_dir) if run_dir else run_dir_of(cfg), device=device,
                   resolved_config=OmegaConf.to_container(cfg, resolve=True), logger_cfg=cfg.logger)
    print(f"checkpoint: {result.checkpoint}")
    if result.metrics:
        print("held-out: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(result.metrics.items()) if k.startswith("eval")))
    return result


def train_baseline(cfg: DictConfig, *, run_dir: str | Path | None = None) -> Any:
    """The deterministic MICA-style regressor on the shared loop (same data and feature cache as IdGen)."""
    from ofer.tasks.baseline import RegressionTask

    device = _device(cfg)
    seed_everything(int(cfg.seed))
    if cfg.get("synthetic", {}).get("ensure", True):
        ensure_synthetic_data(cfg.paths, cfg.data, cfg.get("eval_data"))
    train_ds = feature_dataset(cfg, cfg.data, ["arcface"], device)
    eval_ds = feature_dataset(cfg, cfg.eval_data, ["arcface"], device) if cfg.get("eval_data") else None
    seed_everything(int(cfg.seed))  # initial weights independent of what building the data consumed
    task = RegressionTask(model=instantiate(cfg.model), flame=build_flame(cfg.paths), dataset=train_ds,
                          lr=float(cfg.trainer.lr), face_weight=float(cfg.face_weight), eval_dataset=eval_ds)
    result = train(task, cfg.trainer, run_dir=Path(run_dir) if run_dir else run_dir_of(cfg), device=device,
                   resolved_config=OmegaConf.to_container(cfg, resolve=True), logger_cfg=cfg.logger)
    print(f"checkpoint: {result.checkpoint}")
    if "eval/face_error_mm" in result.metrics:
        print(f"held-out face error: {result.metrics['eval/face_error_mm']:.3f} mm")
    return result
