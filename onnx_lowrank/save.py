"""Write ONNX models and files atomically.

Everything goes to a temporary folder beside the target, is checked by the ONNX checker and
synced, then each file is renamed into place (the data file first, under a name the previous
model at the target does not read, then the model, with Ctrl-C and SIGTERM held back between
the two renames), so an interrupted or crashed run never leaves half a model, nor an old model
reading new weights. Nothing is ever renamed onto a device, FIFO, socket or folder.

External data is written by a streaming writer that copies lazily referenced tensors (models
read by ``load.open_model``) from their source file chunk by chunk and never writes into a file
of the input model: when the default data file name is one of the input's files, the output
gets another name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import tempfile
import threading
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx.external_data_helper import ExternalDataInfo

from .errors import InvalidModelError, OutputPathError, file_kind, reason
from .graphs import (
    PROTOBUF_LIMIT,
    external_location,
    has_external_data,
    read_external_bytes,
    tensor_nbytes,
)
from .walk import iter_tensors

__all__ = [
    "EXTERNAL_THRESHOLD",
    "check_output_path",
    "model_size_bytes",
    "remove_stale_temporaries",
    "same_file",
    "save_model",
    "temporary_prefix",
    "write_file",
]

log = logging.getLogger(__name__)

#: Tensors of at least this many bytes go to the data file when writing external data.
EXTERNAL_THRESHOLD = 1024

_COPY_CHUNK = 64 * 2**20


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
    lazy = has_external_data(model)
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
                reason(exc),
            )
            return
        raise InvalidModelError(
            f"the model for {target} fails the ONNX checker ({reason(exc)}); nothing was "
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
        kind = file_kind(target)
        fix = "give a file name" if target.is_dir() else "give the path of a regular file"
        raise OutputPathError(f"{what} {target} is {kind}, not a regular file; {fix}")
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{what} folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise OutputPathError(f"{what} folder {folder} does not exist; create it first")


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
