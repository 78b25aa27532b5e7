"""Run the CNN shear estimator on CLASH cluster fields (Hydra entry point).

Examples:
    python -m wlshear.tasks.mock_field out=outputs/clash_mock
    python infer_clash.py estimator=outputs/train/runs/<stamp>/estimator_refit.pt
    python infer_clash.py estimator=... 'clusters=[{name: a383, dir: DATA/a383, redshift: 0.187}]'

Outputs in the run directory: per cluster a folder (catalogue, maps, plots, profile, summary) and
run_summary.json, calibration.json, calibration.md (see wlshear/tasks/infer_clash.py). Exits with
``fail_exit_code`` (default 1) if any cluster failed; the others are still processed.
"""

import sys

import hydra
from omegaconf import DictConfig

from wlshear.utils.hydra import set_project_root


@hydra.main(version_base="1.3", config_path="conf", config_name="infer_clash.yaml")
def main(cfg: DictConfig) -> None:
    from wlshear.tasks.infer_clash import run

    summary = run(cfg)
    if summary["n_failed"] and int(cfg.get("fail_exit_code", 1)):
        sys.exit(int(cfg.get("fail_exit_code", 1)))


if __name__ == "__main__":
    set_project_root()  # paths.root_dir = the directory this is started in (or $PROJECT_ROOT)
    main()
