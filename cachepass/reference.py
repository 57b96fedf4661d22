"""The eager oracle: cache-dit 1.5's DBCache + TaylorSeer, stated plainly in Python.

    ref = cachepass.reference.StepCacheReference(transformer, config)
    out = ref(**inputs)             # same call signature as the model
    cachepass.stats(ref)            # same structure as for a compiled model

Any model with a repeated block list works: Dynamo captures the graph once per input signature
(nothing is compiled; the graph runs eagerly), the same analysis as the compiled path outlines the
middle blocks, and each cache unit's decision runs here in Python, with ``.item()`` and lists, the
way cache-dit's ``CachedContextManager`` does. The compiled path must agree with this module and
with cache-dit itself; the tests check both.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from cachepass.analysis.timestep import find_timestep_input, follows, latents_sample
from cachepass.config import MaskPolicy, StepCacheConfig
from cachepass.errors import CachepassError
from cachepass.options import coerce_config
from cachepass.pipeline import outline
from cachepass.state.runtime import UnitStats
from cachepass.unit import UnitSpec


class StepCacheReference(nn.Module):
    """Wraps a model; calls run it with DBCache + TaylorSeer decided eagerly in Python."""

    def __init__(self, model: nn.Module, config: Any):
        super().__init__()
        self.model = model
        self.config = coerce_config(config)
        self._graphs: list[_GraphState] = []
        self._last: _GraphState | None = None
        self._traced = torch.compile(model, backend=self._capture, fullgraph=True, dynamic=False)

    def forward(self, *args, **kwargs):
        return self._traced(*args, **kwargs)

    def _capture(self, gm, example_inputs):
        gm, units, _ = outline(gm, self.config)
        clock = GenerationClock(self.config)
        reference_units = []
        for spec in units:
            unit = ReferenceUnit(spec, gm.get_submodule(spec.module_name).compute, self.config, clock)
            setattr(gm, spec.module_name, unit)
            reference_units.append(unit)
        graph_state = _GraphState(clock, reference_units)
        self._graphs.append(graph_state)
        timestep = find_timestep_input(gm, self.config)
        placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        timestep_index = placeholders.index(timestep.placeholder) if timestep else None
        latents_index = placeholders.index(timestep.latents) if timestep and timestep.latents else None

        sample_ids = torch.arange(timestep.sample_size) if timestep else None

        def run(*args):
            t = None if timestep_index is None else float(args[timestep_index].double().amax())
            latents = None if latents_index is None else args[latents_index].double()
            clock.advance(t, None if latents is None else (float(latents.sum()), float((latents * latents).sum())),
                          None if latents is None else latents_sample(latents, latents.numel(), sample_ids.to(latents.device)))
            self._last = graph_state
            return gm(*args)

        return run

    def stepcache_stats(self) -> list[UnitStats]:
        if self._last is None:
            raise CachepassError("StepCacheReference has not been called yet")
        if self._last.clock.calls == 0:  # reset, next call starts a new generation
            return [UnitStats(unit.spec.name, [], {}, [], {}) for unit in self._last.units]
        return [unit.stats() for unit in self._last.units]

    def stepcache_reset(self) -> None:
        for graph_state in self._graphs:
            graph_state.clock.calls = 0


@dataclasses.dataclass
class _GraphState:
    clock: "GenerationClock"
    units: list["ReferenceUnit"]


class GenerationClock:
    """Which generation, step and CFG stream a call is: the compiled clock's rule (see insert_cache_cond).

    A call whose timestep is below the last one, with latents that continue the last call's, is the
    next step; with separate CFG, a call at the same timestep and with the same latents right after a
    step's first call is its partner; any other call starts a new generation. Without a timestep, the
    position in a run of ``num_inference_steps`` steps counts.
    """

    def __init__(self, config: StepCacheConfig):
        self.config = config
        self.calls = 0  # since reset
        self.step = self.stream = 0
        self.first_call = True
        self.pending = False
        self.last_t = 0.0
        self.last_latents: tuple[float, float] | None = None  # sum and sum of squares: CFG partners share them
        self.last_sample: torch.Tensor | None = None  # strided latents: a step's latents continue the last call's

    def advance(self, timestep: float | None, latents: tuple[float, float] | None,
                sample: torch.Tensor | None = None) -> None:
        cfg = self.config
        if timestep is None:
            position = self.calls % (cfg.num_inference_steps * cfg.num_streams) if cfg.num_inference_steps else self.calls
            timestep = -float(position // cfg.num_streams)
        fresh = self.calls == 0
        same = not fresh and timestep == self.last_t
        partner = cfg.separate_cfg and self.pending and same and (latents is None or latents == self.last_latents)
        continues = not fresh and (sample is None or bool(follows(sample, self.last_sample)))
        self.last_latents, self.last_sample = latents, sample
        self.first_call = fresh or timestep > self.last_t or (same and not partner) or \
            (timestep < self.last_t and not continues)
        self.step = 0 if self.first_call else self.step if partner else self.step + 1
        # the first call of a step is the conditional stream unless the CFG call comes first
        self.stream = int(partner) ^ int(cfg.cfg_compute_first)
        self.pending = cfg.separate_cfg and not partner
        self.last_t = timestep
        self.calls += 1


class TaylorSeer:
    """cache-dit's ``TaylorSeerState`` for one stream and one carried value.

    Created at the first computed step, when its counter ``t`` starts at -1: ``t`` is the
    denoising step minus one, and derivatives exist only from ``t > 1`` on (cache-dit's rule).
    """

    def __init__(self, order: int):
        self.order = order
        self.t = -1
        self.last_computed_t = -1
        self.terms: list[torch.Tensor | None] = [None] * (order + 1)

    def mark_step_begin(self) -> None:
        self.t += 1

    def update(self, y: torch.Tensor) -> None:
        previous = self.terms
        window = self.t - self.last_computed_t
        terms: list[torch.Tensor | None] = [None] * (self.order + 1)
        terms[0] = y
        for i in range(self.order):
            if previous[i] is None or self.t <= 1:
                break
            terms[i + 1] = (terms[i] - previous[i]) / window
        self.terms = terms
        self.last_computed_t = self.t

    def approximate(self) -> torch.Tensor:
        elapsed = self.t - self.last_computed_t
        output = 0
        for i, term in enumerate(self.terms):
            if term is None:
                break
            output = output + (1 / math.factorial(i)) * term * (elapsed**i)
        return output


class _Stream:
    """What cache-dit's context keeps per CFG stream, for one cache unit."""

    def __init__(self):
        self.prev_residual: torch.Tensor | None = None
        self.residuals: dict[int, torch.Tensor] = {}  # slot -> middle residual (no TaylorSeer)
        self.taylor: dict[int, TaylorSeer] = {}  # slot -> TaylorSeer state
        self.cached_steps: list[int] = []
        self.residual_diffs: dict[str, float] = {}
        self.streak = 0
        self.accumulated_diff = 0.0


class ReferenceUnit(nn.Module):
    """One cache unit: the decision of cache-dit's ``can_cache`` and the residual / TaylorSeer reuse."""

    def __init__(self, spec: UnitSpec, compute: nn.Module, config: StepCacheConfig, clock: GenerationClock):
        super().__init__()
        self.spec, self.compute, self.config, self.clock = spec, compute, config, clock
        self.streams = [_Stream() for _ in range(config.num_streams)]

    def order(self, role: str) -> int:
        cfg = self.config
        return cfg.taylorseer_order if role == "hidden" else cfg.resolved_encoder_taylorseer_order

    def forward(self, hidden_in: torch.Tensor, *region_inputs):
        clock = self.clock
        if clock.first_call:
            self.streams = [_Stream() for _ in range(self.config.num_streams)]
        stream = self.streams[clock.stream]
        step = clock.step
        if not stream.cached_steps or stream.cached_steps[-1] != step - 1:
            stream.streak = 0  # a computed step breaks the streak
        for taylor in stream.taylor.values():
            taylor.mark_step_begin()
        residual = region_inputs[self.spec.hidden.input_position] - hidden_in
        if self._can_cache(stream, residual):
            stream.cached_steps.append(step)
            stream.streak += 1
            return tuple(self._approximate(stream, slot.slot) + region_inputs[slot.input_position]
                         for slot in self.spec.slots)
        stream.prev_residual = residual
        outputs = self.compute(*region_inputs)
        for slot, out in zip(self.spec.slots, outputs):
            self._store(stream, slot.slot, slot.role, out - region_inputs[slot.input_position])
        return outputs

    def _can_cache(self, stream: _Stream, residual: torch.Tensor) -> bool:
        cfg, step = self.config, self.clock.step
        if step in cfg.warmup_step_indices:
            return False
        mask = cfg.steps_computation_mask
        if mask is not None:
            if step < len(mask) and mask[step] == 1:
                return False
            if cfg.steps_computation_policy is MaskPolicy.STATIC:
                return True
        if cfg.max_cached_steps is not None and len(stream.cached_steps) >= cfg.max_cached_steps:
            return False
        if cfg.max_continuous_cached_steps is not None and stream.streak >= cfg.max_continuous_cached_steps:
            return False
        if cfg.max_accumulated_residual_diff is not None and stream.accumulated_diff >= cfg.max_accumulated_residual_diff:
            return False
        if cfg.threshold <= 0 or stream.prev_residual is None:
            return False
        if cfg.threshold >= 1:
            self._record_diff(stream, -1.0)
            return True
        conditional = self.streams[0].residual_diffs
        if cfg.separate_cfg and not cfg.cfg_diff_compute_separate and self.clock.stream == 1 and str(step) in conditional:
            diff = conditional[str(step)]
        else:
            prev = stream.prev_residual
            diff = ((prev - residual).abs().mean() / prev.abs().mean()).item()
        self._record_diff(stream, diff)
        return diff < cfg.threshold

    def _record_diff(self, stream: _Stream, diff: float) -> None:
        stream.residual_diffs[str(self.clock.step)] = diff
        if diff > 0:
            stream.accumulated_diff += diff

    def _store(self, stream: _Stream, slot: int, role: str, residual: torch.Tensor) -> None:
        order = self.order(role)
        if order == 0:
            stream.residuals[slot] = residual
            return
        if slot not in stream.taylor:
            stream.taylor[slot] = TaylorSeer(order)
        stream.taylor[slot].update(residual)

    def _approximate(self, stream: _Stream, slot: int) -> torch.Tensor:
        if slot in stream.taylor:
            return stream.taylor[slot].approximate()
        return stream.residuals[slot]

    def stats(self) -> UnitStats:
        conditional = self.streams[0]
        unconditional = self.streams[1] if len(self.streams) > 1 else _Stream()
        return UnitStats(
            name=self.spec.name,
            cached_steps=list(conditional.cached_steps),
            residual_diffs=dict(conditional.residual_diffs),
            cfg_cached_steps=list(unconditional.cached_steps),
            cfg_residual_diffs=dict(unconditional.residual_diffs),
        )
