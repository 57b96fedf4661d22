"""What runs around Dynamo's compiles of a `cachepass.compile`d model's calls, and around no other compile.

The model's call wrapper marks the thread (`calls_of_compiled_model`) and puts our callbacks on Dynamo's
compile-start and compile-end hooks (``torch._dynamo.reset()`` empties them, so every call checks). A compile
that a marked thread starts runs each measure's ``enter()``; the compile's end, failed or not, runs ``leave()`` of
those that entered. Dynamo runs the hooks once per outermost compile (nested compiles share them), and its
compile lock keeps two threads' compiles apart. Each measure changes only how long a compile takes, never what
it makes (its module says why and by how much):

- `frozen_heap`: the objects that existed before the compile are out of the collector's reach.
- `source_names`: Dynamo names a traced line's function from tokenized source only for a log that prints it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

from cachepass.compile_scope import frozen_heap, source_names

_MEASURES = (frozen_heap, source_names)
_LOCK = threading.Lock()
_CALLS = threading.local()  # .depth: calls of compiled models in progress on this thread
_ENTERED: list = []  # the measures the compile in progress entered (and must leave)


@contextlib.contextmanager
def calls_of_compiled_model() -> Iterator[None]:
    """Mark a call of a `cachepass.compile`d model on this thread: a compile it starts runs with our measures."""
    _register()
    depth = getattr(_CALLS, "depth", 0)
    _CALLS.depth = depth + 1
    try:
        yield
    finally:
        _CALLS.depth = depth


def _compile_started(_args) -> None:
    if not getattr(_CALLS, "depth", 0):
        return
    with _LOCK:
        if not _ENTERED:
            _ENTERED.extend(measure for measure in _MEASURES if measure.enter())


def _compile_ended(_args) -> None:
    with _LOCK:
        while _ENTERED:
            _ENTERED.pop().leave()


def _register() -> None:
    """Put the callbacks on Dynamo's handler, unless they are on it (``torch._dynamo.reset()`` removes them)."""
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None:  # a torch without compile callbacks: its compiles run as they are
        return
    if _compile_started in handler.start_callbacks:  # every call of a compiled model asks: no lock when they are on
        return
    with _LOCK:
        if _compile_started not in handler.start_callbacks:
            handler.register_start_callback(_compile_started)
            handler.register_end_callback(_compile_ended)
