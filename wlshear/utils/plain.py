"""Conversion of configs, numpy and torch values to plain Python types (for JSON and safe saving)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_plain(obj: Any, unknown: Callable[[Any], Any] = repr) -> Any:
    """``obj`` as dict/list/str/int/float/bool/None.

    OmegaConf containers are resolved, numpy scalars/arrays and torch tensors become Python
    numbers/lists, paths become strings, mappings and sequences are converted recursively.
    Anything else goes through ``unknown`` (``repr`` by default, so the result always saves;
    pass ``lambda o: o`` to keep such objects as they are).
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        obj = OmegaConf.to_container(obj, resolve=True)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v, unknown) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_plain(v, unknown) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return unknown(obj)
