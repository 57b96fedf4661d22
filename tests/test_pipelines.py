"""Pipelines in one line: ``cachepass.compile(pipe, cfg)`` on diffusers pipelines built offline with tiny
components, held to ``cache_dit.enable_cache(pipe, ...)`` on the same pipeline."""

from __future__ import annotations

import dataclasses

import cache_dit
import pytest
import torch
from cache_dit_helpers import unit_stats
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES, toy_config
from cachepass.api import compile_options
from cachepass.state.runtime import states_of

STEPS = 8


def wan_pipeline():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=CASES["wan"].model(), scheduler=scheduler)


def run(pipe, height: int = 64, width: int = 64, **options) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    prompt, negative = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=height, width=width, num_frames=9,
                    num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(1), **options).frames


def test_a_wan_pipeline_compiles_in_one_line_and_matches_cache_dit_on_it():
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3,
                     num_inference_steps=STEPS)
    ours = wan_pipeline()
    assert cachepass.compile(ours, cfg, inner="aot_eager") is ours
    # the component was replaced by its compiled module; the step count comes from each call
    assert compile_options(ours.transformer).config == dataclasses.replace(cfg, num_inference_steps=None)
    # the natural order on the pipeline itself: stats, reset and release before anything ran
    assert cachepass.stats(ours) == {"transformer": []}
    cachepass.reset(ours)
    assert cachepass.release(ours) == 0
    latents = [run(ours) for _ in range(2)]
    assert cachepass.stats(ours) == {"transformer": cachepass.stats(ours.transformer)}

    theirs = wan_pipeline()
    db, calibrator = cfg.to_cache_dit()
    cache_dit.enable_cache(theirs, cache_config=db, calibrator_config=calibrator)
    expected = [run(theirs)]
    cache_dit.refresh_context(theirs.transformer)
    expected.append(run(theirs))

    decisions = [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(ours.transformer)]
    assert decisions == [(c, u) for c, u, _, _ in unit_stats(theirs.transformer)]
    assert any(steps for unit in decisions for steps in unit)
    for got, want in zip(latents, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    near_the_uncached_run(latents[0], run(wan_pipeline()))


def test_a_pipeline_compiled_with_offload_streams_its_dits_blocks_and_equals_the_resident_one():
    """``offload=`` on a pipeline goes to each DiT; ``cachepass.offload_stats(pipe)`` reports each by component name
    (None before the first call); the latents equal the same pipeline compiled without offload (aot_eager: exact)."""
    from cachepass.offload.runtime import block_lists_paths, model_bytes

    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3,
                     num_inference_steps=STEPS)
    ours = wan_pipeline()
    blocks, nonblock = model_bytes(ours.transformer, block_lists_paths(ours.transformer, ("blocks",)))
    budget = nonblock + 2 * max(blocks.values())  # two slots, every block streamed
    cachepass.compile(ours, cfg, inner="aot_eager", offload={"budget": budget, "allow_cpu": True})
    assert cachepass.offload_stats(ours) == {"transformer": None}
    got = run(ours)
    (name, stats), = cachepass.offload_stats(ours).items()
    assert name == "transformer" and len(stats.residency.slot_of) == len(blocks) and stats.counters.bytes_moved > 0
    resident = cachepass.compile(wan_pipeline(), cfg, inner="aot_eager")
    assert torch.equal(got, run(resident))
    with pytest.raises(TypeError, match="offload_stats expects .* got str"):
        cachepass.offload_stats("transformer")
    with pytest.raises(TypeError, match=r"explain traces one module .* a DiT of the pipeline \(transformer\)"):
        cachepass.explain(ours)


