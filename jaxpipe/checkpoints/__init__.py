"""Checkpoint readers, one module per format: ``hf`` (Hugging Face safetensors directories), ``gguf``
(llama.cpp files), ``native`` (jaxpipe directories written by ``jaxpipe convert``); ``base`` holds the
reader interface and the canonical tensor names, ``open`` picks the reader for a path."""

from jaxpipe.checkpoints.base import (
    GLOBAL_NAMES, LAYER_NAMES, QUANTIZED_NAMES, SCALE_NAMES, TRANSPOSED_NAMES, VOCAB_NAMES, CheckpointReader, Index,
    Key, copy_into, expected_tensors, key_name, scale_name, split_key)
from jaxpipe.checkpoints.gguf import GGUFCheckpointReader
from jaxpipe.checkpoints.hf import HFReader
from jaxpipe.checkpoints.native import (
    GLOBALS_FILE, MANIFEST_FILE, MANIFEST_FORMAT, MANIFEST_VERSION, JaxpipeReader, checksum, layer_file)
from jaxpipe.checkpoints.open import open_checkpoint

__all__ = [
    "GLOBAL_NAMES", "LAYER_NAMES", "QUANTIZED_NAMES", "SCALE_NAMES", "TRANSPOSED_NAMES", "VOCAB_NAMES",
    "CheckpointReader", "Index", "Key", "copy_into", "expected_tensors", "key_name", "scale_name", "split_key",
    "GGUFCheckpointReader", "HFReader",
    "GLOBALS_FILE", "MANIFEST_FILE", "MANIFEST_FORMAT", "MANIFEST_VERSION", "JaxpipeReader", "checksum",
    "layer_file", "open_checkpoint",
]
