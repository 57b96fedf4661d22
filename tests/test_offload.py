"""Layerwise offload planned from the cache schedule: residency, the plan, byte accounting, parity, errors.

On CPU the "device" and the host are both CPU memory (``allow_cpu``): the same slot logic, parameter
views and scheduler run, with copies that complete at once. Streams, events, pinned memory and CUDA
graphs run in tests/gpu/test_offload_gpu.py.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import cachepass
from bench.tiny_models import CASES, generate, toy_config
from cachepass.errors import CachepassError
from cachepass.offload.plan import (
    OffloadConfig,
    choose_residency,
    decisions_of,
    plan_generation,
    predicted_decision,
    residency_priority,
)
from cachepass.offload.runtime import block_lists_paths, model_bytes
from cachepass.unit import UnitSpec

STEPS = 8
STATIC_MASK = (1, 1, 0, 1, 0, 0, 1, 1)


def unit(index: int, name: str, depth: int, head: int, tail: int) -> UnitSpec:
    paths = tuple(f"{name}.{i}" for i in range(depth))
    return UnitSpec(index, name, "Block", paths, range(head), range(head, depth - tail), range(depth - tail, depth), ())


def static_config(**overrides):
    return toy_config(num_inference_steps=STEPS, warmup_steps=2, steps_computation_mask=STATIC_MASK,
                      steps_computation_policy="static", **overrides)


# ---------------------------------------------------------------------------- residency and plans (pure)
def test_residency_keeps_heads_and_tails_then_first_middle_then_spreads_evenly():
    units = [unit(0, "double", 6, 1, 1), unit(1, "single", 10, 2, 0)]
    order = residency_priority(units)
    assert order[:5] == ["double.0", "double.5", "single.0", "single.1", "double.1"]
    assert order[5] == "single.2"  # each unit's first middle block
    rest = [int(b.split(".")[1]) for b in order if b.startswith("single.")][3:]
    assert rest[0] == 6 and sorted(rest[:3]) == [4, 6, 8]  # the middle's middle, then its quarters
    assert sorted(order) == sorted(p for u in units for p in u.block_paths)

    sizes = {p: 100 for u in units for p in u.block_paths}
    residency = choose_residency(units, sizes, nonblock_bytes=40, config=OffloadConfig(budget=40 + 8 * 100, slots=2))
    assert residency.resident == tuple(order[:6])
    assert residency.slots == 2 and residency.slot_bytes == 100
    assert residency.device_bytes == 40 + 8 * 100
    streamed = [b for b in (*units[0].block_paths, *units[1].block_paths) if b not in residency.resident]
    assert [residency.slot_of[b] for b in streamed] == [i % 2 for i in range(len(streamed))]

    everything = choose_residency(units, sizes, 40, OffloadConfig(budget=10**6))
    assert everything.slot_of == {} and everything.device_bytes == 40 + 16 * 100
    one_slot = choose_residency(units, sizes, 40, OffloadConfig(budget=40 + 150, slots=3))
    assert one_slot.slots == 1 and one_slot.resident == ()  # the slots that fit, and no room for a resident block


def test_a_budget_below_one_block_plus_the_rest_is_an_error_naming_the_numbers():
    units = [unit(0, "blocks", 4, 1, 0)]
    sizes = {p: 1000 for p in units[0].block_paths}
    with pytest.raises(CachepassError, match=r"offload.budget=1500 B is too small: the non-block weights \(600 B\) "
                                             r"plus one slot for the largest block \(1000 B\) need 1600 B"):
        choose_residency(units, sizes, 600, OffloadConfig(budget=1500))


def test_static_plan_moves_no_byte_for_a_cached_step_and_loads_each_compute_call_at_its_start():
    units = [unit(0, "blocks", 10, 2, 1)]
    sizes = {p: 100 for p in units[0].block_paths}
    residency = choose_residency(units, sizes, 50, OffloadConfig(budget=50 + 6 * 100, slots=2))
    streamed = list(residency.slot_of)
    assert len(streamed) == 6
    cfg = static_config(num_head_blocks=2, num_tail_blocks=1)
    plan = plan_generation(residency, units, cfg)
    assert not plan.dynamic
    compute_calls = [c for c in plan.calls if not c.cached[0]]
    assert [c.step for c in plan.calls if c.cached[0]] == [s for s in range(STEPS) for _ in range(2) if not STATIC_MASK[s]]
    for call in plan.calls:
        assert set(call.blocks) >= set(units[0].block_paths[:2]) | {units[0].block_paths[-1]}
        assert not (set(call.blocks) & set(streamed)) if call.cached[0] else set(streamed) <= set(call.blocks)
    # every compute call loads each streamed block once (6 blocks, 2 slots); cached calls run none of them
    assert plan.bytes_per_generation == len(compute_calls) * 6 * 100
    assert plan.counters.wasted_bytes == 0 and plan.counters.late_copies == 0 and plan.counters.mispredicted == 0
    # a compute call's first two streamed blocks load when it starts (overlapping the resident head);
    # nothing is loaded for a later call (the user may write the weights between calls)
    for call in compute_calls:
        assert [(a.block, a.after) for a in call.actions[:2]] == [(streamed[0], "start"), (streamed[1], "start")]
        assert not any(a.kind == "copy" and a.after == "end of call" for a in call.actions)
    assert f"per generation: {len(compute_calls) * 600} B moved" in plan.describe()


def test_graphed_plan_loads_what_each_captured_stretch_runs():
    units = [unit(0, "blocks", 10, 2, 1)]
    sizes = {p: 100 for p in units[0].block_paths}
    residency = choose_residency(units, sizes, 50, OffloadConfig(budget=50 + 6 * 100, slots=2))
    plan = plan_generation(residency, units, static_config(num_head_blocks=2, num_tail_blocks=1), graphed=True)
    for call in plan.calls:
        assert call.bytes_moved == (0 if call.cached[0] else 6 * 100)
        copies = [a for a in call.actions if a.kind == "copy"]
        assert all(a.after.startswith(("blocks.", "before blocks.")) for a in copies)
    assert plan.counters.wasted_bytes == 0


def test_dynamic_plan_prefetches_both_outcomes_and_counts_what_is_wasted():
    units = [unit(0, "blocks", 8, 1, 1)]
    sizes = {p: 100 for p in units[0].block_paths}
    # nothing resident: the tail streams too, so a threshold decision has two first blocks to prefetch
    residency = choose_residency(units, sizes, 10, OffloadConfig(budget=10 + 2 * 100, slots=2))
    assert residency.resident == ()
    cfg = toy_config(num_inference_steps=STEPS, warmup_steps=2, num_head_blocks=1, num_tail_blocks=1)
    assert [predicted_decision(cfg, c) for c in range(0, 8, 2)] == [False, False, None, None]
    outcomes = [[(c // 2) in (3, 4, 6)] for c in range(2 * STEPS)]
    plan = plan_generation(residency, units, cfg, outcomes=outcomes)
    assert plan.dynamic
    cached = [c for c in plan.calls if c.cached[0]]
    assert len(cached) == 6
    for call in cached:  # head and tail stream through the slots; no middle block is copied for a cached call
        assert {a.block for a in call.actions if a.kind == "copy"} <= {"blocks.0", "blocks.1", "blocks.7"}
    assert plan.counters.wasted_bytes > 0  # blocks.1 was speculated on and dropped for the tail
    all_computed = plan_generation(residency, units, cfg)
    assert all_computed.bytes_per_generation > plan.bytes_per_generation


# ---------------------------------------------------------------------------- options and errors
@pytest.mark.parametrize("offload, message", [
    ({"slots": 2}, r"offload=\{'slots': 2\} is invalid: it needs 'budget'"),
    ({"budget": "8 parsecs"}, r"offload.budget='8 parsecs' is invalid; allowed: a positive number of bytes"),
    ({"budget": "8GB", "slots": 0}, r"offload.slots=0 is invalid; allowed: an integer >= 1"),
    ({"budget": "8GB", "prefetch": 3}, r"unknown: \['prefetch'\]"),
    ("8GB", r"offload='8GB' is invalid; allowed: None, a dict with 'budget'"),
])
def test_bad_offload_options_name_the_field(offload, message):
    with pytest.raises(ValueError, match=message):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), offload=offload)


def test_budget_units():
    assert OffloadConfig(budget="8GB").budget == 8 * 10**9
    assert OffloadConfig(budget="1.5GiB").budget == 3 * 2**29
    assert OffloadConfig(budget=123).budget == 123
    assert OffloadConfig(budget=1.5e6).budget == 1_500_000  # a float number of bytes
    with pytest.raises(ValueError, match=r"offload.budget=0.5 is invalid"):
        OffloadConfig(budget=0.5)


def test_more_slots_than_the_budget_holds_are_cut_and_logged(caplog):
    units = [unit(0, "blocks", 6, 1, 0)]
    sizes = {p: 100 for p in units[0].block_paths}
    with caplog.at_level("INFO", logger="cachepass"):
        residency = choose_residency(units, sizes, 50, OffloadConfig(budget=50 + 3 * 100, slots=100))
    assert residency.slots == 3
    assert "offload.slots=100 cut to 3" in caplog.text


def test_offload_needs_the_piecewise_form():
    with pytest.raises(ValueError, match="offload needs form='piecewise'"):
        cachepass.compile(torch.nn.Linear(2, 2), toy_config(), form="one-graph", offload={"budget": "1GB"})


def test_offload_on_a_cpu_model_is_an_error_unless_asked_for():
    case = CASES["toy"]
    with pytest.raises(CachepassError, match=r"stepcache option offload needs a CUDA device; the model runs on cpu"):
        cachepass.compile(case.model(), toy_config(), inner="aot_eager", offload={"budget": 10**6})


def test_a_model_offloaded_by_diffusers_hooks_is_refused():
    model = CASES["wan"].model()
    model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(CachepassError, match=r"already offloaded by diffusers hook 'group_offloading'"):
        cachepass.compile(model, toy_config(), offload={"budget": "1GB"})


def test_a_budget_too_small_for_the_model_is_an_error_at_compile():
    """The bound cachepass.compile checks before tracing is what the traced blocks need (Wan: exactly)."""
    case = CASES["wan"]
    model = case.model()
    blocks, nonblock = model_bytes(model, block_lists_paths(model, ("blocks",)))
    need = nonblock + max(blocks.values())
    with pytest.raises(CachepassError, match=rf"offload.budget={need - 1} B is too small: the non-block weights "
                                             rf"\(at least {nonblock} B\) plus one slot .* need {need} B"):
        cachepass.compile(model, toy_config(), inner="aot_eager", offload={"budget": need - 1, "allow_cpu": True})
    compiled = torch.compile(model, backend="stepcache", dynamic=False, options={
        "config": toy_config(), "inner": "aot_eager", "offload": {"budget": need - 1, "allow_cpu": True}})
    with pytest.raises(CachepassError, match=rf"offload.budget={need - 1} B is too small"):  # at its first call
        generate(case, compiled, 1)


# ---------------------------------------------------------------------------- runs
def _explain(model: torch.nn.Module, **options) -> cachepass.api.Explanation:
    args, kwargs = _example(model)
    return cachepass.explain(model, *args, **options, **kwargs)


BLOCK_LISTS = {"WanTransformer3DModel": ("blocks",),
               "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks")}


def _budget(model: torch.nn.Module, units_fraction: float) -> int:
    """The non-block weights plus ``units_fraction`` of the blocks' packed bytes."""
    blocks, nonblock = model_bytes(model, block_lists_paths(model, BLOCK_LISTS[type(model).__name__]))
    return nonblock + int(units_fraction * sum(blocks.values()))


