"""Runtime behaviour: stats, reset, generations, shape changes, and the reference's own API."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cache_dit_helpers import enable, unit_stats
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES, generate
from bench.tiny_models import toy_config as cfg
from cachepass import CachepassError
from cachepass.reference import StepCacheReference

STEPS = 12
CASE = CASES["toy"]


def summary(model):
    return [(u.name, u.cached_steps, u.cfg_cached_steps, u.residual_diffs, u.cfg_residual_diffs)
            for u in cachepass.stats(model)]


def test_stats_before_compiling_is_a_clear_error():
    with pytest.raises(CachepassError, match="has no stepcache state"):
        cachepass.stats(CASE.model())
    with pytest.raises(CachepassError, match="has no stepcache state"):
        cachepass.reset(CASE.model())
    with pytest.raises(TypeError, match="original nn.Module"):
        cachepass.stats("model")


def test_stats_match_cache_dit_fields_and_accept_compiled_or_original():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager")
    cachepass.reset(model)  # before the first call, on the original module (as a pipeline holds it): a no-op
    assert cachepass.stats(model) == []
    generate(CASE, compiled, STEPS)
    (unit,) = cachepass.stats(compiled)
    assert cachepass.stats(model) == [unit]
    assert unit.name == "blocks"
    assert unit.cached_steps and unit.cfg_cached_steps
    assert set(unit.residual_diffs) == {str(s) for s in range(1, STEPS)}  # every step past warmup is tested
    for step in unit.cached_steps:
        assert unit.residual_diffs[str(step)] < 0.04
    computed = set(range(1, STEPS)) - set(unit.cached_steps)
    assert any(unit.residual_diffs[str(s)] >= 0.04 for s in computed)


def test_each_generation_starts_at_step_zero_without_any_reset_call():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager")
    first = generate(CASE, compiled, STEPS)
    first_stats = summary(model)
    second = generate(CASE, compiled, STEPS)
    assert summary(model) == first_stats
    torch.testing.assert_close(second, first, atol=0, rtol=0)


def test_reset_mid_generation_restarts_at_step_zero():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager")
    fresh = generate(CASE, compiled, STEPS)
    fresh_stats = summary(model)
    generate(CASE, compiled, 5)  # an abandoned generation
    assert summary(model) != fresh_stats
    cachepass.reset(model)
    assert all(not u.cached_steps and not u.residual_diffs for u in cachepass.stats(model))
    again = generate(CASE, compiled, STEPS)
    assert summary(model) == fresh_stats
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


def test_without_num_inference_steps_the_timestep_starts_each_generation():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(num_inference_steps=None), inner="aot_eager")
    first = generate(CASE, compiled, STEPS)
    first_stats = summary(model)
    torch.testing.assert_close(generate(CASE, compiled, STEPS), first, atol=0, rtol=0)
    assert summary(model) == first_stats


def test_counting_calls_without_a_timestep_continues_until_reset():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(num_inference_steps=None, timestep_input=None), inner="aot_eager")
    first = generate(CASE, compiled, STEPS)
    first_stats = summary(model)
    generate(CASE, compiled, STEPS)
    assert summary(model) != first_stats  # steps 12..23 were counted on
    assert max(cachepass.stats(model)[0].cached_steps) >= STEPS
    cachepass.reset(model)
    torch.testing.assert_close(generate(CASE, compiled, STEPS), first, atol=0, rtol=0)
    assert summary(model) == first_stats


def test_new_resolutions_run_one_symbolic_program_each_with_its_own_state():
    """The default (dynamic=None): the second resolution compiles once with symbolic sizes and every later one
    runs that program, each resolution with its own cache state: the outputs and stats of a static compile."""
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager")
    widths = (1, 2, 3)
    counters.clear()
    outs, stats = {}, {}
    for times in widths:
        outs[times] = generate(CASE.at_size(times, dim=1), compiled, STEPS)
        stats[times] = summary(model)
    assert counters["stats"]["unique_graphs"] == 2  # the third resolution compiled nothing

    static_model = CASE.model()
    static = cachepass.compile(static_model, cfg(), inner="aot_eager", dynamic=False)
    counters.clear()
    for times in widths:
        torch.testing.assert_close(generate(CASE.at_size(times, dim=1), static, STEPS), outs[times], atol=0, rtol=0)
        assert summary(static_model) == stats[times]  # no state leaked between resolutions
    assert counters["stats"]["unique_graphs"] == 3  # dynamic=False: a static program per resolution
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(CASE.at_size(1, dim=1), compiled, STEPS)  # back to the first resolution: its own state again
    assert summary(model) == stats[1]


@pytest.mark.parametrize("name", ["wan", "hunyuan", "sd3", "flux"])
def test_every_non_tensor_input_of_a_symbolic_program_is_a_size_its_graph_sets_are_keyed_by(name, monkeypatch):
    """CUDA graphs copy every graph input that is neither static nor a size into their buffers, and refuse one that
    is not a tensor. FLUX's symbolic program takes its token count twice as an integer input and only the first was a
    size, so its second resolution ran without graphs (logged; 6% behind cache-dit + compiled blocks on an H200).
    Every integer input is a size now, and no family's program takes another kind of number."""
    from cachepass.state.sizes import SizeSymbols

    found = []
    of = SizeSymbols.of.__func__

    def recording(cls, example_inputs, needed=()):
        sizes = of(cls, example_inputs, needed)
        found.append((sizes, [i for i, value in enumerate(example_inputs) if not isinstance(value, torch.Tensor)]))
        return sizes

    monkeypatch.setattr(SizeSymbols, "of", classmethod(recording))
    case = CASES[name]
    compiled = cachepass.compile(case.model(), cfg(num_head_blocks=1, threshold=case.threshold), inner="aot_eager",
                                 scope="model")
    for times in (1, 2):
        generate(case.at_size(times), compiled, 2)
    (static, _), (symbolic, numbers) = found
    assert static is None and numbers
    assert symbolic.integer_inputs == frozenset(numbers)
    assert len(numbers) == (2 if name == "flux" else 1)  # FLUX's token count, twice


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_new_resolutions_of_other_block_patterns_match_static_compiles(name):
    """SD3's blocks read a size expression Dynamo builds once in the first block (`hoist_size_arithmetic`); FLUX's
    single blocks split two views of one buffer at a symbolic offset and carry text state."""
    sized = CASES[name].at_size
    config = cfg(num_head_blocks=2, num_tail_blocks=1, threshold=CASES[name].threshold)
    model = CASES[name].model()
    compiled = cachepass.compile(model, config, inner="aot_eager")
    for times in (1, 2, 3):
        out = generate(sized(times), compiled, STEPS)
        static_model = CASES[name].model()
        expected = generate(sized(times), cachepass.compile(static_model, config, inner="aot_eager", dynamic=False), STEPS)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert summary(model) == summary(static_model), f"x{times}"


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_symbolic_latents_compile_once_for_every_resolution(name):
    """``dynamic="latents"``: the latents' sizes are symbolic from the first call (Wan's frames, height and width; FLUX's
    packed tokens), so three resolutions, the first square, run one program, each equal to a static compile at its
    resolution, with its own cache state."""
    sized = CASES[name].at_size
    config = cfg(num_head_blocks=1, threshold=CASES[name].threshold)
    model = CASES[name].model()
    compiled = cachepass.compile(model, config, inner="aot_eager", dynamic="latents", scope="model")
    counters.clear()
    outs, stats = {}, {}
    for times in (1, 2, 3):
        outs[times] = generate(sized(times), compiled, STEPS)
        stats[times] = summary(model)
    assert counters["stats"]["unique_graphs"] == 1  # the second and third resolutions compiled nothing
    for times in (1, 2, 3):
        static_model = CASES[name].model()
        expected = generate(sized(times), cachepass.compile(static_model, config, inner="aot_eager", dynamic=False), STEPS)
        torch.testing.assert_close(outs[times], expected, atol=0, rtol=0)
        assert summary(static_model) == stats[times], f"x{times}"


