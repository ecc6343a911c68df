"""NoW benchmark scan-to-mesh error of a prediction folder, or of a model in one command (reconstruct the
benchmark's photos, score them, and the shape-pool ablation); see ofer/eval/now_model.py and
configs/eval_now.yaml."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="eval_now", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.eval.now_model import run_eval_now

    result = run_eval_now(cfg)
    if result.num_failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
