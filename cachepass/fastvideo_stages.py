"""``cachepass.compile`` on FastVideo: a pipeline (``ComposedPipelineBase``) or one ``DenoisingStage``.

    pipe = cachepass.compile(pipe, cfg)     # FastVideo's WanPipeline etc.: the DiT of each denoising stage
    stage = cachepass.compile(stage, cfg)   # one DenoisingStage

Each denoising stage's ``transformer`` (and ``transformer_2``, Wan 2.2's second expert) is compiled in
place, in the stage and wherever the pipeline holds the same module (its ``modules`` and its other
stages). A call of the stage is one generation (FastVideo's loop calls no reset): every expert's state
starts fresh and runs the batch's own step count (``batch.timesteps``; each expert its share at
``batch.boundary_ratio`` or the pipeline config's), a device value, so another count is no recompile.
``config=None``: cache-dit's defaults with separate CFG calls (the stage calls the DiT once per CFG
branch). FastVideo's own DiT offload must be off (`cachepass.offload.runtime.check_not_offloaded_by_fastvideo`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable

from torch import nn

from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.pipelines import DIT_COMPONENTS, check_mask_counts, generation_class, per_call_config
from cachepass.state.runtime import pipeline_generation

log = logging.getLogger(__name__)


def is_fastvideo(value: Any) -> bool:
    """A FastVideo denoising stage, or a FastVideo pipeline (it holds its stages in ``_stages``)."""
    return _is_denoising_stage(value) or (type(value).__module__.startswith("fastvideo.")
                                          and isinstance(getattr(value, "_stages", None), list))


def _denoising_stages(target: Any) -> list:
    return [target] if _is_denoising_stage(target) else [s for s in target._stages if _is_denoising_stage(s)]


def _is_denoising_stage(value: Any) -> bool:
    return any(c.__name__ == "DenoisingStage" and c.__module__.startswith("fastvideo.") for c in type(value).__mro__)


def compile_fastvideo(target: Any, config: Any, compile_module: Callable[..., nn.Module], **options) -> Any:
    """Compile the DiTs of ``target``'s denoising stages in place with ``compile_module(dit, config, **options)``."""
    stages = _denoising_stages(target)
    if not stages:
        raise CachepassError(f"{type(target).__name__} has no DenoisingStage among its stages "
                             f"({[type(s).__name__ for s in target._stages]}): nothing to compile")
    config = per_call_config(target, StepCacheConfig(separate_cfg=True) if config is None else config,
                             options.pop("calibrator_config", None))
    # id(original) -> compiled
    compiled = {id(dit): compile_module(dit, config, **options) for dit in dits(target).values()}
    for stage in stages:
        _CONFIGS[stage] = config
        stage.__class__ = generation_class(type(stage), "forward", _begin_generation)
    # every stage attribute that is one of the DiTs now names the compiled one
    for holder in [target] if _is_denoising_stage(target) else target._stages:
        for attribute, value in list(vars(holder).items()):
            if id(value) in compiled:
                setattr(holder, attribute, compiled[id(value)])
    modules = getattr(target, "modules", None)
    if isinstance(modules, dict):
        for key, value in list(modules.items()):
            if id(value) in compiled:
                modules[key] = compiled[id(value)]
    log.info("stepcache: %s: compiled the DiT of %d denoising stage(s); each stage call begins a generation",
             type(target).__name__, len(stages))
    return target


def dits(target: Any) -> dict[str, nn.Module]:
    """The DiTs (compiled or not) of ``target``'s denoising stages by their attribute name (``transformer``,
    ``transformer_2``), each once: a second stage holding the same DiT adds nothing, one holding another DiT under
    a name already taken adds it as ``stages[i].<name>``."""
    found: dict[str, nn.Module] = {}
    for i, stage in enumerate(_denoising_stages(target)):
        for name in DIT_COMPONENTS:
            dit = getattr(stage, name, None)
            if isinstance(dit, nn.Module) and all(dit is not other for other in found.values()):
                found[name if name not in found else f"stages[{i}].{name}"] = dit
    return found


_CONFIGS: "weakref.WeakKeyDictionary[Any, StepCacheConfig]" = weakref.WeakKeyDictionary()  # stage -> its config


def _begin_generation(stage: Any, forward: Callable, args: tuple, kwargs: dict):
    """``DenoisingStage.forward(batch, fastvideo_args)``: one generation of the batch's steps."""
    batch = kwargs.get("batch", args[0] if args else None)
    fastvideo_args = kwargs.get("fastvideo_args", args[1] if len(args) > 1 else None)
    modules = {name: getattr(stage, name) for name in DIT_COMPONENTS if isinstance(getattr(stage, name, None), nn.Module)}
    timesteps = getattr(batch, "timesteps", None)
    steps = len(timesteps) if timesteps is not None else getattr(batch, "num_inference_steps", None)
    counts = dict.fromkeys(modules, steps)
    boundary = _boundary_ratio(batch, fastvideo_args)
    if len(modules) == 2 and boundary is not None and timesteps is not None:
        high = int((timesteps >= boundary * stage.scheduler.num_train_timesteps).sum())
        counts = {"transformer": high, "transformer_2": steps - high}
    check_mask_counts(_CONFIGS.get(stage), counts, type(stage).__name__)
    return pipeline_generation({modules[name]: n for name, n in counts.items()})


def _boundary_ratio(batch: Any, fastvideo_args: Any) -> float | None:
    """Where Wan 2.2's high-noise expert hands over, as the stage reads it: the batch's, else the config's."""
    ratio = getattr(batch, "boundary_ratio", None)
    if ratio is None:
        dit_config = getattr(getattr(fastvideo_args, "pipeline_config", None), "dit_config", None)
        ratio = getattr(dit_config, "boundary_ratio", None)
    return ratio
