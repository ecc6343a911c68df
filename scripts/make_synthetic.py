"""Write the synthetic FLAME-format assets (data/synthetic/) and export a few sample meshes."""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="make_synthetic", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.synthetic.make import make_synthetic

    make_synthetic(cfg)


if __name__ == "__main__":
    main()
