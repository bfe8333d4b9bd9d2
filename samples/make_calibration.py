"""Turn a folder of images into a calibration file for ``onnx-lowrank compress --calibration``.

    python samples/make_calibration.py IMAGES_DIR OUT.npz --model MODEL.onnx [options]

The same as ``onnx-lowrank make-calibration IMAGES_DIR OUT.npz ...``, which works from an
installed package; ``onnx-lowrank make-calibration --help`` lists the options. The
preprocessing lives in ``onnx_lowrank.data`` (``crop_regions``, ``preprocess``,
``images_to_batch``). Examples:

    # EfficientNet-Lite0: shorter side 256, crop 224, (x − 127) / 128
    python samples/make_calibration.py photos/ calib.npz --model efficientnet_lite0.onnx \\
        --resize 256 --scale 1 --mean 127 --std 128
    # torchvision ImageNet models
    python samples/make_calibration.py photos/ calib.npz --model resnet.onnx --resize 256 \\
        --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    # MNIST (white digit on black, 28×28)
    python samples/make_calibration.py digits/ calib.npz --model samples/mnist_cnn.onnx \\
        --grayscale --mean 0.1307 --std 0.3081

Needs Pillow (``pip install pillow``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent
if (_CHECKOUT / "onnx_lowrank").is_dir():  # run from a checkout: its own package
    sys.path.insert(0, str(_CHECKOUT))

from onnx_lowrank.cli import main as cli_main  # noqa: E402
from onnx_lowrank.data import crop_regions, preprocess  # noqa: E402

__all__ = ["crop_regions", "main", "preprocess"]


def main(argv: Sequence[str] | None = None) -> int:
    return cli_main(["make-calibration", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
