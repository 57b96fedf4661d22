"""The inner compilers a stepcache graph, or each of its pieces, is handed to."""

from __future__ import annotations

import copy
import enum
from typing import Callable

import torch
from torch import fx


class Inner(str, enum.Enum):
    """The compiler that receives the rewritten graph (or each piece of it)."""

    INDUCTOR = "inductor"
    AOT_EAGER = "aot_eager"
    EAGER = "eager"


INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def asks_for_cudagraphs(mode: str | None) -> bool:
    """Whether Inductor's ``mode`` turns CUDA graphs on (``reduce-overhead``, ``max-autotune``)."""
    from torch._inductor import list_mode_options

    return bool(mode) and bool(list_mode_options(mode).get("triton.cudagraphs"))


def inner_compile(gm: fx.GraphModule, inputs: list, inner: Inner, mode: str | None = None,
                  cudagraphs: bool = True) -> Callable:
    """Compile ``gm`` for ``inputs`` (fake tensors under Dynamo's fake mode); ``gm`` itself is left as it was.

    ``cudagraphs=False`` keeps Inductor from capturing CUDA graphs even where ``mode`` asks for them.
    """
    if inner is Inner.EAGER:
        return gm.forward
    if inner is Inner.AOT_EAGER:
        return torch._dynamo.lookup_backend("aot_eager")(gm, inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = dict(list_mode_options(mode)) if mode else {}
    if not cudagraphs:
        patches["triton.cudagraphs"] = False
    return compile_fx(copy.deepcopy(gm), inputs, config_patches=patches or None)  # compile_fx rewrites its graph