def test_symbolic_latents_passed_by_position():
    """The latents found at their position in the forward's signature when not passed by name: a second token count
    runs the first call's program, with the results of uncompiled calls."""
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager", dynamic="latents")
    text = torch.randn(1, 5, 8)
    counters.clear()
    with torch.no_grad():
        for tokens in (16, 24):
            x = torch.randn(1, tokens, 4)
            torch.testing.assert_close(compiled(x, torch.tensor([999.0]), text), model(x, torch.tensor([999.0]), text))
            cachepass.reset(model)
    assert counters["stats"]["unique_graphs"] == 1


def test_symbolic_latents_name_what_they_cannot_take():
    with pytest.raises(ValueError, match=r"dynamic='tokens' is invalid; allowed: None, True, False or 'latents'"):
        cachepass.compile(CASE.model(), cfg(), dynamic="tokens")
    with pytest.raises(CachepassError, match=r"dynamic='latents' takes form='piecewise' \(here form='one-graph'\)"):
        cachepass.compile(CASE.model(), cfg(), dynamic="latents", form="one-graph")

    class NoLatents(torch.nn.Module):
        def forward(self, image, timestep):
            return image

    with pytest.raises(CachepassError, match=r"one of hidden_states, latents, .*NoLatents.forward takes \['image', "
                                             r"'timestep'\]"):
        cachepass.compile(NoLatents(), cfg(), dynamic="latents")


