"""``scope="blocks"``: each block list compiled alone, the model-level code run as it is (`cachepass.block_scope`).

Every registry model gives the whole-model compile's outputs and cache decisions exactly, with one Dynamo graph per
list and no recompile over two generations; the clock still reads the model's timestep (an interrupted generation
does not shift the next one); a new resolution takes one more graph per list; a loop that is not a plain chain of
the blocks is named, never run as one; the API works in natural order on the model itself.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch._dynamo.variables.builder import VariableBuilder

import cachepass
import cachepass.passes
from bench.tiny_models import CASES, ToyDiT, generate
from cachepass import block_regions, block_scope
from cachepass.errors import BlockScopeUnfitError, CachepassError, UnsupportedGraphError
from cachepass.passes.call_block_bodies import call_block_bodies

STEPS = 8


def config(case, **overrides):
    base = dict(num_head_blocks=1, threshold=case.threshold, warmup_steps=1, separate_cfg=True, num_inference_steps=STEPS)
    return cachepass.StepCacheConfig(**{**base, **overrides})


def decisions(model):
    return [(u.name, u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(model)]


def whole_model_run(case):
    """The whole-model compile's generation of ``case`` and its decisions: what the block scope must give."""
    whole = cachepass.compile(case.model(), config(case), inner="aot_eager", scope="model")
    out = generate(case, whole, STEPS)
    return out, decisions(whole)


@pytest.mark.parametrize("name", ["wan", "flux", "hunyuan", "sd3", "ltx"])
def test_each_list_alone_gives_the_whole_model_compiles_outputs_and_decisions(name):
    case = CASES[name]
    expected, expected_decisions = whole_model_run(case)
    assert any(cached for _, cached, _ in expected_decisions)  # the threshold caches steps, computes others
    torch._dynamo.reset()
    counters.clear()
    model = case.model()
    assert cachepass.compile(model, config(case), inner="aot_eager", scope="blocks") is model
    for _ in range(2):
        torch.testing.assert_close(generate(case, model, STEPS), expected, atol=0, rtol=0)
        assert decisions(model) == expected_decisions
    # FLUX and HunyuanVideo: double- then single-stream lists (HunyuanVideo's deeper text-refiner list runs as it is)
    assert counters["stats"]["unique_graphs"] == len(expected_decisions) and not counters["graph_break"]


