"""Where jaxpipe keeps what it makes once and reuses: one root for every cache."""

from __future__ import annotations

import os


def cache_dir() -> str:
    """jaxpipe's cache root: ``$JAXPIPE_CACHE`` or ``~/.cache/jaxpipe`` (converted checkpoints, built kernels)."""
    return os.environ.get("JAXPIPE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxpipe")


__all__ = ["cache_dir"]
