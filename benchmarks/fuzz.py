"""Long fuzzing run: mutate real and tiny model bytes and fields, external-data entries and data
files, metadata and option values (API and command line), run each, and count the outcomes
(valid compressed model, model refused by validation, typed error, anything else).

Unlike tests/test_fuzz.py, which stops at the first failure, this keeps going and prints every
distinct unexpected exception with its traceback, so one run shows all the crashes there are.

    python benchmarks/fuzz.py --examples 1000 [--seed 20261128]

Results are recorded in docs/robustness.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20261128)
    args = parser.parse_args()
    os.environ["ONNX_LOWRANK_FUZZ_EXAMPLES"] = str(args.examples)  # also fuzzes the MNIST file
    sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's package and tests
    import test_fuzz  # after the path and the environment are set
    from hypothesis import HealthCheck, given, seed, settings

    outcomes: collections.Counter[str] = collections.Counter()
    crashes: dict[str, str] = {}

    @seed(args.seed)
    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(test_fuzz.mutated_cases())
    def run(case: test_fuzz.Case) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                outcomes[test_fuzz.check_case(case)] += 1
            except Exception as exc:
                key = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                outcomes["crash"] += 1
                crashes.setdefault(key, traceback.format_exc())

    started = time.perf_counter()
    run()
    elapsed = time.perf_counter() - started
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"seed {args.seed}: {sum(outcomes.values())} cases in {elapsed:.0f} s")
    for outcome in ("compressed", "refused", "typed", "crash"):
        print(f"  {outcome}: {outcomes[outcome]}")
    for key, trace in crashes.items():
        print(f"\n--- {key}\n{trace}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
