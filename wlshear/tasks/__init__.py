"""The work behind the thin Hydra entry points: train, evaluate, infer_clash."""
