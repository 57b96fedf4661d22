"""The stepcache graph passes, in the order they run (`cachepass.pipeline` runs them).

``before_discovery_passes`` (hoist_size_arithmetic, call_block_bodies, for the piecewise form bind_block_weights,
split_before_first_block) run before block discovery; ``outline_passes`` (contiguous_block_input,
hoist_out_of_middle, outline_middle_blocks) turn a Dynamo graph into one where each cache unit's middle blocks are a
submodule call (what the eager reference runs); ``cache_passes`` (insert_cache_cond) then rewrite those calls into
the compiled decision + ``torch.cond`` + state update.
``run_passes`` names a failing pass and the passes that ran before it. The graph invariants every
pass keeps, and the node metadata they write, are in README.md beside this file.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Sequence

from torch import fx

from cachepass.errors import CachepassError, PassError
from cachepass.passes.bind_block_weights import bind_block_weights
from cachepass.passes.call_block_bodies import call_block_bodies
from cachepass.passes.contiguous_block_input import contiguous_block_input
from cachepass.passes.hoist_out_of_middle import hoist_out_of_middle
from cachepass.passes.hoist_size_arithmetic import hoist_size_arithmetic
from cachepass.passes.insert_cache_cond import insert_cache_cond
from cachepass.passes.outline_middle_blocks import outline_middle_blocks
from cachepass.passes.split_before_first_block import split_before_first_block

log = logging.getLogger(__name__)

Pass = Callable[[fx.GraphModule], fx.GraphModule]


def before_discovery_passes(bind_weights: bool = False) -> list[Pass]:
    """``bind_weights``: the block calls name their weights (`bind_block_weights`; the piecewise executor runs such a
    graph, nothing else can)."""
    if bind_weights:
        return [hoist_size_arithmetic, functools.partial(call_block_bodies, shared_weight_values=True), bind_block_weights,
                split_before_first_block]
    return [hoist_size_arithmetic, call_block_bodies, split_before_first_block]


def outline_passes(plans) -> list[Pass]:
    return [functools.partial(contiguous_block_input, plans=plans), functools.partial(hoist_out_of_middle, plans=plans),
            functools.partial(outline_middle_blocks, plans=plans)]


def cache_passes(layout, timestep, parallel=None) -> list[Pass]:
    return [functools.partial(insert_cache_cond, layout=layout, timestep=timestep, parallel=parallel)]


def pass_name(p: Pass) -> str:
    return getattr(p, "func", p).__name__


def run_passes(gm: fx.GraphModule, passes: Sequence[Pass]) -> fx.GraphModule:
    done: list[str] = []
    for p in passes:
        name = pass_name(p)
        try:
            gm = p(gm)
        except CachepassError as e:
            raise type(e)(f"{e} [in pass {name}; passes run before: {done or 'none'}]") from e
        except Exception as e:  # an internal failure: keep the original exception chained
            raise PassError(f"pass {name} failed (passes run before: {done or 'none'}): {e!r}") from e
        log.debug("pass %s done (%d nodes)", name, len(gm.graph.nodes))
        done.append(name)
    return gm
