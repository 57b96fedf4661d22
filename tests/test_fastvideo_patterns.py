"""Patterns from FastVideo's own Wan DiT: a carried state that stays transposed, and attention behind
``torch.compiler.disable``."""

from __future__ import annotations

import functools
import logging

import pytest
import torch
from torch import nn

import cachepass
from cachepass import CachepassError, StepCacheConfig
from cachepass.demo.sampling import sample
from cachepass.reference import StepCacheReference

STEPS = 8


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)
        self.mod = nn.Linear(dim, dim)

    def forward(self, x, temb):
        return x + torch.tanh(self.lin(self.norm(x))) * self.mod(temb)[:, None]


class TransposedTokens(nn.Module):
    """Tokens are ``patch(x).transpose(1, 2)``, never made contiguous (FastVideo's ``flatten(2).transpose(1, 2)``):
    every block keeps the transposed layout of the carried hidden state."""

    def __init__(self, dim: int = 32, depth: int = 4):
        super().__init__()
        self.patch = nn.Conv1d(4, dim, 1)
        self.time = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, 4)

    def forward(self, hidden_states, timestep):
        x = self.patch(hidden_states).transpose(1, 2)
        temb = self.time(timestep[:, None] / 1000)
        for block in self.blocks:
            x = block(x, temb)
        return self.out(x).transpose(1, 2)


def run(fn):
    latents = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))
    return sample(lambda x, sigma, kw: fn(x, (sigma * 1000).reshape(1)), latents, {}, None, STEPS)


def test_transposed_carried_state_compiles_under_inductor_as_one_block(caplog):
    """Inductor used to fail the cond's stride assertion on the transposed operand (expected stride 32==1); and
    the head blocks (transposed input) and the tail blocks (the cond's contiguous output) compiled apart."""
    cfg = StepCacheConfig(num_head_blocks=1, threshold=0.3, warmup_steps=1, num_inference_steps=STEPS)
    torch.manual_seed(0)
    model = TransposedTokens().eval()
    with caplog.at_level("INFO", logger="cachepass"):
        out = run(cachepass.compile(model, cfg, inner="inductor", scope="model"))
    assert "blocks.0 takes hidden states of strides (512, 1, 16)" in caplog.text and "copied contiguous" in caplog.text
    assert "block: 1 compiled for 4 pieces" in caplog.text
    reference = StepCacheReference(model, cfg)
    torch.testing.assert_close(out, run(reference), atol=1e-4, rtol=1e-4)
    assert cachepass.stats(model)[0].cached_steps == cachepass.stats(reference)[0].cached_steps != []


class DisabledAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    @torch.compiler.disable
    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ self.proj(x)


class AttentionBlock(Block):
    def __init__(self, dim: int):
        super().__init__(dim)
        self.attn = DisabledAttention(dim)

    def forward(self, x, temb):
        return super().forward(x + self.attn(x), temb)


def test_compiler_disabled_attention_is_named_with_the_fix():
    model = TransposedTokens()
    model.blocks = nn.ModuleList(AttentionBlock(32) for _ in range(4))
    with pytest.raises(CachepassError, match=r"blocks\.0\.attn \(DisabledAttention\)\.forward is wrapped in "
                                             r"torch\.compiler\.disable.*FASTVIDEO_DISABLE_ATTENTION_COMPILE=0"):
        cachepass.compile(model, StepCacheConfig(num_head_blocks=1))


