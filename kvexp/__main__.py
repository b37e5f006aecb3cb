"""`python -m kvexp [overrides]`: one experiment; `python -m kvexp -m a=1,2`: a sweep (Hydra multirun)."""

import sys

import hydra
from omegaconf import DictConfig

from kvexp.app import format_table, train_or_eval
from kvexp.config import normalize_overrides


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    summary = train_or_eval(cfg)
    print(format_table(summary))
    return summary["objective"]  # what a sweeper (e.g. Optuna) optimizes: the task's main metric


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    main()
