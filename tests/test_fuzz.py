"""Random configs: the compiled decision (tensor ops, no host branch) agrees with the Python reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cachepass
from bench.tiny_models import CASES, generate
from cachepass import StepCacheConfig
from cachepass.reference import StepCacheReference

STEPS = 10
CASE = CASES["toy"]


@st.composite
def configs(draw) -> StepCacheConfig:
    head = draw(st.integers(1, 3))
    tail = draw(st.integers(0, CASE.depth - head - 1))
    separate_cfg = draw(st.booleans())
    share_diff = separate_cfg and draw(st.booleans())
    mask = None
    if draw(st.booleans()):
        mask = (1,) + tuple(draw(st.lists(st.integers(0, 1), min_size=STEPS - 1, max_size=STEPS - 1)))
    optional = lambda strategy: st.one_of(st.none(), strategy)  # noqa: E731
    return StepCacheConfig(
        num_head_blocks=head,
        num_tail_blocks=tail,
        threshold=draw(st.sampled_from([0.0, 0.03, 0.05, 0.08, 0.15, 1.0])),
        warmup_steps=draw(st.integers(0, 4)),
        warmup_interval=draw(st.integers(1, 3)),
        max_cached_steps=draw(optional(st.integers(0, 6))),
        max_continuous_cached_steps=draw(optional(st.integers(0, 3))),
        max_accumulated_residual_diff=draw(optional(st.sampled_from([0.05, 0.2, 0.6]))),
        separate_cfg=separate_cfg,
        cfg_diff_compute_separate=not share_diff,
        cfg_compute_first=share_diff and draw(st.booleans()),
        num_inference_steps=draw(st.sampled_from([STEPS, None])) if mask is None else STEPS,
        steps_computation_mask=mask,
        steps_computation_policy=draw(st.sampled_from(["dynamic", "static"])),
        taylorseer_order=draw(st.integers(0, 2)),
        encoder_taylorseer_order=draw(optional(st.integers(0, 2))),
    )


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs())
def test_compiled_graph_agrees_with_reference(cfg):
    torch._dynamo.reset()
    runs = {}
    for name, wrap in (("reference", StepCacheReference), ("compiled", lambda m, c: cachepass.compile(m, c, inner="eager"))):
        model = CASE.model()
        fn = wrap(model, cfg)
        outputs = []
        for _ in range(2):
            outputs.append(generate(CASE, fn, STEPS, separate_cfg=cfg.separate_cfg, uncond_first=cfg.cfg_compute_first))
            if cfg.num_inference_steps is None:
                cachepass.reset(fn)
        runs[name] = (outputs, cachepass.stats(fn))
    (ref_out, ref_stats), (out, stats) = runs["reference"], runs["compiled"]
    assert [(u.cached_steps, u.cfg_cached_steps) for u in stats] == [(u.cached_steps, u.cfg_cached_steps) for u in ref_stats]
    for ours, theirs in zip(stats, ref_stats):
        assert ours.residual_diffs.keys() == theirs.residual_diffs.keys()
        assert ours.cfg_residual_diffs.keys() == theirs.cfg_residual_diffs.keys()
    for got, want in zip(out, ref_out):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
