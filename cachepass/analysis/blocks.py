"""Find the repeated transformer blocks in a Dynamo graph and plan one cache unit per block list.

Works on the torch-IR ``GraphModule`` Dynamo hands a backend. Blocks are recognised from
``node.meta["nn_module_stack"]``: a module path ending in ``.<int>`` whose parent list holds two or
more blocks of one class is a block list. Nested lists (inside a block) belong to their block, and
only the shallowest block lists form the trunk (HunyuanVideo's text-refiner blocks, three levels
down, are reported as skipped). Several trunk lists in sequence (FLUX's double then single
blocks) are separate cache units, as in cache-dit.

Inside a list the blocks are structurally identical, which gives every block the same *carried
slots*: the values block ``i`` produces and block ``i + 1`` consumes (hidden states, and encoder
states for two-stream blocks). The *hidden* slot, whose head residual drives the cache decision,
is the slot that reaches the model output (followed backwards through later lists).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from collections import OrderedDict
from typing import Any, Iterable

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from cachepass.config import StepCacheConfig
from cachepass.errors import BlockDiscoveryError, UnsupportedGraphError

log = logging.getLogger(__name__)

_LIST_ITEM = re.compile(r"^(.*)\.(\d+)$")
_ENCODER_WORDS = ("encoder", "context", "text", "txt")


# ---------------------------------------------------------------------------- module paths
_HOOKED_ROOT = re.compile(r"^L\['function_reference'\]\.forward\.__self__")
_HOOKED_MODULE = re.compile(r"\.forward\.(?:func\.)?__closure__\.\d+\.cell_contents\.forward\.__self__")


@functools.lru_cache(maxsize=65536)  # pure; a graph repeats a few hundred paths over tens of thousands of nodes
def normalize_module_path(dynamo_path: str) -> str:
    """``L['self'].__dict__['_modules']['blocks'].3.attn`` (or ``L['self'].blocks[3]``) -> ``blocks.3.attn``.

    A model whose forward a diffusers hook wraps (context parallel, cache hooks) is traced from the
    hook's ``new_forward``: its paths start at ``L['function_reference'].forward.__self__``, and the
    submodules of a hooked block are reached through the hook's closure
    (``blocks.0.forward.func.__closure__.0.cell_contents.forward.__self__.attn1``).
    """
    path = _HOOKED_ROOT.sub("", dynamo_path).replace("L['self']", "")
    path = re.sub(r"\.__dict__\['_modules'\]\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    return _HOOKED_MODULE.sub("", path).strip(".")


def list_items(node: fx.Node) -> list[tuple[str, int, str]]:
    """(list path, index, block class) for every list item on the node's module stack, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [item for path, cls in stack.values() for item in _list_item(path, getattr(cls, "__name__", str(cls)))]


@functools.lru_cache(maxsize=65536)
def _list_item(path: str, cls_name: str) -> tuple[tuple[str, int, str], ...]:
    match = _LIST_ITEM.match(normalize_module_path(path))
    return ((match.group(1), int(match.group(2)), cls_name),) if match else ()


