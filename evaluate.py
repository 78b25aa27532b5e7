"""Evaluate CNN shear estimators and the classical baselines (Hydra entry point).

Examples:
    python evaluate.py run_dir=outputs/train/runs/<stamp>      # estimator.pt and estimator_refit.pt
    python evaluate.py checkpoints='{cnn: a.pt, cnn_refit: b.pt}' test.n=100000
    python evaluate.py run_dir=... studies.noise.checkpoints='{0.5: c.pt, 0.25: d.pt}'

Outputs in the run directory: results.json, summary.md (Table-4-like), table.csv and one CSV + PNG
per study (see wlshear/tasks/evaluate.py).
"""

import hydra
from omegaconf import DictConfig

from wlshear.utils.hydra import set_project_root


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate.yaml")
def main(cfg: DictConfig) -> None:
    from wlshear.tasks.evaluate import run

    run(cfg)


if __name__ == "__main__":
    set_project_root()  # paths.root_dir = the directory this is started in (or $PROJECT_ROOT)
    main()
