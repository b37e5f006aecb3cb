"""`python -m kvexp [overrides]`: one experiment; `python -m kvexp -m a=1,2`: a sweep (Hydra multirun)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kvexp.callbacks import exit_on_user_error
from kvexp.config import normalize_overrides
from kvexp.report import format_table


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from kvexp.app import NonFiniteMetricError, train_or_eval  # torch loads here, not for --help

    try:
        summary = train_or_eval(cfg)
    except (ValueError, NonFiniteMetricError) as err:  # a user error or a failed run: one line, no traceback
        if HydraConfig.get().mode == RunMode.MULTIRUN:  # a sweep records the failed job itself
            raise
        exit_on_user_error(err, bool(HydraConfig.get().verbose))
    print(format_table(summary))
    return summary["objective"]  # what a sweeper (e.g. Optuna) optimizes: the task's main metric


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    main()
