"""Layerwise offload on a CUDA device: pinned host weights, the copy stream and its events, with and
without CUDA graphs; outputs and decisions equal to the resident model, bytes as planned and as the
profiler records them, no host sync added, and no race under PyTorch's CUDA sanitizer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_cuda_graphs import config, decisions, generate_on_gpu
from test_offload import check_weight_changes, weight_change_session

import cachepass
from bench.offload import middle_blocks
from bench.timing import pinned_htod_bytes, sm_copy_kernels
from bench.tiny_models import CASES
from cachepass.offload.plan import decisions_of, plan_generation
from cachepass.offload.runtime import block_lists_paths, model_bytes, model_offload
from cachepass.state.runtime import states_of

BLOCK_LISTS = {"wan": ("blocks",), "flux": ("transformer_blocks", "single_transformer_blocks")}


def budget(model, name: str, fraction: float) -> int:
    """The non-block weights plus ``fraction`` of the blocks' packed bytes."""
    blocks, nonblock = model_bytes(model, block_lists_paths(model, BLOCK_LISTS[name]))
    return nonblock + int(fraction * sum(blocks.values()))


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_offload_matches_the_resident_model_with_and_without_cuda_graphs(name, tmp_path):
    case = CASES[name]
    resident_model = case.model().cuda()
    resident = cachepass.compile(resident_model, config(case), inner="aot_eager", cudagraphs="off", scope="model")
    expected = [generate_on_gpu(case, resident, seed) for seed in (1, 2, 3)]  # the whole model's layout, as offload's
    expected_decisions = decisions(resident_model)
    units = len(expected_decisions)
    layout = states_of(resident_model)[-1].layout
    for mode, syncs in (("off", units), ("piecewise", units), ("conditional", 0)):
        model = case.model().cuda()
        compiled = cachepass.compile(model, config(case), inner="aot_eager", cudagraphs=mode,
                                     offload={"budget": budget(model, name, 0.8)})
        first = generate_on_gpu(case, compiled, 1)
        second, measured, where = generate_on_gpu(case, compiled, 2, count_syncs=True)
        before = cachepass.offload_stats(model).counters
        third, copied = pinned_htod_bytes(lambda: generate_on_gpu(case, compiled, 3), str(tmp_path / f"{mode}.json"))
        stats = cachepass.offload_stats(model)
        for out, want in zip((first, second, third), expected):
            torch.testing.assert_close(out, want, atol=0, rtol=0)
        assert decisions(model) == expected_decisions, mode
        assert measured == syncs, f"{mode}: {measured} host syncs per call, expected {syncs}: {where}"
        assert all(t.is_pinned() for t in model_offload(model).host.values())
        assert stats.residency.slot_of and stats.graphed == (mode != "off")
        plan = plan_generation(stats.residency, layout.units, layout.config,
                               decisions_of(cachepass.stats(model), layout.config), graphed=mode != "off")
        assert plan.bytes_per_generation > 0
        # a copy captured into an IF/ELSE body is an sm_copy kernel (a memcpy node there would run on every SM);
        # the middle blocks run only in the compute branch: their copies are those, the rest are copy-engine copies
        middle = middle_blocks(layout.units)
        in_bodies = [a for c in plan.calls for a in c.actions if a.kind == "copy" and a.block in middle] \
            if mode == "conditional" else []
        body_bytes = sum(stats.residency.block_bytes[a.block] for a in in_bodies)
        assert sm_copy_kernels(tmp_path / f"{mode}.json") == len(in_bodies), mode
        assert copied == plan.bytes_per_generation - body_bytes, mode
        if mode == "off":  # host-issued copies: counted as they are issued
            assert stats.counters.bytes_moved - before.bytes_moved == copied


def test_offload_is_bit_identical_to_the_resident_model_under_inductor():
    """The streamed blocks run the resident model's kernels: slot views have the parameters' layout, and one
    compiled block serves resident and streamed blocks alike; off, piecewise and conditional graphs."""
    case = CASES["wan"]
    for mode in ("off", "piecewise", "conditional"):
        resident = generate_on_gpu(case, cachepass.compile(case.model().cuda(), config(case), cudagraphs=mode), 1)
        model = case.model().cuda()
        compiled = cachepass.compile(model, config(case), cudagraphs=mode, offload={"budget": budget(model, "wan", 0.6)})
        offloaded = generate_on_gpu(case, compiled, 1)
        assert cachepass.offload_stats(model).residency.slot_of, mode  # some blocks streamed
        assert torch.equal(offloaded, resident), f"{mode}: max abs {(offloaded - resident).abs().max().item()}"


@pytest.mark.parametrize("mode", ["off", "conditional"])
def test_weight_changes_between_generations_reach_the_streamed_blocks(mode, caplog):
    """As on the CPU (tests/test_offload.py), with the streamed weights in mapped pinned host memory:
    parameters stay CUDA tensors, the user's writes land in host memory, graphs re-read it each replay."""
    expected, reference, _ = weight_change_session("cuda", generate_on_gpu, offload=False, cudagraphs="off")
    with caplog.at_level("INFO", logger="cachepass"):
        outputs, model, streamed = weight_change_session("cuda", generate_on_gpu, offload=True, cudagraphs=mode)
    check_weight_changes(expected, reference, outputs, model, streamed, caplog.text)
    assert all(p.device.type == "cuda" for p in model.parameters())


def test_no_race_under_the_cuda_sanitizer():
    """CSAN checks each op's reads and writes against the streams and events that order them (see the
    script: it proves it catches a planted race, then runs an offloaded generation)."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    script = os.path.join(here, "offload_under_sanitizer.py")
    run = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "planted race reported" in run.stdout and "offload ran:" in run.stdout
    planted, offload = run.stderr.split("--- offload from here ---")
    assert planted.count("CSAN detected a possible data race") == 1  # the sanitizer prints what it raises
    assert "CSAN" not in offload, offload[-6000:]
