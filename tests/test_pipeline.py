"""compress() and inspect() end to end on the real MNIST sample and on tiny models."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS, check_model, conv_model, low_rank, mnist_images, rel_l2, run

import onnx_lowrank
from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cost import count_parameters


def mnist_feeds(count: int = 256) -> dict[str, np.ndarray]:
    return {"input": mnist_images(count, "test")}


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_mnist_params_budget_is_met_and_reported_truthfully(fraction):
    result = compress(MNIST, CompressionConfig(params=fraction, latency_runs=2))
    report = result.report
    real = count_parameters(result.model)
    assert report.params_after == real
    assert report.params_before == count_parameters(onnx.load(MNIST)) == 421_642
    assert real <= fraction * report.params_before * 1.01
    assert real >= fraction * report.params_before * 0.9  # the budget is used, not wasted
    check_model(result.model)
    assert report.validation is not None and report.validation.passed
    layer_sum = sum(layer.params_after for layer in report.layers)
    biases = 32 + 64 + 128 + 10
    assert layer_sum + biases == real


def test_mnist_accuracy_stays_close_under_light_compression():
    result = compress(MNIST, CompressionConfig(params=0.9, validate=False))
    data = np.load(MNIST.parent / "mnist_test.npz")
    feeds = mnist_feeds(1000)
    labels = data["labels"][:1000]
    (before,), (after,) = run(onnx.load(MNIST), feeds), run(result.model, feeds)
    accuracy_before = np.mean(before.argmax(1) == labels)
    accuracy_after = np.mean(after.argmax(1) == labels)
    assert accuracy_before > 0.98
    assert accuracy_after > accuracy_before - 0.03


def test_full_budget_factorizes_nothing():
    result = compress(MNIST, CompressionConfig(params=1.0, validate=False))
    assert result.report.params_after == result.report.params_before
    assert result.report.compressed_layers == []


def test_exact_low_rank_model_is_reproduced_under_a_fitting_budget():
    weight = low_rank(32, 16 * 9, 4).reshape(32, 16, 3, 3)
    model = conv_model(weight, (10, 10), pads=[1, 1, 1, 1])
    dense = 32 * 16 * 9
    fraction = (4 * (32 + 16 * 9) + 32) / (dense + 32) + 1e-6  # rank 4 plus the bias fits
    result = compress(model, CompressionConfig(params=fraction, latency_runs=2))
    assert [layer.rank for layer in result.report.compressed_layers] == [4]
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 16, 10, 10)).astype(np.float32)}
    assert rel_l2(run(model, feeds)[0], run(result.model, feeds)[0]) < 1e-4
    assert result.report.validation.outputs[0].rel_l2_error < 1e-4


def test_input_model_object_is_not_modified():
    model = onnx.load(MNIST)
    before = model.SerializeToString()
    compress(model, CompressionConfig(params=0.5, validate=False))
    assert model.SerializeToString() == before


def test_same_input_gives_byte_identical_output(tmp_path):
    config = CompressionConfig(params=0.4, validate=False)
    first = compress(MNIST, config).model.SerializeToString()
    second = compress(MNIST, config).model.SerializeToString()
    assert first == second


def test_validation_with_real_inputs_and_tolerances(tmp_path):
    path = tmp_path / "inputs.npz"
    np.savez(path, **mnist_feeds(64))
    result = compress(MNIST, CompressionConfig(params=0.8, inputs=str(path), latency_runs=2))
    output = result.report.validation.outputs[0]
    assert output.top1_agreement is not None and output.top1_agreement > 0.9
    strict = CompressionConfig(params=0.2, inputs=str(path), max_rel_error=1e-6, latency_runs=1)
    failed = compress(MNIST, strict)
    assert not failed.report.validation.passed
    assert "logits" in failed.report.validation.failures[0]
    with pytest.raises(onnx_lowrank.ValidationFailedError):
        failed.save(tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_inspect_lists_layers_and_skips():
    listing = onnx_lowrank.inspect(MODELS / "ppocr_mobile_v2.0_cls.onnx")
    reasons = [layer.skipped_reason for layer in listing.layers if layer.skipped_reason]
    assert len(reasons) == 11 and all("depthwise" in reason for reason in reasons)
    assert listing.params == count_parameters(onnx.load(MODELS / "ppocr_mobile_v2.0_cls.onnx"))


def test_public_api_is_pinned():
    assert sorted(onnx_lowrank.__all__) == sorted(
        [
            "CalibrationError",
            "CompressionConfig",
            "CompressionReport",
            "CompressionResult",
            "ConfigError",
            "InfeasibleBudgetError",
            "InspectionReport",
            "InvalidModelError",
            "LayerReport",
            "ModelFileError",
            "NothingToCompressError",
            "OnnxLowRankError",
            "OutputPathError",
            "RuntimeMissingError",
            "ShapeError",
            "SweepResult",
            "UnsupportedModelError",
            "ValidationFailedError",
            "__version__",
            "compress",
            "inspect",
            "plot_layers",
            "sweep",
        ]
    )


EXACT_CONV_CASES = {
    "2d-stride-pad": ((3, 3), (11, 10), {"strides": [2, 2], "pads": [1, 0, 1, 0]}),
    "2d-dilation": ((3, 3), (12, 12), {"dilations": [2, 2]}),
    "2d-same-upper": ((3, 2), (7, 8), {"auto_pad": "SAME_UPPER", "strides": [2, 1]}),
    "1d": ((5,), (30,), {"strides": [2], "pads": [2, 1]}),
    "3d": ((3, 3, 3), (5, 6, 5), {"pads": [1, 1, 1, 1, 1, 1]}),
}


def _fitting_fraction(f: int, cols: int, groups: int, rank: int, fixed: int) -> float:
    """The params fraction that fits exactly rank ``rank`` in ``groups`` groups."""
    return (rank * (groups * f + cols) + fixed) / (f * cols + fixed) + 1e-9


@pytest.mark.parametrize("case", sorted(EXACT_CONV_CASES))
@pytest.mark.parametrize("groups", [1, 2])
def test_alds_budget_that_fits_the_exact_ranks_reproduces_conv_outputs(case, groups):
    kernel, spatial, attributes = EXACT_CONV_CASES[case]
    f, c, rank = 24, 8, 2
    kappa = int(np.prod(kernel))
    weight = low_rank(f, c * kappa, rank, seed=5, groups=groups).reshape(f, c, *kernel)
    model = conv_model(weight, spatial, **attributes)
    fraction = _fitting_fraction(f, c * kappa, groups, rank, fixed=f)
    result = compress(model, CompressionConfig(params=fraction, latency_runs=1))
    (layer,) = result.report.compressed_layers
    assert (layer.groups, layer.rank) == (groups, rank)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, c, *spatial)).astype(np.float32)}
    assert rel_l2(run(model, feeds)[0], run(result.model, feeds)[0]) < 1e-4
    check_model(result.model)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("groups", [1, 3])
def test_alds_budget_that_fits_the_exact_ranks_reproduces_gemm_outputs(trans_a, trans_b, groups):
    from builders import gemm_model

    f, c, rank = 30, 24, 2
    weight = low_rank(f, c, rank, seed=6, groups=groups)
    bias = np.linspace(-1, 1, f).astype(np.float32)
    model = gemm_model(
        weight if trans_b else weight.T.copy(),
        trans_a=trans_a,
        trans_b=trans_b,
        alpha=0.5,
        beta=2.0,
        bias=bias,
    )
    fraction = _fitting_fraction(f, c, groups, rank, fixed=f)
    shape = (c, 7) if trans_a else (7, c)
    config = CompressionConfig(params=fraction, input_shapes={"a": shape}, latency_runs=1)
    result = compress(model, config)
    (layer,) = result.report.compressed_layers
    assert (layer.groups, layer.rank) == (groups, rank)
    a = np.random.default_rng(2).standard_normal(shape)
    feeds = {"a": a.astype(np.float32)}
    assert rel_l2(run(model, feeds)[0], run(result.model, feeds)[0]) < 1e-4


@pytest.mark.parametrize("groups", [1, 4])
def test_alds_budget_that_fits_the_exact_ranks_reproduces_3d_matmul_outputs(groups):
    from builders import matmul_model

    f, c, rank = 20, 32, 2
    weight = low_rank(f, c, rank, seed=7, groups=groups)
    model = matmul_model(weight.T.copy(), ["batch", "seq"])
    fraction = _fitting_fraction(f, c, groups, rank, fixed=0)
    config = CompressionConfig(params=fraction, input_shapes={"x": (2, 5, c)}, latency_runs=1)
    result = compress(model, config)
    (layer,) = result.report.compressed_layers
    assert (layer.groups, layer.rank) == (groups, rank)
    feeds = {"x": np.random.default_rng(3).standard_normal((3, 9, c)).astype(np.float32)}
    assert rel_l2(run(model, feeds)[0], run(result.model, feeds)[0]) < 1e-4


def test_validation_inputs_are_checked_before_any_heavy_work(tmp_path):
    events = []
    with pytest.raises(onnx_lowrank.ShapeError, match="--flops needs the MACs"):
        compress(
            MODELS / "ppocr_mobile_v2.0_cls.onnx",  # height and width are dynamic
            CompressionConfig(flops=0.7),
            progress=lambda *event: events.append(event),
        )
    assert events == []
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 1, 28, 28), np.float32))
    with pytest.raises(onnx_lowrank.CalibrationError, match="missing input"):
        compress(
            MNIST,
            CompressionConfig(params=0.7, inputs=str(wrong)),
            progress=lambda *event: events.append(event),
        )
    assert events == []