def _is_computation(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method", "call_module")


def example_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def describe_value(node: fx.Node) -> str:
    value = example_value(node)
    if isinstance(value, torch.Tensor):
        return f"{node.name}: {str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    return f"{node.name}: {type(value).__name__}"


# ---------------------------------------------------------------------------- block lists
@dataclasses.dataclass
class Block:
    path: str
    nodes: list[fx.Node]
    inputs: list[fx.Node] = dataclasses.field(default_factory=list)  # outside values, first-use order
    carried: list[fx.Node] = dataclasses.field(default_factory=list)  # carried inputs, slot order
    outputs: dict[int, fx.Node] = dataclasses.field(default_factory=dict)  # slot -> produced value


@dataclasses.dataclass
class BlockList:
    """One repeated block list as it appears in the graph (call order)."""

    path: str
    block_class: str
    blocks: list[Block]
    hidden_slot: int = 0
    odd_last: bool = False  # the last block is built differently (fewer outputs, or another class)

    @property
    def num_slots(self) -> int:
        return len(self.blocks[0].carried)

    def slot_role(self, slot: int) -> str:
        return "hidden" if slot == self.hidden_slot else "encoder"


@dataclasses.dataclass
class Discovery:
    block_lists: list[BlockList]
    skipped: list[str]  # "path (N blocks of Class): reason"
    parallel: Any = None  # the `cachepass.analysis.sequence_parallel.SequenceParallel` a sharded graph decides over


def find_block_lists(gm: fx.GraphModule) -> Discovery:
    """All trunk block lists of ``gm`` in call order, with their carried slots resolved."""
    nodes = [n for n in gm.graph.nodes if _is_computation(n)]
    candidates = _candidate_lists(nodes)
    owner = _assign_blocks(nodes, candidates)
    lists = _group_blocks(gm, owner, candidates)
    skipped = []
    if lists:
        depth = min(bl.path.count(".") for bl in lists)
        for bl in lists:
            if bl.path.count(".") > depth:
                skipped.append(f"{bl.path} ({len(bl.blocks)} x {bl.block_class}): nested below the trunk")
        lists = [bl for bl in lists if bl.path.count(".") == depth]
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    for bl in lists:
        _resolve_slots(bl, position)
    for later, bl in reversed(list(zip(lists[1:] + [None], lists))):
        bl.hidden_slot = _hidden_slot(bl, later)
    return Discovery(lists, skipped)


def _list_classes(nodes: Iterable[fx.Node]) -> dict[str, dict[int, str]]:
    """list path -> {item index: class name} over the module stacks of ``nodes``."""
    classes: dict[str, dict[int, str]] = {}
    for node in nodes:
        for path, index, cls in list_items(node):
            classes.setdefault(path, {})[index] = cls
    return classes


def _candidate_lists(nodes: Iterable[fx.Node]) -> dict[str, str]:
    """list path -> block class, for lists with >= 2 items of one class (the last item may be another)."""
    candidates = {}
    for path, by_index in _list_classes(nodes).items():
        ordered = [by_index[i] for i in sorted(by_index)]
        core = set(ordered[:-1]) if len(ordered) > 2 else set(ordered)
        if len(ordered) >= 2 and len(core) == 1:
            candidates[path] = next(iter(core))
    return candidates


def _assign_blocks(nodes: list[fx.Node], candidates: dict[str, str]) -> dict[fx.Node, tuple[str, int]]:
    owner = {}
    for node in nodes:
        for path, index, _ in list_items(node):
            if path in candidates:
                owner[node] = (path, index)
                break
    return owner


def block_nodes_by_list_item(gm: fx.GraphModule) -> dict[str, dict[int, list[fx.Node]]]:
    """list path -> item index -> the item's computation nodes in graph order, for every candidate list."""
    nodes = [n for n in gm.graph.nodes if _is_computation(n)]
    result: dict[str, dict[int, list[fx.Node]]] = {}
    for node, (path, index) in _assign_blocks(nodes, _candidate_lists(nodes)).items():
        result.setdefault(path, {}).setdefault(index, []).append(node)
    return result


def _group_blocks(gm, owner, candidates) -> list[BlockList]:
    by_list: "OrderedDict[str, OrderedDict[int, list[fx.Node]]]" = OrderedDict()
    order: dict[str, list[int]] = {}
    for node in gm.graph.nodes:
        key = owner.get(node)
        if key is None:
            continue
        path, index = key
        blocks = by_list.setdefault(path, OrderedDict())
        seen = order.setdefault(path, [])
        if index not in blocks:
            blocks[index] = []
            seen.append(index)
        elif seen[-1] != index:
            raise UnsupportedGraphError(
                f"block {path}.{index} runs twice or interleaves with {path}.{seen[-1]}; "
                "cachepass needs each block of a list to run once, in order"
            )
        blocks[index].append(node)
    result = []
    for path, blocks in by_list.items():
        if len(blocks) < 2:
            continue
        block_list = BlockList(path, candidates[path], [Block(f"{path}.{i}", ns) for i, ns in blocks.items()])
        last_class = next((cls for p, i, cls in list_items(block_list.blocks[-1].nodes[0]) if p == path), None)
        block_list.odd_last = last_class != block_list.block_class
        result.append(block_list)
    return result


def _resolve_slots(bl: BlockList, position: dict[fx.Node, int]) -> None:
    """Fill each block's inputs, carried inputs (slot order) and slot outputs."""
    members = [set(b.nodes) for b in bl.blocks]
    for block, own in zip(bl.blocks, members):
        block.inputs = _outside_inputs(block.nodes, own)
    for i in range(1, len(bl.blocks)):
        previous_start = position[bl.blocks[i - 1].nodes[0]]
        block = bl.blocks[i]
        # carried: computed by the previous block (or between the two), not a parameter or shared input
        block.carried = [
            n for n in block.inputs
            if position[n] > previous_start and n.op not in ("placeholder", "get_attr")
        ]
    first, second = bl.blocks[0], bl.blocks[1]
    if len(first.inputs) != len(second.inputs):
        raise UnsupportedGraphError(
            f"{first.path} and {second.path} take different numbers of outside values "
            f"({len(first.inputs)} vs {len(second.inputs)}); blocks of a list must be structurally identical"
        )
    carried_positions = [second.inputs.index(n) for n in second.carried]
    first.carried = [first.inputs[p] for p in carried_positions]
    num_slots = len(first.carried)
    if num_slots == 0:
        raise UnsupportedGraphError(f"{second.path} consumes nothing produced by {first.path}; no carried state")
    for block in bl.blocks:
        if len(block.carried) != num_slots:
            raise UnsupportedGraphError(
                f"{block.path} carries {len(block.carried)} values from the previous block, "
                f"{first.path} carries {num_slots}; blocks of {bl.path} must be structurally identical"
            )
    for i in range(len(bl.blocks) - 1):
        _map_outputs_to_next_block(bl.blocks[i], bl.blocks[i + 1], members[i + 1])
    _map_last_block_outputs(bl)


def _outside_inputs(nodes: list[fx.Node], own: set[fx.Node]) -> list[fx.Node]:
    inputs: list[fx.Node] = []
    seen = set()
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in own and arg not in seen:
                seen.add(arg)
                inputs.append(arg)
    return inputs


def _map_outputs_to_next_block(block: Block, nxt: Block, nxt_members: set[fx.Node]) -> None:
    """Slot of each value of ``block`` that reaches a carried input of ``nxt`` (directly or via gap nodes)."""
    own = set(block.nodes)
    for node in block.nodes:
        for slot, carried in enumerate(nxt.carried):
            if _reaches(node, carried, stop=own | nxt_members):
                if slot in block.outputs and block.outputs[slot] is not node:
                    raise UnsupportedGraphError(
                        f"{block.path} feeds carried value {carried.name} of {nxt.path} from two values "
                        f"({block.outputs[slot].name}, {node.name})"
                    )
                block.outputs[slot] = node


def _reaches(src: fx.Node, dst: fx.Node, stop: set[fx.Node]) -> bool:
    """Whether ``dst`` is ``src`` or is computed from it through nodes outside ``stop``."""
    if src is dst:
        return True
    frontier = [u for u in src.users if u not in stop]
    seen = set()
    while frontier:
        node = frontier.pop()
        if node is dst:
            return True
        if node in seen or node in stop:
            continue
        seen.add(node)
        frontier.extend(node.users)
    return False


def _map_last_block_outputs(bl: BlockList) -> None:
    """The last block feeds no next block: match its live outputs to the previous block's slots.

    By structure first; a last block built differently (SD3's ``context_pre_only`` block consumes
    the text stream and returns only the hidden states) is matched by shape and dtype, and marked
    odd. A slot it does not return ends inside the list.
    """
    last, before = bl.blocks[-1], bl.blocks[-2]
    own = set(last.nodes)
    live = [n for n in last.nodes if any(u not in own for u in n.users)]
    signature_last = _signatures(last)
    signature_before = _signatures(before)
    by_signature = {signature_before[node]: slot for slot, node in before.outputs.items()}
    for node in live:
        slot = by_signature.get(signature_last[node])
        if slot is None:
            slot = _slot_by_meta(node, before)
            bl.odd_last = True
        if slot is None or slot in last.outputs:
            raise UnsupportedGraphError(
                f"{last.path} exports {describe_value(node)}, which matches no carried value of {before.path} "
                f"(by structure, or by shape and dtype: {', '.join(describe_value(n) for n in before.outputs.values())})"
            )
        last.outputs[slot] = node
    if len(last.outputs) < bl.num_slots:
        bl.odd_last = True


def _slot_by_meta(node: fx.Node, before: Block) -> int | None:
    """The one slot of ``before`` whose value has ``node``'s shape and dtype, if exactly one has."""
    value = example_value(node)
    if not isinstance(value, torch.Tensor):
        return None
    same = [slot for slot, out in before.outputs.items()
            if isinstance(example_value(out), torch.Tensor)
            and (example_value(out).shape, example_value(out).dtype) == (value.shape, value.dtype)]
    return same[0] if len(same) == 1 else None


def _signatures(block: Block) -> dict[fx.Node, int]:
    """Structural hash of every node of a block: op, target, constants, and where each input comes from.

    Carried inputs hash by slot, parameters by their first-use rank, shared values by identity, so
    the same computation in two blocks of a list hashes equal.
    """
    carried = {n: ("carried", s) for s, n in enumerate(block.carried)}
    params = [n for n in block.inputs if n.op in ("placeholder", "get_attr") and n not in carried]
    leaf = dict(carried)
    leaf.update({n: ("param", r) for r, n in enumerate(params)})
    sig: dict[fx.Node, int] = {}

    def arg_key(a):
        if isinstance(a, fx.Node):
            if a in sig:
                return sig[a]
            return leaf.get(a, ("shared", a.name))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(arg_key(x) for x in a))
        if isinstance(a, dict):
            return tuple(sorted((k, arg_key(v)) for k, v in a.items()))
        return repr(a)

    for node in block.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", repr(node.target))
        sig[node] = hash((node.op, target, arg_key(node.args), arg_key(node.kwargs)))
    return sig


