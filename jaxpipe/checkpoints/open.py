"""``open_checkpoint``: pick the reader for a path (HF directory, GGUF file or jaxpipe directory)."""

from __future__ import annotations

import os

from jaxpipe.checkpoints.base import WHAT_IS_EXPECTED, CheckpointReader
from jaxpipe.checkpoints.gguf import GGUFCheckpointReader
from jaxpipe.checkpoints.hf import HFReader
from jaxpipe.checkpoints.native import MANIFEST_FILE, JaxpipeReader, looks_like_jaxpipe_dir
from jaxpipe.errors import CheckpointError


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open and validate a checkpoint: an HF safetensors directory, a GGUF file or a jaxpipe directory.

    Raises ``CheckpointError`` (or ``ConfigError`` for an unsupported config.json) naming the file and
    tensor at fault; no tensor data is read before validation passes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path} does not exist; {WHAT_IS_EXPECTED}")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
            return JaxpipeReader(path)
        if not os.listdir(path):
            raise CheckpointError(f"{path} is an empty directory (an interrupted download or conversion?): "
                                  f"delete it; {WHAT_IS_EXPECTED}")
        if looks_like_jaxpipe_dir(path):
            raise CheckpointError(f"{path}: jaxpipe weight files without {MANIFEST_FILE} (an interrupted "
                                  "conversion?): delete it and convert again")
        return HFReader(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFCheckpointReader(path)
    raise CheckpointError(f"{path} is a file without the GGUF magic bytes; {WHAT_IS_EXPECTED}")
