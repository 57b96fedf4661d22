"""FastVideo's own Wan DiT (a tiny config of its ``WanTransformer3DModel``) under cachepass against cache-dit
applied to the same blocks: cached steps equal, latents within the inner compiler's tolerance.

Skipped when FastVideo cannot be imported (it is not a test dependency: it pins a torch of its own and
needs a torchvision built for the installed torch; `bench/NOTES.md` lists what it takes). Runs where it
is installed, e.g. ``pip install --no-deps fastvideo==0.2.1`` beside torch 2.11 and torchvision 0.26.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

os.environ.setdefault("FASTVIDEO_DISABLE_ATTENTION_COMPILE", "0")  # before fastvideo is imported (README)
os.environ.setdefault("FASTVIDEO_ATTENTION_BACKEND", "TORCH_SDPA")
pytest.importorskip("fastvideo.models.dits.wanvideo", reason="FastVideo is not installed", exc_type=ImportError)

import cachepass  # noqa: E402
from bench.fastvideo_wan import (  # noqa: E402
    build,
    config,
    denoising_stage,
    generate,
    inputs,
    run_stage,
    with_cache_dit,
)
from bench.variants import cache_dit_decisions  # noqa: E402
from cachepass.errors import CachepassError  # noqa: E402

TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32)
LAYERS = 4


@pytest.fixture(autouse=True)
def sdpa_attention_on_the_cpu(monkeypatch):
    """FastVideo's CPU platform names no attention backend (it runs on GPUs and MPS): give it SDPA's, which
    is what it picks on CUDA and MPS with FASTVIDEO_ATTENTION_BACKEND=TORCH_SDPA."""
    from fastvideo.platforms import AttentionBackendEnum, current_platform

    platform = type(current_platform)
    if not platform.get_attn_backend_cls(AttentionBackendEnum.TORCH_SDPA, 16, torch.float32):
        monkeypatch.setattr(platform, "get_attn_backend_cls",
                            classmethod(lambda cls, *args: "fastvideo.attention.backends.sdpa.SDPABackend"))


def tiny(dtype: torch.dtype = torch.float32, **overrides):
    return build(torch.device("cpu"), LAYERS, dtype, **TINY, **overrides)


def latents_and_text():
    return inputs(torch.device("cpu"), 5, 32, 32, torch.float32, text_dim=TINY["text_dim"], text_tokens=8)


@pytest.mark.parametrize("policy", ["static", "dynamic"])
def test_fastvideo_wan_dit_matches_cache_dit(policy, caplog):
    steps = 16
    cfg = dataclasses.replace(config(steps), num_head_blocks=1)  # FastVideo's flags' static mask, Fn=1 of 4
    if policy == "dynamic":  # the threshold decides after the warmup (no mask)
        cfg = cachepass.StepCacheConfig(num_head_blocks=1, num_tail_blocks=1, warmup_steps=4, threshold=0.3,
                                        separate_cfg=True, num_inference_steps=steps)
    x, cond, uncond = latents_and_text()

    theirs = with_cache_dit(tiny(), cfg)
    expected = generate(theirs, x, cond, uncond)
    (expected_steps, expected_cfg_steps), = cache_dit_decisions(theirs)

    ours = tiny()
    compiled = cachepass.compile(ours, cfg, inner="aot_eager")
    with caplog.at_level("INFO", logger="cachepass"):
        got = generate(compiled, x, cond, uncond, lambda: cachepass.reset(ours))
    assert f"block: 1 compiled for {LAYERS} pieces" in caplog.text  # its transposed tokens copied once, up front
    (unit,) = cachepass.stats(ours)
    assert expected_steps, "the config must cache some steps"
    assert (unit.cached_steps, unit.cfg_cached_steps) == (expected_steps, expected_cfg_steps)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_fastvideo_denoising_stage_with_cachepass_matches_cache_dit_and_needs_no_reset():
    """FastVideo's own denoising loop (its ``DenoisingStage``, UniPC scheduler, bf16) calling the compiled DiT
    as its transformer: the same cached steps and latents as cache-dit's DBCache on the same weights, and a
    second generation with no ``reset`` (the stage does not call one) repeats the first."""
    cfg = dataclasses.replace(config(16), num_head_blocks=1)
    x, cond, uncond = inputs(torch.device("cpu"), 5, 32, 32, torch.bfloat16, text_dim=TINY["text_dim"], text_tokens=8)

    theirs = with_cache_dit(tiny(torch.bfloat16), cfg)
    expected = run_stage(denoising_stage(theirs), x, cond, uncond)
    (expected_steps, expected_cfg_steps), = cache_dit_decisions(theirs)

    ours = tiny(torch.bfloat16)
    compiled = cachepass.compile(ours, cfg, inner="aot_eager")
    for _ in range(2):
        got = run_stage(denoising_stage(compiled), x, cond, uncond)
        (unit,) = cachepass.stats(ours)
        assert expected_steps == [9, 11, 13, 15]
        assert (unit.cached_steps, unit.cfg_cached_steps) == (expected_steps, expected_cfg_steps)
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)  # bf16


def test_compiling_fastvideos_pipeline_takes_each_calls_step_count():
    """``cachepass.compile(pipeline)`` on a FastVideo pipeline: the DiT of its denoising stage is compiled in
    place (in the stage, in ``modules`` and in the other stages that hold it), and each stage call is one
    generation of the batch's own step count: 16 then 10 steps on one compiled pipeline, each with the cached
    steps and latents of cache-dit configured for that count, with no warning and no recompile."""
    from fastvideo.pipelines.basic.wan.wan_pipeline import WanPipeline
    from fastvideo.pipelines.stages import LatentPreparationStage

    threshold = cachepass.StepCacheConfig(num_head_blocks=1, num_tail_blocks=1, warmup_steps=4, threshold=0.3,
                                          separate_cfg=True)  # no step count: each call brings its own
    x, cond, uncond = inputs(torch.device("cpu"), 5, 32, 32, torch.bfloat16, text_dim=TINY["text_dim"], text_tokens=8)
    dit = tiny(torch.bfloat16)
    stage = denoising_stage(dit)
    pipe = object.__new__(WanPipeline)  # its structure, without loading weights from a model folder
    pipe.modules = {"transformer": dit, "scheduler": stage.scheduler}
    pipe._stages = [LatentPreparationStage(scheduler=stage.scheduler, transformer=dit), stage]

    assert cachepass.compile(pipe, threshold, inner="aot_eager") is pipe
    assert stage.transformer is not dit and pipe.modules["transformer"] is stage.transformer
    assert pipe._stages[0].transformer is stage.transformer
    assert type(stage).__name__ == "DenoisingStage"  # FastVideo logs stages by their class name
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for steps in (16, 10):
        theirs = with_cache_dit(tiny(torch.bfloat16), dataclasses.replace(threshold, num_inference_steps=steps))
        expected = run_stage(denoising_stage(theirs), x, cond, uncond, steps)
        (expected_steps, expected_cfg_steps), = cache_dit_decisions(theirs)
        got = run_stage(stage, x, cond, uncond, steps)
        (unit,) = cachepass.stats(dit)
        assert cachepass.stats(pipe) == {"transformer": [unit]}  # the pipeline's own stats, by component
        assert expected_steps, f"{steps} steps: the config must cache some steps"
        assert (unit.cached_steps, unit.cfg_cached_steps) == (expected_steps, expected_cfg_steps), steps
        torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)  # bf16
        assert unit.warnings == []
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # the second count: no recompile

    masked = cachepass.compile(denoising_stage(tiny(torch.bfloat16)), dataclasses.replace(config(16), num_head_blocks=1),
                               inner="aot_eager")  # a static mask of 16 entries: the count is the mask's
    with pytest.raises(CachepassError, match="16 entries.*runs 10 steps on transformer"):
        run_stage(masked, x, cond, uncond, 10)
