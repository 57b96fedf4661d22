"""The piecewise form: pieces split at blocks and conds, each distinct piece compiled once, conds run by the executor."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import fx
from torch._dynamo.utils import counters
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass import bound_weights
from cachepass.bound_weights import WeightRef
from cachepass.leaf_weights import weight_path
from cachepass.passes.call_block_bodies import BODY_PREFIX
from cachepass.piecewise.compile import PieceCompiler
from cachepass.piecewise.execute import build_program
from cachepass.piecewise.split import PieceKind, is_cond, split_pieces
from cachepass.reference import StepCacheReference
from cachepass.state.runtime import current_state

STEPS = 10


def compile_case(name, model=None, **overrides):
    case = CASES[name]
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * 3, num_inference_steps=STEPS,
                     **overrides)
    model = model or case.model()
    return case, cfg, model, cachepass.compile(model, cfg, inner="aot_eager", form="piecewise", scope="model")


def artifacts_per_list(plan) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}

    def visit(p):
        for step in p.steps:
            if step.kind is PieceKind.BLOCK:
                found.setdefault(step.owner.rsplit(".", 1)[0], set()).add(step.artifact)
            for branch in step.branches or ():
                visit(branch)

    visit(plan)
    return found


@pytest.mark.parametrize("name", ["toy", "wan", "flux"])
def test_matches_the_reference_with_one_graph_and_no_recompiles(name):
    case, cfg, model, compiled = compile_case(name)
    counters.clear()
    out = generate(case, compiled, STEPS)
    assert counters["stats"]["unique_graphs"] == 1 and dict(counters["graph_break"]) == {}
    reference = StepCacheReference(case.model(), cfg)
    torch.testing.assert_close(out, generate(case, reference, STEPS), atol=1e-5, rtol=1e-5)
    ours = [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(model)]
    assert ours == [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(reference)]
    assert any(steps for unit in ours for steps in unit)
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(case, compiled, STEPS, seed=2)
        generate(case, compiled, STEPS, seed=3)


def test_identical_blocks_share_one_compiled_piece():
    _, _, model, compiled = compile_case("wan")
    generate(CASES["wan"], compiled, 1)
    plan = current_state(model).plan
    assert plan.blocks == [f"blocks.{i}" for i in range(5)]  # head, middle (in the compute branch), tail
    assert artifacts_per_list(plan) == {"blocks": {artifacts_per_list(plan)["blocks"].pop()}}
    assert sum(step.kind is PieceKind.COND for step in plan.steps) == 1
    text = plan.describe()
    assert "if cached:" in text and "if compute:" in text and "blocks.2" in text


@pytest.mark.parametrize("name", ["flux", "hunyuan"])
def test_two_stream_models_compile_one_block_per_list(name):
    """FLUX: the single blocks' inputs differ in a size-1 stride, and the last one drops its text output.
    HunyuanVideo: its double blocks keep their transposed tokens, the cond's outputs are contiguous
    (`contiguous_block_input` copies block 0's input). Still one compile per list."""
    compiles = []
    original = cachepass.backend.PieceCompiler

    def spy(*args, **kwargs):
        compiles.append(original(*args, **kwargs))
        return compiles[-1]

    cachepass.backend.PieceCompiler = spy
    try:
        _, _, model, compiled = compile_case(name)
        generate(CASES[name], compiled, 1)
    finally:
        cachepass.backend.PieceCompiler = original
    per_list = artifacts_per_list(current_state(model).plan)
    assert [len(per_list["transformer_blocks"]), len(per_list["single_transformer_blocks"])] == [1, 1]
    (compiler,) = compiles
    assert compiler.count.compiled["block"] == 2 and compiler.count.pieces["block"] == 8


def program_graph(name: str):
    """The graph the backend splits for ``name``'s tiny model (first call), and its block lists."""
    gm, _, block_lists = backend_program_inputs(name)
    return gm, block_lists


def test_only_cond_pieces_hold_a_cond():
    gm, block_lists = program_graph("flux")
    split, infos = split_pieces(gm, block_lists)
    for name, info in infos.items():
        conds = [n for n in split.get_submodule(name).graph.nodes if is_cond(n)]
        assert len(conds) == (1 if info.kind is PieceKind.COND else 0), name
    assert sum(info.kind is PieceKind.COND for info in infos.values()) == 2


def test_two_instances_keep_their_own_state():
    case = CASES["toy"]
    first, second = case.two_experts()
    outs = {}
    for name, model in (("first", first), ("second", second)):
        _, cfg, _, compiled = compile_case("toy", model=model)
        outs[name] = generate(case, compiled, STEPS)
        torch.testing.assert_close(outs[name], generate(case, StepCacheReference(model, cfg), STEPS), atol=1e-5, rtol=1e-5)
    assert not torch.equal(outs["first"], outs["second"])


def test_inductor_pieces_match_the_reference_and_say_a_cpu_model_runs_without_cuda_graphs(caplog):
    """The glue runs as traced by default (logged). Also: AOTAutograd's cache takes every compiled piece
    (a second process loads them instead of tracing again)."""
    case = CASES["toy"]
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, num_inference_steps=STEPS)
    model = case.model()
    counters.clear()
    with caplog.at_level("INFO", logger="cachepass"):
        out = generate(case, cachepass.compile(model, cfg, inner="inductor", mode="reduce-overhead"), STEPS)
    torch.testing.assert_close(out, generate(case, StepCacheReference(case.model(), cfg), STEPS), atol=1e-4, rtol=1e-4)
    assert cachepass.stats(model)[0].cached_steps
    assert "cudagraphs='off' by default: the model runs on cpu" in caplog.text
    assert "glue='eager' by default: as regional compile leaves it" in caplog.text and "glue=eager;" in caplog.text
    assert "block: 1 compiled for 6 pieces" in caplog.text
    aot = counters["aot_autograd"]
    assert aot["autograd_cache_bypass"] == 0 and aot["autograd_cache_miss"] + aot["autograd_cache_hit"] == aot["total"] > 0


