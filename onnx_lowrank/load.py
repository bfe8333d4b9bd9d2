"""Read and write ONNX models safely.

Reading turns every way a file can be wrong into a typed error with a one-line message. A model
whose external data is larger than ``LAZY_EXTERNAL_BYTES`` is loaded *lazily*: its tensors keep
pointing at the side files, and stages read one weight at a time
(``graphs.tensor_to_array(tensor, data_dir)``), so a model over 2 GiB never sits in memory whole.

Writing is atomic: everything goes to a temporary folder beside the target, is checked by the
ONNX checker and synced, then each file is renamed into place (the data file first, under a name
the previous model at the target does not read, then the model, with Ctrl-C and SIGTERM held
back between the two renames), so an interrupted or crashed run never leaves half a model, nor
an old model reading new weights. Nothing is ever renamed onto a device, FIFO, socket or folder.

External data is written by a streaming writer that copies lazily referenced tensors from their
source file chunk by chunk and never writes into a file of the input model: when the default
data file name is one of the input's files, the output gets another name.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
import onnx
from onnx.external_data_helper import ExternalDataInfo

from .errors import CalibrationError, InvalidModelError, ModelFileError, OutputPathError
from .graphs import (
    external_location,
    iter_graphs,
    iter_tensors,
    read_external_bytes,
    tensor_nbytes,
)

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

__all__ = [
    "LAZY_EXTERNAL_BYTES",
    "LoadedModel",
    "ModelSource",
    "available_memory",
    "check_output_path",
    "external_data_files",
    "graph_to_model",
    "load_model",
    "load_npz",
    "model_file_size",
    "model_size_bytes",
    "model_to_graph",
    "npz_headers",
    "open_model",
    "remove_stale_temporaries",
    "same_file",
    "save_model",
    "source_path",
    "temporary_prefix",
    "uses_external_data",
    "write_file",
]

log = logging.getLogger(__name__)

#: A model to read: a path, serialized bytes, a ModelProto, or an ``onnx_graphsurgeon.Graph``.
ModelSource = Union[str, os.PathLike, onnx.ModelProto, bytes, "gs.Graph"]

#: Protobuf cannot serialize a single message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1

#: Models with more external data than this are loaded lazily (weights stay in their files).
LAZY_EXTERNAL_BYTES = 2**30

#: Tensors of at least this many bytes go to the data file when writing external data.
EXTERNAL_THRESHOLD = 1024

_COPY_CHUNK = 64 * 2**20


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
    if uses_external_data(model):
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
                    f"external data of {path} cannot be read ({_reason(exc)}); keep the data "
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
            f"the given onnx_graphsurgeon.Graph cannot be exported to ONNX ({_reason(exc)}); "
            "run graph.cleanup().toposort() and give every input and output a dtype"
        ) from exc


def model_to_graph(model: onnx.ModelProto, data_dir: Path | None = None) -> gs.Graph:
    """Import ``model`` as an ``onnx_graphsurgeon.Graph``; external data is read from
    ``data_dir`` first, so the graph holds every weight."""
    import onnx_graphsurgeon as gs

    if data_dir is not None and uses_external_data(model):
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
        raise ModelFileError(f"{path} is {_file_kind(path)}; give the path of an .onnx file")
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
                f"({_reason(exc)}); re-export the model"
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


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool = False,
    data_dir: str | os.PathLike | None = None,
    protect: Collection[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """Write ``model`` to ``path`` atomically, after the ONNX checker accepts the written file.

    Both files are written and synced in a temporary folder beside the target, then renamed into
    place: the data file under a name the previous output at ``path`` does not read, then the
    model. A crash between the two renames leaves the previous model with its own data file;
    the previous output's data file is removed after the new model is in place. An existing
    output keeps its permissions.

    Args:
        model: the model to write. It is not modified.
        path: target ``.onnx`` path. Its folder must exist; it must not be a device, FIFO,
            socket or folder.
        external_data: write tensors of at least ``EXTERNAL_THRESHOLD`` bytes into one data file
            beside the model (``<name>.data``, or ``<name>.<n>.data`` when that name is taken by
            the previous output or the input). Forced on when the model is too large for a
            single protobuf (2 GiB).
        data_dir: folder against which the model's own external tensors resolve (a lazily
            loaded model); their bytes are copied into the output.
        protect: files that must not be written or removed (the input model's files).
        force: when the written model fails the ONNX checker, log a warning and publish it
            anyway (the input failed the checker too and the user passed ``--force``).

    Returns:
        The path written.

    Raises:
        OutputPathError: the folder does not exist or is not writable, ``path`` is not a regular
            file, or it is a protected file.
        InvalidModelError: the written model fails the ONNX checker (and ``force`` is False).
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    check_output_path(target)
    protected = tuple(Path(p) for p in protect)
    if any(same_file(target, p) for p in protected):
        raise OutputPathError(f"output {target} is a file of the input model; choose another path")
    lazy = uses_external_data(model)
    if lazy and data_dir is None:
        raise OutputPathError(
            "the model refers to external data but its folder is unknown; pass data_dir"
        )
    if not external_data and (lazy or model.ByteSize() > PROTOBUF_LIMIT):
        external_data = model_size_bytes(model) > PROTOBUF_LIMIT
        if external_data:
            log.info("model exceeds 2 GiB; writing its weights as external data")
    remove_stale_temporaries(folder, f".{target.name}")
    previous = _owned_data_files(target)
    mode = _regular_file_mode(target)
    try:
        staging = Path(tempfile.mkdtemp(prefix=temporary_prefix(f".{target.name}"), dir=folder))
    except OSError as exc:
        raise OutputPathError(
            f"cannot write to {folder}: {exc.strerror or exc}; choose a writable folder"
        ) from exc
    try:
        staged_model = staging / target.name
        data_name = _data_name(target, protected, previous) if external_data else None
        if data_name is not None:
            check_output_path(folder / data_name, "output data file")
        if data_name is None and not lazy:
            staged_model.write_bytes(model.SerializeToString())
        else:
            _write_streaming(model, staged_model, staging, data_name, data_dir)
        _check_written(staged_model, target, force)
        staged = [staged_model] + ([staging / data_name] if data_name is not None else [])
        for file in staged:
            if mode is not None:
                os.chmod(file, mode)
            _fsync(file)
        with _interrupts_deferred():
            if data_name is not None:  # a name the previous model does not read
                os.replace(staging / data_name, folder / data_name)
                _fsync(folder)
            os.replace(staged_model, target)
            _fsync(folder)
        for name in previous - {data_name}:
            if not any(same_file(folder / name, p) for p in protected):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
    except OSError as exc:
        raise OutputPathError(
            f"cannot write {target}: {exc.strerror or exc}; choose a writable path"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_written(path: Path, target: Path, force: bool) -> None:
    """Run the ONNX checker on a written model file (with its external data beside it)."""
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError) as exc:
        if force:
            log.warning(
                "the model written to %s fails the ONNX checker (%s); writing it because of "
                "--force",
                target,
                _reason(exc),
            )
            return
        raise InvalidModelError(
            f"the model for {target} fails the ONNX checker ({_reason(exc)}); nothing was "
            "written. This is a bug in onnx-lowrank: please report it"
        ) from exc


def write_file(target: Path, write: Callable[[BinaryIO], None], what: str) -> Path:
    """Write one file atomically: a synced temporary file beside ``target``, then a rename.

    The temporary file is created with the usual permissions (``0o666`` less the umask), or
    those of the file it replaces; it is removed when anything fails.

    Raises:
        OutputPathError: ``target`` is not a regular file, or it cannot be written.
    """
    folder = target.parent if str(target.parent) else Path(".")
    check_output_path(target, what)
    remove_stale_temporaries(folder, f".{target.name}")
    mode = _regular_file_mode(target)
    temporary = folder / f"{temporary_prefix('.' + target.name)}{secrets.token_hex(4)}.tmp"
    try:
        try:
            handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(handle, "wb") as stream:
                write(stream)
                stream.flush()
                if mode is not None:
                    os.fchmod(stream.fileno(), mode)
                os.fsync(stream.fileno())
            with _interrupts_deferred():
                os.replace(temporary, target)
            _fsync(folder)
        finally:
            if temporary.exists():
                temporary.unlink()
    except OSError as exc:
        raise OutputPathError(f"cannot write {what} {target}: {exc.strerror or exc}") from exc
    return target


def check_output_path(path: str | os.PathLike, what: str = "output") -> None:
    """Refuse an output path that is not a regular file (after symlinks) or whose folder is
    missing or not a folder.

    Files are published by renaming a new file onto the path, which would replace a device,
    FIFO or socket (as root, ``-o /dev/null`` would replace the system's ``/dev/null``).

    Raises:
        OutputPathError: naming what the path is.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.exists() and not target.is_file():
        kind = _file_kind(target)
        fix = "give a file name" if target.is_dir() else "give the path of a regular file"
        raise OutputPathError(f"{what} {target} is {kind}, not a regular file; {fix}")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise OutputPathError(f"{what} folder {folder} does not exist; create it first")


def _file_kind(path: Path) -> str:
    """What a path is, in words: 'a directory', 'a named pipe (FIFO)', ..."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return "not readable"
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """True when two paths name one file: the same resolved path, or hard links to one inode."""
    try:
        if os.path.realpath(first) == os.path.realpath(second):
            return True
        return os.path.samefile(first, second)
    except (OSError, ValueError):  # one of them does not exist (yet)
        return False


def _regular_file_mode(path: Path) -> int | None:
    """Permission bits of an existing regular file, so that replacing it keeps them."""
    try:
        status = path.stat()
    except (OSError, ValueError):
        return None
    return stat.S_IMODE(status.st_mode) if stat.S_ISREG(status.st_mode) else None


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its renames) to the disk."""
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some file systems cannot sync folders
        pass
    finally:
        os.close(handle)


def _owned_data_files(target: Path) -> set[str]:
    """Names of the data files that the model now at ``target`` reads and that are named after
    it (``<name>.data``, ``<name>.<n>.data``): the new output must not write them, and they are
    removed once it is in place. Files of other names may be shared and are left alone."""
    if not target.is_file() or target.stat().st_size > PROTOBUF_LIMIT:
        return set()
    try:
        model = onnx.load(str(target), load_external_data=False)
    except Exception:  # not a model: nothing of it to keep
        return set()
    pattern = re.compile(re.escape(target.name) + r"(\.[0-9]+)?\.data")
    names = set()
    for tensor in iter_tensors(model):
        if onnx.external_data_helper.uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if pattern.fullmatch(location):
                names.add(location)
    return names


def _data_name(target: Path, protected: Sequence[Path], previous: set[str]) -> str:
    """``<name>.data``, or ``<name>.<n>.data`` when that is read by the model now at ``target``
    (``previous``) or is a file of the input model."""
    name, number = f"{target.name}.data", 0
    while name in previous or any(same_file(target.parent / name, p) for p in protected):
        number += 1
        name = f"{target.name}.{number}.data"
    if number and any(same_file(target.parent / f"{target.name}.data", p) for p in protected):
        log.warning(
            "%s.data belongs to the input model; writing the weights to %s instead",
            target.name,
            name,
        )
    return name


# Temporary files and folders are named ``<prefix><host>-<pid>.<random>``, so a later run can
# remove those of a process that was killed (SIGKILL, power loss) on this machine.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"


def temporary_prefix(stem: str) -> str:
    """The start of a temporary file's name made by this process: ``<stem>.<host>-<pid>.``"""
    return f"{stem}.{_HOST}-{os.getpid()}."