@pytest.mark.parametrize("dynamic", [None, "latents"])
def test_a_new_resolution_mid_session_gives_what_a_fresh_compile_gives(dynamic):
    """64x64, then 32x48, then 64x64 again on one compiled pipeline: each generation equals a fresh compile's at its
    size (its own state per shape, no leftover from the other), with no warning. ``dynamic="latents"`` does it with
    the first call's compile alone."""
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3,
                     num_inference_steps=STEPS)
    ours = cachepass.compile(wan_pipeline(), cfg, inner="aot_eager", dynamic=dynamic)
    counters.clear()
    first, other, again = run(ours), run(ours, 32, 48), run(ours)
    assert counters["stats"]["unique_graphs"] == (2 if dynamic is None else 1)
    assert other.shape != first.shape and torch.equal(again, first)
    assert torch.equal(other, run(cachepass.compile(wan_pipeline(), cfg, inner="aot_eager"), 32, 48))
    assert [u.warnings for u in cachepass.stats(ours)["transformer"]] == [[]]


def test_a_pipeline_compiled_with_scope_blocks_gives_the_whole_model_compiles_generations():
    """``scope="blocks"`` through a pipeline: the DiT is compiled in place (the component itself), each call begins a
    generation of its step count, and two generations equal the whole-model compile's, decisions included."""
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3,
                     num_inference_steps=STEPS)
    whole = cachepass.compile(wan_pipeline(), cfg, inner="aot_eager")
    expected = [run(whole) for _ in range(2)]
    pipe = wan_pipeline()
    transformer = pipe.transformer
    assert cachepass.compile(pipe, cfg, inner="aot_eager", scope="blocks") is pipe and pipe.transformer is transformer
    assert cachepass.stats(pipe) == {"transformer": []}
    for want in expected:
        assert torch.equal(run(pipe), want)
    assert cachepass.stats(pipe) == cachepass.stats(whole) and cachepass.stats(pipe)["transformer"][0].cached_steps


def test_without_a_config_the_family_gives_the_cfg_layout():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    wan = cachepass.compile(wan_pipeline())
    assert compile_options(wan.transformer).config == cachepass.StepCacheConfig(separate_cfg=True)
    assert cachepass.release(wan) == 0  # a pipeline's DiT components; no CUDA graphs on the CPU
    flux = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=CASES["flux"].model())
    assert compile_options(cachepass.compile(flux).transformer).config.separate_cfg is False

    class MyVideoPipeline(type(wan_pipeline())):
        pass

    with pytest.raises(cachepass.CachepassError, match=r"does not know the CFG layout of MyVideoPipeline: pass a config"):
        cachepass.compile(MyVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=CASES["wan"].model(),
                                          scheduler=wan_pipeline().scheduler))


def test_one_compiled_pipeline_takes_the_calls_users_make():
    """Step counts 10, 6 and 14, CFG off (guidance 1) and two videos per prompt, one after another on one compiled
    pipeline whose config says 8 steps: each call's count is device state, so each result equals the transformer
    compiled alone with that count, with no recompile for a step count (a new batch size compiles once) and no
    warning."""
    import logging

    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3, num_inference_steps=8)
    calls = [dict(num_inference_steps=10), dict(num_inference_steps=6), dict(num_inference_steps=14),
             dict(num_inference_steps=8, guidance_scale=1.0), dict(num_inference_steps=8, num_videos_per_prompt=2)]

    def call(pipe, options):
        g = torch.Generator().manual_seed(0)
        prompt, negative = torch.randn(1, 7, 16, generator=g), torch.randn(1, 7, 16, generator=g)
        with torch.no_grad():
            return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64, num_frames=9,
                        output_type="latent", generator=torch.Generator().manual_seed(1),
                        **{"guidance_scale": 5.0, **options}).frames

    shared = cachepass.compile(wan_pipeline(), cfg, inner="aot_eager")
    logger = logging.getLogger("cachepass")
    warned = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warned.append
    logger.addHandler(handler)
    try:
        got = [call(shared, options) for options in calls[:3]]
        with torch.compiler.set_stance("fail_on_recompile"):  # the step count is no compile-time constant
            got.append(call(shared, calls[0]))
        got += [call(shared, options) for options in calls[3:]]
    finally:
        logger.removeHandler(handler)
    def alone(options):  # the transformer compiled by itself, its config's count the call's
        pipe = wan_pipeline()
        count = dataclasses.replace(cfg, num_inference_steps=options["num_inference_steps"])
        pipe.transformer = cachepass.compile(pipe.transformer, count, inner="aot_eager")
        return call(pipe, options)

    expected = [alone(options) for options in [*calls[:3], calls[0], *calls[3:]]]
    for options, a, b in zip([*calls[:3], calls[0], *calls[3:]], got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, o=options: f"{o}: {m}")
    assert [r.getMessage() for r in warned if "one call" not in r.getMessage()] == []  # CFG off: a note, right result


