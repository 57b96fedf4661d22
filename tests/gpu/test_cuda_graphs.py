"""CUDA graphs over the piecewise program, on a CUDA device: the same decisions and outputs as the
program without graphs, the host syncs each form promises, and recapture when weights move."""

from __future__ import annotations

import collections
import dataclasses
import gc
import warnings

import pytest
import torch

import cachepass
from bench.tiny_models import CASES, toy_config
from cachepass.demo.sampling import sample

STEPS = 8


def generate_on_gpu(case, fn, seed: int = 1, count_syncs: bool = False):
    """``models.generate`` with every input on the GPU.

    ``count_syncs``: also return the host syncs per transformer call (CUDA sync-debug mode, on during
    the calls only) and the lines that made them.
    """
    latents, cond, uncond = case.inputs(torch.Generator().manual_seed(seed))
    on_gpu = lambda kw: {k: v.cuda() for k, v in kw.items()}  # noqa: E731
    caught = []

    def velocity(x, sigma, kw):
        if not count_syncs:
            return case.call(fn, x, sigma, kw)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                return case.call(fn, x, sigma, kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            caught.extend(w for w in seen if "synchroniz" in str(w.message))

    out = sample(velocity, latents.cuda(), on_gpu(cond), on_gpu(uncond), STEPS, guidance=3.0)
    if not count_syncs:
        return out
    return out, len(caught) / (2 * STEPS), collections.Counter(f"{w.filename}:{w.lineno}" for w in caught)


def config(case):
    return toy_config(num_head_blocks=1, num_tail_blocks=1, threshold=case.threshold * 3, num_inference_steps=STEPS)


def decisions(model):
    return [(u.cached_steps, u.cfg_cached_steps) for u in cachepass.stats(model)]


@pytest.mark.parametrize("name, inner", [("wan", "aot_eager"), ("flux", "aot_eager"), ("wan", "inductor")])
def test_graphs_make_the_same_decisions_and_outputs_with_the_promised_syncs(name, inner, caplog):
    case = CASES[name]
    plain_model = case.model().cuda()
    plain = cachepass.compile(plain_model, config(case), inner=inner, cudagraphs="off")
    expected = [generate_on_gpu(case, plain, seed) for seed in (1, 2)]
    expected_decisions = decisions(plain_model)
    assert any(s for unit in expected_decisions for s in unit), "the config must cache some steps"
    units = len(expected_decisions)
    for mode, syncs in (("piecewise", units), ("conditional", 0)):
        model = case.model().cuda()
        compiled = cachepass.compile(model, config(case), inner=inner, cudagraphs=mode)
        with caplog.at_level("INFO", logger="cachepass"):
            first = generate_on_gpu(case, compiled, 1)  # captures on its first call
            second, measured, where = generate_on_gpu(case, compiled, 2, count_syncs=True)
        torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
        torch.testing.assert_close(second, expected[1], atol=0, rtol=0)
        assert decisions(model) == expected_decisions, mode
        assert measured == syncs, f"{mode}: {measured} host syncs per call, expected {syncs}: {where}"
        # one state: one capture per list's program (the default scope: a program per list), addresses stable
        assert caplog.text.count(f"captured CUDA graphs ({mode})") == units
        assert "moved since the CUDA graphs were captured" not in caplog.text
        caplog.clear()


def test_moved_weights_are_captured_again_and_stay_right(caplog):
    case = CASES["wan"]
    plain = cachepass.compile(case.model().cuda(), config(case), inner="aot_eager", cudagraphs="off")
    expected = generate_on_gpu(case, plain, 2)
    model = case.model().cuda()
    compiled = cachepass.compile(model, config(case), inner="aot_eager", cudagraphs="conditional")
    generate_on_gpu(case, compiled, 1)
    old = [p.data for p in model.parameters()]
    for p in model.parameters():  # what offload or a weight swap does: same parameters, new memory
        p.data = p.data.clone()
    for t in old:  # where the graphs read the weights now holds zeros: only a new capture is right
        t.zero_()
    with caplog.at_level("WARNING", logger="cachepass"):
        moved = generate_on_gpu(case, compiled, 2)
    assert "moved since the CUDA graphs were captured" in caplog.text
    torch.testing.assert_close(moved, expected, atol=0, rtol=0)


def test_reset_and_stats_in_the_natural_order():
    """reset() before the first call, stats() mid-generation: both work on a graphed model."""
    case = CASES["flux"]
    model = case.model().cuda()
    compiled = cachepass.compile(model, config(case), inner="aot_eager", cudagraphs="conditional")
    cachepass.reset(compiled)  # before any call: nothing to reset yet, and no error
    first = generate_on_gpu(case, compiled, 1)
    cachepass.reset(model)
    again = generate_on_gpu(case, compiled, 1)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    assert any(s for unit in decisions(model) for s in unit)  # stats read the cached steps the graphs wrote


@pytest.mark.parametrize("dynamic, captures", [(False, 4), (None, 6)])
def test_each_model_state_and_shape_gets_its_own_graphs(dynamic, captures, caplog):
    """Two instances of one class (Wan 2.2's experts) share Dynamo's graph but not state; a new shape
    compiles and captures once more. Going back to the first shape replays what was captured for it with
    static programs (2 states x 2 shapes); with the default, the first shape then runs the program traced with
    symbolic sizes (Dynamo tries the entry it hit last first), which captures its own set (2 x 3)."""
    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)
    first, second = case.two_experts()
    plain_first, plain_second = case.two_experts()
    graphed = [cachepass.compile(m.cuda(), cfg, inner="aot_eager", cudagraphs="conditional", dynamic=dynamic)
               for m in (first, second)]
    plain = [cachepass.compile(m.cuda(), cfg, inner="aot_eager", cudagraphs="off", dynamic=dynamic)
             for m in (plain_first, plain_second)]
    def more_tokens(g):
        latents, cond, uncond = case.inputs(g)
        return torch.cat([latents, latents], 1), cond, uncond

    wide = dataclasses.replace(case, inputs=more_tokens)
    with caplog.at_level("INFO", logger="cachepass"):
        for shape in (case, wide, case):
            for ours, theirs in zip(graphed, plain):
                torch.testing.assert_close(generate_on_gpu(shape, ours), generate_on_gpu(shape, theirs), atol=0, rtol=0)
    assert caplog.text.count("captured CUDA graphs (conditional)") == captures


