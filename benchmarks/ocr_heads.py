"""Row-weighted classifier heads on the two PP-OCR models: class mass against uniform rows.

    python benchmarks/ocr_heads.py [--models cls,rec] [--budgets ...] [--floors 0.1,1]
        [--models-dir DIR] [--json OUT.json] [--markdown]

With calibration data, a classifier head (a MatMul/Gemm followed only by a bias, a softmax and
the graph output) gets row weights: each output class weighs its probability mass on the
calibration data, mixed with uniform weights by ``head_floor`` (1: no weighting, the default).
This script compresses each model at the same budgets with calibration, once per ``--floors``
value (a ``head_floor``), and measures the task:

* **cls**: ``tests/models/ppocr_mobile_v2.0_cls.onnx`` (text direction, 0° or 180°; head
  200 × 2). Inputs: text lines rendered with DejaVu Sans (it ships with matplotlib), half of
  them turned 180°, resized to 48 × 192 (aspect kept, padded), ``(x/255 − 0.5)/0.5``. Metrics:
  accuracy against the true direction and top-1 agreement with the original model.
* **rec**: the PP-OCRv4 recognizer ``<models-dir>/ch_PP-OCRv4_rec_infer.onnx``
  (``tests/models/fetch_models.py --only ppocr_rec``; CTC head 120 × 6625, 30 % of the
  parameters). Inputs: rendered lines at height 48, padded to width 320. Greedy CTC decoding
  with the model's own character list (metadata ``character``; class 0 is the blank, the last
  one a space). Metrics: exact-line accuracy and character accuracy (1 − edit distance / length)
  against the rendered text, and exact agreement with the original model's reading.

Calibration lines come from ``CALIBRATION`` of benchmarks/sentence_data.py, evaluation lines
from its paraphrase pairs, less any line that is also a calibration line. Needs Pillow and
matplotlib (for the font).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont
from sentence_data import CALIBRATION, PARAPHRASES

import onnx_lowrank
from onnx_lowrank import CompressionConfig
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize

REPO = Path(__file__).resolve().parent.parent
BUDGETS = {"cls": [0.9, 0.7, 0.5], "rec": [0.9, 0.8, 0.7, 0.6]}


def lines(sentences: list[str], words: int = 3) -> list[str]:
    """Short text lines: consecutive ``words``-word pieces of the sentences."""
    out = []
    for sentence in sentences:
        tokens = sentence.split()
        out += [" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words)]
    return out


def render(text: str, height: int = 48) -> Image.Image:
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 32)
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("L", (right - left + 16, bottom - top + 16), 255)
    ImageDraw.Draw(image).text((8 - left, 8 - top), text, font=font, fill=0)
    width = max(1, round(image.width * height / image.height))
    return image.resize((width, height), Image.BICUBIC)


def batch(images: list[Image.Image], width: int) -> np.ndarray:
    """``(N, 3, 48, width)``: each line resized to fit, ``(x/255 − 0.5)/0.5``, zero padded."""
    out = np.zeros((len(images), 3, images[0].height, width), dtype=np.float32)
    for row, image in enumerate(images):
        if image.width > width:
            image = image.resize((width, image.height), Image.BICUBIC)
        values = (np.asarray(image, dtype=np.float32) / 255 - 0.5) / 0.5
        out[row, :, :, : image.width] = values
    return out


def session(model) -> ort.InferenceSession:
    data = str(model) if isinstance(model, Path) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def cls_data(texts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    turned = rng.random(len(texts)) < 0.5
    images = [render(t) for t in texts]
    images = [im.rotate(180) if flip else im for im, flip in zip(images, turned, strict=True)]
    return batch(images, 192), turned.astype(np.int64)


def decode(scores: np.ndarray, characters: list[str]) -> list[str]:
    best = scores.argmax(axis=-1)
    texts = []
    for row in best:
        keep = [c for i, c in enumerate(row) if c != 0 and (i == 0 or c != row[i - 1])]
        texts.append("".join(characters[c] for c in keep))
    return texts


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def evaluate(task: str, model, data) -> dict[str, float]:
    inputs, truth, reference, classes = data
    (scores,) = session(model).run(None, {"x": inputs})
    if task == "cls":
        predicted = scores.argmax(axis=1)
        return {
            "accuracy": float(np.mean(predicted == truth)),
            "agreement": float(np.mean(predicted == reference)),
        }
    texts = decode(scores, classes)
    chars = [1 - edit_distance(t, g) / max(len(g), 1) for t, g in zip(texts, truth, strict=True)]
    return {
        "accuracy": float(np.mean([t == g for t, g in zip(texts, truth, strict=True)])),
        "char_accuracy": float(np.mean(chars)),
        "agreement": float(np.mean([t == r for t, r in zip(texts, reference, strict=True)])),
    }


def characters(path: Path) -> list[str]:
    """The recognizer's classes: the blank, its ``character`` metadata, a space."""
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["<blank>", *meta["character"].splitlines(), " "]


