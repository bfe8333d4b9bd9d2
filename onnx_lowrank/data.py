"""Model inputs from files: the readers behind ``--inputs`` and ``--calibration``, and the
image preprocessing behind ``onnx-lowrank make-calibration``.

``read_arrays`` accepts the formats people have, as ONNX tools take them:

* an ``.npz`` archive with one array per model input, keyed by input name (``load_npz`` reads
  it, after ``npz_headers`` has checked what its arrays declare against the available memory);
* an ``.npy`` file: the batch of a model with exactly one input;
* a folder of ``.npy`` files, either one per model input (``<input name>.npy``, with ``/`` and
  ``:`` in the name written as ``_``), or one per sample of a single-input model (sorted by
  file name; each file is one sample, with or without a leading batch dimension of 1), as
  NVIDIA ModelOpt takes calibration data.

Every array is returned batch first, keyed by input name; the callers check them against the
model (``feeds.check_feeds``, ``calibrate.check_calibration``).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from .errors import CalibrationError, ConfigError, RuntimeMissingError, file_kind, reason
from .feeds import graph_inputs

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImagePreprocessing",
    "available_memory",
    "crop_regions",
    "file_name",
    "images_to_batch",
    "load_npz",
    "model_input",
    "npz_headers",
    "preprocess",
    "read_arrays",
]

#: File types ``make-calibration`` reads, by suffix.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def file_name(input_name: str) -> str:
    """The ``.npy`` file name of a model input in a folder of one file per input."""
    return input_name.replace("/", "_").replace(":", "_") + ".npy"


def read_arrays(
    path: str | os.PathLike,
    model: onnx.ModelProto,
    what: str = "--inputs",
    check: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Model inputs from an ``.npz`` file, an ``.npy`` file, or a folder of ``.npy`` files.

    Files are told apart by name: ``.npy`` and folders are read here, anything else (a folder
    named ``.npz`` included, which it refuses) by ``load_npz``.

    Args:
        path: the file or folder.
        model: the model the arrays are for (its input names, and whether it has one input).
        what: the option that named ``path``, for messages.
        check: raises when the arrays do not fit the model; an ``.npz``'s arrays are checked
            before they are read (``load_npz``).

    Returns:
        One batch-first array per input name.

    Raises:
        CalibrationError: the file or folder cannot be read, or its layout does not fit the
            model's inputs.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix != ".npy" and (suffix == ".npz" or not target.is_dir()):
        return load_npz(target, what, check)
    if target.is_dir():
        arrays = _read_folder(target, model, what)
    else:
        names = _input_names(model)
        if len(names) != 1:
            raise CalibrationError(
                f"{what} {path} is one .npy array, but the model has {len(names)} inputs "
                f"({', '.join(names)}); give an .npz keyed by input name, or a folder with one "
                ".npy per input"
            )
        arrays = {names[0]: _load_npy(target, what)}
    if check is not None:
        check(arrays)
    return arrays


def _input_names(model: onnx.ModelProto) -> list[str]:
    return [info.name for info in graph_inputs(model)]


def _load_npy(path: Path, what: str) -> np.ndarray:
    fix = "save it with numpy.save(FILE, array)"
    if not path.exists():
        raise CalibrationError(f"{what} file not found: {path}")
    try:
        if zipfile.is_zipfile(path):
            raise CalibrationError(f"{what} file {path} is an .npz archive; name it FILE.npz")
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CalibrationError(f"{what} file {path} cannot be read ({reason}); {fix}") from exc
    if not isinstance(array, np.ndarray):  # pragma: no cover - np.load of .npy is an array
        raise CalibrationError(f"{what} file {path} is not a NumPy array; {fix}")
    return array


def _read_folder(folder: Path, model: onnx.ModelProto, what: str) -> dict[str, np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".npy" and p.is_file())
    if not files:
        raise CalibrationError(
            f"{what} folder {folder} has no .npy files; save one per model input "
            "(<input name>.npy) or one per sample"
        )
    names = _input_names(model)
    by_file = {file_name(name): name for name in names}
    present = {p.name for p in files}
    if present == set(by_file):  # one file per input
        return {by_file[p.name]: _load_npy(p, what) for p in files}
    if len(names) != 1:
        expected = ", ".join(sorted(by_file))
        raise CalibrationError(
            f"{what} folder {folder} must hold one .npy per model input ({expected}); it has "
            f"{', '.join(sorted(present))}. One file per sample works for single-input models"
        )
    return {names[0]: _stack_samples(files, model, what)}


def _stack_samples(files: Sequence[Path], model: onnx.ModelProto, what: str) -> np.ndarray:
    """One batch of the samples of a single-input model: files of the input's rank must have a
    leading batch of 1 and are concatenated; files of one rank less are stacked."""
    info = graph_inputs(model)[0]
    rank = len(info.type.tensor_type.shape.dim) if info.type.tensor_type.HasField("shape") else 0
    arrays = [_load_npy(path, what) for path in files]
    shape = arrays[0].shape
    for path, array in zip(files, arrays, strict=True):
        if array.shape != shape:
            raise CalibrationError(
                f"{what} folder: samples differ in shape ({files[0].name} {shape}, {path.name} "
                f"{array.shape}); every sample must have the same shape"
            )
    if rank and len(shape) == rank:
        if shape[0] != 1:
            raise CalibrationError(
                f"{what} folder: each file is one sample, but {files[0].name} has a batch of "
                f"{shape[0]}; save one sample per file, or one file per input name"
            )
        return np.concatenate(arrays)
    return np.stack(arrays)


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
            f"{what} file {path} cannot be read ({reason(exc)}); {_NPZ_FIX}"
        ) from exc
    except MemoryError as exc:
        raise CalibrationError(
            f"{what} file {path}: out of memory reading {_bytes(_declared_bytes(declared))} "
            f"of arrays ({reason(exc)})"
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
        raise CalibrationError(f"{what} {path} is {file_kind(target)}; give an .npz file")
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
            f"{what} file {path} cannot be read ({reason(exc)}); {_NPZ_FIX}"
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
        raise CalibrationError(f"array shape {shape} is too large ({reason(exc)})") from exc


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


# --------------------------------------------------------------------------------------------
# Images to a calibration batch (onnx-lowrank make-calibration)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images become model inputs.

    Attributes:
        size: ``(height, width)`` of the centre crop.
        resize: shorter side before the crop (bicubic); None: the larger of height and width.
        scale: factor on 0..255 pixel values.
        mean: per-channel (or one) value subtracted after scaling.
        std: per-channel (or one) divisor after the mean.
        grayscale: one channel instead of RGB.
        bgr: BGR channel order.
        layout: ``"nchw"`` or ``"nhwc"``.
        crops: samples per image: the whole image, then ``crops − 1`` random square regions.
        seed: seed of the random regions.
    """

    size: tuple[int, int]
    resize: int | None = None
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    grayscale: bool = False
    bgr: bool = False
    layout: str = "nchw"
    crops: int = 1
    seed: int = 0


