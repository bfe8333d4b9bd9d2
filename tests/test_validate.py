"""Validation: verdicts that rest on every output they name, what they rest on, honest
latency, and memory that follows a cap rather than the output size."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import onnx
import pytest
from builders import MNIST, MODELS, conv_model, make_model, random_feed
from onnx import helper
from robust_helpers import cached

import onnx_lowrank
import onnx_lowrank.feeds as feeds_module
import onnx_lowrank.metrics as metrics_module
import onnx_lowrank.validate as validate_module
from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.cli import main
from onnx_lowrank.errors import ConfigError
from onnx_lowrank.feeds import latency_feeds, random_inputs
from onnx_lowrank.metrics import compare_output
from onnx_lowrank.plots import sweep_figure
from onnx_lowrank.report import format_sweep, format_validation
from onnx_lowrank.sessions import make_session
from onnx_lowrank.validate import validate

MTCNN = MODELS / "mtcnn_onet.onnx"
SILERO = MODELS / "silero_vad.onnx"
REAL = MNIST.parent / "mnist_test.npz"


def test_latency_uses_one_sample_of_a_dynamic_batch():
    model = onnx.load(MNIST)
    feeds = random_inputs(model, {})
    assert feeds["input"].shape[0] == feeds_module.RANDOM_BATCH
    batch, timed = latency_feeds(model, feeds)
    assert batch == 1
    np.testing.assert_array_equal(timed["input"], feeds["input"][:1])


def test_latency_uses_the_full_inputs_of_a_static_batch():
    weight = random_feed((4, 3, 3, 3))
    model = conv_model(weight, (6, 6), batch=2)
    feeds = {"x": random_feed((2, 3, 6, 6))}
    batch, timed = latency_feeds(model, feeds)
    assert batch is None and timed["x"].shape == (2, 3, 6, 6)


def test_real_model_report_records_latency_batch_and_runs():
    result = compress(MNIST, CompressionConfig(params=0.5, latency_runs=3))
    report = result.report.validation
    assert report.passed and report.provider == "CPUExecutionProvider"
    assert report.latency_batch == 1 and report.latency_runs == 3
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0
    assert report.to_dict()["latency_runs"] == 3
    assert report.rows_per_run == 7  # one row first, then the other 7 (far under the cap)


def test_latency_stops_at_the_time_budget(monkeypatch):
    """With no time budget, only the minimum number of pairs is timed."""
    monkeypatch.setattr(validate_module, "LATENCY_BUDGET_S", 0.0)  # and the default runs
    model = onnx.load(MNIST)
    report = validate(model, model, CompressionConfig(params=0.5, latency_runs=50))
    assert report.latency_runs == validate_module.MIN_LATENCY_RUNS
    short = validate(model, model, CompressionConfig(params=0.5, latency_runs=2))
    assert short.latency_runs == 2  # never more than asked
    assert report.outputs[0].max_abs_error == 0.0


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_validation_runs_on_the_provider_it_reports(device):
    model = onnx.load(MNIST)
    report = validate(model, model, CompressionConfig(params=0.5, device=device, latency_runs=1))
    assert report.provider in validate_module.providers_for(device)


def test_validation_is_called_passed_only_when_tolerances_were_checked():
    loose = compress(MNIST, CompressionConfig(params=0.5, latency_runs=1)).report.validation
    assert loose.passed and loose.tolerances == {}
    text = format_validation(loose)
    assert "ran (no tolerances set: only shapes and NaN/Inf were checked)" in text
    assert "PASSED" not in text and "warning" not in text  # MNIST at 50 %: cosine 0.98
    config = CompressionConfig(params=0.5, latency_runs=1, min_cosine=0.5, max_rel_error=0.9)
    checked = compress(MNIST, config).report.validation
    assert checked.tolerances == {"max_rel_error": 0.9, "min_cosine": 0.5}
    assert "PASSED (--max-rel-error 0.9 on logits; --min-cosine 0.5 on logits)" in (
        format_validation(checked)
    )
    assert checked.to_dict()["tolerances"] == {"max_rel_error": 0.9, "min_cosine": 0.5}


def test_outputs_far_from_the_original_get_a_warning_even_without_tolerances():
    # svd at 10 % of the parameters breaks the MNIST CNN
    report = compress(MNIST, CompressionConfig(params=0.1, method="svd", latency_runs=1)).report
    (output,) = report.validation.outputs
    assert report.validation.passed and output.cosine_similarity < 0.9
    warning = f"warning: logits is far from the original (cosine {output.cosine_similarity:.3f})"
    assert warning in format_validation(report.validation)


# --- item 1: top-1 on every output with a class axis ----------------------------------------


def sequence_head(path) -> None:
    """A MatMul head with (N, 16, 64) logits: x (N, 16, 64) @ W1 (64, 128), Relu, @ W2."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2"),
    ]
    weights = {
        "W1": rng.standard_normal((64, 128)).astype(np.float32),
        "W2": rng.standard_normal((128, 64)).astype(np.float32),
    }
    model = make_model(nodes, [("x", ["N", 16, 64])], [("logits", None)], weights)
    onnx.save(model, path)


