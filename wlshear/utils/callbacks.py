"""Diagnostic Lightning callbacks (not part of the default training config).

``StampHashRecorder`` writes a SHA-1 of every training stamp each process saw to
``<out_dir>/stamp_hashes/rank<r>.txt``: it verifies that data-parallel ranks (and resumed runs)
render different stamps. Add it from the command line::

    python train.py trainer=ddp_cpu +callbacks.stamp_hashes._target_=wlshear.utils.callbacks.StampHashRecorder \
        +callbacks.stamp_hashes.out_dir='${paths.output_dir}'
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np


def stamp_hash(stamp) -> str:
    """SHA-1 (hex, 16 chars) of a stamp's float32 pixel bytes."""
    arr = np.ascontiguousarray(np.asarray(stamp, dtype=np.float32))
    return hashlib.sha1(arr.tobytes()).hexdigest()[:16]


class StampHashRecorder(L.Callback):
    """Record a hash of each training stamp per global rank; one line ``epoch hash`` per stamp."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir) / "stamp_hashes"
        self._lines: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        for s in x.detach().cpu().numpy():
            self._lines.append(f"{trainer.current_epoch} {stamp_hash(s)}")

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.txt"
        with open(path, "a") as fh:
            fh.write("\n".join(self._lines) + ("\n" if self._lines else ""))
        self._lines.clear()