def test_the_blocks_after_the_first_are_one_leaf_and_a_hook_on_one_of_them_runs(monkeypatch):
    """Dynamo's graph of a list's program has the first block inline and one `block_regions.chain` call for the
    others (no leaf, no module call per block); Dynamo reads the first block's weights only (it would walk every
    block's when it wraps the list: `runner._ReadWeightsOnly`). A forward hook put on a later block after the compile
    makes the program run each block as its own call (one more graph), so the hook runs: the whole-model compile's
    result with the hook; without the hook the chained program runs again, with no compile."""
    monkeypatch.setattr(block_regions, "_REFUSED", set())
    traced = []
    monkeypatch.setattr(cachepass.passes, "call_block_bodies", lambda gm, **kwargs: traced.append(
        [n.target.__name__ for n in gm.graph.nodes if n.target in (block_regions.leaf, block_regions.chain)]) or
        call_block_bodies(gm, **kwargs))
    case = CASES["wan"]
    hook = lambda _module, _args, out: out * 0.5  # noqa: E731
    hooked = case.model()
    hooked.blocks[3].register_forward_hook(hook)
    expected, expected_decisions = generate(case, cachepass.compile(hooked, config(case), inner="aot_eager"), STEPS), \
        decisions(hooked)
    torch._dynamo.reset()
    counters.clear()
    traced.clear()
    marked = []
    mark = VariableBuilder.mark_static_input
    monkeypatch.setattr(VariableBuilder, "mark_static_input",
                        lambda self, value, guard: marked.append(value) or mark(self, value, guard))
    model = cachepass.compile(case.model(), config(case), inner="aot_eager", scope="blocks")
    plain = generate(case, model, STEPS)
    assert traced == [["chain"]]
    first = {id(t) for t in (*model.blocks[0].parameters(), *model.blocks[0].buffers())}
    assert marked and {id(t) for t in marked} <= first
    handle = model.blocks[3].register_forward_hook(hook)
    torch.testing.assert_close(generate(case, model, STEPS), expected, atol=0, rtol=0)
    assert decisions(model) == expected_decisions
    assert traced[1:] == [["leaf"] * (len(model.blocks) - 1)]
    handle.remove()
    torch.testing.assert_close(generate(case, model, STEPS), plain, atol=0, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2 and len(traced) == 2


def test_an_interrupted_generation_does_not_shift_the_next_one():
    case = CASES["wan"]
    model = cachepass.compile(case.model(), config(case), inner="aot_eager", scope="blocks")
    fresh, fresh_decisions = generate(case, model, STEPS), decisions(model)
    calls = 0

    def interrupted(*args, **kwargs):  # Ctrl-C after 5 calls: mid-step, between CFG streams
        nonlocal calls
        if calls == 5:
            raise KeyboardInterrupt
        calls += 1
        return model(*args, **kwargs)

    with pytest.raises(KeyboardInterrupt):
        generate(case, interrupted, STEPS, seed=3)
    torch.testing.assert_close(generate(case, model, STEPS), fresh, atol=0, rtol=0)  # the timestep tells a new one
    assert decisions(model) == fresh_decisions


def test_a_new_resolution_takes_one_more_graph_and_the_whole_model_compiles_result():
    wider = CASES["wan"].at_size(2)
    expected, expected_decisions = whole_model_run(wider)
    torch._dynamo.reset()
    counters.clear()
    model = cachepass.compile(wider.model(), config(wider), inner="aot_eager", scope="blocks")
    generate(CASES["wan"], model, STEPS)
    torch.testing.assert_close(generate(wider, model, STEPS), expected, atol=0, rtol=0)
    assert decisions(model) == expected_decisions
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_symbolic_sizes_from_the_first_call_take_every_resolution_with_one_compile_per_list(name):
    """``dynamic="latents"`` under ``scope="blocks"``: each list program's inputs are symbolic from its first call (the
    rotary tables' bases too), so three resolutions, the first square, compile each list once, and each resolution
    gives the whole-model static compile's result and decisions."""
    expected = []
    for times in (1, 2, 3):
        sized = CASES[name].at_size(times)
        static = cachepass.compile(sized.model(), config(sized), inner="aot_eager", dynamic=False)
        expected.append((generate(sized, static, STEPS), decisions(static)))
    torch._dynamo.reset()
    counters.clear()
    model = cachepass.compile(CASES[name].model(), config(CASES[name]), inner="aot_eager", scope="blocks",
                              dynamic="latents")
    for times, (out, decided) in zip((1, 2, 3), expected):
        torch.testing.assert_close(generate(CASES[name].at_size(times), model, STEPS), out, atol=0, rtol=0)
        assert decisions(model) == decided, f"x{times}"
    assert counters["stats"]["unique_graphs"] == len(expected[0][1])  # one program per list, compiled once


class _ControlNetLike(ToyDiT):
    """Adds a residual to the hidden states between blocks (as ControlNet-conditioned DiTs do) when ``residual``."""

    residual = False

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        x = self.proj_in(hidden_states)
        temb = self.time_embed(timestep.float().unsqueeze(-1) / 1000)
        context = self.text_embed(encoder_hidden_states)
        for index, block in enumerate(self.blocks):
            x = block(x, context, temb)
            if self.residual and index == 2:
                x = x + 1
        return self.proj_out(x)


class _SkipsABlock(ToyDiT):
    def forward(self, hidden_states, timestep, encoder_hidden_states):
        x = self.proj_in(hidden_states)
        temb = self.time_embed(timestep.float().unsqueeze(-1) / 1000)
        for block in list(self.blocks)[:3]:
            x = block(x, self.text_embed(encoder_hidden_states), temb)
        return self.proj_out(x)


class _KeepsEachOutput(ToyDiT):
    """Adds every block's output to the last one's (as a model returning each block's features would)."""

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        x = self.proj_in(hidden_states)
        temb = self.time_embed(timestep.float().unsqueeze(-1) / 1000)
        context = self.text_embed(encoder_hidden_states)
        features = []
        for block in self.blocks:
            x = block(x, context, temb)
            features.append(x)
        return self.proj_out(sum(features))


def _toy_call(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 16, 4, generator=g), torch.tensor([900.0]), torch.randn(1, 5, 8, generator=g))