def test_a_flux_pipeline_one_call_per_step_matches_cache_dit_on_it():
    """Guidance-distilled: one transformer call per step (separate_cfg=False), guidance embedded; two block lists."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    def flux_pipeline():
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                            text_encoder_2=None, tokenizer_2=None, transformer=CASES["flux"].model())

    def run_flux(pipe):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return pipe(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                        height=64, width=64, num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                        generator=torch.Generator().manual_seed(1)).images

    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["flux"].threshold, separate_cfg=False,
                     num_inference_steps=STEPS)
    decisions = matches_cache_dit(flux_pipeline, run_flux, cfg)
    assert len(decisions) == 2 and any(unit[0] for unit in decisions)


def test_a_batched_cfg_pipeline_matches_cache_dit_on_it():
    """SD3 batches both CFG branches into one call of batch 2 (separate_cfg=False, the family default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    def sd3_pipeline():
        return StableDiffusion3Pipeline(transformer=CASES["sd3"].model(), scheduler=FlowMatchEulerDiscreteScheduler(),
                                        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                        tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)

    def run_sd3(pipe):
        g = torch.Generator().manual_seed(0)
        prompt = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
                      pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                      negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))
        with torch.no_grad():
            return pipe(**prompt, height=64, width=64, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator().manual_seed(1)).images

    assert compile_options(cachepass.compile(sd3_pipeline()).transformer).config.separate_cfg is False
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["sd3"].threshold * 3, separate_cfg=False,
                     num_inference_steps=STEPS)
    decisions = matches_cache_dit(sd3_pipeline, run_sd3, cfg)
    assert any(unit[0] for unit in decisions)


def matches_cache_dit(build, run, cfg) -> list[tuple[list[int], list[int]]]:
    """``run`` on a pipeline from ``build`` compiled with ``cfg`` and on one under ``cache_dit.enable_cache``: the same
    cached steps per unit and stream, latents within 1e-5. Returns the decisions."""
    ours = cachepass.compile(build(), cfg, inner="aot_eager")
    got = run(ours)
    theirs = build()
    db, calibrator = cfg.to_cache_dit()
    cache_dit.enable_cache(theirs, cache_config=db, calibrator_config=calibrator)
    expected = run(theirs)
    decisions = [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(ours.transformer)]
    assert decisions == [(c, u) for c, u, _, _ in unit_stats(theirs.transformer)]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    near_the_uncached_run(got, run(build()))
    return decisions


def near_the_uncached_run(cached: torch.Tensor, uncached: torch.Tensor) -> None:
    """A cached generation approximates the same pipeline run without any cache: it differs (steps were reused, not
    recomputed) by a small relative L2 distance."""
    distance = ((cached - uncached).norm() / uncached.norm()).item()
    assert 0 < distance < 0.05, distance  # 0.005-0.015 here


def wan22_pipeline():
    from diffusers import UniPCMultistepScheduler, WanPipeline

    high, low = CASES["wan"].two_experts()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=high, transformer_2=low,
                       scheduler=scheduler, boundary_ratio=0.6)


