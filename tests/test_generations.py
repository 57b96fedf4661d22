"""Generation boundaries: calls that do not fit "N steps x streams" never shift later generations silently.

A new generation is recognised on the device from the timestep input (a timestep that does not
decrease starts one), so an interrupted generation, another step count, CFG off and two experts
sharing a schedule all give what a fresh ``reset()`` gives; calls that do not fit the config are
reported once and listed in ``stats().warnings``.
"""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

import cachepass
from cachepass.reference import StepCacheReference
from cachepass.runtime import current_state
from cachepass.sampling import sample
from models import CASES, generate, toy_config as cfg

STEPS = 12
CASE = CASES["toy"]


def compiled_model(config=None, model=None):
    model = model or CASE.model()
    return model, cachepass.compile(model, config or cfg(), inner="aot_eager")


def cached(model):
    return [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(model)]


def interrupted(fn, calls: int, steps: int = STEPS, seed: int = 5):
    """Run a generation and abort it (as Ctrl-C would) after ``calls`` model calls."""
    made = 0

    def counting(*args, **kwargs):
        nonlocal made
        if made == calls:
            raise KeyboardInterrupt
        made += 1
        return fn(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        generate(CASE, counting, steps, seed=seed)


def mismatch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cachepass" and r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def fresh_run():
    """Latents and cached steps of one generation on a fresh state (the expected result everywhere)."""
    torch._dynamo.reset()
    model, fn = compiled_model()
    out = generate(CASE, fn, STEPS)
    assert 0 < len(cached(model)[0][0]) < STEPS - 1
    return out, cached(model)


@pytest.mark.parametrize("calls", [16, 17, 1])
def test_interrupted_generation_does_not_shift_the_next_ones(fresh_run, calls, caplog):
    model, fn = compiled_model()
    interrupted(fn, calls)
    for _ in range(2):  # no reset(): every later generation is as on a fresh state
        torch.testing.assert_close(generate(CASE, fn, STEPS), fresh_run[0], atol=0, rtol=0)
        assert cached(model) == fresh_run[1]
    expected = f"ended after {(calls + 1) // 2} of num_inference_steps=12"
    assert any(expected in w for w in mismatch_warnings(caplog))
    (warning,) = cachepass.stats(model)[0].warnings  # as first seen, not rewritten by the full generations after
    assert expected in warning


def test_other_step_counts_are_whole_generations_and_reported_once(caplog):
    model, fn = compiled_model(cfg(num_inference_steps=10))
    short = [generate(CASE, fn, 6) for _ in range(3)]
    _, alone = compiled_model(cfg(num_inference_steps=10))
    torch.testing.assert_close(short[1], short[0], atol=0, rtol=0)
    torch.testing.assert_close(short[2], short[0], atol=0, rtol=0)
    torch.testing.assert_close(generate(CASE, alone, 6), short[0], atol=0, rtol=0)
    warnings = mismatch_warnings(caplog)
    assert len(warnings) == 1 and "ended after 6 of num_inference_steps=10" in warnings[0]
    assert ["stepcache: " + w for w in cachepass.stats(model)[0].warnings] == warnings

    long = [generate(CASE, fn, 14) for _ in range(2)]  # 14 steps on a 10-step config: no phantom generation
    torch.testing.assert_close(long[1], long[0], atol=0, rtol=0)
    assert max(cachepass.stats(model)[0].cached_steps) < 10  # steps past the config are not tabled
    assert any("more than num_inference_steps=10" in w for w in cachepass.stats(model)[0].warnings)


def test_cfg_off_on_a_separate_cfg_compile_runs_as_one_stream_and_is_reported(fresh_run, caplog):
    model, fn = compiled_model()
    one_stream = generate(CASE, fn, STEPS, separate_cfg=False)
    _, plain = compiled_model(cfg(separate_cfg=False))
    torch.testing.assert_close(one_stream, generate(CASE, plain, STEPS, separate_cfg=False), atol=0, rtol=0)
    assert any("separate_cfg=True, but a denoising step made one call" in w for w in mismatch_warnings(caplog))
    torch.testing.assert_close(generate(CASE, fn, STEPS), fresh_run[0], atol=0, rtol=0)  # back in phase
    assert cached(model) == fresh_run[1]


def test_separate_cfg_calls_on_a_one_stream_compile_compute_everything_and_are_reported(caplog):
    model, fn = compiled_model(cfg(separate_cfg=False))
    plain = generate(CASE, CASE.model(), STEPS)
    torch.testing.assert_close(generate(CASE, fn, STEPS), plain, atol=1e-6, rtol=1e-6)
    assert cached(model) == [([], [])]
    assert any("two calls shared one timestep" in w for w in mismatch_warnings(caplog))


def test_two_experts_sharing_one_schedule_repeat_exactly():
    """Wan 2.2: expert A runs the first half of the steps, expert B the rest; each has its own state."""
    experts = CASE.two_experts()
    config = cfg(warmup_steps=0)  # the pipeline's step count, as users write it
    compiled = [cachepass.compile(e, config, inner="aot_eager") for e in experts]
    calls = 0

    def pipeline(*args, **kwargs):
        nonlocal calls
        expert = compiled[0] if calls % (2 * STEPS) < STEPS else compiled[1]
        calls += 1
        return expert(*args, **kwargs)

    outputs, stats = [], []
    for seed in (1, 1, 1):
        outputs.append(generate(CASE, pipeline, STEPS, seed=seed))
        stats.append([cached(e) for e in experts])
    for gen in (1, 2):
        torch.testing.assert_close(outputs[gen], outputs[0], atol=0, rtol=0)
        assert stats[gen] == stats[0]
    assert all(steps for steps in stats[0][1][0])  # the second expert caches too


def test_inference_mode_recompile_continues_the_same_generation(fresh_run):
    """Latents made outside inference_mode: Dynamo recompiles at step 1; the state carries over."""
    model, fn = compiled_model()
    latents, cond, uncond = CASE.inputs(torch.Generator().manual_seed(1))
    counters.clear()
    with torch.inference_mode():
        out = sample(lambda x, sigma, kw: CASE.call(fn, x, sigma, kw), latents, cond, uncond, STEPS, guidance=3.0)
    assert counters["stats"]["unique_graphs"] == 2
    torch.testing.assert_close(out, fresh_run[0], atol=0, rtol=0)
    assert cached(model) == fresh_run[1]
    assert len({id(s) for s in cachepass.runtime.states_of(model)}) == 1


def test_reference_tells_generations_apart_the_same_way(fresh_run):
    reference = StepCacheReference(CASE.model(), cfg())
    interrupted(reference, 7)
    generate(CASE, reference, 6)
    torch.testing.assert_close(generate(CASE, reference, STEPS), fresh_run[0], atol=1e-5, rtol=1e-5)
    assert cached(reference) == fresh_run[1]


def test_timestep_input_is_found_from_the_graph_and_reported(caplog):
    with caplog.at_level(logging.INFO, logger="cachepass"):
        generate(CASE, compiled_model()[1], 1)
    assert any("timestep input: timestep (float32[1])" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match=r"timestep_input='t' is not a tensor input of the model; its tensor "
                                        r"inputs are \['encoder_hidden_states', 'hidden_states', 'timestep'\]"):
        generate(CASE, compiled_model(cfg(timestep_input="t"))[1], 1)


# ---------------------------------------------------------------------------- the API in natural order
def test_reset_and_stats_before_the_first_call():
    model, fn = compiled_model()
    cachepass.reset(fn)  # the natural `for prompt in prompts: reset(fn); generate()` loop
    assert cachepass.stats(fn) == []
    generate(CASE, fn, STEPS)
    assert cachepass.stats(fn)[0].cached_steps


def test_two_compiles_of_one_model_keep_their_own_stats_and_reset():
    model = CASE.model()
    loose, strict = cfg(threshold=0.08), cfg(threshold=0.02)
    a = cachepass.compile(model, loose, inner="aot_eager")
    b = torch.compile(model, backend="stepcache", fullgraph=True, dynamic=False,
                      options={"config": strict, "inner": "aot_eager"})
    generate(CASE, a, STEPS)
    generate(CASE, b, STEPS)
    assert cachepass.stats(a) != cachepass.stats(b)
    assert len(cachepass.stats(a)[0].cached_steps) > len(cachepass.stats(b)[0].cached_steps)
    b_stats = cachepass.stats(b)
    cachepass.reset(a)
    assert cachepass.stats(a)[0].cached_steps == [] and cachepass.stats(b) == b_stats


def test_state_is_freed_with_the_model():
    def round_trip():
        model, fn = compiled_model()
        generate(CASE, fn, 2)
        return weakref.ref(current_state(model).tensors[-1])

    refs = [round_trip() for _ in range(3)]
    gc.collect()
    assert [r() for r in refs] == [None, None, None]