def test_a_loop_that_is_not_a_chain_of_the_blocks_is_named_not_run_as_one():
    toy = config(CASES["toy"])
    model = cachepass.compile(_ControlNetLike(), toy, inner="aot_eager", scope="blocks")
    _toy_call(model)
    model.residual = True  # the loop changed after the program was made: block 3 gets another value
    with pytest.raises(CachepassError, match=r"the model uses the output of a block of blocks before its last "
                                             r"\(torch\.Tensor\.add\) besides handing it to the next block"):
        _toy_call(model)
    # every block is fed a new text embedding (the text embedder runs in the loop): learned as not a chain
    with pytest.raises(CachepassError, match=r"argument 1 of blocks\.1 is neither an output of the block before it"):
        _toy_call(cachepass.compile(_SkipsABlock(), toy, inner="aot_eager", scope="blocks"))
    # a loop that keeps each block's output: only the last block's call returns values (the others placeholders)
    with pytest.raises(CachepassError, match=r"uses the output of a block of blocks before its last \(torch\.Tensor"):
        _toy_call(cachepass.compile(_KeepsEachOutput(), toy, inner="aot_eager", scope="blocks"))


def test_a_list_the_model_stops_early_is_named():
    model = _SkipsABlock()
    model.text_embed = nn.Identity()  # text of the embedder's width: the loop now feeds one object to every block
    model = cachepass.compile(model, config(CASES["toy"]), inner="aot_eager", scope="blocks")
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, 16, 4, generator=g), torch.tensor([900.0]), torch.randn(1, 5, 32, generator=g)
    with torch.no_grad(), pytest.raises(CachepassError, match=r"the model uses the output of a block of blocks before "
                                                            r"its last \(torch\.nn\.functional\.linear\)"):
        model(*inputs)
    model.proj_out = nn.Identity()  # the block's output returned as it is: the model's forward hook names the short list
    with torch.no_grad(), pytest.raises(CachepassError, match=r"ran blocks\.0 to blocks\.2 of 6 blocks"):
        model(*inputs)


def test_bad_scope_and_offload_are_refused_by_name():
    toy = config(CASES["toy"])
    with pytest.raises(ValueError, match=r"scope='block' is invalid; allowed: None \(chosen\), 'model', 'blocks'"):
        cachepass.compile(ToyDiT(), toy, scope="block")
    with pytest.raises(CachepassError, match="scope='blocks' does not take offload"):
        cachepass.compile(ToyDiT(), toy, scope="blocks", offload={"budget": "1GB"})
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(CachepassError, match="scope='blocks' is not verified under context parallel"):
            cachepass.compile(ToyDiT(), toy, scope="blocks", sequence_parallel_group=torch.distributed.group.WORLD)
    finally:
        torch.distributed.destroy_process_group()
    compiled_block = ToyDiT()
    compiled_block.blocks[2].compile()
    with pytest.raises(CachepassError, match=r"blocks\.2 is compiled already"):
        cachepass.compile(compiled_block, toy, scope="blocks")
    assert all(block._compiled_call_impl is None for i, block in enumerate(compiled_block.blocks) if i != 2)
    with pytest.raises(CachepassError, match="has no list of two or more blocks of one class"):
        cachepass.compile(nn.Sequential(nn.Linear(2, 2)), toy, scope="blocks")
    model = cachepass.compile(ToyDiT(), toy, scope="blocks")
    with pytest.raises(CachepassError, match=r"reads the argument 'timestep', and this call passes a float"):
        model(torch.randn(1, 16, 4), 0.5, torch.randn(1, 5, 8))


