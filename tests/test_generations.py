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
from bench.tiny_models import CASES, generate
from bench.tiny_models import toy_config as cfg
from cachepass.demo.sampling import sample
from cachepass.errors import CachepassError
from cachepass.reference import StepCacheReference
from cachepass.state.runtime import current_state

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
    return [r.getMessage() for r in caplog.records if r.name.startswith("cachepass") and r.levelno == logging.WARNING]


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
    assert any("separate_cfg=True, but some denoising steps made one call" in w for w in mismatch_warnings(caplog))
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
    assert len({id(s) for s in cachepass.state.runtime.states_of(model)}) == 1


def test_reference_tells_generations_apart_the_same_way(fresh_run):
    reference = StepCacheReference(CASE.model(), cfg())
    interrupted(reference, 7)
    generate(CASE, reference, 6)
    torch.testing.assert_close(generate(CASE, reference, STEPS), fresh_run[0], atol=1e-5, rtol=1e-5)
    assert cached(reference) == fresh_run[1]


def test_timestep_input_is_found_from_the_graph_and_reported(caplog):
    with caplog.at_level(logging.INFO, logger="cachepass"):
        generate(CASE, cachepass.compile(CASE.model(), cfg(), inner="aot_eager", scope="model"), 1)  # the graph's names
    assert any("timestep input: timestep (float32[1])" in r.getMessage() for r in caplog.records)
    with pytest.raises(Exception, match=r"timestep_input='t' is not a tensor input of the model; its tensor "
                                        r"inputs are \['encoder_hidden_states', 'hidden_states', 'timestep'\]"):
        generate(CASE, cachepass.compile(CASE.model(), cfg(timestep_input="t"), inner="aot_eager", scope="model"), 1)
    with pytest.raises(CachepassError, match=r"timestep_input='t' is not an argument of ToyDiT\.forward; its arguments"):
        cachepass.compile(CASE.model(), cfg(timestep_input="t"), inner="aot_eager")  # the default: named before any call


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


def img2img(fn, start: int, steps: int = STEPS, seed: int = 9) -> torch.Tensor:
    """An img2img run of ``CASE``: the schedule of ``steps`` steps entered at step ``start`` from an image
    noised to that level with new noise (strength ``1 - start / steps``), Euler to 0 with separate CFG."""
    from cachepass.demo.sampling import flow_sigmas

    g = torch.Generator().manual_seed(seed)
    image, cond, uncond = CASE.inputs(g)
    sigmas = flow_sigmas(steps)
    latents = (1 - sigmas[start]) * image + sigmas[start] * torch.randn(image.shape, generator=g)
    with torch.no_grad():
        for i in range(start, steps):
            v_cond, v_uncond = (CASE.call(fn, latents, sigmas[i], kw) for kw in (cond, uncond))
            latents = latents + (sigmas[i + 1] - sigmas[i]) * (v_uncond + 3.0 * (v_cond - v_uncond))
    return latents


def test_img2img_after_a_cancelled_generation_starts_a_new_one(caplog):
    """A video-to-video / img2img run starts mid-schedule, below the timestep a cancelled txt2img stopped at:
    its latents (new noise over an image) do not continue the cancelled ones, so it is a new generation,
    bit-identical to the same run on a fresh state, compiled and in the reference."""
    model, fn = compiled_model()
    _, fresh = compiled_model(model=CASE.model())
    expected = img2img(fresh, start=6)
    assert 0 < len(cached(fresh)[0][0])  # some of its steps cache: a wrongly continued cache would show
    interrupted(fn, 5)  # cancelled in its third step (sigma 10/12), above where the img2img starts (6/12)
    torch.testing.assert_close(img2img(fn, start=6), expected, atol=0, rtol=0)
    assert cached(model) == cached(fresh)
    assert any("ended after 3 of num_inference_steps=12" in w for w in mismatch_warnings(caplog))

    reference, fresh_reference = StepCacheReference(CASE.model(), cfg()), StepCacheReference(CASE.model(), cfg())
    interrupted(reference, 5)
    torch.testing.assert_close(img2img(reference, start=6), img2img(fresh_reference, start=6), atol=0, rtol=0)
    assert cached(reference) == cached(fresh_reference) == cached(fresh)


