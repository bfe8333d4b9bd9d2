import os
import sys
import tempfile
from pathlib import Path

import pytest
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Latency tables are cached in a folder of this test session, never in the user's cache.
_CACHE = tempfile.TemporaryDirectory(prefix="onnx-lowrank-test-cache-")
os.environ["ONNX_LOWRANK_CACHE"] = _CACHE.name
# The never-slower check times candidates, so what it allows depends on the machine's load;
# tests of other stages run without it (tests/test_latency.py turns it on where it is tested).
os.environ["ONNX_LOWRANK_LATENCY_CHECK"] = "0"
# The CLI run in a subprocess (python -m onnx_lowrank) imports this checkout, not the copy that
# happens to be installed (an editable install may point at another worktree).
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def single_threaded_reference_blas():
    """The float64 SVDs the tests compare against run with one BLAS thread, like the code under
    test: OpenBLAS threads spin while waiting and crawl on a machine with busy cores."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield
