"""backend="stepcache" works after pip install without importing cachepass; passes log under "cachepass"."""

from __future__ import annotations

import logging
import subprocess
import sys
from importlib.metadata import entry_points

import cachepass
from bench.tiny_models import CASES, generate, toy_config


def test_entry_point_is_registered():
    (ep,) = [ep for ep in entry_points(group="torch_dynamo_backends") if ep.name == "stepcache"]
    assert ep.value == "cachepass.backend:stepcache"


def test_string_backend_without_importing_cachepass():
    code = """
import sys, torch
from torch import nn
assert "cachepass" not in sys.modules

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix, self.mod = nn.Linear(16, 16), nn.Linear(16, 16)
    def forward(self, x, temb):
        return x + torch.tanh(self.mix(x) * self.mod(temb)[:, None])

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(4))
    def forward(self, x, t):
        for block in self.blocks:
            x = block(x, t)
        return x

torch.manual_seed(0)
model = Model().eval()
compiled = torch.compile(model, backend="stepcache", fullgraph=True, dynamic=False,
                         options={"config": {"num_head_blocks": 2, "threshold": 0.05}, "inner": "eager"})
x, t = torch.randn(1, 8, 16), torch.randn(1, 16)
with torch.no_grad():
    torch.testing.assert_close(compiled(x, t), model(x, t))
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
        generate(case, cachepass.compile(case.model(), cfg, inner="eager", scope="model"), 2)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("cachepass")]
    assert any(m.startswith("cache unit transformer_blocks: 4 blocks, head range(0, 1) middle range(1, 4)") for m in messages)
    assert any(m.startswith("outline_middle_blocks: single_transformer_blocks:") and "stepcache_unit_1" in m for m in messages)
    assert any(m.startswith("insert_cache_cond: 2 units -> 2 conds") for m in messages)
    assert any("stepcache: 2 cache unit(s) (transformer_blocks, single_transformer_blocks)" in m for m in messages)


def test_compiling_a_compiled_module_compiles_its_original_with_the_new_options(caplog):
    """A cell run twice, or a module torch.compile'd first: cachepass compiles the original module with the options
    given now (the result equals a compile of the original with them) and says that it did."""
    import torch

    case = CASES["wan"]
    model = case.model()
    first = toy_config(threshold=0.0, num_inference_steps=6)  # never caches
    second = toy_config(threshold=case.threshold * 3, num_inference_steps=6)
    expected = generate(case, cachepass.compile(case.model(), second, inner="aot_eager"), 6)
    for wrapped, how in ((cachepass.compile(model, first, inner="aot_eager"), "cachepass.compile"),
                         (torch.compile(model, backend="eager"), "torch.compile")):
        with caplog.at_level(logging.WARNING, logger="cachepass"):
            again = cachepass.compile(wrapped, second, inner="aot_eager")
        assert f"already compiled by {how}; compiling its original module" in caplog.text
        caplog.clear()
        assert torch.equal(generate(case, again, 6), expected)
        assert any(u.cached_steps for u in cachepass.stats(again))
