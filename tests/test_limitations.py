"""Today's known sharp edges, pinned: each is a clear error, not a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

import cachepass
from cachepass import CachepassError, StepCacheConfig
from models import CASES

CASE = CASES["toy"]
CFG = StepCacheConfig(num_head_blocks=1, threshold=0.04, separate_cfg=True, num_inference_steps=8)


def backend_error(excinfo) -> BaseException:
    return getattr(excinfo.value, "inner_exception", excinfo.value)  # Dynamo wraps backend errors


def call_once(fn):
    latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
    return CASE.call(fn, latents, torch.tensor(1.0), cond)


def test_dynamic_shapes_are_refused_with_a_fix():
    model = CASE.model()
    compiled = torch.compile(model, backend="stepcache", dynamic=True, options={"config": CFG, "inner": "eager"})
    with pytest.raises(Exception) as e, torch.no_grad():
        call_once(compiled)
    error = backend_error(e)
    assert isinstance(error, cachepass.UnsupportedGraphError)
    assert "symbolic sizes" in str(error) and "dynamic=False" in str(error)


def test_grad_mode_is_refused():
    """Inference only: the state is updated in place, which autograd cannot differentiate through."""
    compiled = cachepass.compile(CASE.model(), CFG, inner="aot_eager")
    with pytest.raises(Exception) as e:
        call_once(compiled)
    error = backend_error(e)
    assert isinstance(error, CachepassError) and "torch.no_grad()" in str(error)


def test_torch_compile_without_dynamic_false_names_the_fix_on_the_second_shape():
    """torch.compile's default automatic dynamic shapes trace the second shape symbolically."""
    compiled = torch.compile(CASE.model(), backend="stepcache", fullgraph=True, options={"config": CFG, "inner": "eager"})
    latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        CASE.call(compiled, latents, torch.tensor(1.0), cond)
        with pytest.raises(Exception) as e:
            CASE.call(compiled, torch.cat([latents, latents], dim=1), torch.tensor(1.0), cond)
    error = backend_error(e)
    assert isinstance(error, cachepass.UnsupportedGraphError)
    assert "use cachepass.compile(model, config), or pass dynamic=False" in str(error)


def test_more_shapes_than_dynamos_recompile_limit_need_max_shapes():
    limit = torch._dynamo.config.recompile_limit
    try:
        compiled = cachepass.compile(CASE.model(), CFG, inner="eager", max_shapes=limit + 2)
        assert torch._dynamo.config.recompile_limit == limit + 2
        latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
        with torch.no_grad():
            for tokens in range(1, limit + 3):
                CASE.call(compiled, latents[:, :tokens + 1], torch.tensor(1.0), cond)
    finally:
        torch._dynamo.config.recompile_limit = limit