def test_form_is_checked():
    with pytest.raises(ValueError, match=r"form='pieces' is invalid; allowed: \['piecewise', 'one-graph'\]"):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), form="pieces")


def test_alike_blocks_share_one_piece_module_and_other_pieces_have_their_own():
    """The split copies a block's nodes once per kind of block: the compute branch's three middle blocks share one
    module; glue and cond pieces are never shared (nor the tail block, whose inputs come from the cond)."""
    gm, block_lists = program_graph("wan")
    split, infos = split_pieces(gm, block_lists)
    blocks = {info.owner: split.get_submodule(name) for name, info in infos.items() if info.kind is PieceKind.BLOCK}
    assert sorted(blocks) == ["blocks.0", "blocks.4"]
    pieces = [split.get_submodule(name) for name in infos]
    assert len({id(m) for m in pieces}) == len(pieces)
    (cond,) = [split.get_submodule(name) for name, info in infos.items() if info.kind is PieceKind.COND]
    compute = cond.get_submodule(next(n for n in cond.graph.nodes if is_cond(n)).args[2].target)
    middle, middle_infos = split_pieces(compute, block_lists)
    shared = {id(middle.get_submodule(name)) for name, info in middle_infos.items() if info.kind is PieceKind.BLOCK}
    assert sorted(i.owner for i in middle_infos.values() if i.kind is PieceKind.BLOCK) == ["blocks.1", "blocks.2",
                                                                                            "blocks.3"]
    assert len(shared) == 1


def backend_program_inputs(name: str):
    """The graph the backend splits for ``name``'s tiny model, its example inputs and block lists (first call)."""
    found = []
    original = cachepass.backend.build_program

    def spy(gm, inputs, compiler, block_lists, *hooks):
        found.append((gm, inputs, block_lists))
        return original(gm, inputs, compiler, block_lists, *hooks)

    cachepass.backend.build_program = spy
    try:
        generate(CASES[name], compile_case(name)[3], 1)
    finally:
        cachepass.backend.build_program = original
    ((gm, inputs, block_lists),) = found
    mode = torch._guards.detect_fake_mode(inputs)  # the weights come real: fake them as Dynamo's context would
    inputs = [mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) and getattr(v, "fake_mode", None)
              is not mode else v for v in inputs]
    return gm, inputs, block_lists


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_glue_run_as_traced_runs_on_fake_tensors_only_what_compiles_read(name, monkeypatch):
    """With the glue run as traced (Inductor's default), the executor's fake propagation skips the glue no compile
    reads (the clock, the decision, the state updates: none of the state's ``copy_``s runs), and every compiled
    piece gets the example inputs a propagation of everything gives it (shapes, strides, dtypes)."""
    gm, inputs, block_lists = backend_program_inputs(name)
    ran = []
    run_node = FakeTensorProp.run_node

    def counting(self, n):
        ran.append(n)
        return run_node(self, n)

    monkeypatch.setattr(FakeTensorProp, "run_node", counting)

    def compile_with(needs_examples):
        ran.clear()
        seen = []

        def compile_fn(piece, example_inputs, kind):
            if kind == "block":
                seen.append([(tuple(v.shape), v.stride(), v.dtype) for v in example_inputs])
            return piece.forward

        build_program(gm, inputs, PieceCompiler(compile_fn, needs_examples), block_lists)
        return seen, sum(n.op == "call_method" and n.target == "copy_" for n in ran), len(ran)

    everything, copies_all, nodes_all = compile_with(lambda kind: True)
    blocks_only, copies, nodes = compile_with(lambda kind: kind == "block")
    assert blocks_only == everything and everything
    assert copies_all > 0 and copies == 0
    assert nodes < nodes_all


