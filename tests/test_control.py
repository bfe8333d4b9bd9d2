"""Layer control and reproducible runs: --exclude, --rank/--groups-for pins, --recipe,
--config (issue 15)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import MNIST, check_model, conv_model, low_rank

from onnx_lowrank import CompressionConfig, compress
from onnx_lowrank.choices import recipe_config
from onnx_lowrank.cli import main
from onnx_lowrank.config import METHODS
from onnx_lowrank.errors import ConfigError, InfeasibleBudgetError
from onnx_lowrank.pipeline import analyze, candidate_tables, choose
from onnx_lowrank.sweeps import sweep

CONV0, CONV1 = "/features/features.0/Conv", "/features/features.3/Conv"
FC0, FC1 = "/classifier/classifier.0/Gemm", "/classifier/classifier.2/Gemm"
FAST = CompressionConfig(params=0.5, latency_runs=1, validate=False)


def cli(*argv: object) -> int:
    return main([str(arg) for arg in argv])


def _layers(result):
    return {layer.name: layer for layer in result.report.layers}


@pytest.mark.parametrize(
    ("pattern", "excluded"),
    [
        ("Conv", {CONV0, CONV1}),  # an op type
        (FC1, {FC1}),  # a name
        ("/features/.*", {CONV0, CONV1}),  # a regular expression over whole names
    ],
)
def test_exclude_keeps_layers_dense_and_spends_the_budget_elsewhere(pattern, excluded):
    result = compress(MNIST, FAST.replace(params=0.3, exclude=(pattern,)))
    layers = _layers(result)
    for name, layer in layers.items():
        if name in excluded:
            assert (
                layer.rank is None
                and layer.user_choice == f"excluded by the user (--exclude {pattern})"
            )
            assert layer.skipped_reason == layer.user_choice
        else:
            assert layer.user_choice is None
    assert layers[FC0].rank is not None  # the budget went to the others
    report = result.report
    assert report.params_after <= 0.3 * report.params_before * (1 + 1e-9)
    assert report.config["exclude"] == [pattern]


def test_pins_on_a_real_model_with_every_method():
    """Pinning restricts candidate tables, so every solver honours it and still meets the
    budget with the other layers."""
    config = CompressionConfig(
        params=0.4, ranks={FC0: 24, CONV1: 8}, groups_for={CONV1: 4}, validate=False
    )
    analysis = analyze(MNIST, config)
    tables = candidate_tables(analysis, config)
    fc0, conv1 = (
        [t.layer for t in tables].index(FC0),
        [t.layer for t in tables].index(CONV1),
    )
    assert len(tables[fc0]) == len(tables[conv1]) == 1
    for method in METHODS:
        point = config.replace(method=method)
        rows = choose(analysis, tables, point)
        assert (tables[fc0].groups[rows[fc0]], tables[fc0].ranks[rows[fc0]]) == (1, 24)
        assert (tables[conv1].groups[rows[conv1]], tables[conv1].ranks[rows[conv1]]) == (4, 8)
        params = sum(t.costs[r, 0] for t, r in zip(tables, rows, strict=True))
        fixed = analysis.params_total - sum(layer.params for layer in analysis.discovery.layers)
        assert fixed + params <= 0.4 * analysis.params_total * (1 + 1e-12), method


def test_pinned_model_is_what_was_asked_and_full_rank_pin_reproduces():
    result = compress(
        MNIST, FAST.replace(params=0.6, ranks={FC0: 20}, groups_for={CONV1: 2}, validate=True)
    )
    layers = _layers(result)
    assert (layers[FC0].groups, layers[FC0].rank) == (1, 20)
    assert layers[FC0].user_choice == f"pinned by the user (--rank {FC0}=20)"
    assert layers[CONV1].groups in (None, 2)  # its rank, or dense, chosen by the allocator
    check_model(result.model)
    # a tiny layer of exact rank 3 pinned at rank 3 is reproduced exactly
    weight = low_rank(16, 8 * 9, 3).reshape(16, 8, 3, 3)
    model = conv_model(weight, [6, 6], pads=[1, 1, 1, 1])
    exact = compress(
        model, CompressionConfig(ranks={"conv": 3}, min_cosine=0.99999, latency_runs=1)
    )
    assert exact.report.validation.passed
    assert exact.report.layers[0].rank == 3


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"exclude": ("Nothing",)}, "matches no compressible layer"),
        (
            {"ranks": {"/classifier/classifier.0/Gem": 4}},
            "did you mean '/classifier/classifier.0/Gemm'",
        ),
        ({"ranks": {FC0: 500}}, "takes ranks 1 to 128"),
        ({"ranks": {FC1: 10}}, "ranks up to 9 save weights"),
        ({"groups_for": {CONV1: 3}}, "cannot have 3 groups"),
        ({"exclude": ("Gemm",), "ranks": {FC0: 4}}, "is excluded (--exclude Gemm) and pinned"),
        ({"groups_for": {CONV1: 4}, "method": "energy"}, "--method energy factorizes with g = 1"),
    ],
)
def test_bad_choices_are_config_errors(changes, message):
    with pytest.raises(ConfigError) as error:
        compress(MNIST, FAST.replace(**changes))
    assert message in str(error.value)


def test_pins_that_exceed_the_budget_say_so():
    with pytest.raises(InfeasibleBudgetError) as error:
        compress(MNIST, FAST.replace(params=0.2, exclude=(FC0,)))
    assert "excluded or pinned by the user" in str(error.value)


def test_recipe_reproduces_the_model_byte_for_byte(tmp_path, capsys):
    first, again = tmp_path / "first.onnx", tmp_path / "again.onnx"
    report = tmp_path / "first.json"
    args = ["--latency-runs", "1", "-q"]
    assert (
        cli(
            "compress",
            MNIST,
            first,
            "--params",
            "0.3",
            "--max-groups",
            "4",
            "--exclude",
            FC1,
            "--min-cosine",
            "0.5",
            "--report",
            report,
            *args,
        )
        == 0
    )
    assert (
        cli(
            "compress", MNIST, again, "--recipe", report, "--report", tmp_path / "again.json", *args
        )
        == 0
    )
    assert first.read_bytes() == again.read_bytes()
    applied = json.loads((tmp_path / "again.json").read_text())
    assert (
        "spectra" not in applied["timings"]
        and "spectra" in json.loads(report.read_text())["timings"]
    )
    assert applied["config"]["recipe"] == str(report)
    pinned = [layer for layer in applied["layers"] if layer["rank"] is not None]
    assert pinned and all(layer["user_choice"].startswith("pinned by --recipe") for layer in pinned)
    assert all(layer["error_actual"] is None for layer in pinned)
    # the applied run's report is a recipe too
    third = tmp_path / "third.onnx"
    # the recorded tolerance does not conflict with --no-validate
    recipe = tmp_path / "again.json"
    assert cli("compress", MNIST, third, "--recipe", recipe, "--no-validate", *args) == 0
    assert third.read_bytes() == first.read_bytes()


def test_recipe_with_calibration_and_from_a_sweep_point(tmp_path):
    images = np.load(MNIST.parent / "mnist_train_calib.npz")["images"][:48]
    np.save(tmp_path / "calib.npy", ((images.astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None])
    config = CompressionConfig(
        calibration=tmp_path / "calib.npy", max_groups=2, latency_runs=1, validate=False
    )
    result = sweep(MNIST, config, tmp_path / "sweep", params=[0.5, 0.3])
    point = tmp_path / "sweep" / result.rows[1]["model"]
    recipe = point.with_suffix(".json")
    applied = compress(MNIST, recipe_config(recipe))
    assert applied.model.SerializeToString() == onnx.load(point).SerializeToString()
    assert applied.report.config["calibration"] == str(tmp_path / "calib.npy")


def test_recipe_for_another_model_is_an_error(tmp_path):
    weight = low_rank(16, 8 * 9, 3).reshape(16, 8, 3, 3)
    model = conv_model(weight, [6, 6], pads=[1, 1, 1, 1])
    tiny = tmp_path / "tiny.onnx"
    onnx.save(model, tiny)
    report = tmp_path / "tiny.json"
    assert (
        cli(
            "compress",
            tiny,
            tmp_path / "t.onnx",
            "--params",
            "0.6",
            "--report",
            report,
            "--latency-runs",
            "1",
            "-q",
        )
        == 0
    )
    with pytest.raises(ConfigError, match="'conv', which is not a compressible layer"):
        compress(MNIST, FAST.replace(recipe=str(report)))
    with pytest.raises(ConfigError, match="--recipe fixes every layer"):
        FAST.replace(recipe=str(report), exclude=("Gemm",))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read as JSON"):
        compress(MNIST, FAST.replace(recipe=tmp_path / "bad.json"))


def test_config_file_toml_and_json_with_flags_overriding(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'params = 0.4\nexclude = ["Conv"]\nlatency-runs = 1\nvalidate = false\n'
        f'[ranks]\n"{FC1}" = 4\n'
        "[sweep]\nparams = [0.6, 0.4]\n"
    )
    out, report = tmp_path / "a.onnx", tmp_path / "a.json"
    assert cli("compress", MNIST, out, "--config", toml, "--report", report, "-q") == 0
    data = json.loads(report.read_text())
    assert data["config"]["params"] == 0.4 and data["config"]["exclude"] == ["Conv"]
    assert data["config"]["ranks"] == {FC1: 4} and data["validation"] is None
    # a flag overrides the file
    assert (
        cli("compress", MNIST, out, "--config", toml, "--params", "0.6", "--report", report, "-q")
        == 0
    )
    assert json.loads(report.read_text())["config"]["params"] == 0.6
    # the same options as JSON, and a [sweep] table for sweep only
    as_json = tmp_path / "run.json"
    as_json.write_text(
        json.dumps(
            {
                "params": 0.4,
                "exclude": "Conv",
                "latency_runs": 1,
                "validate": False,
                "ranks": {FC1: 4},
            }
        )
    )
    assert cli("compress", MNIST, out, "--config", as_json, "--report", report, "-q") == 0
    assert json.loads(report.read_text())["config"]["ranks"] == {FC1: 4}
    assert cli("sweep", MNIST, "-o", tmp_path / "s", "--config", toml, "-q") == 0
    assert cli("inspect", MNIST, "--config", toml, "-q") == 0  # compress's options: skipped
    rows = json.loads((tmp_path / "s" / "sweep.json").read_text())["rows"]
    assert [row["params"] for row in rows] == [0.6, 0.4]
    capsys.readouterr()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("params = 0.5\nfrobnicate = 1\n", "'frobnicate' is not an option of onnx-lowrank"),
        ("params = [0.5\n", "is not valid TOML"),
        ("params = 0.5\nvalidate = 'no'\n", "must be true or false"),
        ("params = 0.5\nmethod = 'magic'\n", "must be one of alds"),
    ],
)
def test_bad_config_files_get_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    assert cli("compress", MNIST, tmp_path / "x.onnx", "--config", path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x.onnx").exists()


def test_cli_pins_and_bad_assignments(tmp_path, capsys):
    out, report = tmp_path / "p.onnx", tmp_path / "p.json"
    pins = ["--rank", f"{FC0}=16", "--groups-for", f"{CONV1}=2", "--rank", f"{CONV1}=4"]
    argv = ["compress", MNIST, out, "--params", "0.5", *pins, "--exclude", FC1, "--report", report]
    assert cli(*argv, "--latency-runs", "1") == 0
    printed = capsys.readouterr().out
    assert f"pinned by the user (--rank {FC0}=16)" in printed
    layers = {layer["name"]: layer for layer in json.loads(report.read_text())["layers"]}
    assert (layers[CONV1]["groups"], layers[CONV1]["rank"]) == (2, 4)
    assert layers[FC1]["user_choice"] == f"excluded by the user (--exclude {FC1})"
    assert cli("compress", MNIST, out, "--params", "0.5", "--rank", "fc") == 2
    assert "bad --rank 'fc': expected NAME=N" in capsys.readouterr().err


def test_config_file_output_and_the_positional_output(tmp_path):
    config = tmp_path / "out.toml"
    config.write_text(f'output = "{tmp_path / "from_file.onnx"}"\nparams = 0.5\nvalidate = false\n')
    assert cli("compress", MNIST, "--config", config, "-q") == 0
    assert (tmp_path / "from_file.onnx").is_file()
    assert cli("compress", MNIST, tmp_path / "given.onnx", "--config", config, "-q") == 0
    assert (tmp_path / "given.onnx").is_file()  # the command line wins, no "given twice"


def test_pins_stand_with_latency_budgets_and_the_never_slower_check():
    """Timed candidates (never-slower check, --latency budget) never override a pin."""
    for config in (
        FAST.replace(latency_check=True),
        FAST.replace(params=None, latency=0.8, latency_check=True),
    ):
        result = compress(MNIST, config.replace(ranks={FC0: 32}, exclude=(CONV0,)))
        layers = _layers(result)
        assert (layers[FC0].groups, layers[FC0].rank) == (1, 32)
        assert layers[CONV0].rank is None and layers[CONV0].user_choice is not None


def test_exclude_pin_and_recipe_on_a_tiny_model(tmp_path):
    """Two MatMul layers built with onnx.helper: exclude one, pin the other, replay it."""
    from builders import make_model
    from onnx import helper

    rng = np.random.default_rng(1)
    weights = {
        "W1": rng.standard_normal((32, 24)).astype(np.float32),
        "W2": rng.standard_normal((24, 16)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="second"),
    ]
    model = make_model(nodes, [("x", ["n", 32])], [("y", None)], weights)
    base = CompressionConfig(params=0.8, latency_runs=1)
    excluded = compress(model, base.replace(exclude=("second",)))
    layers = _layers(excluded)
    assert layers["second"].rank is None and layers["first"].rank is not None
    pinned = compress(model, base.replace(params=None, ranks={"first": 5}, exclude=("second",)))
    assert _layers(pinned).get("first").rank == 5
    check_model(pinned.model)
    report = tmp_path / "tiny.json"
    report.write_text(json.dumps(pinned.report.to_dict()))
    replayed = compress(model, recipe_config(report))
    assert replayed.model.SerializeToString() == pinned.model.SerializeToString()
