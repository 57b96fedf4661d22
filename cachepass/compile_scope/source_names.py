"""A compile of ours names a traced line's function from tokenized source only when a log prints the name.

For every new instruction that makes an FX node, Dynamo's ``OutputGraph.create_proxy`` (torch 2.11-2.13)
builds a header for the ``trace_call`` log, "file:line in fn (Class.fn)", whether or not that log is on; the
name in parentheses comes from ``torch._dynamo.funcname_cache``, which tokenizes the whole source file the
first time a line of it is asked about (Python 3.11's tokenizer is pure Python). A first trace of a diffusers
DiT reads 11 files that way: on the bench's CPU host (30-block small Wan, warm caches) 0.78 s of a 7-8 s warm
first call, against 0.41 s for the 7 files of the block that regional compile traces; without it, Dynamo's
trace took 2.2 s instead of 2.8 s (medians of 4 alternating processes).

While a compile of ours runs and neither the ``trace_call`` nor the ``trace_source`` log is on (their loggers
are asked at the compile's start), the ``get_funcname`` that ``torch._dynamo.symbolic_convert`` calls answers
None, so the unprinted header lacks the name and no file is tokenized; the compile's end puts torch's function
back. With either log on, or in a torch that names lines another way, nothing is replaced. This is the one
place cachepass replaces a torch function, for the length of one compile; it goes when torch builds the
header lazily.
"""

from __future__ import annotations

import logging

from torch._dynamo import output_graph, symbolic_convert

log = logging.getLogger(__name__)

_TORCH_GET_FUNCNAME = getattr(symbolic_convert, "get_funcname", None)


def enter() -> bool:
    """Stop naming lines from source for this compile; False (nothing to undo) where a log prints the names."""
    if _TORCH_GET_FUNCNAME is None or symbolic_convert.get_funcname is not _TORCH_GET_FUNCNAME:
        log.debug("stepcache: this torch names traced lines its own way: its source is read as it is")
        return False
    if any(logger.isEnabledFor(logging.DEBUG) for logger in _header_loggers()):
        return False
    symbolic_convert.get_funcname = _unnamed
    return True


def leave() -> None:
    symbolic_convert.get_funcname = _TORCH_GET_FUNCNAME


def _unnamed(filename: str, lineno: int) -> None:
    return None


def _header_loggers() -> list[logging.Logger]:
    """The loggers that print Dynamo's line headers (the modules that build them)."""
    names = (("trace_call_log", symbolic_convert), ("trace_source_log", symbolic_convert), ("trace_call_log", output_graph))
    return [getattr(module, name) for name, module in names if hasattr(module, name)]
