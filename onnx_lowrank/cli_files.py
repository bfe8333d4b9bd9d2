"""Options from files: ``--config FILE.toml|FILE.json`` and the recorded options of
``--recipe REPORT.json``, filled in where the command line left an option at its default."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .choices import read_recipe
from .cli_options import COMMANDS, build_parser, fractions, methods
from .config import TOLERANCES, CompressionConfig, recorded_options
from .errors import ConfigError

__all__ = ["apply_files", "given_options"]


def given_options(argv: Sequence[str] | None) -> set[str]:
    """The destinations of the options given on the command line (not left at defaults)."""
    probe = build_parser()
    for command in probe.commands.values():
        for action in command._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS
    given, _ = probe.parse_known_args(argv)
    return set(vars(given))


#: Keys of a --config file or a recipe's config that name an option by another name.
_ALIASES = {"input_shape": "input_shapes", "rank": "ranks", "output": "output_option"}
#: Recorded options a recipe does not carry over: its layers already fix every layer.
_NOT_FROM_RECIPE = {"recipe", "exclude", "ranks", "groups_for"}


def _options(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command._actions if a.option_strings and a.dest != "help"}


def apply_files(
    args: argparse.Namespace, given: set[str], commands: dict[str, argparse.ArgumentParser]
) -> None:
    """Fill the options not given on the command line from ``--recipe`` (its recorded config)
    and then ``--config`` (which overrides the recipe); command-line flags override both.

    A config file may hold options of other commands (one file for compress, sweep and
    inspect); those are skipped here. A key that is no command's option is an error.
    """
    actions = _options(commands[args.command])
    everywhere = {dest for command in commands.values() for dest in _options(command)}
    if getattr(args, "output", None) is not None:
        given = given | {"output_option"}  # the positional OUTPUT was given
    from_file = _read_config_file(args.config, args.command) if args.config else {}
    recipe_path = getattr(args, "recipe", None)
    if "recipe" not in given:
        recipe_path = from_file.get("recipe", recipe_path)
    layers: list[tuple[str, dict[str, Any]]] = []
    args.recorded = {}
    if recipe_path and args.command == "compress":
        recipe = read_recipe(recipe_path)
        skip = set(_NOT_FROM_RECIPE)
        if "validate" in given and not args.validate:  # recorded tolerances would conflict
            skip |= {*TOLERANCES, "inputs"}
        recorded = {k: v for k, v in recorded_options(recipe.config).items() if k not in skip}
        fields = {f.name for f in dataclasses.fields(CompressionConfig)}
        for key in list(recorded):
            if key not in actions and key in fields:  # an option without a flag
                args.recorded[key] = recorded.pop(key)
        layers.append((f"--recipe {recipe_path}", recorded))
    layers.append((f"--config {args.config}", from_file))
    for label, values in layers:
        for key, value in values.items():
            dest = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            if dest not in actions:
                if label.startswith("--recipe") or dest in everywhere:
                    continue  # another command's option, or recorded by another version
                known = ", ".join(sorted(everywhere))
                raise ConfigError(f"{label}: {key!r} is not an option of onnx-lowrank; {known}")
            if dest not in given:
                setattr(args, dest, _file_value(actions[dest], value, f"{label}: {key}"))


def _read_config_file(path: str, command: str) -> dict[str, Any]:
    """Options from a TOML or JSON file; a table named after the command overrides the rest."""
    target = Path(path)
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"--config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path} cannot be read: {exc}") from None
    try:
        json_file = target.suffix.lower() == ".json"
        data = json.loads(text) if json_file else _toml().loads(text)
    except ValueError as exc:  # json.JSONDecodeError and tomllib.TOMLDecodeError
        kind = "JSON" if target.suffix.lower() == ".json" else "TOML"
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"--config {path} is not valid {kind} ({reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table of options, not {type(data)}")
    values = {k: v for k, v in data.items() if k not in COMMANDS}
    section = data.get(command)
    if isinstance(section, dict):
        values.update(section)
    return values


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def _file_value(action: argparse.Action, value: Any, where: str) -> Any:
    """A value from a file in the form argparse would have produced for the flag."""
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
        if value is None:  # a recorded option that was not set
            return []
        if isinstance(value, dict):
            # NAME:DIMS for shapes, OUTPUT:X for tolerances, NAME=N for pins
            separator = "=" if action.dest in ("ranks", "groups_for") else ":"
            return [
                f"{k}{separator}{','.join(map(str, v)) if isinstance(v, list) else v}"
                for k, v in value.items()
            ]
        return [str(item) for item in value] if isinstance(value, list) else [str(value)]
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        # the destination says what is on (validate = true, fold_batchnorm = false)
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if action.type in (fractions, methods):  # sweep's lists: a list, one value, or "a,b"
        value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    if isinstance(value, str) and action.type is not None:
        try:
            value = action.type(value)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{where} must be one of {choices}; got {value!r}")
    return value
