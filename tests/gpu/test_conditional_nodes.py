"""CUDA-graph conditional nodes on their own: captured torch graphs joined by an IF/ELSE node."""

import pytest
import torch

from cachepass.cudagraphs.conditional_nodes import ConditionalGraph, unavailable_reason


def _capture(fn, pool, stream):
    graph = torch.cuda.CUDAGraph(keep_graph=True)
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_if_else_picks_the_branch_on_the_device(sign):
    assert unavailable_reason(torch.device("cuda")) is None
    x = torch.full((4096,), sign, device="cuda")
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
    before, (pred, doubled) = _capture(lambda: ((x.sum() > 0), x * 2), pool, stream)
    cached, out = _capture(lambda: doubled + 1, pool, stream)
    compute, _ = _capture(lambda: out.copy_(doubled - 1), pool, stream)
    after, final = _capture(lambda: out * 10, pool, stream)
    joined = ConditionalGraph([before, (pred, cached, compute), after], torch.device("cuda"))
    torch.cuda.set_sync_debug_mode("error")  # no host sync in a call
    try:
        joined.launch()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = (2 * sign + (1 if sign > 0 else -1)) * 10
    torch.testing.assert_close(final, torch.full_like(x, expected))
    x.fill_(-sign)  # the same graph, the other branch
    joined.launch()
    expected = (-2 * sign + (1 if sign < 0 else -1)) * 10
    torch.testing.assert_close(final, torch.full_like(x, expected))
