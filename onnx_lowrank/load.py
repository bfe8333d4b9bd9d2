"""Read and write ONNX models safely.

Reading turns every way a file can be wrong into a typed error with a one-line message. Writing
is atomic: everything goes to a temporary folder beside the target, then each file is renamed
into place (data file first, model last), so an interrupted run never leaves half a model.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

from .errors import InvalidModelError, ModelFileError, OutputPathError
from .graphs import iter_tensors

__all__ = [
    "ModelSource",
    "load_model",
    "model_file_size",
    "save_model",
    "source_path",
    "uses_external_data",
]

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | onnx.ModelProto | bytes

#: Protobuf cannot serialize a single message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1


def source_path(source: ModelSource) -> Path | None:
    """The filesystem path of a model source, or None for in-memory models."""
    if isinstance(source, (str, os.PathLike)):
        return Path(source)
    return None


def load_model(source: ModelSource, *, check: bool = True, force: bool = False) -> onnx.ModelProto:
    """Load a model from a path, bytes, or a ModelProto, with its external data.

    Args:
        source: path to an ``.onnx`` file, serialized bytes, or a ModelProto. A ModelProto is
            copied, so the caller's object is never modified.
        check: run the ONNX checker on the loaded model.
        force: when the checker fails, log a warning and go on instead of raising.

    Returns:
        The loaded model, owned by the caller.

    Raises:
        ModelFileError: the path does not exist, is a directory, or cannot be read.
        InvalidModelError: the content is not a valid ONNX model.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "the given ModelProto"
    elif isinstance(source, bytes):
        model = _parse(source, "the given bytes")
        label = "the given bytes"
    elif isinstance(source, (str, os.PathLike)):
        model = _load_path(Path(source))
        label = str(source)
    else:
        raise InvalidModelError(
            f"cannot load a model from {type(source).__name__}; "
            "give a path to an .onnx file, its bytes, or an onnx.ModelProto"
        )
    _check_structure(model, label)
    if check:
        _run_checker(model, source_path(source), label, force)
    return model


def _load_path(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; give the path of an .onnx file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    model = _parse(data, str(path))
    if uses_external_data(model):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.ValidationError) as exc:
            raise InvalidModelError(
                f"external data of {path} cannot be read ({_reason(exc)}); keep the data "
                "file(s) the model names next to it"
            ) from exc
    return model


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{label} is empty (0 bytes); give an ONNX model file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning subclasses
        raise InvalidModelError(
            f"{label} is not an ONNX model: protobuf parsing failed ({_reason(exc)}); "
            "the file may be truncated or of another format"
        ) from exc
    return model


def _check_structure(model: onnx.ModelProto, label: str) -> None:
    # Random bytes sometimes parse as a protobuf message with only unknown fields.
    if model.ir_version <= 0 or not model.HasField("graph") or not model.opset_import:
        raise InvalidModelError(
            f"{label} is not an ONNX model (no IR version, graph or opset import); "
            "the file may be truncated or of another format"
        )


def _run_checker(model: onnx.ModelProto, path: Path | None, label: str, force: bool) -> None:
    try:
        if path is not None and model.ByteSize() > PROTOBUF_LIMIT:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = _reason(exc)
        if force:
            log.warning("%s fails the ONNX checker (%s); going on because of --force", label, first)
            return
        raise InvalidModelError(
            f"{label} fails the ONNX checker: {first}; fix the model, or pass --force "
            "to compress it anyway"
        ) from exc


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:300]


def uses_external_data(model: onnx.ModelProto) -> bool:
    """True when any tensor of the model (subgraphs included) keeps its data in a side file."""
    return any(
        onnx.external_data_helper.uses_external_data(tensor) for tensor in iter_tensors(model)
    )


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file plus the external data files it names."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in iter_tensors(model)
        if onnx.external_data_helper.uses_external_data(tensor)
        for entry in tensor.external_data
        if entry.key == "location"
    }
    extra = sum(
        (path.parent / name).stat().st_size for name in locations if (path.parent / name).is_file()
    )
    return path.stat().st_size + extra


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool = False,
) -> Path:
    """Write ``model`` to ``path`` atomically.

    Args:
        model: the model to write. It is not modified.
        path: target ``.onnx`` path. Its folder must exist.
        external_data: write the weights into ``<name>.data`` beside the model. Forced on when
            the model is too large for a single protobuf (2 GiB).

    Returns:
        The path written.

    Raises:
        OutputPathError: the folder does not exist or is not writable.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputPathError(f"output path {target} is a directory; give a file name")
    if not folder.is_dir():
        raise OutputPathError(f"output folder {folder} does not exist; create it first")
    if not external_data and model.ByteSize() > PROTOBUF_LIMIT:
        log.info("model exceeds 2 GiB; writing its weights as external data")
        external_data = True
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder))
    except OSError as exc:
        raise OutputPathError(
            f"cannot write to {folder}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    try:
        staged_model = staging / target.name
        if external_data:
            data_name = target.name + ".data"
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(
                copy,
                str(staged_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(staging / data_name, folder / data_name)
        else:
            staged_model.write_bytes(model.SerializeToString())
        os.replace(staged_model, target)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write {target}: {exc.strerror or exc}; choose a writable path"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
