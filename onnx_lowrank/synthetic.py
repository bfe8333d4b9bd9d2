"""Synthetic inputs for ``--error network`` without data: 1/f noise, chosen to cover the
classes the model predicts.

Without ``--calibration`` or ``--inputs``, the network degradations (sensitivity.py) are measured
on inputs the tool makes. White noise drives a network far from anything it was trained on, and
a classifier fed noise answers one or two classes: a candidate that breaks the distinction
between the other classes then looks harmless (the MNIST CNN at 10 % of the parameters:
83.2 % test accuracy, against 95.7 % for ``--error bound``). So the samples here are noise with
the 1/f spectrum of natural signals (``feeds.natural_noise``), drawn ``POOL`` times over, run
through the model once, and taken round robin over the classes the model predicts for them,
most confident first. docs/methods.md ("Data-free network errors") has the measurements.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from .errors import OnnxLowRankError, UnsupportedModelError, reason
from .feeds import common_rows, random_inputs
from .metrics import is_scores
from .sessions import fixed_batch, make_session
from .types import Progress

__all__ = ["POOL", "measured_on", "synthetic_inputs"]

#: Pool samples drawn per sample kept.
POOL = 32


def synthetic_inputs(
    model: onnx.ModelProto,
    input_shapes: Mapping[str, tuple[int, ...]],
    wanted: int,
    seed: int = 0,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    data_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """At least ``wanted`` synthetic samples for every graph input (whole batches of a fixed
    batch size).

    The pool is ``POOL × wanted`` samples of ``random_inputs(..., natural=True)``, one seed per
    draw (``seed``, ``seed + 1``, ...). When the model's first output holds scores
    (samples × classes, ``metrics.is_scores``) and its batch is not fixed above 1, ``wanted``
    samples are taken from the pool round robin over the predicted classes (the classes with
    more pool samples first, each class's most confident sample first); otherwise the first
    draws are kept. Inputs that cannot be cut into samples (a scalar input, or inputs whose
    leading sizes differ) are one draw, run whole. Integer and boolean inputs are those of
    ``random_inputs``.

    Args:
        data_dir: the folder of a model loaded lazily, whose weights are in external files.
        progress: called as ``progress("synthetic", samples_done, samples)`` over the pool.
    """

    def draw(index: int) -> dict[str, np.ndarray]:
        return random_inputs(model, input_shapes, seed + index, natural=True)

    first = draw(0)
    rows = common_rows(first)
    if rows is None:  # a scalar input, or no shared batch axis: one draw, run whole
        return first

    def first_draws() -> dict[str, np.ndarray]:
        parts = [first, *(draw(index) for index in range(1, -(-wanted // rows)))]
        return {name: np.concatenate([part[name] for part in parts]) for name in first}

    if (fixed_batch(model) or 1) > 1:
        return first_draws()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # make_session may drop unused external initializers from it
    try:
        session = make_session(copy, providers, data_dir=data_dir)
        output = session.get_outputs()[0].name
        scores = session.run([output], first)[0]
        if not is_scores(scores):
            return first_draws()
        pool = [scores]
        total = -(-POOL * wanted // rows)
        for index in range(1, total):
            pool.append(session.run([output], draw(index))[0])
            if progress is not None:
                progress("synthetic", (index + 1) * rows, total * rows)
    except OnnxLowRankError:
        raise
    except Exception as exc:  # ONNX Runtime's errors have no common base class
        raise UnsupportedModelError(
            f"--error network runs the model, but ONNX Runtime cannot run it on synthetic "
            f"inputs ({reason(exc)}); pass inputs it runs on with --inputs, or use --error bound"
        ) from exc
    values = np.concatenate(pool)
    classes, confidence = values.argmax(axis=1), values.max(axis=1)
    buckets: dict[int, list[int]] = {}
    for label in np.unique(classes):
        members = np.flatnonzero(classes == label)
        buckets[int(label)] = list(members[np.argsort(-confidence[members], kind="stable")])
    chosen: list[int] = []
    while len(chosen) < wanted:
        for label in sorted(buckets, key=lambda key: -len(buckets[key])):
            if buckets[label] and len(chosen) < wanted:
                chosen.append(buckets[label].pop(0))
    # the chosen samples are drawn again from their seeds rather than kept from the pool
    parts = {index: draw(index) for index in sorted({sample // rows for sample in chosen})}
    return {
        name: np.stack([parts[sample // rows][name][sample % rows] for sample in chosen])
        for name in first
    }


def measured_on(samples: int, inputs: str | None) -> str:
    """The report's note on what a data-free ``--error network`` measured on: ``samples`` taken
    from the ``inputs`` file or made by ``synthetic_inputs``."""
    if inputs is not None:
        return f"network errors measured on {samples} sample(s) of {inputs}"
    return (
        f"network errors measured on {samples} synthetic sample(s): 1/f noise covering the "
        "classes the model predicts (docs/methods.md, 'Data-free network errors')"
    )
