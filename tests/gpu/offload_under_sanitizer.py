"""Run by test_offload_gpu.py with TORCH_CUDA_SANITIZER=1: a planted race first (the sanitizer must report
it), then two offloaded generations of the tiny Wan, which must report none."""

import sys

import torch
from torch.cuda._sanitizer import CUDASanitizerErrors

print("sanitizer check", flush=True)
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
import cachepass
from models import CASES
from test_cuda_graphs import config, generate_on_gpu
from test_offload_gpu import budget
case = CASES["wan"]
model = case.model().cuda()
compiled = cachepass.compile(model, config(case), inner="aot_eager", offload={"budget": budget(model, "wan", 0.6)})
for seed in (1, 2):
    generate_on_gpu(case, compiled, seed)
print("offload ran:", cachepass.offload_stats(model).counters)
