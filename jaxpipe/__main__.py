"""``python -m jaxpipe``: the same as the ``jaxpipe`` command."""

import sys

from jaxpipe.cli import main

if __name__ == "__main__":
    sys.exit(main())