def model_input(model: onnx.ModelProto, name: str | None) -> tuple[str, list[int | None]]:
    """Name and dimensions (None when dynamic) of one input of an ONNX model.

    Raises:
        ConfigError: the model has no input ``name``, or several inputs and no ``name``.
    """
    inputs = graph_inputs(model)
    if name is not None:
        inputs = [info for info in inputs if info.name == name]
        if not inputs:
            raise ConfigError(f"the model has no input {name!r}")
    elif len(inputs) != 1:
        names = ", ".join(info.name for info in inputs)
        raise ConfigError(f"the model has inputs {names}; pick one with --input")
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    return inputs[0].name, dims


def crop_regions(
    width: int, height: int, crops: int, rng: np.random.Generator
) -> list[tuple[tuple[int, int, int, int], bool]]:
    """The whole image, then ``crops − 1`` random square regions ``(box, mirrored)``: a third of
    the image's area or more, every other one mirrored."""
    regions = [((0, 0, width, height), False)]
    short = min(width, height)
    for index in range(1, crops):
        side = round(short * float(np.sqrt(rng.uniform(1 / 3, 1.0))))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        regions.append(((left, top, left + side, top + side), index % 2 == 1))
    return regions


def preprocess(
    image,
    size: tuple[int, int],
    resize: int | None,
    scale: float,
    mean: np.ndarray,
    std: np.ndarray,
) -> np.ndarray:
    """One PIL image (already in the wanted mode) to a float32 ``(channels, H, W)`` array:
    shorter side to ``resize`` (bicubic), centre crop to ``size``, ``(pixel·scale − mean)/std``.
    """
    from PIL import Image

    height, width = size
    shorter = resize or max(height, width)
    factor = shorter / min(image.size)
    resized = image.resize(
        (max(width, round(image.size[0] * factor)), max(height, round(image.size[1] * factor))),
        Image.BICUBIC,
    )
    left = (resized.size[0] - width) // 2
    top = (resized.size[1] - height) // 2
    pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return ((pixels * scale - mean) / std).transpose(2, 0, 1).astype(np.float32)


def images_to_batch(paths: Sequence[Path], options: ImagePreprocessing) -> np.ndarray:
    """Every image of ``paths`` (in order), preprocessed, as one float32 batch.

    Raises:
        RuntimeMissingError: Pillow is not installed.
        ConfigError: an image cannot be read.
    """
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise RuntimeMissingError(
            "make-calibration needs Pillow; install it with pip install pillow "
            "(or the images extra)"
        ) from None
    rng = np.random.default_rng(options.seed)
    mean = np.asarray(options.mean, dtype=np.float32)
    std = np.asarray(options.std, dtype=np.float32)
    samples = []
    for path in paths:
        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if options.grayscale else "RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise ConfigError(f"cannot read image {path}: {exc}") from exc
        for box, mirrored in crop_regions(*image.size, options.crops, rng):
            region = image.crop(box)
            if mirrored:
                region = region.transpose(Image.FLIP_LEFT_RIGHT)
            array = preprocess(region, options.size, options.resize, options.scale, mean, std)
            samples.append(array[::-1] if options.bgr else array)
    batch = np.stack(samples)
    if options.layout == "nhwc":
        batch = batch.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(batch)
