"""One rank of the context-parallel test (`test_context_parallel.py` spawns two, gloo, Ulysses 2).

Every check runs on every rank; a failing rank raises, and the other one times out of its next
collective within the gloo timeout instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass.state.runtime import current_state

STEPS = 8
GLOO_TIMEOUT_S = 30


def _wan_case():
    """diffusers' Wan CP plan splits the timestep along tokens: a per-token timestep (Wan 2.2 TI2V style)."""

    def call(fn, x, sigma, kw):
        t = (sigma * 1000).round().long().reshape(1, 1).expand(1, 48)  # 3 x 4 x 4 patches of the (3, 8, 8) latents
        return fn(hidden_states=x, timestep=t, return_dict=False, **kw)[0]

    return dataclasses.replace(CASES["wan"], call=call)


def _flux_case():
    """FLUX's CP plan splits the text tokens too: 6 of them (the shared case has 5)."""

    def inputs(g):
        shared = {"img_ids": torch.randn(16, 3, generator=g), "txt_ids": torch.randn(6, 3, generator=g)}

        def prompt():
            return {"encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
                    "pooled_projections": torch.randn(1, 8, generator=g), **shared}

        return torch.randn(1, 16, 8, generator=g), prompt(), prompt()

    return dataclasses.replace(CASES["flux"], inputs=inputs)


def _config(case, **overrides):
    return toy_config(**{"num_head_blocks": 1, "num_tail_blocks": 1, "num_inference_steps": STEPS,
                         "threshold": case.threshold, **overrides})


def _sharded(case, mesh):
    from diffusers import ContextParallelConfig

    model = case.model()
    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2, mesh=mesh))
    with torch.no_grad():
        generate(case, model, 1)  # diffusers' CP hooks resolve their parameter lookup eagerly once
    return model


def _decisions(stats):
    return [(u.name, u.cached_steps, u.cfg_cached_steps) for u in stats]


def _same_on_every_rank(value, what: str) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    assert all(g == gathered[0] for g in gathered), f"{what} differ between ranks: {gathered}"


def _check_graph(model, units: int) -> None:
    """One Dynamo graph, no break; one all-reduce per cache unit, and each cond's predicate reads one of them."""
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert dict(counters["graph_break"]) == {}
    graph = current_state(model).graph.graph
    reduces = [n for n in graph.nodes if n.op == "call_function" and "all_reduce" in str(n.target)]
    conds = [n for n in graph.nodes if n.target is torch.ops.higher_order.cond]
    assert len(reduces) == len(conds) == units, (len(reduces), len(conds))
    for cond in conds:
        feeding = _ancestors(cond.args[0], stop=set(conds)) & set(reduces)
        assert len(feeding) == 1, (cond.name, feeding)


def _ancestors(node, stop):
    """What ``node`` is computed from, not looking past the nodes in ``stop`` (an earlier unit's cond)."""
    seen, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        if current not in seen and current not in stop:
            seen.add(current)
            frontier.extend(current.all_input_nodes)
    return seen


def _raises(fn, error: type, text: str) -> None:
    try:
        fn()
    except Exception as e:  # torch.compile may wrap the backend's error: look along the chain
        chain = [e]
        while (inner := getattr(chain[-1], "inner_exception", None) or chain[-1].__cause__) is not None:
            chain.append(inner)
        assert any(isinstance(c, error) and text in str(c) for c in chain), f"expected {error.__name__}({text!r}), got {e!r}"
        return
    raise AssertionError(f"expected {error.__name__}({text!r}), nothing raised")


def _parity(case, mesh, form: str, units: int):
    """Sharded stepcache vs single-process stepcache: decisions, stats on every rank, latents."""
    cfg = _config(case)
    with torch.no_grad():
        single = cachepass.compile(case.model(), cfg, inner="aot_eager", form=form)
        reference = generate(case, single, STEPS)
    expected = _decisions(cachepass.stats(single))
    assert any(u[1] for u in expected) and any(u[1] != list(range(1, STEPS)) for u in expected), expected
    model = _sharded(case, mesh)
    counters.clear()
    compiled = cachepass.compile(model, cfg, inner="aot_eager", form=form)
    with torch.no_grad():
        latents = generate(case, compiled, STEPS)
    _check_graph(model, units)
    stats = cachepass.stats(compiled)
    _same_on_every_rank([dataclasses.asdict(u) for u in stats], "stats")
    assert _decisions(stats) == expected
    torch.testing.assert_close(latents, reference, atol=1e-5, rtol=1e-5)
    return model, compiled, stats


def _guards(case, mesh, model, compiled, stats) -> None:
    rank = dist.get_rank()
    with torch.no_grad():
        uncached = generate(case, model, STEPS)  # the sharded model, eager: every block every step

        # one rank resets alone: out of step; every rank computes (no hang), stats says why
        if rank == 0:
            cachepass.reset(compiled)
        latents = generate(case, compiled, STEPS)
        torch.testing.assert_close(latents, uncached, atol=1e-5, rtol=1e-5)
        _raises(lambda: cachepass.stats(compiled), cachepass.CachepassError,
                "ranks of the sequence-parallel group were out of step")

        # every rank resets: back in step, the same decisions as before
        cachepass.reset(compiled)
        generate(case, compiled, STEPS)
        assert cachepass.stats(compiled) == stats

        # a threshold that differs per rank: caught, every rank computes (the one-graph form this time; run as traced:
        # its AOTAutograd run, torch tracing cond's branches again, is the parity tests')
        other = _sharded(case, mesh)
        mismatched = cachepass.compile(other, _config(case, threshold=case.threshold * (1 + rank)), inner="eager",
                                       form="one-graph")
        torch.testing.assert_close(generate(case, mismatched, STEPS), uncached, atol=1e-5, rtol=1e-5)
        _raises(lambda: cachepass.stats(mismatched), cachepass.CachepassError, "or a different config")

        # a group whose size is not the one the tokens are gathered over: a clear error at compile
        singles = [dist.new_group([r]) for r in range(dist.get_world_size())]
        torch._dynamo.reset()
        wrong = cachepass.compile(_sharded(case, mesh), _config(case), inner="aot_eager",
                                  sequence_parallel_group=singles[rank])
        _raises(lambda: generate(case, wrong, 1), cachepass.CachepassError,
                "sequence_parallel_group has 1 ranks, but the model gathers its tokens over 2 ranks")


def main(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    torch.accelerator.device_count = lambda: 1  # diffusers maps ranks to devices by rank % device_count
    from torch.distributed.device_mesh import init_device_mesh

    try:
        mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
        wan = _wan_case()
        model, compiled, stats = _parity(wan, mesh, "piecewise", units=1)
        _guards(wan, mesh, model, compiled, stats)
        torch._dynamo.reset()
        _parity(_flux_case(), mesh, "piecewise", units=2)
    finally:
        dist.destroy_process_group()
