"""CompressionConfig: every option of a compression run, validated in one place.

The config is frozen plain data. It is written into every report, so a run can be repeated from
its report alone.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = [
    "ALL_OUTPUTS",
    "DEVICES",
    "ERROR_MEASURES",
    "METHODS",
    "TOLERANCES",
    "CompressionConfig",
    "Tolerance",
    "default_error",
    "default_method",
    "parse_input_shape",
    "parse_input_shapes",
    "parse_tolerances",
    "recorded_options",
]

#: Allocation methods, in the order the docs list them. ``solvers.SOLVERS`` implements each.
METHODS: tuple[str, ...] = ("alds", "alds-paper", "alds-error", "energy", "svd", "sum")
#: Layer error measures (DESIGN.md §3): the valid upper bound, the reference code's lower bound,
#: with calibration data, the relative output error on real activations (calibrate.py), and the
#: degradation of the network's outputs with one layer replaced (sensitivity.py).
ERROR_MEASURES: tuple[str, ...] = ("bound", "max-group", "frobenius", "output", "network")
#: Validation tolerances (fields of CompressionConfig; flags ``--max-rel-error`` ...).
TOLERANCES: tuple[str, ...] = ("max_rel_error", "min_cosine", "min_top1")
#: Key of a per-output tolerance mapping that applies to every output not named in it (the
#: value given without ``NAME:`` on the command line).
ALL_OUTPUTS = "*"
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
#: Environment variable that turns the default latency check off (``0``).
LATENCY_CHECK_ENV = "ONNX_LOWRANK_LATENCY_CHECK"
#: Default share of uniform weight in the row weights of tables and heads (activations.py).
ROW_FLOOR = 0.1
#: Classifier heads are not row-weighted by default: on the PP-OCRv4 recognizer (6625 classes)
#: weighting by class mass at 0.1 cut exact-line accuracy from 0.64 to 0.005 at half the
#: parameters (docs/calibration.md), and no measured model gained from it.
HEAD_FLOOR = 1.0

Device = Literal["auto", "cpu", "cuda"]
#: A tolerance: one value for every output, or values per output name (``ALL_OUTPUTS`` for the
#: outputs not named).
Tolerance = float | Mapping[str, float] | None


@dataclass(frozen=True)
class CompressionConfig:
    """Options of one compression run.

    Attributes:
        params: fraction in (0, 1] of the model's total parameter count to keep, or None.
        flops: fraction in (0, 1] of the model's total MACs (Conv/Gemm/MatMul) to keep, or None.
        latency: fraction in (0, 1] of the model's latency to keep, measured on the execution
            provider of ``device`` (latency.py), or None.
        method: allocation method, one of ``METHODS``. None (the default) means ``"sum"``
            with ``error="network"`` and ``"alds"`` otherwise (``default_method``); the config
            stores the resolved name.
        error: layer error measure, one of ``ERROR_MEASURES``. None (the default) means
            ``"network"`` when ``calibration`` is given and ``"bound"`` otherwise
            (``default_error``, measured: docs/calibration.md); the config stores the
            resolved name.
        max_groups: largest channel-group count tried per layer (divisors of the input channels);
            None, the default, tries every divisor (chosen by measurement: docs/methods.md).
        groups: the fixed group count of methods that do not search groups.
        rank_multiple: every factorized layer's ``groups * rank`` is a multiple of this; or
            ``"auto"``: Conv candidates whose per-group channels are multiples of the execution
            provider's channel block (``device.preferred_multiple``; allocate.with_block).
        device: ``"auto"`` (GPU when CuPy and a device are present), ``"cpu"`` or ``"cuda"``.
        input_shapes: concrete shapes for graph inputs with dynamic dimensions.
        validate: compare the compressed model with the original in ONNX Runtime.
        inputs: validation inputs: an ``.npz`` keyed by graph input name, an ``.npy`` (one
            input), or a folder of ``.npy`` files (``data.read_arrays``).
        max_rel_error: fail validation when an output's relative L2 error exceeds this (a
            non-negative number).
        min_cosine: fail validation when an output's cosine similarity is below this (in
            [0, 1]).
        min_top1: fail validation when an output's top-1 agreement (argmax over the last axis,
            every position counted; validate.py) is below this (in [0, 1]). An output named
            here must have such a class axis, or the run refuses; a value for every output
            skips the outputs without one and the report names them.
            Each tolerance is a number for every output, or a mapping from output name to
            number; the key ``ALL_OUTPUTS`` (``"*"``) gives the value for the outputs not
            named. Without validation (``validate=False``) tolerances are an error.
        latency_runs: most timed pairs of runs for the latency medians (after
            ``validate.MIN_LATENCY_RUNS`` pairs the time budget may stop earlier).
        latency_threads: intra-op threads of both ONNX Runtime sessions (validation and
            latency), 1 by default: the most repeatable timing (docs/performance.md); None
            uses every CPU this process may run on. Both models always get the same count,
            and the report records it.
        seed: seed of the random validation inputs, of the synthetic inputs of a data-free
            ``--error network``, and of randomized solvers.
        force: go on with a model that fails the ONNX checker.
        calibration: real model inputs, batch first, in any format of ``inputs``. When
            given, every layer is factorized to minimize its output error on these activations
            (whitened SVD with bias correction; see whiten.py).
        sensitivity_samples: with ``error="network"``, the number of samples the network
            degradations are measured on: held out from the calibration file (not used for the
            layer statistics), else taken from ``inputs`` or synthetic (synthetic.py).
        calibration_samples: use only this many evenly spaced samples of the calibration
            file (deterministic); None uses all.
        refit: with ``calibration``, refit every factorized layer's left factor and bias in
            topological order on the partly compressed model's inputs (refit.py). None (the
            default) resolves to True when ``calibration`` is given and to False otherwise
            (measured: docs/calibration.md); True without ``calibration`` is an error. The
            config stores the resolved value.
        row_floor: with calibration, the share ``ρ`` in (0, 1] of uniform weight mixed into
            the row weights of embedding tables (id counts); 1 turns the row weighting off
            (calibrate.py).
        head_floor: the same for classifier heads (class probability mass); default 1, off
            (``HEAD_FLOOR``: it hurt the one recognizer measured).
        fold_batchnorm: fold BatchNormalization and constant per-channel Mul/Add into the
            preceding Conv before discovery (fold.py), so errors are measured on the weight as
            it acts.
        latency_check: time candidates on the execution provider and never offer one measured
            slower than its dense layer (only the chosen candidates are timed, see
            pipeline.choose; a ``latency`` budget times every table's grid). None (the
            default) resolves to True with a ``latency`` budget, else to True unless the
            environment variable ``ONNX_LOWRANK_LATENCY_CHECK`` is ``0``; the config stores
            the resolved value.
        max_latency_ratio: fail validation when the compressed model's measured latency is more
            than this times the original's.
        exclude: layers kept dense whatever the budget: each pattern is a layer name, an op
            type (``Gemm``), or a regular expression matching whole layer names.
        ranks: layer name -> the rank it is factorized at (0: kept dense); with ``groups_for``
            or else ``g = 1``. The allocator spends the rest of the budget on the other layers.
        groups_for: layer name -> its group count. Without a ``ranks`` entry, the allocator
            still chooses the layer's rank (or dense) among candidates with that many groups.
        recipe: a JSON report of an earlier run (``--report``, or a sweep point's JSON) whose
            per-layer ``(g, r)`` are applied as they are: every layer it factorized is pinned,
            every other layer stays dense, and neither spectra nor allocation are computed.
    """

    params: float | None = None
    flops: float | None = None
    method: str | None = None
    error: str | None = None
    max_groups: int | None = None
    groups: int = 1
    rank_multiple: int | Literal["auto"] = 1
    device: Device = "auto"
    input_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    validate: bool = True
    inputs: str | None = None
    max_rel_error: Tolerance = None
    min_cosine: Tolerance = None
    min_top1: Tolerance = None
    latency_runs: int = 200
    latency_threads: int | None = 1
    seed: int = 0
    force: bool = False
    calibration: str | None = None
    row_floor: float = ROW_FLOOR
    head_floor: float = HEAD_FLOOR
    fold_batchnorm: bool = True
    latency: float | None = None
    latency_check: bool | None = None
    max_latency_ratio: float | None = None
    exclude: tuple[str, ...] = ()
    ranks: Mapping[str, int] = field(default_factory=dict)
    groups_for: Mapping[str, int] = field(default_factory=dict)
    recipe: str | None = None
    sensitivity_samples: int = 32
    refit: bool | None = None
    calibration_samples: int | None = None

    def __post_init__(self) -> None:
        self._check_latency()
        for name in ("params", "flops", "latency"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value <= 1):
                raise ConfigError(
                    f"--{name} must be a fraction in (0, 1], got {value!r}; "
                    f"for example --{name} 0.5 keeps half"
                )
        self._check_calibration()
        if self.method is None:
            object.__setattr__(self, "method", default_method(self.error))
        _check_choice("method", self.method, METHODS)
        for name in ("row_floor", "head_floor"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 < value <= 1):
                raise ConfigError(f"{_flag(name)} must be a fraction in (0, 1], got {value!r}")
        _check_choice("error", self.error, ERROR_MEASURES)
        _check_choice("device", self.device, DEVICES)
        if not isinstance(self.fold_batchnorm, bool):
            raise ConfigError(f"fold_batchnorm must be True or False, got {self.fold_batchnorm!r}")
        counts = ("max_groups", "groups", "rank_multiple", "latency_runs", "latency_threads")
        for name in (*counts, "sensitivity_samples", "calibration_samples"):
            value = getattr(self, name)
            if name in ("max_groups", "latency_threads", "calibration_samples") and value is None:
                continue  # every divisor, every CPU
            if name == "rank_multiple" and value == "auto":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                also = {
                    "max_groups": " or 'all' (None: every divisor)",
                    "latency_threads": " or 'all' (None: every CPU)",
                    "rank_multiple": " or 'auto'",
                }.get(name, "")
                raise ConfigError(
                    f"--{_flag(name)} must be a positive integer{also}, got {value!r}"
                )
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")
        if self.max_groups is not None and self.groups > self.max_groups:
            raise ConfigError(
                f"--groups {self.groups} exceeds --max-groups {self.max_groups}; "
                "raise --max-groups or lower --groups"
            )
        for name in TOLERANCES:
            object.__setattr__(self, name, _check_tolerance(name, getattr(self, name)))
        self._check_validation_options()
        self._check_layer_choices()
        shapes = {}
        try:
            given = dict(self.input_shapes).items()
        except (TypeError, ValueError):
            raise ConfigError(
                f"input shapes must map input names to shapes, got {self.input_shapes!r}"
            ) from None
        for name, shape in given:
            dims = tuple(shape) if isinstance(shape, (tuple, list)) else ()
            if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
                raise ConfigError(
                    f"input shape for {name!r} must be positive integers, got {shape!r}; "
                    "use --input-shape NAME:D1,D2,..."
                )
            shapes[str(name)] = dims
        object.__setattr__(self, "input_shapes", shapes)

    def _check_latency(self) -> None:
        if self.latency_check is None:  # a latency budget always times candidates
            off = os.environ.get(LATENCY_CHECK_ENV, "1").strip().lower() in ("0", "false", "off")
            object.__setattr__(self, "latency_check", self.latency is not None or not off)
        if not isinstance(self.latency_check, bool):
            raise ConfigError(f"latency_check must be True or False, got {self.latency_check!r}")
        if self.latency is not None and not self.latency_check:
            raise ConfigError(
                "--latency budgets measured latency, which --no-latency-check turns off; "
                "drop one of them"
            )
        ratio = self.max_latency_ratio
        if ratio is not None and not (_is_number(ratio) and ratio > 0):
            raise ConfigError(
                f"--max-latency-ratio must be a positive number, got {ratio!r}; for example "
                "--max-latency-ratio 1.0 fails a model slower than the original"
            )

    def _check_layer_choices(self) -> None:
        exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        if not all(isinstance(pattern, str) and pattern for pattern in exclude):
            raise ConfigError(f"--exclude takes layer names, op types or patterns; got {exclude}")
        object.__setattr__(self, "exclude", exclude)
        for name, flag, least in (("ranks", "--rank", 0), ("groups_for", "--groups-for", 1)):
            values = dict(getattr(self, name))
            for layer, value in values.items():
                if not isinstance(value, int) or isinstance(value, bool) or value < least:
                    kind = "a non-negative integer (0: dense)" if least == 0 else "positive"
                    raise ConfigError(f"{flag} {layer}={value!r}: must be {kind}")
            object.__setattr__(self, name, {str(k): v for k, v in values.items()})
        if self.recipe is not None:
            if not isinstance(self.recipe, (str, os.PathLike)) or not str(self.recipe):
                raise ConfigError(
                    f"--recipe must be the path of a JSON report, got {self.recipe!r}"
                )
            object.__setattr__(self, "recipe", os.fspath(self.recipe))
            if exclude or self.ranks or self.groups_for:
                raise ConfigError(
                    "--recipe fixes every layer's (g, r); drop --exclude, --rank and "
                    "--groups-for, or edit the recipe's layers"
                )

    def _check_calibration(self) -> None:
        if self.inputs is not None:
            if not isinstance(self.inputs, (str, os.PathLike)) or not str(self.inputs):
                raise ConfigError(f"--inputs must be the path of an .npz file, got {self.inputs!r}")
            object.__setattr__(self, "inputs", os.fspath(self.inputs))
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)) or not str(self.calibration):
                raise ConfigError(
                    "--calibration must be the path of an .npz, an .npy or a folder, got "
                    f"{self.calibration!r}"
                )
            object.__setattr__(self, "calibration", os.fspath(self.calibration))
        if self.error is None:
            object.__setattr__(self, "error", default_error(self.calibration))
        elif self.error == "output" and self.calibration is None:
            raise ConfigError(
                "--error output measures errors on real activations and needs "
                "--calibration FILE.npz; give one, or use --error bound"
            )
        if self.refit is None:  # on whenever there are activations to refit on
            object.__setattr__(self, "refit", self.calibration is not None)
        if not isinstance(self.refit, bool):
            raise ConfigError(f"refit must be True or False, got {self.refit!r}")
        if self.refit and self.calibration is None:
            raise ConfigError(
                "--refit refits layers on real activations and needs --calibration FILE.npz; "
                "give one, or drop --refit"
            )

    def _check_validation_options(self) -> None:
        """Tolerances and ``inputs`` only act through validation: without it they are an
        error, so a run never looks checked when it was not."""
        if self.validate:
            return
        ignored = [f"--{_flag(name)}" for name in self.tolerances]
        if self.inputs is not None and not (self.error == "network" and self.calibration is None):
            ignored.append("--inputs")  # a data-free --error network measures on them
        if not ignored:
            return
        missing = ""
        if self.inputs is not None and not os.path.isfile(self.inputs):
            missing = f"; also, the --inputs file {self.inputs} does not exist"
        raise ConfigError(
            f"--no-validate skips validation, so {', '.join(ignored)} would be ignored; drop "
            f"{'it' if len(ignored) == 1 else 'them'} or drop --no-validate{missing}"
        )

    @property
    def tolerances(self) -> dict[str, float | dict[str, float]]:
        """The validation tolerances that are set, by field name: a number for every output,
        or a mapping from output name (``ALL_OUTPUTS`` for the others) to a number."""
        values = {name: getattr(self, name) for name in TOLERANCES}
        return {
            name: dict(value) if isinstance(value, Mapping) else value
            for name, value in values.items()
            if value is not None
        }

    def tolerance(self, name: str, output: str) -> float | None:
        """The value of tolerance ``name`` (a field in ``TOLERANCES``) for one output, or None
        when it does not apply to that output."""
        value = getattr(self, name)
        if isinstance(value, Mapping):
            return value.get(output, value.get(ALL_OUTPUTS))
        return value

    @property
    def has_budget(self) -> bool:
        """True when at least one of ``params``, ``flops`` and ``latency`` is set."""
        return self.params is not None or self.flops is not None or self.latency is not None

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with some fields changed, validated again. An option that is its default
        follows the options it defaults from: ``refit`` (on exactly when ``calibration`` is
        given) and ``error`` (``default_error``) follow a changed ``calibration``, ``method``
        (``default_method``) a changed ``error``; one set against its default is kept."""
        if "calibration" in changes:
            if "refit" not in changes and self.refit == (self.calibration is not None):
                changes["refit"] = None
            if "error" not in changes and self.error == default_error(self.calibration):
                changes["error"] = None
        method_default = self.method == default_method(self.error)
        if "error" in changes and "method" not in changes and method_default:
            changes["method"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON-ready plain data."""
        data = dataclasses.asdict(self)
        data["input_shapes"] = {k: list(v) for k, v in self.input_shapes.items()}
        data["exclude"] = list(self.exclude)
        return data

    @property
    def fixes_layers(self) -> bool:
        """True when the user excluded or pinned layers, or applies a recipe."""
        return bool(self.exclude or self.ranks or self.groups_for or self.recipe)


def default_error(calibration: object) -> str:
    """The error measure of a config that names none: ``"network"`` with calibration data,
    ``"bound"`` without (measured on every public model: docs/calibration.md, docs/methods.md)."""
    return "bound" if calibration is None else "network"


def default_method(error: str | None) -> str:
    """The allocation method of a config that names none: the additive ``"sum"`` for network
    degradations, which add up through the network, else the min-max ``"alds"``
    (docs/calibration.md, "Network-aware errors")."""
    return "sum" if error == "network" else "alds"


def recorded_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a recorded config (a report's ``config``) that a recipe carries over:
    all of them except those that were only their defaults, which resolve again from the new
    run's options (``CompressionConfig.replace``): a ``refit`` on exactly when the run had
    ``calibration``, an ``error`` that is ``default_error`` of its calibration, a ``method``
    that is ``default_method`` of its error (a report written before a default changed keeps
    the option it ran with, unless it equals the new default)."""
    options = dict(config)
    calibrated = options.get("calibration") is not None
    if options.get("refit") == calibrated:
        options.pop("refit", None)
    error = options.get("error")
    if "method" in options and options["method"] == default_method(error):
        options.pop("method")
    if error == default_error(options.get("calibration")):
        options.pop("error")
    return options


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:D1,D2,...`` into ``(NAME, (D1, D2, ...))``.

    The dimensions may also be written ``D1xD2x...`` (trtexec) or ``[D1,D2,...]`` (Polygraphy).
    The name may itself contain colons (tf2onnx names inputs ``input_1:0``); the last colon
    separates it from the dimensions.
    """
    name, sep, dims_text = text.rpartition(":")
    dims_text = dims_text.strip().removeprefix("[").removesuffix("]")
    try:
        dims = tuple(int(d) for d in dims_text.replace("x", ",").split(","))
    except ValueError:
        dims = ()
    if not sep or not name or not dims or any(d <= 0 for d in dims):
        raise ConfigError(
            f"bad --input-shape {text!r}: expected NAME:D1,D2,... or NAME:D1xD2x... with "
            "positive integer dimensions, for example input:1,3,224,224"
        )
    return name, dims


#: Allowed range of each tolerance: (low, high, how to say it).
_TOLERANCE_RANGES: dict[str, tuple[float, float, str]] = {
    "max_rel_error": (0.0, math.inf, "a non-negative number, e.g. 0.05"),
    "min_cosine": (0.0, 1.0, "a number in [0, 1], e.g. 0.99"),
    "min_top1": (0.0, 1.0, "a fraction in [0, 1], e.g. 0.95"),
}


def _check_tolerance(name: str, value: object) -> float | dict[str, float] | None:
    """A tolerance checked against its range: None, a number, or {output: number}."""
    if value is None:
        return None
    low, high, allowed = _TOLERANCE_RANGES[name]
    flag = f"--{_flag(name)}"
    if isinstance(value, Mapping):
        if not value:
            raise ConfigError(f"{flag} got an empty mapping; give {allowed}, or OUTPUT:X")
        checked = {}
        for output, item in value.items():
            if not isinstance(output, str) or not output:
                raise ConfigError(f"{flag}: output names must be non-empty strings, got {output!r}")
            label = flag if output == ALL_OUTPUTS else f"{flag} {output}:"
            checked[output] = _tolerance_value(label, item, low, high, allowed)
        return checked
    return _tolerance_value(flag, value, low, high, allowed)


def _tolerance_value(label: str, value: object, low: float, high: float, allowed: str) -> float:
    if not (_is_number(value) and low <= value <= high):
        raise ConfigError(f"{label} must be {allowed}; got {value!r}")
    return float(value)


def parse_tolerances(flag: str, items: list[str]) -> float | dict[str, float] | None:
    """Parse the values of one repeated tolerance option: ``X`` (every output) or ``NAME:X``.

    A single bare value gives a number; anything else a mapping with ``ALL_OUTPUTS`` for the
    bare value. The name may contain colons (``output:0:0.9``); the last colon separates it.

    Raises:
        ConfigError: a value is not a number, or an output (or the bare value) is given twice.
    """
    if not items:
        return None
    values: dict[str, float] = {}
    for text in items:
        name, value = ALL_OUTPUTS, text
        try:
            number = float(text)
        except ValueError:
            name, sep, value = text.rpartition(":")
            try:
                number = float(value)
            except ValueError:
                sep = ""
            if not sep or not name:
                raise ConfigError(
                    f"bad {flag} {text!r}: expected a number for every output or OUTPUT:NUMBER "
                    f"for one, e.g. {flag} 0.9 or {flag} logits:0.9"
                ) from None
        if name in values:
            which = "a value for every output" if name == ALL_OUTPUTS else f"output {name!r}"
            raise ConfigError(f"{flag} gives {which} twice; give each once")
        values[name] = number
    if list(values) == [ALL_OUTPUTS]:
        return values[ALL_OUTPUTS]
    return values


def parse_input_shapes(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse several ``NAME:DIMS`` texts (each may hold several, separated by spaces).

    Raises:
        ConfigError: a text is malformed, or a name is given twice.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for text in texts:
        for part in text.split():
            name, dims = parse_input_shape(part)
            if name in shapes:
                raise ConfigError(
                    f"--input-shape for {name!r} is given twice ({_dims(shapes[name])} and "
                    f"{_dims(dims)}); give each input once"
                )
            shapes[name] = dims
    return shapes


def _dims(dims: tuple[int, ...]) -> str:
    return ",".join(map(str, dims))


def _is_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"--{name} must be one of {', '.join(allowed)}; got {value!r}")
