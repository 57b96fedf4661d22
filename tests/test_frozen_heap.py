"""Compiles of a cachepass model's calls run with the older heap frozen, and leave nothing frozen
(`cachepass.frozen_heap`); other compiles, and a process that froze its heap itself, are left as they are."""

from __future__ import annotations

import gc

import torch

import cachepass
import cachepass.backend
from bench.tiny_models import CASES, generate, toy_config


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
