"""Graph facts: one Dynamo graph, no graph break, one torch.cond per block list, no recompiles."""

from __future__ import annotations

import operator

import pytest
import torch
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES, generate
from cachepass.state.runtime import current_state

STEPS = 10
UNITS = {"toy": 1, "wan": 1, "flux": 2, "hunyuan": 2}


def compile_case(name, form="piecewise", **overrides):
    case = CASES[name]
    cfg = cachepass.StepCacheConfig(**{"num_head_blocks": 1, "threshold": case.threshold * 3, "warmup_steps": 1,
                                       "separate_cfg": True, "num_inference_steps": STEPS, "taylorseer_order": 1,
                                       **overrides})
    model = case.model()
    # the one-graph form's facts here are Dynamo's: its AOTAutograd run (25-33 s of a tiny FLUX's first call, torch
    # tracing cond's branches again) is the parity tests' (test_parity_cache_dit.py)
    inner = "eager" if form == "one-graph" else "aot_eager"
    return case, model, cachepass.compile(model, cfg, inner=inner, form=form, scope="model")  # the whole model's graph


FORMS = [(name, "piecewise") for name in UNITS] + [("flux", "one-graph")]


@pytest.mark.parametrize("name,form", FORMS, ids=[f"{n}-{f}" for n, f in FORMS])
def test_one_graph_no_breaks_no_recompiles_over_two_generations(name, form):
    case, model, compiled = compile_case(name, form)
    counters.clear()
    generate(case, compiled, STEPS)  # first generation compiles
    assert counters["stats"]["unique_graphs"] == 1
    assert dict(counters["graph_break"]) == {}
    with torch.compiler.set_stance("fail_on_recompile"):
        generate(case, compiled, STEPS, seed=2)  # second generation: new noise, same graph
        generate(case, compiled, STEPS, seed=3)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(len(u.cached_steps) + len(u.cfg_cached_steps) for u in cachepass.stats(model)) > 0