def _hidden_slot(bl: BlockList, later: BlockList | None) -> int:
    """The slot that carries the hidden states: the one whose final value reaches the output."""
    if bl.num_slots == 1:
        return 0
    last = bl.blocks[-1]
    if later is None:
        own = set(last.nodes)
        live = [s for s, n in last.outputs.items() if any(u not in own for u in n.users)]
        reason = "reaches the model output"
    else:
        target = later.blocks[0].carried[later.hidden_slot]
        stop = set().union(*(set(b.nodes) for b in later.blocks))
        live = [s for s, n in last.outputs.items() if _reaches(n, target, stop=stop)]
        reason = f"feeds the hidden states of {later.path}"
    if len(live) == 1:
        return live[0]
    by_name = [s for s in (live or list(last.outputs)) if _looks_like_hidden(last.outputs[s].name)]
    if len(by_name) == 1:
        log.debug("%s: hidden slot chosen by variable name among %s", bl.path, live)
        return by_name[0]
    raise UnsupportedGraphError(
        f"cannot tell which value carried by {bl.path} is the hidden state: slots {live} all {reason} "
        f"({', '.join(describe_value(last.outputs[s]) for s in live)})"
    )


def _looks_like_hidden(name: str) -> bool:
    return "hidden" in name and not any(word in name for word in _ENCODER_WORDS)


