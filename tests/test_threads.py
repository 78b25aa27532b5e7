"""The training process leaves the DataLoader workers their cores on a CPU trainer."""

from __future__ import annotations

import torch

from wlshear.utils.threads import available_cores, cpu_training_threads


def test_training_threads_leave_the_workers_their_cores_and_are_restored():
    before = torch.get_num_threads()
    cores = available_cores()
    with cpu_training_threads(num_workers=1, on_cpu=True) as n:
        assert n == torch.get_num_threads() == min(before, max(1, cores - 1))
    assert torch.get_num_threads() == before
    with cpu_training_threads(num_workers=cores + 3, on_cpu=True) as n:
        assert n == 1  # never below one thread
    # no workers, or a GPU trainer: untouched
    for kw in ({"num_workers": 0, "on_cpu": True}, {"num_workers": 2, "on_cpu": False}):
        with cpu_training_threads(**kw) as n:
            assert n == before == torch.get_num_threads()
    assert torch.get_num_threads() == before
