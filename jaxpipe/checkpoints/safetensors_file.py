"""One safetensors file as the readers use it: names, dtypes and shapes from ``safetensors.safe_open`` (which
validates the header and that the data covers the file exactly), tensor bytes as zero-copy views of one
read-only memory map.

Why views of our own memory map rather than ``safe_open(...).get_slice(name)[...]``: ``get_slice`` and
``get_tensor`` copy while holding the GIL, so a thread pool cannot read in parallel through them. Measured on
the 2-core development machine (safetensors 0.8.0, page cache warm): a Python loop in the main thread ran at
38% of its speed while another thread called ``get_tensor`` in a loop, and at full speed beside numpy copies;
``get_tensor`` over 512 MB took 1.11 GB/s from one thread and 0.79 GB/s from two. numpy copies out of a
memory map release the GIL, and a block copied straight out of the map into its destination makes one pass
over the bytes instead of two. On the H200 machine: see BENCHMARKS.md (loading, 2026-12-01).
"""

from __future__ import annotations

import json
import struct
import threading

import numpy as np
from safetensors import SafetensorError, safe_open

from jaxpipe import dtypes
from jaxpipe.checkpoints.base import one_line
from jaxpipe.errors import CheckpointError
from jaxpipe.quantize import storage_dtype


class SafetensorsFile:
    """The tensors of one ``.safetensors`` file: ``tensors`` maps each name to ``(dtype code, shape)``.

    ``hint`` ends every error about the file (what the user should do about a damaged file).
    """

    def __init__(self, path: str, hint: str) -> None:
        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:
                names = f.offset_keys()
                self.tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
                for name in names:
                    s = f.get_slice(name)
                    self.tensors[name] = (s.get_dtype(), tuple(int(d) for d in s.get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({one_line(e)}); the file looks "
                                  f"truncated or corrupt; {hint}") from None
        self._offsets = _data_offsets(path)
        self._map: np.memmap | None = None
        self._lock = threading.Lock()

    def view(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only array over the file's memory map (no bytes are read yet)."""
        code, shape = self.tensors[name]
        # Float weights, or the 8-bit values of a quantized jaxpipe directory (which only its reader accepts).
        dt = dtypes.from_safetensors(code) or storage_dtype(code)
        if dt is None:
            raise CheckpointError(f"{self.path}: tensor {name} has dtype {code}, which jaxpipe does not read")
        begin, end = self._offsets[name]
        return self._memmap()[begin:end].view(dt).reshape(shape)

    def close(self) -> None:
        """Drop the memory map; it is unmapped once no view of it is left."""
        with self._lock:
            self._map = None

    def _memmap(self) -> np.memmap:
        with self._lock:
            if self._map is None:
                self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
            return self._map


def _data_offsets(path: str) -> dict[str, tuple[int, int]]:
    """Absolute ``(begin, end)`` byte offsets of each tensor. ``safe_open`` has validated the header
    already but does not expose the offsets, which the memory-mapped views need."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    start = 8 + n
    return {name: (start + int(info["data_offsets"][0]), start + int(info["data_offsets"][1]))
            for name, info in header.items()}
