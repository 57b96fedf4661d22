"""Symbolic sizes under CUDA graphs: the default compile's second shape traces once with symbolic sizes, and
every later resolution runs that program with graphs captured per state and size, as a static compile would."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES
from tests.gpu.test_cuda_graphs import config, decisions, generate_on_gpu

SIZES = (1, 2, 3, 1)  # widths 8, 16, 24 and the first again


@pytest.mark.parametrize("name, mode", [("wan", "piecewise"), ("wan", "conditional"), ("flux", "conditional")])
def test_new_resolutions_run_the_symbolic_program_with_the_static_compiles_decisions(name, mode, caplog):
    """FLUX's symbolic program takes its token count as two integer inputs: both key the graph sets."""
    case = CASES[name]
    model = case.model().cuda()
    compiled = cachepass.compile(model, config(case), inner="inductor", cudagraphs=mode)
    counters.clear()
    with caplog.at_level("INFO", logger="cachepass"):
        outs = []
        for times in SIZES:
            outs.append(generate_on_gpu(case.at_size(times), compiled))
            outs.append(decisions(model))
    lists = len(decisions(model))  # the default scope compiles a program per block list (FLUX: two)
    assert counters["stats"]["unique_graphs"] == 2 * lists, "the third resolution must not compile"
    assert "sizes symbolic in" in caplog.text
    # a graph set per program, state and size: the first width again runs the symbolic program (Dynamo tries the
    # entry it hit last first, and that one takes every width), so it captures a fourth set
    assert caplog.text.count(f"captured CUDA graphs ({mode})") == 4 * lists
    for i, times in enumerate(SIZES):
        static_model = case.model().cuda()
        static = cachepass.compile(static_model, config(case), inner="inductor", cudagraphs="off", dynamic=False)
        expected = generate_on_gpu(case.at_size(times), static)
        torch.testing.assert_close(outs[2 * i], expected, atol=2e-4, rtol=2e-4)
        assert outs[2 * i + 1] == decisions(static_model), f"width x{times}"


def test_symbolic_latents_capture_per_resolution_with_one_compile(caplog):
    """``dynamic="latents"`` under conditional graphs: one compile for every width, a graph set per width (the first
    width again replays its own), each width's result and decisions those of a static compile."""
    case = CASES["wan"]
    model = case.model().cuda()
    compiled = cachepass.compile(model, config(case), inner="inductor", cudagraphs="conditional", dynamic="latents")
    counters.clear()
    with caplog.at_level("INFO", logger="cachepass"):
        outs = [(generate_on_gpu(case.at_size(times), compiled), decisions(model)) for times in SIZES]
    assert counters["stats"]["unique_graphs"] == 1, "no resolution after the first may compile"
    assert caplog.text.count("captured CUDA graphs (conditional)") == 3
    for (out, decided), times in zip(outs, SIZES):
        static_model = case.model().cuda()
        static = cachepass.compile(static_model, config(case), inner="inductor", cudagraphs="off", dynamic=False)
        torch.testing.assert_close(out, generate_on_gpu(case.at_size(times), static), atol=2e-4, rtol=2e-4)
        assert decided == decisions(static_model), f"width x{times}"
