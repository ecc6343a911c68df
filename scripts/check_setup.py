"""Check the user's data/ folder: which licensed files are present, missing or malformed. See data/README.md."""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import ofer  # noqa: F401  (registers the config resolvers)


@hydra.main(config_path="../configs", config_name="check_setup", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from ofer.check_setup import MALFORMED, check_setup, format_report

    checks = check_setup(cfg)
    print(format_report(checks))
    sys.exit(1 if any(c.status == MALFORMED for c in checks) else 0)


if __name__ == "__main__":
    main()
