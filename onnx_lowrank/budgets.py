"""Budgets before the solver: the budget limits on the compressible layers, what a budget
needs (MACs of every layer for ``--flops``, group counts the method can choose), the input
sizes MACs are counted at, and the check of a model an earlier run compressed already.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx

from .config import CompressionConfig
from .errors import ConfigError, InfeasibleBudgetError, NothingToCompressError, ShapeError
from .feeds import graph_inputs, unknown_dimensions
from .types import Analysis, BudgetLimit, Discovery

__all__ = [
    "budget_limits",
    "check_method_choices",
    "check_recompression",
    "count_shapes",
    "data_shapes",
    "group_limit",
    "require_macs",
]


def group_limit(config: CompressionConfig, discovery: Discovery) -> int:
    """``config.max_groups``, or, when it is None (every divisor), the widest input channels."""
    if config.max_groups is not None:
        return config.max_groups
    return max((layer.in_channels for layer in discovery.layers), default=1)


def require_macs(discovery: Discovery, unknown: list[str]) -> None:
    """A ``--flops`` budget needs the MACs of every layer and every MAC node (``unknown``: the
    nodes whose MACs depend on unknown shapes)."""
    missing = [layer.name for layer in discovery.layers if layer.output_positions is None]
    missing += [name for name in unknown if name not in missing]
    if missing:
        raise ShapeError(
            f"--flops needs the MACs of every Conv/Gemm/MatMul, but {len(missing)} depend on "
            f"shapes that are unknown (e.g. {missing[0]}); give concrete input sizes with "
            "--input-shape NAME:D1,D2,..."
        )


def budget_limits(
    config: CompressionConfig,
    discovery: Discovery,
    params_total: int,
    macs_total: int,
    *,
    params_model: int | None = None,
) -> list[BudgetLimit]:
    """Budgets on the compressible layers. ``params_total`` is the count of the model as
    loaded, ``params_model`` that of the (folded) model the layers are in, whose other
    parameters are the fixed part. A model compressed before by onnx-lowrank is budgeted as a
    fraction of its original model."""
    params_original = params_total + discovery.params_saved
    macs_original = macs_total + (discovery.macs_saved or 0)
    budgets = []
    if config.params is not None:
        present = params_total if params_model is None else params_model
        fixed = present - sum(layer.params for layer in discovery.layers)
        budgets.append(BudgetLimit("params", config.params, params_original, fixed))
    if config.flops is not None:
        fixed = macs_total - sum(layer.macs or 0 for layer in discovery.layers)
        budgets.append(BudgetLimit("macs", config.flops, macs_original, fixed))
    return budgets


def check_method_choices(analysis: Analysis, config: CompressionConfig) -> None:
    """Group counts pinned without a rank must be ones the method may choose."""
    for name, choice in analysis.user_choices.items():
        if choice.kind != "pinned" or choice.rank is not None or choice.groups is None:
            continue
        if config.method in ("energy", "svd") and choice.groups != 1:
            raise ConfigError(
                f"--method {config.method} factorizes with g = 1 only, but {choice.source} pins "
                f"{name!r} to {choice.groups} groups; pin its rank too, or use --method alds"
            )
        if config.method == "alds-error" and choice.groups > config.groups:
            raise ConfigError(
                f"--method alds-error uses at most --groups {config.groups} groups, but "
                f"{choice.source} asks for {choice.groups}; raise --groups or pin the rank too"
            )


def check_recompression(
    discovery: Discovery, params_total: int, label: str, config: CompressionConfig
) -> None:
    """A model whose every compressible layer an earlier run factorized: a no-op when the
    params budget is met (budgets are fractions of the original model), else infeasible."""
    original = params_total + discovery.params_saved
    fraction = params_total / original
    if config.params is not None and fraction > config.params * (1 + 1e-12):
        raise InfeasibleBudgetError(
            f"budget cannot be met: {label} was compressed by onnx-lowrank to {fraction:.3f} of "
            f"its original parameters and has no layer left to factorize; --params "
            f"{config.params:g} needs a run on the original model",
            {"params": fraction},
        )
    raise NothingToCompressError(
        f"nothing to do for {label}: every layer that can be factorized was factorized by an "
        f"earlier onnx-lowrank run ({len(discovery.factorized)} layer(s), {fraction:.3f} of the "
        "original parameters), and budgets are fractions of the original model"
    )


def data_shapes(
    model: onnx.ModelProto, arrays: Mapping[str, np.ndarray] | None, batch: int
) -> dict[str, tuple[int, ...]]:
    """Input shapes taken from data arrays (``--inputs``, ``--calibration``): each dynamic
    dimension gets the data's size, a dynamic leading one ``batch``; fixed ones stay."""
    shapes: dict[str, tuple[int, ...]] = {}
    for info in graph_inputs(model):
        array = None if arrays is None else arrays.get(info.name)
        dims = [
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in info.type.tensor_type.shape.dim
        ]
        if array is None or array.ndim != len(dims) or array.size == 0 or None not in dims:
            continue
        shapes[info.name] = tuple(
            fixed if fixed is not None else batch if axis == 0 else int(size)
            for axis, (fixed, size) in enumerate(zip(dims, array.shape, strict=True))
        )
    return shapes


def count_shapes(
    model: onnx.ModelProto,
    config: CompressionConfig,
    inputs: Mapping[str, np.ndarray] | None,
    calibration: Mapping[str, np.ndarray] | None,
) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Input shapes for MAC counts: ``--input-shape``, else those of the ``--inputs`` arrays,
    else those of the ``--calibration`` arrays (per sample: a dynamic batch is 1); and a note
    that says which data gave them."""
    shapes = dict(config.input_shapes)
    # only where the data says more than "batch 1": a dynamic dimension after the first
    unknown = {name.rpartition("[")[0] for name in unknown_dimensions(model, shapes)}
    taken = []
    for label, arrays in (("--inputs", inputs), ("--calibration", calibration)):
        for name, shape in data_shapes(model, arrays, 1).items():
            if name in unknown and name not in shapes:
                shapes[name] = shape
                taken.append(f"{name} {'x'.join(map(str, shape))} (from {label})")
    if not taken:
        return shapes, None
    return shapes, "MACs counted at the input sizes of the data: " + ", ".join(taken)