def remove_stale_temporaries(folder: Path, stem: str) -> None:
    """Remove the temporary files and folders in ``folder`` named by ``temporary_prefix(stem)``
    of a process (on this host, of this user) that is gone."""
    prefix = f"{stem}."
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        owner, _, rest = entry.name[len(prefix) :].partition(".")
        host, _, pid = owner.partition("-")
        if host != _HOST or not pid.isdigit() or not rest or _alive(int(pid)):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            log.info("removed %s, left by an interrupted run (process %s)", entry.path, pid)
        except OSError:
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def model_size_bytes(model: onnx.ModelProto) -> int:
    """Bytes of a model's protobuf plus its tensors that still live in external files."""
    return model.ByteSize() + sum(
        tensor_nbytes(t)
        for t in iter_tensors(model)
        if onnx.external_data_helper.uses_external_data(t)
    )


#: Signals held back while files are renamed into place: Ctrl-C and ``kill`` (SIGTERM).
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT and SIGTERM until the block is done, so that the data file and the
    model file are renamed together; a signal received meanwhile is raised again after it (its
    own handler runs then). Only possible in the main thread; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread() or any(
        signal.getsignal(number) is None  # a handler installed outside Python
        for number in _DEFERRED_SIGNALS
    ):
        yield
        return
    received: list[int] = []
    previous = {
        number: signal.signal(number, lambda number, frame: received.append(number))
        for number in _DEFERRED_SIGNALS
    }
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            signal.raise_signal(received[0])


