"""Block discovery and outlining: what the pass finds in each model, and the errors on models it cannot cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cachepass
from bench import tiny_models as models
from bench.tiny_models import CASES
from cachepass import BlockDiscoveryError, CachepassError, StepCacheConfig, UnsupportedGraphError
from cachepass.api import capture_graph
from cachepass.pipeline import outline
from cachepass.unit import OutlinedUnit

EXPECTED_UNITS = {
    "toy": [("blocks", 6, ["hidden"])],
    "wan": [("blocks", 5, ["hidden"])],
    "flux": [("transformer_blocks", 4, ["hidden", "encoder"]), ("single_transformer_blocks", 4, ["encoder", "hidden"])],
    "hunyuan": [
        ("transformer_blocks", 4, ["hidden", "encoder"]),
        ("single_transformer_blocks", 4, ["hidden", "encoder"]),
    ],
    "sd3": [("transformer_blocks", 4, ["hidden", "encoder"])],
}


def case_args(case):
    latents, cond, _ = case.inputs(torch.Generator().manual_seed(0))
    calls = []
    case.call(lambda **kw: calls.append(kw) or (torch.zeros(1),), latents, torch.tensor(0.5), cond)
    return calls[0]


@pytest.mark.parametrize("name", list(EXPECTED_UNITS))
def test_explain_reports_units_ranges_and_carried_values(name):
    case = CASES[name]
    cfg = StepCacheConfig(num_head_blocks=1, num_tail_blocks=1, separate_cfg=True)
    report = cachepass.explain(case.model(), config=cfg, **case_args(case))
    got = [(u.name, len(u.block_paths), [s.role for s in u.slots]) for u in report.units]
    assert got == EXPECTED_UNITS[name]
    for unit in report.units:
        n = len(unit.block_paths)
        assert (unit.head, unit.middle, unit.tail) == (range(0, 1), range(1, n - 1), range(n - 1, n))
        assert unit.block_paths[0] == f"{unit.name}.0"
        hidden = unit.hidden
        assert report.state_bytes[unit.name] >= 2 * 2 * hidden.nbytes  # prev residual + residual, 2 streams
    text = str(report)
    assert "middle blocks 1.." in text and "carried hidden" in text
    assert report.timestep.name == "timestep" and "timestep input: timestep (" in text
    assert report.plan.blocks == [path for unit in report.units for path in unit.block_paths]
    assert "piecewise plan (block: " in text and "if compute:" in text
    if name == "hunyuan":
        assert report.skipped == ["context_embedder.token_refiner.refiner_blocks "
                                  "(2 x HunyuanVideoIndividualTokenRefinerBlock): nested below the trunk"]


def test_hidden_slot_is_the_image_stream_in_two_stream_models():
    case = CASES["flux"]
    cfg = StepCacheConfig(num_head_blocks=1, num_tail_blocks=1)
    report = cachepass.explain(case.model(), config=cfg, **case_args(case))
    for unit in report.units:
        assert unit.hidden.shape == (1, 16, 16)  # 16 image tokens; the text stream has 5
        assert [s.shape for s in unit.slots if s.role == "encoder"] == [(1, 5, 16)]


@pytest.mark.parametrize("name", list(EXPECTED_UNITS))
def test_outlined_graph_computes_what_the_model_computes(name):
    case = CASES[name]
    model = case.model()
    kwargs = case_args(case)
    outlined, units, _ = outline(capture_graph(model, **kwargs), StepCacheConfig(num_head_blocks=1, num_tail_blocks=1))
    assert len([m for m in outlined.modules() if isinstance(m, OutlinedUnit)]) == len(units)
    # Re-run Dynamo with a backend that swaps in the outlined graph: same outputs as eager.
    with torch.no_grad():
        expected = model(**kwargs)
        got = torch.compile(model, backend=lambda g, ex: outline(g, StepCacheConfig(num_head_blocks=1, num_tail_blocks=1))[0]
                            .forward, fullgraph=True)(**kwargs)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------- models that cannot be cached
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Block(nn.Module):
    def __init__(self, grow: bool = False, inplace: bool = False):
        super().__init__()
        self.lin, self.grow, self.inplace = nn.Linear(8, 8), grow, inplace

    def forward(self, x):
        if self.inplace:
            x += self.lin(x)
            return x
        y = x + self.lin(x)
        return torch.cat([y, y[:, :1]], dim=1) if self.grow else y


class CountingBlock(Block):
    """A block that counts its calls in a buffer of its own, in place."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(1))

    def forward(self, x):
        self.calls.add_(1)
        return x + self.lin(x) * self.calls


