"""The first block of each class traced once and the others as leaves: the graph of body calls, each call expanded,
equals an unmarked trace (for Wan and for FLUX's two classes), the class is marked only during a call, and blocks
the leaves cannot stand for are traced inline (logged), with the right result."""

from __future__ import annotations

import logging
import operator

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import cachepass
from bench.tiny_models import CASES
from cachepass import block_regions
from cachepass.analysis.blocks import list_items
from cachepass.leaf_weights import weight_path
from cachepass.passes.call_block_bodies import BODY_PREFIX, call_block_bodies
from cachepass.pipeline import copy_graph_module


def _dynamo_graph(case, model, marked: bool):
    """Dynamo's graph of ``model`` as the passes get it (with the blocks made body calls when ``marked``, then each
    call expanded): its structure, how many leaves the trace had, and how many body calls the pass made (a block's
    nodes in the graph are its call and the call's getitems only)."""
    graphs = []

    def backend(gm, example_inputs):  # the structure here: Dynamo drops the inputs' sources after the backend
        leaves = sum(n.target is block_regions.leaf for n in gm.graph.nodes)
        called = call_block_bodies(copy_graph_module(gm))
        in_blocks = [n for n in called.graph.nodes if n.op.startswith("call_") and list_items(n)]  # of a block's
        calls = sum(n.op == "call_module" and n.target.startswith(BODY_PREFIX) for n in in_blocks)
        assert not marked or all(n.target is operator.getitem or n.op == "call_module" for n in in_blocks)  # no copy
        graphs.append((_structure(_expanded(called)), leaves, calls))
        return gm.forward  # the leaves run as they are: each block at its path, with real tensors

    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend=backend, dynamic=False, fullgraph=True)
    lists = block_regions.block_lists(model) if marked else ()
    with torch.no_grad(), block_regions.marked(model, lists):
        case.call(compiled, x, torch.tensor(0.5), cond)
    torch._dynamo.reset()
    return graphs[0]


def _expanded(gm):
    """Each body call replaced by a copy of the body's nodes, module paths moved from the first block to the call's."""
    traced_at = {}  # body -> the block it was traced in: its first call's
    for call in [n for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith(BODY_PREFIX)]:
        body = gm.get_submodule(call.target)
        caller = max((path for path, _ in call.meta["nn_module_stack"].values()), key=len)
        traced = traced_at.setdefault(call.target, caller)
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], call.args))
        with gm.graph.inserting_before(call):
            for node in body.graph.nodes:
                if node.op == "output":
                    outputs = [env[n] for n in node.args[0]]
                elif node.op != "placeholder":
                    env[node] = copy = gm.graph.node_copy(node, env.__getitem__)
                    stack = node.meta.get("nn_module_stack") or {}
                    copy.meta["nn_module_stack"] = {key: (caller + path[len(traced):] if path.startswith(traced) else path,
                                                          cls) for key, (path, cls) in stack.items()}
        for user in list(call.users):
            assert user.target is operator.getitem
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        gm.graph.erase_node(call)
    for node in reversed(gm.graph.nodes):  # what the caller did not use (Dynamo dropped it there)
        if node.op in ("call_function", "call_method") and not node.users and not node.is_impure():
            gm.graph.erase_node(node)
    return gm


def _structure(gm: fx.GraphModule):
    """Per node: op, target and the module paths on its stack; the inputs' paths (Dynamo's sources, or the leaves'
    weights' marks), sorted (node names differ between traces, and the leaves' weights come after Dynamo's inputs)."""
    def paths(node):
        return tuple(path for path, _ in (node.meta.get("nn_module_stack") or {}).values())

    inputs = sorted(str(weight_path(n)) for n in gm.graph.nodes if n.op == "placeholder")
    return inputs, [(n.op, str(n.target), paths(n))
                    for n in gm.graph.nodes if n.op not in ("get_attr", "placeholder")]


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_the_body_calls_expanded_give_the_graph_of_an_unmarked_trace(name):
    case = CASES[name]
    model = case.model().eval()
    (expanded, leaves, calls), (unmarked, no_leaves, _) = _dynamo_graph(case, model, True), _dynamo_graph(case, model, False)
    classes = {cls for cls, _ in block_regions.block_lists(model)}
    blocks = [m for m in model.modules() if type(m) in classes]
    assert leaves == len(blocks) - len(classes) > 0 and no_leaves == 0  # one block per class traced, others leaves
    assert calls == len(blocks)  # one body call per block
    assert "None" not in expanded[0] and len(expanded[0]) > len(blocks)  # every input has its path
    assert expanded == unmarked


def test_the_mark_is_on_the_class_only_while_a_compiled_call_runs(caplog):
    case = CASES["wan"]
    cls = type(case.model().blocks[0])
    original = cls.forward
    model = case.model().eval()
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager", scope="model")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="cachepass.passes.call_block_bodies"):
        out = case.call(compiled, x, torch.tensor(0.5), cond)
        assert cls.forward is original and "forward" in cls.__dict__
        reference = case.call(model, x, torch.tensor(0.5), cond)
    assert (f"{len(model.blocks) - 1} block leaf call(s), 0 chain(s) of blocks and 1 traced block(s) made calls of 1 body "
            "module(s)") in caplog.text
    assert torch.equal(out, reference)


