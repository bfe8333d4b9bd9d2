"""What a run knows about the machine it times on: the device's model name, the channel block
of its fast convolution kernels, and where measured latencies are cached.

The latency cache is keyed by these (latency.py), so a table timed on one CPU or GPU is never
read on another.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir", "device_name", "preferred_multiple"]

#: Environment variable naming the cache's parent folder.
CACHE_ENV = "ONNX_LOWRANK_CACHE"


def cache_dir() -> Path:
    """The latency cache folder: ``$ONNX_LOWRANK_CACHE/latency``, else
    ``~/.cache/onnx-lowrank/latency``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "onnx-lowrank"
    return base / "latency"


def device_name(provider: str) -> str:
    """The model of the device ``provider`` runs on: the GPU's name for GPU providers (when it
    can be read), else the CPU's model name."""
    if provider != "CPUExecutionProvider":
        try:
            import subprocess

            names = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.split("\n")
            if names and names[0].strip():
                return names[0].strip()
        except (OSError, subprocess.SubprocessError):
            pass
        return f"unknown GPU for {provider}"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def preferred_multiple(provider: str) -> int:
    """The channel block of ``provider``'s fast convolution kernels (``--rank-multiple auto``).

    ONNX Runtime's CPU EP runs Conv in the NCHWc layout with blocks of 16 channels on AVX-512
    and 8 on AVX2 (MLAS ``MlasNchwcGetBlockSize``); GPU providers get 8 (tensor cores, FP16).
    A CPU without AVX2 gets 1. The flags' block is the one ONNX Runtime's optimizer applies
    (``benchmarks/rank_multiple.py``'s ``nchwc_block`` reads it from an optimized grouped Conv;
    tests/test_latency.py checks they agree) and the fastest group width it timed
    (docs/performance.md, "Rank multiples and group widths").
    """
    if provider != "CPUExecutionProvider":
        return 8
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:
        return 1
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 1
