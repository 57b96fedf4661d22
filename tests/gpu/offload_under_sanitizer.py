"""Run by test_offload_gpu.py: offloaded generations of the tiny Wan under PyTorch's CUDA sanitizer (CSAN).

Dynamo does not compile under CSAN's dispatch mode, so the model compiles and runs its first
generation first; then CSAN is enabled, proven on a planted race, and the second generation runs
the same compiled program (guards skipped: CSAN's dispatch key would fail them) with every aten op checked against the streams
and events that order it (inner='aot_eager': the pieces run aten ops).
"""

import sys

import torch
from test_cuda_graphs import config, generate_on_gpu
from test_offload_gpu import budget
from torch.cuda._sanitizer import CUDASanitizerErrors, enable_cuda_sanitizer

import cachepass
from bench.tiny_models import CASES

case = CASES["wan"]
model = case.model().cuda()
compiled = cachepass.compile(model, config(case), inner="aot_eager", offload={"budget": budget(model, "wan", 0.6)})
generate_on_gpu(case, compiled, 1)
before = cachepass.offload_stats(model).counters

enable_cuda_sanitizer()
a = torch.zeros(1 << 20, device="cuda")
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    a.add_(1)
try:  # the sanitizer is on: a read racing the side stream's write (no event waited on) is reported
    a.sum()
    sys.exit("the sanitizer missed a planted race")
except CUDASanitizerErrors:
    torch.cuda.synchronize()
print("planted race reported", flush=True)
print("--- offload from here ---", file=sys.stderr, flush=True)
# CSAN adds the Python dispatch key to every tensor, which fails Dynamo's guards: with one compiled graph,
# this stance runs it without evaluating them (the program is the one compiled above)
with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
    generate_on_gpu(case, compiled, 2)
after = cachepass.offload_stats(model).counters
print(f"offload ran: {after.copies - before.copies} copies, {after.bytes_moved - before.bytes_moved} bytes", flush=True)
