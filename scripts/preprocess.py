"""Preprocess photos into ArcFace blobs and FaRL crops (MICA arcface_input layout)."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="preprocess", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.data.preprocess import run_preprocess_from_config

    run_preprocess_from_config(cfg)


if __name__ == "__main__":
    main()