def maybe_compiler_disable(fn):
    """FastVideo 0.2's ``fastvideo.attention.layer._maybe_compiler_disable``: ``forward`` is a dispatcher that runs
    a ``torch.compiler.disable``d copy unless the instance opted in."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def dispatch(self, *args, **kwargs):
        if self._compile_forward_enabled:
            return fn(self, *args, **kwargs)
        return disabled(self, *args, **kwargs)

    return dispatch


class DispatchedAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self._compile_forward_enabled = False  # FastVideo's default (FASTVIDEO_DISABLE_ATTENTION_COMPILE unset)

    @maybe_compiler_disable
    def forward(self, x):
        return torch.softmax(x @ x.transpose(1, 2), dim=-1) @ self.proj(x)


class DispatchedAttentionBlock(AttentionBlock):
    def __init__(self, dim: int):
        super().__init__(dim)
        self.attn = DispatchedAttention(dim)


def test_an_attention_dispatcher_to_a_disabled_copy_is_named_with_the_fix_and_compiles_once_opted_in():
    cfg = StepCacheConfig(num_head_blocks=1, threshold=0.3, warmup_steps=1, num_inference_steps=STEPS)
    torch.manual_seed(0)
    model = TransposedTokens().eval()
    model.blocks = nn.ModuleList(DispatchedAttentionBlock(32) for _ in range(4))
    with pytest.raises(CachepassError, match=r"blocks\.0\.attn \(.*DispatchedAttention\)\.forward runs a torch\.compiler"
                                             r"\.disable'd copy of itself unless the instance's _compile_forward_enabled "
                                             r"is set.*_enable_regional_attention_compile\(transformer\)"):
        cachepass.compile(model, cfg)
    for block in model.blocks:  # what fastvideo's _enable_regional_attention_compile does
        block.attn._compile_forward_enabled = True
    out = run(cachepass.compile(model, cfg, inner="aot_eager"))
    torch.testing.assert_close(out, run(StepCacheReference(model, cfg)), atol=1e-5, rtol=1e-5)


def test_fastvideo_dit_offload_is_refused_with_the_fix():
    """FastVideo attaches its layerwise offload as a forward hook in a ``_hook_manager`` on each block (on by
    default), and dit_cpu_offload wraps the model in FSDP: either is refused, with or without offload=, naming the
    FastVideo settings to turn off and cachepass's own offload."""
    import types

    from bench.tiny_models import CASES, toy_config

    model = CASES["toy"].model()
    model.blocks[2]._hook_manager = types.SimpleNamespace(forward_hooks={"LayerwiseOffloadHook": object()})
    for offload in (None, {"budget": "1GB", "allow_cpu": True}):
        with pytest.raises(cachepass.CachepassError, match=r"blocks.2 is offloaded by FastVideo's LayerwiseOffloadHook "
                                                           r"\(dit_layerwise_offload\): turn FastVideo's DiT offload off"):
            cachepass.compile(model, toy_config(), offload=offload)
    fsdp_class = type("FSDPToyDiT", (type(CASES["toy"].model()),), {})
    sharded = CASES["toy"].model()
    sharded.__class__ = fsdp_class
    with pytest.raises(cachepass.CachepassError, match=r"managed by FSDP \(FSDPToyDiT; FastVideo's dit_cpu_offload\)"):
        cachepass.compile(sharded, toy_config())


_TABLES: dict[int, torch.Tensor] = {}  # FastVideo's _ROTARY_POS_EMBED_CACHE: filled by the first call at each size


class CachedTable(TransposedTokens):
    def forward(self, hidden_states, timestep):
        key = hidden_states.shape[-1]
        if key not in _TABLES:
            _TABLES[key] = torch.linspace(0, 1, key, dtype=torch.float64)
        return super().forward(hidden_states + _TABLES[key].to(hidden_states.device).float(), timestep)


def test_a_table_cache_filled_by_the_first_call_gives_two_graphs_and_the_reference_results(caplog):
    """The first call traces with the cache empty, the second with the table as an input: two graphs in the
    first CFG pair, yet one generation for the clock (the reference's steps and latents, no warning)."""
    cfg = StepCacheConfig(num_head_blocks=1, num_tail_blocks=1, threshold=0.5, warmup_steps=2, separate_cfg=True,
                          num_inference_steps=STEPS)
    latents = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0))

    def generate(fn):
        return sample(lambda x, sigma, kw: fn(x, (sigma * 1000).reshape(1)), latents, {}, {}, STEPS)

    torch.manual_seed(0)
    model = CachedTable().eval()
    torch.manual_seed(0)
    reference = StepCacheReference(CachedTable().eval(), cfg)
    _TABLES.clear()
    torch._dynamo.reset()
    compiled = cachepass.compile(model, cfg, inner="aot_eager", max_shapes=2, scope="model")
    with torch.no_grad(), caplog.at_level("INFO", logger="cachepass"):
        for _ in range(2):
            torch.testing.assert_close(generate(compiled), generate(reference), atol=1e-5, rtol=1e-5)
            assert cachepass.stats(model)[0].cached_steps == cachepass.stats(reference)[0].cached_steps != []
    assert caplog.text.count("cache unit(s)") == 2  # the backend ran for two graphs
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


