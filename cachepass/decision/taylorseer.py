"""TaylorSeer as graph code: the terms a computed step updates (cache-dit's counting)."""

from __future__ import annotations

import torch
from torch.fx.proxy import Proxy

from cachepass.decision.clock import Clock
from cachepass.decision.ops import pick_stream, write_stream
from cachepass.decision.unit_state import UnitState


def update_taylor(us: UnitState, slot: int, order: int, y: Proxy, computed: Proxy, clock: Clock) -> None:
    """TaylorSeer ``update`` on a computed step: dY0 = Y, dY(i+1) = (dY(i) - dY_prev(i)) / window.

    cache-dit creates its Taylor state lazily at step 0, so its step counter runs one behind and
    derivatives start at step 3 (its ``current_step > 1``); matched here.
    """
    terms_state = us.raw(f"slot{slot}.terms")
    old_valid = us.current(f"slot{slot}.valid")
    terms, valid = [y], [torch.ones_like(computed)]
    if order > 0:  # order 0 (plain reuse) reads no old term: no pick of the [streams, ...] buffer runs for it
        old = pick_stream(terms_state, clock.stream_selectors)
        window = clock.step - us.current("last_compute_step")
        window = torch.where(window < 1, 1, window)  # clamp(min=1); ONNX-TensorRT's Clip takes floats only
        for i in range(order):
            terms.append((terms[i] - old[i]) / window)
            valid.append(valid[i] & old_valid[i] & (clock.step > 2))
    new = torch.stack(terms) if order > 0 else y.unsqueeze(0)  # a view, not a copy, of the one term
    write_stream(terms_state, clock, new, computed)
    us.set_current(f"slot{slot}.valid", torch.where(computed, torch.stack(valid), old_valid))
