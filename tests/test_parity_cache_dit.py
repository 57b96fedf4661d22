"""The compiled stepcache graph and the eager reference against cache-dit 1.5 itself.

Two generations of a 20-step separate-CFG loop per case (cache-dit refreshed before each, the
way its transformer-only mode is meant to be used): the cached steps of every cache unit and CFG
stream must be identical, the residual diffs equal, and the final latents equal within fp32
tolerance.
"""

from __future__ import annotations

import dataclasses

import cache_dit
import pytest
import torch
from cache_dit_helpers import enable, unit_stats

import cachepass
from bench.tiny_models import CASES, generate
from cachepass.reference import StepCacheReference

STEPS = 20
# fp32 on CPU: aot_eager runs the very same ATen ops as eager; Inductor reorders reductions.
ATOL, RTOL = 1e-5, 1e-5
INDUCTOR_ATOL, INDUCTOR_RTOL = 1e-4, 1e-4
DIFF_RTOL = 1e-5


def config(name: str, case) -> cachepass.StepCacheConfig:
    base = dict(threshold=case.threshold, separate_cfg=True, num_inference_steps=STEPS, warmup_steps=2)
    configs = {
        "F1B0": dict(num_head_blocks=1),
        "F2B1-taylor2": dict(num_head_blocks=2, num_tail_blocks=1, taylorseer_order=2, warmup_steps=3),
        # cache-dit's default F8B0 on 30-40 blocks leaves a few middle blocks; here: all but one.
        "deep-head-taylor1": dict(num_head_blocks=case.depth - 1, taylorseer_order=1),
        "static-mask-taylor1": dict(
            num_head_blocks=1, taylorseer_order=1,
            steps_computation_mask=(1, 1, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1),
            steps_computation_policy="static",
        ),
        "limits-dynamic-mask": dict(
            num_head_blocks=1, threshold=case.threshold * 3, max_cached_steps=6, max_continuous_cached_steps=2,
            steps_computation_mask=(1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1),
        ),
        "shared-cfg-diff-accumulated": dict(
            num_head_blocks=1, threshold=case.threshold * 1.5, cfg_diff_compute_separate=False,
            max_accumulated_residual_diff=case.threshold * 5, taylorseer_order=1,
        ),
        "cfg-first-interval": dict(
            num_head_blocks=1, cfg_compute_first=True, cfg_diff_compute_separate=False,
            warmup_steps=6, warmup_interval=2,
        ),
    }
    return cachepass.StepCacheConfig(**{**base, **configs[name]})


PARITY = [
    ("toy", "F1B0"),
    ("toy", "F2B1-taylor2"),
    ("toy", "deep-head-taylor1"),
    ("toy", "static-mask-taylor1"),
    ("toy", "limits-dynamic-mask"),
    ("toy", "shared-cfg-diff-accumulated"),
    ("toy", "cfg-first-interval"),
    ("wan", "F1B0"),
    ("wan", "F2B1-taylor2"),
    ("wan", "static-mask-taylor1"),
    ("flux", "F1B0"),
    ("flux", "deep-head-taylor1"),
    ("hunyuan", "F2B1-taylor2"),
    ("hunyuan", "limits-dynamic-mask"),
    # SD3's last block (context_pre_only) returns only the hidden states: in the tail, then in the middle
    ("sd3", "F2B1-taylor2"),
    ("sd3", "F1B0"),
    ("ltx", "F1B0"),
    ("ltx", "static-mask-taylor1"),
]


@dataclasses.dataclass
class Run:
    outputs: list[torch.Tensor]
    stats: list[list[tuple]]  # per generation, per unit: (cached, cfg_cached, diffs, cfg_diffs)


def run_cache_dit(case, cfg) -> Run:
    model = case.model()
    enable(case.name, model, cfg)
    outputs, stats = [], []
    for _ in range(2):
        cache_dit.refresh_context(model)
        outputs.append(generate(case, model, STEPS, uncond_first=cfg.cfg_compute_first))
        stats.append(unit_stats(model))
    return Run(outputs, stats)


