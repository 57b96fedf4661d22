"""TaylorSeer as graph code: the terms a computed step stores (cache-dit's counting) and their validity flags."""

from __future__ import annotations

import torch
from torch.fx.proxy import Proxy

from cachepass.decision.clock import Clock
from cachepass.decision.ops import at
from cachepass.decision.unit_state import UnitState


def stored_terms(y: Proxy, terms: Proxy, stream: Proxy, elapsed: Proxy, order: int) -> Proxy:
    """The terms a computed step stores for its stream, ``[K+1, *shape]``: dY0 = Y, dY(i+1) = (dY(i) - dY_prev(i)) / window.

    Built in the compute branch (`cachepass.decision.branches.compute_branch`), so a cached call computes none of it;
    the cached branch returns the stream's terms as they are, and one indexed write after the cond stores what the
    cond returned. ``terms``: the unit's [S, K+1, *shape] buffer; ``elapsed``: steps since the stream last computed
    (the window, clamped to 1).
    """
    if order == 0:  # plain reuse reads no old term
        return y.unsqueeze(0)
    old = at(terms, stream)
    window = torch.where(elapsed < 1, 1, elapsed)  # clamp(min=1); ONNX-TensorRT's Clip takes floats only
    new = [y]
    for i in range(order):
        new.append((new[i] - old[i]) / window)
    return torch.stack(new)


def update_valid(us: UnitState, slot: int, order: int, computed: Proxy, clock: Clock) -> None:
    """Which terms exist after this call: all of a computed step's up to the order its history allows.

    cache-dit creates its Taylor state lazily at step 0, so its step counter runs one behind and
    derivatives start at step 3 (its ``current_step > 1``); matched here.
    """
    old_valid = us.current(f"slot{slot}.valid")
    valid = [torch.ones_like(computed)]
    derivable = clock.step > 2 if order > 0 else None  # one kernel, not one per order
    for i in range(order):
        valid.append(valid[i] & old_valid[i] & derivable)
    us.set_current(f"slot{slot}.valid", torch.where(computed, torch.stack(valid), old_valid))
