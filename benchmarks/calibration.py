"""Data-free against calibration-aware compression, at the same budgets, on three real models.

    python benchmarks/calibration.py [--models mnist,efficientnet,crepe] [--method svd]
        [--models-dir DIR] [--json OUT.json] [--plot OUT.png] [--markdown]

For every model and parameter budget, the model is compressed twice with the same method:
data-free (``--error bound``, plain SVD of the weights) and with calibration data
(``--calibration``, whitened SVD, bias correction, ``--error output``). Each analysis is made
once and reused for every budget, as ``sweep`` does. Calibration and evaluation data never
overlap:

* **MNIST CNN** (``samples/``): calibrate on the 1000 training images of
  ``samples/mnist_train_calib.npz``, measure test accuracy on the 3000 images of
  ``samples/mnist_test.npz``.
* **EfficientNet-Lite0** (``<models-dir>/efficientnet_lite0.onnx``): images of
  ``<models-dir>/images`` sorted by name; the even-numbered ones give the calibration crops, the
  odd-numbered ones the evaluation crops. Each crop is a random square region (a third of the
  image or more, half mirrored), then RGB, shorter side 256 bicubic, centre crop 224,
  ``(x − 127) / 128``, NCHW. Metric: top-1 agreement with the original model.
* **CREPE tiny** (``tests/models/crepe_tiny.onnx``): synthetic harmonic tones of known
  frequency (log-uniform 60–1500 Hz, random harmonic amplitudes and phases, light noise),
  1024-sample frames at 16 kHz, each frame mean-centred and divided by ``max(1e-10, std)``
  (ddof 1). Calibration and evaluation tones come from different seeds. The pitch is the
  probability-weighted mean of the cents of the 9 bins around the argmax (bin ``b`` is
  ``1997.3794 + 20·b`` cents, ``f = 10 · 2^(cents/1200)`` Hz). Metrics: raw pitch accuracy
  (share of frames within 50 cents) and the mean absolute error in cents.

``--models-dir`` defaults to ``$ONNX_LOWRANK_MODELS``, else ``~/.cache/onnx-lowrank/models``
(``tests/models/fetch_models.py`` fills it). Needs numpy, onnxruntime, Pillow, and matplotlib
for ``--plot``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "samples"

#: Parameter budgets per model, down to where both methods are near chance level.
BUDGETS = {
    "mnist": [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15],
    "efficientnet": [0.98, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7],
    "crepe": [0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5],
}


@dataclass
class Task:
    """One model: where it is, its calibration inputs, and how to score a compressed copy."""

    name: str
    model: Path
    calibration: dict[str, np.ndarray]
    metrics: Callable[[onnx.ModelProto], dict[str, float]]
    headline: str  # the metric plotted and compared
    notes: str


def _session(model: onnx.ModelProto | Path):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _outputs(model, feeds: dict[str, np.ndarray], batch: int = 256) -> np.ndarray:
    session = _session(model)
    (name,) = feeds
    data = feeds[name]
    return np.concatenate(
        [session.run(None, {name: data[i : i + batch]})[0] for i in range(0, len(data), batch)]
    )


def _load_sample_module():
    spec = importlib.util.spec_from_file_location(
        "make_calibration", SAMPLES / "make_calibration.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------
# MNIST


def mnist_task() -> Task:
    def normalise(images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) / 255.0 - 0.1307) / 0.3081)[:, None]

    train = np.load(SAMPLES / "mnist_train_calib.npz")
    test = np.load(SAMPLES / "mnist_test.npz")
    test_feeds = {"input": normalise(test["images"])}
    labels = test["labels"]

    def metrics(model: onnx.ModelProto) -> dict[str, float]:
        logits = _outputs(model, test_feeds)
        return {"accuracy": float(np.mean(logits.argmax(axis=1) == labels))}

    return Task(
        name="mnist",
        model=SAMPLES / "mnist_cnn.onnx",
        calibration={"input": normalise(train["images"])},
        metrics=metrics,
        headline="accuracy",
        notes="calibration: 1000 MNIST training images; evaluation: 3000 MNIST test images",
    )


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0


def image_crops(paths: list[Path], crops: int, seed: int) -> np.ndarray:
    """``crops`` preprocessed random square crops of every image, NCHW float32."""
    from PIL import Image

    sample = _load_sample_module()
    rng = np.random.default_rng(seed)
    mean, std = np.float32(127.0), np.float32(128.0)
    arrays = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
        # crop_regions starts with the whole image; skip it so every sample is a random crop
        for box, mirrored in sample.crop_regions(*image.size, crops + 1, rng)[1:]:
            region = image.crop(box)
            if mirrored:
                region = region.transpose(Image.FLIP_LEFT_RIGHT)
            arrays.append(sample.preprocess(region, (224, 224), 256, 1.0, mean, std))
    return np.stack(arrays)


def efficientnet_task(
    models_dir: Path, images_dir: Path, crops: int, evaluation_crops: int
) -> Task:
    model = models_dir / "efficientnet_lite0.onnx"
    paths = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    if not model.is_file() or len(paths) < 2:
        raise SystemExit(
            f"calibration.py: error: need {model} and images in {images_dir}; run "
            "tests/models/fetch_models.py"
        )
    calibration_paths, evaluation_paths = paths[0::2], paths[1::2]
    calibration = image_crops(calibration_paths, crops, seed=1)
    evaluation = {"input": image_crops(evaluation_paths, evaluation_crops, seed=2)}
    reference = _outputs(model, evaluation, batch=32).argmax(axis=1)

    def metrics(compressed: onnx.ModelProto) -> dict[str, float]:
        logits = _outputs(compressed, evaluation, batch=32)
        return {"top1_agreement": float(np.mean(logits.argmax(axis=1) == reference))}

    return Task(
        name="efficientnet",
        model=model,
        calibration={"input": calibration},
        metrics=metrics,
        headline="top1_agreement",
        notes=(
            f"calibration: {len(calibration)} crops of "
            f"{', '.join(p.name for p in calibration_paths)}; evaluation: "
            f"{len(evaluation['input'])} crops of {', '.join(p.name for p in evaluation_paths)}"
        ),
    )


# --------------------------------------------------------------------------------------------
# CREPE tiny

SAMPLE_RATE = 16000
FRAME = 1024


def tones(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` normalised frames of harmonic tones, and their frequencies in Hz."""
    rng = np.random.default_rng(seed)
    frequencies = np.exp(rng.uniform(np.log(60.0), np.log(1500.0), count))
    t = np.arange(FRAME) / SAMPLE_RATE
    frames = np.empty((count, FRAME))
    for index, f0 in enumerate(frequencies):
        harmonics = np.arange(1, int(min(12, (SAMPLE_RATE / 2 - 100) // f0)) + 1)
        amplitudes = rng.uniform(0.2, 1.0, len(harmonics)) / harmonics ** rng.uniform(0.5, 1.5)
        phases = rng.uniform(0, 2 * np.pi, len(harmonics))
        signal = np.sum(
            amplitudes[:, None] * np.sin(2 * np.pi * f0 * harmonics[:, None] * t + phases[:, None]),
            axis=0,
        )
        frames[index] = signal + rng.normal(0, 0.01 * np.std(signal), FRAME)
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(1e-10, frames.std(axis=1, ddof=1, keepdims=True))
    return frames.astype(np.float32), frequencies


def decode_cents(probabilities: np.ndarray) -> np.ndarray:
    """Weighted mean of the cents of the 9 bins around the argmax."""
    cents = 1997.3794 + 20 * np.arange(probabilities.shape[1])
    center = probabilities.argmax(axis=1)
    result = np.empty(len(probabilities))
    for index, peak in enumerate(center):
        low, high = max(0, peak - 4), min(probabilities.shape[1], peak + 5)
        weights = probabilities[index, low:high]
        result[index] = np.sum(weights * cents[low:high]) / max(np.sum(weights), 1e-12)
    return result


def crepe_task(
    count: int, evaluation_count: int, model: Path | None = None, name: str = "crepe"
) -> Task:
    """CREPE tiny (or ``model``, CREPE full from benchmarks/crepe_full.py) on synthetic tones."""
    model = model or REPO / "tests" / "models" / "crepe_tiny.onnx"
    calibration, _ = tones(count, seed=1)
    evaluation, frequencies = tones(evaluation_count, seed=2)
    truth = 1200 * np.log2(frequencies / 10.0)

    def metrics(compressed: onnx.ModelProto) -> dict[str, float]:
        error = np.abs(decode_cents(_outputs(compressed, {"frames": evaluation})) - truth)
        return {"rpa": float(np.mean(error <= 50)), "cents_error": float(np.mean(error))}

    return Task(
        name=name,
        model=model,
        calibration={"frames": calibration},
        metrics=metrics,
        headline="rpa",
        notes=(
            f"calibration: {count} tone frames (seed 1); evaluation: {evaluation_count} other "
            "tone frames (seed 2), 60-1500 Hz"
        ),
    )


# --------------------------------------------------------------------------------------------


def run_task(task: Task, method: str, budgets: list[float], folder: Path) -> dict:
    path = folder / f"{task.name}_calibration.npz"
    np.savez(path, **task.calibration)
    original = task.metrics(onnx.load(str(task.model)))
    print(f"{task.name}: original {original}", flush=True)
    rows = []
    modes = {
        "data-free": CompressionConfig(params=1.0, method=method, validate=False, error="bound"),
        "calibrated": CompressionConfig(
            params=1.0, method=method, validate=False, calibration=str(path)
        ),
    }
    timings = {}
    for mode, base in modes.items():
        started = time.perf_counter()
        analysis = analyze(task.model, base)
        timings[f"analyze_{mode}"] = time.perf_counter() - started
        for budget in budgets:
            config = base.replace(params=budget)
            started = time.perf_counter()
            tables = candidate_tables(analysis, config)
            result = realize(analysis, tables, choose(analysis, tables, config), config)
            elapsed = time.perf_counter() - started
            report = result.report
            row = {
                "mode": mode,
                "budget": budget,
                "params_fraction": report.params_after / report.params_before,
                "seconds": elapsed,
                "max_output_error": report.max_output_error,
                **task.metrics(result.model),
            }
            rows.append(row)
            print(f"  {mode:10s} {budget:.2f}: {json.dumps(row)}", flush=True)
    return {
        "model": task.name,
        "notes": task.notes,
        "headline": task.headline,
        "original": original,
        "method": method,
        "timings": timings,
        "calibration_samples": len(next(iter(task.calibration.values()))),
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        keys = [k for k in result["original"]]
        lines.append(
            f"**{result['model']}** ({result['notes']}); original: "
            + ", ".join(f"{k} {_fmt(k, v)}" for k, v in result["original"].items())
        )
        lines.append("")
        header = ["params kept"] + [f"{k} {m}" for k in keys for m in ("data-free", "calibrated")]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        by_budget: dict[float, dict[str, dict]] = {}
        for row in result["rows"]:
            by_budget.setdefault(row["budget"], {})[row["mode"]] = row
        for modes in by_budget.values():
            kept = modes["calibrated"]["params_fraction"]
            cells = [f"{kept:.1%}"]
            for key in keys:
                cells += [_fmt(key, modes[m][key]) for m in ("data-free", "calibrated")]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(key: str, value: float) -> str:
    return f"{value:.1f}" if key == "cents_error" else f"{value:.2%}"


def within_one_point(result: dict) -> dict[str, float | None]:
    """Largest parameter reduction with accuracy within 1 point of the original, per mode."""
    floor = result["original"]["accuracy"] - 0.01
    best: dict[str, float | None] = {"data-free": None, "calibrated": None}
    for row in result["rows"]:
        if row["accuracy"] >= floor:
            reduction = 1 - row["params_fraction"]
            if best[row["mode"]] is None or reduction > best[row["mode"]]:
                best[row["mode"]] = reduction
    return best


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for axis, result in zip(axes[0], results, strict=True):
        key = result["headline"]
        for mode, style in (("data-free", "o--"), ("calibrated", "s-")):
            rows = [row for row in result["rows"] if row["mode"] == mode]
            axis.plot(
                [row["params_fraction"] for row in rows],
                [row[key] for row in rows],
                style,
                label=mode,
            )
        axis.axhline(result["original"][key], color="gray", linewidth=0.8, label="original")
        axis.set_xlabel("fraction of parameters kept")
        axis.set_ylabel(key.replace("_", " "))
        axis.set_title(f"{result['model']} ({result['method']})")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mnist,efficientnet,crepe")
    parser.add_argument("--method", default="svd", help="allocation method (default svd)")
    default_dir = os.environ.get("ONNX_LOWRANK_MODELS", "~/.cache/onnx-lowrank/models")
    parser.add_argument("--models-dir", type=Path, default=Path(default_dir).expanduser())
    parser.add_argument("--images-dir", type=Path, help="default: MODELS_DIR/images")
    parser.add_argument("--crops", type=int, default=32, help="calibration crops per image")
    parser.add_argument("--eval-crops", type=int, default=64, help="evaluation crops per image")
    parser.add_argument("--tones", type=int, default=256, help="CREPE calibration frames")
    parser.add_argument("--eval-tones", type=int, default=2048, help="CREPE evaluation frames")
    parser.add_argument("--json", type=Path, help="write all results as JSON")
    parser.add_argument("--plot", type=Path, help="write the curves as a PNG")
    parser.add_argument("--markdown", action="store_true", help="print the markdown table")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            if name == "mnist":
                task = mnist_task()
            elif name == "efficientnet":
                images = args.images_dir or args.models_dir / "images"
                task = efficientnet_task(args.models_dir, images, args.crops, args.eval_crops)
            elif name == "crepe":
                task = crepe_task(args.tones, args.eval_tones)
            else:
                parser.error(f"unknown model {name!r}; choose from mnist, efficientnet, crepe")
            results.append(run_task(task, args.method, BUDGETS[name], Path(folder)))
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
    }
    for result in results:
        if result["model"] == "mnist":
            result["within_one_point"] = within_one_point(result)
            best = result["within_one_point"]
            print(f"mnist: largest parameter reduction within 1 point: {best}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