@pytest.mark.parametrize("name", ["wan", "hunyuan", "flux"])
def test_symbolic_from_the_first_call_with_the_blocks_as_leaves(name):
    """``cachepass.compile(..., dynamic=True)``: Wan's norms then read their eps as an input (a leaf takes the first
    block's), HunyuanVideo's middle region takes minus the text length and binds it from the text states, and FLUX's
    attention reads a float input by ``.item()`` in the first block only (`hoist_size_arithmetic` copies it into each
    block). All three failed to compile before; now one graph runs both sizes as static compiles do."""
    sized = CASES[name].at_size
    config = cfg(num_head_blocks=1, threshold=CASES[name].threshold)
    model = CASES[name].model()
    compiled = cachepass.compile(model, config, inner="aot_eager", dynamic=True, scope="model")
    counters.clear()
    outs, stats = [], []
    widths = (3, 5)  # Dynamo's duck sizing gives sizes equal at the first call one symbol: x1 is square, x2 the text's width
    for times in widths:
        outs.append(generate(sized(times), compiled, STEPS))
        stats.append(summary(model))
    assert counters["stats"]["unique_graphs"] == 1
    for times, out, stat in zip(widths, outs, stats):
        static_model = CASES[name].model()
        expected = generate(sized(times), cachepass.compile(static_model, config, inner="aot_eager", dynamic=False), STEPS)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        assert summary(static_model) == stat, f"x{times}"


def test_symbolic_sizes_from_the_first_call_and_in_the_one_graph_form():
    """torch.compile(..., dynamic=True) traces symbolic sizes at once; the one-graph form takes them too."""
    expected = generate(CASE.at_size(2, dim=1), cachepass.compile(CASE.model(), cfg(), inner="aot_eager",
                                                                  dynamic=False), STEPS)
    for form in ("piecewise", "one-graph"):
        model = CASE.model()
        compiled = torch.compile(model, backend="stepcache", fullgraph=True, dynamic=True,
                                 options={"config": cfg(), "inner": "aot_eager", "form": form})
        counters.clear()
        generate(CASE, compiled, STEPS)
        torch.testing.assert_close(generate(CASE.at_size(2, dim=1), compiled, STEPS), expected, atol=0, rtol=0)
        assert counters["stats"]["unique_graphs"] == 1, form


def test_two_instances_share_the_graph_but_not_the_state():
    """Dynamo reuses one graph for both models (Wan 2.2's two experts); each keeps its own cache state."""
    first, second = CASE.two_experts()
    solo = {}
    for name, model in (("first", first), ("second", second)):
        solo[name] = generate(CASE, StepCacheReference(model, cfg()), STEPS)
    compiled = {"first": cachepass.compile(first, cfg(), inner="aot_eager"),
                "second": cachepass.compile(second, cfg(), inner="aot_eager")}
    latents = {}
    counters.clear()
    # interleave the two generations call pair by call pair
    for name in solo:
        latents[name] = CASE.inputs(torch.Generator().manual_seed(1))
    sigmas = torch.linspace(1.0, 0.0, STEPS + 1)
    x = {name: latents[name][0] for name in solo}
    with torch.no_grad():
        for i in range(STEPS):
            for name in solo:
                _, cond, uncond = latents[name]
                c = CASE.call(compiled[name], x[name], sigmas[i], cond)
                u = CASE.call(compiled[name], x[name], sigmas[i], uncond)
                x[name] = x[name] + (sigmas[i + 1] - sigmas[i]) * (u + 3.0 * (c - u))
    assert counters["stats"]["unique_graphs"] == 1
    for name in solo:
        torch.testing.assert_close(x[name], solo[name], atol=1e-5, rtol=1e-5)
    assert summary(first) != summary(second)


