"""A second machine starts warm: every piece cachepass compiles goes through Inductor's and AOTAutograd's
caches, so torch's portable cache (``torch.compiler.save_cache_artifacts`` on the machine that compiled,
``load_cache_artifacts`` on the next one) carries all of them. A piece compiled outside those caches (a
backend option that makes the key unhashable, a wrapper around the inner compiler) would miss here."""

from __future__ import annotations

import re

import torch
from torch._dynamo.utils import counters

import cachepass
from bench.tiny_models import CASES, generate

STEPS = 6


def compiled_pieces(log: str) -> int:
    """Pieces compiled, from the backend's line ("block: 1 compiled for 5 pieces, glue: 4 compiled for 4 pieces")."""
    return sum(int(n) for n in re.findall(r"(\d+) compiled for", log))


def test_pieces_load_from_torchs_portable_cache_into_an_empty_cache_dir(tmp_path, monkeypatch, caplog):
    case = CASES["wan"]
    cfg = cachepass.StepCacheConfig(num_head_blocks=1, threshold=case.threshold, warmup_steps=2,
                                    num_inference_steps=STEPS)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "first-machine"))
    with caplog.at_level("INFO", logger="cachepass"):  # the glue through Inductor too, as on CUDA (CPU: run as traced)
        first = generate(case, cachepass.compile(case.model(), cfg, glue="inductor"), STEPS)
    pieces = compiled_pieces(caplog.text)
    artifacts, info = torch.compiler.save_cache_artifacts()
    assert len(info.inductor_artifacts) >= pieces > 0

    torch._dynamo.reset()
    counters.clear()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "second-machine"))  # empty
    torch.compiler.load_cache_artifacts(artifacts)
    second = generate(case, cachepass.compile(case.model(), cfg, glue="inductor"), STEPS)
    assert counters["inductor"]["fxgraph_cache_hit"] == pieces
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    torch.testing.assert_close(second, first, atol=0, rtol=0)
