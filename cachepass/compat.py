"""Work-arounds for the PyTorch versions cachepass supports (>= 2.11), each applied only where it is needed."""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)


def trace_functional_all_gather() -> None:
    """Let Dynamo trace ``funcol.all_gather_tensor`` along a dim other than 0 on torch 2.11.

    It re-concatenates the gathered chunks with ``torch._utils._maybe_view_chunk_cat``, which torch
    2.11's Dynamo skips ("Attempted to call function marked as skipped", a graph break): every
    fullgraph compile of a diffusers context-parallel model fails at its output gather. torch 2.13
    lists the function as traceable; on older versions funcol's reference is replaced by the same
    computation written here (traced as user code). Idempotent.
    """
    import torch.distributed._functional_collectives as funcol
    from torch._dynamo import trace_rules

    if "torch._utils._maybe_view_chunk_cat" in trace_rules.manual_torch_name_rule_map:
        return
    if getattr(funcol, "_maybe_view_chunk_cat", None) is not _chunk_cat:
        funcol._maybe_view_chunk_cat = _chunk_cat
        log.info("stepcache: torch %s skips torch._utils._maybe_view_chunk_cat under Dynamo; functional all_gather "
                 "uses a traceable copy of it (context parallel output gathers)", torch.__version__)


def _chunk_cat(res: torch.Tensor, group_size: int, gather_dim: int) -> torch.Tensor:
    """``torch.cat(torch.chunk(res, group_size, dim=0), dim=gather_dim)``, a view when no data moves."""
    if gather_dim == 0:
        return res
    shape = list(res.shape)
    if shape[0] == group_size and math.prod(shape[1:gather_dim]) == 1:
        return res.view([1, *shape[1:gather_dim], shape[0] * shape[gather_dim], *shape[gather_dim + 1:]])
    return torch.cat(torch.chunk(res, group_size, dim=0), dim=gather_dim)
