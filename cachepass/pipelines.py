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

import copy
import dataclasses
import functools
import inspect
import logging
import weakref
from typing import Any, Callable

from torch import nn

from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.options import coerce_config
from cachepass.state.runtime import pipeline_generation

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
    """Compile each DiT component of ``pipe`` in place with ``compile_module(component, config, **options)``;
    its calls then begin a generation each, with the call's step count (`_begin_generation`)."""
    found = [name for name in DIT_COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)]
    if not found:
        raise CachepassError(f"{type(pipe).__name__} has no DiT component to compile (looked for {list(DIT_COMPONENTS)})")
    config = per_call_config(pipe, default_config(pipe) if config is None else config, options.pop("calibrator_config", None))
    for name in found:
        setattr(pipe, name, compile_module(getattr(pipe, name), config, **options))
    _COMPILED[pipe] = config
    pipe.__class__ = generation_class(type(pipe), "__call__", _begin_generation)
    log.info("stepcache: %s: compiled %s; each call begins a generation", type(pipe).__name__, ", ".join(found))
    return pipe


def per_call_config(owner: Any, config: Any, calibrator_config: Any) -> StepCacheConfig:
    """``config`` checked, without a step count where each call gives its own (a mask keeps its count)."""
    config = coerce_config(config, calibrator_config)
    if config.num_inference_steps is not None and config.steps_computation_mask is None:
        log.info("stepcache: %s: the step count comes from each call (num_inference_steps=%d is not needed)",
                 type(owner).__name__, config.num_inference_steps)
        config = dataclasses.replace(config, num_inference_steps=None)
    return config


_COMPILED: "weakref.WeakKeyDictionary[Any, StepCacheConfig]" = weakref.WeakKeyDictionary()  # pipeline -> its config
_GENERATION_CLASSES: dict[tuple[type, str], type] = {}  # (class, method) -> its subclass whose method begins a generation


def generation_class(cls: type, method: str, begin: Callable) -> type:
    """``cls`` whose ``method`` runs inside ``begin(self, original, args, kwargs)`` (a context manager: one
    generation); the same name and module, so code that looks at the class name sees its own."""
    if cls in _GENERATION_CLASSES.values():
        return cls
    if (cls, method) not in _GENERATION_CLASSES:
        original = getattr(cls, method)

        @functools.wraps(original)
        def generating(self, *args, **kwargs):
            with begin(self, original, args, kwargs):
                return original(self, *args, **kwargs)

        _GENERATION_CLASSES[cls, method] = type(cls.__name__, (cls,), {method: generating, "__module__": cls.__module__,
                                                                       "__doc__": cls.__doc__})
    return _GENERATION_CLASSES[cls, method]


def check_mask_counts(config: StepCacheConfig | None, counts: dict[str, int | None], caller: str) -> None:
    """A static mask has one entry per step: a call with another count is an error, not a silent misfit."""
    if config is None or config.steps_computation_mask is None:
        return
    wrong = {name: n for name, n in counts.items() if n is not None and n != config.num_inference_steps}
    if wrong:
        raise CachepassError(
            f"steps_computation_mask has {config.num_inference_steps} entries (num_inference_steps="
            f"{config.num_inference_steps}), but this call of {caller} runs "
            f"{', '.join(f'{n} steps on {name}' for name, n in wrong.items())}: call it with num_inference_steps="
            f"{config.num_inference_steps}, or compile with a mask of that many entries")


def _begin_generation(pipe: Any, call: Callable, args: tuple, kwargs: dict):
    """A pipeline call is one generation (as with cache-dit's ``enable_cache(pipe)``): every DiT component's
    state starts fresh, and runs the call's step count (each expert its share), a device value, so no recompile."""
    config = _COMPILED.get(pipe)
    modules = {name: getattr(pipe, name) for name in DIT_COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)}
    steps = _call_steps(pipe, call, args, kwargs)
    counts = _expert_shares(pipe, steps, modules) if steps is not None else dict.fromkeys(modules, None)
    check_mask_counts(config, counts, type(pipe).__name__)
    return pipeline_generation({modules[name]: n for name, n in counts.items()})


def _call_steps(pipe: Any, call: Callable, args: tuple, kwargs: dict) -> int | None:
    """The denoising steps a pipeline ``call`` asks for: its ``timesteps`` / ``sigmas`` list, else ``num_inference_steps``."""
    try:
        bound = inspect.signature(call).bind(pipe, *args, **kwargs)
    except TypeError:
        return None  # the pipeline raises its own error
    bound.apply_defaults()
    given = bound.arguments
    for name in ("timesteps", "sigmas"):
        if given.get(name) is not None:
            return len(given[name])
    steps = given.get("num_inference_steps")
    return steps if isinstance(steps, int) else None


def _expert_shares(pipe: Any, steps: int, modules: dict[str, nn.Module]) -> dict[str, int | None]:
    """Wan 2.2: ``transformer`` runs the steps whose timestep is at or above ``boundary_ratio`` of the
    training timesteps, ``transformer_2`` the rest; one DiT runs every step."""
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if len(modules) < 2 or ratio is None:
        return dict.fromkeys(modules, steps)
    scheduler = copy.deepcopy(pipe.scheduler)
    try:
        scheduler.set_timesteps(steps, device="cpu")
    except Exception as error:  # a scheduler that needs more than the count (e.g. ``mu``)
        log.warning("stepcache: %s: could not split %d steps between the experts at boundary_ratio=%s (%s); each "
                    "expert's step count is left open (no count warnings for it)", type(pipe).__name__, steps, ratio,
                    error)
        return dict.fromkeys(modules, None)
    high = int((scheduler.timesteps >= ratio * scheduler.config.num_train_timesteps).sum())
    return {"transformer": high, "transformer_2": steps - high}
