"""Layer choices made by the user: exclusions, pinned ranks and group counts, and recipes.

They act on the allocation problem only through the candidate tables (allocate.py): an
excluded layer's table keeps only its dense row, a pinned layer's table only the pinned
``(g, r)``, and a layer whose group count alone is pinned keeps the dense row and the rows of
that group count. A table of one row leaves the allocator no choice, so ``pipeline.choose``
counts its cost as fixed and spends the rest of the budget on the other layers; every solver
sees the same, smaller problem.

A recipe is the JSON report of an earlier run: every layer it factorized is pinned to its
``(g, r)`` and every other layer is kept dense, so applying it to the same model with the same
config reproduces the same model without spectra or allocation.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import TOLERANCES, CompressionConfig, recorded_options
from .errors import ConfigError
from .spectra import group_counts
from .types import CandidateTable, Discovery, Layer, UserChoice

__all__ = [
    "Recipe",
    "constrain_table",
    "fixed_table",
    "read_recipe",
    "recipe_config",
    "user_choices",
]


@dataclass(frozen=True)
class Recipe:
    """The per-layer choices and the config of an earlier run.

    Attributes:
        path: the report it was read from.
        config: the recorded config (``CompressionConfig.to_dict``).
        layers: name -> ``(groups, rank)`` of every layer the run factorized.
    """

    path: str
    config: dict[str, Any]
    layers: dict[str, tuple[int, int]]


def read_recipe(path: str | os.PathLike) -> Recipe:
    """Read a recipe from a report written by ``compress --report`` or a sweep point's JSON.

    Raises:
        ConfigError: the file is missing, not JSON, or not a report.
    """
    target = Path(path)
    fix = "give the JSON that 'compress --report' or a sweep point wrote"
    try:
        data = json.loads(target.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--recipe file not found: {path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"--recipe {path} cannot be read as JSON ({reason}); {fix}") from None
    if isinstance(data, dict) and isinstance(data.get("report"), dict):  # a sweep point
        data = data["report"]
    layers = data.get("layers") if isinstance(data, dict) else None
    config = data.get("config") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not isinstance(config, dict):
        raise ConfigError(f"--recipe {path} is not a report (no 'config' and 'layers'); {fix}")
    chosen: dict[str, tuple[int, int]] = {}
    for layer in layers:
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            raise ConfigError(f"--recipe {path}: a layer entry has no name; {fix}")
        groups, rank = layer.get("groups"), layer.get("rank")
        if rank is None and groups is None:
            continue
        if not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (groups, rank)
        ):
            raise ConfigError(
                f"--recipe {path}: layer {layer['name']!r} has groups {groups!r} and rank "
                f"{rank!r}; both must be positive integers"
            )
        chosen[layer["name"]] = (groups, rank)
    return Recipe(str(path), config, chosen)


def recipe_config(path: str | os.PathLike, **changes: Any) -> CompressionConfig:
    """The config that applies the recipe at ``path``: its recorded options, ``recipe=path``,
    then ``changes`` (e.g. ``validate=False``). What ``--recipe`` does on the command line.

    Raises:
        ConfigError: the file is not a report, or a recorded option is invalid.
    """
    recipe = read_recipe(path)
    fields = {f.name for f in dataclasses.fields(CompressionConfig)}
    skip = {"recipe", "exclude", "ranks", "groups_for"}  # the recipe's layers fix every layer
    if changes.get("validate") is False:  # the recorded validation options would conflict
        skip |= {*TOLERANCES, "inputs"}
    options = recorded_options(recipe.config)
    recorded = {k: v for k, v in options.items() if k in fields and k not in skip}
    return CompressionConfig(**{**recorded, "recipe": os.fspath(path), **changes})


def _matches(pattern: str, layer: Layer) -> bool:
    names = [layer.name, *(use.name for use in layer.tied)]
    if pattern == layer.op_type or pattern in names:
        return True
    try:
        return any(re.fullmatch(pattern, name) for name in names)
    except re.error:  # not a regular expression: names and op types only
        return False


def user_choices(
    discovery: Discovery, config: CompressionConfig, recipe: Recipe | None = None
) -> dict[str, UserChoice]:
    """The layers the user excluded or pinned, by layer name.

    A tied layer is named by any of its nodes. ``recipe`` (read from ``config.recipe``) pins
    every layer it factorized and excludes every other.

    Raises:
        ConfigError: a name or pattern matches no compressible layer, or a layer is both
            excluded and pinned.
    """
    layers = discovery.layers
    by_name = {
        name: layer for layer in layers for name in (layer.name, *(t.name for t in layer.tied))
    }
    choices: dict[str, UserChoice] = {}
    if recipe is not None:
        unknown = [name for name in recipe.layers if name not in by_name]
        if unknown:
            raise ConfigError(
                f"--recipe {recipe.path} factorizes {unknown[0]!r}, which is not a compressible "
                f"layer of this model{_did_you_mean(unknown[0], by_name)}; apply a recipe to the "
                "model (and with the options) it was made for"
            )
        source = f"--recipe {recipe.path}"
        for layer in layers:
            pinned = recipe.layers.get(layer.name)
            choices[layer.name] = (
                UserChoice("excluded", None, None, source)
                if pinned is None
                else UserChoice("pinned", pinned[0], pinned[1], source)
            )
        return choices
    for pattern in config.exclude:
        matched = [layer for layer in layers if _matches(pattern, layer)]
        if not matched:
            raise ConfigError(
                f"--exclude {pattern!r} matches no compressible layer (names, op types or "
                f"regular expressions over whole names){_did_you_mean(pattern, by_name)}; "
                "'onnx-lowrank inspect' lists them"
            )
        for layer in matched:
            choices.setdefault(
                layer.name, UserChoice("excluded", None, None, f"--exclude {pattern}")
            )
    for name in sorted(set(config.ranks) | set(config.groups_for)):
        if name not in by_name:
            flag = "--rank" if name in config.ranks else "--groups-for"
            raise ConfigError(
                f"{flag} {name}=...: {name!r} is not a compressible layer"
                f"{_did_you_mean(name, by_name)}; 'onnx-lowrank inspect' lists them"
            )
        layer = by_name[name]
        if layer.name in choices:
            raise ConfigError(
                f"layer {name!r} is excluded ({choices[layer.name].source}) and pinned; choose one"
            )
        rank, groups = config.ranks.get(name), config.groups_for.get(name)
        if rank == 0:
            if groups is not None:
                raise ConfigError(f"--rank {name}=0 keeps the layer dense; drop --groups-for")
            choices[layer.name] = UserChoice("excluded", None, None, f"--rank {name}=0")
            continue
        parts = [f"--rank {name}={rank}"] if rank is not None else []
        parts += [f"--groups-for {name}={groups}"] if groups is not None else []
        choices[layer.name] = UserChoice(
            "pinned", 1 if groups is None else groups, rank, " ".join(parts)
        )
    return choices


def _did_you_mean(name: str, known: Mapping[str, Layer]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def fixed_table(layer: Layer, groups: int, rank: int) -> CandidateTable:
    """The one-row table of ``layer`` factorized at ``(groups, rank)``, without spectra.

    Raises:
        ConfigError: the layer cannot be factorized with that many groups, the rank exceeds
            what a group can hold, or the factorization would not save weights.
    """
    _check_groups(layer, groups)
    largest = min(layer.out_channels, layer.cols // groups)
    if not 1 <= rank <= largest:
        raise ConfigError(
            f"layer {layer.name!r} with {groups} group(s) takes ranks 1 to {largest}; got {rank}"
        )
    params = rank * (groups * layer.out_channels + layer.cols)
    if params >= layer.params:
        saving = (layer.params - 1) // (groups * layer.out_channels + layer.cols)
        raise ConfigError(
            f"layer {layer.name!r} at groups {groups}, rank {rank} has {params:,} weights, not "
            f"fewer than its dense {layer.params:,}; ranks up to {saving} save weights (or keep "
            "it dense with --exclude)"
        )
    macs = layer.candidate_macs(groups, rank) or 0
    return CandidateTable(
        layer=layer.name,
        groups=np.asarray([groups], dtype=np.int64),
        ranks=np.asarray([rank], dtype=np.int64),
        errors=np.asarray([math.nan]),
        costs=np.asarray([[params, macs, 0.0]], dtype=np.float64),  # latency: unmeasured
        energy=np.asarray([math.nan]),
        full_rank=min(layer.out_channels, layer.cols),
    )


def _check_groups(layer: Layer, groups: int) -> None:
    allowed = group_counts(layer, layer.in_channels)
    if groups not in allowed:
        shown = ", ".join(map(str, allowed[:12])) + (", ..." if len(allowed) > 12 else "")
        raise ConfigError(
            f"layer {layer.name!r} ({layer.in_channels} input channels) cannot have {groups} "
            f"groups; its group counts are {shown}"
        )


def _rows(table: CandidateTable, keep: np.ndarray) -> CandidateTable:
    return CandidateTable(
        layer=table.layer,
        groups=table.groups[keep],
        ranks=table.ranks[keep],
        errors=table.errors[keep],
        costs=table.costs[keep],
        energy=table.energy[keep],
        full_rank=table.full_rank,
    )


def constrain_table(table: CandidateTable, layer: Layer, choice: UserChoice) -> CandidateTable:
    """``table`` restricted to what ``choice`` allows (see the module docstring).

    Raises:
        ConfigError: the pinned candidate is not a valid factorization of the layer.
    """
    if choice.kind == "excluded":
        return _rows(table, np.flatnonzero(table.groups == 0)[:1])
    assert choice.groups is not None
    if choice.rank is not None:
        keep = np.flatnonzero((table.groups == choice.groups) & (table.ranks == choice.rank))
        # a pin outside --max-groups or --rank-multiple is still the user's choice
        return _rows(table, keep[:1]) if keep.size else fixed_table(layer, *_pin(choice))
    _check_groups(layer, choice.groups)
    keep = (table.groups == 0) | (table.groups == choice.groups)
    if not np.any(table.groups[keep] > 0):
        raise ConfigError(
            f"layer {layer.name!r} has no candidate with {choice.groups} groups that saves "
            "weights under the candidate constraints (--max-groups, --rank-multiple)"
        )
    return _rows(table, np.flatnonzero(keep))


def _pin(choice: UserChoice) -> tuple[int, int]:
    assert choice.groups is not None and choice.rank is not None
    return choice.groups, choice.rank
