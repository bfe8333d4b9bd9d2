"""Error measures and solvers at real budgets: task quality and compress time per option.

    python benchmarks/quality.py [--models mnist,efficientnet,crepe,ppocr,crepe-full,minilm,
        ppocr-rec]
        [--modes df-bound,df-max-group,...|df-weights] [--budgets 0.9,0.8,0.7,0.5,0.3]
        [--json OUT.json] [--plot OUT.png] [--markdown]

Every mode is one ``CompressionConfig`` (``MODES``): data-free with the ``bound``,
``max-group``, ``frobenius`` or ``network`` error (the network one measured on the tool's
synthetic inputs, or on white noise in ``df-network-white``),
and calibrated with the ``output`` or ``network`` error, each with the ``alds`` (min-max) or
``sum`` (additive) solver; the calibrated modes refit (``refit=True``, the default with
calibration) only where their name ends in ``-refit``. Data-free candidates that are not options
of the tool are derived here from its tables (``COMBINED``: the larger or the root mean square of
two measures' errors, row by row; ``-sum2``: the additive solver on squared errors);
``--modes df-weights`` runs every data-free mode but the network ones. Each analysis is made
once per model and mode and reused for every budget, as ``sweep`` does; the network errors are
measured once and refined per budget.
The tasks and their disjoint calibration and evaluation data are those of
``benchmarks/calibration.py`` (MNIST test accuracy, EfficientNet-Lite0 top-1 agreement on real
image crops, CREPE tiny raw pitch accuracy on synthetic tones), plus:

* **PP-OCR text-direction classifier** (``tests/models/ppocr_mobile_v2.0_cls.onnx``): synthetic
  text lines (random letters and digits in Pillow's default font, dark on light, random size
  and offset, half of them turned by 180°), resized to 48×192 and normalized as PaddleOCR does
  (``(x/255 − 0.5)/0.5``); calibration and evaluation lines from different seeds. Metric:
  agreement of the predicted direction with the original model.
* **CREPE full** (``crepe-full``; ``benchmarks/crepe_full.py`` exports it into the model
  cache): the full-size model of CREPE tiny's package, on the same tones.
* **PP-OCRv4 recognizer** (``ppocr-rec``; ``tests/models/fetch_models.py --only ppocr_rec``):
  the rendered lines and greedy CTC decoding of ``benchmarks/ocr_heads.py``; headline the
  character accuracy against the rendered text.
* **all-MiniLM-L6-v2** (``minilm``; ``tests/models/fetch_models.py --only minilm_l6``): the
  sentence-embedding model and data of ``benchmarks/sentence_embeddings.py``; paraphrase
  retrieval (headline) and mean cosine to the original's embeddings.

Needs numpy, onnxruntime, Pillow, and matplotlib for ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as tasks

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize

REPO = Path(__file__).resolve().parent.parent

#: name -> (calibrated, CompressionConfig fields)
MODES: dict[str, tuple[bool, dict]] = {
    "df-bound": (False, {"error": "bound"}),
    "df-max-group": (False, {"error": "max-group"}),
    "df-frobenius": (False, {"error": "frobenius"}),
    "df-bound-sum": (False, {"error": "bound", "method": "sum"}),
    "df-max-group-sum": (False, {"error": "max-group", "method": "sum"}),
    "df-frobenius-sum": (False, {"error": "frobenius", "method": "sum"}),
    "df-network": (False, {"error": "network"}),
    "df-network-sum": (False, {"error": "network", "method": "sum"}),
    "df-network-alds": (False, {"error": "network", "method": "alds"}),
    "df-network-white": (False, {"error": "network", "synthetic": "white"}),
    "cal-output": (True, {"error": "output", "refit": False}),
    "cal-output-sum": (True, {"error": "output", "method": "sum", "refit": False}),
    "cal-network": (True, {"error": "network", "refit": False}),
    "cal-network-sum": (True, {"error": "network", "method": "sum", "refit": False}),
    "cal-output-refit": (True, {"error": "output", "refit": True}),
    "cal-network-sum-refit": (True, {"error": "network", "method": "sum", "refit": True}),
}

#: Candidate data-free measures that are not options of the tool: each combines, row by row,
#: the tables of two of its weight-error measures (a layer's rows do not depend on the
#: measure, only their errors do). name -> (rule, first measure, second measure); rule "max"
#: is ``max(e₁, e₂)``, "rms" is ``sqrt((e₁² + e₂²)/2)``.
COMBINED: dict[str, tuple[str, str, str]] = {
    "maxof-bound-frobenius": ("max", "bound", "frobenius"),
    "maxof-max-group-frobenius": ("max", "max-group", "frobenius"),
    "rms-bound-frobenius": ("rms", "bound", "frobenius"),
    "rms-max-group-frobenius": ("rms", "max-group", "frobenius"),
}
for _name, _spec in COMBINED.items():
    MODES[f"df-{_name}"] = (False, {"combine": _spec})
    MODES[f"df-{_name}-sum"] = (False, {"combine": _spec, "method": "sum"})
#: ``-sum2``: the additive solver on the squared errors, i.e. the least ``Σ_ℓ e_ℓ²`` (the
#: squared errors of independent layers add up), where ``-sum`` takes the least ``Σ_ℓ e_ℓ``
#: and the min-max (``alds``, no suffix) the least ``max_ℓ e_ℓ``.
for _name in ("bound", "max-group", "frobenius", *COMBINED):
    _spec = {"combine": COMBINED[_name]} if _name in COMBINED else {"error": _name}
    MODES[f"df-{_name}-sum2"] = (False, {**_spec, "method": "sum", "squares": True})


def data_free_tables(
    analysis, config: CompressionConfig, combine: tuple[str, str, str] | None, squares: bool
) -> list:
    """The candidate tables of a data-free mode: one measure's, or two combined row by row
    (``COMBINED``); with ``squares`` every error squared."""
    if combine is None:
        tables = candidate_tables(analysis, config)
    else:
        rule, first, second = combine
        pairs = zip(
            candidate_tables(analysis, config.replace(error=first)),
            candidate_tables(analysis, config.replace(error=second)),
            strict=True,
        )
        tables = []
        for one, two in pairs:
            assert np.array_equal(one.groups, two.groups) and np.array_equal(one.ranks, two.ranks)
            if rule == "max":
                errors = np.maximum(one.errors, two.errors)
            else:
                errors = np.sqrt((one.errors**2 + two.errors**2) / 2)
            tables.append(dataclasses.replace(one, errors=errors))
    if squares:
        tables = [dataclasses.replace(table, errors=table.errors**2) for table in tables]
    return tables


def white_inputs(model: onnx.ModelProto, shapes: dict, count: int) -> dict[str, np.ndarray]:
    """``count`` samples of white noise per float input, one ``random_inputs`` seed per batch
    (what the data-free ``--error network`` measured on before its synthetic inputs): the
    ``df-network-white`` modes."""
    from onnx_lowrank.feeds import random_inputs

    parts = [random_inputs(model, shapes, 0)]
    while len(next(iter(parts[-1].values()))) * len(parts) < count:
        parts.append(random_inputs(model, shapes, len(parts)))
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def text_lines(count: int, seed: int) -> np.ndarray:
    """``count`` synthetic text lines, half turned by 180°, as PP-OCR classifier inputs."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    alphabet = list("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789")
    lines = np.empty((count, 3, 48, 192), dtype=np.float32)
    for index in range(count):
        size = int(rng.integers(22, 34))
        font = ImageFont.load_default(size=size)
        text = "".join(rng.choice(alphabet, int(rng.integers(5, 12))))
        ink, paper = int(rng.integers(0, 80)), int(rng.integers(180, 256))
        image = Image.new("RGB", (8 + size * len(text) * 3 // 5, 48), (paper,) * 3)
        ImageDraw.Draw(image).text(
            (int(rng.integers(2, 8)), int(rng.integers(0, max(1, 44 - size)))),
            text,
            fill=(ink,) * 3,
            font=font,
        )
        if index % 2:
            image = image.rotate(180)
        width = min(192, round(48 * image.width / image.height))
        resized = np.asarray(image.resize((width, 48), Image.BILINEAR), dtype=np.float32)
        line = np.zeros((48, 192, 3), dtype=np.float32)
        line[:, :width] = (resized / 255.0 - 0.5) / 0.5
        lines[index] = line.transpose(2, 0, 1)
    return lines


def ppocr_task(count: int, evaluation_count: int) -> tasks.Task:
    model = REPO / "tests" / "models" / "ppocr_mobile_v2.0_cls.onnx"
    calibration = text_lines(count, seed=1)
    evaluation = {"x": text_lines(evaluation_count, seed=2)}
    reference = tasks._outputs(model, evaluation).argmax(axis=1)

    def metrics(compressed: onnx.ModelProto) -> dict[str, float]:
        scores = tasks._outputs(compressed, evaluation)
        return {"agreement": float(np.mean(scores.argmax(axis=1) == reference))}

    return tasks.Task(
        name="ppocr",
        model=model,
        calibration={"x": calibration},
        metrics=metrics,
        headline="agreement",
        notes=(
            f"calibration: {count} synthetic text lines (seed 1); evaluation: "
            f"{evaluation_count} others (seed 2), half turned by 180°"
        ),
    )


def minilm_task(models_dir: Path) -> tasks.Task:
    """all-MiniLM-L6-v2 (``benchmarks/sentence_embeddings.py``): paraphrase retrieval and the
    mean cosine of the embeddings to the original's, on its 160 evaluation sentences."""
    import sentence_embeddings as sentences

    model = models_dir / sentences.MODEL
    tokenizer = models_dir / sentences.TOKENIZER
    if not model.exists():
        raise SystemExit(f"{model} is missing: run tests/models/fetch_models.py --only minilm_l6")
    pairs = sentences.PARAPHRASES
    feeds = sentences.tokenize(tokenizer, [a for a, _ in pairs] + [b for _, b in pairs])
    reference = sentences.embed(model, feeds)
    task_shapes["minilm"] = {name: array.shape for name, array in feeds.items()}
    return tasks.Task(
        name="minilm",
        model=model,
        calibration=sentences.tokenize(tokenizer, sentences.CALIBRATION),
        metrics=lambda compressed: sentences.metrics(reference, sentences.embed(compressed, feeds)),
        headline="retrieval",
        notes=(
            f"calibration: {len(sentences.CALIBRATION)} sentences; evaluation: {len(pairs)} "
            "paraphrase pairs (benchmarks/sentence_data.py)"
        ),
    )


def ppocr_rec_task(models_dir: Path) -> tasks.Task:
    """The PP-OCRv4 recognizer (``benchmarks/ocr_heads.py``'s ``rec``): rendered text lines,
    greedy CTC decoding; headline the character accuracy against the rendered text."""
    import ocr_heads as ocr

    model = models_dir / "ch_PP-OCRv4_rec_infer.onnx"
    if not model.exists():
        raise SystemExit(f"{model} is missing: run tests/models/fetch_models.py --only ppocr_rec")
    calibration_texts = ocr.lines(ocr.CALIBRATION)
    seen = set(calibration_texts)
    texts = [t for t in ocr.lines([s for pair in ocr.PARAPHRASES for s in pair]) if t not in seen]
    inputs = ocr.batch([ocr.render(t) for t in texts], 320)
    classes = ocr.characters(model)
    reference = ocr.decode(ocr.session(model).run(None, {"x": inputs})[0], classes)
    data = (inputs, texts, reference, classes)
    task_shapes["ppocr-rec"] = {"x": (1, 3, 48, 320)}
    return tasks.Task(
        name="ppocr-rec",
        model=model,
        calibration={"x": ocr.batch([ocr.render(t) for t in calibration_texts], 320)},
        metrics=lambda compressed: ocr.evaluate("rec", compressed, data),
        headline="char_accuracy",
        notes=(
            f"calibration: {len(calibration_texts)} rendered lines; evaluation: {len(texts)} "
            "others (benchmarks/ocr_heads.py)"
        ),
    )


def make_task(name: str, args: argparse.Namespace) -> tasks.Task:
    if name == "mnist":
        return tasks.mnist_task()
    if name == "efficientnet":
        images = args.models_dir / "images"
        return tasks.efficientnet_task(args.models_dir, images, args.crops, args.eval_crops)
    if name == "crepe":
        return tasks.crepe_task(args.tones, args.eval_tones)
    if name == "crepe-full":  # exported into the model cache by benchmarks/crepe_full.py
        path = args.models_dir / "crepe_full.onnx"
        if not path.exists():
            raise SystemExit(f"quality.py: error: {path} is missing; run benchmarks/crepe_full.py")
        return tasks.crepe_task(args.tones, args.eval_tones, path, "crepe-full")
    if name == "ppocr":
        return ppocr_task(args.lines, args.eval_lines)
    if name == "minilm":
        return minilm_task(args.models_dir)
    if name == "ppocr-rec":
        return ppocr_rec_task(args.models_dir)
    raise SystemExit(f"quality.py: error: unknown model {name!r}")


#: Concrete shapes of dynamic inputs (the PP-OCR classifier's height and width are dynamic).
task_shapes = {"ppocr": {"x": (1, 3, 48, 192)}}


def run_task(
    task: tasks.Task, modes: list[str], budgets: list[float], folder: Path, samples: int
) -> dict:
    path = folder / f"{task.name}_calibration.npz"
    np.savez(path, **task.calibration)
    original = task.metrics(onnx.load(str(task.model)))
    print(f"{task.name}: original {original}", flush=True)
    rows, timings = [], {}
    for mode in modes:
        calibrated, fields = MODES[mode]
        fields = dict(fields)
        combine, squares = fields.pop("combine", None), fields.pop("squares", False)
        if fields.pop("synthetic", None) == "white":
            inputs = folder / f"{task.name}_white.npz"
            np.savez(
                inputs,
                **white_inputs(onnx.load(str(task.model)), task_shapes.get(task.name, {}), samples),
            )
            fields["inputs"] = str(inputs)
        base = CompressionConfig(
            params=1.0,
            validate=False,
            latency_check=False,  # quality only: the latency filter is the same for every mode
            input_shapes=task_shapes.get(task.name, {}),
            calibration=str(path) if calibrated else None,
            sensitivity_samples=samples,
            **fields,
        )
        started = time.perf_counter()
        analysis = analyze(task.model, base)
        timings[mode] = {"analyze": time.perf_counter() - started, **analysis.timings}
        for budget in budgets:
            config = base.replace(params=budget)
            started = time.perf_counter()
            try:
                tables = data_free_tables(analysis, config, combine, squares)
                choices = choose(analysis, tables, config)
            except Exception as exc:  # an infeasible budget is a result too
                print(f"  {mode:16s} {budget:.2f}: {exc}", flush=True)
                continue
            result = realize(analysis, tables, choices, config)
            row = {
                "mode": mode,
                "budget": budget,
                "params_fraction": result.report.params_after / result.report.params_before,
                "seconds": time.perf_counter() - started,
                **task.metrics(result.model),
                # (g, r) per layer, (0, 0) for a dense one
                "layers": {
                    t.layer: [int(t.groups[c]), int(t.ranks[c])]
                    for t, c in zip(tables, choices, strict=True)
                },
            }
            rows.append(row)
            print(f"  {mode:16s} {budget:.2f}: {json.dumps(row)}", flush=True)
        if analysis.network is not None:
            timings[mode]["sensitivity"] = analysis.network.seconds
            timings[mode]["sensitivity_runs"] = analysis.network.runs
        print(f"  {mode:16s} timings {json.dumps(timings[mode])}", flush=True)
    return {
        "model": task.name,
        "notes": task.notes,
        "headline": task.headline,
        "original": original,
        "timings": timings,
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        key = result["headline"]
        modes = list(dict.fromkeys(row["mode"] for row in result["rows"]))
        budgets = sorted({row["budget"] for row in result["rows"]}, reverse=True)
        lines.append(
            f"**{result['model']}** ({result['notes']}); {key.replace('_', ' ')}, original "
            f"{result['original'][key]:.2%}\n"
        )
        lines.append("| params | " + " | ".join(modes) + " |")
        lines.append("|---" * (len(modes) + 1) + "|")
        for budget in budgets:
            cells = []
            for mode in modes:
                hit = [r for r in result["rows"] if r["mode"] == mode and r["budget"] == budget]
                cells.append(f"{hit[0][key]:.2%}" if hit else "-")
            lines.append(f"| {budget:.0%} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("| seconds | " + " | ".join(modes) + " |")
        lines.append("|---" * (len(modes) + 1) + "|")
        for label, field in (("analyze", "analyze"), ("network errors", "sensitivity")):
            cells = [f"{result['timings'][m].get(field, 0):.1f}" for m in modes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        per_budget = [
            np.mean([r["seconds"] for r in result["rows"] if r["mode"] == m]) for m in modes
        ]
        lines.append("| per budget | " + " | ".join(f"{s:.1f}" for s in per_budget) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        key = result["headline"]
        for mode in dict.fromkeys(row["mode"] for row in result["rows"]):
            rows = sorted(
                (r for r in result["rows"] if r["mode"] == mode), key=lambda r: r["budget"]
            )
            style = "s-" if mode.startswith("cal") else "o--"
            axis.plot([r["budget"] for r in rows], [r[key] for r in rows], style, label=mode)
        axis.axhline(result["original"][key], color="gray", linewidth=0.8)
        axis.set_xlabel("params budget")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_title(result["model"])
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist,efficientnet,crepe,ppocr")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.5,0.3")
    default_dir = os.environ.get("ONNX_LOWRANK_MODELS", "~/.cache/onnx-lowrank/models")
    parser.add_argument("--models-dir", type=Path, default=Path(default_dir).expanduser())
    parser.add_argument("--crops", type=int, default=32, help="calibration crops per image")
    parser.add_argument("--eval-crops", type=int, default=64, help="evaluation crops per image")
    parser.add_argument("--tones", type=int, default=256, help="CREPE calibration frames")
    parser.add_argument("--eval-tones", type=int, default=2048, help="CREPE evaluation frames")
    parser.add_argument("--lines", type=int, default=256, help="PP-OCR calibration lines")
    parser.add_argument("--eval-lines", type=int, default=512, help="PP-OCR evaluation lines")
    parser.add_argument(
        "--sensitivity-samples", type=int, default=CompressionConfig.sensitivity_samples
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if modes == ["df-weights"]:  # every data-free mode on weight errors (not the network ones)
        modes = [m for m in MODES if m.startswith("df-") and "network" not in m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            task = make_task(name, args)
            results.append(run_task(task, modes, budgets, Path(folder), args.sensitivity_samples))
    machine = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
    }
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
