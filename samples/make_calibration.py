"""Turn a folder of images into a calibration file for ``onnx-lowrank compress --calibration``.

    python samples/make_calibration.py IMAGES_DIR OUT.npz --model MODEL.onnx [options]

Every image (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.gif``, ``.tif``, ``.tiff``, ``.webp``)
in ``IMAGES_DIR``, sorted by name, becomes one sample, preprocessed the usual way:

1. converted to RGB (or grayscale with ``--grayscale``; ``--bgr`` swaps to BGR order);
2. resized so that its shorter side is ``--resize`` pixels (bicubic; default: the crop size);
3. centre-cropped to the model's input height and width (or ``--size H W``);
4. normalised per channel: ``(pixel · scale − mean) / std`` on 0..255 pixel values;
5. laid out as NCHW (default) or NHWC (``--layout nhwc``) float32.

``--crops K`` adds ``K − 1`` more samples per image: random square regions (a third of the
image's area or more, seeded by ``--seed``), half of them mirrored, each then preprocessed as
above. Use it when you have only a few images.

The array is saved under the model's input name (or ``--input NAME``), which is what
``--calibration`` expects: one array per model input, batch first. Examples:

    # EfficientNet-Lite0: shorter side 256, crop 224, (x − 127) / 128
    python samples/make_calibration.py photos/ calib.npz --model efficientnet_lite0.onnx \\
        --resize 256 --scale 1 --mean 127 --std 128
    # torchvision ImageNet models
    python samples/make_calibration.py photos/ calib.npz --model resnet.onnx --resize 256 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    # MNIST (white digit on black, 28×28)
    python samples/make_calibration.py digits/ calib.npz --model samples/mnist_cnn.onnx \\
        --grayscale --mean 0.1307 --std 0.3081

Needs numpy, onnx and Pillow (``pip install pillow``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def model_input(path: Path, name: str | None) -> tuple[str, list[int | None]]:
    """Name and dimensions (None when dynamic) of one input of an ONNX model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {tensor.name for tensor in model.graph.initializer}
    inputs = [info for info in model.graph.input if info.name not in initializers]
    if name is not None:
        inputs = [info for info in inputs if info.name == name]
        if not inputs:
            raise SystemExit(f"make_calibration.py: error: the model has no input {name!r}")
    elif len(inputs) != 1:
        names = ", ".join(info.name for info in inputs)
        raise SystemExit(f"make_calibration.py: error: the model has inputs {names}; pick --input")
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    return inputs[0].name, dims


def crop_regions(
    width: int, height: int, crops: int, rng: np.random.Generator
) -> list[tuple[tuple[int, int, int, int], bool]]:
    """The whole image, then ``crops − 1`` random square regions ``(box, mirrored)``."""
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
    """One PIL image (already in the wanted mode) to a float32 ``(channels, H, W)`` array."""
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


def _floats(text: str) -> np.ndarray:
    values = []
    for part in text.split(","):
        number, slash, divisor = part.partition("/")
        values.append(float(number) / (float(divisor) if slash else 1.0))
    return np.asarray(values, dtype=np.float32)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", type=Path, help="folder of images")
    parser.add_argument("out", type=Path, help="the .npz file to write")
    parser.add_argument("--model", type=Path, help="read the input name and size from it")
    parser.add_argument("--input", help="input name (default: the model's only input)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="crop size")
    parser.add_argument("--resize", type=int, help="shorter side before the crop (bicubic)")
    parser.add_argument("--scale", type=_floats, default=_floats("1/255"), help="default 1/255")
    parser.add_argument("--mean", type=_floats, default=_floats("0"), help="M or M1,M2,M3")
    parser.add_argument("--std", type=_floats, default=_floats("1"), help="S or S1,S2,S3")
    parser.add_argument("--grayscale", action="store_true", help="one channel")
    parser.add_argument("--bgr", action="store_true", help="BGR channel order")
    parser.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw")
    parser.add_argument("--crops", type=int, default=1, help="samples per image (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    args = parser.parse_args(argv)
    try:
        from PIL import Image
    except ImportError:
        print("make_calibration.py: error: needs Pillow (pip install pillow)", file=sys.stderr)
        return 2

    name, dims = args.input or "input", [None, None, None, None]
    if args.model is not None:
        name, dims = model_input(args.model, args.input)
    spatial = dims[2:4] if args.layout == "nchw" else dims[1:3]
    size = tuple(args.size) if args.size else tuple(spatial)
    if len(size) != 2 or None in size:
        print(
            "make_calibration.py: error: the model's size is dynamic; give --size H W",
            file=sys.stderr,
        )
        return 2
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in EXTENSIONS)
    if args.limit is not None:
        paths = paths[: args.limit]
    if not paths:
        print(f"make_calibration.py: error: no images in {args.images}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    samples = []
    for path in paths:
        with Image.open(path) as opened:
            image = opened.convert("L" if args.grayscale else "RGB")
        for box, mirrored in crop_regions(*image.size, args.crops, rng):
            region = image.crop(box)
            if mirrored:
                region = region.transpose(Image.FLIP_LEFT_RIGHT)
            array = preprocess(region, size, args.resize, float(args.scale[0]), args.mean, args.std)
            samples.append(array[::-1] if args.bgr else array)
    batch = np.stack(samples)
    if args.layout == "nhwc":
        batch = batch.transpose(0, 2, 3, 1)
    np.savez(args.out, **{name: np.ascontiguousarray(batch)})
    print(f"wrote {len(batch)} samples of shape {batch.shape[1:]} as {name!r} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
