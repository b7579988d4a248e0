"""Compatibility shim: the readers live in ``jaxpipe.checkpoints`` (one module per format).

``from jaxpipe.checkpoint import CheckpointReader, open_checkpoint`` keeps working; new code imports from
``jaxpipe.checkpoints``.
"""

from jaxpipe.checkpoints import *  # noqa: F401,F403
from jaxpipe.checkpoints import __all__  # noqa: F401
