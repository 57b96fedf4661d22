"""StepCacheConfig validation, cache-dit conversion and backend option parsing."""

from __future__ import annotations

import logging

import numpy
import pytest
import torch
from cache_dit import DBCacheConfig, DBPruneConfig, TaylorSeerCalibratorConfig

import cachepass
from cachepass import MaskPolicy, StepCacheConfig
from cachepass.inner import Inner
from cachepass.options import parse_options


@pytest.mark.parametrize(
    "field,value,allowed",
    [
        ("num_head_blocks", 0, "integer >= 1"),
        ("num_head_blocks", 1.5, "integer >= 1"),
        ("num_head_blocks", True, "integer >= 1"),
        ("num_tail_blocks", -1, "integer >= 0"),
        ("threshold", -0.1, ">= 0"),
        ("threshold", float("nan"), ">= 0"),
        ("threshold", "0.1", ">= 0"),
        ("warmup_steps", -1, "integer >= 0"),
        ("warmup_interval", 0, "integer >= 1"),
        ("max_cached_steps", -1, "integer >= 0"),
        ("max_continuous_cached_steps", 2.0, "integer >= 0"),
        ("max_accumulated_residual_diff", 0.0, "None or > 0"),
        ("separate_cfg", 1, "True or False"),
        ("num_inference_steps", 0, "integer >= 1"),
        ("steps_computation_policy", "sometimes", "'dynamic' or 'static'"),
        ("taylorseer_order", -1, "integer >= 0"),
        ("encoder_taylorseer_order", -2, "integer >= 0"),
        ("timestep_input", "", "'auto', the name of a model input, or None"),
        ("separate_cfg", numpy.bool_(True), "True or False"),
    ],
)
def test_invalid_value_names_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as e:
        StepCacheConfig(**{field: value})
    message = str(e.value)
    assert f"StepCacheConfig.{field}={value!r}" in message
    assert allowed in message


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(cfg_compute_first=True), "unless separate_cfg=True"),
        (dict(separate_cfg=True, cfg_compute_first=True), "cfg_diff_compute_separate=False"),
        (dict(steps_computation_mask=[1, 0, 1]), "together with num_inference_steps"),
        (dict(num_inference_steps=4, steps_computation_mask=[1, 0, 1]), "exactly num_inference_steps=4"),
        (dict(num_inference_steps=3, steps_computation_mask=[1, 2, 1]), "only 0 and 1"),
        (dict(num_inference_steps=3, steps_computation_mask="101"), "sequence of 0/1"),
        (
            dict(num_inference_steps=3, steps_computation_mask=[0, 1, 1], steps_computation_policy="static"),
            "mask[0] == 1",
        ),
    ],
)
def test_inconsistent_fields_are_rejected(kwargs, needle):
    with pytest.raises(ValueError, match=rf".*{needle.replace('[', '.').replace(']', '.')}"):
        StepCacheConfig(**kwargs)


def test_config_is_frozen_and_normalises_mask_and_policy():
    cfg = StepCacheConfig(num_inference_steps=3, steps_computation_mask=[1, 0, 1], steps_computation_policy="static")
    assert cfg.steps_computation_mask == (1, 0, 1)
    assert cfg.steps_computation_policy is MaskPolicy.STATIC
    with pytest.raises(Exception):
        cfg.threshold = 0.5  # frozen
    assert hash(cfg) == hash(StepCacheConfig(num_inference_steps=3, steps_computation_mask=(1, 0, 1),
                                             steps_computation_policy=MaskPolicy.STATIC))


def test_warmup_indices_follow_interval_and_mask_truncation():
    assert StepCacheConfig(warmup_steps=6, warmup_interval=2).warmup_step_indices == (0, 2, 4)
    masked = StepCacheConfig(warmup_steps=8, num_inference_steps=6, steps_computation_mask=(1, 1, 1, 0, 1, 1))
    assert masked.warmup_step_indices == (0, 1, 2)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['Fn'\]"):
        StepCacheConfig.from_dict({"Fn": 8})
    assert StepCacheConfig.from_dict({"threshold": 0.1}).threshold == 0.1


def test_from_cache_dit_round_trips_every_supported_field():
    cfg = StepCacheConfig(
        num_head_blocks=3, num_tail_blocks=1, threshold=0.12, warmup_steps=4, warmup_interval=2,
        max_cached_steps=9, max_continuous_cached_steps=2, max_accumulated_residual_diff=0.7,
        separate_cfg=True, cfg_compute_first=True, cfg_diff_compute_separate=False, num_inference_steps=6,
        steps_computation_mask=(1, 1, 0, 1, 0, 1), steps_computation_policy="static", taylorseer_order=2,
    )
    assert StepCacheConfig.from_cache_dit(*cfg.to_cache_dit()) == cfg


