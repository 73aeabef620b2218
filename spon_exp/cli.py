"""The ``spon-exp`` console script: the only module that imports Hydra's app machinery."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from spon_exp.config import ConfigError, register_configs

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
log = logging.getLogger("spon_exp")

register_configs()


def _main(cfg: DictConfig) -> dict | None:
    from spon_exp.models.loading import ModelNotFoundError
    from spon_exp.runner import is_done, run, summary_table
    from spon_exp.tracking.files import RESULTS, read_json
    from spon_exp.tracking.identity import config_hash

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.skip_if_done and is_done(run_dir, config_hash(cfg)):
        log.info("Skipping %s: results.json there says ok for this config", run_dir)
        return read_json(run_dir / RESULTS)
    try:
        results = run(cfg, run_dir)
    except (ConfigError, ModelNotFoundError, FileExistsError) as e:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # let the launcher record this job as failed and go on with the others
        # a user error: one line, no traceback (results.json records it as failed)
        print(f"spon-exp: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(summary_table(results))
    print(f"results: {run_dir / RESULTS}")
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> dict | None:
    return _main(cfg)


if __name__ == "__main__":
    main()
