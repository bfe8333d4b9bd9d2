"""Would LAPACK's two-stage tridiagonal reduction make the spectra faster? Run by hand:

    python benchmarks/eigen_drivers.py [--threads 1 2] [--sizes 128 256 512 1024 2048]

The spectra stage spends most of its time in ``numpy.linalg.eigvalsh`` (LAPACK ``dsyevd``:
a one-stage, half matrix-vector tridiagonal reduction, then ``dsterf``). LAPACK also has
``dsyevd_2stage`` (band reduction with matrix-matrix products, then bulge chasing), which
neither NumPy nor SciPy exposes. NumPy's wheels bundle OpenBLAS with the whole of LAPACKE, so
this script calls ``LAPACKE_dsyevd_2stage`` from that library through ctypes (eigenvalues only,
``jobz='N'``) and times it against ``eigvalsh`` on the Gram matrix of a random ``n × (n + 64)``
matrix: the shape of most group matrices at max-groups 8. The result is in
docs/performance.md. It exits with a message if the bundled library is not found (NumPy built
against another BLAS).

It first prints, with one BLAS thread, what one nearly square group matrix ``n × (n + 64)``
costs the naive method (``numpy.linalg.svd(compute_uv=False)``) and the Gram path (the float64
product ``W Wᵀ``, then ``eigvalsh``): the per-matrix gain docs/performance.md explains.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

LAPACK_ROW_MAJOR = 101


def bundled_syevd_2stage():
    """``LAPACKE_dsyevd_2stage`` from NumPy's bundled OpenBLAS, or None."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_LAPACKE_dsyevd_2stage64_", "scipy_LAPACKE_dsyevd_2stage"):
            if hasattr(lib, name):
                fn = getattr(lib, name)
                index = ctypes.c_int64 if name.endswith("64_") else ctypes.c_int32
                fn.restype = index
                fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, index]
                fn.argtypes += [ctypes.c_void_p, index, ctypes.c_void_p]
                return fn
    return None


def eigvalsh_2stage(fn, gram: np.ndarray) -> np.ndarray:
    a = np.array(gram, dtype=np.float64, order="C", copy=True)  # overwritten by LAPACK
    n = a.shape[0]
    w = np.empty(n)
    info = fn(LAPACK_ROW_MAJOR, b"N", b"L", n, a.ctypes.data, n, w.ctypes.data)
    if info != 0:
        raise RuntimeError(f"dsyevd_2stage failed: info={info}")
    return w


def median_seconds(fn, argument, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(argument)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    args = parser.parse_args()
    fn = bundled_syevd_2stage()
    if fn is None:
        print("NumPy's bundled OpenBLAS with LAPACKE_dsyevd_2stage not found", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    print("| n × (n + 64), 1 BLAS thread | SVD ms | Gram product ms | eigvalsh ms | gain |")
    print("|---:|---:|---:|---:|---:|")
    with threadpool_limits(1):
        for n in args.sizes:
            x = rng.standard_normal((n, n + 64))
            repeat = max(3, int(3e8 / n**3))
            svd = median_seconds(lambda a: np.linalg.svd(a, compute_uv=False), x, repeat)
            product = median_seconds(lambda a: a @ a.T, x, repeat)
            eigen = median_seconds(np.linalg.eigvalsh, x @ x.T, repeat)
            times = f"{svd * 1e3:.2f} | {product * 1e3:.2f} | {eigen * 1e3:.2f}"
            print(f"| {n} | {times} | {svd / (product + eigen):.1f}× |")
    print()
    print(
        "| BLAS threads | n | eigvalsh (dsyevd) ms | dsyevd_2stage ms | 2-stage speed-up "
        "| max rel. diff |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        with threadpool_limits(threads):
            for n in args.sizes:
                x = rng.standard_normal((n, n + 64))
                gram = x @ x.T
                repeat = max(3, int(3e8 / n**3))
                one = median_seconds(np.linalg.eigvalsh, gram, repeat)
                two = median_seconds(lambda a: eigvalsh_2stage(fn, a), gram, repeat)
                w1 = np.linalg.eigvalsh(gram)
                w2 = np.sort(eigvalsh_2stage(fn, gram))
                diff = np.abs(w1 - w2).max() / w1.max()
                times = f"{one * 1e3:.2f} | {two * 1e3:.2f} | {one / two:.2f}×"
                print(f"| {threads} | {n} | {times} | {diff:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
