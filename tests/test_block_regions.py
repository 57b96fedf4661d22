"""Blocks traced once as nested compile regions: the inlined graph equals an unmarked trace, the class is
marked only during a call, and a block class the regions cannot take is traced inline (logged)."""

from __future__ import annotations

import logging

import torch

import cachepass
from bench.tiny_models import CASES
from cachepass import block_regions
from cachepass.passes.inline_block_regions import inline_block_regions


def _dynamo_graph(case, model, marked: bool):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    classes = block_regions.block_classes(model) if marked else ()
    with torch.no_grad(), block_regions.marked(classes):
        case.call(compiled, x, torch.tensor(0.5), cond)
    torch._dynamo.reset()
    return graphs[0]


def _structure(gm):
    """Per node: op, target and the module paths on its stack; per input, what it is (node names differ between
    traces, and Dynamo records a lifted weight inside the region it was first read in)."""
    def paths(node):
        return tuple(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())

    def source(node):
        grapharg = node.meta.get("grapharg")
        return grapharg.source.name if grapharg is not None and grapharg.source is not None else None

    return [(n.op, source(n)) if n.op == "placeholder" else (n.op, str(n.target), paths(n))
            for n in gm.graph.nodes if n.op != "get_attr"]


def test_the_inlined_regions_give_the_graph_of_an_unmarked_trace():
    case = CASES["wan"]
    model = case.model().eval()
    marked = _dynamo_graph(case, model, marked=True)
    calls = [n for n in marked.graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(calls) == len(model.blocks)  # traced once, called per block
    assert _structure(inline_block_regions(marked)) == _structure(_dynamo_graph(case, model, marked=False))


def test_the_mark_is_on_the_class_only_while_a_compiled_call_runs(caplog):
    case = CASES["wan"]
    cls = type(case.model().blocks[0])
    original = cls.forward
    model = case.model().eval()
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="cachepass.passes.inline_block_regions"):
        out = case.call(compiled, x, torch.tensor(0.5), cond)
        assert cls.forward is original and "forward" in cls.__dict__
        reference = case.call(model, x, torch.tensor(0.5), cond)
    assert f"inlined {len(model.blocks)} block region call(s) of 1 traced bod(ies)" in caplog.text
    assert torch.equal(out, reference)


def test_a_block_class_whose_outputs_alias_its_inputs_is_traced_inline(caplog, monkeypatch):
    """FLUX's blocks return values that alias their inputs, which a nested compile region refuses."""
    monkeypatch.setattr(block_regions, "_REFUSED", set())  # as in a fresh process (other tests compiled FLUX)
    case = CASES["flux"]
    model = case.model().eval()
    classes = block_regions.block_classes(model)
    assert {c.__name__ for c in classes} == {"FluxTransformerBlock", "FluxSingleTransformerBlock"}
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="cachepass.block_regions"):
        out = case.call(compiled, x, torch.tensor(0.5), cond)
        reference = case.call(model, x, torch.tensor(0.5), cond)
    assert "tracing them inline instead" in caplog.text
    assert not set(classes) & set(block_regions.block_classes(model))  # not tried again in this process
    assert torch.equal(out, reference)
