"""Train the deterministic MICA-style baseline. See configs/train_baseline.yaml."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="train_baseline", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.jobs import train_baseline

    train_baseline(cfg)


if __name__ == "__main__":
    main()
