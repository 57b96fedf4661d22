"""Context parallel: one all-reduce per cache unit makes every rank take the whole sequence's decision."""

from __future__ import annotations

import zlib

import torch
from torch.fx.proxy import Proxy

from cachepass.analysis.sequence_parallel import SequenceParallel
from cachepass.decision.ops import set_flag
from cachepass.decision.unit_state import UnitState
from cachepass.state.layout import Mismatch

FINGERPRINT_MODULUS = 1 << 16  # in-step checks sum x and x^2 over ranks in float64: exact for x < 2^16


def agree_across_ranks(cfg, us: UnitState, residual: Proxy, prev: Proxy | None, ok: Proxy,
                        parallel: SequenceParallel) -> tuple[Proxy, Proxy, Proxy]:
    """The decision inputs of the whole sequence, identical on every rank of ``parallel``:
    (every rank may cache, every rank's static mask caches, the whole sequence's residual diff).

    One float64 SUM all-reduce of ``[sum|R_prev - R|, sum|R_prev|, ok, static_hit, 1, call, call^2,
    fingerprint, fingerprint^2]`` over the local shards; the predicate reads only the reduced vector
    (the diff is exact for unequal shards). The ranks are in step when every rank reports the same
    call count and the same fingerprint (config, step, CFG stream): ``W * sum(x^2) == sum(x)^2``.
    Out of step (a rank reset alone, another config), every rank computes and the sticky
    `Mismatch.RANKS_DIVERGED` bit is set.
    """
    clock, f64 = us.clock, torch.float64
    if prev is not None:  # the config compares residuals
        local = [(prev - residual).abs().sum(dtype=f64), prev.abs().sum(dtype=f64)]
    else:
        local = [torch.zeros_like(clock.static_hit, dtype=f64)] * 2
    call = (clock.calls % FINGERPRINT_MODULUS).to(f64)
    fingerprint = ((config_fingerprint(cfg) + 31 * clock.step + 977 * clock.stream) % FINGERPRINT_MODULUS).to(f64)
    vector = torch.stack([*local, ok.to(f64), clock.static_hit.to(f64), torch.ones_like(call),
                          call, call * call, fingerprint, fingerprint * fingerprint])
    total = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(vector, "sum", parallel.group_name))
    size = parallel.size
    in_step = ((total[4] == size) & (size * total[6] == total[5] * total[5])
               & (size * total[8] == total[7] * total[7]))
    clock.flags = set_flag(clock.flags, Mismatch.RANKS_DIVERGED, ~in_step)
    return in_step & (total[2] == size), in_step & (total[3] == size), total[0] / total[1]


def config_fingerprint(cfg) -> int:
    """A number for the config, the same in every process (Python's ``hash`` of a str is salted per process)."""
    return zlib.crc32(repr(cfg).encode()) % FINGERPRINT_MODULUS