# ---------------------------------------------------------------------------- cache units
@dataclasses.dataclass
class SlotPlan:
    """One carried value of a cache unit's middle region."""

    slot: int
    role: str  # "hidden" or "encoder"
    middle_input: fx.Node  # value entering the middle region (head output)
    middle_output: fx.Node  # value leaving the middle region
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclasses.dataclass
class CacheUnitPlan:
    """What the passes rewrite for one block list: the middle region and its carried slots."""

    index: int
    list_path: str
    block_class: str
    block_paths: list[str]
    head: range
    middle: range
    tail: range
    chain_input: fx.Node  # hidden states entering block 0
    region: list[fx.Node]  # middle-region nodes, graph order
    hoisted: list[fx.Node]  # independent gap nodes inside the middle range, moved before it
    slots: list[SlotPlan]  # slots leaving the middle region (its outputs), in slot order

    @property
    def name(self) -> str:
        return self.list_path


def plan_cache_units(gm: fx.GraphModule, config: StepCacheConfig) -> tuple[list[CacheUnitPlan], Discovery]:
    """Find the block lists and split each into head / middle / tail per the config."""
    discovery = find_block_lists(gm)
    if not discovery.block_lists:
        raise BlockDiscoveryError(_why_no_block_list(gm))
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    plans = [_plan_unit(i, bl, config, position) for i, bl in enumerate(discovery.block_lists)]
    return plans, discovery


