"""CUDA graphs over the piecewise program: what a CPU can check (options, errors, warm-up purity).

Capture and replay themselves run in tests/gpu/test_cuda_graphs.py on a CUDA device.
"""

from __future__ import annotations

import pytest
import torch

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass.cudagraphs.conditional_nodes import unavailable_reason
from cachepass.piecewise.execute import CondStep

STEPS = 8


@pytest.mark.parametrize("options, message", [
    ({"cudagraphs": "always"}, r"cudagraphs='always' is invalid; allowed: \['off', 'piecewise', 'conditional'\]"),
    ({"cudagraphs": "piecewise", "form": "one-graph"}, r"cudagraphs='piecewise' needs form='piecewise'"),
])
def test_bad_cudagraphs_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=message):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), **options)


@pytest.mark.parametrize("mode", ["piecewise", "conditional"])
def test_cuda_graphs_asked_for_a_cpu_model_is_an_error(mode):
    """At cachepass.compile, which has the model; through torch.compile, at the first call."""
    case = CASES["toy"]
    message = rf"stepcache option cudagraphs='{mode}' needs a CUDA device; the model runs on cpu"
    with pytest.raises(cachepass.CachepassError, match=message):
        cachepass.compile(case.model(), toy_config(), inner="aot_eager", cudagraphs=mode)
    compiled = torch.compile(case.model(), backend="stepcache", dynamic=False,
                             options={"config": toy_config(), "inner": "aot_eager", "cudagraphs": mode})
    with pytest.raises(Exception, match="CachepassError: " + message):  # Dynamo wraps what the backend raises
        generate(case, compiled, 1)


def test_conditional_nodes_say_why_not_on_cpu():
    assert "need a CUDA device" in unavailable_reason(torch.device("cpu"))


def test_cudagraphs_off_is_the_plain_program(caplog):
    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)
    with caplog.at_level("INFO", logger="cachepass"):
        off = generate(case, cachepass.compile(case.model(), cfg, inner="aot_eager", cudagraphs="off"), STEPS)
    assert "cudagraphs=off, glue=aot_eager" in caplog.text
    torch.testing.assert_close(off, generate(case, cachepass.compile(case.model(), cfg, inner="aot_eager"), STEPS),
                               atol=0, rtol=0)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_warm_up_runs_both_branches_without_touching_the_state(name, monkeypatch):
    """The first call of a CUDA-graph state runs each cond's other branch too (capture needs every kernel
    launched once): branches must be pure, so outputs and cache decisions stay exactly those of a plain run."""
    case = CASES[name]
    cfg = toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * 3, num_inference_steps=STEPS)
    plain_model = case.model()
    plain = generate(case, cachepass.compile(plain_model, cfg, inner="aot_eager"), STEPS)
    cond_calls = []
    original = CondStep.run_both

    def counting_run_both(self, *args):
        cond_calls.append(self)
        return original(self, *args)

    monkeypatch.setattr(CondStep, "__call__", counting_run_both)
    both_model = case.model()
    both = generate(case, cachepass.compile(both_model, cfg, inner="aot_eager"), STEPS)
    assert len(cond_calls) == 2 * STEPS * len(cachepass.stats(both_model))  # every call of every unit ran both
    torch.testing.assert_close(both, plain, atol=0, rtol=0)
    decisions = lambda m: [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(m)]  # noqa: E731
    assert decisions(both_model) == decisions(plain_model) and any(s for u in decisions(plain_model) for s in u)


def test_the_default_is_the_fastest_form_that_runs_here(monkeypatch):
    """On CUDA: IF/ELSE graphs; piecewise graphs where those cannot run or the model is sharded; none with
    offload (its copies overlap only without graphs so far), with mode='max-autotune-no-cudagraphs', or off CUDA."""
    from cachepass import options as options_module
    from cachepass.cudagraphs.graphed import CudaGraphs
    from cachepass.inner import Inner
    from cachepass.options import parse_options

    cuda = torch.device("cuda", 0)
    plain = parse_options({"config": toy_config()})
    monkeypatch.setattr(options_module, "conditional_nodes_unavailable", lambda device: None)
    assert plain.default_cudagraphs(torch.device("cpu")) == (CudaGraphs.OFF, "the model runs on cpu")
    assert plain.default_cudagraphs(cuda)[0] is CudaGraphs.CONDITIONAL
    assert plain.default_cudagraphs(cuda, sharded=True)[0] is CudaGraphs.PIECEWISE
    offloaded = parse_options({"config": toy_config(), "offload": {"budget": "1GB"}})
    assert offloaded.default_cudagraphs(cuda)[0] is CudaGraphs.OFF and "offload" in offloaded.default_cudagraphs(cuda)[1]
    no_graphs = parse_options({"config": toy_config()}, mode="max-autotune-no-cudagraphs")
    assert no_graphs.default_cudagraphs(cuda)[0] is CudaGraphs.OFF
    monkeypatch.setattr(options_module, "conditional_nodes_unavailable", lambda device: "no cuda-bindings")
    chosen, reason = plain.default_cudagraphs(cuda)
    assert chosen is CudaGraphs.PIECEWISE and "no cuda-bindings" in reason
    assert plain.cudagraphs_on(cuda) is CudaGraphs.PIECEWISE  # what the backend asks
    # the glue pieces: run as traced under Inductor on every device (one rule: graphs on or off), or as set
    cpu = torch.device("cpu")
    assert plain.glue_on(cuda) is Inner.EAGER and plain.glue_on(cpu) is Inner.EAGER
    assert parse_options({"config": toy_config(), "cudagraphs": "off"}).glue_on(cuda) is Inner.EAGER
    assert parse_options({"config": toy_config(), "inner": "aot_eager"}).glue_on(cpu) is Inner.AOT_EAGER
    for device in (cpu, cuda):
        assert parse_options({"config": toy_config(), "glue": "inductor"}).glue_on(device) is Inner.INDUCTOR
        assert parse_options({"config": toy_config(), "glue": "aot_eager"}).glue_on(device) is Inner.AOT_EAGER
    with pytest.raises(ValueError, match=r"glue='tvm' is invalid; allowed: \['inductor', 'aot_eager', 'eager'\]"):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), glue="tvm")


