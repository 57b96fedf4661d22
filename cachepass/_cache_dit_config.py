"""Translation between cache-dit 1.5 config objects and `StepCacheConfig`.

cache-dit's objects are read by attribute (cache-dit is imported only to build them). Anything
cachepass does not implement raises ``ValueError`` naming the cache-dit field, never silently ignored.
"""

from __future__ import annotations

from typing import Any

import torch


def convert_cache_dit_config(db_config: Any, calibrator_config: Any = None) -> dict[str, Any]:
    cache_type = getattr(getattr(db_config, "cache_type", None), "name", "DBCache")
    if cache_type != "DBCache":
        _unsupported("cache_type", cache_type, "CacheType.DBCache")
    if getattr(db_config, "force_refresh_step_hint", None) is not None:
        _unsupported("force_refresh_step_hint", db_config.force_refresh_step_hint, "None")
    if db_config.enable_separate_cfg is None:
        _unsupported(
            "enable_separate_cfg",
            None,
            "True or False (cache-dit resolves None from its pipeline registry; set it explicitly)",
        )
    threshold = db_config.residual_diff_threshold
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.item()
    max_accumulated = db_config.max_accumulated_residual_diff_threshold
    fields = dict(
        num_head_blocks=db_config.Fn_compute_blocks,
        num_tail_blocks=db_config.Bn_compute_blocks,
        # cache-dit treats every threshold <= 0 as "never cache on the threshold".
        threshold=max(float(threshold), 0.0),
        warmup_steps=db_config.max_warmup_steps,
        warmup_interval=db_config.warmup_interval,
        max_cached_steps=_limit(db_config.max_cached_steps),
        max_continuous_cached_steps=_limit(db_config.max_continuous_cached_steps),
        max_accumulated_residual_diff=max_accumulated if max_accumulated and max_accumulated > 0 else None,
        separate_cfg=bool(db_config.enable_separate_cfg),
        cfg_compute_first=bool(db_config.cfg_compute_first),
        cfg_diff_compute_separate=bool(db_config.cfg_diff_compute_separate),
        num_inference_steps=db_config.num_inference_steps,
        steps_computation_mask=(
            None if db_config.steps_computation_mask is None else tuple(db_config.steps_computation_mask)
        ),
        steps_computation_policy=db_config.steps_computation_policy,
    )
    fields.update(_taylorseer_orders(calibrator_config))
    return fields


def _taylorseer_orders(calibrator_config: Any) -> dict[str, int]:
    if calibrator_config is None:
        return {"taylorseer_order": 0, "encoder_taylorseer_order": None}
    kind = getattr(calibrator_config, "calibrator_type", None)
    if kind != "taylorseer":
        _unsupported("calibrator_type", kind, "'taylorseer'")
    cache_type = getattr(calibrator_config, "calibrator_cache_type", "residual")
    if cache_type != "residual":
        _unsupported("calibrator_cache_type", cache_type, "'residual'")
    order = int(calibrator_config.taylorseer_order)
    hidden = order if calibrator_config.enable_calibrator else 0
    encoder = order if calibrator_config.enable_encoder_calibrator else 0
    return {"taylorseer_order": hidden, "encoder_taylorseer_order": None if encoder == hidden else encoder}


def _limit(value: int) -> int | None:
    """cache-dit spells "no limit" as a negative number; cachepass as None."""
    return None if value is None or value < 0 else int(value)


def _unsupported(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"cache-dit config field {field}={value!r} is not supported by cachepass; allowed: {allowed}")


def to_cache_dit_configs(cfg) -> tuple[Any, Any]:
    """(DBCacheConfig, TaylorSeerCalibratorConfig or None) with the same semantics as ``cfg``."""
    try:
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except ImportError as e:
        raise ImportError("StepCacheConfig.to_cache_dit needs cache-dit: pip install 'cachepass[cache-dit]'") from e
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
    if 0 not in (hidden, encoder) and hidden != encoder:
        raise ValueError(
            f"cache-dit has one TaylorSeer order; StepCacheConfig has taylorseer_order={hidden} and "
            f"encoder_taylorseer_order={encoder}"
        )
    calibrator = TaylorSeerCalibratorConfig(
        taylorseer_order=max(hidden, encoder), enable_calibrator=hidden > 0, enable_encoder_calibrator=encoder > 0
    )
    return db, calibrator