def _why_no_block_list(gm: fx.GraphModule) -> str:
    """What the graph holds instead of a whole block list: a cut list (a graph break), mixed classes, or none."""
    lists = _list_classes(n for n in gm.graph.nodes if _is_computation(n))
    cut = "; a graph break cut the model (compile with fullgraph=True, cachepass.compile's default, to see where)"
    for path, by_index in lists.items():
        if len(by_index) == 1:
            (index,) = by_index
            return f"only block {path}.{index} of the list {path} is in this graph{cut}"
        mixed = sorted(set(by_index.values()))
        if len(mixed) > 1:
            kinds = ", ".join(f"{path}.{i}: {c}" for i, c in sorted(by_index.items()))
            return (f"the blocks of {path} are of different classes ({kinds}); cachepass caches lists whose blocks "
                    "share one class (only the last block may differ)")
    modules = sorted({normalize_module_path(p).split(".")[0] for n in gm.graph.nodes
                      for p, _ in (n.meta.get("nn_module_stack") or {}).values() if normalize_module_path(p)})
    if not modules:
        return f"no repeated block list found: this graph calls no submodule{cut}, or the model has no ModuleList of blocks"
    return ("no repeated block list found in the graph (a ModuleList with >= 2 blocks of one class, each called "
            f"once in order); top-level modules seen: {modules}. If torch.compile ran with fullgraph=False, a graph "
            "break may have cut the model (compile with fullgraph=True, cachepass.compile's default, to see where)")


