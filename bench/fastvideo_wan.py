"""FastVideo's own Wan DiT under cachepass, against FastVideo uncached and cache-dit applied by hand (issue #24).

    FASTVIDEO_DISABLE_ATTENTION_COMPILE=0 FASTVIDEO_ATTENTION_BACKEND=TORCH_SDPA \\
        python -m bench.fastvideo_wan --frames 9 --out bench/results

FastVideo 0.2.1's ``WanTransformer3DModel`` with the Wan2.1-1.3B architecture and random bf16 weights
(no download), built directly, so FastVideo's own DiT offload is off (its pipeline adds those hooks).
Every variant runs FastVideo's own denoising loop (``DenoisingStage`` of its Wan2.1 T2V 480p pipeline config,
with its flow UniPC scheduler: 16 steps, separate CFG, bf16 autocast; `run_stage`) with a static cache mask:

- ``uncached``: ``torch.compile`` of the DiT (the reference latents);
- ``cache-dit``: cache-dit's DBCache on the blocks (``BlockAdapter``, Pattern_2), blocks compiled;
- ``cachepass``: ``cachepass.compile(stage, cfg)`` with no other option (the stage's DiT compiled in place,
  conditional CUDA graphs; each stage call a generation, no reset);
- ``cachepass-offload``: the same with ``offload={"budget": ...}`` and conditional graphs.

Reported per variant: seconds per generation (median, min-max, repeats interleaved), cached steps,
and PSNR / SSIM of the decoded-free latents against ``uncached`` (pytorch-msssim, as FastVideo's
own cache-dit A/B harness does, on the latent frames scaled to [0, 1]).

Needs, beside cachepass: fastvideo==0.2.1 (``--no-deps``), torchvision built for the installed torch,
transformers, einops, cloudpickle, imageio, remote_pdb, ftfy, psutil, diffusers, cache-dit and
pytorch-msssim (`bench/NOTES.md`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import statistics
import sys
import time

import torch

import cachepass
from bench.compare import device_name
from bench.timing import count_syncs, synchronize, timed
from bench.variants import cache_dit_decisions
from cachepass.demo.sampling import sample
from cachepass.offload.plan import parse_bytes

STEPS, GUIDANCE, SHIFT = 16, 5.0, 3.0


WAN_1_3B = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, text_dim=4096, freq_dim=256)


def build(device: torch.device, layers: int, dtype: torch.dtype = torch.bfloat16, **arch):
    """FastVideo's Wan DiT with seeded weights: the Wan2.1-1.3B architecture, or ``arch``'s fields instead."""
    from fastvideo.configs.models.dits.wanvideo import WanVideoArchConfig, WanVideoConfig
    from fastvideo.distributed.parallel_state import maybe_init_distributed_environment_and_model_parallel
    from fastvideo.models.dits.wanvideo import WanTransformer3DModel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    maybe_init_distributed_environment_and_model_parallel(1, 1)
    config = WanVideoConfig(arch_config=WanVideoArchConfig(num_layers=layers, **{**WAN_1_3B, **arch}))
    with torch.device(device):
        model = WanTransformer3DModel(config=config, hf_config={})
    initialize(model)
    return model.to(device, dtype).eval()


def initialize(model: torch.nn.Module) -> None:
    """The same weights in every build: FastVideo's layers allocate with ``torch.empty`` (a checkpoint fills
    them), which left each build with whatever the allocator reused (NaNs included)."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm scales 1, biases 0
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=generator, device=p.device) / p[0].numel() ** 0.5)