class Stack(nn.Module):
    def __init__(self, depth=4, collect=False, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(Block(**block_kwargs) for _ in range(depth))
        self.collect = collect

    def forward(self, x):
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return x + sum(features) if self.collect else x


def compile_error(model, cfg=None, x=None):
    cfg = cfg or StepCacheConfig(num_head_blocks=1)
    with pytest.raises(Exception) as e, torch.no_grad():
        cachepass.compile(model, cfg, inner="eager")(torch.randn(1, 4, 8) if x is None else x)
    error = getattr(e.value, "inner_exception", e.value)  # Dynamo wraps backend errors
    assert isinstance(error, cachepass.CachepassError), f"{type(e.value).__name__}: {e.value}"
    return error


def test_model_without_repeated_blocks():
    error = compile_error(Plain())
    assert isinstance(error, BlockDiscoveryError)
    assert "no repeated block list found" in str(error) and "['a', 'b']" in str(error)


@pytest.mark.parametrize("head,tail", [(4, 0), (3, 1), (1, 3)])
def test_head_plus_tail_must_leave_a_middle_block(head, tail):
    error = compile_error(Stack(depth=4), StepCacheConfig(num_head_blocks=head, num_tail_blocks=tail))
    assert isinstance(error, BlockDiscoveryError)
    assert f"blocks has 4 blocks but num_head_blocks={head} + num_tail_blocks={tail}" in str(error)
    assert "<= 3" in str(error)


def test_carried_value_that_changes_shape():
    error = compile_error(Stack(grow=True))
    assert isinstance(error, UnsupportedGraphError)
    assert "changes shape" in str(error) and "blocks.1 input" in str(error) and "blocks.3 output" in str(error)


def test_middle_blocks_whose_outputs_are_used_elsewhere():
    error = compile_error(Stack(collect=True))
    assert isinstance(error, UnsupportedGraphError)
    assert "middle region of blocks (blocks 1..3) exports" in str(error)


def test_middle_block_that_mutates_its_input_in_place():
    error = compile_error(Stack(inplace=True))
    assert isinstance(error, UnsupportedGraphError)
    assert "mutates" in str(error) and "middle region of blocks" in str(error)


def test_middle_block_that_mutates_its_own_buffer_in_place():
    """A block weight the middle blocks change in place is computed outside the region, bound as a weight or not: a
    cached step would skip the change, so the model is refused."""
    model = Stack()
    model.blocks = nn.ModuleList(CountingBlock() for _ in range(4))
    error = compile_error(model)
    assert isinstance(error, UnsupportedGraphError)
    assert "mutates" in str(error) and "middle region of blocks" in str(error)


class LastBlock(Block):
    """A subclass for the last block only, computing the same thing."""


def test_a_last_block_of_a_subclass_is_cached():
    model = Stack()
    model.blocks[3] = LastBlock()
    report = cachepass.explain(model, torch.randn(1, 4, 8), config=StepCacheConfig(num_head_blocks=1))
    assert [(u.name, u.block_class, len(u.block_paths)) for u in report.units] == [("blocks", "Block", 4)]


def test_blocks_of_different_classes_in_the_middle_are_named():
    model = Stack()
    model.blocks[1] = LastBlock()
    error = compile_error(model)
    assert "blocks.0: Block, blocks.1: LastBlock, blocks.2: Block" in str(error)


class BreaksInBlocks(Stack):
    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            torch._dynamo.graph_break()
        return x


def test_a_graph_break_is_named_as_the_cause():
    compiled = torch.compile(BreaksInBlocks(), backend="stepcache", dynamic=False,
                             options={"config": StepCacheConfig(num_head_blocks=1), "inner": "eager"})
    with pytest.raises(Exception) as e, torch.no_grad():
        compiled(torch.randn(1, 4, 8))
    assert "a graph break may have cut the model (compile with fullgraph=True" in str(e.value)


def test_unit_names_stay_readable_when_a_diffusers_hook_wraps_the_forward():
    """diffusers hooks (context parallel, cache hooks) replace the model's forward: Dynamo then traces from
    the hook, and module paths start at ``L['function_reference'].forward.__self__``."""
    from diffusers.hooks import HookRegistry, ModelHook

    case = CASES["wan"]
    model = case.model()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ModelHook(), "passthrough")
    report = cachepass.explain(model, config=StepCacheConfig(num_head_blocks=1), **case_args(case))
    assert [u.name for u in report.units] == ["blocks"]
    assert report.units[0].block_paths[0] == "blocks.0"