class WritesItsInput(type(CASES["toy"].model())):
    def forward(self, hidden_states, timestep, encoder_hidden_states):
        encoder_hidden_states.mul_(0.9)  # a model that writes an input in place
        return super().forward(hidden_states, timestep, encoder_hidden_states)


def test_an_input_the_model_writes_is_written_back(caplog):
    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)
    results = []
    for cudagraphs in ("off", "conditional"):
        torch.manual_seed(0)
        model = WritesItsInput().eval().cuda()
        latents, cond, uncond = case.inputs(torch.Generator().manual_seed(1))
        cond, uncond = ({k: v.cuda() for k, v in kw.items()} for kw in (cond, uncond))
        compiled = cachepass.compile(model, cfg, inner="aot_eager", cudagraphs=cudagraphs, scope="model")  # a graph input
        with caplog.at_level("INFO", logger="cachepass"):
            out = sample(lambda x, sigma, kw: case.call(compiled, x, sigma, kw), latents.cuda(), cond, uncond, STEPS)
        results.append((out, cond["encoder_hidden_states"], uncond["encoder_hidden_states"]))
    assert "writes graph input(s)" in caplog.text
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_the_default_on_cuda_is_conditional_graphs(caplog):
    """No option set: IF/ELSE graphs, no host sync, the outputs of the program without graphs (Inductor)."""
    case = CASES["wan"]
    expected = generate_on_gpu(case, cachepass.compile(case.model().cuda(), config(case), cudagraphs="off"), 1)
    model = case.model().cuda()
    with caplog.at_level("INFO", logger="cachepass"):
        compiled = cachepass.compile(model, config(case))
        first = generate_on_gpu(case, compiled, 1)
        _, syncs, where = generate_on_gpu(case, compiled, 1, count_syncs=True)
    assert "cudagraphs='conditional' by default" in caplog.text and "cudagraphs=conditional, glue=eager" in caplog.text
    assert caplog.text.count("captured CUDA graphs (conditional)") == 1
    assert syncs == 0, where
    torch.testing.assert_close(first, expected, atol=0, rtol=0)