def _example(model):
    case = CASES["flux" if type(model).__name__.startswith("Flux") else "wan"]
    latents, cond, _ = case.inputs(torch.Generator().manual_seed(1))
    captured = {}

    def grab(*args, **kwargs):
        captured["args"], captured["kwargs"] = args, kwargs
        return model(*args, **kwargs)

    case.call(grab, latents, torch.tensor(1.0), cond)
    return captured["args"], captured["kwargs"]


def test_offload_runs_new_resolutions_on_the_symbolic_program():
    """A second and a third width (the second compiles with symbolic sizes, the third runs that program) while
    blocks stream: latents bit-identical to the resident compile at every width, no compile at the third. (The
    resident compile's widths make Dynamo trace this model symbolic from its first call: its record of Wan's forward
    in the process says the width changes.)"""
    case = CASES["wan"]
    cfg = toy_config(num_inference_steps=STEPS, threshold=case.threshold * 3, num_head_blocks=1)
    resident = cachepass.compile(case.model(), cfg, inner="aot_eager")
    expected = [generate(case.at_size(times), resident, STEPS) for times in (1, 2, 3)]
    model = case.model()
    compiled = cachepass.compile(model, cfg, inner="aot_eager", offload={"budget": _budget(model, 0.8), "allow_cpu": True})
    for times, latents in zip((1, 2, 3), expected):
        with torch.compiler.set_stance("fail_on_recompile") if times == 3 else contextlib.nullcontext():
            torch.testing.assert_close(generate(case.at_size(times), compiled, STEPS), latents, atol=0, rtol=0)
    assert cachepass.offload_stats(model).residency.slot_of  # blocks streamed


