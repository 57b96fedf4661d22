"""Tiny models, one per block pattern, and a flow-matching sampling loop with separate CFG.

Every case builds the same weights from a seed, so two instances (one for cache-dit, one for
cachepass) compute the same function. ``threshold`` is chosen per case so that the dynamic
decision caches some steps and computes others (residual diffs of these random models differ).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from cachepass.demo.sampling import sample


class ToyBlock(nn.Module):
    """AdaLN self-mixing block with cross-context, one stream (cache-dit ForwardPattern_2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states, encoder_hidden_states, temb):
        shift, scale = self.modulation(temb).unsqueeze(1).chunk(2, dim=-1)
        x = self.norm(hidden_states) * (1 + scale) + shift
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1) @ v
        hidden_states = hidden_states + self.out(attn + encoder_hidden_states.mean(1, keepdim=True))
        return hidden_states + self.ff(self.norm(hidden_states))


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 6, channels: int = 4, text_dim: int = 8):
        super().__init__()
        self.proj_in = nn.Linear(channels, dim)
        self.time_embed = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_embed = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(depth))
        self.proj_out = nn.Linear(dim, channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        x = self.proj_in(hidden_states)
        temb = self.time_embed(timestep.float().unsqueeze(-1) / 1000)
        context = self.text_embed(encoder_hidden_states)
        for block in self.blocks:
            x = block(x, context, temb)
        return self.proj_out(x)


@dataclasses.dataclass
class ModelCase:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, dict, dict]]  # latents, cond kwargs, uncond kwargs
    call: Callable[[Callable, torch.Tensor, torch.Tensor, dict], torch.Tensor]  # fn, latents, sigma, kwargs
    depth: int  # blocks per list (the shortest list)
    threshold: float  # caches some steps, computes others, for F1B0 on this random model

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build().eval()

    def at_size(self, times: int, dim: int = -1) -> "ModelCase":
        """This case at another resolution: random latents ``times`` as large along ``dim`` (the width). FLUX's packed
        latents (with ``img_ids``): ``times`` as many tokens, each with a position id."""
        def inputs(g):
            latents, cond, uncond = self.inputs(g)
            shape, along = list(latents.shape), dim
            if "img_ids" in cond:
                along = 1
                ids = torch.randn(shape[1] * times, cond["img_ids"].shape[-1], generator=g)
                cond, uncond = {**cond, "img_ids": ids}, {**uncond, "img_ids": ids}
            shape[along] *= times
            return torch.randn(shape, generator=g), cond, uncond

        return dataclasses.replace(self, inputs=inputs)

    def two_experts(self) -> tuple[nn.Module, nn.Module]:
        """Two instances of the model class with different weights (Wan 2.2's two experts)."""
        first, second = self.model(), self.model()
        with torch.no_grad():
            for p in second.parameters():
                p.mul_(1.01)
        return first, second


def _toy_inputs(g):
    return (
        torch.randn(1, 16, 4, generator=g),
        {"encoder_hidden_states": torch.randn(1, 5, 8, generator=g)},
        {"encoder_hidden_states": torch.randn(1, 5, 8, generator=g)},
    )


def _toy_call(fn, x, sigma, kw):
    return fn(hidden_states=x, timestep=(sigma * 1000).reshape(1), **kw)


def _wan():
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=5, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )


def _wan_inputs(g):
    return (
        torch.randn(1, 4, 3, 8, 8, generator=g),
        {"encoder_hidden_states": torch.randn(1, 7, 16, generator=g)},
        {"encoder_hidden_states": torch.randn(1, 7, 16, generator=g)},
    )


def _wan_call(fn, x, sigma, kw):
    return fn(hidden_states=x, timestep=(sigma * 1000).round().long().reshape(1), return_dict=False, **kw)[0]


def _flux():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=4, num_single_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4),
    )


def _flux_inputs(g):
    shared = {"img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.randn(5, 3, generator=g)}
    return (
        torch.randn(1, 16, 8, generator=g),
        {
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g),
            **shared,
        },
        {
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g),
            **shared,
        },
    )


