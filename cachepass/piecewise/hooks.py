"""`ProgramHooks`: what a feature attached to a piecewise program hears as the program runs.

The executor calls them; offload (`cachepass.offload.runtime.ProgramOffload`) implements them, and
CUDA graphs call ``begin_capture`` as each captured graph begins. A program without features runs
with `NO_HOOKS`.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class ProgramHooks(Protocol):
    def begin_call(self, args: Sequence[Any], state: Any) -> Sequence[Any]:
        """A call of ``state`` (a `cachepass.state.runtime.RuntimeState`) begins; returns the graph inputs to run with."""

    def end_call(self) -> None:
        """The call finished (on the host; the device may still run it)."""

    def before_block(self, block: str) -> None:
        """Block piece ``block`` (a module path: ``blocks.3``) is about to run."""

    def after_block(self, block: str) -> None:
        """Block piece ``block`` was issued."""

    def decided(self, unit: str, cached: bool) -> None:
        """Cache unit ``unit`` (its block list's path) read its decision on the host."""

    def begin_capture(self, conditional_body: bool) -> None:
        """A CUDA graph's capture begins: nothing issued before it is part of it. ``conditional_body``: the graph
        runs as the body of an IF/ELSE node, where a memcpy node runs as a kernel on the whole device."""

    def reset(self, state: Any) -> None:
        """``cachepass.reset`` on ``state``: its next call starts a generation."""


class _NoHooks:
    def begin_call(self, args, state):
        return args

    def end_call(self) -> None:
        pass

    def before_block(self, block: str) -> None:
        pass

    def after_block(self, block: str) -> None:
        pass

    def decided(self, unit: str, cached: bool) -> None:
        pass

    def begin_capture(self, conditional_body: bool) -> None:
        pass

    def reset(self, state) -> None:
        pass


NO_HOOKS: ProgramHooks = _NoHooks()