class ScaledByAHostScalar(type(CASES["toy"].model())):
    def forward(self, hidden_states, timestep, encoder_hidden_states, scale):
        return super().forward(hidden_states, timestep, encoder_hidden_states) * scale  # scale: a 0-dim CPU tensor


def test_a_program_the_default_graphs_cannot_take_runs_without_them(caplog):
    """A CPU tensor input would be read once, at capture: the default falls back (a warning), an explicit
    request fails; both scales give the results of the program without graphs."""
    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)
    results = {}
    for cudagraphs in ("off", None, "conditional"):
        torch.manual_seed(0)
        model = ScaledByAHostScalar().eval().cuda()
        compiled = cachepass.compile(model, cfg, inner="aot_eager", cudagraphs=cudagraphs, scope="model")  # the scale: an input
        latents, cond, uncond = case.inputs(torch.Generator().manual_seed(1))
        outs = []
        for scale in (1.0, 0.5):
            kw = [{**{k: v.cuda() for k, v in c.items()}, "scale": torch.tensor(scale)} for c in (cond, uncond)]
            run = lambda: sample(lambda x, sigma, c: case.call(compiled, x, sigma, c), latents.cuda(), *kw, STEPS)  # noqa: E731
            if cudagraphs == "conditional":
                with pytest.raises(cachepass.CachepassError, match="graph input .* is on cpu"):
                    run()
                break
            with caplog.at_level("WARNING", logger="cachepass"):
                outs.append(run())
        results[cudagraphs] = outs
    assert "runs without CUDA graphs (they were the default, not asked for)" in caplog.text
    for ours, theirs in zip(results[None], results["off"]):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


HOST_TABLES: dict[str, torch.Tensor] = {}  # as FastVideo's rotary-table cache: CPU tensors forward moves to the GPU


class AddsAHostTable(type(CASES["toy"].model())):
    def forward(self, hidden_states, timestep, encoder_hidden_states):
        table = HOST_TABLES["table"].to(hidden_states.device).to(hidden_states.dtype)
        return super().forward(hidden_states + table, timestep, encoder_hidden_states)


def test_a_host_table_the_model_moves_keeps_the_default_graphs_and_its_changes_are_seen(caplog):
    """A CPU tensor whose only use is a move to the GPU is moved once per change, outside the graphs: the
    default stays conditional graphs, and the outputs follow the table as the eager reference does."""
    from cachepass.reference import StepCacheReference

    case = CASES["toy"]
    cfg = toy_config(num_inference_steps=STEPS)

    def session(compile_fn):
        torch.manual_seed(0)
        fn = compile_fn(AddsAHostTable().eval().cuda())
        HOST_TABLES["table"] = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(16, 4)
        outs = [generate_on_gpu(case, fn, 1)]
        HOST_TABLES["table"].mul_(2)  # in place
        outs.append(generate_on_gpu(case, fn, 1))
        HOST_TABLES["table"] = -HOST_TABLES["table"]  # another tensor
        outs.append(generate_on_gpu(case, fn, 1))
        return outs

    expected = session(lambda model: StepCacheReference(model, cfg))
    with caplog.at_level("INFO", logger="cachepass"):
        got = session(lambda model: cachepass.compile(model, cfg, inner="aot_eager", scope="model"))  # the table: an input
    assert "are CPU tensors the model moves to cuda" in caplog.text
    assert caplog.text.count("captured CUDA graphs (conditional)") == 1
    assert "runs without CUDA graphs" not in caplog.text
    assert not torch.equal(expected[0], expected[1]) and not torch.equal(expected[1], expected[2])
    for ours, reference in zip(got, expected):
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def _pool_bytes(pool) -> int:
    return sum(s["total_size"] for s in torch.cuda.memory._snapshot()["segments"]
               if tuple(s.get("segment_pool_id", (0, 0))) == tuple(pool))


