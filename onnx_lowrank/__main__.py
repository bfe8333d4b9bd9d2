"""``python -m onnx_lowrank``: the same CLI as ``onnx-lowrank``."""

import sys

from .cli import main

sys.exit(main())
