"""Convert a checkpoint to a jaxpipe directory: python tools/convert_checkpoint.py SRC DST [--dtype ...]."""

import argparse
import os
import sys

# Run from a source checkout without installing jaxpipe.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxpipe.convert import add_convert_arguments, run_convert  # noqa: E402
from jaxpipe.errors import JaxpipeError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = add_convert_arguments(argparse.ArgumentParser(description=__doc__))
    args = parser.parse_args(argv)
    try:
        return run_convert(args)
    except JaxpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