def _flux_call(fn, x, sigma, kw):
    return fn(hidden_states=x, timestep=sigma.reshape(1), return_dict=False, **kw)[0]


def _hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
        num_single_layers=4, num_refiner_layers=2, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    )


def _hunyuan_inputs(g):
    def prompt():
        return {
            "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
            "encoder_attention_mask": torch.ones(1, 6),
            "pooled_projections": torch.randn(1, 8, generator=g),
            "guidance": torch.tensor([3500.0]),
        }

    return torch.randn(1, 4, 3, 4, 4, generator=g), prompt(), prompt()


def _hunyuan_call(fn, x, sigma, kw):
    return fn(hidden_states=x, timestep=(sigma * 1000).round().long().reshape(1), return_dict=False, **kw)[0]


def _sd3():
    from diffusers import SD3Transformer2DModel

    # the last block is built with context_pre_only=True: it consumes the text stream and returns only hidden states
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
        pos_embed_max_size=16,
    )


def _sd3_inputs(g):
    def prompt():
        return {"encoder_hidden_states": torch.randn(1, 5, 16, generator=g), "pooled_projections": torch.randn(1, 8, generator=g)}

    return torch.randn(1, 4, 8, 8, generator=g), prompt(), prompt()


def _ltx():
    from diffusers import LTXVideoTransformer3DModel

    return LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                      cross_attention_dim=16, num_layers=4, caption_channels=12)


def _ltx_inputs(g):
    """Packed latents of a 2 x 3 x 4 latent grid (patch size 1), as LTXPipeline feeds them, with the grid and the
    rotary scale as arguments."""
    def prompt():
        return {"encoder_hidden_states": torch.randn(1, 6, 12, generator=g), "encoder_attention_mask": torch.ones(1, 6),
                "num_frames": 2, "height": 3, "width": 4, "rope_interpolation_scale": (8 / 25, 32, 32)}

    return torch.randn(1, 24, 8, generator=g), prompt(), prompt()


def _ltx_call(fn, x, sigma, kw):
    return fn(hidden_states=x, timestep=(sigma * 1000).reshape(1), return_dict=False, **kw)[0]


CASES = {
    "toy": ModelCase("toy", ToyDiT, _toy_inputs, _toy_call, depth=6, threshold=0.025),
    "wan": ModelCase("wan", _wan, _wan_inputs, _wan_call, depth=5, threshold=0.06),
    "flux": ModelCase("flux", _flux, _flux_inputs, _flux_call, depth=4, threshold=0.22),
    "hunyuan": ModelCase("hunyuan", _hunyuan, _hunyuan_inputs, _hunyuan_call, depth=4, threshold=0.2),
    "sd3": ModelCase("sd3", _sd3, _sd3_inputs, _flux_call, depth=4, threshold=0.1),
    "ltx": ModelCase("ltx", _ltx, _ltx_inputs, _ltx_call, depth=4, threshold=0.1),
}


def toy_config(**overrides):
    """The runtime tests' config for the toy: 12 steps, separate CFG, TaylorSeer 1; caches about a third of the steps."""
    from cachepass import StepCacheConfig

    base = dict(num_head_blocks=1, threshold=0.04, warmup_steps=1, separate_cfg=True, num_inference_steps=12,
                taylorseer_order=1)
    return StepCacheConfig(**{**base, **overrides})


def generate(case: ModelCase, fn: Callable, num_steps: int, *, separate_cfg: bool = True,
             uncond_first: bool = False, guidance: float = 3.0, seed: int = 1) -> torch.Tensor:
    """Euler flow matching from sigma 1 to 0; two calls per step with separate CFG."""
    latents, cond, uncond = case.inputs(torch.Generator().manual_seed(seed))
    return sample(lambda x, sigma, kw: case.call(fn, x, sigma, kw), latents, cond, uncond if separate_cfg else None,
                  num_steps, guidance=guidance, uncond_first=uncond_first)
