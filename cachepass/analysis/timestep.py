"""Find the graph inputs that carry the timestep and the latents: they tell steps, CFG calls and generations apart.

Dynamo names a placeholder after the forward argument it stands for (``L_timestep_``, or
``L_kwargs_timestep_`` when the argument arrives through ``**kwargs``); module parameters and buffers
are ``L_self_...``. The compiled clock reads both on the device (no host sync): a call whose
timestep does not decrease starts a new generation, unless it is the second CFG call of a step,
which has the first call's timestep and latents.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import fx

from cachepass.analysis.blocks import example_value
from cachepass.config import StepCacheConfig
from cachepass.errors import CachepassError

AUTO_NAMES = ("timestep", "timesteps", "sigma", "sigmas")
LATENT_SAMPLE = 4096  # latents elements (evenly strided) the clock keeps to tell a step's latents from new ones
FOLLOW_COSINE = 0.2  # a step's latents have at least this cosine with the previous call's (new noise: ~0)
LATENT_NAMES = ("hidden_states", "latents", "latent_model_input", "sample", "x")
_ARGUMENT = re.compile(r"^L_(?:kwargs_)?(?P<name>.+)_$")


@dataclasses.dataclass(frozen=True)
class TimestepInput:
    name: str  # the forward's argument name
    placeholder: str  # the graph placeholder's target
    shape: tuple[int, ...]
    dtype: torch.dtype
    latents: str | None = None  # the latents input's placeholder: CFG partners share its values
    latents_name: str | None = None

    @property
    def sample_size(self) -> int:
        """Elements of the latents sample the clock keeps (0: no latents input): one count at every shape."""
        return LATENT_SAMPLE if self.latents else 0

    def describe(self) -> str:
        pairing = f", CFG pairs share {self.latents_name}" if self.latents else ""
        return f"timestep input: {self.name} ({str(self.dtype).removeprefix('torch.')}{list(self.shape)}){pairing}"


def argument_inputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Forward argument name -> placeholder, for the tensor inputs that are not module state."""
    found = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or not isinstance(example_value(node), torch.Tensor):
            continue
        match = _ARGUMENT.match(str(node.target))
        if match and not match.group("name").startswith("self_"):
            found[match.group("name")] = node
    return found


def find_timestep_input(gm: fx.GraphModule, config: StepCacheConfig) -> TimestepInput | None:
    """The placeholder named by ``config.timestep_input`` ("auto": a conventional name), or None to count calls."""
    if config.timestep_input is None:
        return None
    inputs = argument_inputs(gm)
    if config.timestep_input == "auto":
        name = next((n for n in AUTO_NAMES if n in inputs), None)
        if name is None:
            return None
    else:
        name = config.timestep_input
        if name not in inputs:
            raise CachepassError(
                f"StepCacheConfig.timestep_input={name!r} is not a tensor input of the model; its tensor inputs "
                f"are {sorted(inputs)} (or use 'auto', or None to count calls)"
            )
    node = inputs[name]
    value = example_value(node)
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise CachepassError(f"timestep input {name!r} has dtype {value.dtype}; it must be a real number tensor")
    latents = next((n for n in LATENT_NAMES if n in inputs and n != name), None)
    return TimestepInput(name, str(node.target), tuple(value.shape), value.dtype,
                         str(inputs[latents].target) if latents else None, latents)


def latents_sample(latents, numel, sample_ids):
    """`LATENT_SAMPLE` elements of the flattened latents of ``numel`` elements (a tensor or an FX proxy), evenly
    strided: ``latents.reshape(-1)[::max(1, numel // LATENT_SAMPLE)][:LATENT_SAMPLE]`` where there are that many,
    each element about equally often where there are fewer.

    ``sample_ids``: ``arange(LATENT_SAMPLE)`` on the latents' device (the ``clock.sample_ids`` state). Gathering by
    index keeps the sample's size static at every shape: a strided slice of a symbolic size took fake propagation
    0.09 s of a new shape's compile (CPU).
    """
    return latents.reshape(-1).index_select(0, (sample_ids * torch.sym_max(1, numel // LATENT_SAMPLE)) % numel)


def follows(sample, last) -> Any:
    """Whether latents (their sample) continue the previous call's: cosine >= `FOLLOW_COSINE`.

    A denoising step moves the latents a little (x - dt * v): they keep most of their direction. New
    noise, or an img2img start from new noise, is nearly orthogonal to the previous latents. All
    zeros on either side counts as following (0 >= 0).
    """
    dot = (sample * last).sum()
    return dot >= FOLLOW_COSINE * torch.sqrt((sample * sample).sum() * (last * last).sum())