def run_cachepass(case, cfg, fn_of_model) -> Run:
    model = case.model()
    fn = fn_of_model(model)
    outputs, stats = [], []
    for _ in range(2):
        outputs.append(generate(case, fn, STEPS, uncond_first=cfg.cfg_compute_first))
        stats.append([(u.cached_steps, u.cfg_cached_steps, u.residual_diffs, u.cfg_residual_diffs)
                      for u in cachepass.stats(fn)])
    return Run(outputs, stats)


def assert_same(expected: Run, got: Run, atol=ATOL, rtol=RTOL, label=""):
    for gen, (want, have) in enumerate(zip(expected.stats, got.stats)):
        assert len(want) == len(have), f"{label} gen {gen}: {len(have)} cache units, cache-dit has {len(want)}"
        for unit, (w, h) in enumerate(zip(want, have)):
            assert h[0] == w[0], f"{label} gen {gen} unit {unit}: cached steps {h[0]} != cache-dit {w[0]}"
            assert h[1] == w[1], f"{label} gen {gen} unit {unit}: cfg cached steps {h[1]} != cache-dit {w[1]}"
            for ours, theirs in ((h[2], w[2]), (h[3], w[3])):
                assert ours.keys() == theirs.keys()
                for step in theirs:
                    assert ours[step] == pytest.approx(theirs[step], rel=DIFF_RTOL, abs=1e-7), f"{label} diff at {step}"
        torch.testing.assert_close(got.outputs[gen], expected.outputs[gen], atol=atol, rtol=rtol)


@pytest.mark.parametrize("model_name,config_name", PARITY, ids=[f"{m}-{c}" for m, c in PARITY])
def test_compiled_and_reference_match_cache_dit(model_name, config_name):
    case = CASES[model_name]
    cfg = config(config_name, case)
    expected = run_cache_dit(case, cfg)
    cached = sum(len(u[0]) + len(u[1]) for u in expected.stats[0])
    total = STEPS * 2 * len(expected.stats[0])
    assert 0 < cached < total, f"case must cache some steps and compute others, cached {cached}/{total}"

    compiled = run_cachepass(case, cfg, lambda m: cachepass.compile(m, cfg, inner="aot_eager"))
    assert_same(expected, compiled, label="compiled")
    reference = run_cachepass(case, cfg, lambda m: StepCacheReference(m, cfg))
    assert_same(expected, reference, label="reference")


@pytest.mark.parametrize("form", ["piecewise", "one-graph"])
def test_inductor_matches_cache_dit(form):
    case = CASES["wan"]
    cfg = config("F2B1-taylor2", case)
    expected = run_cache_dit(case, cfg)
    compiled = run_cachepass(case, cfg, lambda m: cachepass.compile(m, cfg, inner="inductor", form=form))
    assert_same(expected, compiled, atol=INDUCTOR_ATOL, rtol=INDUCTOR_RTOL, label=f"inductor {form}")


def test_uncached_steps_match_the_plain_model_exactly():
    """threshold 0 never caches: the stepcache graph computes what the model computes."""
    case = CASES["flux"]
    cfg = cachepass.StepCacheConfig(num_head_blocks=1, threshold=0.0, separate_cfg=True, num_inference_steps=STEPS)
    plain = generate(case, case.model(), STEPS)
    model = case.model()
    out = generate(case, cachepass.compile(model, cfg, inner="aot_eager"), STEPS)
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=RTOL)
    assert all(u.cached_steps == [] and u.residual_diffs == {} for u in cachepass.stats(model))


ONE_GRAPH = [
    ("toy", "F2B1-taylor2"),
    ("wan", "static-mask-taylor1"),
    ("flux", "F1B0"),
    ("hunyuan", "limits-dynamic-mask"),
    ("sd3", "F2B1-taylor2"),
]


@pytest.mark.parametrize("model_name,config_name", ONE_GRAPH, ids=[f"{m}-{c}" for m, c in ONE_GRAPH])
def test_one_graph_form_matches_cache_dit(model_name, config_name):
    """The form export consumes: the whole rewritten graph, cond included, to the inner compiler."""
    case = CASES[model_name]
    cfg = config(config_name, case)
    expected = run_cache_dit(case, cfg)
    one_graph = run_cachepass(case, cfg, lambda m: cachepass.compile(m, cfg, inner="aot_eager", form="one-graph"))
    assert_same(expected, one_graph, label="one-graph")
