"""Train ExpGen (FLAME expression + jaw diffusion conditioned on ArcFace + FaRL). See configs/train_expgen.yaml."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="train_expgen", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.jobs import train_generator

    train_generator(cfg)


if __name__ == "__main__":
    main()
