"""``python -m jaxpipe.serve [MODEL] ...``: the same as ``jaxpipe serve``."""

import sys

from jaxpipe.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
