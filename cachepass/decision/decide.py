"""cache-dit's ``can_cache`` as graph code: warmup, mask, budgets and the residual-diff threshold, and the
counters a decision updates."""

from __future__ import annotations

import torch
from torch.fx.proxy import Proxy

from cachepass.analysis.sequence_parallel import SequenceParallel
from cachepass.decision.clock import Clock
from cachepass.decision.ops import at
from cachepass.decision.ranks import agree_across_ranks
from cachepass.decision.unit_state import UnitState


def decide(cfg, us: UnitState, residual: Proxy, prev: Proxy | None,
            parallel: SequenceParallel | None) -> tuple[Proxy, Proxy | None, Proxy | None]:
    """cache-dit ``CachedContextManager.can_cache``: returns (hit, diff, diff_was_recorded).

    ``prev``: the previous computed step's head residual of this stream, None where the config never compares
    residuals (`StepCacheConfig.compares_residuals`). With no threshold, or a static schedule, no step reaches the
    similarity test and no diff is recorded, as in cache-dit.
    """
    clock = us.clock
    scheduled = not cfg.decides_by_threshold
    if parallel is not None:  # every rank decides from the same reduced values
        ok = torch.zeros_like(clock.static_hit) if scheduled else may_cache(cfg, us)
        ok, static_hit, relative_diff = agree_across_ranks(cfg, us, residual, prev, ok, parallel)
    else:
        if scheduled:
            return clock.static_hit, None, None
        ok, static_hit = may_cache(cfg, us), clock.static_hit
        relative_diff = (prev - residual).abs().mean() / prev.abs().mean() if prev is not None else None
    if scheduled:
        return static_hit, None, None
    if cfg.threshold >= 1:
        diff = torch.full_like(ok, -1.0, dtype=us.layout.float_dtype)  # cache-dit records -1.0 and always caches
        return static_hit | ok, diff, ok
    diff = shared_cfg_diff(cfg, us, relative_diff.to(us.layout.float_dtype))
    return static_hit | (ok & (diff < cfg.threshold)), diff, ok


def may_cache(cfg, us: UnitState) -> Proxy:
    """Everything but the similarity test: not forced, not statically cached, a previous residual, budgets left."""
    clock = us.clock
    ok = clock.not_forced & ~clock.static_hit & us.current("has_prev")
    if cfg.max_cached_steps is not None:
        ok = ok & (us.current("cached_count") < cfg.max_cached_steps)
    if cfg.max_continuous_cached_steps is not None:
        ok = ok & (cached_streak(us) < cfg.max_continuous_cached_steps)
    if cfg.max_accumulated_residual_diff is not None:
        ok = ok & (us.current("accumulated_diff") < cfg.max_accumulated_residual_diff)
    return ok


def shared_cfg_diff(cfg, us: UnitState, diff: Proxy) -> Proxy:
    """With separate CFG, the unconditional stream reuses the conditional stream's diff of this step, if any."""
    if not (cfg.separate_cfg and not cfg.cfg_diff_compute_separate):
        return diff
    cond_diff = at(us.vector("diffs")[0], us.clock.step_slot).to(us.layout.float_dtype)
    return torch.where((us.clock.stream == 1) & ~torch.isnan(cond_diff), cond_diff, diff)


def cached_streak(us: UnitState) -> Proxy:
    """Cached steps in a row up to the previous step (a computed step breaks the streak)."""
    continues = us.current("last_cached_step") == us.clock.step - 1
    return torch.where(continues, us.current("streak"), 0)


def update_counters(us: UnitState, clock: Clock, hit: Proxy, diff, considered) -> None:
    """The per-step record, and the counters the state keeps (those the config's budgets read: `StateLayout`)."""
    if us.keeps("cached_count"):
        us.set_current("cached_count", us.current("cached_count") + hit.to(us.layout.int_dtype))
    if us.keeps("streak"):
        streak = cached_streak(us)
        us.set_current("streak", torch.where(hit, streak + 1, streak))
        us.set_current("last_cached_step", torch.where(hit, clock.step, us.current("last_cached_step")))
    us.record("cached_flags", hit)
    if diff is not None:
        us.record("diffs", diff.to(torch.float32), considered)
    if us.keeps("accumulated_diff"):
        gain = torch.where(considered & (diff > 0), diff, 0.0)
        us.set_current("accumulated_diff", us.current("accumulated_diff") + gain)
