"""Tensor ops the decision graph is built from, chosen to export: gathers by a 0-dim index, picks and masked
writes per CFG stream, flag bits in plain arithmetic (ONNX-TensorRT has no BitwiseOr)."""

from __future__ import annotations

import torch
from torch.fx.proxy import Proxy

from cachepass.state.layout import Mismatch


def at(x: Proxy, index: Proxy) -> Proxy:
    """``x[index]`` for a 0-dim index tensor, as a gather (plain indexing would call ``.item()``)."""
    return torch.index_select(x, 0, index.reshape(1)).squeeze(0)


def stream_selectors(stream: Proxy, num_streams: int) -> tuple[Proxy, ...]:
    """``stream == s`` for s = 1 .. num_streams - 1: what `pick_stream` selects by, computed once per graph."""
    return tuple(stream == s for s in range(1, num_streams))


def pick_stream(x: Proxy, selectors: tuple[Proxy, ...]) -> Proxy:
    """``x[stream]`` over the (at most two) CFG streams by ``where`` on static slices (``selectors``:
    `stream_selectors`).

    The small per-stream values and the previous head residual are read this way; the TaylorSeer terms are read
    by `at` inside the cond's branches (one row, where this reads every stream's).
    """
    picked = x[0]
    for s, selected in enumerate(selectors, start=1):
        picked = torch.where(selected, x[s], picked)
    return picked


def write_stream(state: Proxy, clock, value: Proxy, when: Proxy) -> None:
    """``state[stream] = value`` where ``when`` holds: one masked ``where`` written into ``state`` itself.

    ``out=state`` makes it one kernel where ``copy_(where(...))`` is two; graphs run as traced (CUDA-graph glue)
    then read and write the buffer once instead of twice, and compiled ones functionalize both forms alike.
    """
    mask = clock.stream_mask.reshape(-1, *([1] * (len(state.node.meta["stepcache_shape"]) - 1))) & when
    torch.where(mask, value.unsqueeze(0), state, out=state)


def write_row(state: Proxy, row: Proxy, value: Proxy) -> None:
    """``state[row] = value`` in place for an int64 ``row`` of shape [1] (`Clock.stream_row`): one kernel that reads
    ``value`` and writes one row, where a masked ``where`` reads and writes every stream's rows."""
    state.index_put_((row,), value.unsqueeze(0))


def set_flag(flags: Proxy, flag: Mismatch, when: Proxy) -> Proxy:
    """``flags | flag`` where ``when`` holds, in plain arithmetic on the non-negative flags.

    ONNX-TensorRT has no BitwiseOr, and exporters expand an integer ``//`` or ``%`` into sign tests on
    bools that it does not take either: bit ``flag`` is ``trunc(flags / flag) - 2 * trunc(flags / (2 * flag))``.
    """
    bit = torch.div(flags, int(flag), rounding_mode="trunc") - 2 * torch.div(flags, 2 * int(flag), rounding_mode="trunc")
    return torch.where(when & (bit == 0), flags + int(flag), flags)
