"""Context parallel on diffusers' own CP plans: two CPU ranks (gloo), Ulysses 2, tiny Wan and FLUX.

One spawned test runs every check (`context_parallel_ranks.py`): per-rank stats identical and
decisions equal to single-process stepcache, latents allclose, one graph with no break and one
all-reduce feeding each cond; the guards (a rank resetting alone, a per-rank threshold, a wrong
group size) end in every rank computing or a clear error, never a hang.
"""

from __future__ import annotations

import socket

import context_parallel_ranks
import pytest
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
def test_sharded_wan_and_flux_decide_as_one_process_on_every_rank():
    mp.spawn(context_parallel_ranks.main, args=(2, _free_port()), nprocs=2)
