"""``cachepass.compile`` on a diffusion pipeline: every DiT component compiled in place, in one line.

    pipe = cachepass.compile(pipe, cfg)      # cfg=None: cache-dit's defaults, the CFG layout of the pipeline family

A pipeline is an object with diffusers' ``components`` mapping (diffusers' ``DiffusionPipeline``);
its DiT components are ``transformer`` and, for Wan 2.2's two experts, ``transformer_2``, each
compiled with the same options and a state of its own. Without a config the CFG layout comes from
the pipeline family (`SEPARATE_CFG`: Wan and QwenImage call the transformer once per CFG branch;
FLUX is guidance-distilled, SD3, CogVideoX and LTX-Video batch both branches into one call); every
other field is cache-dit's default.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError

log = logging.getLogger(__name__)

DIT_COMPONENTS = ("transformer", "transformer_2")
# pipeline class name prefix -> whether each denoising step calls the transformer once per CFG branch
SEPARATE_CFG = {"Wan": True, "QwenImage": True, "Flux": False, "StableDiffusion3": False, "CogVideoX": False,
                "LTX": False, "HunyuanVideo": False}


def is_pipeline(value: Any) -> bool:
    return not isinstance(value, nn.Module) and isinstance(getattr(value, "components", None), dict) and callable(value)


def default_config(pipe: Any) -> StepCacheConfig:
    """cache-dit's defaults, with the CFG layout of ``pipe``'s family."""
    name = type(pipe).__name__
    family = next((prefix for prefix in SEPARATE_CFG if name.startswith(prefix)), None)
    if family is None:
        raise CachepassError(f"cachepass does not know the CFG layout of {name}: pass a config, e.g. "
                             "cachepass.compile(pipe, StepCacheConfig(separate_cfg=True)) if each step calls the "
                             f"transformer once per CFG branch (known families: {sorted(SEPARATE_CFG)})")
    return StepCacheConfig(separate_cfg=SEPARATE_CFG[family])


def compile_pipeline(pipe: Any, config: Any, compile_module: Callable[..., nn.Module], **options) -> Any:
    """Compile each DiT component of ``pipe`` in place with ``compile_module(component, config, **options)``."""
    found = [name for name in DIT_COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)]
    if not found:
        raise CachepassError(f"{type(pipe).__name__} has no DiT component to compile (looked for {list(DIT_COMPONENTS)})")
    config = default_config(pipe) if config is None else config
    for name in found:
        setattr(pipe, name, compile_module(getattr(pipe, name), config, **options))
    log.info("stepcache: %s: compiled %s", type(pipe).__name__, ", ".join(found))
    return pipe