class _Holder:
    def __init__(self):
        self.dropped = []

    def drop(self, key):
        self.dropped.append(key)


def test_graph_sets_beyond_the_bound_are_dropped_least_recently_replayed_first(monkeypatch):
    """The bookkeeping of `cachepass.cudagraphs.memory` (the memory it bounds: tests/gpu/test_cuda_graphs.py)."""
    import collections

    from cachepass.cudagraphs import memory

    class Device:
        def __init__(self, index):
            self.pool, self.stream, self.sets = (0, index + 1), None, collections.OrderedDict()

    monkeypatch.setattr(memory, "_Device", Device)
    monkeypatch.setattr(memory, "_DEVICES", {})
    monkeypatch.setattr(torch.cuda, "synchronize", lambda index: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setenv(memory.MAX_GRAPH_SETS_ENV, "2")
    cuda = torch.device("cuda", 0)
    first, second = _Holder(), _Holder()
    memory.pool_and_stream(cuda)
    memory.added(first, (1, ()), cuda)
    memory.added(second, (2, ()), cuda)
    memory.replayed(first, (1, ()), cuda)  # now the second set is the one replayed longest ago
    memory.added(first, (3, (4,)), cuda)  # a state of a program traced with symbolic sizes, at size 4
    assert second.dropped == [(2, ())] and first.dropped == [] and memory.graph_sets(cuda) == 2
    assert memory.release({3}) == 1 and first.dropped == [(3, (4,))] and memory.graph_sets(cuda) == 1
    assert memory.release({1}) == 1 and memory.graph_sets(cuda) == 0 and not memory._DEVICES  # pool given back
    monkeypatch.setenv(memory.MAX_GRAPH_SETS_ENV, "0")
    with pytest.raises(ValueError, match=r"CACHEPASS_MAX_GRAPH_SETS='0' is invalid; allowed: an integer >= 1"):
        memory.max_graph_sets()


def test_release_before_any_call_and_on_the_wrong_type():
    assert cachepass.release(cachepass.compile(CASES["toy"].model(), toy_config(), inner="aot_eager")) == 0
    with pytest.raises(TypeError, match="cachepass.release expects a compiled module"):
        cachepass.release("model")


class _CountsItsCalls(torch.nn.Module):
    def forward(self, x, calls):
        calls.add_(1)  # the state: a second run of one call would count twice
        return x * 2


def test_a_refused_capture_returns_the_warm_up_call_and_the_default_runs_on_without_graphs(monkeypatch, caplog):
    """The control flow around a capture CUDA refuses (its capture itself needs a GPU: tests/gpu): the call that
    warmed up is the call's result (the state advanced once), then no graphs if they were the default, and an
    error naming the cause if they were asked for."""
    from cachepass.cudagraphs import graphed
    from cachepass.cudagraphs.graphed import CudaGraphs, GraphedProgram

    def refuse(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "_split_inputs", lambda args, state_count, sizes: ([1], [0]))
    monkeypatch.setattr(GraphedProgram, "_warm", lambda self, args: self.program(*args))
    monkeypatch.setattr(graphed, "_Runner", refuse)
    program = torch.fx.symbolic_trace(_CountsItsCalls())
    x = torch.ones(2)
    asked = GraphedProgram(program, torch.device("cuda", 0), CudaGraphs.CONDITIONAL, 1)
    with pytest.raises(cachepass.CachepassError, match="could not capture this program: operation not permitted"):
        asked(x, torch.zeros(()))
    default = GraphedProgram(program, torch.device("cuda", 0), CudaGraphs.CONDITIONAL, 1, chosen_by_default=True)
    calls = torch.zeros(())
    with caplog.at_level("WARNING", logger="cachepass"):
        assert torch.equal(default(x, calls), x * 2) and calls.item() == 1
    assert "runs without CUDA graphs (they were the default, not asked for)" in caplog.text
    assert torch.equal(default(x, calls), x * 2) and calls.item() == 2 and default.without_graphs is not None
