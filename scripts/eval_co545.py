"""CO-545-style evaluation of multi-sample identity predictions (SE, CSE, STD-S, ASD, ODE); see ofer/eval/co545.py."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="eval_co545", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.eval.co545 import evaluate_co545

    summary = evaluate_co545(cfg)
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
