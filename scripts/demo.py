"""The whole method end to end on synthetic data (make demo). See configs/demo.yaml."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.demo import run_demo

    run_demo(cfg)


if __name__ == "__main__":
    main()