def test_graph_memory_stays_bounded_over_ten_shapes_and_release_returns_it(monkeypatch, caplog):
    from cachepass.cudagraphs import memory

    monkeypatch.setenv("CACHEPASS_MAX_GRAPH_SETS", "3")
    case = CASES["toy"]
    model = case.model().cuda()
    compiled = cachepass.compile(model, toy_config(num_inference_steps=STEPS), inner="aot_eager", max_shapes=10)
    device = torch.device("cuda", torch.cuda.current_device())
    gc.collect()
    earlier = memory.graph_sets(device)  # sets of earlier tests' models still alive: dropped first
    held = []
    with caplog.at_level("INFO", logger="cachepass"):
        for i in range(10):  # largest first: every later set fits in memory a dropped one gave back
            tokens = 4096 - 64 * i
            latents = torch.randn(1, tokens, 4, device="cuda")
            text = {"encoder_hidden_states": torch.randn(1, 5, 8, device="cuda")}
            sample(lambda x, sigma, c: case.call(compiled, x, sigma, c), latents, text, text, STEPS)
            held.append(_pool_bytes(memory.pool_and_stream(device)[0]))
    assert caplog.text.count("captured CUDA graphs") == 10
    assert caplog.text.count("dropped the CUDA graphs of the model state replayed longest ago") == earlier + 7
    assert memory.graph_sets(device) == 3
    assert max(held[4:]) <= held[3], held  # from the first drop on, new sets reuse what dropped ones gave back
    pool = memory.pool_and_stream(device)[0]
    assert cachepass.release(compiled) == 3 and memory.graph_sets(device) == 0
    assert _pool_bytes(pool) == 0
    out = sample(lambda x, sigma, c: case.call(compiled, x, sigma, c), latents, text, text, STEPS)  # captures again
    assert torch.isfinite(out).all() and memory.graph_sets(device) == 1


def test_weights_that_keep_moving_turn_the_default_graphs_off(caplog):
    """What an offload hook does (weights at new addresses every generation): one capture again, then no graphs."""
    case = CASES["wan"]
    expected = generate_on_gpu(case, cachepass.compile(case.model().cuda(), config(case), inner="aot_eager",
                                                       cudagraphs="off"), 2)
    model = case.model().cuda()
    compiled = cachepass.compile(model, config(case), inner="aot_eager")
    generate_on_gpu(case, compiled, 1)
    with caplog.at_level("WARNING", logger="cachepass"):
        for _ in range(2):
            for p in model.parameters():
                p.data = p.data.clone()
            torch.testing.assert_close(generate_on_gpu(case, compiled, 2), expected, atol=0, rtol=0)
    assert "capturing them again" in caplog.text
    assert "runs without CUDA graphs from now on" in caplog.text


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_the_default_scope_under_the_default_graphs_gives_the_whole_models_outputs(name, caplog):
    """The default scope (each block list alone, `cachepass.block_scope`) on CUDA: each list's program captures its
    own conditional graphs and gives the whole-model compile's outputs and decisions, with no host sync per call."""
    case = CASES[name]
    whole_model = case.model().cuda()
    whole = cachepass.compile(whole_model, config(case), inner="aot_eager", scope="model")
    expected = [generate_on_gpu(case, whole, seed) for seed in (1, 2)]
    model = case.model().cuda()
    with caplog.at_level("INFO", logger="cachepass"):
        fn = cachepass.compile(model, config(case), inner="aot_eager")
        first = generate_on_gpu(case, fn, 1)
        second, measured, where = generate_on_gpu(case, fn, 2, count_syncs=True)
    assert "scope='blocks' (chosen" in caplog.text
    torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(second, expected[1], atol=0, rtol=0)
    assert decisions(model) == decisions(whole_model)
    assert measured == 0, f"{measured} host syncs per call: {where}"
    assert caplog.text.count("captured CUDA graphs (conditional)") == len(decisions(model))  # one per list
