"""NoW benchmark scan-to-mesh error of a prediction folder; see ofer/eval/now.py and configs/eval_now.yaml."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="eval_now", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.eval.now import score_now_from_config

    report = score_now_from_config(cfg)
    if report.num_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
