"""Data: face preprocessing, dataset readers (MICA layout, OFER variant, FaMoS), feature cache."""

from __future__ import annotations

from ofer.data.datasets import (
    DatasetError,
    FamosDataset,
    FlameParams,
    FlameParamsError,
    MicaDataset,
    MixedDataset,
    build_dataset,
    build_dataset_from_config,
    load_flame_params,
    load_pickled_npy,
    parse_flame_params,
)
from ofer.data.features import (
    CachedFeatureDataset,
    StaleCacheError,
    load_features,
    precompute_features,
)
from ofer.data.preprocess import (
    DetectorUnavailableError,
    ImageReadError,
    InsightFaceDetector,
    Preprocessed,
    Preprocessor,
    load_image,
    preprocess_image,
)

__all__ = [
    "CachedFeatureDataset",
    "DatasetError",
    "DetectorUnavailableError",
    "FamosDataset",
    "FlameParams",
    "FlameParamsError",
    "ImageReadError",
    "InsightFaceDetector",
    "MicaDataset",
    "MixedDataset",
    "Preprocessed",
    "Preprocessor",
    "StaleCacheError",
    "build_dataset",
    "build_dataset_from_config",
    "load_features",
    "load_flame_params",
    "load_image",
    "load_pickled_npy",
    "parse_flame_params",
    "precompute_features",
    "preprocess_image",
]