def test_from_cache_dit_maps_sentinels_and_calibrator_flags():
    db = DBCacheConfig(Fn_compute_blocks=8, residual_diff_threshold=-1.0, max_cached_steps=-1, enable_separate_cfg=False)
    cfg = StepCacheConfig.from_cache_dit(db, TaylorSeerCalibratorConfig(taylorseer_order=2, enable_encoder_calibrator=False))
    assert cfg.threshold == 0.0 and cfg.max_cached_steps is None
    assert (cfg.taylorseer_order, cfg.encoder_taylorseer_order) == (2, 0)


@pytest.mark.parametrize(
    "db,calibrator,needle",
    [
        (DBPruneConfig(enable_separate_cfg=False), None, "cache_type"),
        (DBCacheConfig(enable_separate_cfg=False, force_refresh_step_hint=10), None, "force_refresh_step_hint"),
        (DBCacheConfig(), None, "enable_separate_cfg"),
        (DBCacheConfig(enable_separate_cfg=True), TaylorSeerCalibratorConfig(calibrator_cache_type="hidden_states"),
         "calibrator_cache_type"),
    ],
)
def test_from_cache_dit_rejects_what_cachepass_does_not_implement(db, calibrator, needle):
    with pytest.raises(ValueError, match=needle):
        StepCacheConfig.from_cache_dit(db, calibrator)


def test_options_accept_our_config_a_dict_or_cache_dit_objects():
    ours = StepCacheConfig(num_head_blocks=2, separate_cfg=True)
    assert parse_options({"config": ours}).config is ours
    assert parse_options({"config": {"num_head_blocks": 2, "separate_cfg": True}}).config == ours
    db, _ = ours.to_cache_dit()
    assert parse_options({"config": db}).config == ours
    taylor = parse_options({"config": db, "calibrator_config": TaylorSeerCalibratorConfig(taylorseer_order=1)})
    assert taylor.config.taylorseer_order == 1
    assert parse_options({"config": ours}).inner is Inner.INDUCTOR


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"config": StepCacheConfig(), "thresold": 0.1}, r"unknown option\(s\) \['thresold'\]"),
        ({}, "needs options=\\{'config'"),
        ({"config": 0.08}, "config has type float"),
        ({"config": StepCacheConfig(), "inner": "tensorrt"}, "inner='tensorrt' is invalid"),
        ({"config": StepCacheConfig(), "mode": "fast"}, "mode='fast' is invalid"),
        (
            {"config": StepCacheConfig(), "inner": "aot_eager", "mode": "reduce-overhead"},
            "only applies to inner='inductor'",
        ),
        ({"config": StepCacheConfig(), "calibrator_config": TaylorSeerCalibratorConfig()}, "goes with a cache-dit"),
    ],
)
def test_bad_options_are_clear_errors(options, needle):
    with pytest.raises(ValueError, match=needle):
        parse_options(options)


def test_compile_checks_options_before_tracing():
    import torch

    with pytest.raises(ValueError, match="inner='fast' is invalid"):
        cachepass.compile(torch.nn.Linear(2, 2), StepCacheConfig(), inner="fast")


def test_to_cache_dit_refuses_two_different_taylorseer_orders():
    with pytest.raises(ValueError, match="cache-dit has one TaylorSeer order"):
        StepCacheConfig(taylorseer_order=1, encoder_taylorseer_order=2).to_cache_dit()


def test_numpy_scalars_are_accepted_as_numbers():
    cfg = StepCacheConfig(threshold=numpy.float64(0.1), num_head_blocks=numpy.int64(2), num_inference_steps=numpy.int32(8))
    assert cfg == StepCacheConfig(threshold=0.1, num_head_blocks=2, num_inference_steps=8)
    assert type(cfg.threshold) is float and type(cfg.num_head_blocks) is int


def test_compile_keeps_a_cache_dit_calibrator(monkeypatch):
    db, calibrator = StepCacheConfig(num_head_blocks=1, taylorseer_order=2).to_cache_dit()
    compiled = cachepass.compile(torch.nn.Linear(2, 2), db, calibrator_config=calibrator)
    assert cachepass.api.compile_options(compiled).config.taylorseer_order == 2


class Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        return x + self.lin(x)


class Chain(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Residual() for _ in range(3))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.parametrize(
    "overrides,reason",
    [
        (dict(max_cached_steps=0), "max_cached_steps=0"),
        (dict(warmup_steps=10, num_inference_steps=8), "force all num_inference_steps=8 steps"),
        (dict(threshold=0.0), "threshold=0 disables"),
    ],
)
def test_configs_that_never_cache_say_so_once(overrides, reason, caplog):
    cfg = StepCacheConfig(num_head_blocks=1, **overrides)
    assert reason in cfg.never_caches
    compiled = cachepass.compile(Chain(), cfg, inner="eager")
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="cachepass"):
        compiled(torch.randn(2, 4))
        compiled(torch.randn(3, 4))  # a second shape compiles again: no second warning
    assert [r.getMessage() for r in caplog.records if "never caches" in r.getMessage()] == [
        f"stepcache: this config never caches a step ({cfg.never_caches}); every call runs all blocks"]
    assert StepCacheConfig(num_head_blocks=1).never_caches is None