@pytest.mark.parametrize("difference", ["attribute", "hook"])
def test_blocks_of_another_configuration_are_traced_inline_with_the_right_result(difference, caplog, monkeypatch):
    """A leaf stands for the first block's trace: a block that differs (one norm's ``eps``, or a hook on one of its
    submodules) must not take that trace. A middle block that differs makes its leaf's trace fail, and the call is
    traced with every block inline; a last block that differs (SD3's) is traced inline alone, found at the compile,
    the blocks before it staying leaves."""
    monkeypatch.setattr(block_regions, "_REFUSED", set())
    case = CASES["wan"]
    config = cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4)
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    for odd in (2, len(case.model().blocks) - 1):
        model = case.model().eval()
        block = model.blocks[odd]
        if difference == "attribute":
            next(m for m in block.modules() if isinstance(m, torch.nn.LayerNorm)).eps = 0.5
        else:
            block.attn1.register_forward_hook(lambda module, args, output: output * 2)
        caplog.clear()
        with torch.no_grad(), caplog.at_level(logging.INFO, logger="cachepass.block_regions"):
            out = case.call(cachepass.compile(model, config, inner="aot_eager"), x, torch.tensor(0.5), cond)
            reference = case.call(model, x, torch.tensor(0.5), cond)
        if odd == 2:
            assert "differ in configuration" in caplog.text and "tracing every block inline" in caplog.text
            assert block_regions._REFUSED
            block_regions._REFUSED.clear()
        else:
            assert f"blocks.{odd} is configured apart from blocks.0: traced inline" in caplog.text
            assert not block_regions._REFUSED
        assert torch.equal(out, reference)


def test_a_leaf_block_weight_is_read_from_the_model_on_every_call_and_a_new_layout_refused():
    """Dynamo does not see the leaves' weights: the backend reads them from the model on every call. A weight
    replaced by a tensor of the same layout is used at once; one of another dtype fails, naming it."""
    case = CASES["wan"]
    model = case.model().eval()
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    path, linear = [(p, m) for p, m in model.blocks.named_modules(prefix="blocks") if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        before = case.call(compiled, x, torch.tensor(0.5), cond)
        linear.weight = torch.nn.Parameter(torch.randn_like(linear.weight), requires_grad=False)
        cachepass.reset(model)
        after = case.call(compiled, x, torch.tensor(0.5), cond)
        assert torch.equal(after, case.call(model, x, torch.tensor(0.5), cond)) and not torch.equal(after, before)
        linear.weight = torch.nn.Parameter(linear.weight.double(), requires_grad=False)
        cachepass.reset(model)
        with pytest.raises(cachepass.CachepassError, match=rf"{path}\.weight is now .* float64 .* takes .* float32"):
            case.call(compiled, x, torch.tensor(0.5), cond)


def test_a_pytree_type_registered_after_the_first_call_costs_no_recompile():
    """Dynamo guards a traced use of torch's pytree on the size of its registry, so the marks flatten a block's
    arguments without it: a library registering a type after the first call (cache-dit's import did, in a
    benchmark) must not make the compiled model trace again."""
    case = CASES["wan"]
    model = case.model().eval()
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))

    class Registered:
        pass

    with torch.no_grad():
        case.call(compiled, x, torch.tensor(0.5), cond)
        counters.clear()
        pytree.register_pytree_node(Registered, lambda value: ([], None), lambda values, context: Registered())
        try:
            case.call(compiled, x, torch.tensor(0.4), cond)
        finally:
            pytree._deregister_pytree_node(Registered)
    assert counters["stats"]["unique_graphs"] == 0


def test_the_compile_fakes_the_leaves_weights_without_converting_each_weight(monkeypatch):
    """The leaves' weights reach the backend's compile as fake tensors made from their layout (Dynamo hands the
    backend a fake mode of its own): no ``from_tensor`` of a leaf block's weight, which cost about 0.3 ms each, 783
    per compile of a 30-block Wan. The weights the first block reads are Dynamo's inputs and are converted as any."""
    case = CASES["wan"]
    model = case.model().eval()
    leaf_weights = {id(t) for block in model.blocks[1:] for t in (*block.parameters(), *block.buffers())}
    converted = []
    from_tensor = torch._subclasses.fake_tensor.FakeTensorMode.from_tensor

    def spy(self, tensor, *args, **kwargs):
        converted.append(id(tensor))
        return from_tensor(self, tensor, *args, **kwargs)

    monkeypatch.setattr(torch._subclasses.fake_tensor.FakeTensorMode, "from_tensor", spy)
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = case.call(compiled, x, torch.tensor(0.5), cond)
        torch.testing.assert_close(out, case.call(model, x, torch.tensor(0.5), cond))
    first_block = {id(t) for t in model.blocks[0].parameters()}
    assert first_block & set(converted)  # the spy sees Dynamo's conversions
    assert not leaf_weights & set(converted)


def test_leaves_called_as_the_first_block_take_its_traced_outputs_without_running_a_block(monkeypatch):
    """Dynamo traced the first block inline on fake tensors; a leaf called with the same arguments' layouts takes the
    layouts of those outputs (`block_regions.leave` records them) instead of running the block on fake tensors again
    (at symbolic sizes, a new shape's trace, that run cost about 0.1 s of a 2.5 s recompile on the CPU). The result
    is the model's."""
    case = CASES["wan"]
    model = case.model().eval()
    runs = []
    reparametrize = block_regions._reparametrize_module

    def counted(*args, **kwargs):  # a leaf's fake run of the first block goes through this
        runs.append(args[0])
        return reparametrize(*args, **kwargs)

    monkeypatch.setattr(block_regions, "_reparametrize_module", counted)
    compiled = cachepass.compile(model, cachepass.StepCacheConfig(num_head_blocks=1, num_inference_steps=4),
                                 inner="aot_eager")
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t, sample in ((0.5, x), (0.5, torch.cat([x, x], dim=-1))):  # the second shape traces symbolic sizes
            out = case.call(compiled, sample, torch.tensor(t), cond)
            torch.testing.assert_close(out, case.call(model, sample, torch.tensor(t), cond))
    assert len(model.blocks) > 2 and runs == []
