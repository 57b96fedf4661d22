"""Host inputs: CPU tensors the model only moves to the device are found in the graph, and each call
reuses their device copy while the caller passes the same, unchanged tensor."""

from __future__ import annotations

import torch
from torch import fx

from cachepass.piecewise.host_inputs import HostInputs


def _graph(x, table, scale, both, cuda_only):
    moved = table.to("cuda").float() + cuda_only.cuda() + both.to(device=torch.device("cuda", 0))
    return x * moved + scale.to(torch.float32) + both.sum()  # scale: a dtype cast; both: also read on the host


def test_only_inputs_whose_every_use_moves_them_to_the_device_are_host_inputs():
    gm = fx.symbolic_trace(_graph)
    inputs = [torch.ones(2)] * 5
    assert HostInputs.find(gm, inputs, torch.device("cuda")).indices == [1, 4]
    weights = [*inputs[:4], torch.nn.Parameter(torch.ones(2))]  # a weight the model moves: its owner's business
    assert HostInputs.find(gm, weights, torch.device("cuda")).indices == [1]
    assert HostInputs.find(gm, inputs, torch.device("cpu")).indices == []  # a CPU program has none


def test_the_device_copy_is_reused_until_the_tensor_changes_or_another_is_passed():
    host = HostInputs([1], torch.device("cpu"))  # "cpu" as the device: a copy all the same
    table = torch.arange(4.0)
    first = host.move(["x", table])
    assert first[0] == "x" and torch.equal(first[1], table) and first[1] is not table
    assert host.move(["x", table])[1] is first[1] and host.moved == 1  # unchanged: not copied again
    table.mul_(2)  # in place: the version counter moves
    again = host.move(["x", table])[1]
    assert torch.equal(again, table) and host.moved == 2
    assert torch.equal(first[1], torch.arange(4.0))  # the old copy (an earlier call's) keeps its values
    other = torch.full((4,), 7.0)
    assert torch.equal(host.move(["x", other])[1], other) and host.moved == 3