def _plan_unit(index: int, bl: BlockList, config: StepCacheConfig, position) -> CacheUnitPlan:
    n = len(bl.blocks)
    fn, bn = config.num_head_blocks, config.num_tail_blocks
    if fn + bn >= n:
        raise BlockDiscoveryError(
            f"{bl.path} has {n} blocks but num_head_blocks={fn} + num_tail_blocks={bn} = {fn + bn} "
            f"leaves no middle block to cache; allowed: num_head_blocks + num_tail_blocks <= {n - 1}"
        )
    middle_blocks = bl.blocks[fn : n - bn]
    first = middle_blocks[0].nodes[0]
    last = bl.blocks[n - bn].nodes[0] if bn else bl.blocks[-1].nodes[-1]
    in_range = [node for node in first.graph.nodes if position[first] <= position[node] <= position[last]]
    if bn:
        in_range = in_range[:-1]  # stop before the first tail node
    middle_nodes = set().union(*(set(b.nodes) for b in middle_blocks))
    region, hoisted = [], []
    region_set: set[fx.Node] = set()
    for node in in_range:
        if node in middle_nodes or any(a in region_set for a in node.all_input_nodes):
            region.append(node)
            region_set.add(node)
        else:
            hoisted.append(node)
    entry = bl.blocks[fn]
    exit_slots = _exit_slots(bl, fn, bn, region_set)
    slots = []
    for slot, out in sorted(exit_slots.items()):
        enter = entry.carried[slot]
        slots.append(_slot_plan(bl, slot, enter, out, middle_blocks))
    hidden = bl.blocks[0].carried[bl.hidden_slot]
    head_exit = entry.carried[bl.hidden_slot]
    if bl.hidden_slot not in exit_slots:
        raise UnsupportedGraphError(f"the hidden states carried by {bl.path} do not leave its middle region")
    _require_same_meta(hidden, head_exit, f"{bl.blocks[0].path} input", f"{bl.blocks[fn - 1].path} output")
    plan = CacheUnitPlan(
        index=index,
        list_path=bl.path,
        block_class=bl.block_class,
        block_paths=[b.path for b in bl.blocks],
        head=range(0, fn),
        middle=range(fn, n - bn),
        tail=range(n - bn, n),
        chain_input=hidden,
        region=region,
        hoisted=hoisted,
        slots=slots,
    )
    if bl.odd_last:
        log.info("%s is built differently from the other blocks of %s; it runs in the %s", bl.blocks[-1].path,
                 bl.path, "tail" if bn else "middle (its outputs are carried slots)")
    log.debug(
        "cache unit %s: %d blocks, head %s middle %s tail %s, %d region nodes, %d hoisted",
        bl.path, n, plan.head, plan.middle, plan.tail, len(region), len(hoisted),
    )
    return plan


def _exit_slots(bl: BlockList, fn: int, bn: int, region: set[fx.Node]) -> dict[int, fx.Node]:
    """Slot -> value leaving the middle region; every value leaving it must be a carried slot."""
    n = len(bl.blocks)
    if bn:
        nxt = bl.blocks[n - bn]
        known = {node: slot for slot, node in enumerate(nxt.carried) if node in region}
    else:
        known = {node: slot for slot, node in bl.blocks[-1].outputs.items()}
    exits: dict[int, fx.Node] = {}
    for node in region:
        if all(u in region for u in node.users):
            continue
        if node not in known:
            users = ", ".join(u.name for u in node.users if u not in region)
            raise UnsupportedGraphError(
                f"the middle region of {bl.path} (blocks {fn}..{n - bn - 1}) exports {describe_value(node)} "
                f"to {users}, which is not carried block state; cachepass cannot skip it"
            )
        exits[known[node]] = node
    return exits


def _slot_plan(bl, slot, enter, out, middle_blocks) -> SlotPlan:
    _require_same_meta(enter, out, f"{middle_blocks[0].path} input", f"{middle_blocks[-1].path} output")
    value = example_value(out)
    return SlotPlan(slot, bl.slot_role(slot), enter, out, tuple(value.shape), value.dtype, value.device)


def _require_same_meta(a: fx.Node, b: fx.Node, where_a: str, where_b: str) -> None:
    va, vb = example_value(a), example_value(b)
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        raise UnsupportedGraphError(f"carried value is not a tensor: {where_a} {describe_value(a)}, {where_b} "
                                    f"{describe_value(b)}")
    if not _same_sizes(va.shape, vb.shape) or va.dtype != vb.dtype:
        raise UnsupportedGraphError(
            f"carried value changes shape or dtype across the cached region: {where_a} is "
            f"{va.dtype}{list(va.shape)}, {where_b} is {vb.dtype}{list(vb.shape)}"
        )


def _same_sizes(a, b) -> bool:
    """Equal sizes, symbolic ones equal for every shape (no guard is added to the graph)."""
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))
