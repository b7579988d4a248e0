"""Decode and prefill speed of jaxpipe at real Llama shapes with random weights.

A thin wrapper over ``jaxpipe.bench`` (the same as ``jaxpipe bench``): same flags, same JSON lines.

    python tools/bench_decode.py --preset llama-2-7b --batch 1 16 --bandwidth-gbps 3350
"""

from __future__ import annotations

import argparse
import os
import sys

# Run from a source checkout without installing jaxpipe.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jaxpipe  # noqa: E402,F401  (sets XLA flags before JAX starts)
from jaxpipe import bench as _bench  # noqa: E402

# Kept importable from here for older scripts.
bench = _bench.bench
copy_bandwidth_gbps = _bench.copy_bandwidth_gbps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=_bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _bench.add_bench_arguments(ap)
    return _bench.run_bench(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
