"""CPU threads of the training process while DataLoader workers render.

On a CPU trainer the training process and the DataLoader workers (one thread each, PyTorch's
default) share the cores. With torch's default of one intra-op thread per core, every small op of
the training step waits for a thread the workers have pre-empted: measured on 2 cores with the
torch renderer and one worker, 1,690 stamps/s reached the optimiser with 2 training threads and
2,860 with 1 (``benchmarks/train_throughput.py``). :func:`cpu_training_threads` leaves the
workers their cores for the duration of ``fit``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["available_cores", "cpu_training_threads"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def cpu_training_threads(num_workers: int, on_cpu: bool = True) -> Iterator[int]:
    """Within the block, the training process uses ``max(1, cores - num_workers)`` intra-op
    threads (never more than it had) when it trains on CPU with DataLoader workers; restored on
    exit. Yields the thread count in force."""
    before = torch.get_num_threads()
    n = before
    if on_cpu and int(num_workers) > 0:
        n = min(before, max(1, available_cores() - int(num_workers)))
    if n == before:
        yield before
        return
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)
