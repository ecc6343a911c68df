"""Reconstruct faces with OFER: images -> ranked shape + expression hypotheses. See configs/reconstruct.yaml."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="reconstruct", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.reconstruct import reconstruct

    reconstruct(cfg)


if __name__ == "__main__":
    main()
