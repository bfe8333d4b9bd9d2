"""Compare the allocation methods, and the --max-groups limit, on task quality and latency.

    python benchmarks/compare_methods.py [--models-dir DIR] [--json OUT.json]

Part 1, methods × budgets (defaults: every divisor as group count, error measure ``bound``):
  * the MNIST CNN in ``samples/``: test accuracy on the 3000 labelled test images;
  * CREPE tiny (``tests/models/crepe_tiny.onnx``): raw pitch accuracy (within 50 cents) on 300
    synthetic harmonic tones of known pitch, 60–1500 Hz;
  * EfficientNet-Lite0 (``efficientnet_lite0.onnx`` in the models folder): top-1 and top-5
    agreement with the original model on natural images: the scikit-image pictures in
    ``images/``, each resized (shorter side 256, 288, 320, 352; bicubic), cropped to 224 at the
    centre and the four corners, and flipped or not (280 inputs), normalised ``(x - 127) / 128``.
Part 2, ``--max-groups`` 1, 4, 8, 16 and "all divisors", for ``alds`` with both error measures:
  the same task metrics plus ONNX Runtime CPU latency (median of alternating timed runs of the
  original and the compressed model on one thread, batch 1 for EfficientNet, 64 frames or
  images for CREPE and MNIST: the median over 200 back-to-back pairs of the compressed/original
  time ratio, and each model's minimum time; a first row times the original against itself,
  the noise floor).

Prints markdown tables (pasted into docs/methods.md) and writes every number to ``--json``.
The models folder defaults to ``$ONNX_LOWRANK_MODELS``, else ``~/.cache/onnx-lowrank/models``
(``python tests/models/fetch_models.py`` fills it). Needs the ``cpu`` extra and Pillow (which
comes with matplotlib, i.e. the ``plot`` or ``test`` extra) for the image preprocessing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank import CompressionConfig, InfeasibleBudgetError
from onnx_lowrank.config import METHODS
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.types import Analysis

REPO = Path(__file__).resolve().parent.parent
MNIST = REPO / "samples" / "mnist_cnn.onnx"
MNIST_TEST = REPO / "samples" / "mnist_test.npz"
ALL_DIVISORS = 0  # stands for --max-groups all (every divisor), the default


def default_models_dir() -> Path:
    return Path(os.environ.get("ONNX_LOWRANK_MODELS", "~/.cache/onnx-lowrank/models")).expanduser()


def session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_batches(model, name: str, inputs: np.ndarray, threads: int, batch: int) -> np.ndarray:
    runner = session(model, threads)
    return np.concatenate(
        [
            runner.run(None, {name: inputs[start : start + batch]})[0]
            for start in range(0, len(inputs), batch)
        ]
    )


def latency_pair(original, compressed, feed: dict, threads: int, runs: int) -> dict[str, float]:
    """Latency of both models, timed in adjacent pairs after warm-up.

    Other processes share the machine and its load drifts, so each pair runs the two models
    back to back (alternating which goes first) and the compressed/original ratio of every pair
    is taken; the median of those ratios is the reported ratio. The minimum time of each model
    is reported too.
    """
    sessions = [session(original, threads), session(compressed, threads)]
    for runner in sessions:
        for _ in range(3):
            runner.run(None, feed)
    times: list[list[float]] = [[], []]
    for index in range(runs):
        order = (0, 1) if index % 2 == 0 else (1, 0)
        for which in order:
            start = time.perf_counter()
            sessions[which].run(None, feed)
            times[which].append((time.perf_counter() - start) * 1000)
    ratios = [after / before for before, after in zip(times[0], times[1], strict=True)]
    return {
        "latency_ms_original": min(times[0]),
        "latency_ms_compressed": min(times[1]),
        "latency_ratio": statistics.median(ratios),
    }


@dataclass
class Task:
    """A model, its inputs, and the quality measure of a compressed copy.

    ``kind`` is ``"labels"`` (accuracy against ``labels``), ``"agreement"`` (top-1 and top-5
    agreement with the original's outputs) or ``"pitch"`` (CREPE: raw pitch accuracy, the share
    of frames decoded within 50 cents of the true pitch ``labels`` in cents, and the median
    absolute error in cents).
    """

    name: str
    path: Path
    input_name: str
    inputs: np.ndarray
    latency_batch: int
    kind: str
    labels: np.ndarray | None = None
    reference: np.ndarray | None = None

    @property
    def metric(self) -> str:
        return {"labels": "accuracy", "agreement": "top1_agreement", "pitch": "pitch_accuracy"}[
            self.kind
        ]

    @property
    def extra_metrics(self) -> list[str]:
        return {
            "agreement": ["top5_agreement", "logits_rel_l2", "distinct_top1"],
            "pitch": ["median_cents_error"],
        }.get(self.kind, [])

    def quality(self, model: onnx.ModelProto | Path, threads: int) -> dict[str, float]:
        outputs = run_batches(model, self.input_name, self.inputs, threads, 50)
        if self.kind == "labels":
            return {"accuracy": float(np.mean(outputs.argmax(1) == self.labels))}
        if self.kind == "pitch":
            cents = CREPE_CENTS_0 + CREPE_CENTS_STEP * outputs.argmax(1)
            error = np.abs(cents - self.labels)
            return {
                "pitch_accuracy": float(np.mean(error <= 50)),
                "median_cents_error": float(np.median(error)),
            }
        top1 = self.reference.argmax(1)
        top5 = np.argsort(-outputs, axis=1)[:, :5]
        difference = np.linalg.norm(outputs - self.reference) / np.linalg.norm(self.reference)
        return {
            "top1_agreement": float(np.mean(outputs.argmax(1) == top1)),
            "top5_agreement": float(np.mean(np.any(top5 == top1[:, None], axis=1))),
            "logits_rel_l2": float(difference),
            "distinct_top1": len(np.unique(outputs.argmax(1))),
        }


def mnist_task(count: int) -> Task:
    data = np.load(MNIST_TEST)
    images = data["images"][:count].astype(np.float32) / 255.0
    inputs = ((images - 0.1307) / 0.3081)[:, None].astype(np.float32)
    return Task("mnist_cnn", MNIST, "input", inputs, 64, "labels", labels=data["labels"][:count])


#: CREPE's output bin ``b`` stands for ``CREPE_CENTS_0 + CREPE_CENTS_STEP * b`` cents above 10 Hz.
CREPE_CENTS_0, CREPE_CENTS_STEP = 1997.3794, 20.0


def crepe_task(count: int) -> Task:
    """Harmonic tones of known pitch (60–1500 Hz, log-spaced), one 1024-sample frame each at
    16 kHz: five harmonics with random amplitudes and phases (seeded), normalised per frame as
    ``torchcrepe.preprocess`` does (mean 0, unbiased standard deviation 1)."""
    rng = np.random.default_rng(0)
    rate, time_axis = 16000, np.arange(1024) / 16000
    frequencies = np.geomspace(60, 1500, count)
    frames = []
    for frequency in frequencies:
        frame = np.zeros(1024)
        for harmonic in range(1, 6):
            if frequency * harmonic < rate / 2:
                amplitude = rng.uniform(0.2, 1.0) / harmonic
                phase = rng.uniform(0, 2 * np.pi)
                frame += amplitude * np.sin(2 * np.pi * frequency * harmonic * time_axis + phase)
        frame -= frame.mean()
        frames.append(frame / max(frame.std(ddof=1), 1e-10))
    cents = 1200 * np.log2(frequencies / 10)
    path = REPO / "tests" / "models" / "crepe_tiny.onnx"
    inputs = np.asarray(frames, dtype=np.float32)
    return Task("crepe_tiny", path, "frames", inputs, 64, "pitch", labels=cents)


def efficientnet_inputs(images_dir: Path) -> np.ndarray:
    """280 deterministic views of the scikit-image pictures, preprocessed for the model."""
    from PIL import Image

    views = []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        image = Image.open(path).convert("RGB")
        for shorter in (256, 288, 320, 352):
            scale = shorter / min(image.size)
            size = (max(224, round(image.width * scale)), max(224, round(image.height * scale)))
            array = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
            height, width = array.shape[:2]
            corners = [
                ((height - 224) // 2, (width - 224) // 2),
                (0, 0),
                (0, width - 224),
                (height - 224, 0),
                (height - 224, width - 224),
            ]
            for top, left in corners:
                crop = array[top : top + 224, left : left + 224]
                views.extend([crop, crop[:, ::-1]])
    stacked = (np.stack(views) - 127.0) / 128.0
    return np.ascontiguousarray(stacked.transpose(0, 3, 1, 2), dtype=np.float32)


def efficientnet_task(models_dir: Path, threads: int) -> Task | None:
    path = models_dir / "efficientnet_lite0.onnx"
    images = models_dir / "images"
    if not path.exists() or not images.is_dir():
        print(f"skipping EfficientNet-Lite0: {path} or {images} missing", file=sys.stderr)
        return None
    inputs = efficientnet_inputs(images)
    task = Task("efficientnet_lite0", path, "input", inputs, 1, "agreement")
    task.reference = run_batches(path, "input", inputs, threads, 50)
    return task


def compress_point(analysis: Analysis, config: CompressionConfig):
    tables = candidate_tables(analysis, config)
    started = time.perf_counter()
    choices = choose(analysis, tables, config)
    seconds = time.perf_counter() - started
    result = realize(analysis, tables, choices, config)
    return result, seconds


def methods_table(task: Task, budgets: list[float], threads: int) -> list[dict]:
    base = CompressionConfig(validate=False)
    analysis = analyze(task.path, base)
    rows = []
    for fraction in budgets:
        for method in METHODS:
            config = base.replace(params=fraction, method=method)
            try:
                result, seconds = compress_point(analysis, config)
            except InfeasibleBudgetError as exc:
                rows.append(
                    {"model": task.name, "params": fraction, "method": method, "error": str(exc)}
                )
                continue
            report = result.report
            row = {
                "model": task.name,
                "params": fraction,
                "method": method,
                "params_fraction": report.params_after / report.params_before,
                "max_error_bound": report.max_error_bound,
                "max_error_actual": report.max_error_actual,
                "layers_factorized": len(report.compressed_layers),
                "grouped_layers": sum(1 for layer in report.compressed_layers if layer.groups > 1),
                "solve_seconds": seconds,
                **task.quality(result.model, threads),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def groups_table(
    task: Task, budgets: list[float], limits: list[int], threads: int, runs: int
) -> list[dict]:
    original = onnx.load(task.path)
    feed = {task.input_name: task.inputs[: task.latency_batch]}
    control = latency_pair(original, original, feed, threads, runs)  # the noise floor
    rows = [{"model": task.name, "max_groups": "original vs itself", **control}]
    print(json.dumps(rows[0]), file=sys.stderr)
    for limit in limits:
        base = CompressionConfig(validate=False, max_groups=limit or None)
        analysis = analyze(task.path, base)
        settings = [("alds", "bound"), ("alds", "max-group")]
        if limit == ALL_DIVISORS:  # what the reference code does: all divisors, lower bound
            settings.append(("alds-paper", "max-group"))
        for method, measure in settings:
            for fraction in budgets:
                config = base.replace(params=fraction, error=measure, method=method)
                try:
                    result, _ = compress_point(analysis, config)
                except InfeasibleBudgetError as exc:
                    print(f"{task.name} {limit} {method} {fraction}: {exc}", file=sys.stderr)
                    continue
                timing = latency_pair(original, result.model, feed, threads, runs)
                groups = [layer.groups for layer in result.report.compressed_layers]
                row = {
                    "model": task.name,
                    "max_groups": "all" if limit == ALL_DIVISORS else limit,
                    "method": method,
                    "error": measure,
                    "params": fraction,
                    "params_fraction": result.report.params_after / result.report.params_before,
                    "max_error_bound": result.report.max_error_bound,
                    "max_error_actual": result.report.max_error_actual,
                    "grouped_layers": sum(1 for g in groups if g > 1),
                    "largest_groups": max(groups, default=0),
                    **timing,
                    **task.quality(result.model, threads),
                }
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return rows


PERCENT = ("accuracy", "top1_agreement", "top5_agreement", "pitch_accuracy", "params_fraction")


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            if isinstance(value, float):
                precise = key.startswith(("latency", "max_error"))
                value = f"{value:.3f}" if precise else f"{value:.4g}"
                if key in PERCENT:
                    value = f"{float(value):.1%}"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def fractions(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part]


#: Per task: parameter budgets of part 1, and of part 2 (the --max-groups study).
BUDGETS = {
    "mnist": ([0.7, 0.5, 0.3, 0.2, 0.1], [0.3, 0.1]),
    "crepe": ([0.9, 0.8, 0.7, 0.5, 0.3], [0.7, 0.5]),
    "effnet": ([0.99, 0.97, 0.95, 0.9, 0.8], [0.97, 0.9]),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, default=default_models_dir())
    parser.add_argument("--json", type=Path, help="write every measured number here")
    parser.add_argument("--tasks", default="mnist,crepe,effnet", help="which models to run")
    parser.add_argument("--max-groups", default="1,4,8,16,all", help="limits to compare")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--latency-runs", type=int, default=200, help="timed pairs")
    parser.add_argument("--skip-methods", action="store_true", help="skip part 1")
    parser.add_argument("--skip-groups", action="store_true", help="skip part 2")
    args = parser.parse_args()
    limits = [ALL_DIVISORS if x == "all" else int(x) for x in args.max_groups.split(",")]
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    makers = {
        "mnist": lambda: mnist_task(3000),
        "crepe": lambda: crepe_task(300),
        "effnet": lambda: efficientnet_task(args.models_dir, args.threads),
    }
    results: dict = {"machine": info, "methods": [], "max_groups": []}
    for key in args.tasks.split(","):
        task = makers[key]()
        if task is None:
            continue
        budgets, group_budgets = BUDGETS[key]
        metrics = [(task.metric, task.metric.replace("_", " "))]
        metrics += [(name, name.replace("_", " ")) for name in task.extra_metrics]
        if task.kind == "agreement":
            classes, counts = np.unique(task.reference.argmax(1), return_counts=True)
            print(
                f"\n{task.name}: {len(task.inputs)} inputs, {len(classes)} distinct top-1 classes "
                f"of the original; a constant prediction agrees on at most "
                f"{counts.max() / len(task.inputs):.1%}"
            )
        else:
            base = task.quality(task.path, args.threads)
            print(f"\n{task.name}: original {base} on {len(task.inputs)} inputs")
        if not args.skip_methods:
            rows = methods_table(task, budgets, args.threads)
            results["methods"] += rows
            columns = [
                ("params", "--params"),
                ("method", "method"),
                ("params_fraction", "kept"),
                ("max_error_bound", "max bound"),
                ("max_error_actual", "max actual"),
                ("grouped_layers", "g>1 layers"),
                *metrics,
                ("error", "note"),
            ]
            print(markdown(rows, columns))
        if not args.skip_groups:
            rows = groups_table(task, group_budgets, limits, args.threads, args.latency_runs)
            results["max_groups"] += rows
            columns = [
                ("max_groups", "--max-groups"),
                ("method", "method"),
                ("error", "--error"),
                ("params", "--params"),
                ("max_error_bound", "max bound"),
                ("max_error_actual", "max actual"),
                ("grouped_layers", "g>1 layers"),
                ("largest_groups", "largest g"),
                *metrics,
                ("latency_ms_original", "ms original (min)"),
                ("latency_ms_compressed", "ms compressed (min)"),
                ("latency_ratio", "latency ratio"),
            ]
            print(markdown(rows, columns))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
