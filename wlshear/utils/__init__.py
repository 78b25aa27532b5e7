"""Small helpers for Hydra entry points (config printing, instantiation, run-dir files)."""