@pytest.mark.parametrize("name, schedule", [("wan", "static"), ("wan", "dynamic"), ("flux", "dynamic")])
def test_offloaded_generations_equal_the_resident_ones_and_move_the_planned_bytes(name, schedule):
    """Two generations: latents and stats bit-identical to the resident compiled model, no recompile in the
    second, and the bytes it moved equal to the plan's for the decisions it made (cached steps move none)."""
    case = CASES[name]
    base = dict(num_head_blocks=1, num_tail_blocks=1)
    cfg = static_config(**base) if schedule == "static" else \
        toy_config(num_inference_steps=STEPS, threshold=case.threshold * 3, **base)
    resident_model = case.model()
    resident = cachepass.compile(resident_model, cfg, inner="aot_eager")
    expected = [generate(case, resident, STEPS) for _ in range(2)]
    expected_stats = cachepass.stats(resident_model)

    model = case.model()
    offload = {"budget": _budget(model, 0.8), "allow_cpu": True}
    explained = _explain(model, config=cfg, offload=offload)
    compiled = cachepass.compile(model, cfg, inner="aot_eager", offload=offload)
    assert cachepass.offload_stats(model) is None  # nothing ran yet
    first = generate(case, compiled, STEPS)
    after_first = cachepass.offload_stats(model).counters
    with torch.compiler.set_stance("fail_on_recompile"):
        second = generate(case, compiled, STEPS)
    offload = cachepass.offload_stats(model)
    torch.testing.assert_close(first, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(second, expected[1], atol=0, rtol=0)
    assert cachepass.stats(model) == expected_stats
    assert any(u.cached_steps for u in expected_stats)

    residency = offload.residency
    assert residency == explained.offload.residency
    assert residency.slot_of and residency.resident  # some blocks stream, some stay
    units = explained.units
    plan = plan_generation(residency, units, cfg, outcomes=decisions_of(expected_stats, cfg))
    moved = offload.counters.bytes_moved - after_first.bytes_moved
    assert moved == plan.bytes_per_generation > 0
    assert offload.counters.late_copies - after_first.late_copies == plan.counters.late_copies
    cached_calls = [c for c in plan.calls if all(c.cached)]
    middle = {u.block_paths[i] for u in units for i in u.middle}
    assert cached_calls and all(not (set(c.blocks) & middle) for c in cached_calls)
    if name == "wan":  # head and tail resident: a streamed block moves at most once per computed call, plus
        # (threshold) the first middle block a call prefetches before its decision, wasted if it caches
        computed = sum(not c.cached[0] for c in plan.calls)
        streamed_bytes = sum(residency.block_bytes[b] for b in residency.slot_of)
        assert plan.bytes_per_generation - plan.counters.wasted_bytes <= computed * streamed_bytes
    if schedule == "static":
        assert plan.counters.wasted_bytes == 0 and plan.counters.mispredicted == 0


def test_explain_prints_the_offload_plan():
    case = CASES["wan"]
    model = case.model()
    cfg = static_config(num_head_blocks=1, num_tail_blocks=1)
    text = str(_explain(model, config=cfg, offload={"budget": _budget(model, 0.8)}))
    assert "offload:" in text and "resident blocks" in text and "streamed: blocks." in text
    assert "step  2 stream 0 cached" in text and "per generation:" in text


def test_reset_before_the_first_call_and_stats_of_a_fresh_offloaded_model():
    case = CASES["wan"]
    model = case.model()
    compiled = cachepass.compile(model, static_config(), inner="aot_eager",
                                 offload={"budget": _budget(model, 0.8), "allow_cpu": True})
    cachepass.reset(compiled)
    assert cachepass.stats(compiled) == [] and cachepass.offload_stats(model) is None
    generate(case, compiled, STEPS)
    cachepass.reset(compiled)
    assert cachepass.offload_stats(model).counters.copies > 0


def test_offload_through_an_interrupted_generation_a_new_resolution_and_a_second_expert():
    """What users do mid-session, on two experts of one class (one compiled program, two offloads): every
    output and every stat bit-identical to the same session without offload."""
    case = CASES["wan"]
    cond, uncond = case.inputs(torch.Generator().manual_seed(5))[1:]
    wide = dataclasses.replace(case, inputs=lambda g: (torch.randn(1, 4, 3, 8, 12, generator=g), cond, uncond))
    cfg = toy_config(num_inference_steps=STEPS, threshold=case.threshold * 3, num_head_blocks=1, num_tail_blocks=1)

    def session(offload):
        first, second = case.two_experts()
        fast_first = cachepass.compile(first, cfg, inner="aot_eager", offload=offload(first))
        fast_second = cachepass.compile(second, cfg, inner="aot_eager", offload=offload(second))
        outputs = [generate(case, fast_first, 3)]  # interrupted after 3 of STEPS steps
        cachepass.reset(fast_first)
        outputs += [generate(case, fast_first, STEPS), generate(wide, fast_first, STEPS),
                    generate(case, fast_second, STEPS), generate(case, fast_first, STEPS)]
        return outputs, [cachepass.stats(first), cachepass.stats(second)], (first, second)

    expected, expected_stats, _ = session(lambda model: None)
    outputs, stats, models = session(lambda model: {"budget": _budget(model, 0.8), "allow_cpu": True})
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert stats == expected_stats
    first, second = (cachepass.offload_stats(m) for m in models)
    assert first.residency.slot_of and second.residency.slot_of
    assert first.counters.copies > second.counters.copies > 0  # each expert streams its own weights


def _cast_inputs(case, dtype):
    """``case`` with its latents and text states cast to ``dtype`` (a model converted with ``.to(dtype)``)."""
    def call(fn, x, sigma, kw):
        return case.call(fn, x.to(dtype), sigma, {k: v.to(dtype) for k, v in kw.items()}).float()
    return dataclasses.replace(case, call=call)


def _load_checkpoint(model):
    model.load_state_dict(CASES["wan"].two_experts()[1].state_dict())


def _fuse_lora(model):  # what PEFT's merge does: base_layer.weight.data += delta
    g = torch.Generator().manual_seed(3)
    for p in model.blocks[2].parameters():
        p.data += 0.05 * torch.randn(p.shape, generator=g).to(p.device)


def _scale_a_middle_block(model):
    with torch.no_grad():
        for p in model.blocks[3].parameters():
            p.mul_(1.05)


def _replace_a_parameter(model):
    linear = next(m for m in model.blocks[1].modules() if isinstance(m, torch.nn.Linear))
    linear.weight = torch.nn.Parameter(linear.weight.detach() * 0.9)


def _to_bfloat16(model):
    model.to(torch.bfloat16)


WEIGHT_CHANGES = [_load_checkpoint, _fuse_lora, _scale_a_middle_block, _replace_a_parameter, _to_bfloat16]


def weight_change_session(device: str, run, offload: bool, **options):
    """A Wan model compiled (offloaded or not) on ``device``: a generation, then one per `WEIGHT_CHANGES`
    entry made to the model after the last. ``run(case, compiled)`` generates. Returns the outputs, the
    model, and the blocks that streamed before the changes."""
    case = CASES["wan"]
    cfg = toy_config(num_inference_steps=STEPS, threshold=case.threshold * 3, num_head_blocks=1, num_tail_blocks=1)
    model = case.model().to(device)
    budget = {"budget": _budget(model, 0.8), "allow_cpu": device == "cpu"} if offload else None
    compiled = cachepass.compile(model, cfg, inner="aot_eager", offload=budget, **options)
    outputs = [run(case, compiled)]
    streamed = set(cachepass.offload_stats(model).residency.slot_of) if offload else set()
    for change in WEIGHT_CHANGES:
        change(model)
        outputs.append(run(_cast_inputs(case, torch.bfloat16) if change is _to_bfloat16 else case, compiled))
    return outputs, model, streamed


def check_weight_changes(expected, reference, outputs, model, streamed, log_text):
    assert streamed >= {"blocks.1", "blocks.2", "blocks.3"}
    for change, got, want in zip(["first", *[c.__name__ for c in WEIGHT_CHANGES]], outputs, expected):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=lambda m, c=change: f"after {c}: {m}")
    assert all(not torch.equal(a, b) for a, b in zip(expected, expected[1:]))  # every change changed the result
    got_weights, want_weights = model.state_dict(), reference.state_dict()
    assert all(torch.equal(got_weights[k], want_weights[k]) for k in want_weights)
    assert "1 weight(s) of blocks.1 were replaced since the last call" in log_text
    assert "changed dtype or shape since the last call" in log_text


