"""Compiles of a cachepass model's calls run with our measures (`cachepass.compile_scope`): the older heap frozen,
nothing left frozen; lines not named from tokenized source unless a log prints them, torch's function back after.
Other compiles, a process that froze its heap itself, and a process with Dynamo's trace logs on are left as they are."""

from __future__ import annotations

import gc
import inspect

import pytest
import torch
from torch._dynamo import funcname_cache, symbolic_convert

import cachepass
import cachepass.backend
from bench.tiny_models import CASES, ToyDiT, generate, toy_config

TORCH_GET_FUNCNAME = symbolic_convert.get_funcname


def freeze_counts_in_the_backend(monkeypatch) -> list[int]:
    """``gc.get_freeze_count()`` seen by each rewrite the stepcache backend runs (inside Dynamo's compile)."""
    seen = []
    rewrite = cachepass.backend.rewrite

    def spy(*args, **kwargs):
        seen.append(gc.get_freeze_count())
        return rewrite(*args, **kwargs)

    monkeypatch.setattr(cachepass.backend, "rewrite", spy)
    return seen


def test_a_compile_freezes_the_older_heap_and_unfreezes_it_when_done(monkeypatch):
    seen = freeze_counts_in_the_backend(monkeypatch)
    case = CASES["toy"]
    generate(case, cachepass.compile(case.model(), toy_config(), inner="aot_eager"), 2)
    assert len(seen) == 1 and seen[0] > 10_000  # the process's modules, torch's among them
    assert gc.get_freeze_count() == 0


def test_other_compiles_and_a_heap_the_process_froze_itself_are_left_as_they_are(monkeypatch):
    counts = []

    def backend(gm, example_inputs):
        counts.append(gc.get_freeze_count())
        return gm.forward

    torch.compile(lambda x: x * 2 + 1, backend=backend)(torch.ones(3))
    assert counts == [0]

    seen = freeze_counts_in_the_backend(monkeypatch)
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        case = CASES["toy"]
        generate(case, cachepass.compile(case.model(), toy_config(), inner="aot_eager"), 2)
        # still frozen (unfreezing ours would have unfrozen the process's: 0); frozen objects freed since are not counted
        assert gc.get_freeze_count() > frozen // 2
        assert len(seen) == 1 and seen[0] > frozen // 2
    finally:
        gc.unfreeze()


@pytest.fixture
def tokenized_files():
    """The files Dynamo's line naming tokenized during the test (its cache emptied first and after)."""
    funcname_cache.clearcache()
    yield funcname_cache.cache
    funcname_cache.clearcache()


def test_a_compile_names_no_line_from_source_and_puts_torchs_function_back(tokenized_files):
    model_file, case = inspect.getsourcefile(ToyDiT), CASES["toy"]
    generate(case, torch.compile(case.model(), backend="eager"), 2)
    assert model_file in tokenized_files  # Dynamo alone tokenizes the model's file for its unprinted log header

    tokenized_files.clear()
    generate(case, cachepass.compile(case.model(), toy_config(), inner="aot_eager"), 2)
    assert model_file not in tokenized_files
    assert symbolic_convert.get_funcname is TORCH_GET_FUNCNAME


def test_with_the_trace_call_log_on_lines_are_named_as_torch_names_them(tokenized_files):
    torch._logging.set_logs(trace_call=True)
    try:
        case = CASES["toy"]
        generate(case, cachepass.compile(case.model(), toy_config(), inner="aot_eager"), 2)
    finally:
        torch._logging.set_logs()
    assert inspect.getsourcefile(ToyDiT) in tokenized_files
