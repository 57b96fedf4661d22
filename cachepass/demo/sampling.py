"""Euler flow-matching sampling with separate classifier-free guidance, as Wan and FLUX pipelines do.

The transformer is called through ``velocity(latents, sigma, kwargs)``; with ``uncond`` given, two
calls per step (conditional, then unconditional, or the reverse with ``uncond_first``), which is
the call pattern ``StepCacheConfig(separate_cfg=True)`` expects.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, Mapping], torch.Tensor]


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` noise levels from 1 to 0, optionally shifted toward high noise (Wan: 3-5)."""
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@torch.no_grad()
def sample(velocity: Velocity, latents: torch.Tensor, cond: Mapping, uncond: Mapping | None, num_steps: int, *,
           guidance: float = 5.0, shift: float = 1.0, uncond_first: bool = False) -> torch.Tensor:
    """Integrate dx/dsigma = v from sigma 1 (noise) to 0; ``uncond=None`` means one call per step."""
    sigmas = flow_sigmas(num_steps, shift).to(latents.device)  # on device: no host sync per call
    for i in range(num_steps):
        sigma = sigmas[i]
        if uncond is None:
            v = velocity(latents, sigma, cond)
        else:
            if uncond_first:
                v_uncond = velocity(latents, sigma, uncond)
                v_cond = velocity(latents, sigma, cond)
            else:
                v_cond = velocity(latents, sigma, cond)
                v_uncond = velocity(latents, sigma, uncond)
            v = v_uncond + guidance * (v_cond - v_uncond)
        latents = latents + (sigmas[i + 1] - sigma).to(latents.dtype) * v
    return latents
