"""Train the shear CNN (Hydra entry point). `python train.py` runs the embedded default.

Examples:
    python train.py                                   # parametric source, CPU, a few minutes
    python train.py experiment=paper_clash data.noise_scale=0.5
    python train.py -m model=paper_cnn,wide_cnn,resnet_small
"""

import hydra
from omegaconf import DictConfig

from wlshear.utils.hydra import set_project_root


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    from wlshear.tasks.train import optimized_value, run

    return optimized_value(cfg, run(cfg))  # the objective of hparams_search sweepers (optimized_metric)


if __name__ == "__main__":
    set_project_root()  # paths.root_dir = the directory this is started in (or $PROJECT_ROOT)
    main()
