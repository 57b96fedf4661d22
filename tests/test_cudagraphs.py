"""CUDA graphs over the piecewise program: what a CPU can check (options, errors, warm-up purity).

Capture and replay themselves run in tests/gpu/test_cuda_graphs.py on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass.cudagraphs.conditional_nodes import unavailable_reason
from cachepass.piecewise.execute import CondStep

STEPS = 8


@pytest.mark.parametrize("options, message", [
    ({"cudagraphs": "always"}, r"cudagraphs='always' is invalid; allowed: \['off', 'piecewise', 'conditional'\]"),
    ({"cudagraphs": "piecewise", "form": "one-graph"}, r"cudagraphs='piecewise' needs form='piecewise'"),
])
def test_bad_cudagraphs_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), **options)


@pytest.mark.parametrize("mode", ["piecewise", "conditional"])
def test_cuda_graphs_asked_for_a_cpu_model_is_an_error(mode):
    """At cachepass.compile, which has the model; through torch.compile, at the first call."""
    case = CASES["toy"]
    message = rf"stepcache option cudagraphs='{mode}' needs a CUDA device; the model runs on cpu"
    with pytest.raises(cachepass.CachepassError, match=message):
        cachepass.compile(case.model(), toy_config(), inner="aot_eager", cudagraphs=mode)
    compiled = torch.compile(case.model(), backend="stepcache", dynamic=False,
                             options={"config": toy_config(), "inner": "aot_eager", "cudagraphs": mode})
    with pytest.raises(Exception, match="CachepassError: " + message):  # Dynamo wraps what the backend raises
        generate(case, compiled, 1)


def test_conditional_nodes_say_why_not_on_cpu():
    assert "need a CUDA device" in unavailable_reason(torch.device("cpu"))


def test_cudagraphs_off_is_the_plain_program(caplog):
    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)
    with caplog.at_level("INFO", logger="cachepass"):
        off = generate(case, cachepass.compile(case.model(), cfg, inner="aot_eager", cudagraphs="off"), STEPS)
    assert "cudagraphs=off" in caplog.text
    torch.testing.assert_close(off, generate(case, cachepass.compile(case.model(), cfg, inner="aot_eager"), STEPS),
                               atol=0, rtol=0)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_warm_up_runs_both_branches_without_touching_the_state(name, monkeypatch):
    """The first call of a CUDA-graph state runs each cond's other branch too (capture needs every kernel
    launched once): branches must be pure, so outputs and cache decisions stay exactly those of a plain run."""
    case = CASES[name]
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * 3, num_inference_steps=STEPS)
    plain_model = case.model()
    plain = generate(case, cachepass.compile(plain_model, cfg, inner="aot_eager"), STEPS)
    cond_calls = []
    original = CondStep.run_both

    def counting_run_both(self, *args):
        cond_calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(CondStep, "__call__", counting_run_both)
    both_model = case.model()
    both = generate(case, cachepass.compile(both_model, cfg, inner="aot_eager"), STEPS)
    assert len(cond_calls) == 2 * STEPS * len(cachepass.stats(both_model))  # every call of every unit ran both
    torch.testing.assert_close(both, plain, atol=0, rtol=0)
    decisions = lambda m: [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(m)]  # noqa: E731
    assert decisions(both_model) == decisions(plain_model) and any(s for u in decisions(plain_model) for s in u)
