"""`StepCacheConfig`: every DBCache + TaylorSeer knob, with cache-dit 1.5's semantics.

The field names follow the brief (``num_head_blocks`` is cache-dit's ``Fn_compute_blocks``,
``threshold`` its ``residual_diff_threshold``, ...); ``StepCacheConfig.from_cache_dit`` converts
cache-dit's own config objects. Invalid values raise ``ValueError`` naming the field, the value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from typing import Any, Mapping, Sequence


class MaskPolicy(str, enum.Enum):
    """What a step marked 0 in ``steps_computation_mask`` does (cache-dit's ``steps_computation_policy``)."""

    DYNAMIC = "dynamic"  # a 0 step goes through the usual threshold decision
    STATIC = "static"  # a 0 step is cached, no diff is computed


@dataclasses.dataclass(frozen=True)
class StepCacheConfig:
    """DBCache + TaylorSeer settings for one compiled model.

    Args:
        num_head_blocks: Fn, blocks that always run first; their hidden-state residual decides (>= 1).
        num_tail_blocks: Bn, blocks that always run last, on the approximated state when cached (>= 0).
        threshold: cache a step when the relative L1 change of the head residual is below this.
            0 never caches on the threshold; >= 1 always does (cache-dit's convention).
        warmup_steps: the first steps that always compute (cache-dit ``max_warmup_steps``).
        warmup_interval: within warmup, only every n-th step is forced to compute.
        max_cached_steps: at most this many cached steps per CFG stream and generation (None: no limit).
        max_continuous_cached_steps: at most this many cached steps in a row (None: no limit).
        max_accumulated_residual_diff: stop caching once the summed diffs reach this (None: off).
        separate_cfg: the denoising loop calls the model twice per step (conditional, unconditional);
            each stream gets its own buffers, counters and TaylorSeer state.
        cfg_compute_first: with ``separate_cfg``, the unconditional call comes first.
        cfg_diff_compute_separate: False lets the unconditional stream reuse the conditional
            stream's diff of the same step (cache-dit requires ``cfg_compute_first=False`` when True).
        num_inference_steps: denoising steps per generation, the length the step mask, warmup and
            the stats tables are laid out for. A generation that runs more or fewer steps is
            reported (a warning and ``UnitStats.warnings``). None: any length.
        timestep_input: the model input that marks denoising progress. A call whose timestep does
            not decrease starts a new generation at step 0 (with ``separate_cfg``, the second call
            of a step at the same timestep is its CFG partner). ``"auto"``: the input named
            ``timestep``, ``timesteps``, ``sigma`` or ``sigmas``, else counting calls. A name: that
            input (the forward's argument name). None: count calls (a new generation after
            ``num_inference_steps`` steps per stream, or at ``cachepass.reset``).
        steps_computation_mask: one 0/1 per step; 1 forces a compute step, 0 defers to ``steps_computation_policy``.
        steps_computation_policy: ``MaskPolicy.DYNAMIC`` or ``MaskPolicy.STATIC`` (strings accepted).
        taylorseer_order: TaylorSeer order applied to the hidden-state residual (0 = plain reuse).
        encoder_taylorseer_order: order for the other carried streams (encoder states);
            None means the same as ``taylorseer_order``.
    """

    num_head_blocks: int = 8
    num_tail_blocks: int = 0
    threshold: float = 0.08
    warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int | None = None
    max_continuous_cached_steps: int | None = None
    max_accumulated_residual_diff: float | None = None
    separate_cfg: bool = False
    cfg_compute_first: bool = False
    cfg_diff_compute_separate: bool = True
    num_inference_steps: int | None = None
    timestep_input: str | None = "auto"
    steps_computation_mask: tuple[int, ...] | None = None
    steps_computation_policy: MaskPolicy = MaskPolicy.DYNAMIC
    taylorseer_order: int = 0
    encoder_taylorseer_order: int | None = None

    def __post_init__(self) -> None:
        self._normalize_numbers()
        _require_int("num_head_blocks", self.num_head_blocks, minimum=1)
        _require_int("num_tail_blocks", self.num_tail_blocks, minimum=0)
        _require_number("threshold", self.threshold, ">= 0 (0 disables threshold caching, >= 1 always caches)")
        if self.threshold < 0:
            _fail("threshold", self.threshold, ">= 0 (0 disables threshold caching, >= 1 always caches)")
        _require_int("warmup_steps", self.warmup_steps, minimum=0)
        _require_int("warmup_interval", self.warmup_interval, minimum=1)
        _require_optional_int("max_cached_steps", self.max_cached_steps)
        _require_optional_int("max_continuous_cached_steps", self.max_continuous_cached_steps)
        if self.max_accumulated_residual_diff is not None:
            _require_number("max_accumulated_residual_diff", self.max_accumulated_residual_diff, "None or > 0")
            if self.max_accumulated_residual_diff <= 0:
                _fail("max_accumulated_residual_diff", self.max_accumulated_residual_diff, "None or > 0")
        for name in ("separate_cfg", "cfg_compute_first", "cfg_diff_compute_separate"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "True or False")
        if self.cfg_compute_first and not self.separate_cfg:
            _fail("cfg_compute_first", True, "False unless separate_cfg=True")
        if self.cfg_compute_first and self.cfg_diff_compute_separate:
            _fail(
                "cfg_compute_first",
                True,
                "False while cfg_diff_compute_separate=True (cache-dit's rule; set cfg_diff_compute_separate=False)",
            )
        if self.num_inference_steps is not None:
            _require_int("num_inference_steps", self.num_inference_steps, minimum=1)
        if self.timestep_input is not None and (not isinstance(self.timestep_input, str) or not self.timestep_input):
            _fail("timestep_input", self.timestep_input, "'auto', the name of a model input, or None")
        self._validate_mask()
        _require_int("taylorseer_order", self.taylorseer_order, minimum=0)
        if self.encoder_taylorseer_order is not None:
            _require_int("encoder_taylorseer_order", self.encoder_taylorseer_order, minimum=0)

    def _normalize_numbers(self) -> None:
        """numpy and other ``numbers`` scalars become Python ints and floats (numpy bools are no Integral: rejected)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if type(value) in (bool, int, float):  # numpy.float64 subclasses float: converted below
                continue
            if isinstance(value, numbers.Integral):
                object.__setattr__(self, f.name, int(value))
            elif isinstance(value, numbers.Real):
                object.__setattr__(self, f.name, float(value))

    def _validate_mask(self) -> None:
        try:
            policy = MaskPolicy(self.steps_computation_policy)
        except ValueError:
            _fail("steps_computation_policy", self.steps_computation_policy, "'dynamic' or 'static'")
        object.__setattr__(self, "steps_computation_policy", policy)
        if self.steps_computation_mask is None:
            return
        mask = self.steps_computation_mask
        if isinstance(mask, (str, bytes)) or not isinstance(mask, Sequence):
            _fail("steps_computation_mask", mask, "a sequence of 0/1, one per inference step")
        if any(isinstance(m, bool) or m not in (0, 1) for m in mask):
            _fail("steps_computation_mask", mask, "only 0 and 1 entries")
        if self.num_inference_steps is None:
            _fail("steps_computation_mask", list(mask), "a mask together with num_inference_steps")
        if len(mask) != self.num_inference_steps:
            _fail(
                "steps_computation_mask",
                f"{len(mask)} entries",
                f"exactly num_inference_steps={self.num_inference_steps} entries",
            )
        if policy is MaskPolicy.STATIC and mask[0] == 0:
            _fail("steps_computation_mask", list(mask), "mask[0] == 1 with the static policy (step 0 has nothing to reuse)")
        object.__setattr__(self, "steps_computation_mask", tuple(int(m) for m in mask))

    # ------------------------------------------------------------------ derived values
    @property
    def num_streams(self) -> int:
        """CFG streams with their own state: 2 with ``separate_cfg``, else 1."""
        return 2 if self.separate_cfg else 1

    @property
    def resolved_encoder_taylorseer_order(self) -> int:
        return self.taylorseer_order if self.encoder_taylorseer_order is None else self.encoder_taylorseer_order

    @property
    def warmup_step_indices(self) -> tuple[int, ...]:
        """Steps forced to compute by warmup; a mask truncates warmup to its leading run of 1s (as cache-dit)."""
        limit = self.warmup_steps
        if self.steps_computation_mask is not None:
            leading_ones = 0
            for m in self.steps_computation_mask:
                if m != 1:
                    break
                leading_ones += 1
            limit = min(limit, leading_ones)
        return tuple(range(0, limit, self.warmup_interval))

    @property
    def static_schedule(self) -> bool:
        """Whether warmup and the mask decide every step: the static policy with a mask (cache-dit caches each step
        the mask does not force, without a similarity test)."""
        return self.steps_computation_policy is MaskPolicy.STATIC and self.steps_computation_mask is not None

    @property
    def decides_by_threshold(self) -> bool:
        """Whether some step takes cache-dit's threshold path (the budgets, then the similarity test): a threshold
        above 0 and no static schedule. Without it warmup and the mask decide every step, and the counters the
        budgets read are not kept."""
        return self.threshold > 0 and not self.static_schedule

    @property
    def compares_residuals(self) -> bool:
        """Whether some step runs the similarity test, which reads the head residual of the last computed step
        (cache-dit's Fn buffer): the threshold path with a threshold below 1. Without it that residual is neither
        kept nor compared (cache-dit records -1.0 for thresholds >= 1 and skips the test at <= 0)."""
        return self.decides_by_threshold and self.threshold < 1

    @property
    def never_caches(self) -> str | None:
        """Why no step can ever be cached under this config, or None if some can."""
        if self.max_cached_steps == 0:
            return "max_cached_steps=0"
        if self.threshold <= 0 and not self.static_schedule:
            return "threshold=0 disables threshold caching and no static mask caches steps"
        if self.num_inference_steps is not None:
            forced = set(self.warmup_step_indices)
            if self.steps_computation_mask is not None:
                forced |= {t for t, m in enumerate(self.steps_computation_mask) if m == 1}
            if len(forced) >= self.num_inference_steps:
                return (
                    f"warmup (warmup_steps={self.warmup_steps}, warmup_interval={self.warmup_interval}) and "
                    f"steps_computation_mask force all num_inference_steps={self.num_inference_steps} steps to compute"
                )
        return None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "StepCacheConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"StepCacheConfig got unknown field(s) {unknown}; allowed fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_cache_dit(cls, db_config: Any, calibrator_config: Any = None) -> "StepCacheConfig":
        """Convert cache-dit's ``DBCacheConfig`` (+ optional ``TaylorSeerCalibratorConfig``).

        Settings cachepass does not implement (DBPrune, force-refresh hints, calibrators other
        than TaylorSeer, hidden-state caching) raise ``ValueError`` instead of being dropped.
        """
        from cachepass._cache_dit_config import convert_cache_dit_config

        return cls(**convert_cache_dit_config(db_config, calibrator_config))

    def to_cache_dit(self) -> tuple[Any, Any]:
        """cache-dit's ``(DBCacheConfig, TaylorSeerCalibratorConfig or None)`` with the same semantics."""
        from cachepass._cache_dit_config import to_cache_dit_configs

        return to_cache_dit_configs(self)


def _fail(field: str, value: Any, allowed: str) -> None:
    raise ValueError(f"StepCacheConfig.{field}={value!r} is invalid; allowed: {allowed}")


def _require_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(field, value, f"an integer >= {minimum}")


def _require_optional_int(field: str, value: Any) -> None:
    if value is not None:
        _require_int(field, value, minimum=0)


def _require_number(field: str, value: Any, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(field, value, allowed)