def test_a_step_whose_latents_continue_the_last_ones_is_the_next_step():
    """The continuity rule on its own: a denoising step keeps most of the latents' direction even in a
    2-step schedule's last step; new noise does not."""
    from cachepass.analysis.timestep import follows, latents_sample

    g = torch.Generator().manual_seed(0)
    noise, image, other = (torch.randn(16, 9, 60, 104, generator=g) for _ in range(3))
    n = noise.numel()
    sample = lambda x: latents_sample(x.double(), n, torch.arange(4096))  # noqa: E731
    for a, b in [(1.0, 0.75), (0.75, 0.0), (0.63, 0.0), (0.5, 0.45)]:  # x_sigma = (1 - sigma) image + sigma noise
        x_a, x_b = (1 - a) * image + a * noise, (1 - b) * image + b * noise
        assert follows(sample(x_b), sample(x_a)), (a, b)
    assert not follows(sample(0.4 * image + 0.6 * other), sample(0.15 * other + 0.85 * noise))
    assert not follows(sample(other), sample(noise))


def test_three_calls_per_step_are_reported_as_such_and_run_uncached(caplog):
    """Text and image guidance: three calls per step with one timestep and latents. Nothing caches (each
    extra call starts a generation), the result is the uncached model's, and the warning says so, not
    "set num_inference_steps=1" or "separate_cfg=False"."""
    from cachepass.demo.sampling import flow_sigmas

    model, fn = compiled_model()

    def three_calls(f):
        latents, cond, uncond = CASE.inputs(torch.Generator().manual_seed(1))
        sigmas = flow_sigmas(STEPS)
        with torch.no_grad():
            for i in range(STEPS):
                v_text, v_image, v_none = (CASE.call(f, latents, sigmas[i], kw) for kw in (cond, uncond, uncond))
                latents = latents + (sigmas[i + 1] - sigmas[i]) * (v_none + 2.0 * (v_text - v_image) + v_image - v_none)
        return latents

    torch.testing.assert_close(three_calls(fn), three_calls(CASE.model()), atol=1e-6, rtol=1e-6)
    assert cached(model) == [([], [])]
    (warning,) = mismatch_warnings(caplog)
    assert "three or more calls at one timestep" in warning


def test_a_call_while_another_call_of_the_model_runs_is_an_error():
    """Two threads on one compiled model would mix their generations' calls: a call that enters while another
    call of the same state is running is refused (here the running call is held open by hand)."""
    model, fn = compiled_model()
    generate(CASE, fn, 1)
    with current_state(model).one_call_at_a_time():  # as a call in another thread would
        with pytest.raises(cachepass.CachepassError, match="called while another call of it was running"):
            generate(CASE, fn, 1)
    generate(CASE, fn, 1)  # the state is free again


def test_latents_that_diverge_to_nan_are_named_not_taken_for_an_interrupted_generation(caplog):
    """NaN latents follow nothing (their cosine is NaN), so each call starts a generation: the warning says
    why, instead of "a generation ended after 1 of 12 steps"."""
    class Diverging(type(CASE.model())):
        def forward(self, hidden_states, timestep, encoder_hidden_states):
            out = super().forward(hidden_states, timestep, encoder_hidden_states)
            return torch.where(timestep < 500, out * float("nan"), out)  # the second half of the steps diverges

    torch.manual_seed(0)
    model = Diverging().eval()
    fn = cachepass.compile(model, cfg(), inner="aot_eager")
    with caplog.at_level("WARNING", logger="cachepass"):
        generate(CASE, fn, STEPS)
    warnings = mismatch_warnings(caplog)
    assert len(warnings) == 1 and "latents with NaN or Inf entered the model" in warnings[0], warnings