def _write_streaming(
    model: onnx.ModelProto,
    model_path: Path,
    staging: Path,
    data_name: str | None,
    data_dir: str | os.PathLike | None,
) -> None:
    """Write a model whose tensors may live in memory or in the input's data files.

    With ``data_name``, every tensor of at least ``EXTERNAL_THRESHOLD`` bytes goes to
    ``staging/data_name``; without it, everything is written inline. The main graph's
    initializers are copied into the output one at a time, so memory stays at one tensor
    beyond the model itself.
    """
    skeleton = onnx.ModelProto()
    for descriptor, value in model.ListFields():
        if descriptor.name != "graph":
            _set_field(skeleton, descriptor, value)
    for descriptor, value in model.graph.ListFields():
        if descriptor.name != "initializer":
            _set_field(skeleton.graph, descriptor, value)
    stream = open(staging / data_name, "wb") if data_name else None  # noqa: SIM115
    try:
        for tensor in model.graph.initializer:
            copy = skeleton.graph.initializer.add()
            for descriptor, value in tensor.ListFields():
                if descriptor.name not in ("raw_data", "external_data", "data_location"):
                    _set_field(copy, descriptor, value)
            _place(copy, tensor, stream, data_name, data_dir)
        for tensor in list(iter_tensors(skeleton, main_initializers=False)):
            if onnx.external_data_helper.uses_external_data(tensor) or stream is not None:
                source = onnx.TensorProto()
                source.CopyFrom(tensor)
                for name in ("raw_data", "external_data", "data_location"):
                    tensor.ClearField(name)
                _place(tensor, source, stream, data_name, data_dir)
    finally:
        if stream is not None:
            stream.close()
    model_path.write_bytes(skeleton.SerializeToString())


