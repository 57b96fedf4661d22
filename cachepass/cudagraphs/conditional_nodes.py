"""One CUDA graph per call: the captured pieces joined with CUDA-graph conditional (IF/ELSE) nodes.

The piecewise CUDA graphs (`cachepass.cudagraphs.graphed`) leave one host decision per cache unit:
read the predicate, replay one branch. Here the decision moves onto the device. The captured torch
graphs become child graphs of one driver-API graph:

    [before] -> set_condition(pred) -> IF pred { cached branch } ELSE { compute branch } -> [after] ...

``set_condition`` is a one-thread kernel, compiled once per process with NVRTC, that reads the
predicate tensor the graph before it wrote and calls ``cudaGraphSetConditional``. Child graph nodes
are copies of the captured graphs, so every address (weights, state, pool memory) is the capture's.

Needs the ``cuda-bindings`` package (``cuda.bindings``), a driver with IF/ELSE conditional nodes
(CUDA 12.8+) and NVRTC; `unavailable_reason` says which is missing. torch >= 2.13 has conditional
nodes of its own for eager ``torch.cond``; this path works on torch 2.11 too.
"""

from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from cachepass.cudagraphs.nvrtc import check, kernel
from cachepass.errors import CachepassError

MIN_DRIVER = 12080  # IF nodes with an ELSE body (conditional.size = 2)

_SET_CONDITION = r"""
typedef __device_builtin__ unsigned long long cudaGraphConditionalHandle;
extern "C" __device__ __cudart_builtin__ void cudaGraphSetConditional(cudaGraphConditionalHandle handle,
                                                                      unsigned int value);
extern "C" __global__ void cachepass_set_condition(cudaGraphConditionalHandle handle, const bool* pred) {
    cudaGraphSetConditional(handle, *pred ? 1u : 0u);
}
"""


def unavailable_reason(device: torch.device) -> str | None:
    """Why conditional nodes cannot run on ``device`` (None: they can)."""
    if device.type != "cuda":
        return f"the model runs on {device.type}, and CUDA-graph conditional nodes need a CUDA device"
    try:
        from cuda.bindings import driver
    except ImportError:
        return "the cuda-bindings package is not installed (pip install cuda-bindings, the major version of your CUDA)"
    version = check(driver.cuDriverGetVersion())
    if version < MIN_DRIVER:
        return f"the CUDA driver supports CUDA {version // 1000}.{version % 1000 // 10}; IF/ELSE nodes need 12.8 or newer"
    try:
        _set_condition_kernel(torch.cuda.current_device() if device.index is None else device.index)
    except Exception as error:  # NVRTC missing or failing: say so, with its message
        return f"compiling the set-condition kernel with NVRTC failed: {error}"
    return None


def _add_node(driver, graph, dependencies: list, params):
    """``cuGraphAddNode``: cuda-bindings 13 added an edge-data argument."""
    from cuda.bindings import __version__

    if int(__version__.split(".")[0]) >= 13:
        return driver.cuGraphAddNode(graph, dependencies, None, len(dependencies), params)
    return driver.cuGraphAddNode(graph, dependencies, len(dependencies), params)


def _set_condition_kernel(device_index: int):
    return kernel(_SET_CONDITION, "cachepass_set_condition", device_index)


class ConditionalGraph:
    """The captured graphs of one call joined into one launchable graph.

    ``parts`` lists, in call order, a captured ``torch.cuda.CUDAGraph`` (captured with
    ``keep_graph=True``) or a ``(pred, cached, compute)`` triple: a bool tensor and two such graphs.
    """

    def __init__(self, parts: Sequence, device: torch.device):
        from cuda.bindings import driver

        self._driver = driver
        self._keep = list(parts)  # the torch graphs own the pool memory the child graphs use
        set_condition = _set_condition_kernel(device.index)
        context = check(driver.cuCtxGetCurrent())
        graph = check(driver.cuGraphCreate(0))
        last: list = []
        for part in parts:
            if isinstance(part, tuple):
                last = self._add_decision(graph, last, context, set_condition, *part)
            else:
                last = [check(driver.cuGraphAddChildGraphNode(graph, last, len(last), part.raw_cuda_graph()))]
        self._graph = graph
        self._exec = check(driver.cuGraphInstantiate(graph, 0))

    def _add_decision(self, graph, last: list, context, set_condition, pred: torch.Tensor, cached, compute) -> list:
        driver = self._driver
        if pred.dtype != torch.bool or pred.numel() != 1:
            raise CachepassError(f"a cache decision must be one bool; got {pred.dtype} of shape {tuple(pred.shape)}")
        handle = check(driver.cuGraphConditionalHandleCreate(graph, context, 0, 0))
        values = (ctypes.c_ulonglong(int(handle)), ctypes.c_void_p(pred.data_ptr()))
        pointers = (ctypes.c_void_p * 2)(*(ctypes.addressof(v) for v in values))
        kernel_params = driver.CUDA_KERNEL_NODE_PARAMS()
        kernel_params.func = set_condition
        kernel_params.gridDimX = kernel_params.gridDimY = kernel_params.gridDimZ = 1
        kernel_params.blockDimX = kernel_params.blockDimY = kernel_params.blockDimZ = 1
        kernel_params.kernelParams = ctypes.addressof(pointers)  # copied into the node by the call
        set_node = check(driver.cuGraphAddKernelNode(graph, last, len(last), kernel_params))
        params = driver.CUgraphNodeParams()
        params.type = driver.CUgraphNodeType.CU_GRAPH_NODE_TYPE_CONDITIONAL
        params.conditional.handle = handle
        params.conditional.type = driver.CUgraphConditionalNodeType.CU_GRAPH_COND_TYPE_IF
        params.conditional.size = 2  # body 0 runs when the condition is nonzero, body 1 otherwise
        params.conditional.ctx = context
        node = check(_add_node(driver, graph, [set_node], params))
        for body, branch in zip(params.conditional.phGraph_out, (cached, compute)):
            check(driver.cuGraphAddChildGraphNode(body, None, 0, branch.raw_cuda_graph()))
        return [node]

    def launch(self) -> None:
        check(self._driver.cuGraphLaunch(self._exec, torch.cuda.current_stream().cuda_stream))

    def __del__(self):
        driver = getattr(self, "_driver", None)
        if driver is not None and hasattr(self, "_exec"):
            driver.cuGraphExecDestroy(self._exec)
            driver.cuGraphDestroy(self._graph)
