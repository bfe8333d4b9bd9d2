"""Measured speed of compressed models: parameter, MAC and latency budgets side by side.

    python benchmarks/latency_budgets.py [--models-dir DIR] [--json OUT.json] [--plot OUT.png]
                                 [--only NAME,...] [--pairs N] [--values]
                                 [--rank-multiple 1,auto]
                                 [--shares [--validate | --against DIR [--repeat N]]]

For every public model (the MNIST CNN in ``samples/``, CREPE tiny, the PP-OCR direction
classifier and MTCNN O-Net in ``tests/models/``, EfficientNet-Lite0 from the models folder when
present) and every point

  * ``--params 0.5 --no-latency-check`` (what earlier releases did),
  * ``--params 0.5`` (the default: the never-slower check is on),
  * ``--flops 0.5``, ``--latency 0.7``, ``--latency 0.5``,

it compresses the model (``alds``, data-free, validation off: this script measures), then
reports the parameter and MAC ratios, the predicted latency ratio (from the measured cost
tables) and the *measured* one: the original and the compressed model run alternately in one
process, ``--pairs`` pairs at batch 1 with the tool's own session options (sessions.py; one
intra-op thread, the validation's default), and the
median of the per-pair ratios is given with its interquartile range (the spread). A first row
per model times the original against itself: the noise floor. Task quality: MNIST accuracy on
the first 2000 labelled test images, CREPE raw pitch accuracy on 300 synthetic tones, top-1
agreement with the original for EfficientNet-Lite0 (280 natural-image views), the PP-OCR
classifier and O-Net (256 random inputs each, no labels offline).

It also reports the time spent timing candidates against the whole compression (the share),
and repeats one point per model with the cache warm, which must time nothing. The latency cache
is a fresh temporary folder, so the first runs measure everything. Prints a markdown table
(pasted into docs/performance.md), writes every number to ``--json`` and draws latency ratio
against quality to ``--plot``.

``--values`` instead checks that speed depends on the weights' values, not only on their shapes
(docs/performance.md, "Why O-Net landed below F"): per model, the ``--latency 0.7`` model as
written and the same model with its factors replaced by uniform random values of the same
shapes and RMS (``--latency`` used to time random factors), three times each: against the
original as the tool times a choice end to end (``latency.measure_choice``), and all three
interleaved for ``--pairs`` rounds as above; and ONNX Runtime's PRelu alone on inputs of the same
magnitudes whose signs are random with a given share positive, or in two blocks.

``--shares`` instead measures what timing costs (docs/performance.md, "What timing costs"):
per model and point (``--params 0.5`` with the never-slower check, ``--latency 0.7`` and
``0.5``) the model is compressed twice with a latency cache of its own, empty the first time
(cold) and warm the second, and each call's seconds, the seconds spent timing (the report's
``latency.seconds``: the whole model, the candidates, and the choices timed end to end) and
their share are printed, with the cold model's measured latency ratio as above. With
``--validate`` the calls validate, as a default run does (validation off otherwise). With
``--against CHECKOUT`` the points are instead compressed cold by that checkout and by this one,
each call in a fresh process with an empty cache, alternating ``--repeat`` times: the timing
seconds of each call, and the last model of each checkout timed in turn with the original
(``--pairs`` rounds, order rotating), as a before/after comparison at the same load.

``--rank-multiple 1,auto`` instead compares rank multiples (docs/performance.md, "Default:
``--rank-multiple 1``"): per model and point (``--params 0.5`` and ``--flops 0.5`` with the
never-slower check on, ``--latency 0.7``) the model is compressed with each multiple, each
multiple with a latency cache of its own that is empty at the model's first point (so the timing
seconds are what a first run pays), and the original, the original again (the noise floor) and
every compressed model run in turn (the order rotating) for ``--pairs`` rounds: each model's
ratio to the original, median [IQR], and the per-round ratio of the second multiple's model to
the first's. Quality as above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import (
    Task,
    crepe_task,
    default_models_dir,
    efficientnet_task,
    machine,
    markdown,
    mnist_task,
    run_batches,
)

from onnx_lowrank import CompressionConfig, InfeasibleBudgetError, compress
from onnx_lowrank.latency import measure_choice
from onnx_lowrank.layer_factors import choice_model
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.sessions import make_session
from onnx_lowrank.validate import session_threads

REPO = Path(__file__).resolve().parent.parent
CPU = ["CPUExecutionProvider"]

POINTS: list[tuple[str, dict]] = [
    ("params 0.5, no check", {"params": 0.5, "latency_check": False}),
    ("params 0.5", {"params": 0.5, "latency_check": True}),
    ("flops 0.5", {"flops": 0.5, "latency_check": True}),
    ("latency 0.7", {"latency": 0.7}),
    ("latency 0.5", {"latency": 0.5}),
]


def agreement_task(name: str, path: Path, shape: tuple[int, ...]) -> Task:
    """Top-1 agreement with the original on random inputs (no labels offline)."""
    model = onnx.load(path, load_external_data=False)
    input_name = model.graph.input[0].name
    inputs = np.random.default_rng(0).standard_normal((256, *shape)).astype(np.float32)
    task = Task(name, path, input_name, inputs, 1, "agreement")
    task.reference = run_batches(path, input_name, inputs, 0, 32)
    return task


def timed_pairs(original, compressed, feed: dict, pairs: int) -> dict[str, float]:
    """Median and quartiles of the compressed/original time ratio over adjacent pairs."""
    threads = session_threads(CompressionConfig())  # the tool's validation default: 1
    sessions = [make_session(original, CPU, threads), make_session(compressed, CPU, threads)]
    for runner in sessions:
        for _ in range(5):
            runner.run(None, feed)
    ratios, firsts = [], []
    for index in range(pairs):
        times = [0.0, 0.0]
        for which in (0, 1) if index % 2 == 0 else (1, 0):
            started = time.perf_counter()
            sessions[which].run(None, feed)
            times[which] = time.perf_counter() - started
        ratios.append(times[1] / times[0])
        firsts.append(times[0] * 1000)
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "ratio": statistics.median(ratios),
        "ratio_q1": quartiles[0],
        "ratio_q3": quartiles[2],
        "original_ms": statistics.median(firsts),
    }


def quality(task: Task, model) -> float:
    return task.quality(model, 0)[task.metric]


#: Concrete input shapes of models with dynamic spatial dimensions (batch 1, as timed).
INPUT_SHAPES = {"ppocr_cls": {"x": (1, 3, 48, 192)}}


def run_model(task: Task, pairs: int) -> list[dict]:
    feed = {task.input_name: task.inputs[:1]}
    noise = timed_pairs(task.path, task.path, feed, pairs)
    rows = [
        {
            "model": task.name,
            "point": "original vs itself",
            "measured": noise["ratio"],
            "spread": f"{noise['ratio_q1']:.2f}-{noise['ratio_q3']:.2f}",
            "original_ms": noise["original_ms"],
            "quality": quality(task, task.path),
            "metric": task.metric,
        }
    ]
    for label, options in POINTS:
        shapes = INPUT_SHAPES.get(task.name, {})
        config = CompressionConfig(validate=False, input_shapes=shapes, **options)
        started = time.perf_counter()
        try:
            result = compress(task.path, config)
        except Exception as exc:  # an unreachable budget is a row, not the end of the run
            rows.append({"model": task.name, "point": label, "error": str(exc)})
            print(f"{task.name} {label}: {exc}", file=sys.stderr)
            continue
        seconds = time.perf_counter() - started
        report = result.report
        latency = report.latency or {}
        measured = timed_pairs(task.path, result.model, feed, pairs)
        row = {
            "model": task.name,
            "point": label,
            "params": report.params_after / report.params_before,
            "macs": report.macs_after / report.macs_before if report.macs_before else None,
            "predicted": latency.get("predicted_ratio"),
            "measured": measured["ratio"],
            "spread": f"{measured['ratio_q1']:.2f}-{measured['ratio_q3']:.2f}",
            "quality": quality(task, result.model),
            "metric": task.metric,
            "compress_s": seconds,
            "timing_s": latency.get("seconds"),
            "timing_share": None if not latency else latency["seconds"] / seconds,
            "timed": latency.get("measured"),
            "cached": latency.get("cached"),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    done = [
        options
        for label, options in POINTS
        if any(r["point"] == label and "error" not in r for r in rows)
    ]
    if done:  # the last point that could be met, again: the cache is warm now
        shapes = INPUT_SHAPES.get(task.name, {})
        try:
            again = compress(
                task.path, CompressionConfig(validate=False, input_shapes=shapes, **done[-1])
            )
        except Exception as exc:  # a borderline --latency point can measure over on a rerun
            print(f"{task.name} warm rerun: {exc}", file=sys.stderr)
            return rows
        latency = again.report.latency or {}
        rows.append(
            {
                "model": task.name,
                "point": "last point again, warm cache",
                "timed": latency.get("measured"),
                "cached": latency.get("cached"),
                "timing_s": latency.get("seconds"),
            }
        )
    return rows


#: Initializers ``rewrite`` writes for the factors (``<weight>/lowrank_v``, ``..._u``, ``..._u_1``).
FACTOR = re.compile(r"/lowrank_[uv](_\d+)?$")


def random_factors(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """A copy of ``model`` with every factor replaced by uniform random values of its shape and
    RMS: the same shapes and magnitudes, none of the real weights' structure."""
    rng = np.random.default_rng(seed)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if not FACTOR.search(tensor.name):
            continue
        real = numpy_helper.to_array(tensor)
        values = rng.uniform(-1, 1, real.shape)
        values *= np.sqrt(np.mean(real.astype(np.float64) ** 2) / np.mean(values**2))
        tensor.CopyFrom(numpy_helper.from_array(values.astype(real.dtype), tensor.name))
    return copy


