"""Graph inputs with static addresses (weights, buffers, slot views) and a fast check that they stayed put:
what CUDA-graph replay and offload's per-call weight check both rely on."""

from __future__ import annotations

from typing import Any

import torch


def pointers_equal(args: list | tuple, pointers: list[int | None], indices: list[int]) -> bool:
    """Whether ``args[i].data_ptr() == pointers[i]`` for every ``i`` in ``indices`` (in C++ where torch has it)."""
    check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)  # CUDA builds (Inductor's cudagraph trees)
    if check is not None:
        return check(args if isinstance(args, list) else list(args), pointers, indices)  # it takes lists only
    return all(args[i].data_ptr() == pointers[i] for i in indices)


def has_static_address(value: Any) -> bool:
    """Weights and buffers: Dynamo marks a module's parameters and buffers as static inputs."""
    return isinstance(value, torch.nn.Parameter) or (
        isinstance(value, torch.Tensor) and torch._dynamo.utils.get_static_address_type(value) is not None)
