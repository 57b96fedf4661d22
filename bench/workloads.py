"""Benchmark workloads: real model configurations with random bf16 weights (nothing downloaded).

A workload knows how to build its transformer, make deterministic inputs, call the model for one
velocity, turn final latents into images for quality metrics, and which block lists a head-only
model keeps.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import torch
from torch import nn

# Wan2.1-T2V-1.3B, transformer/config.json
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Wan2.1-T2V-14B, transformer/config.json: 40 blocks of dim 5120 (28 GB in bf16)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# FLUX.1-dev, transformer/config.json
FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# LTX-Video 2B (0.9.x), transformer/config.json
LTX_2B = dict(
    in_channels=128, out_channels=128, num_attention_heads=32, attention_head_dim=64, cross_attention_dim=2048,
    num_layers=28, caption_channels=4096,
)
# the tests' tiny Wan: the smoke-test workload of this script
WAN_TINY = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=5, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)

# bench.cold_start's small Wan (30 blocks of width 128): the CPU workload, the same model as the CPU cold-start rows
WAN_SMALL_30 = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=512, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
)

STATIC_MASK = (1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1)


@dataclasses.dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]  # on the current default device and dtype
    inputs: Callable[[torch.Generator, torch.device, torch.dtype], tuple[torch.Tensor, dict, dict | None]]
    call: Callable  # (fn, latents, sigma, kwargs) -> velocity
    images: Callable[[torch.Tensor], torch.Tensor]  # latents -> [N, 1, H, W] channel images
    block_lists: tuple[str, ...]
    num_steps: int = 16
    head: int = 8
    tail: int = 0
    shift: float = 1.0
    guidance: float = 5.0
    dtype: torch.dtype = torch.bfloat16
    note: str = ""

    @property
    def separate_cfg(self) -> bool:
        return self.name.startswith(("wan", "tiny"))

    @property
    def streams(self) -> int:
        """Transformer calls per denoising step: 2 with separate CFG."""
        return 2 if self.separate_cfg else 1

    @property
    def calls_per_generation(self) -> int:
        return self.num_steps * self.streams

    def setup(self, device: torch.device) -> tuple[nn.Module, tuple]:
        """The model (seed 0, random weights, no grad) and its inputs (seed 1) on ``device``."""
        torch.manual_seed(0)
        saved = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(device):
                model = self.build()
        finally:
            torch.set_default_dtype(saved)
        model.requires_grad_(False)
        return model, self.inputs(torch.Generator().manual_seed(1), device, self.dtype)

    def head_only(self, model: nn.Module) -> nn.Module:
        """The model with each block list cut to its head and tail blocks: the cost of a cached call."""
        trimmed = copy.copy(model)
        trimmed._modules = dict(model._modules)
        for name in self.block_lists:
            blocks = getattr(model, name)
            keep = list(blocks[: self.head]) + (list(blocks[len(blocks) - self.tail:]) if self.tail else [])
            trimmed._modules[name] = nn.ModuleList(keep)
        return trimmed


def _wan_inputs(frames: int, height: int, width: int, text_dim: int, channels: int = 16, text_len: int = 512):
    latent_frames = (frames - 1) // 4 + 1

    def make(g, device, dtype):
        latents = torch.randn(1, channels, latent_frames, height // 8, width // 8, generator=g).to(device, dtype)
        prompt = lambda: {"encoder_hidden_states": torch.randn(1, text_len, text_dim, generator=g).to(device, dtype)}  # noqa: E731
        return latents, prompt(), prompt()

    return make


def _wan_call(fn, latents, sigma, kwargs):
    timestep = (sigma * 1000).to(latents.device, torch.float32).reshape(1)
    return fn(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]


def _video_channels(latents: torch.Tensor) -> torch.Tensor:
    _, c, f, h, w = latents.shape
    return latents.float().permute(0, 2, 1, 3, 4).reshape(f * c, 1, h, w)


def _flux_inputs(g, device, dtype):
    side = 1024 // 16  # 1024 px -> 128 latent px -> 64 x 64 packed 2x2 patches = 4096 tokens
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).to(device, dtype)
    cond = {
        "encoder_hidden_states": torch.randn(1, 512, 4096, generator=g).to(device, dtype),
        "pooled_projections": torch.randn(1, 768, generator=g).to(device, dtype),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(512, 3, device=device, dtype=dtype),
        "guidance": torch.tensor([3.5], device=device, dtype=torch.float32),
    }
    return torch.randn(1, side * side, 64, generator=g).to(device, dtype), cond, None


def _flux_call(fn, latents, sigma, kwargs):
    timestep = sigma.to(latents.device, torch.float32).reshape(1)
    return fn(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]


def _flux_images(latents: torch.Tensor) -> torch.Tensor:
    side = int(latents.shape[1] ** 0.5)
    packed = latents.float().reshape(1, side, side, 16, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return packed.reshape(16, 1, side * 2, side * 2)


def _ltx_inputs(frames: int, height: int, width: int):
    """Packed latents as LTXPipeline feeds them: 8x temporal and 32x spatial compression, patch size 1."""
    grid = ((frames - 1) // 8 + 1, height // 32, width // 32)

    def make(g, device, dtype):
        cond = {
            "encoder_hidden_states": torch.randn(1, 128, 4096, generator=g).to(device, dtype),
            "encoder_attention_mask": torch.ones(1, 128, device=device),
            "num_frames": grid[0], "height": grid[1], "width": grid[2],
            "rope_interpolation_scale": (8 / 25, 32, 32),  # LTXPipeline at 25 fps
        }
        return torch.randn(1, grid[0] * grid[1] * grid[2], 128, generator=g).to(device, dtype), cond, None

    return make


def _ltx_call(fn, latents, sigma, kwargs):
    timestep = (sigma * 1000).to(latents.device, torch.float32).reshape(1)
    return fn(hidden_states=latents, timestep=timestep, return_dict=False, **kwargs)[0]


def _ltx_images(frames: int, height: int, width: int):
    grid = ((frames - 1) // 8 + 1, height // 32, width // 32)

    def images(latents: torch.Tensor) -> torch.Tensor:
        video = latents.float().reshape(*grid, 128)[..., :16]  # 16 of 128 channels per latent frame
        return video.permute(0, 3, 1, 2).reshape(grid[0] * 16, 1, grid[1], grid[2])

    return images


def _diffusers(cls_name: str, config: dict):
    def build():
        import diffusers

        return getattr(diffusers, cls_name)(**config).eval()

    return build


WORKLOADS = {
    "wan-1.3b-33f": Workload(
        "wan-1.3b-33f", _diffusers("WanTransformer3DModel", WAN_1_3B), _wan_inputs(33, 480, 832, 4096),
        _wan_call, _video_channels, ("blocks",), shift=3.0,
        note="Wan2.1-T2V-1.3B config, 480x832, 33 frames (9 latent frames, 14040 tokens)",
    ),
    "wan-14b-33f": Workload(
        "wan-14b-33f", _diffusers("WanTransformer3DModel", WAN_14B), _wan_inputs(33, 480, 832, 4096),
        _wan_call, _video_channels, ("blocks",), shift=3.0,
        note="Wan2.1-T2V-14B config (40 blocks, dim 5120, ffn 13824, 28 GB bf16), 480x832, 33 frames (14040 tokens)",
    ),
    "wan-1.3b-9f": Workload(
        "wan-1.3b-9f", _diffusers("WanTransformer3DModel", WAN_1_3B), _wan_inputs(9, 480, 832, 4096),
        _wan_call, _video_channels, ("blocks",), shift=3.0,
        note="Wan2.1-T2V-1.3B config, 480x832, 9 frames (3 latent frames, 4680 tokens): offload's worst bytes/compute",
    ),
    "wan-1.3b-1f": Workload(
        "wan-1.3b-1f", _diffusers("WanTransformer3DModel", WAN_1_3B), _wan_inputs(1, 480, 832, 4096),
        _wan_call, _video_channels, ("blocks",), shift=3.0,
        note="Wan2.1-T2V-1.3B config, 480x832, 1 frame (1560 tokens)",
    ),
    "flux-1024": Workload(
        "flux-1024", _diffusers("FluxTransformer2DModel", FLUX_DEV), _flux_inputs, _flux_call, _flux_images,
        ("transformer_blocks", "single_transformer_blocks"), shift=3.0,
        note="FLUX.1-dev config (19 double + 38 single blocks, full depth), 1024x1024 (4096 tokens), "
             "guidance-distilled: one call per step",
    ),
    "ltx-2b": Workload(
        "ltx-2b", _diffusers("LTXVideoTransformer3DModel", LTX_2B), _ltx_inputs(25, 512, 768), _ltx_call,
        _ltx_images(25, 512, 768), ("transformer_blocks",), head=1, shift=3.0,
        note="LTX-Video 2B config (28 blocks), 512x768, 25 frames (4x16x24 = 1536 tokens), one call per step "
             "(batch 1, no CFG): host-bound",
    ),
    "wan-small-30": Workload(
        "wan-small-30", _diffusers("WanTransformer3DModel", WAN_SMALL_30),
        _wan_inputs(13, 128, 128, 64, text_len=16), _wan_call, _video_channels, ("blocks",), head=1,
        dtype=torch.float32, note="bench.cold_start's small Wan (30 blocks, width 128), fp32, 4x16x16 latents "
                                  "(256 tokens), 16 text tokens: the CPU workload",
    ),
    "tiny": Workload(
        "tiny", _diffusers("WanTransformer3DModel", WAN_TINY), _wan_inputs(9, 64, 64, 16, channels=4, text_len=16),
        _wan_call, _video_channels, ("blocks",), head=2, dtype=torch.float32,
        note="tiny Wan (5 blocks), fp32: smoke test of the script",
    ),
}