def test_min_top1_counts_every_position_of_a_sequence_output(tmp_path, capsys):
    """Before: --min-top1 skipped (N, 16, 64) logits in silence and the run passed."""
    sequence_head(tmp_path / "head.onnx")
    args = ["compress", str(tmp_path / "head.onnx"), "-o", str(tmp_path / "out.onnx")]
    args += ["--params", "0.2", "--min-top1", "0.99", "--latency-runs", "1"]
    assert main([*args, "--report", str(tmp_path / "r.json")]) == 3
    captured = capsys.readouterr()
    assert "logits: top-1 agreement" in captured.err and "(128 positions)" in captured.err
    assert not (tmp_path / "out.onnx").exists()
    (output,) = json.loads((tmp_path / "r.json").read_text())["validation"]["outputs"]
    assert output["top1_positions"] == 8 * 16 and output["top1_agreement"] < 0.99
    assert output["checked"] == {"min_top1": 0.99}


def test_min_top1_on_a_real_sequence_output():
    """khmersm's emissions are (1, seq, 2): one class decision per token, all counted."""
    path = cached("khmersm/model.onnx")
    config = CompressionConfig(
        params=0.5,
        min_top1=0.0,
        input_shapes={"x": (1, 20), "mask": (1, 20)},
        latency_runs=1,
    )
    (output,) = compress(path, config).report.validation.outputs
    assert output.shape == (1, 20, 2) and output.top1_positions == 20
    assert output.checked == {"min_top1": 0.0}


def test_a_tolerance_for_every_output_names_those_it_cannot_apply_to(tmp_path):
    """silero-vad: 'output' (B, 1) has no class axis; a bare --min-top1 says so, a named one
    refuses before any work."""
    np.savez(tmp_path / "in.npz", **silero_feeds())
    config = CompressionConfig(
        params=0.8, method="svd", inputs=str(tmp_path / "in.npz"), min_top1=0.0, latency_runs=1
    )
    report = compress(SILERO, config).report.validation
    assert report.passed and report.not_applicable == {"min_top1": ["output"]}
    assert report.checked_on == {"min_top1": ["stateN"]}
    assert "--min-top1 0 on stateN, not applicable to output (no class axis)" in (
        format_validation(report)
    )
    with pytest.raises(ConfigError, match=r"names output 'output', which has no class axis"):
        compress(SILERO, config.replace(min_top1={"output": 0.9}))


def silero_feeds() -> dict[str, np.ndarray]:
    return {
        "input": (0.1 * random_feed((1, 576))).astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, dtype=np.int64),
    }


def test_min_top1_that_can_apply_to_no_output_refuses():
    weight = random_feed((4, 3, 3, 3))
    model = conv_model(weight, (6, 6))  # y (N, 4, 4, 4): last axis 4, a class axis by the rule
    one = make_model(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], [("x", ["N"])], [("y", None)]
    )
    with pytest.raises(ConfigError, match="applies to no output"):
        validate(one, one, CompressionConfig(min_top1=0.5, latency_runs=1))
    report = validate(model, model, CompressionConfig(min_top1=0.5, latency_runs=1))
    assert report.outputs[0].top1_agreement == 1.0


