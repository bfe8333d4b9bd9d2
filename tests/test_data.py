"""Inputs in the formats people have: .npz, .npy, a folder of .npy (one per input name or one
per sample), and make-calibration from a folder of images."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import MNIST, SAMPLES, make_model
from onnx import helper

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cli import main
from onnx_lowrank.data import file_name, read_arrays
from onnx_lowrank.errors import CalibrationError


def _two_inputs():
    nodes = [helper.make_node("Add", ["a/x", "b:0"], ["y"])]
    return make_model(nodes, [("a/x", ["n", 3]), ("b:0", ["n", 3])], [("y", None)])


def _one_input():
    return make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", ["n", 2, 3])], [("y", None)])


def test_npy_file_and_folders(tmp_path):
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((4, 2, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", batch)
    assert np.array_equal(read_arrays(tmp_path / "x.npy", _one_input())["x"], batch)
    # one file per sample, without and with a leading batch of 1
    for folder, samples in (("plain", batch), ("batched", batch[:, None])):
        (tmp_path / folder).mkdir()
        for index, sample in enumerate(samples):
            np.save(tmp_path / folder / f"{index:03d}.npy", sample)
        assert np.array_equal(read_arrays(tmp_path / folder, _one_input())["x"], batch)
    # one file per input name, with / and : written as _
    assert file_name("a/x") == "a_x.npy" and file_name("b:0") == "b_0.npy"
    (tmp_path / "inputs").mkdir()
    np.save(tmp_path / "inputs" / "a_x.npy", batch[:, 0])
    np.save(tmp_path / "inputs" / "b_0.npy", batch[:, 1])
    arrays = read_arrays(tmp_path / "inputs", _two_inputs())
    assert np.array_equal(arrays["a/x"], batch[:, 0]) and np.array_equal(arrays["b:0"], batch[:, 1])


@pytest.mark.parametrize(
    ("layout", "model", "message"),
    [
        ("npy", _two_inputs, "the model has 2 inputs"),
        ("empty", _one_input, "has no .npy files"),
        ("wrong-names", _two_inputs, "must hold one .npy per model input (a_x.npy, b_0.npy)"),
        ("ragged", _one_input, "samples differ in shape"),
        ("big-samples", _one_input, "has a batch of 2"),
        ("corrupt", _one_input, "cannot be read"),
        ("missing", _one_input, "not found"),
    ],
)
def test_bad_layouts_get_one_clear_error(tmp_path, layout, model, message):
    path = tmp_path / "data"
    if layout in ("npy", "corrupt", "missing"):
        path = tmp_path / "data.npy"
        if layout == "npy":
            np.save(path, np.zeros((2, 3), np.float32))
        elif layout == "corrupt":
            path.write_bytes(b"\x93NUMPY\x01\x00garbage")
    else:
        path.mkdir()
        files = {
            "empty": {},
            "wrong-names": {"a.npy": (2, 3), "b.npy": (2, 3)},
            "ragged": {"0.npy": (2, 3), "1.npy": (2, 4)},
            "big-samples": {"0.npy": (2, 2, 3)},
        }[layout]
        for name, shape in files.items():
            np.save(path / name, np.zeros(shape, np.float32))
    with pytest.raises(CalibrationError) as error:
        read_arrays(path, model(), "--calibration")
    assert message in str(error.value) and "--calibration" in str(error.value)


def test_real_model_calibrates_the_same_from_npz_npy_and_a_folder(tmp_path):
    """MNIST: 64 calibration images as an .npz, an .npy, and a folder of one .npy per sample
    give the same compressed model, byte for byte; validation inputs as .npy work too."""
    images = np.load(SAMPLES / "mnist_train_calib.npz")["images"][:64]
    batch = ((images.astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None]
    np.savez(tmp_path / "c.npz", input=batch)
    np.save(tmp_path / "c.npy", batch)
    (tmp_path / "samples").mkdir()
    for index, sample in enumerate(batch):
        np.save(tmp_path / "samples" / f"{index:04d}.npy", sample)
    models = []
    for source in ("c.npz", "c.npy", "samples"):
        validated = source == "c.npy"
        config = CompressionConfig(
            params=0.4,
            calibration=str(tmp_path / source),
            inputs=str(tmp_path / "c.npy") if validated else None,
            min_top1=0.5 if validated else None,
            latency_runs=1,
            max_groups=2,
            validate=validated,
        )
        result = compress(MNIST, config)
        assert result.report.calibration["samples"] == 64 - 16  # 16 held out (--error network)
        if config.validate:
            assert result.report.validation.passed
        models.append(result.model.SerializeToString())
    assert models[0] == models[1] == models[2]


def test_make_calibration_command_matches_the_model_preprocessing(tmp_path, capsys):
    image_module = pytest.importorskip("PIL.Image")
    images = np.load(SAMPLES / "mnist_train_calib.npz")["images"][:6]
    folder = tmp_path / "digits"
    folder.mkdir()
    for index, image in enumerate(images):
        image_module.fromarray(image).save(folder / f"{index}.png")
    out = tmp_path / "calib.npz"
    args = ["--model", str(MNIST), "--grayscale", "--mean", "0.1307", "--std", "0.3081"]
    assert main(["make-calibration", str(folder), str(out), *args]) == 0
    assert "wrote 6 samples of shape (1, 28, 28) as 'input'" in capsys.readouterr().out
    expected = ((images.astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None]
    np.testing.assert_allclose(np.load(out)["input"], expected, atol=1e-5)
    # usable as it is
    out_model = tmp_path / "small.onnx"
    argv = ["compress", str(MNIST), str(out_model), "--params", "0.5", "--calibration", str(out)]
    assert main([*argv, "--max-groups", "2", "--latency-runs", "1", "-q"]) == 0
    onnx.checker.check_model(onnx.load(out_model))
    assert main(["make-calibration", str(tmp_path / "nothing"), str(out), "--size", "2", "2"]) == 2
    assert "is not a folder of images" in capsys.readouterr().err
