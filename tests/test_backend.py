"""Backend choice (NumPy / CuPy), the CuPy isolation rule, and the ONNX Runtime provider choice.

Tests marked ``gpu`` need CuPy and a visible CUDA device; they skip cleanly without them. The
CPU path is checked through ``array_api_strict`` in test_spectra.py and test_factorize.py.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
from builders import MNIST, REPO
from threadpoolctl import threadpool_info

from onnx_lowrank import RuntimeMissingError
from onnx_lowrank.backend import cuda_available, get_backend, numpy_backend
from onnx_lowrank.discover import discover
from onnx_lowrank.factorize import factorize, relative_error
from onnx_lowrank.spectra import compute_spectra
from onnx_lowrank.validate import providers_for

needs_gpu = pytest.mark.skipif(not cuda_available(), reason="needs CuPy and a CUDA device")
CUDA_EP = "CUDAExecutionProvider"


def test_cpu_and_auto_backends():
    assert get_backend("cpu").name == "numpy"
    assert get_backend("auto").name == ("cupy" if cuda_available() else "numpy")
    backend = numpy_backend()
    array = backend.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert backend.to_numpy(array).dtype == np.float64


@pytest.mark.skipif(cuda_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_one_line_error():
    with pytest.raises(RuntimeMissingError, match="--device cpu"):
        get_backend("cuda")


def test_backend_is_the_only_module_that_imports_cupy():
    pattern = re.compile(r"^\s*(import cupy|from cupy)", re.MULTILINE)
    importers = sorted(
        path.name
        for path in (REPO / "onnx_lowrank").glob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    )
    assert importers == ["backend.py"]


def test_importing_and_compressing_on_cpu_never_imports_cupy(tmp_path):
    """A stand-in ``cupy`` package first on the path shows any import of it, installed or not."""
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text("")
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from onnx_lowrank import CompressionConfig, compress\n"
        f"compress({str(MNIST)!r}, CompressionConfig(params=0.5, device='cpu', latency_runs=1))\n"
        "print('cupy' in sys.modules)\n"
        "import onnx_lowrank.backend as backend\n"
        "backend.cuda_available()\n"
        "print('cupy' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split() == ["False", "True"]


def blas_threads() -> list[int]:
    return [info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"]


def test_parallel_work_limits_blas_and_restores_it_even_when_nested():
    before = blas_threads()
    backend = numpy_backend(2)
    with backend.parallel() as executor:
        assert all(count == 1 for count in blas_threads())
        inner = executor.submit(lambda: list(backend.map(lambda x: x * x, range(5)))).result()
        assert inner == [0, 1, 4, 9, 16]
    assert blas_threads() == before
    assert list(backend.map(lambda x: -x, range(7))) == [0, -1, -2, -3, -4, -5, -6]
    assert blas_threads() == before


def test_results_do_not_depend_on_the_number_of_workers():
    """Every matrix is decomposed on its own, so outputs are bit-identical for any core count."""
    discovery = discover(onnx.load(MNIST))
    one, two = numpy_backend(1), numpy_backend(2)
    spectra_one, spectra_two = (
        compute_spectra(discovery, 8, one),
        compute_spectra(discovery, 8, two),
    )
    for name, spectrum in spectra_one.items():
        for groups, values in spectrum.singular_values.items():
            assert np.array_equal(spectra_two[name].singular_values[groups], values)
    weight = discovery.weight(discovery.layers[1])
    a, b = factorize(weight, 4, 5, one), factorize(weight, 4, 5, two)
    assert np.array_equal(a.first, b.first) and np.array_equal(a.second, b.second)


def test_provider_choice_with_the_installed_onnx_runtime(caplog):
    """Uses the real onnxruntime: CUDA first exactly when it offers the CUDA EP."""
    has_cuda_ep = CUDA_EP in onnxruntime.get_available_providers()
    assert providers_for("cpu") == ["CPUExecutionProvider"]
    expected = [CUDA_EP, "CPUExecutionProvider"] if has_cuda_ep else ["CPUExecutionProvider"]
    with caplog.at_level(logging.WARNING, logger="onnx_lowrank.validate"):
        assert providers_for("auto") == expected
        auto_warnings = list(caplog.records)
        caplog.clear()
        assert providers_for("cuda") == expected
    if not has_cuda_ep:
        # auto falls back quietly unless CuPy sees a GPU; cuda always says so, in one line
        assert len(auto_warnings) == (1 if cuda_available() else 0)
        assert len(caplog.records) == 1
        message = caplog.records[0].getMessage()
        assert "validating on the CPU" in message and "\n" not in message


@pytest.mark.gpu
@needs_gpu
def test_gpu_spectra_and_factors_match_the_cpu():
    discovery = discover(onnx.load(MNIST))
    gpu, cpu = get_backend("cuda"), numpy_backend()
    on_gpu, on_cpu = compute_spectra(discovery, 8, gpu), compute_spectra(discovery, 8, cpu)
    for name, spectrum in on_cpu.items():
        for groups, values in spectrum.singular_values.items():
            result = on_gpu[name].singular_values[groups]
            assert isinstance(result, np.ndarray)
            np.testing.assert_allclose(result, values, atol=1e-10 * values.max())
    for layer in discovery.layers:
        weight = discovery.weight(layer)
        rank = max(1, min(layer.out_channels, layer.cols) // 3)
        a, b = factorize(weight, 1, rank, gpu), factorize(weight, 1, rank, cpu)
        np.testing.assert_allclose(a.second @ a.first[0], b.second @ b.first[0], atol=1e-8)
        norm = on_cpu[layer.name].spectral_norm
        assert relative_error(weight, a, norm, gpu) == pytest.approx(
            relative_error(weight, b, norm, cpu), rel=1e-8
        )


@pytest.mark.gpu
@pytest.mark.skipif(
    CUDA_EP not in onnxruntime.get_available_providers(), reason="needs onnxruntime-gpu"
)
def test_validation_reports_the_provider_it_really_used():
    from onnx_lowrank import CompressionConfig, compress

    result = compress(MNIST, CompressionConfig(params=0.5, device="cuda", latency_runs=2))
    assert result.report.validation.provider in (CUDA_EP, "CPUExecutionProvider")
