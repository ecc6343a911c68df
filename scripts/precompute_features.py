"""Encode every image of the selected datasets once with frozen encoders into the feature cache."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="precompute_features", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.data.features import run_precompute

    run_precompute(cfg)


if __name__ == "__main__":
    main()
