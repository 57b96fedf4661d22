"""Run a model under cache-dit with the cache-dit equivalent of a StepCacheConfig."""

from __future__ import annotations

import cache_dit
from cache_dit import BlockAdapter, ForwardPattern

from cachepass import StepCacheConfig


def enable(case_name: str, model, cfg: StepCacheConfig):
    db, calibrator = cfg.to_cache_dit()
    target = model
    if case_name == "toy":
        target = BlockAdapter(transformer=model, blocks=model.blocks, forward_pattern=ForwardPattern.Pattern_2)
    elif case_name == "sd3":  # cache-dit's own StableDiffusion3 adapter, for a bare transformer
        target = BlockAdapter(transformer=model, blocks=model.transformer_blocks, forward_pattern=ForwardPattern.Pattern_1,
                              check_forward_pattern=True)
    cache_dit.enable_cache(target, cache_config=db, calibrator_config=calibrator)


def unit_stats(model) -> list[tuple[list[int], list[int], dict, dict]]:
    """(cached_steps, cfg_cached_steps, residual_diffs, cfg_residual_diffs) per block list, in order."""
    manager = model._context_manager
    result = []
    for name in model._context_names:
        ctx = manager.get_context(name)
        result.append((ctx.get_cached_steps(), ctx.get_cfg_cached_steps(), ctx.get_residual_diffs(),
                       ctx.get_cfg_residual_diffs()))
    return result
