"""Run a model under cache-dit with the cache-dit equivalent of a StepCacheConfig."""

from __future__ import annotations

import cache_dit
from cache_dit import BlockAdapter, DBCacheConfig, ForwardPattern, TaylorSeerCalibratorConfig

from cachepass import StepCacheConfig


def to_cache_dit(cfg: StepCacheConfig):
    db = DBCacheConfig(
        Fn_compute_blocks=cfg.num_head_blocks,
        Bn_compute_blocks=cfg.num_tail_blocks,
        residual_diff_threshold=cfg.threshold,
        max_warmup_steps=cfg.warmup_steps,
        warmup_interval=cfg.warmup_interval,
        max_cached_steps=-1 if cfg.max_cached_steps is None else cfg.max_cached_steps,
        max_continuous_cached_steps=-1 if cfg.max_continuous_cached_steps is None else cfg.max_continuous_cached_steps,
        max_accumulated_residual_diff_threshold=cfg.max_accumulated_residual_diff,
        enable_separate_cfg=cfg.separate_cfg,
        cfg_compute_first=cfg.cfg_compute_first,
        cfg_diff_compute_separate=cfg.cfg_diff_compute_separate,
        num_inference_steps=cfg.num_inference_steps,
        steps_computation_mask=None if cfg.steps_computation_mask is None else list(cfg.steps_computation_mask),
        steps_computation_policy=cfg.steps_computation_policy.value,
    )
    hidden, encoder = cfg.taylorseer_order, cfg.resolved_encoder_taylorseer_order
    if hidden == 0 and encoder == 0:
        return db, None
    assert hidden == encoder or 0 in (hidden, encoder), "cache-dit has one TaylorSeer order"
    calibrator = TaylorSeerCalibratorConfig(
        taylorseer_order=max(hidden, encoder), enable_calibrator=hidden > 0, enable_encoder_calibrator=encoder > 0
    )
    return db, calibrator


def enable(case_name: str, model, cfg: StepCacheConfig):
    db, calibrator = to_cache_dit(cfg)
    target = model
    if case_name == "toy":
        target = BlockAdapter(transformer=model, blocks=model.blocks, forward_pattern=ForwardPattern.Pattern_2)
    cache_dit.enable_cache(target, cache_config=db, calibrator_config=calibrator)


def unit_stats(model) -> list[tuple[list[int], list[int], dict, dict]]:
    """(cached_steps, cfg_cached_steps, residual_diffs, cfg_residual_diffs) per block list, in order."""
    manager = model._context_manager
    result = []
    for name in model._context_names:
        ctx = manager.get_context(name)
        result.append((ctx.get_cached_steps(), ctx.get_cfg_cached_steps(), ctx.get_residual_diffs(), ctx.get_cfg_residual_diffs()))
    return result