# --- item 2: per-output tolerances ----------------------------------------------------------


def test_per_output_tolerances_on_mtcnn(tmp_path, capsys):
    """A score check on softmax_2 only: the box regression dense_5 is not checked."""
    base = ["compress", str(MTCNN), "-o", str(tmp_path / "o.onnx"), "--params", "0.5"]
    base += ["--latency-runs", "1", "-q"]
    assert main([*base, "--max-rel-error", "0.2"]) == 3  # dense_5: 0.35
    assert "dense_5: relative L2 error" in capsys.readouterr().err
    scores = ["--max-rel-error", "softmax_2:0.2", "--min-top1", "softmax_2:0.99"]
    report = tmp_path / "r.json"
    assert main([*base, *scores, "--min-cosine", "0.5", "--report", str(report)]) == 0
    validation = json.loads(report.read_text())["validation"]
    assert validation["checked_on"] == {
        "max_rel_error": ["softmax_2"],
        "min_cosine": ["dense_5", "dense_6", "softmax_2"],
        "min_top1": ["softmax_2"],
    }
    assert validation["tolerances"]["min_top1"] == {"softmax_2": 0.99}
    boxes = next(o for o in validation["outputs"] if o["name"] == "dense_5")
    assert boxes["checked"] == {"min_cosine": 0.5} and boxes["rel_l2_error"] > 0.2
    # A bare value for every output and a named override, through the Python API.
    config = CompressionConfig(params=0.5, latency_runs=1, max_rel_error={"*": 0.2, "dense_5": 0.6})
    checked = compress(MTCNN, config).report.validation
    assert checked.passed and checked.checked_on["max_rel_error"] == [
        "dense_5",
        "dense_6",
        "softmax_2",
    ]
    assert dict(checked.outputs[0].checked) == {"max_rel_error": 0.6}
    assert "--max-rel-error 0.2 dense_5:0.6 on all 3 outputs" in format_validation(checked)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--min-top1", "scores:0.9"],
            "names 'scores', which is not an output of the model; "
            "its outputs: dense_5, dense_6, softmax_2",
        ),
        (["--min-top1", "softmax_2:0.9", "--min-top1", "softmax_2:0.8"], "twice"),
        (["--min-top1", "0.9", "--min-top1", "0.8"], "a value for every output twice"),
        (["--max-rel-error", "boxes"], "expected a number for every output or OUTPUT:NUMBER"),
    ],
)
def test_bad_per_output_tolerances_are_exit_2_listing_the_outputs(
    tmp_path, capsys, options, message
):
    args = ["compress", str(MTCNN), "-o", str(tmp_path / "o.onnx"), "--params", "0.5", *options]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


# --- item 3: what the verdict rests on ------------------------------------------------------


def test_summary_and_report_say_how_many_samples_and_whether_random(tmp_path, capsys):
    report = tmp_path / "r.json"
    base = ["compress", str(MNIST), "-o", str(tmp_path / "o.onnx"), "--params", "0.5"]
    base += ["--latency-runs", "2", "--report", str(report)]
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "with random (seed 0) inputs, 8 samples" in out
    assert "agreement on random inputs is not a task metric" in out
    validation = json.loads(report.read_text())["validation"]
    assert validation["samples"] == 8 and validation["random_inputs"] is True
    assert "not a task metric" in validation["note"]
    inputs = tmp_path / "real.npz"
    with np.load(REAL) as data:
        images = (data["images"][:20] / 255.0 - 0.1307) / 0.3081
    np.savez(inputs, input=images[:, None].astype(np.float32))
    assert main([*base, "--inputs", str(inputs)]) == 0
    out = capsys.readouterr().out
    assert f"with real inputs from {inputs}, 20 samples" in out and "task metric" not in out
    validation = json.loads(report.read_text())["validation"]
    assert validation["samples"] == 20 and validation["random_inputs"] is False
    assert validation["note"] is None


