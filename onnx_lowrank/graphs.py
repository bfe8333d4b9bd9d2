"""Small helpers over ONNX graphs shared by several stages.

The stages (discover, cost, rewrite, validate) use these to walk graphs, subgraphs included, and
to read tensor types; nothing here changes a model. Graph edits go through surgery.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from .errors import InvalidModelError
from .walk import iter_tensors, walk_graphs

if TYPE_CHECKING:
    pass

__all__ = [
    "FLOAT_TYPES",
    "PROTOBUF_LIMIT",
    "FreshNames",
    "attribute",
    "external_array",
    "external_location",
    "has_external_data",
    "opset_version",
    "overridable_initializers",
    "read_external_bytes",
    "tensor_nbytes",
    "tensor_to_array",
    "type_name",
]

#: Protobuf cannot serialize a single message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1

#: Element types that hold trainable weights. Integer tensors are shapes, indices or quantized
#: data and are never counted as parameters.
FLOAT_TYPES = frozenset(
    {
        onnx.TensorProto.FLOAT,
        onnx.TensorProto.FLOAT16,
        onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.DOUBLE,
    }
)


def overridable_initializers(model: onnx.ModelProto) -> frozenset[str]:
    """Main-graph initializers that are also graph inputs, in a model of IR version 4 or newer.

    Such an initializer is only the input's default: a caller may feed another value, so it is
    not a constant, and no pass may fold it, factorize it or drop the input. Below IR version 4
    every initializer must be listed as an input, and those are constants.
    """
    if 0 < model.ir_version < 4:
        return frozenset()
    inputs = {info.name for info in model.graph.input}
    return frozenset(tensor.name for tensor in model.graph.initializer if tensor.name in inputs)


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default`` when absent."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def opset_version(model: onnx.ModelProto, domain: str = "") -> int:
    """The imported opset version of ``domain`` (default: the ONNX domain), 0 when absent."""
    for entry in model.opset_import:
        if entry.domain in ({domain, "ai.onnx"} if domain == "" else {domain}):
            return entry.version
    return 0


def tensor_to_array(
    tensor: onnx.TensorProto, data_dir: str | os.PathLike | None = None
) -> np.ndarray:
    """A tensor's values as a numpy array (bfloat16 and float8 come back as ml_dtypes types).

    Args:
        tensor: the tensor; it is not modified.
        data_dir: folder of the model file, for a tensor whose data still sits in an external
            file (models loaded lazily, see ``load.load_model``). Only that tensor's bytes are
            read.

    Raises:
        InvalidModelError: the data does not match the tensor's type and shape, or its
            external file cannot be read.
    """
    if uses_external_data(tensor):
        if data_dir is None:
            raise InvalidModelError(
                f"tensor {tensor.name!r} keeps its data in an external file, but the model's "
                "folder is unknown; load the model from its path"
            )
        proxy = onnx.TensorProto()
        proxy.CopyFrom(tensor)
        del proxy.external_data[:]
        proxy.data_location = onnx.TensorProto.DEFAULT
        proxy.raw_data = read_external_bytes(tensor, data_dir)
        tensor = proxy
    try:
        return numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidModelError(
            f"tensor {tensor.name!r} is corrupt: its data does not match its type "
            f"{type_name(tensor.data_type)} and shape {tuple(tensor.dims)} "
            f"({' '.join(str(exc).split())[:200]}); re-export the model"
        ) from exc


def type_name(data_type: int) -> str:
    """The name of an ONNX element type, e.g. ``FLOAT16``, or its number when unknown."""
    try:
        return onnx.TensorProto.DataType.Name(data_type)
    except ValueError:
        return f"type {data_type}"


def external_location(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> Path:
    """The file that holds an external tensor's data, checked to lie inside ``data_dir``.

    Raises:
        InvalidModelError: the location is absolute, leaves the folder, or does not exist.
    """
    location = ExternalDataInfo(tensor).location
    _check_location(tensor.name, location)
    folder = Path(data_dir).resolve()
    try:
        path = (folder / location).resolve()
        inside = path.is_relative_to(folder)
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # a name the filesystem refuses
        raise InvalidModelError(
            f"external data location {location[:80]!r} of tensor {tensor.name!r} cannot be "
            f"opened ({getattr(exc, 'strerror', None) or exc}); re-export the model"
        ) from exc
    if not location or Path(location).is_absolute() or not inside:
        raise InvalidModelError(
            f"tensor {tensor.name!r} names external data {location!r} outside the model's "
            "folder; external data files must sit beside the model"
        )
    if not exists:
        raise InvalidModelError(
            f"external data file {location!r} of tensor {tensor.name!r} is missing; keep the "
            "data file(s) the model names next to it"
        )
    return path


#: Longest file name most filesystems accept (bytes per path component), and longest path.
_NAME_MAX, _PATH_MAX = 255, 4096


def _check_location(tensor: str, location: str) -> None:
    """Refuse external data locations no filesystem can hold before they reach one."""
    shown = repr(location[:60] + ("..." if len(location) > 60 else ""))
    problem = None
    if "\0" in location:
        problem = "holds a NUL byte"
    elif location.endswith(("/", "\\")):
        problem = "ends in a path separator (it names a folder, not a file)"
    else:
        encoded = location.encode("utf-8", "surrogateescape")
        longest = max((len(part) for part in encoded.split(b"/")), default=0)
        if longest > _NAME_MAX or len(encoded) > _PATH_MAX:
            problem = (
                f"is too long ({longest} bytes in one name; file systems allow {_NAME_MAX})"
                if longest > _NAME_MAX
                else f"is too long ({len(encoded)} bytes; paths allow {_PATH_MAX})"
            )
    if problem is not None:
        raise InvalidModelError(
            f"external data location {shown} of tensor {tensor!r} {problem}; the model file is "
            "damaged or was edited by hand; re-export it"
        )


def _external_span(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> tuple[Path, int, int]:
    """``(file, offset, length)`` of an external tensor's data, bounds-checked."""
    info = ExternalDataInfo(tensor)
    path = external_location(tensor, data_dir)
    size = path.stat().st_size
    offset = info.offset or 0
    length = size - offset if info.length is None else info.length
    if offset < 0 or length < 0 or offset + length > size:
        raise InvalidModelError(
            f"external data of tensor {tensor.name!r} lies outside {path.name} (offset "
            f"{offset}, length {length}, file size {size}); the data file is truncated or "
            "belongs to another model"
        )
    return path, offset, length