class DenoisingStage:
    """The shape of FastVideo's ``DenoisingStage`` (``fastvideo.pipelines.stages.denoising``): it holds the DiT
    (Wan 2.2: two experts, the high-noise one above ``boundary_ratio`` of the training timesteps) and its
    ``forward(batch, fastvideo_args)`` runs the whole loop over ``batch.timesteps``, with no reset call."""

    def __init__(self, transformer, transformer_2):
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.scheduler = type("Scheduler", (), {"num_train_timesteps": 1000})()

    def forward(self, batch, fastvideo_args):
        x = batch.latents
        for t in batch.timesteps:
            high = t >= batch.boundary_ratio * self.scheduler.num_train_timesteps
            x = x - 0.05 * (self.transformer if high else self.transformer_2)(x, t.reshape(1))
        return x


DenoisingStage.__module__ = "fastvideo.pipelines.stages.denoising"


def test_a_fastvideo_stage_gives_each_expert_its_share_of_each_calls_steps():
    """``cachepass.compile(stage)``: both experts compiled in place; each ``forward`` is one generation, each expert
    running its share of the batch's steps at the boundary (checked against a 4-entry static mask: 8 steps split
    4 + 4 run and cache the masked step; 10 steps split 5 + 5 is refused, naming both experts' counts)."""
    from types import SimpleNamespace

    cfg = StepCacheConfig(num_head_blocks=1, num_tail_blocks=0, warmup_steps=1, num_inference_steps=4,
                          steps_computation_mask=[1, 1, 0, 1], steps_computation_policy="static", separate_cfg=False)
    torch.manual_seed(0)
    high, low = TransposedTokens().eval(), TransposedTokens().eval()
    stage = DenoisingStage(high, low)
    assert cachepass.compile(stage, cfg, inner="aot_eager") is stage
    assert type(stage).__name__ == "DenoisingStage" and stage.transformer is not high and stage.transformer_2 is not low

    def batch(steps):
        timesteps = torch.linspace(1000, 0, steps + 1)[:-1]
        return SimpleNamespace(latents=torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(0)),
                               timesteps=timesteps, num_inference_steps=steps, boundary_ratio=0.55)

    with torch.no_grad():
        for _ in range(2):  # a second generation with no reset
            stage.forward(batch(8), SimpleNamespace())
            assert [u.cached_steps for u in cachepass.stats(high) + cachepass.stats(low)] == [[2], [2]]
            assert [u.warnings for u in cachepass.stats(high) + cachepass.stats(low)] == [[], []]
            by_expert = cachepass.stats(stage)  # a stage's stats: each expert's by its attribute name
            assert {name: [u.cached_steps for u in units] for name, units in by_expert.items()} == \
                {"transformer": [[2]], "transformer_2": [[2]]}
        with pytest.raises(CachepassError, match="4 entries.*runs 5 steps on transformer, 5 steps on transformer_2"):
            stage.forward(batch(10), SimpleNamespace())
    assert cachepass.release(stage) == 0  # a stage is accepted like a pipeline (no CUDA graphs on the CPU)
    # compiled again (a cell run twice): the originals compiled anew, one generation per forward still
    assert cachepass.compile(stage, cfg, inner="aot_eager") is stage and type(stage).__name__ == "DenoisingStage"
    with torch.no_grad():
        stage.forward(batch(8), SimpleNamespace())
    assert {name: [u.cached_steps for u in units] for name, units in cachepass.stats(stage).items()} == \
        {"transformer": [[2]], "transformer_2": [[2]]}


def test_each_distinct_dit_of_the_stages_is_found_once_by_name():
    """Two denoising stages sharing one expert and holding another DiT under a taken name: three DiTs, each once
    (each gets compiled), the later one named by its stage."""
    from types import SimpleNamespace

    from cachepass.fastvideo_stages import dits

    high, low, other = TransposedTokens(), TransposedTokens(), TransposedTokens()
    pipeline = SimpleNamespace(_stages=[DenoisingStage(high, low), DenoisingStage(other, low)])
    found = dits(pipeline)
    assert list(found) == ["transformer", "transformer_2", "stages[1].transformer"]
    assert [found[k] for k in found] == [high, low, other]