def test_sweep_table_and_plot_mark_failed_points(tmp_path):
    pytest.importorskip("matplotlib")
    result = onnx_lowrank.sweep(
        MNIST,
        CompressionConfig(min_cosine=0.99, latency_runs=1),
        tmp_path,
        params=[0.9, 0.2],
    )
    assert [row["validation_passed"] for row in result.rows] == [True, False]
    lines = format_sweep(result.rows).splitlines()
    assert lines[0].split()[-1] == "verdict"
    assert lines[2].endswith("passed") and lines[3].endswith("FAILED")
    assert "random inputs" in lines[2]
    figure = sweep_figure(result.rows)
    for axis in figure.axes:
        (marked,) = [line for line in axis.get_lines() if line.get_label().startswith("failed")]
        assert list(marked.get_xdata()) == [result.rows[1]["params_fraction"]]
    assert result.rows[1]["validation_failures"] and result.rows[1]["validation_samples"] == 8


# --- item 4: bad tolerance values fail at once ----------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--min-cosine", "2"], "--min-cosine must be a number in [0, 1], e.g. 0.99; got 2.0"),
        (["--min-top1", "1.5"], "--min-top1 must be a fraction in [0, 1], e.g. 0.95; got 1.5"),
        (["--min-top1", "-0.1"], "--min-top1 must be a fraction in [0, 1]"),
        (["--min-cosine", "-0.5"], "--min-cosine must be a number in [0, 1]"),
        (["--max-rel-error", "-1"], "--max-rel-error must be a non-negative number"),
        (["--max-rel-error", "nan"], "--max-rel-error must be a non-negative number"),
        (["--min-top1", "logits:nan"], "--min-top1 logits: must be a fraction in [0, 1]"),
        (["--min-top1", "inf"], "--min-top1 must be a fraction"),
        (["--no-validate", "--min-top1", "0.9"], "so --min-top1 would be ignored"),
        (
            ["--no-validate", "--inputs", "{tmp}/missing.npz"],
            "so --inputs would be ignored; drop it or drop --no-validate; also, the --inputs "
            "file {tmp}/missing.npz does not exist",
        ),
        (
            ["--no-validate", "--max-rel-error", "0.1", "--min-cosine", "0.9"],
            "--max-rel-error, --min-cosine would be ignored; drop them",
        ),
    ],
)
def test_bad_tolerances_are_exit_2_before_any_work(tmp_path, capsys, options, message):
    # The model does not exist: the options are refused before anything is read.
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    args = ["compress", str(tmp_path / "absent.onnx"), "-o", str(tmp_path / "o.onnx")]
    assert main([*args, "--params", "0.5", *options]) == 2
    err = capsys.readouterr().err
    assert message.replace("{tmp}", str(tmp_path)) in err and "not found" not in err


def test_sweep_refuses_tolerances_without_validation(tmp_path):
    with pytest.raises(ConfigError, match="--min-top1 would be ignored"):
        onnx_lowrank.sweep(
            MNIST, CompressionConfig(validate=False, min_top1=0.9), tmp_path, params=[0.5]
        )


# --- item 5: honest latency -----------------------------------------------------------------


class Recorder:
    """A real ONNX Runtime session that records the order it was run in."""

    def __init__(self, session, name: str, log: list[str]):
        self.session, self.name, self.log = session, name, log

    def run(self, names, feeds):
        self.log.append(self.name)
        return self.session.run(names, feeds)


def test_latency_is_warm_interleaved_and_alternates_the_first_model():
    model = onnx.load(MNIST)
    order: list[str] = []
    first = Recorder(make_session(model, ["CPUExecutionProvider"], 1), "A", order)
    second = Recorder(make_session(model, ["CPUExecutionProvider"], 1), "B", order)
    feeds = {"input": random_feed((1, 1, 28, 28))}
    before, _, pairs = validate_module._latencies(first, second, feeds, 6)
    warm = 2 * validate_module.LATENCY_WARMUP
    assert order[:warm] == ["A", "B"] * validate_module.LATENCY_WARMUP
    assert "".join(order[warm:]) == "ABBAABBAABBA" and pairs == 6
    assert before.min_ms <= before.median_ms <= before.max_ms