def _graphs(piece):
    """The graphs of a block piece: its own and its block body's."""
    return [m.graph for m in piece.modules() if isinstance(m, fx.GraphModule)]


def test_a_block_piece_is_compiled_from_dynamos_values_without_running_it_on_fake_tensors(monkeypatch):
    """Every node of a block piece (a call of its block's body) carries Dynamo's ``example_value``; in the body, the
    tensor ``__setitem__``s of the rotary embedding have none (their value is None): the compile takes the piece as it
    is and runs none of its nodes on fake tensors (at a new shape's symbolic sizes that run cost about 0.1 s on the
    CPU)."""
    gm, inputs, block_lists = backend_program_inputs("wan")
    propagated = []
    propagate = FakeTensorProp.propagate_dont_convert_inputs

    def counting(self, *args):
        propagated.append(self.module)
        return propagate(self, *args)

    monkeypatch.setattr(FakeTensorProp, "propagate_dont_convert_inputs", counting)
    blocks = []

    def compile_fn(piece, example_inputs, kind):
        if kind == "block":
            blocks.append(piece)
            assert all("example_value" in n.meta for n in piece.graph.nodes if n.op != "output")
        return piece.forward

    build_program(gm, inputs, PieceCompiler(compile_fn, lambda kind: kind == "block"), block_lists)
    setitems = [n for piece in blocks for graph in _graphs(piece) for n in graph.nodes if n.target is operator.setitem]
    assert blocks and setitems  # the case this covers: Dynamo leaves these without a value
    assert not {id(p) for p in blocks} & {id(m) for m in propagated}


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_blocks_name_their_weights_and_only_block_pieces_take_them(name):
    """In the piecewise form a body call names its weights (`WeightRef`s) instead of taking them as graph values: no
    cond operand is a weight, and each block piece takes its block's weights as its last inputs, in the body's order.
    The program then reads them from its own inputs at each call (the model's result, and nothing held after it)."""
    gm, inputs, block_lists = backend_program_inputs(name)
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    graphs = [gm.graph, *(m.graph for _, m in gm.named_modules() if isinstance(m, fx.GraphModule) and m is not gm)]
    calls = [n for g in graphs for n in g.nodes if n.op == "call_module" and n.target.startswith(BODY_PREFIX)]
    refs = [a for call in calls for a in call.args if isinstance(a, WeightRef)]
    assert calls and refs and all(weight_path(placeholders[r.name]) for r in refs)
    assert not any(weight_path(a) for call in calls for a in call.args if isinstance(a, fx.Node))
    conds = [n for n in gm.graph.nodes if is_cond(n)]
    assert conds and not any(a.op == "placeholder" and weight_path(a) for c in conds for a in c.args[3])
    compiled = []

    def compile_fn(piece, example_inputs, kind):
        compiled.append((kind, piece, example_inputs))
        return piece.forward

    build_program(gm, inputs, PieceCompiler(compile_fn), block_lists)
    blocks = [(piece, examples) for kind, piece, examples in compiled if kind == "block"]
    assert blocks
    for piece, examples in blocks:
        (call,) = [n for n in piece.graph.nodes if n.op == "call_module"]
        body_weights = [a for a in call.args if isinstance(a, fx.Node) and a.name.startswith("weight_")]
        taken = [n for n in piece.graph.nodes if n.op == "placeholder"]
        assert body_weights and taken[-len(body_weights):] == body_weights
        assert len(examples) == len(taken)
    case, _, model, compiled_model = compile_case(name)
    x, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(case.call(compiled_model, x, torch.tensor(0.5), cond),
                                   case.call(model, x, torch.tensor(0.5), cond))
    assert bound_weights._CURRENT.weights == ()