def _set_field(message, descriptor, value) -> None:
    field = getattr(message, descriptor.name)
    repeated = getattr(descriptor, "is_repeated", None)  # protobuf >= 6 drops .label
    if repeated is None:
        repeated = descriptor.label == descriptor.LABEL_REPEATED
    if repeated:
        field.extend(value)
    elif descriptor.message_type is not None:
        field.CopyFrom(value)
    else:
        setattr(message, descriptor.name, value)


def _place(
    copy: onnx.TensorProto,
    source: onnx.TensorProto,
    stream: BinaryIO | None,
    data_name: str | None,
    data_dir: str | os.PathLike | None,
) -> None:
    """Give ``copy`` (which has no data yet) the data of ``source``: inline, or appended to
    ``stream`` with an external-data entry."""
    external = onnx.external_data_helper.uses_external_data(source)
    if not external:
        if source.HasField("raw_data"):
            if stream is None or len(source.raw_data) < EXTERNAL_THRESHOLD:
                copy.raw_data = source.raw_data
                return
        else:  # typed fields (float_data, ...) were copied with the other fields
            if stream is None or source.ByteSize() < EXTERNAL_THRESHOLD:
                return
            if source.data_type == onnx.TensorProto.STRING:
                return
            array = onnx.numpy_helper.to_array(source)
            for name in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                copy.ClearField(name)
            source = onnx.numpy_helper.from_array(array, source.name)
    assert data_dir is not None or not external
    if stream is None:
        copy.raw_data = read_external_bytes(source, data_dir)  # type: ignore[arg-type]
        return
    offset = stream.tell()
    alignment = 4096 if (external or len(source.raw_data) >= 2**20) else 64
    if offset % alignment:
        stream.write(b"\0" * (alignment - offset % alignment))
        offset = stream.tell()
    length = (
        _copy_external(source, stream, data_dir)  # type: ignore[arg-type]
        if external
        else stream.write(source.raw_data)
    )
    copy.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
        entry = copy.external_data.add()
        entry.key, entry.value = key, value


def _copy_external(source: onnx.TensorProto, stream: BinaryIO, data_dir: str | os.PathLike) -> int:
    """Copy an external tensor's bytes from its file into ``stream`` in chunks."""
    info = ExternalDataInfo(source)
    path = external_location(source, data_dir)
    offset = info.offset or 0
    remaining = path.stat().st_size - offset if info.length is None else info.length
    length = remaining
    with open(path, "rb") as data:
        data.seek(offset)
        while remaining > 0:
            chunk = data.read(min(remaining, _COPY_CHUNK))
            if not chunk:
                raise InvalidModelError(
                    f"external data of tensor {source.name!r} ends early in {path.name}"
                )
            stream.write(chunk)
            remaining -= len(chunk)
    return length


# --------------------------------------------------------------------------------------------
# .npz inputs (--inputs, --calibration)