def test_both_sessions_get_the_stated_threads_and_the_summary_shows_the_spread(capsys):
    session = make_session(onnx.load(MNIST), ["CPUExecutionProvider"], 3)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 3
    assert options.inter_op_num_threads == 1
    config = CompressionConfig(params=0.5, latency_runs=5)
    report = compress(MNIST, config).report.validation
    assert report.latency_threads == 1 and report.latency_runs == 5
    assert report.latency_before.min_ms <= report.latency_ms_before <= report.latency_before.max_ms
    assert "5 interleaved pairs after 2 warm-up, 1 thread, batch 1; median [min-max]" in (
        format_validation(report)
    )
    two = compress(MNIST, config.replace(latency_threads=2)).report.validation
    assert two.latency_threads == 2 and two.to_dict()["latency_threads"] == 2
    assert main(["inspect", str(MNIST), "--latency-threads", "2"]) == 2  # compress/sweep only
    capsys.readouterr()


# --- item 23: memory follows a cap, not the output size -------------------------------------


def test_chunked_metrics_equal_the_whole_output_ones(monkeypatch):
    monkeypatch.setattr(metrics_module, "COMPARE_CHUNK", 7)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 6, 11)).astype(np.float32)
    b = (a + 0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    b[0, 0, 0], a[1, 1, 1] = np.nan, np.inf  # non-finite values are left out of the metrics
    config = CompressionConfig(min_top1=0.1)
    chunked = compare_output("y", a, b, config)
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    assert chunked.max_abs_error == pytest.approx(np.abs(x - y).max(), rel=1e-12)
    assert chunked.rel_l2_error == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(x), 1e-12)
    cosine = x @ y / (np.linalg.norm(x) * np.linalg.norm(y))
    assert chunked.cosine_similarity == pytest.approx(cosine, rel=1e-12)
    top1 = np.mean(a.reshape(-1, 11).argmax(1) == b.reshape(-1, 11).argmax(1))
    assert chunked.top1_agreement == pytest.approx(top1) and chunked.top1_positions == 30
    assert chunked.failures == ("y: NaN or Inf where the original is finite",)


def test_comparing_a_large_output_holds_no_float64_copy_of_it():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2**24, dtype=np.float32).reshape(64, 512, 512)  # 64 MiB
    b = a + np.float32(0.01)
    tracemalloc.start()
    try:
        compare_output("y", a, b, CompressionConfig())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20  # before: four float64 copies and masks, over 500 MiB


def test_validation_runs_rows_in_slices_that_keep_outputs_under_the_cap(monkeypatch):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    model = conv_model(weight, (64, 64))  # y (N, 16, 62, 62): 246 KiB per row
    other = conv_model((weight * 1.01).astype(np.float32), (64, 64))
    monkeypatch.setattr(validate_module, "OUTPUT_BYTES_CAP", 3 * 16 * 62 * 62 * 4)
    report = validate(model, other, CompressionConfig(latency_runs=1))
    assert report.rows_per_run == 3 and report.samples == 8
    (output,) = report.outputs
    feeds = random_inputs(model, {})
    whole = compare_output(
        "y",
        make_session(model, ["CPUExecutionProvider"]).run(None, feeds)[0],
        make_session(other, ["CPUExecutionProvider"]).run(None, feeds)[0],
        CompressionConfig(),
    )
    assert output.shape == whole.shape == (8, 16, 62, 62)
    assert output.rel_l2_error == pytest.approx(whole.rel_l2_error, rel=1e-6)
    assert output.cosine_similarity == pytest.approx(whole.cosine_similarity, rel=1e-9)
    assert output.top1_positions == whole.top1_positions == 8 * 16 * 62