def read_external_bytes(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> bytes:
    """The bytes of one external tensor, read from its file after a bounds check."""
    path, offset, length = _external_span(tensor, data_dir)
    with open(path, "rb") as stream:
        stream.seek(offset)
        return stream.read(length)


def external_array(tensor: onnx.TensorProto, data_dir: str | os.PathLike) -> np.ndarray:
    """A read-only memory map of an external tensor's values: nothing is read until used.

    Raises:
        InvalidModelError: the data lies outside its file or does not match the tensor's type
            and shape (also for element types whose stored width NumPy does not have).
    """
    path, offset, length = _external_span(tensor, data_dir)
    shape = tuple(int(d) for d in tensor.dims)
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InvalidModelError(
            f"tensor {tensor.name!r} has element type {type_name(tensor.data_type)}, which has "
            "no NumPy equivalent"
        ) from exc
    dtype = dtype.newbyteorder("<")  # ONNX stores raw data little-endian
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != length:
        raise InvalidModelError(
            f"external data of tensor {tensor.name!r} holds {length} bytes, not the "
            f"{type_name(tensor.data_type)} values of shape {shape}"
        )
    if length == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, stored inline or externally, without reading it."""
    if uses_external_data(tensor):
        length = ExternalDataInfo(tensor).length
        return int(length) if length is not None else 0
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return tensor.ByteSize()


def has_external_data(model: onnx.ModelProto) -> bool:
    """True when any tensor of the model (subgraphs included) keeps its data in a side file."""
    return any(uses_external_data(tensor) for tensor in iter_tensors(model))


class FreshNames:
    """New names that no tensor, node, input, output or value info of the model uses, in the
    main graph or any subgraph (so no new name shadows an outer-scope one): ``base``, else
    ``base_2``, ``base_3``, ... Every name handed out is taken from then on. The one name
    authority of every pass that adds names (fold, rewrite, the calibration probes)."""

    def __init__(self, model: onnx.ModelProto):
        self.used: set[str] = set()
        for _, graph in walk_graphs(model.graph):
            for node in graph.node:
                self.used.update(node.input)
                self.used.update(node.output)
                self.used.add(node.name)
            for collection in (graph.input, graph.output, graph.value_info, graph.initializer):
                self.used.update(item.name for item in collection)

    def fresh(self, base: str) -> str:
        name, suffix = base, 1
        while name in self.used:
            suffix += 1
            name = f"{base}_{suffix}"
        self.used.add(name)
        return name