def _short_uncond_prompt(case):
    """The case with an unconditional prompt two tokens shorter than the conditional one."""
    def inputs(g):
        latents, cond, uncond = case.inputs(g)
        shorter = {k: uncond[k][..., :-2, :] for k in ("encoder_hidden_states", "txt_ids") if k in uncond}
        return latents, cond, {**uncond, **shorter}

    return dataclasses.replace(case, inputs=inputs)


def test_cfg_prompts_of_different_lengths_share_the_state_when_no_text_state_is_carried():
    """The toy (like Wan) carries no text state: both prompt lengths run one state, as cache-dit decides."""
    case = _short_uncond_prompt(CASE)
    config = cfg()
    model = CASE.model()
    counters.clear()
    out = generate(case, cachepass.compile(model, config, inner="aot_eager"), STEPS)
    assert counters["stats"]["unique_graphs"] == 2
    theirs = CASE.model()
    enable("toy", theirs, config)
    expected = generate(case, theirs, STEPS)
    ours = cachepass.stats(model)[0]
    assert (ours.cached_steps, ours.cfg_cached_steps) == unit_stats(theirs)[0][:2]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cfg_prompts_of_different_lengths_are_refused_when_text_state_is_carried():
    case = _short_uncond_prompt(CASES["flux"])
    compiled = cachepass.compile(case.model(), cfg(), inner="eager")
    with pytest.raises(
        CachepassError,
        match=r"two CFG calls of one step have inputs of different shapes.*"
        r"u0.slot1.terms \[2, 2, 1, 5, 16\] vs \[2, 2, 1, 3, 16\].*pad the embeddings",
    ):
        generate(case, compiled, 1)


def test_a_new_resolution_after_an_unpaired_call_is_a_new_generation_not_a_prompt_error():
    model = CASE.model()
    compiled = cachepass.compile(model, cfg(), inner="aot_eager")
    latents, cond, _ = CASE.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        CASE.call(compiled, latents, torch.tensor(1.0), cond)  # interrupted after one call
    wide = dataclasses.replace(CASE, call=lambda fn, x, sigma, kw: CASE.call(fn, torch.cat([x, x], dim=1), sigma, kw)[:, :16])
    out = generate(wide, compiled, STEPS)
    torch.testing.assert_close(out, generate(wide, cachepass.compile(CASE.model(), cfg(), inner="aot_eager"), STEPS),
                               atol=0, rtol=0)


def test_reference_has_the_same_stats_and_reset_api():
    model = CASE.model()
    reference = StepCacheReference(model, cfg())
    with pytest.raises(CachepassError, match="has not been called"):
        cachepass.stats(reference)
    out = generate(CASE, reference, STEPS)
    stats = summary(reference)
    cachepass.reset(reference)
    assert all(not u.cached_steps for u in cachepass.stats(reference))
    torch.testing.assert_close(generate(CASE, reference, STEPS), out, atol=0, rtol=0)
    assert summary(reference) == stats


def test_the_one_graph_form_compiles_each_shape_static_by_default():
    """torch.cond rejected the branches' symbolic output strides of Wan's second shape (``16*Max(1, ...)``): the
    one-graph form takes dynamic=None as False (a static program per shape, as before symbolic sizes), and the
    backend reached with symbolic sizes says what to use instead of failing inside Dynamo."""
    case = CASES["wan"]
    config = cfg(num_head_blocks=1, threshold=case.threshold)
    compiled = cachepass.compile(case.model(), config, inner="aot_eager", form="one-graph")
    counters.clear()
    for times in (1, 2):
        out = generate(case.at_size(times), compiled, STEPS)
        expected = generate(case.at_size(times), cachepass.compile(case.model(), config, inner="aot_eager"), STEPS)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)  # the piecewise form's outputs
    assert counters["stats"]["unique_graphs"] == 2 + 2  # one static graph per shape; the piecewise form's two
    backend = torch.compile(case.model(), backend="stepcache", fullgraph=True,
                            options={"config": config, "inner": "aot_eager", "form": "one-graph"})
    # symbolic at its first call already: Dynamo's automatic-dynamic record of Wan's forward in this process says the
    # width changed; torch.compile's own wrapper around the error (cachepass.compile unwraps it)
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"one-graph.*symbolic sizes.*form='piecewise'"):
        for times in (1, 2):
            generate(case.at_size(times), backend, STEPS)