_NPZ_FIX = "save one array per model input with numpy.savez(FILE, name=array, ...)"


def load_npz(
    path: str | os.PathLike,
    what: str = "--inputs",
    check: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file, with a clear error when it cannot be read.

    Keys, dtypes and shapes are read from the ``.npy`` headers inside the archive first
    (``npz_headers``), so a small file that declares or inflates to more memory than is
    available is refused before anything is read, and ``check`` sees the file's arrays as
    read-only placeholders of the declared shape and dtype (no memory) before they are loaded.

    Args:
        path: the ``.npz`` file.
        what: the option that named it, for messages.
        check: called with the placeholders; raises when they do not fit the model.

    Raises:
        CalibrationError: the file is missing, not an ``.npz`` of NumPy arrays, larger than the
            available memory, or (through ``check``) does not fit the model.
    """
    declared = npz_headers(path, what)
    if check is not None:
        check({key: _placeholder(dtype, shape) for key, (dtype, shape) in declared.items()})
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in declared}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CalibrationError(
            f"{what} file {path} cannot be read ({_reason(exc)}); {_NPZ_FIX}"
        ) from exc
    except MemoryError as exc:
        raise CalibrationError(
            f"{what} file {path}: out of memory reading {_bytes(_declared_bytes(declared))} "
            f"of arrays ({_reason(exc)})"
        ) from exc


def npz_headers(
    path: str | os.PathLike, what: str = "--inputs"
) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each array's dtype and shape as declared in its ``.npy`` header, without reading data.

    Raises:
        CalibrationError: as for ``load_npz``; the arrays would need more memory than is
            available (the message says how much).
    """
    target = Path(path)
    if not target.exists():
        raise CalibrationError(f"{what} file not found: {path}")
    if target.is_dir():
        raise CalibrationError(f"{what} {path} is a directory; give an .npz file")
    if not target.is_file():
        raise CalibrationError(f"{what} {path} is {_file_kind(target)}; give an .npz file")
    declared: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}
    try:
        if not zipfile.is_zipfile(target):  # empty, truncated, .npy, text, ...
            raise CalibrationError(f"{what} file {path} is not an .npz archive; {_NPZ_FIX}")
        with zipfile.ZipFile(target) as archive:
            for member in archive.infolist():
                if not member.filename.endswith(".npy"):
                    raise CalibrationError(
                        f"{what} file {path} holds {member.filename!r}, which is not a NumPy "
                        f"array; {_NPZ_FIX}"
                    )
                with archive.open(member) as stream:
                    declared[member.filename[: -len(".npy")]] = _npy_header(stream)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CalibrationError(
            f"{what} file {path} cannot be read ({_reason(exc)}); {_NPZ_FIX}"
        ) from exc
    objects = [key for key, (dtype, _) in declared.items() if dtype.hasobject]
    if objects:
        raise CalibrationError(
            f"{what} file {path} cannot be read ({objects[0]!r} holds Python objects: Object "
            f"arrays cannot be loaded when allow_pickle=False); {_NPZ_FIX}"
        )
    needed, available = _declared_bytes(declared), available_memory()
    if available is not None and needed > available:
        key, (dtype, shape) = max(
            declared.items(), key=lambda item: _declared_bytes({item[0]: item[1]})
        )
        raise CalibrationError(
            f"{what} file {path} declares {_bytes(needed)} of arrays ({key!r}: {dtype} "
            f"{shape}), more than the {_bytes(available)} of memory available; give fewer "
            "samples"
        )
    return declared


def _npy_header(stream: BinaryIO) -> tuple[np.dtype, tuple[int, ...]]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:  # 3.0 only differs in the header's text encoding (utf-8); numpy has no public reader
        shape, _, dtype = np.lib.format._read_array_header(stream, version)
    if any(int(size) < 0 for size in shape):
        raise ValueError(f"negative dimension in shape {shape}")
    return np.dtype(dtype), tuple(int(size) for size in shape)


def _declared_bytes(declared: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in declared.values())


def _placeholder(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of ``shape`` and ``dtype`` that takes no memory (all zeros)."""
    try:
        return np.broadcast_to(np.zeros((), dtype), shape)
    except ValueError as exc:  # more elements than an index can address
        raise CalibrationError(f"array shape {shape} is too large ({_reason(exc)})") from exc


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or None."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _bytes(count: int) -> str:
    """A byte count for people: '4.00 GiB'."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{count} B"