def config(steps: int) -> cachepass.StepCacheConfig:
    """FastVideo's --cachedit-* defaults for Wan with a static mask: compute steps 0-7 and every other one after."""
    mask = [1] * 8 + [1, 0] * ((steps - 8) // 2) + [1] * ((steps - 8) % 2)
    return cachepass.StepCacheConfig(num_head_blocks=8, num_tail_blocks=0, warmup_steps=8, separate_cfg=True,
                                     num_inference_steps=steps, steps_computation_mask=mask,
                                     steps_computation_policy="static")


def with_cache_dit(model: torch.nn.Module, cfg: cachepass.StepCacheConfig) -> torch.nn.Module:
    """cache-dit's DBCache (and TaylorSeer, if ``cfg`` has it) on FastVideo's DiT blocks (``BlockAdapter``,
    Pattern_2), with ``cfg``'s settings translated."""
    import cache_dit
    from cache_dit import BlockAdapter, ForwardPattern

    db, taylor = cfg.to_cache_dit()
    cache_dit.enable_cache(BlockAdapter(transformer=model, blocks=model.blocks, forward_pattern=ForwardPattern.Pattern_2),
                           cache_config=db, calibrator_config=taylor)
    return model


def inputs(device: torch.device, frames: int, height: int, width: int, dtype: torch.dtype = torch.bfloat16,
           text_dim: int = 4096, text_tokens: int = 512):
    g = torch.Generator().manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    latents = torch.randn(1, 16, latent_frames, height // 8, width // 8, generator=g).to(device, dtype)
    cond = torch.randn(1, text_tokens, text_dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, text_tokens, text_dim, generator=g).to(device, dtype)
    return latents, cond, uncond


def generate(fn, latents, cond, uncond, before=lambda: None) -> torch.Tensor:
    from fastvideo.forward_context import set_forward_context

    before()

    def velocity(x, sigma, kwargs):
        t = (sigma * 1000).to(x.device, torch.float32).reshape(1)
        with set_forward_context(current_timestep=t, attn_metadata=None):
            return fn(hidden_states=x, encoder_hidden_states=kwargs["encoder_hidden_states"], timestep=t)

    with torch.no_grad():
        return sample(velocity, latents, {"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond}, STEPS,
                      guidance=GUIDANCE, shift=SHIFT)


@functools.cache
def _fastvideo_args():
    from fastvideo.configs.pipelines.wan import WanT2V480PConfig
    from fastvideo.fastvideo_args import FastVideoArgs

    args = FastVideoArgs(model_path="(built in process)", pipeline_config=WanT2V480PConfig())
    args.model_loaded["transformer"] = True  # the stage would otherwise load it from model_path
    return args


def denoising_stage(transformer):
    """FastVideo's ``DenoisingStage`` over ``transformer`` (the DiT, or what ``cachepass.compile`` returned) with
    its flow UniPC scheduler (shift ``SHIFT``)."""
    from fastvideo.models.schedulers.scheduling_flow_unipc_multistep import FlowUniPCMultistepScheduler
    from fastvideo.pipelines.stages.denoising import DenoisingStage

    return DenoisingStage(transformer=transformer, scheduler=FlowUniPCMultistepScheduler(shift=SHIFT))


def run_stage(stage, latents, cond, uncond, steps: int = STEPS) -> torch.Tensor:
    """One generation of ``steps`` through ``stage.forward``, as FastVideo's pipeline runs it. On the CPU,
    FastVideo's platform names "mps" as the local device: the stage's device is the latents' there."""
    from fastvideo.pipelines.pipeline_batch_info import ForwardBatch
    from fastvideo.pipelines.stages import denoising

    stage.scheduler.set_timesteps(steps, device=latents.device)
    batch = ForwardBatch(data_type="video", latents=latents.clone(), prompt_embeds=[cond],
                         negative_prompt_embeds=[uncond], do_classifier_free_guidance=True, guidance_scale=GUIDANCE,
                         num_inference_steps=steps, timesteps=stage.scheduler.timesteps)
    with torch.no_grad(), _local_device(denoising, latents.device):
        return stage.forward(batch, _fastvideo_args()).latents


@contextlib.contextmanager
def _local_device(module, device: torch.device):
    if device.type != "cpu":
        yield
        return
    saved = module.get_local_torch_device
    module.get_local_torch_device = lambda: device
    try:
        yield
    finally:
        module.get_local_torch_device = saved


def variants(device: torch.device, layers: int, budget_blocks: str):
    """name -> a maker of (FastVideo's denoising stage over the variant's DiT, before each generation, cached
    steps of the last generation, the model)."""

    def uncached():
        model = build(device, layers)
        return denoising_stage(torch.compile(model)), lambda: None, lambda: [], model

    def cache_dit():
        import cache_dit

        model = with_cache_dit(build(device, layers), config(STEPS))
        for block in model.blocks:
            block.compile()
        return (denoising_stage(model), lambda: cache_dit.refresh_context(model),
                lambda: cache_dit_decisions(model)[0][0], model)

    def stepcache(offload: bool):
        def make():  # the user's one line on the stage; each stage call is a generation: no reset
            model = build(device, layers)
            options = {}
            if offload:
                blocks = sum(p.numel() * p.element_size() for p in model.blocks.parameters())
                nonblock = sum(p.numel() * p.element_size() for p in model.parameters()) - blocks
                options = dict(offload={"budget": nonblock + parse_bytes(budget_blocks)},
                               cudagraphs="conditional")
            stage = cachepass.compile(denoising_stage(model), config(STEPS), **options)
            return stage, lambda: None, lambda: cachepass.stats(model)[0].cached_steps, model
        return make

    return {"uncached": uncached, "cache-dit": cache_dit, "cachepass": stepcache(False),
            "cachepass-offload": stepcache(True)}


def quality(out: torch.Tensor, ref: torch.Tensor) -> dict:
    from pytorch_msssim import ssim

    def frames(x):  # (1, C, T, H, W) -> (T, C, H, W) in [0, 1], with the reference's range
        return x[0].float().permute(1, 0, 2, 3)

    low, high = ref.float().min(), ref.float().max()
    a, b = [((frames(t) - low) / (high - low)).clamp(0, 1) for t in (out, ref)]
    mse = torch.mean((a - b) ** 2).item()
    return {"psnr_db": float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item(),
            "ssim": ssim(a, b, data_range=1.0, size_average=True).item(),
            "max_abs": (out.float() - ref.float()).abs().max().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--offload-blocks", default="1.2GB", help="device bytes of block weights for cachepass-offload")
    parser.add_argument("--variants", default="uncached,cache-dit,cachepass,cachepass-offload")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run (no offload variant there)")
    args = parser.parse_args(argv)
    if os.environ.get("FASTVIDEO_DISABLE_ATTENTION_COMPILE") != "0":
        parser.error("set FASTVIDEO_DISABLE_ATTENTION_COMPILE=0 before running (README, 'Using with FastVideo')")
    device = torch.device(args.device)
    x, cond, uncond = inputs(device, args.frames, args.height, args.width)
    makers = variants(device, args.layers, args.offload_blocks)
    prepared, rows = {}, {}
    for name in args.variants.split(","):
        start = time.perf_counter()
        stage, before, cached, model = makers[name]()
        before()
        out = run_stage(stage, x, cond, uncond)
        synchronize(device)
        prepared[name] = (stage, before, cached, model)
        # in this process after the variants before it: not a fresh-process cold start (bench.cold_start is)
        rows[name] = {"variant": name, "cold_start_s": time.perf_counter() - start, "times_s": [], "output": out}
    for _ in range(args.repeats):  # interleaved: every variant once per round
        for name, (stage, before, cached, _) in prepared.items():
            rows[name]["output"], seconds = timed(lambda: (before(), run_stage(stage, x, cond, uncond))[1], device)
            rows[name]["times_s"].append(seconds)
            rows[name]["cached_steps"] = list(cached())
    for name, (stage, before, _, _) in prepared.items():  # untimed: sync debug mode slows the host
        syncs = count_syncs(lambda: (before(), run_stage(stage, x, cond, uncond)), device)
        rows[name]["syncs_per_call"] = None if syncs is None else syncs / (2 * STEPS)  # FastVideo's own included
    reference = rows.get("uncached", {}).get("output")
    for name, row in rows.items():
        if not torch.isfinite(row["output"]).all():
            print(f"ERROR: {name}'s latents are not finite", file=sys.stderr)
    for row in rows.values():
        row["median_s"] = statistics.median(row["times_s"])
        out = row.pop("output")
        if reference is not None:
            row.update(quality(out, reference))
    meta = {"workload": f"FastVideo WanTransformer3DModel, Wan2.1-1.3B arch, {args.layers} blocks, {args.frames} frames "
                        f"{args.height}x{args.width}, FastVideo's DenoisingStage (flow UniPC, shift {SHIFT}), {STEPS} steps, "
                        "separate CFG, static mask (8 warmup, then every other step)",
            "device": device_name(device), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python -m bench.fastvideo_wan " + " ".join(argv or sys.argv[1:])}
    print(f"| variant | s / generation (min-max) | cold s | cached steps | PSNR dB | SSIM |  ({meta['device']}, torch "
          f"{meta['torch']})")
    print("|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['variant']} | {r['median_s']:.3f} ({min(r['times_s']):.3f}-{max(r['times_s']):.3f}) | "
              f"{r['cold_start_s']:.1f} | {len(r.get('cached_steps', []))} | {r.get('psnr_db', float('nan')):.1f} | "
              f"{r.get('ssim', float('nan')):.4f} |")
    os.makedirs(args.out, exist_ok=True)
    device_slug = meta["device"].lower().replace(" ", "-")
    path = os.path.join(args.out, f"fastvideo_wan-{device_slug}-{meta['date']}-{args.frames}f-denoising-stage.json")
    with open(path, "w") as f:
        json.dump({**meta, "rows": list(rows.values())}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