def test_wan22_two_experts_each_run_their_share_and_match_cache_dit():
    """Wan 2.2: ``transformer`` takes the steps at or above the boundary, ``transformer_2`` the rest, each with its
    own state; the pipeline call gives each expert its step count from the boundary (no mismatch warning)."""
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["wan"].threshold * 3,
                     num_inference_steps=None)
    ours = cachepass.compile(wan22_pipeline(), cfg, inner="aot_eager")
    given = {}

    def record_counts(pipe, step, t, tensors):  # what each expert's state runs, as the call goes
        given.update({name: states_of(getattr(pipe, name))[-1].num_steps for name in ("transformer", "transformer_2")
                      if states_of(getattr(pipe, name))})
        return tensors

    got = run(ours, callback_on_step_end=record_counts)
    theirs = wan22_pipeline()
    db, calibrator = cfg.to_cache_dit()
    cache_dit.enable_cache(theirs, cache_config=db, calibrator_config=calibrator)
    expected = run(theirs)
    states = {name: states_of(getattr(ours, name))[-1] for name in ("transformer", "transformer_2")}
    assert sum(given.values()) == STEPS and min(given.values()) > 0, given
    for name, state in states.items():  # the count each expert was given is the count it ran
        assert int(state["clock.step"]) + 1 == given[name], name
    by_expert = cachepass.stats(ours)  # the pipeline's stats: each expert's by its component name
    assert list(by_expert) == ["transformer", "transformer_2"]
    for name in ("transformer", "transformer_2"):
        decisions = [(u.cached_steps, u.cfg_cached_steps) for u in by_expert[name]]
        assert decisions == [(c, u) for c, u, _, _ in unit_stats(getattr(theirs, name))], name
        assert states[name].warnings() == [], name
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_a_mask_for_another_step_count_is_refused_before_the_call():
    mask = (1, 1, 1, 0, 1, 0, 1, 1)
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, num_inference_steps=8, steps_computation_mask=mask,
                     steps_computation_policy="static")
    pipe = cachepass.compile(wan_pipeline(), cfg, inner="aot_eager")
    with pytest.raises(cachepass.CachepassError, match=r"steps_computation_mask has 8 entries \(num_inference_steps=8\), "
                                                        r"but this call of WanPipeline runs 6 steps on transformer"):
        with torch.no_grad():
            pipe(prompt_embeds=torch.randn(1, 7, 16), negative_prompt_embeds=torch.randn(1, 7, 16), height=64, width=64,
                 num_frames=9, num_inference_steps=6, output_type="latent")
    assert compile_options(pipe.transformer).config.num_inference_steps == 8  # a mask keeps its count


def flux_parts():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=2, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, shift_factor=0.0, scaling_factor=1.0)
    return dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.eval(), text_encoder=None, tokenizer=None,
                text_encoder_2=None, tokenizer_2=None)


def test_img2img_right_after_an_interrupted_txt2img_equals_a_fresh_run():
    """txt2img stopped in step 3 through ``callback_on_step_end`` (``pipe._interrupt``), then img2img (strength 0.6)
    through ``FluxImg2ImgPipeline.from_pipe`` on the same compiled transformer: equal to img2img on a fresh compile."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=CASES["flux"].threshold, separate_cfg=False,
                     num_inference_steps=None)
    g = torch.Generator().manual_seed(0)
    prompt = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    image = torch.rand(1, 3, 16, 16, generator=g)

    def stop_in_step_3(pipe, step, t, tensors):
        pipe._interrupt = step == 2
        return tensors

    def img2img(pipe):
        with torch.no_grad():
            return FluxImg2ImgPipeline.from_pipe(pipe)(**prompt, image=image, strength=0.6, height=16, width=16,
                                                       num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                                                       generator=torch.Generator().manual_seed(2)).images

    txt2img = cachepass.compile(FluxPipeline(transformer=CASES["flux"].model(), **flux_parts()), cfg, inner="aot_eager")
    with torch.no_grad():
        txt2img(**prompt, height=16, width=16, num_inference_steps=STEPS, guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(1), callback_on_step_end=stop_in_step_3)
    got = img2img(txt2img)
    fresh = cachepass.compile(FluxPipeline(transformer=CASES["flux"].model(), **flux_parts()), cfg, inner="aot_eager")
    torch.testing.assert_close(got, img2img(fresh), atol=0, rtol=0)
    assert cachepass.stats(txt2img.transformer) == cachepass.stats(fresh.transformer)  # the same generation