@pytest.mark.parametrize("name", list(UNITS))
def test_one_cond_per_block_list_and_no_item_or_host_branch(name):
    case, model, compiled = compile_case(name)
    generate(case, compiled, 1, separate_cfg=False)
    gm = current_state(model).graph
    conds = [n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(conds) == UNITS[name]
    everything = list(gm.graph.nodes)
    for sub in gm.modules():
        if isinstance(sub, torch.fx.GraphModule):
            everything += list(sub.graph.nodes)
    assert not [n for n in everything if n.op == "call_method" and n.target in ("item", "tolist")]
    assert not [n for n in everything if n.op == "call_function" and n.target in (bool, int, float)]
    # state is updated in place (``copy_``, or a ``where`` written into it), outside the branches
    def written(n):
        return n.kwargs.get("out") if "out" in n.kwargs else n.args[0] if n.op == "call_method" and n.target == "copy_" else None

    unit_writes = [n for n in gm.graph.nodes if (w := written(n)) is not None and w.name.startswith("stepcache_u")]
    assert len(unit_writes) >= UNITS[name] * 2
    for branch in (gm.get_submodule(c.args[1].target) for c in conds):
        assert not [n for n in branch.graph.nodes if (n.op == "call_method" and n.target.endswith("_")) or "out" in n.kwargs]


MASK = (1, 1, 0, 1, 0, 1, 0, 0, 1, 1)
BUDGETS = dict(max_cached_steps=4, max_continuous_cached_steps=2, max_accumulated_residual_diff=0.5)
EVERY_COUNTER = {"has_prev", "cached_count", "streak", "last_cached_step", "accumulated_diff"}


@pytest.mark.parametrize("overrides,compares,counters,records_diffs", [
    (dict(), True, {"has_prev"}, True),
    (BUDGETS, True, EVERY_COUNTER, True),
    (dict(steps_computation_mask=MASK, steps_computation_policy="dynamic"), True, {"has_prev"}, True),
    (dict(steps_computation_mask=MASK, steps_computation_policy="static", **BUDGETS), False, set(), False),
    (dict(threshold=0.0, steps_computation_mask=MASK, steps_computation_policy="static"), False, set(), False),
    (dict(threshold=1.5, **BUDGETS), False, EVERY_COUNTER, True),  # cache-dit records -1.0 per considered step
], ids=["threshold", "threshold-budgets", "dynamic-mask", "static-mask", "static-no-threshold", "threshold-above-1"])
def test_the_state_keeps_and_updates_only_what_a_decision_of_the_config_reads(overrides, compares, counters,
                                                                               records_diffs):
    """cache-dit compares the head residual with the last computed step's only under a threshold in (0, 1) and no
    static schedule, and reads its counters only for the budgets set; under a static schedule warmup and the mask
    decide every step. Glue runs as traced, so each value kept for nothing cost kernels every call: the previous
    residual three full passes over [streams, tokens, dim], each counter about five scalar kernels."""
    case, model, compiled = compile_case("wan", **overrides)
    generate(case, compiled, STEPS)
    gm = current_state(model).graph
    kept = {n.name.removeprefix("stepcache_u0_") for n in gm.graph.nodes if n.op == "placeholder"
            and n.name.startswith("stepcache_u0_")}
    assert ("prev_residual" in kept) == compares and kept & EVERY_COUNTER == counters
    assert any(n.target in (torch.abs, "abs") for n in gm.graph.nodes) == compares
    diffs = [d for u in cachepass.stats(model) for d in (*u.residual_diffs.values(), *u.cfg_residual_diffs.values())]
    assert bool(diffs) == records_diffs and (compares or all(d == -1.0 for d in diffs))


@pytest.mark.parametrize("order", [0, 1])
def test_the_rewritten_graph_computes_nothing_unused(order):
    """Glue runs as traced (no compiler removes dead code): every value the passes add must be read, in the graph and
    in the cached branch, and computed once. The Taylor buffer is read one row at a time, in the branches (at order 0
    the compute branch reads none), and written once, from what the cond returned."""
    case, model, compiled = compile_case("wan", taylorseer_order=order)
    generate(case, compiled, 1, separate_cfg=False)
    gm = current_state(model).graph

    def writes(n):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        return name.endswith("_") or "out" in n.kwargs or n.target in (operator.setitem, torch.ops.higher_order.cond)

    cached_branches = [gm.get_submodule(n.args[1].target) for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond]
    for graph in (gm.graph, *(branch.graph for branch in cached_branches)):
        unused = [n.name for n in graph.nodes if not n.users and n.op not in ("placeholder", "output") and not writes(n)]
        assert unused == []
    # nor twice: a value the passes read twice is computed once (nodes Dynamo traced carry an nn_module_stack)
    views = {"reshape", "getitem", "unsqueeze", "squeeze", "view", "expand"}
    added = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method") and "nn_module_stack" not in n.meta
             and getattr(n.target, "__name__", n.target) not in views]
    keys = [(str(n.target), repr(n.args), repr(n.kwargs)) for n in added]
    assert [n.name for n, key in zip(added, keys) if keys.count(key) > 1] == []
    # the Taylor terms: read by the branches (the stream's row), written back once from what the cond returned
    terms = next(n for n in gm.graph.nodes if n.op == "placeholder" and "terms" in n.name)
    assert sorted(str(n.target) for n in terms.users) == sorted(["index_put_", str(torch.ops.higher_order.cond)])
    cond = next(n for n in gm.graph.nodes if n.target is torch.ops.higher_order.cond)
    position = list(cond.args[3]).index(terms)
    for branch, reads in ((gm.get_submodule(cond.args[1].target), True), (gm.get_submodule(cond.args[2].target), order > 0)):
        placeholder = [n for n in branch.graph.nodes if n.op == "placeholder"][position]
        assert [n.target for n in placeholder.users] == ([torch.index_select] if reads else [])
    # the previous residual: one masked where into it, not copy_(where(...))
    buffer = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name.endswith("prev_residual"))
    in_place = [n for n in buffer.users if n.op == "call_method" and n.target.endswith("_")]
    assert not in_place and [n.target for n in buffer.users if n.kwargs.get("out") is buffer] == [torch.where]
