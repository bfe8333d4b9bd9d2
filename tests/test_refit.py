"""Sequential anchored refit (refit.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import MNIST, SAMPLES, check_model, make_model, random_feed, run
from onnx import helper

from onnx_lowrank import CompressionConfig
from onnx_lowrank.choices import recipe_config
from onnx_lowrank.cli import main
from onnx_lowrank.errors import ConfigError
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.refit import MAX_BYTES, RIDGE, _Sums, levels, refit_layers
from onnx_lowrank.report import format_summary
from onnx_lowrank.whiten import factorize_layers


def two_layer_model(seed=0):
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((16, 12)).astype(np.float32)
    second = rng.standard_normal((12, 10)).astype(np.float32)
    bias = rng.standard_normal(12).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h"], name="gemm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="matmul2"),
    ]
    return make_model(
        nodes, [("x", ["N", 16])], [("y", None)], {"W1": first, "B1": bias, "W2": second}
    )


def _calibration(tmp_path, model_inputs):
    path = tmp_path / "calibration.npz"
    np.savez(path, **model_inputs)
    return path


def test_levels_follow_the_graph():
    model = two_layer_model()
    analysis = analyze(model, CompressionConfig(validate=False))
    names = [layer.name for layer in analysis.discovery.layers]
    assert levels(analysis.discovery, names) == {names[0]: 0, names[1]: 1}
    assert levels(analysis.discovery, names[1:]) == {names[1]: 0}


def test_first_layer_refit_is_the_calibrated_solution(tmp_path):
    """A layer that sees the original inputs (X̂ = X) gets back its calibrated factors."""
    model = two_layer_model()
    path = _calibration(tmp_path, {"x": random_feed((400, 16), 1)})
    config = CompressionConfig(params=1.0, calibration=str(path), validate=False)
    analysis = analyze(model, config)
    first = analysis.discovery.layers[0]
    chosen = [(first, 1, 4)]
    calibrated = factorize_layers(analysis.calibration, analysis.discovery, chosen)
    refitted = refit_layers(analysis.discovery, analysis.calibration, calibrated)
    before, after = calibrated[first.name], refitted[first.name]
    np.testing.assert_allclose(after.factors.second, before.factors.second, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(after.biases[first.name], before.biases[first.name], atol=1e-5)


def test_refit_lowers_the_network_error_on_real_models(tmp_path):
    """MNIST CNN at 20 % of the parameters: refitting every layer on the compressed model's
    inputs brings the logits on unseen test images closer to the original's."""
    data = np.load(SAMPLES / "mnist_train_calib.npz")
    images = ((data["images"][:200].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    path = _calibration(tmp_path, {"input": images})
    test = np.load(SAMPLES / "mnist_test.npz")
    x = ((test["images"][:500].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    reference = run(onnx.load(MNIST), {"input": x})[0]
    # --error output spreads the cut over every layer (--error network cuts the classifier
    # alone at 20 %, where a refit has no compressed layer upstream to correct for)
    base = CompressionConfig(params=0.2, calibration=str(path), validate=False, error="output")
    analysis = analyze(MNIST, base)
    tables = candidate_tables(analysis, base)
    choices = choose(analysis, tables, base)
    errors, sizes = {}, {}
    for refit in (False, True):
        config = base.replace(refit=refit)
        result = realize(analysis, tables, choices, config)
        check_model(result.model)
        out = run(result.model, {"input": x})[0]
        errors[refit] = np.linalg.norm(out - reference) / np.linalg.norm(reference)
        sizes[refit] = result.report.params_after
        if refit:
            assert "refit" in result.report.timings
    assert sizes[True] == sizes[False]  # the same allocation: only U and the biases change
    assert errors[True] < 0.8 * errors[False]


def test_refit_needs_calibration(tmp_path, capsys):
    """Asked for without calibration data, the refit is a one-line error, not a no-op."""
    with pytest.raises(ConfigError, match=r"--refit .* needs --calibration"):
        CompressionConfig(params=0.5, refit=True, validate=False)
    assert CompressionConfig(params=0.5).refit is False
    model = tmp_path / "model.onnx"
    onnx.save(two_layer_model(), model)
    out = tmp_path / "out.onnx"
    assert main(["compress", str(model), "-o", str(out), "--params", "0.5", "--refit", "-q"]) == 2
    err = capsys.readouterr().err
    assert "needs --calibration" in err and "Traceback" not in err
    assert not out.exists()


def test_refit_default_follows_calibration(tmp_path):
    path = _calibration(tmp_path, {"x": random_feed((64, 16), 1)})
    on = CompressionConfig(params=0.5, calibration=str(path))
    assert on.refit is True and on.to_dict()["refit"] is True
    assert (
        on.replace(calibration=None, error="bound").refit is False
    )  # the default follows the data
    off = on.replace(refit=False)
    assert off.replace(calibration=str(path)).refit is False  # a choice is kept


def test_refit_is_the_default_with_calibration(tmp_path):
    """Tiny model, Python API: with calibration the refit runs unless turned off, the report
    says so, and it changes the model (the second layer sees the compressed first one)."""
    model = two_layer_model()
    path = _calibration(tmp_path, {"x": random_feed((400, 16), 1)})
    base = CompressionConfig(params=0.5, calibration=str(path), validate=False)
    analysis = analyze(model, base)
    tables = candidate_tables(analysis, base)
    choices = choose(analysis, tables, base)
    default = realize(analysis, tables, choices, base)
    plain = realize(analysis, tables, choices, base.replace(refit=False))
    assert default.report.config["refit"] is True and "refit" in default.report.timings
    assert default.report.calibration["refit"] is True
    assert default.report.calibration["refitted_layers"] == len(default.report.compressed_layers)
    assert "refit: " in format_summary(default.report)
    assert plain.report.calibration == {**default.report.calibration, "refit": False,
                                        "refitted_layers": 0}  # fmt: skip
    assert "refit" not in plain.report.timings
    assert "refit: off (--no-refit)" in format_summary(plain.report)
    x = random_feed((8, 16), 2)
    assert not np.allclose(run(default.model, {"x": x})[0], run(plain.model, {"x": x})[0])


def test_cli_refits_by_default_with_calibration(tmp_path):
    """MNIST CNN, command line: ``--calibration`` alone refits (report and JSON say so);
    ``--no-refit`` gives the calibrated model without it, a different one."""
    data = np.load(SAMPLES / "mnist_train_calib.npz")
    images = ((data["images"][:96].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    path = _calibration(tmp_path, {"input": images})
    test = np.load(SAMPLES / "mnist_test.npz")
    x = ((test["images"][:64].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    outputs, reports = {}, {}
    for flags in ((), ("--no-refit",)):
        out, report = tmp_path / f"m{len(flags)}.onnx", tmp_path / f"r{len(flags)}.json"
        args = ["compress", str(MNIST), "-o", str(out), "--params", "0.2", "--calibration"]
        args += [str(path), "--no-validate", "--no-latency-check", "--report", str(report)]
        assert main([*args, *flags, "-q"]) == 0
        compressed = onnx.load(out)
        check_model(compressed)
        outputs[flags] = run(compressed, {"input": x})[0]
        reports[flags] = json.loads(report.read_text())
    on, off = reports[()], reports[("--no-refit",)]
    assert on["config"]["refit"] is True and on["calibration"]["refit"] is True
    assert on["calibration"]["refitted_layers"] >= 1 and "refit" in on["timings"]
    assert off["config"]["refit"] is False and off["calibration"]["refit"] is False
    assert "refit" not in off["timings"]
    assert on["params_after"] == off["params_after"]  # the same allocation
    assert not np.allclose(outputs[()], outputs[("--no-refit",)], atol=1e-4)


def test_recipes_and_config_files_keep_the_refit_choice(tmp_path):
    """A recipe carries an explicit ``--no-refit`` over, while a refit that was only the
    default follows the new run's calibration; a --config file can turn it off."""
    model = tmp_path / "model.onnx"
    onnx.save(two_layer_model(), model)
    path = _calibration(tmp_path, {"x": random_feed((64, 16), 1)})
    reports = {}
    for name, flags in (("free", []), ("off", ["--calibration", str(path), "--no-refit"])):
        reports[name] = tmp_path / f"{name}.json"
        args = ["compress", str(model), "-o", str(tmp_path / f"{name}.onnx"), "--params", "0.5"]
        args += [*flags, "--no-validate", "--report", str(reports[name]), "-q"]
        assert main(args) == 0
    assert recipe_config(reports["free"]).refit is False
    assert recipe_config(reports["free"], calibration=str(path)).refit is True
    assert recipe_config(reports["off"]).refit is False
    assert recipe_config(reports["off"], refit=True).refit is True
    settings = tmp_path / "run.toml"
    settings.write_text(f'calibration = "{path}"\nrefit = false\n')
    for extra, expected in (([], False), (["--refit"], True)):
        report = tmp_path / f"file{len(extra)}.json"
        args = ["compress", str(model), "-o", str(tmp_path / f"f{len(extra)}.onnx"), "--params"]
        args += ["0.5", "--config", str(settings), "--no-validate", "--report", str(report)]
        assert main([*args, *extra, "-q"]) == 0
        assert json.loads(report.read_text())["config"]["refit"] is expected
    again = tmp_path / "again.json"
    args = ["compress", str(model), "-o", str(tmp_path / "again.onnx"), "--recipe"]
    args += [str(reports["free"]), "--calibration", str(path), "--no-validate"]
    assert main([*args, "--report", str(again), "-q"]) == 0
    assert json.loads(again.read_text())["calibration"]["refit"] is True


def _direct_solution(sums, original, compressed):
    """``(T Zₐᵀ + λ P₀)(Zₐ Zₐᵀ + λ I)⁻¹`` formed explicitly (refit.py's formula)."""
    blocks = compressed.reshape(len(compressed), sums.groups, -1)
    z = np.concatenate(
        [blocks[:, group] @ sums.first[group].T for group in range(sums.groups)], axis=1
    )
    z = np.concatenate([z, np.ones((len(z), 1))], axis=1).T  # Zₐ, (d, n)
    target = sums.weight @ original.T  # T, (f, n)
    gram = z @ z.T
    size = len(gram)
    shrink = np.trace(gram) / z.shape[1] + RIDGE * np.trace(gram) / size
    return (target @ z.T + shrink * sums.prior) @ np.linalg.inv(gram + shrink * np.eye(size))


@pytest.mark.parametrize(("vectors", "form"), [(5, "dual"), (300, "primal"), (300, "thinned")])
def test_dual_primal_and_thinned_systems_solve_the_refit_least_squares(tmp_path, vectors, form):
    """Fewer vectors than unknowns (d = g·r + 1 = 9): the n × n dual system; more: the d × d
    Gram matrix; with ``max_bytes`` one byte short of the Gram matrix and its copy (16·9²),
    the dual system on every stride-th vector. Each equals the explicit formula on the
    vectors it used."""
    model = two_layer_model()
    path = _calibration(tmp_path, {"x": random_feed((64, 16), 1)})
    analysis = analyze(model, CompressionConfig(params=1.0, calibration=str(path), validate=False))
    first = analysis.discovery.layers[0]
    calibrated = factorize_layers(analysis.calibration, analysis.discovery, [(first, 2, 4)])
    weight = analysis.discovery.weight(first)
    max_bytes = MAX_BYTES if form != "thinned" else 16 * 9 * 9 - 1
    sums = _Sums(first, weight, calibrated[first.name], 1.0, max_bytes=max_bytes)
    rng = np.random.default_rng(3)
    original = rng.standard_normal((vectors, 16))
    compressed = original + 0.1 * rng.standard_normal((vectors, 16))
    for start in range(0, vectors, 7):  # in chunks, as refit_layers feeds them
        sums.add(original[start : start + 7], compressed[start : start + 7])
    solution = sums.solve()
    assert (sums.gram is not None) == (form == "primal")
    used = slice(None, None, sums.stride)
    assert (sums.stride > 1) == (form == "thinned")
    assert sums.count == len(original[used])
    expected = _direct_solution(sums, original[used], compressed[used])
    np.testing.assert_allclose(solution, expected, rtol=1e-8, atol=1e-10)


def test_reused_original_inputs_give_the_same_refit(tmp_path):
    """The original model's inputs of every level from one pass, sliced by each batch of the
    compressed model's passes, refit exactly as running both models at every level (MNIST
    CNN, every layer at a quarter of its rank, 96 images: four levels)."""
    data = np.load(SAMPLES / "mnist_train_calib.npz")
    images = ((data["images"][:96].astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]
    path = _calibration(tmp_path, {"input": images})
    config = CompressionConfig(params=1.0, calibration=str(path), validate=False)
    analysis = analyze(str(MNIST), config)
    layers = [
        (layer, 1, max(1, min(layer.out_channels, layer.cols) // 4))
        for layer in analysis.discovery.layers
    ]
    calibrated = factorize_layers(analysis.calibration, analysis.discovery, layers)
    stages = []
    reused = refit_layers(
        analysis.discovery, analysis.calibration, calibrated, lambda *a: stages.append(a[0])
    )
    plain = refit_layers(
        analysis.discovery, analysis.calibration, calibrated, reuse_originals=False
    )
    assert "refit: original inputs" in stages
    assert len(set(levels(analysis.discovery, list(calibrated)).values())) > 1
    for name, item in plain.items():
        np.testing.assert_allclose(
            reused[name].factors.second, item.factors.second, rtol=1e-6, atol=1e-7
        )
        np.testing.assert_allclose(reused[name].shifts[name], item.shifts[name], atol=1e-6)