def interleaved(models: list, feed: dict, rounds: int) -> list[list[float]]:
    """Ratios to ``models[0]`` of every other model, per round, all run in turn (the order
    rotating each round) with the tool's session options."""
    threads = session_threads(CompressionConfig())
    sessions = [make_session(model, CPU, threads) for model in models]
    for session in sessions:
        for _ in range(5):
            session.run(None, feed)
    ratios: list[list[float]] = [[] for _ in models[1:]]
    for index in range(rounds):
        times = [0.0] * len(sessions)
        for step in range(len(sessions)):
            which = (index + step) % len(sessions)
            started = time.perf_counter()
            sessions[which].run(None, feed)
            times[which] = time.perf_counter() - started
        for column, elapsed in zip(ratios, times[1:], strict=True):
            column.append(elapsed / times[0])
    return ratios


def spread(ratios: list[float]) -> str:
    quartiles = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.2f} [{quartiles[0]:.2f}-{quartiles[2]:.2f}]"


def values_check(task: Task, pairs: int) -> list[dict]:
    """The ``--latency 0.7`` choice, written and as a random-factor twin, against the original:
    as the tool times it (``latency.measure_choice``, the model of
    ``layer_factors.choice_model``, on the tool's inputs) and as ``timed_pairs`` times the
    written model."""
    feed = {task.input_name: task.inputs[:1]}
    config = CompressionConfig(
        validate=False, latency=0.7, input_shapes=INPUT_SHAPES.get(task.name, {})
    )
    analysis = analyze(task.path, config)
    tables = candidate_tables(analysis, config)
    try:
        choices = choose(analysis, tables, config)
    except InfeasibleBudgetError as exc:
        return [{"model": task.name, "written": f"not compressed: {exc}"}]
    written = realize(analysis, tables, choices, config, keep_weights=True).model
    timed = choice_model(analysis, tables, choices)
    twin = random_factors(written)
    book = analysis.latency
    rows = []
    for repeat in range(3):
        tool = [
            measure_choice(task.path, model, book.model_feeds, book.providers, book.threads)
            for model in (timed, twin)
        ]
        real, shuffled = interleaved([str(task.path), written, twin], feed, pairs)
        rows.append(
            {
                "model": task.name,
                "repeat": repeat,
                "tool": f"{tool[0][1] / tool[0][0]:.2f}",
                "tool_random": f"{tool[1][1] / tool[1][0]:.2f}",
                "written": spread(real),
                "random": spread(shuffled),
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def prelu_signs(rounds: int) -> list[dict]:
    """ONNX Runtime's PRelu alone on a (1, 32, 46, 46) input (O-Net's first PRelu) of fixed
    magnitudes, its signs random with a given share positive, or half negative in one block."""
    magnitudes = np.abs(np.random.default_rng(1).standard_normal((1, 32, 46, 46)))
    magnitudes = magnitudes.astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("PRelu", ["x", "slope"], ["y"])],
        "prelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(magnitudes.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.full((1, 32, 1, 1), 0.25, np.float32), "slope")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)])
    model.ir_version = 7
    session = make_session(model, CPU, session_threads(CompressionConfig()))
    rng = np.random.default_rng(2)
    inputs = {
        f"random signs, {share:.0%} positive": magnitudes
        * np.where(rng.random(magnitudes.shape) < share, 1, -1).astype(np.float32)
        for share in (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
    }
    blocks = magnitudes.copy()
    blocks.reshape(-1)[: blocks.size // 2] *= -1
    inputs["50% positive, in two blocks"] = blocks
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for _ in range(rounds):  # interleaved
        for name, values in inputs.items():
            started = time.perf_counter()
            session.run(None, {"x": values})
            times[name].append((time.perf_counter() - started) * 1e6)
    return [{"input": name, "median_us": statistics.median(t)} for name, t in times.items()]


#: The points of ``--rank-multiple``: the never-slower check on (the default), or a latency budget.
MULTIPLE_POINTS: list[tuple[str, dict]] = [
    ("params 0.5", {"params": 0.5, "latency_check": True}),
    ("flops 0.5", {"flops": 0.5, "latency_check": True}),
    ("latency 0.7", {"latency": 0.7}),
]


def rank_multiple(text: str) -> int | str:
    return text if text == "auto" else int(text)


def multiples_check(task: Task, multiples: list, pairs: int) -> list[dict]:
    """Every point of ``MULTIPLE_POINTS`` compressed with each of ``multiples`` (each with its own
    latency cache, empty at the first point), all timed interleaved with the original."""
    feed = {task.input_name: task.inputs[:1]}
    shapes = INPUT_SHAPES.get(task.name, {})
    caches = {m: tempfile.mkdtemp(prefix=f"latency-bench-{m}-") for m in multiples}
    rows = []
    for label, options in MULTIPLE_POINTS:
        models, start = {}, len(rows)
        for multiple in multiples:
            os.environ["ONNX_LOWRANK_CACHE"] = caches[multiple]
            config = CompressionConfig(
                validate=False, input_shapes=shapes, rank_multiple=multiple, **options
            )
            started = time.perf_counter()
            try:
                result = compress(task.path, config)
            except InfeasibleBudgetError as exc:
                rows.append(
                    {"model": task.name, "point": label, "multiple": multiple, "error": str(exc)}
                )
                continue
            seconds = time.perf_counter() - started
            report, latency = result.report, result.report.latency or {}
            models[multiple] = result.model
            rows.append(
                {
                    "model": task.name,
                    "point": label,
                    "multiple": multiple,
                    "params": report.params_after / report.params_before,
                    "macs": report.macs_after / report.macs_before,
                    "predicted": latency.get("predicted_ratio"),
                    "quality": quality(task, result.model),
                    "metric": task.metric,
                    "compress_s": seconds,
                    "timing_s": latency.get("seconds"),
                    "timing_share": latency["seconds"] / seconds if latency else None,
                    "timed": latency.get("measured"),
                    "cached": latency.get("cached"),
                }
            )
        done = list(models)
        ratios = interleaved([str(task.path), str(task.path), *models.values()], feed, pairs)
        noise = {"model": task.name, "point": label, "multiple": "original vs itself"}
        noise["measured"] = spread(ratios[0])
        rows.append(noise)
        for multiple, column in zip(done, ratios[1:], strict=True):
            row = next(r for r in rows if r["point"] == label and r["multiple"] == multiple)
            row["measured"] = spread(column)
            row["measured_median"] = statistics.median(column)
        if len(done) >= 2:
            first, second = ratios[1], ratios[2]
            rows.append(
                {
                    "model": task.name,
                    "point": label,
                    "multiple": f"{done[1]} / {done[0]}",
                    "measured": spread([b / a for a, b in zip(first, second, strict=True)]),
                }
            )
        for row in rows[start:]:
            print(json.dumps(row), file=sys.stderr)
    for multiple in multiples:
        mine = [r for r in rows if r.get("multiple") == multiple and "compress_s" in r]
        spent = sum(r["timing_s"] or 0.0 for r in mine)
        total = sum(r["compress_s"] for r in mine)
        rows.append(
            {
                "model": task.name,
                "point": "all three, first run",
                "multiple": multiple,
                "compress_s": total,
                "timing_s": spent,
                "timing_share": spent / total if total else None,
                "timed": sum(r["timed"] or 0 for r in mine),
            }
        )
    return rows


#: The points of ``--shares``: the default check, and both latency budgets.
SHARE_POINTS: list[tuple[str, dict]] = [
    ("params 0.5", {"params": 0.5, "latency_check": True}),
    ("latency 0.7", {"latency": 0.7}),
    ("latency 0.5", {"latency": 0.5}),
]


def shares_check(task: Task, pairs: int, validate: bool = False) -> list[dict]:
    """Per point of ``SHARE_POINTS``: ``compress`` with an empty latency cache of its own (cold),
    then again with that cache (warm); the seconds spent timing (the whole model, the
    candidates, and with ``--latency`` the choices timed end to end: the report's
    ``latency.seconds``) against the call's, and the cold model's measured ratio."""
    feed = {task.input_name: task.inputs[:1]}
    shapes = INPUT_SHAPES.get(task.name, {})
    rows = []
    for label, options in SHARE_POINTS:
        os.environ["ONNX_LOWRANK_CACHE"] = tempfile.mkdtemp(prefix="latency-share-")
        row: dict = {"model": task.name, "point": label}
        config = CompressionConfig(validate=validate, input_shapes=shapes, **options)
        for run in ("cold", "warm"):
            started = time.perf_counter()
            try:
                result = compress(task.path, config)
            except InfeasibleBudgetError as exc:
                row[f"{run}_error"] = str(exc)
                continue
            seconds = time.perf_counter() - started
            latency = result.report.latency or {}
            row[f"{run}_s"] = seconds
            row[f"{run}_timing_s"] = latency.get("seconds", 0.0)
            row[f"{run}_share"] = latency.get("seconds", 0.0) / seconds
            row[f"{run}_timed"] = f"{latency.get('measured')} / {latency.get('cached')}"
            row[f"{run}_cell"] = (
                f"{seconds:.2f} s, {row[f'{run}_timing_s']:.2f} s "
                f"({row[f'{run}_share']:.0%}), {row[f'{run}_timed']}"
            )
            if run == "cold":
                measured = timed_pairs(task.path, result.model, feed, pairs)
                row["measured"] = (
                    f"{measured['ratio']:.2f} [{measured['ratio_q1']:.2f}-"
                    f"{measured['ratio_q3']:.2f}]"
                )
                row["measured_median"] = measured["ratio"]
        for run in ("cold", "warm"):
            if f"{run}_error" in row:
                row[f"{run}_cell"] = row[f"{run}_error"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


#: A cold ``compress`` in a fresh process on a given checkout (``PYTHONPATH``): prints the
#: call's and the timing's seconds as JSON and saves the model.
_CHILD = """
import json, sys, time
from onnx_lowrank import CompressionConfig, compress
options = json.loads(sys.argv[2])
options["input_shapes"] = {k: tuple(v) for k, v in options.get("input_shapes", {}).items()}
started = time.perf_counter()
result = compress(sys.argv[1], CompressionConfig(validate=False, **options))
seconds = time.perf_counter() - started
result.save(sys.argv[3])
print(json.dumps({"s": seconds, "timing": (result.report.latency or {}).get("seconds")}))
"""


def against_check(task: Task, other: Path, repeats: int, pairs: int) -> list[dict]:
    """Per point of ``SHARE_POINTS``: cold ``compress`` calls of ``other`` (a checkout) and of
    this checkout, each in a fresh process with an empty latency cache, alternating ``repeats``
    times (timing seconds per call); then the original and the last model of each timed in turn
    (the order rotating) for ``pairs`` rounds, each model's ratio to the original."""
    import subprocess

    feed = {task.input_name: task.inputs[:1]}
    checkouts = {"before": Path(other).resolve(), "after": REPO}
    shapes = INPUT_SHAPES.get(task.name, {})
    rows = []
    for label, options in SHARE_POINTS:
        options = {**options, "input_shapes": shapes}
        calls: dict[str, list[dict]] = {name: [] for name in checkouts}
        models: dict[str, str] = {}
        for index in range(repeats):
            names = list(checkouts) if index % 2 == 0 else list(checkouts)[::-1]
            for name in names:
                target = tempfile.mktemp(suffix=".onnx")
                env = dict(os.environ, PYTHONPATH=str(checkouts[name]))
                env["ONNX_LOWRANK_CACHE"] = tempfile.mkdtemp(prefix="latency-against-")
                command = [sys.executable, "-c", _CHILD, str(task.path), json.dumps(options)]
                done = subprocess.run(
                    [*command, target], env=env, capture_output=True, text=True, check=False
                )
                if done.returncode == 0:
                    calls[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                    models[name] = target
        row: dict = {"model": task.name, "point": label}
        for name, made in calls.items():
            if made:
                timing = [call["timing"] or 0.0 for call in made]
                row[f"{name}_timing"] = (
                    f"{statistics.median(timing):.2f} s of "
                    f"{statistics.median(c['s'] for c in made):.2f} s "
                    f"({', '.join(f'{t:.2f}' for t in timing)})"
                )
        if len(models) == 2:
            ratios = interleaved([str(task.path), models["before"], models["after"]], feed, pairs)
            for name, column in zip(("before", "after"), ratios, strict=True):
                row[f"{name}_measured"] = spread(column)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    markers = {"params 0.5": "o", "flops 0.5": "s", "latency 0.7": "^", "latency 0.5": "v"}
    models = sorted({row["model"] for row in rows})
    colors = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for row in rows:
        if row.get("point") not in markers or "measured" not in row:
            continue
        base = next(r for r in rows if r["model"] == row["model"] and "vs itself" in r["point"])
        relative = row["quality"] / base["quality"] if base["quality"] else row["quality"]
        axes.scatter(
            row["measured"],
            relative,
            marker=markers[row["point"]],
            color=colors[row["model"]],
            label=f"{row['model']}, {row['point']}",
        )
    axes.axvline(1.0, color="grey", linewidth=0.8)
    axes.set_xlabel("measured latency ratio (compressed / original, ORT CPU, batch 1)")
    axes.set_ylabel("task quality relative to the original")
    axes.legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def finish(rows: list[dict], columns: list, info: dict, started: float, out: Path | None) -> None:
    """Print the rows' table and the machine, and write both to ``out`` as JSON if given."""
    shown = [{key: value for key, value in row.items() if value is not None} for row in rows]
    print(markdown(shown, columns))
    info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["seconds"] = f"{time.perf_counter() - started:.0f}"
    print(f"\n{info}")
    if out:
        out.write_text(json.dumps({"machine": info, "rows": rows}, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--only", help="comma-separated model names")
    parser.add_argument("--pairs", type=int, default=200)
    parser.add_argument(
        "--values",
        action="store_true",
        help="time written models against their random-factor twins, and PRelu by input signs",
    )
    parser.add_argument(
        "--rank-multiple",
        help="compare rank multiples, e.g. 1,auto: latency, quality and timing cost per model",
    )
    parser.add_argument(
        "--shares",
        action="store_true",
        help="the share of each call spent timing, with an empty and with a warm latency cache",
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="with --shares: validate as the default run does (the share of a default call)",
    )
    parser.add_argument(
        "--against",
        type=Path,
        help="with --shares: compare cold calls with another checkout (alternating, fresh "
        "processes and caches) and time both checkouts' models interleaved with the original",
    )
    parser.add_argument("--repeat", type=int, default=3, help="with --against: calls per checkout")
    args = parser.parse_args()
    os.environ["ONNX_LOWRANK_CACHE"] = tempfile.mkdtemp(prefix="latency-bench-")
    info = machine()
    tasks = [
        mnist_task(2000),
        crepe_task(300),
        agreement_task(
            "ppocr_cls", REPO / "tests" / "models" / "ppocr_mobile_v2.0_cls.onnx", (3, 48, 192)
        ),
        agreement_task("mtcnn_onet", REPO / "tests" / "models" / "mtcnn_onet.onnx", (48, 48, 3)),
    ]
    efficientnet = efficientnet_task(args.models_dir, 0)
    if efficientnet is not None:
        tasks.append(efficientnet)
    if args.only:
        wanted = set(args.only.split(","))
        tasks = [task for task in tasks if task.name in wanted]
    started = time.perf_counter()
    if args.shares and args.against:
        rows = [
            row
            for task in tasks
            for row in against_check(task, args.against, args.repeat, args.pairs)
        ]
        columns = [
            ("model", "model"),
            ("point", "budget"),
            ("before_timing", "--against: timing of a cold call, median of calls (each)"),
            ("after_timing", "this checkout: timing of a cold call, median of calls (each)"),
            ("before_measured", "--against: latency measured [IQR]"),
            ("after_measured", "this checkout: latency measured [IQR]"),
        ]
        finish(rows, columns, info, started, args.json)
        return 0
    if args.shares:
        rows = [row for task in tasks for row in shares_check(task, args.pairs, args.validate)]
        columns = [
            ("model", "model"),
            ("point", "budget"),
            ("cold_cell", "cold cache: call, timing (share), timed / cached"),
            ("warm_cell", "warm cache: call, timing (share), timed / cached"),
            ("measured", "cold model: latency measured [IQR]"),
        ]
        finish(rows, columns, info, started, args.json)
        return 0
    if args.rank_multiple:
        multiples = [rank_multiple(text) for text in args.rank_multiple.split(",")]
        rows = [row for task in tasks for row in multiples_check(task, multiples, args.pairs)]
        columns = [
            ("model", "model"),
            ("point", "budget"),
            ("multiple", "rank multiple"),
            ("params", "params"),
            ("macs", "MACs"),
            ("predicted", "latency predicted"),
            ("measured", "latency measured [IQR]"),
            ("quality", "quality"),
            ("timing_s", "timing s"),
            ("timing_share", "timing share"),
            ("timed", "timed"),
            ("error", "error"),
        ]
        finish(rows, columns, info, started, args.json)
        return 0
    if args.values:
        rows = [row for task in tasks for row in values_check(task, args.pairs)]
        print(
            markdown(
                rows,
                [
                    ("model", "model"),
                    ("repeat", "repeat"),
                    ("tool", "tool: written factors"),
                    ("tool_random", "tool: random factors"),
                    ("written", "benchmark: written [IQR]"),
                    ("random", "benchmark: random factors [IQR]"),
                ],
            )
        )
        prelu = prelu_signs(args.pairs)
        print(markdown(prelu, [("input", "PRelu input"), ("median_us", "median µs")]))
        info["load_average_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n{info}")
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "rows": rows, "prelu": prelu}))
        return 0
    rows = [row for task in tasks for row in run_model(task, args.pairs)]
    columns = [
        ("model", "model"),
        ("point", "budget"),
        ("params", "params"),
        ("macs", "MACs"),
        ("predicted", "latency predicted"),
        ("measured", "latency measured"),
        ("spread", "IQR"),
        ("quality", "quality"),
        ("timing_share", "timing share"),
        ("timed", "timed"),
        ("cached", "cached"),
    ]
    finish(rows, columns, info, started, args.json)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
