import os
import sys

# cache-dit's default merges FLUX.1's double and single block lists into one cache unit (with
# dummy blocks); cachepass makes each list its own unit, which is cache-dit's per-list mode.
# Must be set before cache_dit is imported (it reads the variable at import).
os.environ["CACHE_DIT_FLUX_ENABLE_DUMMY_BLOCKS"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

# tests/gpu/ checks CUDA graphs and conditional nodes on a CUDA device (bench/device_run.sh runs it
# on the lent GPU); a CPU-only machine does not collect it.
collect_ignore_glob = [] if torch.cuda.is_available() else ["gpu/*"]

# pytest-xdist (the README's `-n 2`): the workers share the cores instead of each taking all of them (OpenMP threads
# that outnumber the cores spin against each other)
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with empty Dynamo caches and counters, and leaves none behind."""
    torch._dynamo.reset()
    torch.compiler.set_stance("default")
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()
