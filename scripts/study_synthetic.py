"""Synthetic study of the paper's identity ablation. See configs/study_synthetic.yaml."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="study_synthetic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.study import run_study

    run_study(cfg)


if __name__ == "__main__":
    main()