def test_collectives_without_a_gather_of_the_hidden_states_need_the_group_named(tmp_path):
    """Collectives in the graph mean the model runs over several ranks; with no all_gather of the last block's
    hidden states, which ranks share a sample's tokens is unknown: a clear error naming the option, not per-rank
    decisions (which could hang the ranks) or WORLD. None says the model is not sharded: refused with the reason."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    class AllReduced(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            return funcol.all_reduce(self.inner(*args, **kwargs), "sum", dist.group.WORLD)

    case = CASES["toy"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        model = AllReduced(case.model())
        with pytest.raises(
            CachepassError,
            match=r"the graph has collectives \(_c10d_functional\.all_reduce, .*\) but "
            r"no "
            r"all_gather of the last block's hidden states.*sequence_parallel_group",
        ):
            cachepass.explain(model, config=StepCacheConfig(num_head_blocks=1), **case_args(case))
        with pytest.raises(UnsupportedGraphError, match=r"the graph has collectives .*would differ between ranks and "
                                                        r"hang them"):
            cachepass.explain(model, config=StepCacheConfig(num_head_blocks=1), sequence_parallel_group=None,
                              **case_args(case))
        with pytest.raises(ValueError, match=r"sequence_parallel_group='world' is invalid; allowed: 'auto', None"):
            cachepass.compile(model, StepCacheConfig(num_head_blocks=1), sequence_parallel_group="world")
    finally:
        dist.destroy_process_group()


def test_a_shard_split_opening_the_first_block_runs_before_it(caplog):
    """diffusers' CP splits Wan's hidden states in a pre-hook of blocks.0 (a chunk + constant getitem inside the
    first block, absent from the others): the split moves out of the block, so the head input is the shard and
    the carried state keeps its shape. A block list whose every block opens with a chunk keeps it."""
    from diffusers.hooks import HookRegistry, ModelHook

    class FirstHalfOfTokens(ModelHook):
        def pre_forward(self, module, hidden_states, *args, **kwargs):
            return (hidden_states.chunk(2, dim=1)[0], *args), kwargs

    case = CASES["toy"]
    model = case.model()
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(FirstHalfOfTokens(), "shard")
    with caplog.at_level("INFO", logger="cachepass"):
        report = cachepass.explain(model, config=StepCacheConfig(num_head_blocks=1), **case_args(case))
    assert "blocks.0 opens with a split of" in caplog.text
    (unit,) = report.units
    assert unit.block_paths[0] == "blocks.0" and unit.hidden.shape == (1, 8, 32)

    class ChunkFirst(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.inner = models.ToyBlock(dim)

        def forward(self, hidden_states, encoder_hidden_states, temb):
            shift, scale = temb.chunk(2, dim=-1)  # every block opens with a split of an outside value
            return self.inner(hidden_states * (1 + scale.mean()) + shift.mean(), encoder_hidden_states, temb)

    model = case.model()
    model.blocks = nn.ModuleList(ChunkFirst(32) for _ in model.blocks)
    caplog.clear()
    with caplog.at_level("INFO", logger="cachepass"):
        report = cachepass.explain(model, config=StepCacheConfig(num_head_blocks=1), **case_args(case))
    assert "opens with a split" not in caplog.text
    assert report.units[0].hidden.shape == (1, 16, 32)