def run_task(task: str, path: Path, budgets: list[float], floors: list[float], folder: Path):
    calibration_texts = lines(CALIBRATION)
    seen = set(calibration_texts)  # short pieces may repeat: keep the evaluation lines apart
    evaluation_texts = [
        t for t in lines([s for pair in PARAPHRASES for s in pair]) if t not in seen
    ]
    if task == "cls":
        calibration, _ = cls_data(calibration_texts, 0)
        inputs, truth = cls_data(evaluation_texts, 1)
        reference = session(path).run(None, {"x": inputs})[0].argmax(axis=1)
        shape, classes = (1, 3, 48, 192), []
    else:
        calibration = batch([render(t) for t in calibration_texts], 320)
        inputs, truth = batch([render(t) for t in evaluation_texts], 320), evaluation_texts
        classes = characters(path)
        reference = decode(session(path).run(None, {"x": inputs})[0], classes)
        shape = (1, 3, 48, 320)
    data = (inputs, truth, reference, classes)
    data_file = folder / f"{task}_calibration.npz"
    np.savez(data_file, x=calibration)
    rows = [{"task": task, "floor": None, "budget": 1.0, **evaluate(task, path, data)}]
    print(task, rows[0], flush=True)
    for floor in floors:
        base = CompressionConfig(
            validate=False,
            calibration=str(data_file),
            head_floor=floor,  # the recognizer's head; the classifier's head is kept dense
            input_shapes={"x": shape},
        )
        analysis = analyze(path, base)
        for budget in budgets:
            config = base.replace(params=budget)
            tables = candidate_tables(analysis, config)
            result = realize(analysis, tables, choose(analysis, tables, config), config)
            report = result.report
            heads = [
                layer
                for layer in report.layers
                if layer.name in {"p2o.MatMul.24", "MatMul@0"} and layer.rank is not None
            ]
            row = {
                "task": task,
                "floor": floor,
                "budget": budget,
                "params_fraction": report.params_after / report.params_before,
                "head_rank": heads[0].rank if heads else None,
                **evaluate(task, result.model, data),
            }
            print(row, flush=True)
            rows.append(row)
    return {
        "task": task,
        "calibration_lines": len(calibration_texts),
        "evaluation_lines": len(evaluation_texts),
        "rows": rows,
    }


def markdown(results: list[dict]) -> str:
    out = [
        "| model | row_floor | budget | params kept | head rank | accuracy | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            floor = "original" if row["floor"] is None else f"{row['floor']:g}"
            accuracy = f"{row['accuracy']:.3f}"
            if "char_accuracy" in row:
                accuracy += f" (chars {row['char_accuracy']:.3f})"
            kept = f"{row.get('params_fraction', 1.0):.1%}"
            rank = row.get("head_rank") or "-"
            out.append(
                f"| {row['task']} | {floor} | {row['budget']:g} | {kept} | {rank} | {accuracy} "
                f"| {row['agreement']:.3f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_dir = os.environ.get("ONNX_LOWRANK_MODELS", "~/.cache/onnx-lowrank/models")
    parser.add_argument("--models-dir", type=Path, default=Path(default_dir).expanduser())
    parser.add_argument("--models", default="cls,rec")
    parser.add_argument("--floors", default="0.1,1")
    parser.add_argument("--budgets", help="comma-separated (default: per model)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    floors = [float(f) for f in args.floors.split(",")]
    paths = {
        "cls": REPO / "tests" / "models" / "ppocr_mobile_v2.0_cls.onnx",
        "rec": args.models_dir / "ch_PP-OCRv4_rec_infer.onnx",
    }
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for task in args.models.split(","):
            budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else BUDGETS[task]
            results.append(run_task(task, paths[task], budgets, floors, Path(folder)))
    output = {
        "package": onnx_lowrank.__file__,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "results": results,
    }
    if args.json:
        args.json.write_text(json.dumps(output, indent=1) + "\n")
    if args.markdown:
        print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
