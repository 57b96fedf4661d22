"""The cache state's layout, fixed at compile time: every state tensor's name, shape, dtype and fill.

Every piece of state is a tensor on the model's device whose shape is fixed at compile time; the
compiled graph takes them as extra inputs and updates them in place, so nothing per call is a
Python value Dynamo could guard on. Per CFG stream state is stacked along a leading stream axis.

Layout (S streams, C = step capacity = num_inference_steps, or 1024 without it):

    clock.calls                  []            calls since the state was made or reset (0: fresh)
    clock.{step,pending,last_t}  []            step, CFG partner due, timestep of the last call
    clock.last_latents           [2]           sum and sum of squares of the last call's latents
    clock.last_sample            [L]           an evenly strided sample of the last call's latents (L = 4096 with
                                               a latents input, else 0)
    clock.sample_ids             [L]           0 .. L - 1: which of them (`cachepass.analysis.timestep.latents_sample`)
    clock.report                 [2]           [Mismatch flags (sticky), steps of the last generation that ended early]
    schedule.{warmup,mask_compute,mask_static}  [C+1]  per-step constants from the config
    schedule.num_steps           []            steps per generation (0: not known); a pipeline call sets it
    schedule.{stream_ids,step_ids}              [S], [C+1]
    u{i}.prev_residual           [S, *hidden]  head residual of the last computed step (only where the config
                                               compares residuals: `StepCacheConfig.compares_residuals`)
    u{i}.last_compute_step       [S]           the step each stream last computed (TaylorSeer's elapsed steps)
    u{i}.has_prev                [S]           a computed step since the generation began (the threshold path only)
    u{i}.{cached_count,streak,last_cached_step,accumulated_diff}  [S]  what the budgets read, kept for the budgets
                                               the config sets (max_cached_steps, max_continuous_cached_steps,
                                               max_accumulated_residual_diff)
    u{i}.{cached_flags,diffs}    [S, C+1]      per-step record for stats (column C is scratch)
    u{i}.slot{k}.terms           [S, K+1, *shape]  TaylorSeer terms dY(0..K) (K=0: plain residual)
    u{i}.slot{k}.valid           [S, K+1]      which terms exist yet

The small per-stream values are reset inside the graph on the first call of a generation; the
large buffers are never cleared, their ``has_prev`` / ``valid`` flags are. Calls that do not fit the
config set sticky `Mismatch` bits in ``clock.report``; the host reads them without a sync (a
non-blocking copy checked on a later call) and warns once per state.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Iterable

import torch

from cachepass.analysis.timestep import TimestepInput
from cachepass.config import StepCacheConfig
from cachepass.state.sizes import SizeSymbols, free_symbols, hashable
from cachepass.unit import UnitSpec, tensor_nbytes

DEFAULT_STEP_CAPACITY = 1024


class Mismatch(enum.IntFlag):
    """Calls that do not fit the compiled config, detected in the graph (bits of ``clock.report[0]``)."""

    MISSING_CFG_PARTNER = 1  # separate_cfg, but a step had one call (CFG off, or batched CFG)
    SHARED_TIMESTEP = 2  # one stream, but two calls at one timestep (separate CFG on a separate_cfg=False compile)
    MORE_STEPS = 4  # a generation ran past num_inference_steps
    FEWER_STEPS = 8  # a generation ended before num_inference_steps (interrupted, or a shorter schedule)
    RANKS_DIVERGED = 16  # context parallel: the ranks were out of step (calls, step, config); all computed
    EXTRA_CALLS = 32  # separate_cfg, but a step made a third call (same timestep and latents as its CFG pair)
    NONFINITE_LATENTS = 64  # latents with NaN or Inf entered a call: no call can be told to continue the last


# flags that follow from another one: not reported beside it (their advice would be wrong)
CONSEQUENCES = {Mismatch.EXTRA_CALLS: Mismatch.MISSING_CFG_PARTNER | Mismatch.FEWER_STEPS,
                Mismatch.NONFINITE_LATENTS: Mismatch.FEWER_STEPS}


MISMATCH_MESSAGES = {
    Mismatch.MISSING_CFG_PARTNER: (
        "separate_cfg=True, but some denoising steps made one call (CFG off for them: guidance <= 1, CFG "
        "truncation or zero-init steps; or both CFG branches batched into one call): each such call ran as the "
        "conditional stream of its step, which is right for a step without CFG. If every step of this pipeline "
        "makes one call, compile with separate_cfg=False (one stream: half the state)"
    ),
    Mismatch.EXTRA_CALLS: (
        "separate_cfg=True, but a denoising step made three or more calls at one timestep with the same latents "
        "(e.g. text and image guidance): stepcache caches steps of one call or of a CFG pair, so each extra call "
        "started a new generation and nothing was cached (the results are those of the uncached model). Three "
        "guidance calls per step are not supported yet"
    ),
    Mismatch.SHARED_TIMESTEP: (
        "separate_cfg=False, but two calls shared one timestep (separate CFG calls?): each started a new "
        "generation and nothing was cached. Compile with separate_cfg=True"
    ),
    Mismatch.MORE_STEPS: (
        "a generation ran more than num_inference_steps={steps} steps: steps past it used no warmup or mask "
        "entry and are not in stats(). Set num_inference_steps to the pipeline's step count"
    ),
    Mismatch.FEWER_STEPS: (
        "a generation ended after {ended} of num_inference_steps={steps} steps (interrupted, a shorter "
        "schedule, or one of two experts running part of the steps); the next one started at step 0. "
        "If the pipeline runs {ended} steps, set num_inference_steps={ended}"
    ),
    Mismatch.NONFINITE_LATENTS: (
        "latents with NaN or Inf entered the model (the model or the sampler diverged, or uninitialised "
        "weights): such calls cannot be told to continue the previous one, so each started a new generation "
        "and nothing was cached from then on; the outputs are those of the uncached model on those latents"
    ),
    Mismatch.RANKS_DIVERGED: (
        "the ranks of the sequence-parallel group were out of step at a call (different call counts since "
        "reset, a different step or CFG stream, or a different config): from then on every rank ran every block, "
        "so nothing was cached and per-rank stats no longer describe one schedule. Give every rank the same "
        "config, the same seeds and calls, and call cachepass.reset(model) on every rank together (or on none)"
    ),
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: float | int | bool = 0
    values: tuple | None = None  # constant contents (schedule tables); None: filled with `fill`
    reset_each_generation: bool = False

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)

    def allocate(self, device: torch.device) -> torch.Tensor:
        if self.values is not None:
            return torch.tensor(self.values, dtype=self.dtype, device=device).reshape(self.shape)
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=device)


def step_capacity(config: StepCacheConfig) -> int:
    return config.num_inference_steps or DEFAULT_STEP_CAPACITY


class StateLayout:
    """Names, shapes and dtypes of every state tensor, in graph-input order.

    ``narrow``: float32 and int32 where the state and the decision otherwise use float64 and int64
    (the timestep clock, the residual diff, counters), so every node of an ONNX export is in
    TensorRT's operator matrix (`cachepass.tensorrt`); decisions may then differ near the threshold.
    """

    def __init__(self, units: Iterable[UnitSpec], config: StepCacheConfig, narrow: bool = False,
                 timestep: TimestepInput | None = None):
        self.config, self.narrow, self.timestep = config, narrow, timestep
        self.sample_size = timestep.sample_size if timestep is not None else 0
        self.float_dtype = torch.float32 if narrow else torch.float64
        self.int_dtype = torch.int32 if narrow else torch.int64
        self.units = list(units)
        self.capacity = step_capacity(config)
        self.specs: list[TensorSpec] = self._model_specs()
        for unit in self.units:
            self.specs.extend(self._unit_specs(unit))
        self.index = {s.name: i for i, s in enumerate(self.specs)}
        # symbolic sizes (a graph traced for every shape): the state is laid out per call by `concrete`
        self.symbols = free_symbols(size for spec in self.specs for size in spec.shape)
        # equal keys: equal state tensors and semantics, so compiled graphs may share a state
        self.key = (config, tuple((s.name, hashable(s.shape), s.dtype) for s in self.specs))

    def concrete(self, sizes: SizeSymbols, values: tuple[int, ...]) -> "StateLayout":
        """This layout at the size symbols' ``values`` (a symbolic layout's state for one shape)."""
        def at_values(unit: UnitSpec) -> UnitSpec:
            slots = tuple(dataclasses.replace(s, shape=sizes.concrete(s.shape, values)) for s in unit.slots)
            return dataclasses.replace(unit, slots=slots)

        return StateLayout([at_values(u) for u in self.units], self.config, self.narrow, self.timestep)

    def _model_specs(self) -> list[TensorSpec]:
        cfg, cap, s = self.config, self.capacity, self.config.num_streams
        steps = range(cap + 1)  # the last column stands for "beyond the mask / warmup"
        warmup = set(cfg.warmup_step_indices)
        mask = cfg.steps_computation_mask or ()
        return [
            TensorSpec("clock.calls", (), self.int_dtype, 0),
            TensorSpec("clock.step", (), self.int_dtype, 0),
            TensorSpec("clock.pending", (), torch.bool, False),
            TensorSpec("clock.last_t", (), self.float_dtype, 0.0),
            TensorSpec("clock.last_latents", (2,), self.float_dtype, 0.0),
            TensorSpec("clock.report", (2,), self.int_dtype, 0),
            TensorSpec("clock.last_sample", (self.sample_size,), self.float_dtype, 0.0),
            TensorSpec("clock.sample_ids", (self.sample_size,), self.int_dtype, values=tuple(range(self.sample_size))),
            TensorSpec("schedule.warmup", (cap + 1,), torch.bool, values=tuple(t in warmup for t in steps)),
            TensorSpec(
                "schedule.mask_compute",
                (cap + 1,),
                torch.bool,
                values=tuple(t < len(mask) and mask[t] == 1 for t in steps),
            ),
            # cache-dit: with the static policy every step the mask does not force is cached
            TensorSpec(
                "schedule.mask_static",
                (cap + 1,),
                torch.bool,
                values=tuple(cfg.static_schedule and not (t < len(mask) and mask[t] == 1) for t in steps),
            ),
            TensorSpec("schedule.num_steps", (), self.int_dtype, values=(cfg.num_inference_steps or 0,)),
            TensorSpec("schedule.stream_ids", (s,), self.int_dtype, values=tuple(range(s))),
            TensorSpec("schedule.step_ids", (cap + 1,), self.int_dtype, values=tuple(steps)),
        ]

    def _unit_specs(self, unit: UnitSpec) -> list[TensorSpec]:
        cap, s, u = self.capacity, self.config.num_streams, f"u{unit.index}"
        hidden = unit.hidden
        cfg, by_threshold = self.config, self.config.decides_by_threshold
        kept = {  # per-stream values, each where a decision reads it
            "has_prev": (torch.bool, False, by_threshold),
            "cached_count": (self.int_dtype, 0, by_threshold and cfg.max_cached_steps is not None),
            "streak": (self.int_dtype, 0, by_threshold and cfg.max_continuous_cached_steps is not None),
            "last_cached_step": (self.int_dtype, -2, by_threshold and cfg.max_continuous_cached_steps is not None),
            "last_compute_step": (self.int_dtype, 0, True),
            "accumulated_diff": (self.float_dtype, 0.0, by_threshold and cfg.max_accumulated_residual_diff is not None),
        }
        specs = [TensorSpec(f"{u}.prev_residual", (s, *hidden.shape), hidden.dtype, 0)] if cfg.compares_residuals else []
        specs += [TensorSpec(f"{u}.{name}", (s,), dtype, fill, reset_each_generation=True)
                  for name, (dtype, fill, wanted) in kept.items() if wanted]
        specs += [
            TensorSpec(f"{u}.cached_flags", (s, cap + 1), torch.bool, False, reset_each_generation=True),
            TensorSpec(f"{u}.diffs", (s, cap + 1), torch.float32, math.nan, reset_each_generation=True),
        ]
        for slot in unit.slots:
            k = self.taylor_order(slot.role)
            specs.append(TensorSpec(f"{u}.slot{slot.slot}.terms", (s, k + 1, *slot.shape), slot.dtype, 0))
            specs.append(TensorSpec(f"{u}.slot{slot.slot}.valid", (s, k + 1), torch.bool, False, reset_each_generation=True))
        return specs

    def taylor_order(self, role: str) -> int:
        cfg = self.config
        return cfg.taylorseer_order if role == "hidden" else cfg.resolved_encoder_taylorseer_order

    def unit_nbytes(self, unit: UnitSpec) -> int:
        prefix = f"u{unit.index}."
        return sum(s.nbytes for s in self.specs if s.name.startswith(prefix))

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)


def mismatch_messages(report: list[int], num_inference_steps: int | None) -> dict[Mismatch, str]:
    """The `Mismatch` flags set in a ``clock.report`` value, with their messages (not their `CONSEQUENCES`)."""
    flags, ended_early = Mismatch(report[0]), report[1]
    for cause, consequences in CONSEQUENCES.items():
        if cause in flags:
            flags &= ~consequences
    return {flag: MISMATCH_MESSAGES[flag].format(steps=num_inference_steps, ended=ended_early)
            for flag in Mismatch if flag in flags}
