"""The two branches of a cache unit's ``torch.cond`` (the middle blocks, or the cached residual with its
TaylorSeer extrapolation) and the operand fixes ``cond`` needs (no aliases, standard strides).

Both branches take ``(*region_inputs, *(terms, valid) per slot, stream, elapsed, *sizes)`` and return
``(*outputs per slot, *terms per slot)``: the compute branch the TaylorSeer terms of the residual it computed, the
cached branch the stream's terms as they were. The graph writes the returned terms into the stream's row after the
cond, so a cached call computes no residual and no masked write reads every stream's rows."""

from __future__ import annotations

import math

import torch
from torch import fx
from torch._prims_common import make_contiguous_strides_for
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.proxy import GraphAppendingTracer, Proxy
from torch.multiprocessing.reductions import StorageWeakRef

from cachepass.analysis.blocks import example_value
from cachepass.decision.ops import at
from cachepass.decision.taylorseer import stored_terms
from cachepass.state.layout import StateLayout
from cachepass.state.sizes import hint, size_input_name
from cachepass.unit import UnitSpec


def without_aliases(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
    """cond operands may not alias each other: clone all but the largest of tensors sharing storage.

    FLUX's and HunyuanVideo's single blocks split hidden and encoder states out of one tensor, so
    the head hands the middle region two views of one buffer; the (small) encoder view is copied.
    """
    groups: dict[StorageWeakRef, list[int]] = {}
    for i, node in enumerate(inputs):
        value = example_value(node)
        if isinstance(value, torch.Tensor):
            groups.setdefault(StorageWeakRef(value.untyped_storage()), []).append(i)
    result = list(inputs)
    for members in groups.values():
        members = sorted(members, key=lambda i: hint(example_value(inputs[i]).numel()), reverse=True)  # no guard
        for i in members[1:]:
            clone = graph.call_method("clone", (inputs[i],))
            clone.meta["example_value"] = example_value(inputs[i])
            result[i] = clone
    return result


def contiguous(graph: fx.Graph, inputs: list[fx.Node]) -> list[fx.Node]:
    """Give non-contiguous cond operands standard strides (FastVideo's ``flatten(2).transpose(1, 2)`` tokens).

    Inductor stores such a head output contiguously but compiles the branches for the strides in
    the example value, and the cond then fails its stride assertion (torch 2.11-2.13); a copy
    whose example value is contiguous keeps both sides in agreement.
    """
    result = []
    for node in inputs:
        value = example_value(node)
        if isinstance(value, torch.Tensor) and not is_standard_contiguous(value):
            copy = graph.call_method("contiguous", (node,))
            copy.meta["example_value"] = value.contiguous()
            node = copy
        result.append(node)
    return result


def is_standard_contiguous(value: torch.Tensor) -> bool:
    return tuple(value.stride()) == tuple(make_contiguous_strides_for(value.shape))


def compute_branch(compute: fx.GraphModule, spec: UnitSpec, layout: StateLayout, sizes: list) -> fx.GraphModule:
    """The middle blocks, then each slot's TaylorSeer terms of the residual they computed (`stored_terms`):
    ``compute`` itself, changed in place (the cond replaces the unit it was outlined into; a copy cost a node copy
    per middle-block node). ``sizes``: the symbolic sizes passed last (`cachepass.state.sizes.size_inputs`),
    placeholders that bind them.

    Outputs must have standard contiguous strides (as the cached branch's) and alias neither an
    input nor each other: such outputs are cloned, the rest returned as computed.
    """
    graph = compute.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tracer = GraphAppendingTracer(graph)
    names = [f"slot{slot.slot}_{part}" for slot in spec.slots for part in ("terms", "valid")] + ["stream", "elapsed"]
    with graph.inserting_after(placeholders[-1]):
        for size in reversed(sizes):  # inserting_after a fixed node: reversed keeps their order
            graph.placeholder(size_input_name(size)).meta["example_value"] = size
        # prefixed: a placeholder's target is its argument's name, and the blocks' own inputs keep theirs
        extra = {name: Proxy(graph.placeholder(f"stepcache_{name}"), tracer) for name in reversed(names)}
    output = graph.output_node()
    with graph.inserting_before(output):
        terms = [stored_terms(Proxy(out, tracer) - Proxy(placeholders[slot.input_position], tracer),
                              extra[f"slot{slot.slot}_terms"], extra["stream"], extra["elapsed"],
                              layout.taylor_order(slot.role)).node
                 for slot, out in zip(spec.slots, output.args[0])]
    taken = {StorageWeakRef(example_value(p).untyped_storage())
             for p in placeholders if isinstance(example_value(p), torch.Tensor)}
    results = []
    with graph.inserting_before(output):
        for out in output.args[0]:
            value = example_value(out)
            storage = StorageWeakRef(value.untyped_storage())
            if is_standard_contiguous(value) and storage not in taken:
                results.append(out)
            else:
                results.append(graph.call_method("clone", (out,), {"memory_format": torch.contiguous_format}))
            taken.add(storage)
    output.args = (tuple(results + terms),)  # the terms: new tensors (a difference, or a stack of them)
    compute.recompile()
    return compute


def cached_branch(spec: UnitSpec, layout: StateLayout, region_values: list, sizes: list) -> fx.GraphModule:
    """``H_F + sum_i dY(i) * elapsed^i / i!`` per carried slot (order 0: ``H_F + R_M``), then the stream's terms as
    read (what the graph writes back: a cached step stores nothing new); the symbolic ``sizes`` last."""
    graph = fx.Graph()
    tracer = GraphAppendingTracer(graph)
    inputs = [Proxy(graph.placeholder(f"region_{i}"), tracer) for i in range(len(region_values))]
    taylor = []
    for slot in spec.slots:
        terms = Proxy(graph.placeholder(f"slot{slot.slot}_terms"), tracer)
        valid = Proxy(graph.placeholder(f"slot{slot.slot}_valid"), tracer)
        taylor.append((terms, valid))
    stream = Proxy(graph.placeholder("stream"), tracer)
    elapsed = Proxy(graph.placeholder("elapsed"), tracer)
    for size in sizes:
        graph.placeholder(size_input_name(size)).meta["example_value"] = size
    results, read = [], []
    for slot, (terms, valid) in zip(spec.slots, taylor):
        order = layout.taylor_order(slot.role)
        terms = at(terms, stream)  # the stream's row: a new tensor, returned as the terms to store
        read.append(terms.node)
        if order > 0:  # order 0 reads no validity flag: no pick of it runs
            valid = at(valid, stream)
        approx = terms[0]
        for i in range(1, order + 1):
            # float Pow: TensorRT has no int Pow
            term = terms[i] * (1 / math.factorial(i)) * elapsed.to(terms[i].dtype) ** i
            approx = approx + torch.where(valid[i], term, 0.0)
        out = approx + inputs[slot.input_position]
        if not is_standard_contiguous(region_values[slot.input_position]):
            out = out.clone(memory_format=torch.contiguous_format)
        results.append(out.node)
    graph.output(tuple(results + read))
    return _LazyGraphModule(torch.nn.Module(), graph, class_name=f"StepcacheCached{spec.index}")


def numbers_read_in_branches(gm: fx.GraphModule) -> list[str]:
    """The inputs of ``gm``'s cond branches that a branch reads as a number (``.item()``): one graph's compile cannot
    guard on such a read inside ``torch.cond`` (a data-dependent value); the piecewise form compiles the branches'
    blocks as graphs of their own, where it is an input."""
    read = []
    for node in gm.graph.nodes:
        if node.target is not torch.ops.higher_order.cond:
            continue
        for branch in (gm.get_submodule(node.args[1].target), gm.get_submodule(node.args[2].target)):
            read += _read_as_numbers(branch)
    return list(dict.fromkeys(read))


def _read_as_numbers(gm: fx.GraphModule) -> list[str]:
    """The inputs of ``gm`` it reads by ``.item()``, in its graph or through a call of a submodule graph (a block's
    body, `cachepass.passes.call_block_bodies`), named as ``gm``'s placeholders."""
    read = []
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == "item" and n.args[0].op == "placeholder":
            read.append(n.args[0].name)
        elif n.op == "call_module" and isinstance(body := gm.get_submodule(n.target), fx.GraphModule):
            inner = _read_as_numbers(body)
            read += [arg.name for placeholder, arg in zip((p for p in body.graph.nodes if p.op == "placeholder"), n.args)
                     if placeholder.name in inner and isinstance(arg, fx.Node) and arg.op == "placeholder"]
    return read