def test_the_api_in_natural_order_and_a_whole_model_compile_after_it():
    case = CASES["wan"]
    model = cachepass.compile(case.model(), config(case), inner="aot_eager", scope="blocks")
    cachepass.reset(model)  # before the first call: nothing to reset
    assert cachepass.stats(model) == []
    out = generate(case, model, STEPS)
    assert decisions(model)[0][1]
    cachepass.reset(model)
    assert decisions(model) == [("blocks", [], [])]
    whole = cachepass.compile(model, config(case), inner="aot_eager", scope="model")  # the block scope is removed
    assert all(block._compiled_call_impl is None for block in model.blocks)
    torch.testing.assert_close(generate(case, whole, STEPS), out, atol=0, rtol=0)


class _Halved(nn.Module):
    """A block's feed-forward, its output halved: a submodule of another class, same weights."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs) * 0.5


@pytest.mark.parametrize("change", ["block", "submodule"])
def test_a_module_set_in_a_list_after_the_compile_is_named_and_the_default_hands_over(caplog, monkeypatch, change):
    """A block replaced, or a submodule of a later block replaced (its program and the blocks' marks were made for the
    old ones; the later blocks run the first block's code): under ``scope="blocks"`` the next call names it; under the
    default that call runs under the whole-model compile (a warning), which gives the eager model's result with the
    change; compiling again takes the change into the block scope (a block configured apart from the first refuses its
    class's leaves for the process: this test's refusal stays in it)."""
    monkeypatch.setattr(block_regions, "_REFUSED", set())
    case = CASES["wan"]
    where = {"block": "blocks.2", "submodule": "blocks.3.ffn"}[change]

    def changed(model, called=None):
        generate(case, model if called is None else called, 2)
        if change == "block":
            new = copy.deepcopy(model.blocks[2])
            with torch.no_grad():
                for weight in new.parameters():
                    weight.mul_(0.5)
            model.blocks[2] = new
        else:
            model.blocks[3].ffn = _Halved(model.blocks[3].ffn)
        return model

    reference = changed(case.model())
    expected = generate(case, cachepass.compile(reference, config(case), inner="aot_eager", scope="model"), STEPS)
    model = changed(cachepass.compile(case.model(), config(case), inner="aot_eager", scope="blocks"))
    with pytest.raises(BlockScopeUnfitError, match=f"{where} was set after the compile"):
        generate(case, model, STEPS)
    model = cachepass.compile(model, config(case), inner="aot_eager", scope="blocks")
    torch.testing.assert_close(generate(case, model, STEPS), expected, atol=0, rtol=0)
    fn = cachepass.compile(case.model(), config(case), inner="aot_eager")
    changed(fn._orig_mod, fn)
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        torch.testing.assert_close(generate(case, fn, STEPS), expected, atol=0, rtol=0)
    assert f"{where} was set after the compile" in caplog.text


def test_the_default_runs_each_list_alone_and_the_whole_model_where_a_loop_does_not_fit(caplog):
    """No scope given: the block scope runs Wan (the whole-model compile's outputs and decisions, Dynamo's one graph the
    list's program); a loop that is not a chain at the first call runs that call under the whole-model compile
    (logged); one that stops being a chain at a later call hands over from that call, with a warning; options that
    need the whole model's program choose it before any call (logged)."""
    case = CASES["wan"]
    expected, expected_decisions = whole_model_run(case)
    torch._dynamo.reset()
    counters.clear()
    model = case.model()
    fn = cachepass.compile(model, config(case), inner="aot_eager")
    assert fn is not model and block_scope.scope_of(model) is not None
    cachepass.reset(fn)  # natural order: before the first call
    assert cachepass.stats(fn) == []
    for _ in range(2):
        torch.testing.assert_close(generate(case, fn, STEPS), expected, atol=0, rtol=0)
        assert decisions(fn) == decisions(model) == expected_decisions
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the list's program only
    with torch.no_grad():  # the original module called as it is runs as it is: no cache, its state untouched
        torch.testing.assert_close(generate(case, model, STEPS), generate(case, case.model(), STEPS), atol=0, rtol=0)
    assert decisions(fn) == expected_decisions
    cachepass.reset(fn)
    assert decisions(fn) == [("blocks", [], [])]
    latents, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    with pytest.raises(CachepassError, match=r"compiles inference graphs .* torch\.no_grad\(\)"):
        case.call(cachepass.compile(grad_model := case.model(), config(case), inner="aot_eager"), latents,
                  torch.tensor(0.5), cond)  # the call's own error, raised as it is: the block scope stays
    assert block_scope.scope_of(grad_model) is not None

    toy = config(CASES["toy"])
    net = _ControlNetLike()
    net.residual = True  # not a chain from the first call on
    with torch.no_grad():
        eager = _toy_call(net)
    with caplog.at_level(logging.INFO, logger="cachepass"):
        fn = cachepass.compile(net, toy, inner="aot_eager")
        torch.testing.assert_close(_toy_call(fn), eager)  # the first call computes every block
    assert block_scope.scope_of(net) is None and cachepass.stats(fn)[0].name == "blocks"
    assert any("cannot run its block lists as one program each (scope='blocks': the model uses the output of a block"
               in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)

    net = _KeepsEachOutput()  # the whole model's compile names what it cannot cache, as scope="model" does
    with pytest.raises(UnsupportedGraphError, match=r"the middle region of blocks \(blocks 1\.\.5\) exports"):
        _toy_call(cachepass.compile(net, toy, inner="aot_eager"))
    assert block_scope.scope_of(net) is None

    net = _ControlNetLike()
    fn = cachepass.compile(net, toy, inner="aot_eager")
    _toy_call(fn)
    assert block_scope.scope_of(net) is not None
    net.residual = True  # a ControlNet from the second generation on
    with torch.no_grad():
        eager = _toy_call(net)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cachepass"):
        torch.testing.assert_close(_toy_call(fn), eager)  # the whole model's first call: every block computed
        torch.testing.assert_close(_toy_call(fn), eager)  # a new generation (the timestep did not decrease)
    assert block_scope.scope_of(net) is None
    assert [r.levelno for r in caplog.records if "no longer runs its block lists" in r.getMessage()] == [logging.WARNING]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cachepass"):
        cachepass.compile(ToyDiT(), toy, form="one-graph")
        fn = cachepass.compile(nn.Sequential(nn.Linear(2, 2)), toy)
    assert block_scope.scope_of(fn._orig_mod) is None
    chosen = [r.getMessage() for r in caplog.records if "(chosen:" in r.getMessage()]
    assert chosen[0] == "stepcache: scope='model' (chosen: form='one-graph' is the whole model's graph)"
    assert "scope='model' (chosen: scope='blocks': Sequential has no list of two or more blocks" in chosen[1]


def test_the_feeding_is_learned_by_identity_and_checked_on_each_call():
    """FLUX's blocks return ``(encoder_hidden_states, hidden_states)`` and take them back swapped, by keyword; the
    rotary pair may be rebuilt per block around the same tensors; a changed plain argument is named."""
    from cachepass.block_scope.feeding import check, learn

    hidden, text, cos, sin = (torch.zeros(1) for _ in range(4))
    first = ((), {"hidden_states": hidden, "encoder_hidden_states": text, "rope": (cos, sin), "scale": 1.0})
    out = (torch.zeros(1), torch.zeros(1))
    call = {"hidden_states": out[1], "encoder_hidden_states": out[0], "rope": (cos, sin), "scale": 1.0}
    feeding = learn("blocks.1", (), call, out, first)
    assert feeding.fed == (("hidden_states", 1), ("encoder_hidden_states", 0))
    check(feeding, "blocks.2", (), dict(call, rope=(cos, sin)), out, first)  # a new tuple of the same tensors
    with pytest.raises(CachepassError, match=r"argument 'scale' of blocks\.2 is not the object the list's first"):
        check(feeding, "blocks.2", (), dict(call, scale=2.0), out, first)
    with pytest.raises(CachepassError, match=r"argument 'rope' of blocks\.1 is neither an output"):
        learn("blocks.1", (), dict(call, rope=(cos, torch.zeros(1))), out, first)
    with pytest.raises(CachepassError, match=r"blocks\.1 is called with arguments \(0 positional"):
        learn("blocks.1", (), {"hidden_states": out[1]}, out, first)
