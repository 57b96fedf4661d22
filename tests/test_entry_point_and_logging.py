"""backend="stepcache" works after pip install without importing cachepass; passes log under "cachepass"."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from importlib.metadata import entry_points

import torch

import cachepass
from models import CASES, generate

TESTS = os.path.dirname(__file__)


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "stepcache"]
    assert ep.value == "cachepass.backend:stepcache"


def test_string_backend_without_importing_cachepass():
    code = f"""
import sys, torch
sys.path.insert(0, {TESTS!r})
from models import ToyDiT
assert "cachepass" not in sys.modules
torch.manual_seed(0)
model = ToyDiT().eval()
compiled = torch.compile(model, backend="stepcache", fullgraph=True, dynamic=False,
                         options={{"config": {{"num_head_blocks": 2, "threshold": 0.05}}, "inner": "eager"}})
x, t, e = torch.randn(1, 16, 4), torch.tensor([500.0]), torch.randn(1, 5, 8)
with torch.no_grad():
    torch.testing.assert_close(compiled(x, t, e), model(x, t, e))
assert "cachepass" in sys.modules
print("stepcache-ok", len(sys.modules["cachepass"].stats(model)))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stepcache-ok 1" in result.stdout


def test_passes_log_what_they_rewrite(caplog):
    case = CASES["flux"]
    cfg = cachepass.StepCacheConfig(num_head_blocks=1, threshold=0.2, separate_cfg=True, num_inference_steps=2)
    with caplog.at_level(logging.DEBUG, logger="cachepass"):
        generate(case, cachepass.compile(case.model(), cfg, inner="eager"), 2)
    messages = [r.getMessage() for r in caplog.records if r.name == "cachepass"]
    assert any(m.startswith("cache unit transformer_blocks: 4 blocks, head range(0, 1) middle range(1, 4)") for m in messages)
    assert any(m.startswith("outline_middle_blocks: single_transformer_blocks:") and "stepcache_unit_1" in m for m in messages)
    assert any(m.startswith("insert_cache_cond: 2 units -> 2 conds") for m in messages)
    assert any("stepcache: 2 cache unit(s) (transformer_blocks, single_transformer_blocks)" in m for m in messages)