def test_weight_changes_between_generations_reach_the_streamed_blocks(caplog):
    """Users fuse LoRAs and swap checkpoints between generations: each change, made to an offloaded model
    after it ran, gives what the same change gives without offload (bit-identical under aot_eager), and the
    weights read back are the new ones. Writes into a parameter land in its host copy; replaced memory is
    copied in (logged); a new dtype packs the blocks again (logged)."""
    run = lambda case, compiled: generate(case, compiled, STEPS)  # noqa: E731
    expected, reference, _ = weight_change_session("cpu", run, offload=False)
    with caplog.at_level("INFO", logger="cachepass"):
        outputs, model, streamed = weight_change_session("cpu", run, offload=True)
    check_weight_changes(expected, reference, outputs, model, streamed, caplog.text)


def _bytes_in(tensors, buffers) -> tuple[int, int]:
    """Bytes of ``tensors`` whose memory lies inside one of ``buffers`` (host side), and of the others."""
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in buffers]
    inside = outside = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if any(lo <= t.data_ptr() < hi for lo, hi in ranges):
            inside += nbytes
        else:
            outside += nbytes
    return inside, outside


def test_a_model_on_the_cpu_starts_in_host_memory_and_the_device_never_holds_more_than_the_budget():
    """``device=`` with offload: at compile the non-block weights go to the device and every block is packed into
    host memory (the "device" here is the CPU, ``allow_cpu``; the same code runs on CUDA with mapped pinned memory);
    after the first call the device holds the non-block weights, the resident blocks and the slots: the budget. The
    outputs equal the resident model's, bit for bit."""
    from cachepass.offload.host_start import _PACKED
    from cachepass.offload.runtime import model_offload

    case = CASES["wan"]
    cfg = toy_config(num_inference_steps=STEPS, threshold=case.threshold * 3, num_head_blocks=1, num_tail_blocks=1)
    expected = generate(case, cachepass.compile(case.model(), cfg, inner="aot_eager"), STEPS)
    model = case.model()
    block_params = [p for block in model.blocks for p in block.parameters()]
    other = [t for t in (*model.parameters(), *model.buffers()) if all(t is not p for p in block_params)]
    budget = _budget(model, 0.6)
    compiled = cachepass.compile(model, cfg, inner="aot_eager", offload={"budget": budget, "allow_cpu": True},
                                 device="cpu")
    packed = {id(entry[1]): entry[1] for entry in _PACKED.values()}.values()
    host, device_side = _bytes_in(block_params, packed)
    assert host == sum(p.numel() * p.element_size() for p in block_params) and device_side == 0
    assert _bytes_in(other, packed) == (0, sum(t.numel() * t.element_size() for t in other))

    torch.testing.assert_close(generate(case, compiled, STEPS), expected, atol=0, rtol=0)
    offload = model_offload(model)
    stats = cachepass.offload_stats(model)
    host, device_side = _bytes_in(block_params, offload.host.values())
    streamed = sum(stats.residency.block_bytes[b] for b in stats.residency.slot_of)
    assert stats.host_bytes == streamed and host <= streamed and stats.residency.resident
    slots = sum(s.numel() for s in offload.slots)
    other_bytes = sum(t.numel() * t.element_size() for t in other)
    assert other_bytes + device_side + slots <= budget
    resident = [p for b in stats.residency.resident for p in model.get_submodule(b).parameters()]
    assert device_side == sum(p.numel() * p.element_size() for p in resident) > 0  # only resident blocks are on the device
