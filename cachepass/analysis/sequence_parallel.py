"""The process group that shards a context-parallel model's tokens, found from its graph.

Under diffusers' context parallel (``transformer.enable_parallelism(config=ContextParallelConfig(...))``)
every rank runs the blocks on a shard of the sequence, and Dynamo records the model's collectives
as ``_c10d_functional`` nodes. The group over which the hidden states are un-sharded after the last
block (the ``all_gather_into_tensor`` the last block's hidden output reaches) is the group whose
ranks must agree on every cache decision: `cachepass.passes.insert_cache_cond` all-reduces each
unit's decision inputs over it (``SequenceParallel``).

The backend option ``sequence_parallel_group`` overrides the detection:

    "auto"        (default) the gather's group when the graph has collectives; none without them
    ProcessGroup  this group (its size must match the gather's, when the graph has one): for models
                  sharded outside the compiled graph (FastVideo's sequence parallel)
    None          not sharded: a graph with collectives is refused
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import fx

from cachepass.analysis.blocks import Discovery, example_value, normalize_module_path
from cachepass.errors import CachepassError, UnsupportedGraphError

log = logging.getLogger(__name__)

AUTO = "auto"
_GATHER = "all_gather_into_tensor"


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """The group every cache decision is reduced over."""

    group_name: str
    size: int
    found_by: str

    def describe(self) -> str:
        return f"sequence parallel over {self.size} ranks (group {self.group_name!r}, {self.found_by})"


def check_option(value: Any) -> Any:
    """``sequence_parallel_group``: "auto", None or a ProcessGroup; anything else raises naming the field."""
    if value is None or value == AUTO or (dist.is_available() and isinstance(value, dist.ProcessGroup)):
        return value
    raise ValueError(f"stepcache option sequence_parallel_group={value!r} is invalid; allowed: 'auto', None, "
                     "or a torch.distributed.ProcessGroup (the group that shards the tokens)")


def collectives(gm: fx.GraphModule) -> list[fx.Node]:
    """The collectives of ``gm``'s graph and of its submodules' (the blocks' bodies, `cachepass.passes.call_block_bodies`:
    a sharded attention's all-to-alls are there)."""
    return [n for module in gm.modules() if isinstance(module, fx.GraphModule) for n in module.graph.nodes
            if n.op == "call_function" and "_c10d_functional" in str(n.target)]


def find_sequence_parallel(gm: fx.GraphModule, discovery: Discovery, option: Any = AUTO) -> SequenceParallel | None:
    """The group to reduce cache decisions over (None: the graph runs on one rank). See the module doc."""
    found = collectives(gm)
    names = sorted({str(n.target) for n in found})
    if option is None:
        if found:
            raise UnsupportedGraphError(
                f"the graph has collectives ({', '.join(names[:4])}): the model runs sharded over several ranks "
                "(diffusers context parallel?). Per-rank cache decisions on a shard of the tokens would differ between "
                "ranks and hang them in the collectives of the blocks only some of them run. The stepcache backend "
                "decides across ranks with sequence_parallel_group='auto' (its default) or the group that shards the "
                "tokens; cachepass.export and the eager reference take the unsharded model")
        return None
    gather = _unsharding_gather(gm, discovery) if found else None
    if option == AUTO:
        if gather is None:
            if found:
                raise CachepassError(
                    f"the graph has collectives ({', '.join(names[:4])}) but no all_gather of the last block's hidden "
                    "states, so stepcache cannot tell which ranks share a sample's tokens; pass "
                    "options={'sequence_parallel_group': <the group that shards the tokens>}")
            return None
        return gather
    size, name = dist.get_world_size(option), option.group_name
    if gather is not None and gather.size != size:
        raise CachepassError(
            f"sequence_parallel_group has {size} ranks, but the model gathers its tokens over {gather.size} ranks "
            f"({gather.found_by}, group {gather.group_name!r}): pass the group that shards the tokens, or 'auto'")
    how = "the sequence_parallel_group option"
    if gather is None:
        log.info("stepcache: no all_gather of the hidden states in the graph; the tokens are taken as sharded "
                 "outside it over the given group of %d ranks", size)
    return SequenceParallel(name, size, how)


def _unsharding_gather(gm: fx.GraphModule, discovery: Discovery) -> SequenceParallel | None:
    """The first all_gather the last block's hidden output reaches, checked to un-shard the whole output."""
    last = discovery.block_lists[-1]
    hidden = last.blocks[-1].outputs.get(last.hidden_slot)
    if hidden is None:
        return None
    reached = _downstream(hidden)
    gather = next((n for n in gm.graph.nodes if n in reached and str(n.target).endswith(_GATHER)), None)
    if gather is None:
        return None
    local, size, name = gather.args[0], int(gather.args[1]), str(gather.args[2])
    where = _module_of(gather)
    shard = example_value(local).numel()
    output = _largest_output(gm, _downstream(gather))
    if output is not None and example_value(output).numel() != size * shard:
        raise CachepassError(
            f"the all_gather after the last block ({where}) collects {size} x {shard} elements, but the output it "
            f"feeds has {example_value(output).numel()}: the tokens seem sharded over more ranks than its group of "
            f"{size}. Pass options={{'sequence_parallel_group': <the group that shards the tokens>}}")
    return SequenceParallel(name, size, f"found from the all_gather in {where}")


def _downstream(node: fx.Node) -> set[fx.Node]:
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current not in seen:
            seen.add(current)
            frontier.extend(current.users)
    return seen


def _largest_output(gm: fx.GraphModule, reached: set[fx.Node]) -> fx.Node | None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    tensors = [n for n in output.all_input_nodes if n in reached and isinstance(example_value(n), torch.Tensor)]
    return max(tensors, key=lambda n: example_value(n).numel(), default=None)


def _module_of(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [normalize_module_path(path) for path, _ in stack.values()]
    return next((p for p in reversed(paths) if p), "the model's top level")
