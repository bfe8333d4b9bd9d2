"""What calibration costs against running the model over the calibration set (issue 12, item 4).

    python benchmarks/calibration_speed.py [--models crepe,crepe-full,mnist,efficientnet,ppocr]
        [--repeats 2] [--samples N] [--realize PARAMS] [--profile MODEL] [--markdown]

For every model, interleaved ``--repeats`` times in one process:

* **forward**: the calibration set through ONNX Runtime (CPU EP, full optimization, default
  threads), in the batches calibration uses (``sessions.run_batches``: activations of the
  layer inputs exposed as outputs, batches grown to ``ACTIVATION_BYTES``), consuming nothing;
  plain model, session built before the clock starts;
* **calibrate**: ``pipeline.analyze`` with ``--calibration`` (``validate=False``), its stage
  timings (``Analysis.timings``: ``spectra`` is the data-free spectra, ``calibrate`` the
  statistics and whitened spectra), the ratio ``calibrate / forward``, and the process's CPU
  seconds over the whole ``analyze`` (all threads; less sensitive than wall time to other jobs
  on a shared machine).

The calibration sets are those of the quality benchmarks (benchmarks/calibration.py,
benchmarks/quality.py): MNIST 1000 training images, EfficientNet-Lite0 random crops of the
calibration images (``--crops`` per image), CREPE tiny and CREPE full 256 synthetic tone frames
(seed 1), the PP-OCR classifier 256 synthetic text lines (seed 1). CREPE full is exported once
into the model cache by benchmarks/crepe_full.py (needs torch; ``TORCH_PYTHON``).

With ``--realize PARAMS`` the same analysis is then compressed to that fraction of the
parameters (``choose`` and ``realize``, refit on, no validation), and the wall and CPU seconds
of ``realize`` and its ``refit`` stage are printed too.

``uptime``'s load averages are printed with every timing: the machine is shared, so compare only
numbers taken in one run. ``--profile MODEL`` prints the top of a cProfile of one ``analyze``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as tasks
import crepe_full
import quality

from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize
from onnx_lowrank.sessions import make_session

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(
    os.environ.get("ONNX_LOWRANK_MODEL_CACHE", "~/.cache/onnx-lowrank/models")
).expanduser()


def load() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def model_and_data(name: str, args: argparse.Namespace) -> tuple[Path, dict[str, np.ndarray]]:
    if name == "crepe":
        return REPO / "tests" / "models" / "crepe_tiny.onnx", {"frames": tasks.tones(256, 1)[0]}
    if name == "crepe-full":
        return crepe_full.ensure(), {"frames": tasks.tones(256, 1)[0]}
    if name == "mnist":
        train = np.load(tasks.SAMPLES / "mnist_train_calib.npz")
        images = (train["images"].astype(np.float32) / 255.0 - 0.1307) / 0.3081
        return tasks.SAMPLES / "mnist_cnn.onnx", {"input": images[:, None]}
    if name == "efficientnet":
        images = MODELS_DIR / "images"
        paths = sorted(p for p in images.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        crops = tasks.image_crops(paths[0::2], args.crops, seed=1)
        return MODELS_DIR / "efficientnet_lite0.onnx", {"input": crops}
    if name == "ppocr":
        lines = quality.text_lines(256, seed=1)
        return REPO / "tests" / "models" / "ppocr_mobile_v2.0_cls.onnx", {"x": lines}
    raise SystemExit(f"calibration_speed.py: error: unknown model {name!r}")


def forward_seconds(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """The calibration set through the plain model, in calibration's batch sizes."""
    import onnx

    from onnx_lowrank.sessions import ACTIVATION_BYTES, MAX_BATCH

    model = onnx.load(str(path))
    session = make_session(model, ["CPUExecutionProvider"], log_level=3)
    samples = len(next(iter(feeds.values())))
    start, size = 0, 1
    began = time.perf_counter()
    while start < samples:
        batch = {name: array[start : start + size] for name, array in feeds.items()}
        values = session.run(None, batch)
        done = min(start + size, samples)
        taken = sum(value.nbytes for value in values) / (done - start)
        size = int(min(MAX_BATCH, max(1, ACTIVATION_BYTES // max(taken, 1.0))))
        start = done
    return time.perf_counter() - began


def calibrate_timings(
    path: Path, data: Path, name: str, params: float | None = None, error: str | None = None
) -> dict[str, float]:
    """``analyze``'s stage timings, its wall and CPU seconds; with ``params``, also those of
    ``realize`` at that budget (``realize``, ``realize_cpu``, and its ``factorize`` and
    ``refit`` stages), the calibrated default (refit on)."""
    shapes = quality.task_shapes.get(name.split("-")[0], {})
    config = CompressionConfig(
        params=params or 0.5, calibration=str(data), validate=False, input_shapes=shapes
    )
    if error is not None:
        config = config.replace(error=error)
    began, cpu = time.perf_counter(), time.process_time()
    analysis = analyze(str(path), config)
    timings = dict(analysis.timings)
    timings["analyze"] = time.perf_counter() - began
    timings["cpu"] = time.process_time() - cpu
    if params is not None:
        tables = candidate_tables(analysis, config)
        choices = choose(analysis, tables, config)
        began, cpu = time.perf_counter(), time.process_time()
        result = realize(analysis, tables, choices, config)
        timings["realize"] = time.perf_counter() - began
        timings["realize_cpu"] = time.process_time() - cpu
        for stage in ("factorize", "refit"):
            timings[stage] = result.report.timings.get(stage, 0.0)
        timings["refitted"] = result.report.calibration.get("refitted_layers", 0)
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="crepe,crepe-full,mnist,efficientnet,ppocr")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--crops", type=int, default=16, help="EfficientNet crops per image")
    parser.add_argument("--samples", type=int, help="only the first N calibration samples")
    parser.add_argument("--profile", help="cProfile one analyze (and realize) of this model")
    parser.add_argument(
        "--realize", type=float, metavar="PARAMS", help="also realize at this --params (refit on)"
    )
    parser.add_argument("--error", help="the error measure of --realize (default: the default)")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path, feeds = model_and_data(name, args)
            if args.samples:
                feeds = {key: value[: args.samples] for key, value in feeds.items()}
            data = Path(folder) / f"{name}.npz"
            np.savez(data, **feeds)
            samples = len(next(iter(feeds.values())))
            if args.profile == name:
                profile = cProfile.Profile()
                profile.runcall(calibrate_timings, path, data, name, args.realize, args.error)
                pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
                pstats.Stats(profile).sort_stats("tottime").print_stats(20)
                continue
            for repeat in range(args.repeats):
                before = load()
                forward = forward_seconds(path, feeds)
                timings = calibrate_timings(path, data, name, args.realize, args.error)
                row = dict(
                    model=name,
                    samples=samples,
                    repeat=repeat,
                    forward=forward,
                    calibrate=timings.get("calibrate", float("nan")),
                    spectra=timings.get("spectra", 0.0),
                    analyze=timings["analyze"],
                    cpu=timings["cpu"],
                    realize=timings.get("realize", float("nan")),
                    realize_cpu=timings.get("realize_cpu", float("nan")),
                    refit=timings.get("refit", float("nan")),
                    load=f"{before} -> {load()}",
                )
                rows.append(row)
                print(
                    f"{name:13s} n={samples:4d} forward {forward:7.2f} s  calibrate "
                    f"{row['calibrate']:7.2f} s ({row['calibrate'] / forward:5.1f}x)  spectra "
                    f"{row['spectra']:6.2f} s  analyze {row['analyze']:7.2f} s "
                    f"(CPU {row['cpu']:7.2f} s)  "
                    + (
                        f"realize {row['realize']:7.2f} s (CPU {row['realize_cpu']:7.2f} s, "
                        f"refit {row['refit']:7.2f} s, {timings['refitted']} layers)  "
                        if args.realize
                        else ""
                    )
                    + f"load {row['load']}",
                    flush=True,
                )
    if args.markdown and rows:
        print(
            "\n| model | samples | forward (s) | calibrate (s) | × forward | analyze (s) |", end=""
        )
        print(" analyze CPU (s) | realize (s) | realize CPU (s) | refit (s) | load |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for row in rows:
            print(
                f"| {row['model']} | {row['samples']} | {row['forward']:.2f} | "
                f"{row['calibrate']:.2f} | {row['calibrate'] / row['forward']:.1f} | "
                f"{row['analyze']:.2f} | {row['cpu']:.2f} | {row['realize']:.2f} | "
                f"{row['realize_cpu']:.2f} | {row['refit']:.2f} | {row['load']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
