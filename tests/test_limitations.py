"""Today's known sharp edges, pinned: each is a clear error, not a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

import cachepass
from bench.tiny_models import CASES
from cachepass import CachepassError, StepCacheConfig

CASE = CASES["toy"]
CFG = StepCacheConfig(num_head_blocks=1, threshold=0.04, separate_cfg=True, num_inference_steps=8)


def backend_error(excinfo) -> BaseException:
    return getattr(excinfo.value, "inner_exception", excinfo.value)  # Dynamo wraps backend errors


def call_once(fn):
    latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
    return CASE.call(fn, latents, torch.tensor(1.0), cond)


def test_grad_mode_is_refused():
    """Inference only: the state is updated in place, which autograd cannot differentiate through."""
    compiled = cachepass.compile(CASE.model(), CFG, inner="aot_eager")
    with pytest.raises(Exception) as e:
        call_once(compiled)
    error = backend_error(e)
    assert isinstance(error, CachepassError) and "torch.no_grad()" in str(error)


def test_more_shapes_than_dynamos_recompile_limit_need_max_shapes():
    limit = torch._dynamo.config.recompile_limit
    try:
        compiled = cachepass.compile(CASE.model(), CFG, inner="eager", max_shapes=limit + 2, dynamic=False)
        assert torch._dynamo.config.recompile_limit == limit + 2
        latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
        with torch.no_grad():
            for tokens in range(1, limit + 3):
                CASE.call(compiled, latents[:, :tokens + 1], torch.tensor(1.0), cond)
    finally:
        torch._dynamo.config.recompile_limit = limit


@pytest.mark.slow  # multi-minute on 2 cores; CI runs it
def test_more_configs_of_one_class_than_the_recompile_limit_raise_it_and_say_so(caplog):
    """One graph per config and shape: nine configs at one shape pass Dynamo's limit of eight; each compile's
    first call makes room for its graph (logged), and a limit hit names the cause and the fix."""
    limit = torch._dynamo.config.recompile_limit
    latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
    try:
        with caplog.at_level("INFO", logger="cachepass"):
            for i in range(limit + 1):
                config = StepCacheConfig(num_head_blocks=1, threshold=0.04 + i / 1000, num_inference_steps=8)
                with torch.no_grad():
                    call_once(cachepass.compile(CASE.model(), config, inner="eager", scope="model"))
        assert torch._dynamo.config.recompile_limit == limit + 1
        assert f"a new config of ToyDiT: {limit} graphs of its forward exist" in caplog.text
        compiled = cachepass.compile(CASE.model(), CFG, inner="eager", scope="model")
        with torch.no_grad():
            call_once(compiled)  # its first call: room made for its graph
            with pytest.raises(CachepassError, match=r"recompile limit .* every input shape of every config compiled "
                                                     r"for ToyDiT in this process .*max_shapes=N"):
                CASE.call(compiled, latents[:, :5], torch.tensor(1.0), cond)  # a new shape: over the limit
        with pytest.raises(CachepassError, match=r"called with gradients enabled.*torch.no_grad\(\)"):
            call_once(compiled)
    finally:
        torch._dynamo.config.recompile_limit = limit


def test_backend_errors_come_as_cachepass_errors_without_dynamos_wrapper():
    compiled = cachepass.compile(CASE.model(), StepCacheConfig(num_head_blocks=6), inner="eager")
    with pytest.raises(cachepass.BlockDiscoveryError) as e, torch.no_grad():
        call_once(compiled)
    assert "report a bug to PyTorch" not in str(e.value) and "num_head_blocks" in str(e.value)


def test_a_device_that_is_not_one_is_named():
    with pytest.raises(ValueError, match=r"cachepass.compile device='gpu0' is invalid; allowed: a torch.device"):
        cachepass.compile(CASE.model(), CFG, device="gpu0")


def test_the_one_graph_form_refuses_floats_read_inside_the_cond():
    """Under dynamic=True Dynamo passes Wan's norm eps as tensor inputs; read inside torch.cond's branch they are
    data-dependent for the one graph's compile (a guard on ``zuf0`` in layer_norm). Refused, naming the way out."""
    case = CASES["wan"]
    compiled = cachepass.compile(case.model(), StepCacheConfig(num_head_blocks=1), inner="aot_eager",
                                 form="one-graph", dynamic=True)
    g = torch.Generator().manual_seed(0)
    x, cond, _ = case.inputs(g)
    with torch.no_grad(), pytest.raises(CachepassError, match=r"form='one-graph'.*eps.*form='piecewise'"):
        case.call(compiled, x, torch.tensor(0.9), cond)
