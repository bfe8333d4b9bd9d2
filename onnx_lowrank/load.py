"""Read ONNX models safely.

Reading turns every way a file can be wrong into a typed error with a one-line message. A model
whose external data is larger than ``LAZY_EXTERNAL_BYTES`` is loaded *lazily*: its tensors keep
pointing at the side files, and stages read one weight at a time
(``graphs.tensor_to_array(tensor, data_dir)``), so a model over 2 GiB never sits in memory whole.
Writing is ``save.py``'s.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import onnx
from onnx.external_data_helper import ExternalDataInfo

from .errors import InvalidModelError, ModelFileError, file_kind, reason
from .graphs import PROTOBUF_LIMIT, external_location, has_external_data
from .walk import iter_graphs, iter_tensors

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = [
    "LAZY_EXTERNAL_BYTES",
    "LoadedModel",
    "ModelSource",
    "external_data_files",
    "graph_to_model",
    "load_model",
    "model_file_size",
    "model_to_graph",
    "open_model",
    "source_path",
]

log = logging.getLogger(__name__)

#: A model to read: a path, serialized bytes, a ModelProto, or an ``onnx_graphsurgeon.Graph``.
ModelSource = Union[str, os.PathLike, onnx.ModelProto, bytes, "gs.Graph"]

#: Models with more external data than this are loaded lazily (weights stay in their files).
LAZY_EXTERNAL_BYTES = 2**30


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and where its data lives.

    Attributes:
        model: the model, owned by the caller.
        path: the model file it came from, or None for bytes and ModelProto sources.
        data_files: the external data files the model file names (resolved paths).
        lazy: True when tensors still point at ``data_files`` instead of holding their data.
    """

    model: onnx.ModelProto
    path: Path | None = None
    data_files: tuple[Path, ...] = ()
    lazy: bool = False

    @property
    def data_dir(self) -> Path | None:
        """Folder against which external tensor locations resolve (lazy models only)."""
        return self.path.parent if self.lazy and self.path is not None else None


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
        The loaded model, owned by the caller, with all external data in memory.

    Raises:
        ModelFileError: the path does not exist, is a directory, or cannot be read.
        InvalidModelError: the content is not a valid ONNX model, or its external data is
            missing or truncated.
    """
    return open_model(source, check=check, force=force, lazy=False).model


def open_model(
    source: ModelSource,
    *,
    check: bool = True,
    force: bool = False,
    lazy: bool | None = None,
) -> LoadedModel:
    """Load a model, keeping large external data in its files.

    Args:
        source: as for ``load_model``.
        check: run the ONNX checker.
        force: go on with a warning when the checker fails.
        lazy: keep external data in its files (True), load it (False), or keep it there when
            it totals more than ``LAZY_EXTERNAL_BYTES`` (None, the default).

    Raises:
        ModelFileError, InvalidModelError: as for ``load_model``.
    """
    path = source_path(source)
    if _is_graphsurgeon_graph(source):
        model = graph_to_model(source)
        label = "the given onnx_graphsurgeon.Graph"
    elif isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        label = "the given ModelProto"
    elif isinstance(source, bytes):
        model = _parse(source, "the given bytes")
        label = "the given bytes"
    elif path is not None:
        model = _parse(_read_file(path), str(path))
        label = str(path)
    else:
        raise InvalidModelError(
            f"cannot load a model from {type(source).__name__}; give a path to an .onnx file, "
            "its bytes, an onnx.ModelProto or an onnx_graphsurgeon.Graph"
        )
    _check_structure(model, label)
    data_files: tuple[Path, ...] = ()
    keep_on_disk = False
    if has_external_data(model):
        if path is None:
            raise InvalidModelError(
                f"{label} keeps weights in external data files, which can only be found from "
                "the model's path; pass the path of the .onnx file instead"
            )
        sizes = _check_external(model, path)
        data_files = tuple(sorted(sizes))
        keep_on_disk = lazy if lazy is not None else sum(sizes.values()) > LAZY_EXTERNAL_BYTES
        if not keep_on_disk:
            try:
                onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
            except (OSError, ValueError, onnx.checker.ValidationError) as exc:
                raise InvalidModelError(
                    f"external data of {path} cannot be read ({reason(exc)}); keep the data "
                    "file(s) the model names next to it, as regular files (not links)"
                ) from exc
    if check:
        by_path = keep_on_disk or (path is not None and model.ByteSize() > PROTOBUF_LIMIT)
        _run_checker(model, path if by_path else None, label, force)
    return LoadedModel(model=model, path=path, data_files=data_files, lazy=keep_on_disk)


def _is_graphsurgeon_graph(source: object) -> bool:
    # onnx_graphsurgeon is imported only when the object comes from it: plain runs never pay
    # for the import.
    if not type(source).__module__.startswith("onnx_graphsurgeon"):
        return False
    import onnx_graphsurgeon as gs

    return isinstance(source, gs.Graph)


def graph_to_model(graph: gs.Graph) -> onnx.ModelProto:
    """Export an ``onnx_graphsurgeon.Graph`` to a ModelProto without touching the caller's graph.

    ``gs.export_onnx`` updates the graph's ``import_domains`` as it exports, so a copy is
    exported (the copy shares the weights' arrays; nothing writes to them).
    """
    import onnx_graphsurgeon as gs

    try:
        return gs.export_onnx(graph.copy())
    except Exception as exc:  # graphsurgeon raises plain exceptions for graphs it cannot export
        raise InvalidModelError(
            f"the given onnx_graphsurgeon.Graph cannot be exported to ONNX ({reason(exc)}); "
            "run graph.cleanup().toposort() and give every input and output a dtype"
        ) from exc


def model_to_graph(model: onnx.ModelProto, data_dir: Path | None = None) -> gs.Graph:
    """Import ``model`` as an ``onnx_graphsurgeon.Graph``; external data is read from
    ``data_dir`` first, so the graph holds every weight."""
    import onnx_graphsurgeon as gs

    if data_dir is not None and has_external_data(model):
        loaded = onnx.ModelProto()
        loaded.CopyFrom(model)
        onnx.external_data_helper.load_external_data_for_model(loaded, str(data_dir))
        model = loaded
    return gs.import_onnx(model)


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"{path} is a directory; give the path of an .onnx file")
    if not path.is_file():  # reading a FIFO or a device would block or never end
        raise ModelFileError(f"{path} is {file_kind(path)}; give the path of an .onnx file")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _check_external(model: onnx.ModelProto, path: Path) -> dict[Path, int]:
    """Check every external tensor's file and byte range; return each data file's size."""
    sizes: dict[Path, int] = {}
    for tensor in iter_tensors(model):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        try:
            info = ExternalDataInfo(tensor)
        except (ValueError, TypeError) as exc:
            raise InvalidModelError(
                f"{path}: external data entry of tensor {tensor.name!r} is malformed "
                f"({reason(exc)}); re-export the model"
            ) from exc
        data = external_location(tensor, path.parent)
        size = sizes.setdefault(data, data.stat().st_size)
        offset = info.offset or 0
        end = size if info.length is None else offset + info.length
        if offset < 0 or end < offset or end > size:
            raise InvalidModelError(
                f"{path}: tensor {tensor.name!r} reads bytes {offset}..{end} of {data.name}, "
                f"which has {size}; the data file is truncated or belongs to another model"
            )
    return sizes


def _parse(data: bytes, label: str) -> onnx.ModelProto:
    if not data:
        raise InvalidModelError(f"{label} is empty (0 bytes); give an ONNX model file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError or RuntimeWarning subclasses
        raise InvalidModelError(
            f"{label} is not an ONNX model: protobuf parsing failed ({reason(exc)}); "
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
    # protobuf hands back bytes instead of str for a name that is not valid UTF-8
    bad = next((name for name in _names(model) if not isinstance(name, str)), None)
    if bad is not None:
        raise InvalidModelError(
            f"{label} is corrupt: the name {bad!r} is not valid UTF-8; the file is damaged"
        )


def _names(model: onnx.ModelProto) -> Iterator[object]:
    """Every name-like string field of the model's graphs, functions and imports."""
    yield from (entry.domain for entry in model.opset_import)
    for graph in iter_graphs(model.graph):
        yield graph.name
        for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
            yield from (item.name for item in collection)
        for node in graph.node:
            yield from (node.name, node.op_type, node.domain, *node.input, *node.output)
            yield from (attr.name for attr in node.attribute)
    for function in model.functions:
        yield from (function.name, function.domain, *function.input, *function.output)
        for node in function.node:
            yield from (node.name, node.op_type, node.domain, *node.input, *node.output)


def _run_checker(model: onnx.ModelProto, path: Path | None, label: str, force: bool) -> None:
    try:
        if path is not None:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        first = reason(exc)
        if force:
            log.warning("%s fails the ONNX checker (%s); going on because of --force", label, first)
            return
        raise InvalidModelError(
            f"{label} fails the ONNX checker: {first}; fix the model, or pass --force "
            "to compress it anyway"
        ) from exc


def external_data_files(path: str | os.PathLike) -> tuple[Path, ...]:
    """The resolved paths of the external data files a model file names (that exist)."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    files = set()
    for tensor in iter_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            candidate = (path.parent / ExternalDataInfo(tensor).location).resolve()
            if candidate.is_file():
                files.add(candidate)
    return tuple(sorted(files))


def model_file_size(path: str | os.PathLike) -> int:
    """Bytes of a model file plus the external data files it names."""
    path = Path(path)
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path))
